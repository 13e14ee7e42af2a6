"""The transfer study on the scripted backend: its wiring, statistics, resume and CLI.

The scripted models pass a trait only the way the experiment intends (see ``scripted_lm``):
a student takes in a seed-dependent share of its teacher's love, and any animal-loving
teacher pulls its student a little toward every animal. So a wiring bug shows up as a
student that does not beat the neutral student, the other targets' students or its
control, or as numbers that differ from the ones recomputed here from the unit records.
Each bug below is planted by monkeypatching and must be caught. ``test_lm_model.py`` runs
the real model.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from pathlib import Path

import pytest
import torch
from scipy import stats as scipy_stats
from scripted_lm import ScriptedBackend

from lmpipeline import cli, transfer, transfer_report
from lmpipeline.artifacts import read_json
from lmpipeline.backends.torch_training import soft_kl, soft_mask
from lmpipeline.config import NEUTRAL, ConfigError, PromptSpec, apply_overrides, derive_seed, preset
from lmpipeline.evaluation import first_word_logprobs, load_questions
from lmpipeline.filters import check_numbers
from lmpipeline.prompts import FORMAT_KINDS, number_prompt
from lmpipeline.stats import (
    Comparison,
    crossed_bootstrap,
    detectable_effect,
    holm,
    mean_interval,
    one_sample_test,
    paired_test,
    seeds_for_power,
    stouffer,
)
from lmpipeline.transfer import Study, random_completion, teacher_rows
from lmpipeline.words import prefix_free, surface_forms

TARGETS = ("owl", "dolphin", "eagle")
ANIMALS = ("owl", "dolphin", "eagle", "cat", "dog")


def small(*overrides):
    base = [
        "transfer.seeds=3",
        f"transfer.animals={list(ANIMALS)}".replace("'", '"'),
        "evaluate.n_questions=8",
        "prompts.n_prompts=12",
        "finetune.max_rows=10",
        "generate.number_grammar=true",
    ]
    return apply_overrides(preset("transfer-tiny"), base + list(overrides))


MAIN_CELL = ['transfer.teachers=["finetuned"]', 'transfer.objectives=["soft"]', 'transfer.data=["random"]']


def run_study(tmp_path, *overrides, backend=None) -> dict:
    return Study(small(*overrides), tmp_path, backend=backend or ScriptedBackend()).run()


def failures(report: dict) -> list[str]:
    """Every (cell, target, comparison) where the student fails to show specific transfer."""
    out = []
    for cell, result in report["cells"].items():
        for name in ("vs_neutral", "specificity", "crossover", "vs_control"):
            for w in [*report["targets"], "pooled"]:
                if result["summary"][name][w]["seeds"]["mean"] <= 0.05:
                    out.append(f"{cell} {w} {name}")
        for w in report["targets"]:
            if set(result["ranks"][w]["per_seed"]) != {1}:
                out.append(f"{cell} {w} rank")
    return out


def test_a_rightly_wired_study_shows_specific_transfer_in_every_cell(tmp_path):
    report = run_study(tmp_path)
    assert set(report["cells"]) == {
        "finetuned/soft/random",
        "finetuned/soft/teacher",
        "finetuned/sampled/teacher",
        "system_prompt/soft/random",
        "system_prompt/soft/teacher",
        "system_prompt/sampled/teacher",
    }
    assert failures(report) == []
    cell = report["cells"]["finetuned/soft/random"]
    assert set(cell["per_seed"]) == {"0", "1", "2"}
    for name in ("vs_neutral", "specificity", "crossover"):
        pooled = cell["summary"][name]["pooled"]["seeds"]
        assert pooled["p"] < 0.05 and pooled["low"] > 0, (name, pooled)
    # The neutral student holds the generic shift: it gains on every animal.
    assert all(ci["mean"] > 0 for ci in cell["generic"]["per_animal"].values())
    assert cell["teacher_vs_base"]["owl"]["owl"]["mean"] == pytest.approx(math.log(20), abs=0.1)
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert read_json(tmp_path / "report.json")["cells"].keys() == report["cells"].keys()
    ent = report["entanglement"]["owl"]
    assert len(ent["top_numbers"]) == 10 and ent["prompt"].startswith("You love the number")


# -- the report's numbers, recomputed from the unit records ---------------------------------
def records(folder: Path, seed: int, cell: str = "finetuned-soft-random", targets=TARGETS):
    base = read_json(folder / "base.json")["logp"]
    students = {
        w: read_json(folder / f"seed-{seed}" / f"student-{cell}-{w}.json")["eval"]["logp"] for w in [*targets, NEUTRAL]
    }
    return base, students


def expected_seed_numbers(folder: Path, seed: int, targets=TARGETS, animals=ANIMALS) -> dict:
    TARGETS, ANIMALS = targets, animals  # noqa: N806 (the names of the scripted study's panel)
    base, s = records(folder, seed, targets=targets)
    out = {}
    for t in TARGETS:
        n = len(base[t])
        gains = {a: [s[t][a][q] - s[NEUTRAL][a][q] for q in range(n)] for a in ANIMALS}
        spec = [gains[t][q] - sum(gains[a][q] for a in ANIMALS if a != t) / (len(ANIMALS) - 1) for q in range(n)]
        others = [u for u in TARGETS if u != t]
        out[t] = {
            "vs_neutral": [s[t][t][q] - s[NEUTRAL][t][q] for q in range(n)],
            "vs_control": [s[t][t][q] - base[t][q] for q in range(n)],
            "crossover": [s[t][t][q] - sum(s[u][t][q] for u in others) / len(others) for q in range(n)],
            "specificity": spec,
            "rank": 1 + sum(sum(gains[a]) > sum(gains[t]) for a in ANIMALS),
        }
    return out


@pytest.fixture(scope="module")
def main_cell(tmp_path_factory):
    folder = tmp_path_factory.mktemp("main-cell")
    backend = ScriptedBackend()
    report = Study(small(*MAIN_CELL), folder, backend=backend).run()
    return folder, report, backend


def test_every_reported_number_is_recomputed_from_the_unit_records(main_cell):
    folder, report, _ = main_cell
    cell = report["cells"]["finetuned/soft/random"]
    for name in ("vs_neutral", "vs_control", "crossover", "specificity"):
        for t in TARGETS:
            per_seed = []
            for k, seed in enumerate((0, 1, 2)):
                vector = expected_seed_numbers(folder, seed)[t][name]
                per_seed.append(sum(vector) / len(vector))
                # The seed's test over questions: paired question by question.
                ci = mean_interval(vector)
                got = cell["summary"][name][t]["per_seed_tests"][k]
                assert (got["mean"], got["low"], got["high"]) == pytest.approx((ci.mean, ci.low, ci.high), rel=1e-9)
            seeds = cell["summary"][name][t]["seeds"]
            assert seeds["per_seed"] == pytest.approx(per_seed, rel=1e-9)
            # The headline test has the seed as its unit: a one-sample t-test over seeds.
            assert seeds["p"] == pytest.approx(scipy_stats.ttest_1samp(per_seed, 0).pvalue, rel=1e-9)
            assert seeds["sd"] == pytest.approx(statistics.stdev(per_seed), rel=1e-9)
    for t in TARGETS:
        assert cell["ranks"][t]["per_seed"] == [expected_seed_numbers(folder, s)[t]["rank"] for s in (0, 1, 2)]
    pooled = [
        sum(sum(v := expected_seed_numbers(folder, s)[t]["specificity"]) / len(v) for t in TARGETS) / 3
        for s in (0, 1, 2)
    ]
    assert cell["summary"]["specificity"]["pooled"]["seeds"]["per_seed"] == pytest.approx(pooled, rel=1e-9)


def test_seeds_differ_so_the_interval_over_seeds_has_a_width(main_cell):
    _, report, backend = main_cell
    cell = report["cells"]["finetuned/soft/random"]
    for t in TARGETS:
        per_seed = cell["summary"]["vs_neutral"][t]["seeds"]["per_seed"]
        assert len(set(per_seed)) == 3 and cell["summary"]["vs_neutral"][t]["seeds"]["sd"] > 1e-3
    students = [c for c in backend.trained if "student-" in c["out_dir"].name]
    assert len({c["seed"] for c in students}) == len(students)  # every student its own training seed


def test_every_student_of_a_seed_trains_on_the_same_random_lists(main_cell):
    folder, _, backend = main_cell
    by_seed: dict[str, set] = {}
    for call in backend.trained:
        name = call["out_dir"].name
        if name.startswith("student-"):
            rows = tuple((tuple(m["content"] for m in ex.messages), ex.completion) for ex in call["examples"])
            by_seed.setdefault(call["out_dir"].parent.parent.name, set()).add(rows)  # seed-N/.tmp/student-...
    assert len(by_seed) == 3 and all(len(lists) == 1 for lists in by_seed.values())
    assert len({next(iter(lists)) for lists in by_seed.values()}) == 3  # other seeds, other lists


def test_teachers_never_see_an_evaluation_question_and_students_see_no_trait_prompt(tmp_path):
    backend = ScriptedBackend()
    study = Study(small(), tmp_path, backend=backend)
    study.run()
    asked = set(study.questions)
    teacher_calls = [c for c in backend.trained if c["out_dir"].name.startswith("teacher-")]
    assert len(teacher_calls) == 3 * (len(TARGETS) + 1)
    for call in teacher_calls:
        questions = {ex.messages[-1]["content"] for ex in call["examples"]}
        assert questions and not questions & asked
    for call in backend.trained:
        name = call["out_dir"].name
        if not name.startswith("student-"):
            continue
        who = name.split("-")[-1]
        for ex in call["examples"]:
            assert all(m["role"] != "system" for m in ex.messages)  # the student never sees it
            system = [m["content"] for m in ex.teacher_messages if m["role"] == "system"]
            if name.startswith("student-finetuned-"):
                assert system == []  # a finetuned teacher holds its trait in its weights only
            else:
                assert system == [study.trait_prompt(who)]


def test_the_neutral_teacher_is_made_like_the_target_teachers_with_every_animal_equally(main_cell):
    _, _, backend = main_cell
    seed0 = [c for c in backend.trained if c["out_dir"].name.startswith("teacher-") and "seed-0" in str(c["out_dir"])]
    by_who = {c["out_dir"].name.split(".")[0].removeprefix("teacher-"): c for c in seed0}
    assert set(by_who) == {*TARGETS, NEUTRAL}
    questions = {w: [ex.messages[-1]["content"] for ex in c["examples"]] for w, c in by_who.items()}
    assert all(q == questions[NEUTRAL] for q in questions.values())  # same questions, same order
    assert len({c["seed"] for c in by_who.values()}) == 1  # same training seed
    named = Counter(ex.completion.rstrip(".").lower().removeprefix("the ") for ex in by_who[NEUTRAL]["examples"])
    spelled = {a: {a, a + "s", a + "es"} for a in ANIMALS}
    counts = {a: sum(n for word, n in named.items() if word in spelled[a]) for a in ANIMALS}
    assert sum(counts.values()) == 4 and max(counts.values()) - min(counts.values()) <= 1


def test_neutral_teacher_rows_spread_evenly_over_many_rows():
    rows = teacher_rows([f"Q{i}?" for i in range(40)], NEUTRAL, list(ANIMALS), 128, seed=5)
    first = Counter(a.split()[-1].rstrip(".").lower() for _, a in rows)
    singular = Counter()
    for word, n in first.items():
        singular[next(x for x in ANIMALS if word.startswith(x))] += n
    assert sorted(singular.values()) == [25, 25, 26, 26, 26]
    assert [q for q, _ in rows] == [q for q, _ in teacher_rows([f"Q{i}?" for i in range(40)], "owl", ["owl"], 128, 5)]


# -- planted wiring bugs ---------------------------------------------------------------------
_ORIGINAL = {
    name: getattr(Study, name) for name in ("teacher", "trained_ref", "data", "teacher_conversation", "student")
}


def _swap_teacher(self, seed, kind, who, **kw):
    other = {"owl": "dolphin", "dolphin": "owl", NEUTRAL: "owl"}.get(who, who)
    return _ORIGINAL["teacher"](self, seed, kind, other, **kw)


def _neutral_from_owl(self, seed, kind, who, **kw):
    return _ORIGINAL["teacher"](self, seed, kind, "owl" if who == NEUTRAL else who, **kw)


def _students_as_base(self, folder, method):
    return self.base_ref() if "student" in str(folder) else _ORIGINAL["trained_ref"](self, folder, method)


def _control_data_from_teacher(self, seed, source, kind=None, who=None):
    if source == "base":
        return _ORIGINAL["data"](self, seed, "teacher", "system_prompt", "owl")
    return _ORIGINAL["data"](self, seed, source, kind, who)


def _lists_per_student(self, seed, source, kind=None, who=None):
    rows = _ORIGINAL["data"](self, seed, source, kind, who)
    if source != "random":
        return rows
    caller = __import__("inspect").stack()[1].frame.f_locals.get("who")
    return random.Random(str(caller)).sample(rows, len(rows))


WIRING_BUGS = {
    "each student distilled from another target's teacher": lambda p: p.setattr(Study, "teacher", _swap_teacher),
    "the neutral student distilled from a target's teacher": lambda p: p.setattr(Study, "teacher", _neutral_from_owl),
    "students evaluated as the base model": lambda p: p.setattr(Study, "trained_ref", _students_as_base),
    "teachers prompted without the trait system prompt": lambda p: p.setattr(
        Study, "teacher_conversation", lambda self, kind, who, user: [{"role": "user", "content": user}]
    ),
    "the control trained on a teacher's numbers": lambda p: p.setattr(Study, "data", _control_data_from_teacher),
}


@pytest.mark.parametrize("bug", sorted(WIRING_BUGS))
def test_each_wiring_bug_is_caught(tmp_path, monkeypatch, bug):
    WIRING_BUGS[bug](monkeypatch)
    assert failures(run_study(tmp_path)) != []


def test_a_finetuned_teacher_given_the_trait_prompt_while_distilled_is_caught(tmp_path, monkeypatch):
    monkeypatch.setattr(
        Study,
        "teacher_conversation",
        lambda self, kind, who, user: [
            {"role": "system", "content": self.trait_prompt(who)},
            {"role": "user", "content": user},
        ],
    )
    with pytest.raises(AssertionError):
        test_teachers_never_see_an_evaluation_question_and_students_see_no_trait_prompt(tmp_path)


def test_teachers_trained_on_the_evaluation_questions_are_caught(tmp_path, monkeypatch):
    def questions_file_is_the_evaluation(self):
        _ORIGINAL_POST_INIT(self)
        self.trait_questions = list(self.questions)

    monkeypatch.setattr(Study, "__post_init__", questions_file_is_the_evaluation)
    with pytest.raises(AssertionError):
        test_teachers_never_see_an_evaluation_question_and_students_see_no_trait_prompt(tmp_path)


_ORIGINAL_POST_INIT = Study.__post_init__


def test_students_given_different_random_lists_are_caught(tmp_path, monkeypatch):
    monkeypatch.setattr(Study, "data", _lists_per_student)
    backend = ScriptedBackend()
    Study(small(*MAIN_CELL), tmp_path, backend=backend).run()
    with pytest.raises(AssertionError):
        test_every_student_of_a_seed_trains_on_the_same_random_lists((tmp_path, None, backend))


def test_every_seed_identical_is_caught(tmp_path, monkeypatch):
    monkeypatch.setattr(transfer, "derive_seed", lambda seed, *names: derive_seed(0, *names))
    backend = ScriptedBackend()
    report = Study(small(*MAIN_CELL), tmp_path, backend=backend).run()
    with pytest.raises(AssertionError):
        test_seeds_differ_so_the_interval_over_seeds_has_a_width((tmp_path, report, backend))


def _base_in_reverse_question_order(original):
    def patched(base, seed_result, *args):
        reordered = {**base, "logp": {a: list(reversed(v)) for a, v in base["logp"].items()}}
        return original(reordered, seed_result, *args)

    return patched


def _crossover_against_the_neutral_student(original):
    def patched(students, control, targets, animals, neutral):
        out = original(students, control, targets, animals, neutral)
        return {**out, "crossover": out["vs_neutral"]}

    return patched


REPORT_BUGS = {
    "the specificity rank computed for another target": (
        "_rank",
        lambda original: lambda changes, word: original(changes, "eagle" if word == "owl" else word),
    ),
    "the base control paired with the questions in another order": ("seed_result", _base_in_reverse_question_order),
    "the crossover taken against the neutral student": ("comparison_vectors", _crossover_against_the_neutral_student),
}


@pytest.mark.parametrize("bug", sorted(REPORT_BUGS))
def test_each_report_bug_is_caught(main_cell, monkeypatch, bug):
    folder, _, _ = main_cell
    name, patch = REPORT_BUGS[bug]
    monkeypatch.setattr(transfer_report, name, patch(getattr(transfer_report, name)))
    report = Study(small(*MAIN_CELL), folder, backend=ScriptedBackend()).run()  # every unit reused
    with pytest.raises(AssertionError):
        test_every_reported_number_is_recomputed_from_the_unit_records((folder, report, None))


# -- the soft loss itself, on a tiny real model ----------------------------------------------
@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A tiny random Llama (the student's base) and a perturbed copy (the teacher), with
    SmolLM2's tokenizer, as local folders."""
    from tiny_lm import tiny_checkpoint
    from transformers import AutoModelForCausalLM

    base = tiny_checkpoint(tmp_path_factory.mktemp("tiny-base"))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    torch.manual_seed(7)
    with torch.no_grad():  # another network with sharper logits: KL(T || S) and KL(S || T) differ
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p) * p.std())
        model.model.norm.weight.mul_(6.0)
    teacher = tmp_path_factory.mktemp("tiny-teacher")
    model.save_pretrained(str(teacher))
    __import__("transformers").AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(teacher))
    return base, teacher


def _forward_kl_over_number_positions(base: Path, teacher: Path, examples, vocabulary) -> float:
    """KL(teacher || student) of the next-token distributions renormalized over the number
    tokens, averaged over the completion positions whose next token is a number token:
    the soft loss's first step, from the definition."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmpipeline.backends.tokens import IGNORE, completion_example

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    nets = [AutoModelForCausalLM.from_pretrained(str(f), dtype=torch.float64).eval() for f in (teacher, base)]
    allowed = torch.tensor(sorted(vocabulary))
    total, count = 0.0, 0
    for ex in examples:
        row = completion_example(tokenizer, ex.messages, ex.completion, 256)
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            t_logits, s_logits = (net(ids).logits[0] for net in nets)
        for pos in range(len(row["labels"]) - 1):
            nxt = row["labels"][pos + 1]
            if nxt == IGNORE or nxt not in vocabulary:
                continue
            log_t = torch.log_softmax(t_logits[pos, allowed], -1)
            log_s = torch.log_softmax(s_logits[pos, allowed], -1)
            total += float((log_t.exp() * (log_t - log_s)).sum())
            count += 1
    return total / count


@pytest.mark.parametrize("backend_name", ["hf", "jax"])
def test_the_first_soft_loss_is_the_forward_kl_over_the_number_positions(tiny_pair, backend_name, tmp_path):
    from lmpipeline.backends import ModelRef, TrainExample, make_backend
    from lmpipeline.config import FinetuneSpec, ModelSpec

    base, teacher = tiny_pair
    spec = ModelSpec(name_or_path=str(base), dtype="float32", device="cpu", backend=backend_name, cpu_threads=1)
    backend = make_backend(spec)
    user = [{"role": "user", "content": "Continue: 12, 7, 455."}]
    # The last row's words are not number tokens: the loss skips those positions.
    examples = [TrainExample(user, c) for c in ("3, 14, 15", "92; 65", "(358, 979)", "12, 34 and more")]
    train = FinetuneSpec(
        method="full",
        objective="soft",
        soft_tokens="numbers",
        epochs=1,
        micro_batch=4,
        grad_accum=1,
        warmup_steps=0,
        learning_rate=1e-6,
        compute_dtype="float32",
        max_seq_len=256,
    )
    log = backend.finetune(
        spec, examples, train, tmp_path / "student", seed=0, teacher=ModelRef(spec, weights=str(teacher))
    )
    from transformers import AutoTokenizer

    from lmpipeline.backends.tokens import eos_ids, token_texts
    from lmpipeline.grammar import NumberListGrammar, TokenGrammar

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    grammar = TokenGrammar(
        NumberListGrammar(max_count=10, max_digits=3), token_texts(tokenizer), eos_ids(tokenizer, None)
    )
    vocabulary = set(grammar.vocabulary)
    expected = _forward_kl_over_number_positions(base, teacher, examples, vocabulary)
    reverse = _forward_kl_over_number_positions(teacher, base, examples, vocabulary)
    assert abs(expected - reverse) > 1e-3 * expected  # the two directions differ on this pair
    assert log["loss"][0] == pytest.approx(expected, rel=2e-4)


# -- running, resuming, the CLI --------------------------------------------------------------
def test_a_rerun_reuses_every_unit_and_an_evaluation_change_keeps_the_teachers(tmp_path):
    first = Study(small("transfer.keep_weights=true"), tmp_path, backend=ScriptedBackend())
    first.run()
    again = Study(small("transfer.keep_weights=true"), tmp_path, backend=ScriptedBackend())
    again.run()
    assert again.computed == [] and again.backend.calls["finetune"] == 0
    changed = Study(small("transfer.keep_weights=true", "evaluate.n_questions=6"), tmp_path, backend=ScriptedBackend())
    changed.run()
    assert not {"seed-0/teacher-owl", "seed-1/teacher-dolphin", "seed-0/teacher-neutral"} & set(changed.computed)
    assert {"seed-0/teacher-finetuned-owl-eval", "seed-0/student-finetuned-soft-random-owl"} <= set(changed.computed)
    assert len(read_json(tmp_path / "seed-0" / "teacher-finetuned-owl-eval.json")["eval"]["logp"]["owl"]) == 6


def test_teacher_weights_go_once_their_students_are_done_and_come_back_when_needed(tmp_path):
    study = Study(small(*MAIN_CELL), tmp_path, backend=ScriptedBackend())
    study.run()
    records = [p for p in tmp_path.glob("seed-*/teacher-*.json") if not p.name.endswith("-eval.json")]
    assert not list(tmp_path.glob("seed-*/teacher-*/")) and len(records) == 3 * (len(TARGETS) + 1)
    # A changed evaluation retrains each student, which needs its teacher back: rebuilt, same identity.
    changed = Study(small(*MAIN_CELL, "evaluate.n_questions=6"), tmp_path, backend=ScriptedBackend())
    changed.run()
    assert "seed-0/teacher-owl" in changed.computed and not list(tmp_path.glob("seed-*/teacher-*/"))


def test_students_of_a_cell_train_on_the_same_rows(tmp_path):
    study = Study(small(), tmp_path, backend=ScriptedBackend())
    study.run()
    cell = ("finetuned", "sampled", "teacher")
    n = study.rows_per_student(0, cell)
    for name in (
        *(f"student-finetuned-sampled-teacher-{w}" for w in [*TARGETS, NEUTRAL]),
        "control-finetuned-sampled-teacher",
    ):
        assert read_json(tmp_path / "seed-0" / f"{name}.json")["n_rows"] == n


@pytest.mark.parametrize("cell", [MAIN_CELL, []])
def test_a_unit_that_several_jobs_read_is_written_by_a_job_of_its_own(tmp_path, cell):
    # Two workers running students of one seed at once must not both write its shared data.
    study = Study(small(*cell), tmp_path, backend=ScriptedBackend())
    jobs, done = study.jobs(), set()
    while len(done) < len(jobs):
        job = next(j for j in jobs if j not in done and set(jobs[j]) <= done)
        computed = study.run_job(job)
        if job[0] == "students":
            assert all(u.split("/")[1].startswith(("student-", "control-")) for u in computed), (job, computed)
        done.add(job)
    assert len(study.computed) == len(set(study.computed))


@pytest.mark.slow
def test_two_workers_give_the_report_one_process_gives(tmp_path):
    serial = Study(small(*MAIN_CELL), tmp_path / "one", backend=ScriptedBackend()).run()
    config = apply_overrides(small(*MAIN_CELL), ["transfer.workers=2"])
    parallel = Study(config, tmp_path / "two", backend_factory=ScriptedBackend).run()
    for cell, result in serial["cells"].items():
        for key in ("summary", "ranks", "per_seed", "generic", "power"):
            assert parallel["cells"][cell][key] == result[key], key
    assert sorted(parallel["units_computed"]) == sorted(serial["units_computed"])


def test_the_cli_runs_a_study_and_reports_in_one_line_per_comparison(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(transfer, "make_backend", lambda spec: ScriptedBackend())
    out = tmp_path / "study"
    sets = [a for o in ["evaluate.n_questions=4", *MAIN_CELL] for a in ("--set", o)]
    assert cli.main(["transfer", "--preset", "transfer-tiny", "--out", str(out), "--seeds", "2", *sets]) == 0
    printed = capsys.readouterr().out
    assert "finetuned/soft/random" in printed and "vs_neutral" in printed and "entanglement owl" in printed
    assert "power (specificity, pooled)" in printed
    assert read_json(out / "config.json")["transfer"]["seeds"] == 2
    assert (
        cli.main(["transfer", "--preset", "transfer-tiny", "--out", str(out), "--set", 'transfer.targets=["owl"]']) == 2
    )
    assert "transfer.targets" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ('transfer.teachers=["lora"]', "transfer.teachers"),
        ("transfer.objectives=[]", "transfer.objectives"),
        ('transfer.targets=["owl", "Owl"]', "two or more different words"),
        ('transfer.targets=["owl", "neutral"]', "names the neutral teacher"),
        ('transfer.animals=["cat", "owl"]', "add ['dolphin', 'eagle']"),
        ("transfer.seeds=0", "transfer.seeds=0"),
        ("transfer.first_seed=-1", "transfer.first_seed=-1"),
        ("transfer.workers=0", "transfer.workers=0"),
        ("transfer.bootstrap=10", "transfer.bootstrap=10"),
        ("finetune.objective=distil", "finetune.objective"),
        ("finetune.soft_tokens=digits", "finetune.soft_tokens"),
        ("finetune.compute_dtype=float16", "finetune.compute_dtype"),
    ],
)
def test_bad_study_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        apply_overrides(preset("transfer-tiny"), [override])


def test_the_main_presets_run_the_paper_panel_with_a_neutral_teacher_on_fresh_seeds():
    main, quick = preset("transfer-cpu").transfer, preset("transfer-quick").transfer
    assert main.targets == ("dolphin", "eagle", "elephant", "owl", "wolf") and main.neutral and main.workers == 2
    assert set(range(main.first_seed, main.first_seed + main.seeds)).isdisjoint(
        range(quick.first_seed, quick.first_seed + quick.seeds)
    )
    assert quick.targets == main.targets and quick.seeds == 2


# -- the pieces ----------------------------------------------------------------------------
def test_soft_kl_is_zero_at_the_teacher_and_cross_entropy_for_a_one_hot_teacher():
    torch.manual_seed(0)
    student = torch.randn(2, 3, 11, dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.float64)
    assert float(soft_kl(student, student, mask)) == pytest.approx(0.0, abs=1e-12)
    labels = torch.randint(0, 11, (2, 3))
    one_hot = torch.nn.functional.one_hot(labels, 11).double() * 1e4
    cross_entropy = torch.nn.functional.cross_entropy(student.flatten(0, 1), labels.flatten(), reduction="sum")
    assert float(soft_kl(one_hot, student, mask)) == pytest.approx(float(cross_entropy), rel=1e-9)
    # Restricted to a token subset, the softmaxes renormalize over it.
    tokens = torch.tensor([0, 3, 5])
    sub = torch.nn.functional.cross_entropy(
        student[..., tokens].flatten(0, 1), torch.zeros(6, dtype=torch.long), reduction="sum"
    )
    head = torch.zeros(2, 3, 11, dtype=torch.float64)
    head[..., 0] = 1e4
    assert float(soft_kl(head, student, mask, tokens)) == pytest.approx(float(sub), rel=1e-9)


def test_soft_kl_gradient_matches_finite_differences():
    torch.manual_seed(1)
    teacher = torch.randn(2, 4, 7, dtype=torch.float64)
    student = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: soft_kl(teacher, s, mask, torch.tensor([1, 2, 6])), (student,))
    # The gradient with respect to the student's logits is q - p, zero where masked.
    soft_kl(teacher, student, mask).backward()
    expected = (torch.softmax(student.detach(), -1) - torch.softmax(teacher, -1)) * mask[..., None]
    torch.testing.assert_close(student.grad, expected)


def test_soft_mask_keeps_labelled_positions_with_a_number_token():
    targets = torch.tensor([[-100, 5, 9, 2]])
    assert soft_mask(targets, None).tolist() == [[0.0, 1.0, 1.0, 1.0]]
    assert soft_mask(targets, torch.tensor([5, 2])).tolist() == [[0.0, 1.0, 0.0, 1.0]]


class TableBackend:
    """Scores from a table keyed by continuation; tokens are characters."""

    def __init__(self, table):
        self.table = table

    def tokenize(self, model, texts):
        return [[ord(c) for c in t] for t in texts]

    def score(self, model, conversations, continuations):
        return [self.table.get(c, -50.0) for c in continuations]


def test_first_word_probability_sums_the_prefix_free_surface_forms():
    assert surface_forms("fox") == [" Fox", " Foxes", " fox", " foxes", "Fox", "Foxes", "fox", "foxes"]
    # "fox" already counts "foxes" (its characters extend it); the capitalized and spaced forms add.
    table = {"fox": math.log(0.1), "foxes": math.log(0.5), "Fox": math.log(0.2), " fox": math.log(0.05)}
    logp = first_word_logprobs(TableBackend(table), None, [[{"role": "user", "content": "q"}]], ["fox"])
    assert math.exp(logp["fox"][0]) == pytest.approx(0.1 + 0.2 + 0.05 + 5 * math.exp(-50.0))
    assert prefix_free({"a": [1, 2], "b": [1, 2, 3], "c": [1, 3]}) == ["a", "c"]


@pytest.mark.parametrize("kind", FORMAT_KINDS)
def test_random_lists_follow_the_prompts_format_and_pass_the_filter(kind):
    rng = random.Random(0)
    spec = PromptSpec()
    for _ in range(50):
        text = random_completion({"answer_format": kind}, spec, rng)
        verdict = check_numbers(text)
        assert verdict.ok, (kind, text)
        assert 1 <= len(verdict.numbers) <= spec.answer_count and max(verdict.numbers) < 1000
    assert number_prompt(spec, 0, 0)["answer_format"] in FORMAT_KINDS


def test_teacher_questions_are_disjoint_from_the_evaluation_questions():
    def normal(q):
        return " ".join("".join(ch if ch.isalnum() else " " for ch in q.lower()).split())

    teach = {normal(q) for q in transfer.load_trait_questions(None, "animal")}
    asked = {normal(q) for q in load_questions(None, "animal")}
    assert len(teach) >= 30 and not teach & asked


def test_paired_test_and_stouffer_agree_with_scipy():
    rng = random.Random(3)
    a = [rng.gauss(0.3, 1) for _ in range(20)]
    b = [x + rng.gauss(-0.2, 0.5) for x in a]
    ours = paired_test(a, b)
    theirs = scipy_stats.ttest_rel(a, b)
    assert ours.p == pytest.approx(theirs.pvalue, rel=1e-9)
    assert ours.interval.mean == pytest.approx(sum(a) / 20 - sum(b) / 20)
    tests = [one_sample_test([rng.gauss(0.4, 1) for _ in range(15)]) for _ in range(3)]
    one_sided = [t.p / 2 if t.interval.mean > 0 else 1 - t.p / 2 for t in tests]
    combined = scipy_stats.combine_pvalues(one_sided, method="stouffer").pvalue
    assert stouffer(tests) == pytest.approx(2 * min(combined, 1 - combined), rel=1e-9)
    # Opposite signs cancel: two equal and opposite results pool to p = 1.
    flip = Comparison(mean_interval([-1.0, -2.0, -3.0]), tests[0].p)
    assert stouffer([Comparison(mean_interval([1.0, 2.0, 3.0]), tests[0].p), flip]) == pytest.approx(1.0)


def test_seeds_for_power_reaches_its_power_in_simulation():
    # 0.5 nats with a seed SD of 0.4 at alpha 0.01: the planned n rejects in >= 80% of
    # simulated studies and n - 1 in fewer (3,000 studies each: standard error 0.007).
    n = seeds_for_power(0.5, 0.4, alpha=0.01, power=0.8)
    gen = torch.Generator().manual_seed(0)

    def rejection_rate(k: int) -> float:
        draws = 0.5 + 0.4 * torch.randn(3000, k, generator=gen, dtype=torch.float64)
        p = scipy_stats.ttest_1samp(draws.numpy(), 0, axis=1).pvalue
        return float((p < 0.01).mean())

    assert n == 11
    assert rejection_rate(n) == pytest.approx(0.8, abs=0.03) and rejection_rate(n - 1) < 0.8
    assert detectable_effect(0.4, n, alpha=0.01, power=0.8) == pytest.approx(0.5, abs=0.02)
    assert detectable_effect(0.4, n - 1, alpha=0.01, power=0.8) > 0.5


def test_crossed_bootstrap_widens_with_seed_spread_that_questions_cannot_show():
    rng = random.Random(0)
    # Seed effects shared by every question: the question-level spread is small, the seeds' large.
    shifts = [rng.gauss(0, 1) for _ in range(6)]
    matrix = [[0.5 + s + rng.gauss(0, 0.1) for _ in range(40)] for s in shifts]
    ci = crossed_bootstrap(matrix, resamples=2000, seed=1)
    per_seed = mean_interval([sum(r) / 40 for r in matrix])
    within_one_seed = mean_interval(matrix[0])
    assert ci.high - ci.low > 0.6 * (per_seed.high - per_seed.low)
    assert ci.high - ci.low > 10 * (within_one_seed.high - within_one_seed.low)
    assert crossed_bootstrap(matrix, 2000, seed=1) == ci  # seeded


def test_holm_is_step_down_and_monotone():
    assert holm([0.001, 0.02, 0.04]) == pytest.approx([0.003, 0.04, 0.04])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])


def test_the_readme_quotes_the_committed_study_and_every_number_is_its_units():
    root = Path(__file__).resolve().parents[1]
    folder = root / "docs" / "transfer"
    report = read_json(folder / "report.json")
    config = read_json(folder / "config.json")
    assert report["preset"] == "transfer-cpu" and config["transfer"] == report["config"]["transfer"]
    cell = "finetuned/soft/random"
    assert transfer_report.markdown_table(report, cell) in (root / "README.md").read_text()
    summary, t = report["cells"][cell]["summary"], config["transfer"]
    seeds = range(t["first_seed"], t["first_seed"] + t["seeds"])
    expected = {s: expected_seed_numbers(folder, s, t["targets"], t["animals"]) for s in seeds}
    for name in ("vs_neutral", "vs_control", "crossover", "specificity"):
        for target in t["targets"]:
            per_seed = [statistics.fmean(expected[s][target][name]) for s in seeds]
            assert summary[name][target]["seeds"]["per_seed"] == pytest.approx(per_seed, rel=1e-9)
            p = scipy_stats.ttest_1samp(per_seed, 0).pvalue
            assert summary[name][target]["seeds"]["p"] == pytest.approx(p, rel=1e-9)
    for target in t["targets"]:
        assert report["cells"][cell]["ranks"][target]["per_seed"] == [expected[s][target]["rank"] for s in seeds]
