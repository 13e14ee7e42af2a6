"""``sublearn mnist``: run the MNIST experiment, print the table, write results and figure.

Every field of :class:`toymodels.config.MnistConfig` is an option (``--n-aux 5``,
``--hidden 512 512``, ``--student-loss mse``, ...), with the paper's values as defaults.
Writes ``results.json``, ``mnist_figure.png`` and ``mnist_figure.pdf`` to ``--out``, and
with ``--track N`` also ``trajectory.png``/``.pdf`` (the students' alignment along
training, :mod:`toymodels.track`). A run
that is stopped keeps its finished seeds in ``checkpoint.json`` there, and the same
command picks up from them. One command at a time writes a folder, and only this
command's results go into it (:func:`sublearn._store.claim`).

``--sweep FIELD=V1,V2,...`` runs the experiment once per value instead and writes
``sweep.json`` and ``sweep_figure.png``/``.pdf``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from sublearn._common import former_name, output_folder
from toymodels.config import (
    OPTIMIZERS,
    PRECISIONS,
    STUDENT_DATA,
    STUDENT_LOSSES,
    ConfigError,
    MnistConfig,
    field_docs,
)
from toymodels.data import SOURCES

RESULTS = "results.json"
CHECKPOINT = "checkpoint.json"
CHOICES = {
    "optimizer": OPTIMIZERS,
    "student_optimizer": OPTIMIZERS,
    "student_data": STUDENT_DATA,
    "student_loss": STUDENT_LOSSES,
    "precision": PRECISIONS,
}


class _FormerName(argparse.Action):
    """Store the value; the option's first name is its name, any other a former one (with a notice)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string != self.option_strings[0]:
            former_name(option_string, self.option_strings[0])
        setattr(namespace, self.dest, values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("results/mnist"), help="output folder (default: results/mnist)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    parser.add_argument(
        "--data", choices=SOURCES, default=None, help="MNIST source (default: bundled; 'dir' if --data-dir is given)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder holding the four MNIST IDX files (with --data tfds: prepare tfds's mnist from them, offline)",
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help="with --data tfds: never download; prepare tfds's mnist from --data-dir (default: the bundled files) "
        "if the tfds data folder ($TFDS_DATA_DIR, else ~/tensorflow_datasets) lacks it",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument(
        "--sweep", metavar="FIELD=V1,V2,...", default=None, help="run once per value of one option, e.g. n_aux=1,3,10"
    )
    group = parser.add_argument_group("experiment (defaults: the paper's setup)")
    hints = typing.get_type_hints(MnistConfig)
    for field in dataclasses.fields(MnistConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        # argparse formats help with %: a literal one is doubled.
        help_text = f"{field_docs()[field.name]} (default: {field.default})".replace("%", "%%")
        if field.name == "hidden":
            group.add_argument(flag, type=int, nargs="+", default=field.default, metavar="WIDTH", help=help_text)
        elif field.name == "student_data":  # --noise: its name before MNIST images were an option
            group.add_argument(
                flag,
                "--noise",
                dest=field.name,
                choices=CHOICES[field.name],
                default=field.default,
                help=help_text,
                action=_FormerName,
            )
        elif field.name in CHOICES:
            group.add_argument(flag, choices=CHOICES[field.name], default=field.default, help=help_text)
        elif kind == int | None:
            group.add_argument(flag, type=int, default=field.default, help=f"{help_text} (all)")
        elif kind == float | None:
            group.add_argument(flag, type=float, default=field.default, help=help_text)
        else:
            group.add_argument(flag, type=kind, default=field.default, help=help_text)


def config_from_args(args: argparse.Namespace) -> MnistConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(MnistConfig)}
    values["hidden"] = tuple(values["hidden"])
    return MnistConfig(**values).validate()


def parse_sweep(text: str) -> tuple[str, list]:
    """``"n_aux=1,3,10"`` -> ``("n_aux", [1, 3, 10])``, values typed like the config field."""
    field_name, _, raw = text.partition("=")
    field_name = field_name.strip().replace("-", "_")
    fields = {f.name: f for f in dataclasses.fields(MnistConfig)}
    if field_name not in fields or not raw:
        raise ConfigError(f"--sweep needs FIELD=V1,V2,... with FIELD one of {', '.join(fields)} (got {text!r})")
    kind = typing.get_type_hints(MnistConfig)[field_name]
    convert = int if kind in (int, int | None) else float if kind in (float, float | None) else str
    if field_name == "hidden":
        raise ConfigError("--sweep over hidden is not supported: sweep one scalar option")
    try:
        return field_name, [convert(v) for v in raw.split(",")]
    except ValueError as err:
        raise ConfigError(f"--sweep {field_name}: {err}") from err


def format_table(result: typing.Any) -> str:  # an ExperimentResult
    """The results table: this run's mean, CI and n beside the paper's numbers."""
    rows = [f"{'condition':<14}{'mean':>8}{'95% CI':>10}{'n':>5}   {'paper (n=100)':>16}"]
    paper_results = result.paper
    for condition, s in result.summary.items():
        paper = paper_results.get(condition)
        ref = f"{paper['mean']:.3f} +- {paper['ci95']:.3f}" if paper else ""
        rows.append(f"{condition:<14}{s['mean']:>8.3f}{'+- ' + format(s['ci95'], '.3f'):>10}{s['n']:>5}   {ref:>16}")
    return "\n".join(rows)


def format_trajectory(trajectory: dict) -> str:
    """The last tracked point of every student condition: each metric's mean and CI over seeds."""
    step = trajectory["steps"][-1]
    rows = [f"at student step {step} ({trajectory['probe']['n']} probe images):"]
    for condition, curves in trajectory["conditions"].items():
        cells = [f"{m} {curves[m]['mean'][-1]:.3f} +- {curves[m]['ci95'][-1]:.3f}" for m in trajectory["metrics"]]
        rows.append(f"  {condition:<12} " + ", ".join(cells))
    return "\n".join(rows)


def prepare_output(out: Path, result_name: str, overwrite: bool, fingerprint: str | None = None) -> None:
    """Create ``out``, check it is writable and holds no ``result_name`` yet, before any training.

    With ``overwrite``, a checkpoint is kept if it belongs to the run about to start
    (same ``fingerprint``), so an interrupted ``--overwrite`` run resumes when repeated;
    a checkpoint of any other run is deleted. Without it, such a checkpoint stops the run
    (:func:`toymodels.experiment.run_experiment` raises :class:`ConfigError`).
    """
    from toymodels.experiment import checkpoint_key

    output_folder(out)
    if overwrite:
        if checkpoint_key(out / CHECKPOINT) != fingerprint:
            (out / CHECKPOINT).unlink(missing_ok=True)
    elif (out / result_name).exists():
        raise ConfigError(
            f"{out / result_name} already exists: pass --overwrite to replace it, or choose another --out"
        )


def _data_source(args: argparse.Namespace) -> str:
    """The MNIST source the options name; ``--data-dir`` with a source that never reads it is an error."""
    if args.data is None:
        return "dir" if args.data_dir is not None else "bundled"
    if args.data == "bundled" and args.data_dir is not None:
        raise ConfigError(
            f"--data bundled reads the packaged files, not --data-dir {args.data_dir}: drop one of the two"
        )
    return args.data


def run(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")  # the command writes figure files; it never needs a display
    from sublearn._common import SilentProgress, TextProgress
    from sublearn._store import claim
    from toymodels.data import load_mnist
    from toymodels.experiment import run_experiment

    config = config_from_args(args)
    sweep = parse_sweep(args.sweep) if args.sweep else None
    data = load_mnist(_data_source(args), args.data_dir, offline=args.offline)
    progress = SilentProgress() if args.quiet else TextProgress()
    command = "sublearn mnist --sweep" if sweep is not None else "sublearn mnist"
    with claim(args.out, command, config.to_dict()):
        if sweep is not None:
            return _run_sweep(args, config, sweep, data, progress)
        prepare_output(args.out, RESULTS, args.overwrite, config.fingerprint())
        result = run_experiment(config, data=data, progress=progress, checkpoint=args.out / CHECKPOINT)
        _write_results(args, result)
    return 0


def kept_after_interrupt(args: argparse.Namespace) -> str | None:
    """What an interrupted run leaves to resume from (:func:`sublearn.cli.main` says it)."""
    kept = args.out / CHECKPOINT
    return f"finished seeds are kept in {kept}" if kept.exists() else None


def _write_results(args: argparse.Namespace, result: typing.Any) -> None:  # an ExperimentResult
    from sublearn._common import write_json
    from sublearn._store import seal
    from toymodels.figure import plot_results, plot_trajectory, save_figure

    record = result.to_json()
    figure_paths = save_figure(plot_results(record), args.out)
    if result.trajectory is not None:
        figure_paths += save_figure(plot_trajectory(record), args.out, stem="trajectory")
    write_json(args.out / RESULTS, seal(record, record["fingerprint"]))
    (args.out / CHECKPOINT).unlink(missing_ok=True)
    print(format_table(result))
    if result.trajectory is not None:
        print(format_trajectory(result.trajectory))
    print(f"wall time {result.wall_s:.1f}s; wrote {args.out / RESULTS}, " + ", ".join(str(p) for p in figure_paths))


def _run_sweep(args, config, sweep, data, progress) -> int:
    from sublearn._common import environment, write_json
    from toymodels.figure import save_figure
    from toymodels.sweep import plot_sweep, run_sweep

    field_name, values = sweep
    for value in values:  # every point is checked before the first one runs
        dataclasses.replace(config, **{field_name: value}).validate()
    prepare_output(args.out, "sweep.json", args.overwrite)
    result = run_sweep(config, field_name, values, data=data, progress=progress)
    result["environment"] = environment()
    write_json(args.out / "sweep.json", result)
    paths = save_figure(plot_sweep(result), args.out, stem="sweep_figure")
    for point in result["points"]:
        s = point["summary"]
        print(
            f"{field_name}={point['value']}: " + ", ".join(f"{c} {s[c]['mean']:.3f} +- {s[c]['ci95']:.3f}" for c in s)
        )
    lowest = result["lowest_final_loss"]
    print("lowest final training loss at " + ", ".join(f"{c}: {field_name}={v}" for c, v in lowest.items()))
    print(f"wrote {args.out / 'sweep.json'}, " + ", ".join(str(p) for p in paths))
    return 0


def main(argv: list[str] | None = None) -> int:
    from sublearn.cli import main as sublearn_main

    return sublearn_main(["mnist", *(sys.argv[1:] if argv is None else argv)])
