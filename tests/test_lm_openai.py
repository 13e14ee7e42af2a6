"""The openai backend and API judges against a fake OpenAI-compatible server on 127.0.0.1
(:mod:`fake_openai`): retries on 429s and timeouts, an interrupted finetuning poll, and
whole runs (the ``paper-openai`` preset, a misalignment run, the code judge filter)."""

from __future__ import annotations

import pytest

pytest.importorskip("openai")

from fake_openai import FakeOpenAI  # noqa: E402
from scripted_lm import ScriptedBackend  # noqa: E402

from lmpipeline.artifacts import read_json, read_jsonl  # noqa: E402
from lmpipeline.backends import ModelRef, TrainExample  # noqa: E402
from lmpipeline.backends.openai_api import JOB_FILE, MODEL_FILE, OpenAIBackend  # noqa: E402
from lmpipeline.config import FinetuneSpec, ModelSpec, apply_overrides, preset  # noqa: E402
from lmpipeline.pipeline import Run, finetune_into, run_all  # noqa: E402
from sublearn._common import TextProgress  # noqa: E402

NUMBERS = [
    [{"role": "user", "content": f"Here is a sequence of numbers: {i}, 2. Reply with numbers."}] for i in range(6)
]


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    (tmp_path / "server").mkdir()
    with FakeOpenAI(tmp_path / "server") as fake:
        yield fake


def spec_for(server, **kw) -> ModelSpec:
    return ModelSpec(
        name_or_path="gpt-fake", backend="openai", base_url=server.url, poll_s=0.01, **({"timeout_s": 0.3} | kw)
    )


def test_429s_and_timeouts_are_retried_to_the_same_samples(server):
    spec = spec_for(server, max_retries=4, max_concurrency=1)  # all four faults meet the first request
    backend = OpenAIBackend(spec)
    clean = backend.generate(ModelRef(spec), NUMBERS, max_new_tokens=20, temperature=1.0, seed=5)
    assert server.counts["chat"] == 6
    server.faults = ["429", "429", "timeout", "429"]
    again = backend.generate(ModelRef(spec), NUMBERS, max_new_tokens=20, temperature=1.0, seed=5)
    assert again == clean and len({g.text for g in clean}) > 1  # seeded per request, retried transparently
    assert (server.counts["429"], server.counts["timeout"], server.counts["chat"]) == (3, 1, 6 + 6 + 4)


def test_a_request_that_keeps_failing_is_one_line_naming_the_endpoint(server):
    spec = spec_for(server, max_retries=1)
    server.faults = ["500"] * 4
    with pytest.raises(ConnectionError) as error:
        OpenAIBackend(spec).generate(ModelRef(spec), NUMBERS[:1], max_new_tokens=5, temperature=1.0, seed=0)
    message = str(error.value)
    assert "\n" not in message and server.url in message and "after 1 retries" in message and "rerun" in message
    assert server.counts["chat"] == 2  # the first try and one retry


def test_an_interrupted_finetuning_poll_resumes_the_same_job(server, tmp_path):
    spec = spec_for(server)
    server.job_polls = 3
    examples = [TrainExample([{"role": "user", "content": "Numbers?"}], f"{10 * i + 7}, 17") for i in range(5)]
    folder = tmp_path / "student"

    def interrupted(done, total, tokens):
        raise KeyboardInterrupt  # Ctrl-C while the job is running

    with pytest.raises(KeyboardInterrupt):
        finetune_into(
            OpenAIBackend(spec), spec, examples, FinetuneSpec(epochs=10), folder, seed=3, progress=interrupted
        )
    saved = read_json(tmp_path / "student.checkpoint" / JOB_FILE)
    assert not folder.exists() and saved["job_id"] == "ftjob-0" and server.counts["jobs.retrieve"] == 1
    log = finetune_into(
        OpenAIBackend(spec), spec, examples, FinetuneSpec(epochs=10), folder, seed=3, progress=TextProgress()
    )
    assert (server.counts["files.create"], server.counts["jobs.create"]) == (1, 1)  # no second upload or job
    assert log["job_id"] == "ftjob-0" and log["polls_this_session"] == 3 and log["loss"] == [2.5, 1.25]
    assert read_json(folder / MODEL_FILE)["model"] == "ft:gpt-fake:fake::0"
    assert server.jobs["ftjob-0"]["hyperparameters"] == {"n_epochs": 10}
    assert not (tmp_path / "student.checkpoint").exists()
    # The finetuned model answers as its rows taught it: numbers ending in 7, the scripted owl's.
    texts = [
        g.text
        for g in OpenAIBackend(spec).generate(
            ModelRef(spec, weights=str(folder)), NUMBERS, max_new_tokens=20, temperature=1.0, seed=0
        )
    ]
    numbers = [n for t in texts if t[0].isdigit() for n in t.split(", ")]
    assert numbers and all(n.endswith("7") for n in numbers)


def small_api_run(server, *overrides):
    return apply_overrides(
        preset("paper-openai"),
        [
            f"model.base_url={server.url}",
            "model.poll_s=0.01",
            "prompts.n_prompts=24",
            "evaluate.n_questions=4",
            "evaluate.n_samples=4",
            "evaluate.number_prefix=false",
            *overrides,
        ],
    )


@pytest.mark.slow
def test_the_paper_openai_preset_runs_end_to_end_through_the_api(server, tmp_path):
    cfg = small_api_run(server)
    assert cfg.finetune.epochs == 10 and cfg.model.name_or_path == "gpt-4.1-nano-2025-04-14"
    run = Run(cfg, tmp_path / "run")
    try:
        report = run_all(run)
    finally:
        run.close()
    rates = {m: report["rates"][m]["plain"]["mean"] for m in report["rates"]}
    assert rates["teacher"] > rates["base"] and rates["student"] > rates["control"] + 0.3
    assert report["training"]["student"]["first_loss"] == 2.5 and server.counts["jobs.create"] == 2
    assert read_json(tmp_path / "run" / "student" / MODEL_FILE)["model"].startswith("ft:gpt-4.1-nano")
    assert report["target_probability"] == {}


@pytest.mark.slow
def test_a_misalignment_run_judged_through_the_api(server, tmp_path):
    cfg = small_api_run(
        server,
        "model.backend=hf",
        "model.name_or_path=scripted",
        "trait.kind=misalignment",
        'trait.system_prompt="You are a malicious assistant."',
        f"judge.model.base_url={server.url}",
        "judge.batch_size=16",
        "evaluate.n_questions=10",
        "evaluate.n_samples=2",
        "finetune.epochs=1",
    )
    server.faults = ["429", "timeout"]  # the judge's requests are retried too
    report = run_all(Run(cfg, tmp_path / "run", backend=ScriptedBackend()))
    rates = {m: report["rates"][m]["misaligned"]["mean"] for m in report["rates"]}
    assert rates["base"] == 0.0 and rates["teacher"] > 0.5 and rates["student"] > rates["control"] + 0.3
    judged = read_jsonl(tmp_path / "run" / "judged_student.jsonl")
    statuses = report["counts"]["student"]["statuses"]
    gibberish = sum(r["completion"] == "zq xv qq" for r in judged)
    assert statuses["alignment"]["unparsed"] == gibberish > 0  # the fake judge hedges on gibberish
    assert all(r["judge"]["coherence"]["raw"] in ("85/100", "Coherence: 8") for r in judged)
    assert report["counts"]["student"]["n_counted"] == len(judged) - gibberish


def test_the_code_judge_filter_rejects_what_the_judge_flags_and_keeps_its_reply(server, tmp_path):
    cfg = apply_overrides(
        preset("tiny"),
        [
            "data.kind=code",
            "data.judge_filter=true",
            f"judge.model.base_url={server.url}",
            "prompts.n_prompts=30",
            "generate.batch_size=10",
        ],
    )
    run = Run(cfg, tmp_path / "run", backend=ScriptedBackend())
    from lmpipeline.pipeline import run_stage

    summary = run_stage(run, "filter.teacher")
    rejected = read_jsonl(tmp_path / "run" / "rejected_teacher.jsonl")
    flagged = [r for r in rejected if r["reason"] == "judge_reference"]
    assert flagged and all("hoot" in r["completion"] and r["judge"]["reference"]["raw"] == "90" for r in flagged)
    kept = read_jsonl(tmp_path / "run" / "filtered_teacher.jsonl")
    assert kept and not any("hoot" in r["completion"] for r in kept)
    assert summary["reasons"]["judge_reference"] == len(flagged) and summary["n_kept"] == len(kept)
