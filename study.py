"""Runs a set of training configurations as one study, then writes its report.

    python study.py --study=configs/studies/shift_ablation.py --workdir=runs/shift_ablation
    python study.py --study=configs/studies/mixer_vs_s2mlp.py:cifar10 --workdir=runs/mvs --dry_run

A study config's ``get_config(data)`` returns a ConfigDict with

- ``base``: a training config file as main.py takes it (``path.py`` or ``path.py:arg``);
- ``overrides`` (optional): dotted config field -> value, applied to every run;
- ``grid``: dotted config field -> list of values; the runs are the product of the axes;
- ``runs`` (optional): a list of dicts of dotted field -> value; each one is crossed with the
  grid (for settings a product does not fit, e.g. per-model sizes); an optional ``"name"`` key
  labels the run;
- ``name_fields`` (optional): dotted field -> short name used in run-directory names (default:
  the last part of the field);
- ``tied`` (optional): dotted field -> a grid axis whose value the field copies in each run, e.g.
  ``{"data.subset_seed": "seed"}``: each seed trains on its own draw of the train subset, so the
  spread over seeds covers the data as well as the training. A tied field is set by nothing else
  (not an axis, override or run field); it is not part of run names, but is in each run's config,
  command and ``study.json`` (whose ``tied`` the report reads: a field tied to ``seed`` is pooled
  over like the seed).

Dicts with dotted keys need ``ml_collections.ConfigDict(..., allow_dotted_keys=True)``
(see configs/studies/). A ``model.overrides.X`` value, and every key of a ``model.overrides``
dict value, is merged into the base config's model overrides (the base's other overrides stay),
as ``--config.model.overrides.X=V`` does on main.py's command line.

``--config.FIELD=VALUE`` flags (as main.py takes them, model overrides included) set that field in every
run, over ``overrides``; a field a grid axis, a run or a tie sets is refused (choose runs with ``--only``).

Every run is expanded and checked (field paths, model names and overrides, train_lib's and the
input pipeline's config checks) before anything trains or any directory is created. Each run
trains in ``WORKDIR/<run name>/``, exactly as the printed ``python main.py ...`` command would;
``WORKDIR/study.json`` lists the runs. A finished run leaves ``result.json`` (final metrics, wall
time, whether it was resumed) and is skipped next time; a run with checkpoints but no
``result.json`` (the runner was killed) resumes from its latest checkpoint.

Runs train in this process, one after another, with JAX's persistent compilation cache under
``WORKDIR/compilation_cache`` (runs whose programs are the same, e.g. differing only in seed, compile once).
Why in-process, measured on the 2-core development CPU with configs/demo.py cut to 1 step (all overhead:
imports, compiles, one eval, one checkpoint): a fresh ``python main.py`` takes 31 s (19-22 s with a warm
cache), a run in this process 12 s (4-5 s): 7% of a 1-minute study run instead of 33-50%.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import itertools
import json
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import ml_collections

from configs import overrides as overrides_lib
from s2mlp import checkpoint as ckpt
from s2mlp import report as report_lib
from s2mlp.report import RESULT_JSON, STUDY_JSON, hms

ROOT = Path(__file__).resolve().parent  # main.py's directory: relative config paths resolve here
CACHE_DIR = "compilation_cache"
OVERRIDES = overrides_lib.MODEL_OVERRIDES


@dataclasses.dataclass
class Run:
    """One expanded run: its name, the fields it sets on the base config, the config and the command."""

    name: str
    overrides: dict[str, Any]  # dotted field -> value, in the order applied
    config: ml_collections.ConfigDict
    workdir: str
    command: str


# =============================================================================
# Loading and expanding a study.
# =============================================================================
def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``path.py`` or ``path.py:arg`` (relative to the checkout) -> its config, as main.py loads it."""
    file = overrides_lib.config_file(spec, root=ROOT)
    if not file.is_file():
        raise ValueError(f"study.base={spec!r}: no config file {file}; give a path like configs/demo.py[:arg].")
    return overrides_lib.load(spec, root=ROOT)


def _name_part(value) -> str:
    if isinstance(value, (list, tuple)):
        return "x".join(_name_part(v) for v in value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", str(value))


def command(base: str, workdir: str, overrides: dict[str, Any], config: ml_collections.ConfigDict) -> str:
    """The ``python main.py`` command that trains this run (`config`: its config, whose fields' types say how
    main.py reads a value)."""
    flags = []
    for field, value in overrides.items():
        pairs = [(f"{OVERRIDES}.{k}", v) for k, v in value.items()] if field == OVERRIDES else [(field, value)]
        flags += [overrides_lib.config_flag(config, name, v) for name, v in pairs]
    args = ["python", "main.py", f"--config={base}", f"--workdir={workdir}", *flags]
    return " ".join(shlex.quote(a) for a in args)


def expand(
    study: ml_collections.ConfigDict, workdir: str, *, check: bool = True, command_line: dict | None = None
) -> list[Run]:
    """The study's runs, in order (explicit runs outer, grid axes in their order, the last axis fastest).

    `command_line`: study.py's ``--config.FIELD`` flags (``"args"``, as given; ``"model.overrides"``, a dict of
    model fields), applied to every run after ``study.overrides``.
    Raises ValueError naming the study or config field for anything that would fail later; with
    `check`, runs train_lib's and the input pipeline's config checks on every run too. Creates nothing.
    """
    if not isinstance(study.get("base"), str) or not study.base:
        raise ValueError("study.base must be a training config file, e.g. 'configs/demo.py' or 'configs/tiny.py:arg'.")
    own = dict(study.get("overrides") or {})
    grid = dict(study.get("grid") or {})
    explicit = [dict(r) for r in (study.get("runs") or [])]
    if not grid and not explicit:
        raise ValueError("study.grid is empty and there are no study.runs: give at least one axis, e.g. seed=[0, 1].")
    for field, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"study.grid[{field!r}]={values!r} must be a non-empty list of values.")
    short = dict(study.get("name_fields") or {})  # else a field's last part (`part`)
    tied = dict(study.get("tied") or {})
    for field, axis in tied.items():
        if axis not in grid:
            raise ValueError(f"study.tied[{field!r}]={axis!r} must name an axis of study.grid, one of {list(grid)}.")
        setters = [name for name, fields in (("study.grid", grid), ("study.overrides", own)) if field in fields]
        setters += ["study.runs"] * any(field in r for r in explicit)
        if setters:
            raise ValueError(
                f"study.tied[{field!r}]: config.{field} is also set by {setters[0]}; a tied field takes its value "
                f"from study.grid[{axis!r}] only, so set it in one place."
            )
    base = load_config_file(study.base)
    for field, axis in tied.items():
        overrides_lib.set_field(copy.deepcopy(base), field, grid[axis][0], f"study.tied[{field!r}]")
    given = _command_line_fields(command_line or {}, base, grid, explicit, tied)
    for key in given.get(OVERRIDES, {}):  # the command line's model field wins over a study's dotted key for it
        own.pop(f"{OVERRIDES}.{key}", None)
    common = _layered(own, given)

    combos = list(itertools.product(*grid.values()))  # [()] for no axes
    specs = []  # (label, run fields, grid values) of each run
    for run in explicit or [{}]:
        label = run.pop("name", None)
        specs += [(label, run, dict(zip(grid, combo, strict=True))) for combo in combos]

    def varies(field) -> bool:
        return len({json.dumps({**s[1], **s[2]}.get(field), default=str, sort_keys=True) for s in specs}) > 1

    def part(field, value) -> str:
        return f"{short.get(field, field.rsplit('.', 1)[-1])}={_name_part(value)}"

    run_fields = [f for f in dict.fromkeys(k for r in explicit for k in r) if varies(f)]
    runs, names = [], {}
    for label, run, combo in specs:
        # The name: the run's label (else the run's fields that vary), then the grid axes that vary.
        parts = [_name_part(label)] if label else [part(f, run[f]) for f in run_fields if f in run]
        parts += [part(f, v) for f, v in combo.items() if varies(f)]
        name = ",".join(parts) or "run"
        overrides = _layered(common, run, combo, {field: combo[axis] for field, axis in tied.items()})
        if name in names:
            raise ValueError(
                f"study: runs {names[name]} and {overrides} get the same name {name!r}; label study.runs with 'name'."
            )
        names[name] = overrides
        config = copy.deepcopy(base)
        for field, value in overrides.items():
            overrides_lib.set_field(config, field, value, f"study run {name!r}")
        run_dir = str(Path(workdir) / name)
        runs.append(Run(name, overrides, config, run_dir, command(study.base, run_dir, overrides, config)))
    if check:
        for run in runs:
            validate(run)
    return runs


def _command_line_fields(command_line: dict, base, grid: dict, explicit: list[dict], tied: dict) -> dict:
    """The command line's fields (``command_line``: ``"args"``, its ``--config.FIELD`` flags, parsed on `base` as
    main.py parses them; ``"model.overrides"``, its model fields); ValueError for a field the base config lacks or
    that the study sets per run (a grid axis, a run, a tie)."""
    fields = {f"{OVERRIDES}.{k}": v for k, v in command_line.get(OVERRIDES, {}).items()}  # already typed
    fields |= overrides_lib.parse_config_args(base, command_line.get("args", []))
    given: dict[str, Any] = {}
    for name, value in fields.items():
        flag = overrides_lib.config_flag(base, name, value)
        overrides_lib.set_field(copy.deepcopy(base), name, value, flag)
        key = name.removeprefix(OVERRIDES + ".")
        per_run = [f"study.grid[{name!r}]"] * (name in grid) + [f"study.tied[{name!r}]"] * (name in tied)
        per_run += [f"study.grid[{OVERRIDES!r}]"] * (
            key != name and any(key in (v or {}) for v in grid.get(OVERRIDES, []))
        )
        in_run = [name in r or (key != name and key in (r.get(OVERRIDES) or {})) for r in explicit]
        per_run += ["study.runs"] * any(in_run)
        if per_run:
            raise ValueError(f"{flag}: {per_run[0]} sets config.{name} for each run; choose runs with --only, or edit "
                             "the study file.")  # fmt: skip
        given = _layered(given, {OVERRIDES: {key: value}} if key != name else {name: value})
    return given


def _layered(*layers: dict) -> dict:
    """The layers' overrides, later ones winning, except that ``model.overrides`` dicts merge key by key."""
    out: dict[str, Any] = {}
    for layer in layers:
        for field, value in layer.items():
            if field == OVERRIDES and hasattr(out.get(field), "items") and hasattr(value, "items"):
                value = {**out[field], **value}
            out[field] = value
    return out


def validate(run: Run) -> None:
    """Every field's check on one run's config (`configs.overrides.check`); ValueError naming the run and field."""
    import jax

    try:
        overrides_lib.check(run.config, num_devices=jax.device_count(), process_count=jax.process_count())
    except ValueError as e:
        raise ValueError(f"study run {run.name!r}: {e}") from None
    saved = Path(run.workdir) / "config.json"
    if saved.is_file():
        diff = report_lib.config_changes(json.loads(saved.read_text()), json.loads(run.config.to_json_best_effort()))
        diff = [d for d in diff if not d.startswith("config.data.data_dir:")]  # the data moved (resume checks classes)
        if diff:
            raise ValueError(
                f"study run {run.name!r}: {run.workdir} holds a run of a different config (fields "
                f"{', '.join(diff[:5])}); use a new --workdir or remove that run directory."
            )


# =============================================================================
# Running.
# =============================================================================
def read_result(run_dir) -> dict | None:
    path = Path(run_dir) / RESULT_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def write_study_json(study, runs: list[Run], workdir: str) -> None:
    listing = {
        "base": study.base,
        **({"tied": dict(study.tied)} if study.get("tied") else {}),
        "runs": [{"name": r.name, "overrides": r.overrides, "workdir": r.workdir, "command": r.command} for r in runs],
    }
    path = Path(workdir) / STUDY_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    as_json = lambda o: o.to_dict() if hasattr(o, "to_dict") else list(o)  # noqa: E731 - ConfigDicts, tuples
    tmp.write_text(json.dumps(listing, indent=2, default=as_json) + "\n")
    tmp.replace(path)


def select(runs: list[Run], only: list[str]) -> list[Run]:
    """The runs whose name matches any of the globs `only` (all runs for none); ValueError naming some if none match."""
    if not only:
        return runs
    chosen = [r for r in runs if any(fnmatch.fnmatch(r.name, p) for p in only)]
    if not chosen:
        given = " ".join(f"--only={p!r}" for p in only)
        names = ", ".join(r.name for r in runs[:5]) + (", ..." if len(runs) > 5 else "")
        raise ValueError(f"{given} matches no run of this study; its {len(runs)} runs are named {names}")
    return chosen


def run_study(study, workdir: str, *, only: tuple[str, ...] | list[str] = (), dry_run: bool = False,
              compilation_cache: str | None = None, report: bool = True, out=print,
              command_line: dict | None = None) -> list[Run]:  # fmt: skip
    """Expands and checks `study` (with `command_line`'s fields: `expand`), then trains each run not yet done (those
    matching a glob of `only`, if any); returns the runs."""
    workdir = str(ckpt.absolute(workdir))  # relative, ~, trailing '/': the runs' commands work from any directory
    runs = select(expand(study, workdir, check=not dry_run, command_line=command_line), list(only))
    n = len(runs)
    if dry_run:  # lists every run, and what its checks say, e.g. before its data is downloaded
        for k, run in enumerate(runs, 1):
            status = " (done)" if read_result(run.workdir) else ""
            out(f"run {k} of {n}: {run.name}{status}\n  {run.command}")
            try:
                validate(run)
            except ValueError as e:
                out(f"  would fail: {e}")
        return runs

    import train_lib
    from s2mlp import runs as runs_lib

    write_study_json(study, expand(study, workdir, check=False, command_line=command_line) if only else runs, workdir)
    if compilation_cache is None:
        compilation_cache = str(Path(workdir) / CACHE_DIR)
    runs_lib.enable_compilation_cache(compilation_cache)  # '' leaves it off
    walls = []
    for k, run in enumerate(runs, 1):
        if read_result(run.workdir):
            out(f"run {k} of {n}: {run.name}: done, skipped")
            continue
        resumed_from = ckpt.latest_step(Path(run.workdir) / ckpt.CHECKPOINTS)
        out(f"run {k} of {n}: {run.name}" + (f" (resuming from step {resumed_from})" if resumed_from else ""))
        out(f"  {run.command}")
        t0 = time.time()
        metrics = train_lib.train_and_evaluate(run.config, run.workdir)
        wall = time.time() - t0
        walls.append(wall)
        result = {
            "name": run.name,
            "metrics": metrics,
            "wall_s": wall,
            "resumed_from_step": resumed_from,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        tmp = Path(run.workdir) / (RESULT_JSON + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(Path(run.workdir) / RESULT_JSON)
        left = sum(1 for r in runs[k:] if not read_result(r.workdir))
        eta = f"; study ETA {hms(left * sum(walls) / len(walls))} for {left} more" if left else ""
        out(f"run {k} of {n}: {run.name} done in {hms(wall)}{eta}")
    if report:
        report_lib.main_report([workdir], out_dir=workdir, out=out)
    return runs


# =============================================================================
# Command line.
# =============================================================================
_command_line: dict = {}  # study.py's --config.FIELD flags: "args" (as given) and "model.overrides" (a dict)


def parse_flags(argv: list[str]) -> list[str]:
    """main.py's parsing (one line for a missing study file or an unknown --study.FIELD), with main.py's
    ``--config.FIELD=VALUE`` flags kept aside in `_command_line`: fields of every run's config."""
    from absl import app

    def parse(args: list[str]) -> list[str]:
        rest, _command_line["args"] = overrides_lib.split_config_args(args)
        return app.parse_flags_with_usage(rest)

    rest, model_fields = overrides_lib.parse_command_line(argv, parse, "study")
    if model_fields:
        _command_line[OVERRIDES] = model_fields
    return rest


def main(argv):
    del argv
    from absl import logging

    import train_lib
    from s2mlp import runs

    logging.get_absl_handler().addFilter(runs.QuietLibraries(str(ROOT)))
    logging.set_verbosity(logging.INFO)
    try:
        run_study(
            FLAGS.study,
            FLAGS.workdir,
            only=FLAGS.only,
            dry_run=FLAGS.dry_run,
            compilation_cache=FLAGS.compilation_cache,
            command_line=_command_line,
        )
    except train_lib.Stopped:  # as main.py: logged, checkpoint saved; rerunning the study resumes the run
        runs.exit_now(train_lib.EXIT_STOPPED)
    except train_lib.CLEAR_ERRORS as e:  # a checked failure of the study or of a run: its one line, no traceback
        logging.error("%s", e if isinstance(e, ValueError) else f"{type(e).__name__}: {e}")
        if isinstance(e, train_lib.ckpt.SaveFailed):  # Orbax's save threads may wait for ever: do not join them
            runs.exit_now(1)
        sys.exit(1)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    FLAGS = flags.FLAGS
    config_flags.DEFINE_config_file("study", None, "A study config file (path.py or path.py:arg).", lock_config=False)
    flags.DEFINE_string("workdir", None, "The study directory: one subdirectory per run, study.json, the report.")
    flags.DEFINE_bool("dry_run", False, "List the runs and their main.py commands; train nothing.")
    flags.DEFINE_multi_string(
        "only",
        [],
        "Run only the runs whose name matches this glob; repeat the flag for several (a run matching any of them "
        "runs), e.g. --only='shift=ss1,*' --only='shift=none,*'. Run names contain commas, so a comma-separated list "
        "cannot work.",
    )
    flags.DEFINE_string(
        "compilation_cache", None, "JAX compilation cache directory (default WORKDIR/compilation_cache; '': off)."
    )
    flags.mark_flags_as_required(["study", "workdir"])
    app.run(main, flags_parser=parse_flags)
