"""``sublearn atlas``: the MNIST effect against each knob, with CIs, next to the published numbers.

One curve per knob (:func:`curves`): the accuracy of the aux-only students that share
their teacher's initialization (``student_aux``) and of those that start from another
seed's (``cross_aux``), as the knob moves away from the paper's setup and everything
else stays at the paper's values. Every point is one :func:`toymodels.sweep.run_points`
run over ``seeds`` seeds, so every value carries a 95% CI over seeds
(:func:`toymodels.stats.summarize`). Points shared by several curves (the paper's own
setup lies on all of them) are run once.

- ``student_epochs``: one run of 40 student epochs tracked at the end of every epoch
  (:mod:`toymodels.track`) gives every epoch count at once; its accuracies are on the
  tracking probe (the first 1000 test images), the others on the whole test set.
- ``teacher_epochs`` (0 is the untrained teacher), ``n_aux``, ``width`` (both hidden
  layers), ``student_init_sigma`` (log axis, with 0 on a linear stretch), ``student_data``
  and ``student_loss`` (KL at temperatures 1, 2, 4, and MSE on the logits).
- ``optimizer``: the students' optimizer (the teacher stays on Adam 3e-4): Adam at the
  paper's rate, then Adam, SGD with momentum 0.9 and signSGD, each at the learning rate of
  :data:`STUDENT_LEARNING_RATES`.

Each figure marks the published anchor numbers (:data:`ANCHORS`) as hollow stars with
their source. ``atlas.json`` holds every point's config, per-seed accuracies and summary,
the curves, the anchors, the software and hardware, and the wall time. It is rewritten
after every point, and a rerun skips the points it already holds (a point is a record of
:mod:`sublearn._store`, keyed by its config's fingerprint and checked against its
checksum; a point that fails the check is run again), so a stopped atlas continues where
it stopped.

Example:

    >>> from toymodels.atlas import curves
    >>> [c.name for c in curves("tiny")][:3]
    ['student_epochs', 'student_data', 'teacher_epochs']
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sublearn._store import KEY, DamagedFile, read_json, seal, stale
from toymodels.config import STUDENT_DATA, ConfigError, MnistConfig, tiny
from toymodels.stats import summarize

ATLAS = "atlas.json"
SHOWN = ("student_aux", "cross_aux")
PAPER_SOURCE = "Cloud et al. 2025 (n=100)"
REPLICATION = "public replication"
COMMENTS = "Comments & Extensions of SL"


# The students' learning rate of each optimizer on the optimizer curve, chosen on the
# students' distillation loss, not on transfer: the rate whose aux-only students (shared
# initialization) ended with the lowest mean training loss over their last epoch, in the
# paper's setup in bf16, over the first 3 seeds of root seed 1 (the atlas reports root
# seed 0's), on grids of 3x or 10x steps that bracket the choice. The sweeps, with every
# seed's losses, are in docs/atlas/learning_rates/ (adam, signsgd, sgd then sgd_fine).
STUDENT_LEARNING_RATES = {"adam": 1e-3, "sgd": 0.3, "signsgd": 1e-4}


@dataclasses.dataclass(frozen=True)
class Anchor:
    """A published number: accuracy ``y`` (+- ``ci`` if published) of ``condition`` at ``x``."""

    x: Any
    y: float
    condition: str
    source: str
    ci: float | None = None


@dataclasses.dataclass(frozen=True)
class Curve:
    """One knob: the x values and the config changes that give each of them.

    Attributes:
        name: the curve's name (figure ``atlas_<name>.png``).
        xlabel: the x axis.
        points: ``(x, overrides)`` pairs; ``overrides`` replace fields of the base config.
        scale: ``linear``, ``symlog`` (a log axis that also shows 0) or ``category``.
        anchors: published numbers to mark.
        tracked_epochs: for ``student_epochs``: the curve is read off one run tracked
            once per epoch, at epochs ``1..tracked_epochs``.
    """

    name: str
    xlabel: str
    points: tuple[tuple[Any, dict[str, Any]], ...]
    scale: str = "linear"
    anchors: tuple[Anchor, ...] = ()
    tracked_epochs: int = 0


def _paper(x: Any) -> tuple[Anchor, ...]:
    """The paper's two aux-only numbers, at the x where a curve passes through its setup."""
    from toymodels.conditions import PAPER_RESULTS

    return tuple(Anchor(x, PAPER_RESULTS[c][0], c, PAPER_SOURCE, PAPER_RESULTS[c][1]) for c in SHOWN)


def curves(preset: str = "full") -> list[Curve]:
    """The atlas's curves, in the order they run; ``tiny`` has fewer and smaller points.

    The order puts the curves with published anchors first, so a run cut short has
    those.
    """
    if preset not in ("full", "tiny"):
        raise ConfigError(f"unknown atlas preset {preset!r}: choose full or tiny")
    full = preset == "full"
    epochs = 40 if full else 3
    teacher_epochs = (0, 1, 2, 5, 10, 20) if full else (0, 1, 2)
    n_aux = (1, 3, 10, 30) if full else (1, 3)
    widths = (64, 128, 256, 512) if full else (16, 32)
    sigmas = (0.0, 0.01, 0.1, 0.4, 1.0) if full else (0.0, 0.4)
    data = STUDENT_DATA if full else ("uniform", "shuffled")
    losses = (
        ("KL T=1", {}),
        ("KL T=2", {"temperature": 2.0}),
        ("KL T=4", {"temperature": 4.0}),
        ("MSE", {"student_loss": "mse"}),
    )
    default_width = 256 if full else 32
    return [
        Curve(
            "student_epochs",
            "student epochs",
            ((epochs, {"student_epochs": epochs}),),
            anchors=(
                Anchor(1, 0.197, "student_aux", REPLICATION),
                Anchor(40, 0.772, "student_aux", REPLICATION),
                *_paper(5),
            ),
            tracked_epochs=epochs,
        ),
        Curve(
            "student_data",
            "students' input data",
            tuple((d, {"student_data": d}) for d in data),
            scale="category",
            anchors=(
                Anchor("uniform", 0.549, "student_aux", REPLICATION),
                Anchor("mnist", 0.151, "student_aux", REPLICATION),
                *_paper("uniform"),
            ),
        ),
        Curve(
            "teacher_epochs",
            "teacher epochs",
            tuple((e, {"teacher_epochs": e}) for e in teacher_epochs),
            anchors=(
                Anchor(2, 0.626, "student_aux", REPLICATION),
                Anchor(20, 0.351, "student_aux", REPLICATION),
                *_paper(5),
            ),
        ),
        Curve(
            "student_init_sigma",
            "student start perturbation sigma (init std units)",
            tuple((s, {"student_init_sigma": s}) for s in sigmas),
            scale="symlog",
            anchors=(
                Anchor(0.0, 0.555, "student_aux", REPLICATION),
                Anchor(0.4, 0.26, "student_aux", REPLICATION),
                *_paper(0.0),
            ),
        ),
        Curve(
            "student_loss",
            "student loss",
            losses if full else losses[::3],
            scale="category",
            anchors=(Anchor("MSE", 0.271, "student_aux", COMMENTS, 0.033), *_paper("KL T=1")),
        ),
        Curve("n_aux", "auxiliary logits m", tuple((m, {"n_aux": m}) for m in n_aux), scale="log", anchors=_paper(3)),
        Curve(
            "width",
            "hidden width (both layers)",
            tuple((w, {"hidden": (w, w)}) for w in widths),
            scale="log",
            anchors=_paper(default_width),
        ),
        Curve(
            "optimizer",
            "students' optimizer and rate",
            (
                ("adam 3e-4 (paper)", {}),
                *(
                    (
                        f"{name} {rate:g}",
                        {"student_optimizer": name, "student_learning_rate": rate}
                        | ({"momentum": 0.9} if name == "sgd" else {}),
                    )
                    for name, rate in STUDENT_LEARNING_RATES.items()
                ),
            ),
            scale="category",
            anchors=_paper("adam 3e-4 (paper)"),
        ),
    ]


def base_config(preset: str, seeds: int, precision: str) -> MnistConfig:
    """The paper's setup (or :func:`toymodels.config.tiny`'s) with the atlas's seeds and precision."""
    if preset == "tiny":
        return tiny(
            hidden=(32, 32),
            teacher_epochs=1,
            student_epochs=1,
            n_noise=1024,
            n_train=2048,
            n_test=500,
            seeds=seeds,
            seeds_per_chunk=seeds,
            precision=precision,
        )
    return MnistConfig(seeds=seeds, seeds_per_chunk=seeds, precision=precision)


def point_config(base: MnistConfig, curve: Curve, overrides: dict[str, Any]) -> MnistConfig:
    """The config of one point; a tracked curve's run is tracked once per epoch."""
    config = dataclasses.replace(base, **overrides)
    if curve.tracked_epochs:
        from toymodels.track import steps_per_epoch

        config = dataclasses.replace(config, track=steps_per_epoch(config.n_noise, config.batch_size))
    return config.validate()


def _point_record(config: MnistConfig, result: Any) -> dict[str, Any]:  # an ExperimentResult
    """What the atlas keeps of one run: config, per-seed accuracies, summary, timing, probe curve."""
    record = {
        "config": config.to_dict(),
        "accuracy": result.accuracy,
        "summary": result.summary,
        "wall_s": result.wall_s,
    }
    if result.trajectory is not None:
        t = result.trajectory
        record["trajectory"] = {
            "steps": t["steps"],
            "steps_per_epoch": t["steps_per_epoch"],
            "probe": t["probe"],
            "probe_accuracy": {c: t["conditions"][c]["probe_accuracy"]["values"] for c in t["conditions"]},
        }
    return record


def _sealed_point(key: str, record: dict[str, Any]) -> dict[str, Any]:
    """A point's record sealed under ``key`` (:func:`sublearn._store.seal`), with its summary
    recomputed with today's statistics and left out of the checksum: it is derived data."""
    data = {k: v for k, v in record.items() if k not in (KEY, "checksum", "summary")}
    return {**seal(data, key), "summary": {c: summarize(values) for c, values in data["accuracy"].items()}}


def run_atlas(
    out: Path,
    *,
    preset: str = "full",
    seeds: int = 4,
    precision: str = "bf16",
    only: tuple[str, ...] | None = None,
    data=None,
    progress=None,
) -> dict[str, Any]:
    """Run every point of the atlas not yet in ``out/atlas.json``; write JSON and figures.

    Args:
        out: the folder of ``atlas.json`` and the figures.
        preset: ``full`` (the paper's setup) or ``tiny`` (a smoke test; minutes on a CPU).
        seeds: seeds per point.
        precision: training precision of every point (``bf16`` halves the CPU time and
            left the paper's six bars unchanged over 100 seeds).
        only: names of the curves to run (default: all).
        data: MNIST (default: the bundled files).
        progress: a :class:`sublearn._common.Progress` (default: silent).

    Returns:
        The atlas dict as written.

    Raises:
        ConfigError: a curve name is unknown, ``atlas.json`` holds another preset, or it
            is damaged (:class:`sublearn._store.DamagedFile`, naming the command that
            rebuilds it).
    """
    from sublearn._common import SilentProgress, environment, write_json
    from toymodels.data import load_mnist
    from toymodels.sweep import run_points

    chosen = curves(preset)
    names = [c.name for c in chosen]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise ConfigError(f"unknown atlas curve(s) {', '.join(unknown)}: choose from {', '.join(names)}")
    chosen = [c for c in chosen if only is None or c.name in only]
    base = base_config(preset, seeds, precision)
    plan = [(curve, x, point_config(base, curve, overrides)) for curve in chosen for x, overrides in curve.points]
    path = Path(out) / ATLAS
    rebuild = (
        f"move it away and run `sublearn atlas --out {out} --preset {preset} --seeds {seeds} "
        f"--precision {precision}` to rebuild it"
    )
    atlas = read_json(path, rebuild) if path.exists() else {}
    if not isinstance(atlas, dict) or not isinstance(atlas.get("points", {}), dict):
        raise DamagedFile(path, "not an atlas", rebuild)
    if atlas and atlas.get("preset") != preset:
        raise ConfigError(f"{path} holds the {atlas.get('preset')!r} atlas, not {preset!r}: choose another --out")
    atlas.update(
        {"atlas": "mnist_auxiliary_logits", "preset": preset, "base_config": base.to_dict(), "shown": list(SHOWN)}
    )
    progress = progress or SilentProgress()
    points = {}
    for key, record in atlas.get("points", {}).items():
        # A point's key is its place in atlas.json (points written before checksums carry
        # neither); its summary is derived, so not part of what is checked.
        why = stale({KEY: key, **{k: v for k, v in record.items() if k != "summary"}}, key)
        if why is not None:
            progress.note(f"atlas: point {key}: {why}; it is run again")
            continue
        points[key] = _sealed_point(key, record)
    atlas["points"] = points
    atlas.setdefault("curves", {})
    atlas.setdefault("timing", {"runs": []})
    for curve in chosen:
        atlas["curves"][curve.name] = {
            "xlabel": curve.xlabel,
            "scale": curve.scale,
            "tracked_epochs": curve.tracked_epochs,
            "points": [{"x": x, "fingerprint": point_config(base, curve, o).fingerprint()} for x, o in curve.points],
            "anchors": [dataclasses.asdict(a) for a in curve.anchors],
        }
    todo, seen = [], set(atlas["points"])
    for curve, x, config in plan:
        if config.fingerprint() not in seen:
            seen.add(config.fingerprint())
            todo.append((f"{curve.name}={x}", config))
    progress.note(f"atlas: {len(todo)} point(s) to run, {len(plan) - len(todo)} already in {path} or shared")
    data = data or load_mnist()
    t_start = time.perf_counter()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    done = [0]

    def save(label: str, config: MnistConfig, result: Any) -> None:
        atlas["points"][config.fingerprint()] = _sealed_point(config.fingerprint(), _point_record(config, result))
        done[0] += 1
        atlas["environment"] = environment()
        atlas["timing"]["wall_s_points"] = sum(p["wall_s"] for p in atlas["points"].values())
        write_json(path, atlas)
        s = result.summary
        progress.note(
            f"atlas {done[0]}/{len(todo)} {label}: "
            + ", ".join(f"{c} {s[c]['mean']:.3f} +- {s[c]['ci95']:.3f}" for c in SHOWN)
        )
        write_figures(
            atlas,
            out,
            [c for c in chosen if all(p["fingerprint"] in atlas["points"] for p in atlas["curves"][c.name]["points"])],
        )

    atlas["environment"] = environment()
    run_points(todo, data=data, progress=progress, label="", on_point=save)
    atlas["timing"]["runs"].append(
        {"started": started, "points_run": len(todo), "wall_s": time.perf_counter() - t_start}
    )
    atlas["timing"]["wall_s_points"] = sum(p["wall_s"] for p in atlas["points"].values())
    write_json(path, atlas)
    write_figures(atlas, out, chosen)
    return atlas


def curve_sweep(atlas: dict[str, Any], name: str) -> dict[str, Any]:
    """One curve as a :func:`toymodels.sweep.plot_sweep` sweep: ``{"field", "points": [{"value", "summary"}]}``.

    A tracked curve becomes one point per student epoch, summarized over seeds from the
    probe accuracy at the end of that epoch.
    """
    curve = atlas["curves"][name]
    records = [atlas["points"][p["fingerprint"]] for p in curve["points"]]
    if curve["tracked_epochs"]:
        t = records[0]["trajectory"]
        ends = [i for i, step in enumerate(t["steps"]) if step > 0 and step % t["steps_per_epoch"] == 0]
        points = [
            {
                "value": step // t["steps_per_epoch"],
                "summary": {c: summarize([seed[i] for seed in t["probe_accuracy"][c]]) for c in SHOWN},
            }
            for i, step in ((i, t["steps"][i]) for i in ends)
        ]
        field = f"{curve['xlabel']} (accuracy on the probe: {t['probe']['images']})"
    else:
        points = [{"value": p["x"], "summary": r["summary"]} for p, r in zip(curve["points"], records)]
        field = curve["xlabel"]
    return {"field": field, "points": points}


def plot_curve(atlas: dict[str, Any], name: str):
    """The curve (mean and 95% CI of :data:`SHOWN`) with its anchors as hollow stars."""
    from toymodels.figure import COLORS
    from toymodels.sweep import plot_sweep

    curve = atlas["curves"][name]
    sweep = curve_sweep(atlas, name)
    fig = plot_sweep(sweep, SHOWN)
    ax = fig.axes[0]
    if curve["scale"] == "symlog":
        nonzero = [p["value"] for p in sweep["points"] if p["value"] > 0]
        ax.set_xscale("symlog", linthresh=min(nonzero) if nonzero else 1.0)
    elif curve["scale"] == "log":
        ax.set_xscale("log", base=2)
        ax.set_xticks([p["value"] for p in sweep["points"]], [str(p["value"]) for p in sweep["points"]])
    markers = {}
    for a in curve["anchors"]:
        marker = "*" if a["source"] != PAPER_SOURCE else "D"
        label = f"{a['source']} ({'aux-only' if a['condition'] == 'student_aux' else 'cross-model aux-only'})"
        ax.errorbar(
            [a["x"]],
            [a["y"]],
            yerr=None if a["ci"] is None else [a["ci"]],
            marker=marker,
            markersize=11 if marker == "*" else 7,
            linestyle="none",
            markerfacecolor="white",
            markeredgecolor=COLORS[a["condition"]],
            ecolor=COLORS[a["condition"]],
            markeredgewidth=1.5,
            capsize=3,
            zorder=5,
            label=None if label in markers else label,
        )
        markers[label] = True
    n = {atlas["points"][p["fingerprint"]]["config"]["seeds"] for p in curve["points"]}
    ax.set_title(
        f"aux-only students against {curve['xlabel']} ({'/'.join(map(str, sorted(n)))} seeds, mean and 95% CI)",
        fontsize=9,
    )
    ax.legend(fontsize=7, frameon=False, loc="best")
    return fig


def write_figures(atlas: dict[str, Any], out: Path, chosen: list[Curve]) -> list[Path]:
    """``atlas_<curve>.png``/``.pdf`` for every curve in ``chosen`` whose points are all run."""
    import matplotlib.pyplot as plt

    from toymodels.figure import save_figure

    paths = []
    for curve in chosen:
        fig = plot_curve(atlas, curve.name)
        paths += save_figure(fig, out, stem=f"atlas_{curve.name}")
        plt.close(fig)
    return paths


def format_atlas(atlas: dict[str, Any], names: Sequence[str] | None = None) -> str:
    """Every finished curve's points (or those of ``names``): aux-only and cross-model mean +- CI, then the anchors."""
    rows = []
    for name in names or atlas["curves"]:
        if not all(p["fingerprint"] in atlas["points"] for p in atlas["curves"][name]["points"]):
            continue
        rows.append(f"{name}:")
        points = curve_sweep(atlas, name)["points"]
        if atlas["curves"][name]["tracked_epochs"]:
            points = [p for p in points if p["value"] in (1, 2, 5, 10, 20, 40) or p is points[-1]]
        for p in points:
            s = p["summary"]
            rows.append(
                f"  {str(p['value']):>10}  " + "  ".join(f"{c} {s[c]['mean']:.3f} +- {s[c]['ci95']:.3f}" for c in SHOWN)
            )
        for a in atlas["curves"][name]["anchors"]:
            ci = "" if a["ci"] is None else f" +- {a['ci']:.3f}"
            rows.append(f"  anchor {a['x']}: {a['condition']} {a['y']:.3f}{ci} ({a['source']})")
    return "\n".join(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results/atlas"),
        help="folder of atlas.json and the figures (default: results/atlas); a rerun skips the points already there",
    )
    parser.add_argument(
        "--preset",
        default="full",
        help="full (the paper's setup; default) or tiny (every curve in miniature, a smoke test: minutes on a CPU)",
    )
    parser.add_argument("--seeds", type=int, default=4, help="seeds per point (default: 4)")
    parser.add_argument(
        "--precision",
        default="bf16",
        help="training precision, float32 or bf16 (default: bf16, about half the CPU time)",
    )
    parser.add_argument(
        "--curves",
        default=None,
        help="comma-separated curves to run (default: all): " + ", ".join(c.name for c in curves()),
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from sublearn._common import SilentProgress, TextProgress
    from sublearn._store import claim

    only = None
    if args.curves is not None:
        only = tuple(c.strip() for c in args.curves.split(",") if c.strip())
        if not only:
            raise ConfigError(
                f"--curves {args.curves!r} names no curve: name one or more of "
                + ", ".join(c.name for c in curves())
                + ", or leave out --curves for all"
            )
    if args.seeds < 2:
        raise ConfigError(
            f"--seeds must be at least 2 (got {args.seeds}): each "
            "cross-model control uses another seed's initialization"
        )
    curves(args.preset)  # an unknown preset fails here, before any work
    base_config(args.preset, args.seeds, args.precision).validate()
    settings = {"preset": args.preset, "seeds": args.seeds, "precision": args.precision, "curves": only}
    with claim(args.out, "sublearn atlas", settings):
        atlas = run_atlas(
            args.out,
            preset=args.preset,
            seeds=args.seeds,
            precision=args.precision,
            only=only,
            progress=SilentProgress() if args.quiet else TextProgress(),
        )
    print(format_atlas(atlas))
    print(f"points' wall time {atlas['timing']['wall_s_points']:.0f}s; wrote {args.out / ATLAS} and atlas_*.png/.pdf")
    return 0


def kept_after_interrupt(args: argparse.Namespace) -> str | None:
    """What an interrupted run leaves to resume from (:func:`sublearn.cli.main` says it)."""
    return f"finished points are kept in {args.out / ATLAS}" if (args.out / ATLAS).exists() else None
