"""The report of a study or of any training workdirs: a markdown table and two plots.

    python -m s2mlp.report runs/shift_ablation                       # a study dir: writes its report there
    python -m s2mlp.report runs/a runs/b --out=docs/studies/mine     # workdirs of main.py, finished or not

Runs are grouped into configurations (identical config.json except ``seed``, the fields a study's
``study.json`` ties to the seed, e.g. ``data.subset_seed``, and `MACHINE_FIELDS`) and aggregated over seeds:
one row per configuration in ``report.md``, with ``top1_vs_step.png`` and ``top1_vs_gmacs.png`` (or
``top1_by_config.png`` where all configurations have the same MACs), in the output directory (default: the
study dir). README.md's "Studies" section describes the columns, the caption and the plots. Needs matplotlib (Agg).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

STUDY_JSON = "study.json"
RESULT_JSON = "result.json"
METRICS_FILE = "metrics.jsonl"  # a workdir's metrics: one row per logged or evaluated step (`read_metrics`)
# Fields that say where or how a machine runs, not what is trained: they may differ between the sittings of a study
# (study.py lets them) and between seeds of one configuration, which the report pools.
MACHINE_FIELDS = ("compilation_cache_dir", "profile_steps")
NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "imagenette": 10, "imagenet2012": 1000}
CAPTION_FIELDS = ("model.name", "data.name", "data.train_fraction", "image_size", "batch_size", "total_steps",
                  "num_epochs", "base_lr", "weight_decay", "ema_decay", "compute_dtype")  # fmt: skip


@dataclasses.dataclass
class RunInfo:
    name: str
    workdir: Path
    config: dict | None  # config.json, None before the trainer wrote it
    metrics: dict[int, dict[str, float]]  # step -> {key: value}, the last row of each (step, key) kept
    result: dict | None  # the study runner's result.json
    pooled: tuple[str, ...] = ("seed",)  # fields aggregated over: seed, and fields the study ties to it
    pooled_why: str = ""  # why fields besides the seed are pooled, for the caption


def _is_workdir(path: Path) -> bool:
    return any((path / f).exists() for f in ("config.json", METRICS_FILE, "checkpoints"))


def read_metrics(path: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl -> step -> {key: value}; after a resume the later row of a (step, key) wins. A line that is
    not a JSON row (the last one of a run killed or out of disk while writing it) is skipped."""
    out: dict[int, dict[str, float]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if (row := metrics_row(line)) is not None:
                out.setdefault(row.pop("step"), {}).update(row)
    return dict(sorted(out.items()))


def metrics_row(line: str) -> dict | None:
    """One line of metrics.jsonl as its row (a dict with an int 'step'); None for a line that is none, such as a
    last row torn by a full disk or a kill while it was written. Also read by `runs.drop_rows_after`."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _run(name: str, workdir: Path, pooled: tuple[str, ...] = ("seed",)) -> RunInfo:
    return RunInfo(name, workdir, _read_json(workdir / "config.json"), read_metrics(workdir / METRICS_FILE),
                   _read_json(workdir / RESULT_JSON), pooled)  # fmt: skip


def find_runs(paths: list[str]) -> list[RunInfo]:
    """The runs of study dirs (its study.json, else every subdir with a config.json) and of workdirs, in order."""
    runs, listed = [], set()  # listed: runs a study.json names, whose `tied` says what is pooled
    for p in map(Path, paths):
        if _is_workdir(p):
            runs.append(_run(p.name, p))
        elif (p / STUDY_JSON).is_file():
            listing = json.loads((p / STUDY_JSON).read_text())
            pooled = ("seed", *(f for f, axis in listing.get("tied", {}).items() if axis == "seed"))
            for r in listing["runs"]:
                runs.append(_run(r["name"], p / r["name"], pooled))
                runs[-1].pooled_why = "tied to the seed by the study" if len(pooled) > 1 else ""
                listed.add(id(runs[-1]))
        elif p.is_dir() and any(_is_workdir(d) for d in p.iterdir() if d.is_dir()):
            runs += [_run(d.name, d) for d in sorted(p.iterdir()) if d.is_dir() and _is_workdir(d)]
        else:
            raise ValueError(
                f"{p} is neither a training workdir (config.json, metrics.jsonl or checkpoints/) nor a study "
                f"directory (study.json, or subdirectories that are workdirs)."
            )
    # Runs without a study.json to say what is tied: a subset seed equal to the seed in every one of them is tied
    # to it (as the shipped studies do), so it is pooled with the seed instead of making a row per seed.
    loose = [r for r in runs if id(r) not in listed and r.config]
    data = [r.config.get("data") or {} for r in loose]
    drawn = any(d.get("train_fraction", 1.0) < 1.0 or d.get("train_per_class", 0) > 0 for d in data)  # a subset
    seeds = {r.config.get("seed", 0) for r in loose}
    if (
        drawn
        and len(seeds) > 1
        and all(d.get("subset_seed", 0) == r.config.get("seed", 0) for d, r in zip(data, loose))
    ):
        for r in loose:
            r.pooled, r.pooled_why = ("seed", "data.subset_seed"), "equal to the seed in every run"
    return runs


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A config.json dict -> dotted field -> value (lists as tuples)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out


def config_changes(old: dict, new: dict) -> list[str]:
    """``'config.FIELD: <old> -> <new>'`` for each field in which two config.json dicts differ (`MACHINE_FIELDS`
    aside), sorted; used by a resume's warning and study.py's refusal."""
    a, b = flatten(old), flatten(new)
    return [
        f"config.{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k) and k not in MACHINE_FIELDS
    ]


def mean_std(values: list[float]) -> str:
    """'mean ± std [min–max] (n)' in percent with the sample std (ddof=1); '—' for no values. The min–max is what
    the README's rule reads: a difference smaller than the larger spread of the two rows is a tie."""
    if not values:
        return "—"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f} (1)"
    spread = f"[{100 * min(values):.2f}–{100 * max(values):.2f}]"
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f} {spread} ({len(values)})"


def _top1_key(runs: list[RunInfo]) -> str:
    """The caption's key: the EMA's when any run has one (`_curve` then reads eval_top1 of the runs without)."""
    has_ema = any("eval_ema_top1" in m for r in runs for m in r.metrics.values())
    return "eval_ema_top1" if has_ema else "eval_top1"


def _curve(run: RunInfo, key: str) -> dict[int, float]:
    curve = {s: m[key] for s, m in run.metrics.items() if key in m}
    return curve if curve or key != "eval_ema_top1" else _curve(run, "eval_top1")  # a run without an EMA


def _num_classes(run: RunInfo) -> int | None:
    try:
        from s2mlp import checkpoint as ckpt

        directory, step = ckpt.locate(run.workdir)
        return int((ckpt.read_json(directory / str(step), ckpt.DATASET) or {})["num_classes"])
    except Exception:  # no checkpoint yet: known datasets only
        return NUM_CLASSES.get(run.config["data"]["name"])


def model_size(config: dict, num_classes: int | None) -> tuple[int | None, float | None]:
    """(parameters, forward GMACs at config's image size) of config's model; nothing is compiled."""
    if num_classes is None:
        return None, None
    import jax

    from s2mlp import flops, models

    model = models.from_config(config, num_classes)
    n = sum(x.size for x in jax.tree.leaves(models.abstract_params(model, config["image_size"])))
    return n, flops.count_macs(model, config["image_size"]) / 1e9


@dataclasses.dataclass
class Row:
    label: dict[str, Any]  # the varying fields
    runs: list[RunInfo]
    final: list[float]
    best: list[float]
    params: int | None = None
    gmacs: float | None = None


def group(runs: list[RunInfo], key: str) -> tuple[list[Row], list[str], dict[str, Any]]:
    """Configurations in study order; the fields that vary between them; the fields common to all."""
    groups: dict[str, list[RunInfo]] = {}
    flat = {}
    for r in runs:
        if r.config is None:
            groups[f"no config: {r.workdir}"] = [r]
            continue
        f = {k: v for k, v in flatten(r.config).items() if k not in r.pooled and k not in MACHINE_FIELDS}
        flat[id(r)] = f
        groups.setdefault(json.dumps(f, sort_keys=True, default=str), []).append(r)
    configs = [flat[id(g[0])] for g in groups.values() if id(g[0]) in flat]
    keys = sorted({k for c in configs for k in c})
    varying = [k for k in keys if len({json.dumps(c.get(k), default=str) for c in configs}) > 1]
    common = {k: configs[0].get(k) for k in keys if k not in varying} if configs else {}
    rows = []
    for g in groups.values():
        f = flat.get(id(g[0]), {})
        curves = [_curve(r, key) for r in g]
        # Final: the finished runs' last evals, where any run of the row has finished (a run stopped at step 100
        # is not averaged with runs at 300); else every run's last, the steps column saying how far they got.
        done = [_finished(r) for r in g] if any(map(_finished, g)) else [True] * len(g)
        rows.append(Row(
            label={k: f.get(k) for k in varying} if f else {"workdir": str(g[0].workdir)},
            runs=g,
            final=[c[max(c)] for c, d in zip(curves, done, strict=True) if c and d],
            best=[max(c.values()) for c in curves if c],
        ))  # fmt: skip
    return rows, varying, common


def _short_names(fields: list[str]) -> dict[str, str]:
    last = [f.rsplit(".", 1)[-1] for f in fields]
    return {f: (s if last.count(s) == 1 else f) for f, s in zip(fields, last, strict=True)}


def _fmt(value) -> str:
    return "(" + ", ".join(map(str, value)) + ")" if isinstance(value, tuple) else str(value)


def hms(seconds: float) -> str:
    """Seconds as H:MM:SS (rounded); also used by study.py."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _total_steps(run: RunInfo) -> int | None:
    """config.total_steps; for a config counted in epochs (total_steps 0), a finished run's last step."""
    total = run.config and run.config.get("total_steps")
    return total or (max(run.metrics) if run.result and run.metrics else None)


def _finished(run: RunInfo) -> bool:
    total = _total_steps(run)
    return bool(run.metrics and total and max(run.metrics) >= total)


def _resumed(run: RunInfo) -> bool:
    """Finished after a resume: study.py timed only the last attempt, the attempts before are unknown."""
    return bool(run.result and run.result.get("resumed_from_step"))


def _steps(row: Row) -> str:
    done = [max(r.metrics) if r.metrics else 0 for r in row.runs]
    total = max((t for t in map(_total_steps, row.runs) if t), default="?")
    return f"{min(done)}/{total}" if len(set(done)) == 1 else f"{min(done)}-{max(done)}/{total}"


def table(rows: list[Row], varying: list[str]) -> str:
    unit, scale = _macs_unit(rows)
    head = ["configuration", "model", "final top-1 % (n)", "best top-1 % (n)", "params", unit, "train img/s", "steps",
            "wall / run"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * 7]
    for row in rows:
        config = row.runs[0].config
        label = [_label(row, varying), config["model"]["name"] if config else "—"]
        if not any(r.metrics for r in row.runs):
            lines.append("| " + " | ".join([*label, "no metrics yet", *["—"] * 6]) + " |")
            continue
        ips = [m["images_per_s"] for r in row.runs for m in r.metrics.values() if "images_per_s" in m]
        walls = [r.result["wall_s"] for r in row.runs if r.result and not _resumed(r)]
        cells = [
            mean_std(row.final),
            mean_std(row.best),
            f"{row.params:,}" if row.params is not None else "—",
            f"{row.gmacs * scale:.3g}" if row.gmacs is not None else "—",
            f"{statistics.median(ips):.0f}" if ips else "—",
            _steps(row),
            hms(statistics.fmean(walls)) if walls else "—",
        ]
        lines.append("| " + " | ".join([*label, *cells]) + " |")
    return "\n".join(lines)


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return "unknown CPU"


def plot_curves(rows: list[Row], varying: list[str], key: str, path: Path) -> None:
    fig, ax = _figure(4)
    for color, row in zip(_colors(len(rows)), rows):
        curves = [_curve(r, key) for r in row.runs]
        steps = sorted({s for c in curves for s in c})
        if not steps:
            continue
        vals = [[100 * c[s] for c in curves if s in c] for s in steps]
        mean = [statistics.fmean(v) for v in vals]
        ax.plot(steps, mean, label=_label(row, varying), lw=1.2, color=color)
        ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=color, alpha=0.15)
    _finish(fig, ax, path, "step", f"held-out top-1 % ({key})", "top-1 vs step: mean over seeds, min–max band")


def plot_by_config(rows: list[Row], varying: list[str], key: str, path: Path) -> None:
    """Final top-1 per configuration, one line each in study order: mean over seeds, min–max bar, each seed."""
    shown = [(color, row) for color, row in zip(_colors(len(rows)), rows) if row.final]
    fig, ax = _figure(1.2 + 0.3 * len(shown))
    for y, (color, row) in enumerate(shown):
        values = [100 * v for v in row.final]
        mean = statistics.fmean(values)
        ax.errorbar(mean, y, xerr=[[mean - min(values)], [max(values) - mean]], fmt="o", ms=5, color=color)
        ax.plot(values, [y] * len(values), "|", ms=9, color=color)
    ax.set_yticks(range(len(shown)), [_label(row, varying) for _, row in shown], fontsize=8)
    ax.invert_yaxis()
    _finish(fig, ax, path, f"final top-1 % ({key})", "configuration",
            "final top-1 per configuration: mean over seeds (dot), min–max (bar), each seed (|)")  # fmt: skip


def plot_gmacs(rows: list[Row], varying: list[str], key: str, path: Path) -> None:
    unit, scale = _macs_unit(rows)
    fig, ax = _figure(4)
    for color, row in zip(_colors(len(rows)), rows):
        if row.gmacs is None or not row.final:
            continue
        mean = 100 * statistics.fmean(row.final)
        std = 100 * statistics.stdev(row.final) if len(row.final) > 1 else 0.0
        ax.errorbar(
            row.gmacs * scale, mean, yerr=std, fmt="o", ms=4, capsize=3, color=color, label=_label(row, varying)
        )
    _finish(fig, ax, path, f"forward {unit} per image", f"final top-1 % ({key})",
            "final top-1 vs compute: mean ± std over seeds")  # fmt: skip


def _figure(height: float):
    """A new 8-inch-wide figure and its axes, drawn by matplotlib's Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(8, height), dpi=100)


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    """Labels, grid and a legend beside the axes; saves the figure as a PNG and closes it."""
    import matplotlib.pyplot as plt

    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def _label(row: Row, varying: list[str]) -> str:
    """The configuration's name: its runs' directory name without the ``seed=N`` part (the study runner names
    runs by their varying fields) where that is one name, else its varying fields as ``field=value,...``."""
    names = {re.sub(r"(^|,)seed=[^,]*", "", r.name).strip(",") for r in row.runs}
    if len(names) == 1 and "" not in names and row.runs[0].name != next(iter(names)):
        return names.pop()
    short = _short_names(varying)
    return ",".join(f"{short[f]}={_fmt(row.label.get(f))}" for f in varying) or str(row.label.get("workdir", "all"))


def _colors(n: int) -> list:
    """n distinct colours: matplotlib's tab10, or tab20 for more than 10 configurations."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _macs_unit(rows: list[Row]) -> tuple[str, float]:
    """('GMACs', 1) or, for models under 0.1 GMACs, ('MMACs', 1000): readable figures for tiny models."""
    gmacs = [r.gmacs for r in rows if r.gmacs is not None]
    return ("MMACs", 1e3) if gmacs and max(gmacs) < 0.1 else ("GMACs", 1.0)


def study_name(paths: list[str]) -> str:
    """What report.md's title names: the study directory's name, or the workdirs' names."""
    return ", ".join(Path(p).resolve().name for p in paths)


def check_out_dir(out_dir: Path, paths: list[str]) -> None:
    """ValueError if `out_dir` holds a report.md whose title names another study than `paths` (or none); a study
    directory's own report is always its own."""
    old = out_dir / "report.md"
    if not old.is_file() or [out_dir.resolve()] == [Path(p).resolve() for p in paths]:
        return
    title = re.fullmatch(r"# Study report: (.+)", old.read_text().partition("\n")[0])
    if not title or title[1] != study_name(paths):
        held = f"the report of {title[1]!r}" if title else "a report.md that names no study"
        raise ValueError(
            f"--out={out_dir} holds {held}, not of {study_name(paths)!r}; choose another --out, or pass --force to "
            "overwrite it."
        )


def main_report(paths: list[str], out_dir: str | None = None, out=print, force: bool = False) -> str:
    """Builds the report of `paths`; writes report.md and the PNGs into `out_dir` (if given; not over another
    study's report unless `force`); returns the table and the line of runs not started."""
    if out_dir is not None and not force:
        check_out_dir(Path(out_dir), paths)
    found = find_runs(paths)
    runs = [r for r in found if _is_workdir(r.workdir)]  # a study's runs not started have no workdir yet
    not_started = [r.name for r in found if not _is_workdir(r.workdir)]
    key = _top1_key(runs)
    rows, varying, common = group(runs, key)
    for row in rows:
        first = row.runs[0]
        if first.config is not None:
            row.params, row.gmacs = model_size(first.config, _num_classes(first))
    text = table(rows, varying)
    tied = ", ".join(sorted({f for r in runs for f in r.pooled if f != "seed"}))
    if tied:
        how = " or ".join(sorted({r.pooled_why for r in runs if r.pooled_why}))
        tied = f"Each seed also sets {tied} ({how}), so the spread covers both. "
    if not_started:
        text += f"\n\nNot started ({len(not_started)}): " + ", ".join(not_started)
    walls = [r.result["wall_s"] for r in runs if r.result]
    unfinished = sum(1 for r in runs if not (r.result or _finished(r)))
    by_steps = bool(common.get("total_steps"))  # else the config counts epochs: show num_epochs, not total_steps=0
    shown = [k for k in CAPTION_FIELDS if k in common and k != ("num_epochs" if by_steps else "total_steps")]
    settings = ", ".join(f"{k}={_fmt(common[k])}" for k in shown)
    overrides = {k.removeprefix("model.overrides."): v for k, v in common.items() if k.startswith("model.overrides.")}
    if overrides:
        settings += ", model overrides " + ", ".join(f"{k}={_fmt(v)}" for k, v in overrides.items())
    caption = (
        f"{len(rows)} configurations, {len(runs)} runs. Top-1 is `{key}`"
        + (" (`eval_top1` for a run without an EMA)" if key == "eval_ema_top1" else "")
        + " on the held-out split, in percent: the "
        f"last evaluation (final; of the finished runs only, where a configuration has any) and the best one (best), "
        f"mean ± sample std (ddof=1) [min–max] over seeds, n runs. {tied}"
        f"Params and {_macs_unit(rows)[0]} (forward multiply-accumulates per image) are counted from the model code. "
        f"Train img/s is the median of the logged throughput. Common to all runs: {settings or '—'}. "
        f"Machine: {machine()}. Total wall time of the finished runs: {hms(sum(walls))}"
        + (f"; {unfinished} run(s) not finished." if unfinished else ".")
    )
    resumed = sorted(r.name for r in runs if _resumed(r))
    if resumed:
        caption += (
            f" {len(resumed)} run(s) resumed from a checkpoint ({', '.join(resumed)}): their wall time counts "
            "the last attempt only, so they are left out of the wall time per run and the total is a lower bound."
        )
    models = {}  # the model behind each configuration, where models differ: name (overrides), once each
    for row in rows:
        if "workdir" not in row.label and any(k.startswith("model.") for k in varying):
            config = row.runs[0].config
            overrides = sorted((config["model"].get("overrides") or {}).items())
            fields = ", ".join(f"{k}={_fmt(tuple(v) if isinstance(v, list) else v)}" for k, v in overrides)
            models[f"{config['model']['name']} ({fields})"] = None
    if models:
        caption += "\n\nModels: " + "; ".join(models) + "."
    out(text)
    out("")
    out(caption)
    if out_dir is not None:
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        # Final top-1 against MACs where they differ; else (one column of dots) per configuration.
        by_macs = len({row.gmacs for row in rows if row.final}) > 1
        png, alt = ("top1_vs_gmacs.png", "top-1 vs MACs") if by_macs else ("top1_by_config.png", "top-1 per config")
        stale = "top1_by_config.png" if by_macs else "top1_vs_gmacs.png"
        (d / stale).unlink(missing_ok=True)  # from an earlier report of this study
        figures = f"![top-1 vs step](top1_vs_step.png)\n![{alt}]({png})\n"
        (d / "report.md").write_text(f"# Study report: {study_name(paths)}\n\n{text}\n\n{caption}\n\n{figures}")
        plot_curves(rows, varying, key, d / "top1_vs_step.png")
        (plot_gmacs if by_macs else plot_by_config)(rows, varying, key, d / png)
        out(f"\nWrote {d / 'report.md'}, top1_vs_step.png, {png}")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m s2mlp.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="a study directory, or training workdirs")
    parser.add_argument("--out", default=None, help="where report.md and the PNGs go (default: the study dir)")
    parser.add_argument("--force", action="store_true", help="write into --out even if it holds another study's report")
    args = parser.parse_args(argv)
    args.paths = [os.path.expanduser(p) for p in args.paths]  # relative paths read from the working directory
    out_dir = os.path.expanduser(args.out) if args.out else None
    if out_dir is None and len(args.paths) == 1 and not _is_workdir(Path(args.paths[0])):
        out_dir = args.paths[0]
    try:
        main_report(args.paths, out_dir, force=args.force)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
