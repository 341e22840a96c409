"""The on-disk layout of a training run, shared by the trainer and the inference API.

A workdir holds ``config.json``, ``metrics.jsonl``, TensorBoard events and ``checkpoints/<step>/``; each step is an
Orbax composite checkpoint with items:

- ``params``: the model parameters (float32 pytree);
- ``ema_params``: the EMA of the parameters (only when the EMA is on);
- ``opt_state``: the optimizer state (training only);
- ``config``: the run's config as JSON;
- ``dataset``: ``{"num_classes": K, "class_names": [...]}`` as JSON;
- ``metrics``: ``{"eval_top1": x}`` (written by Orbax at evaluated steps, used to keep the best step): x is the
  top-1 of the eval that config.best_eval names (the main eval by default; the EMA's when on).

Orbax writes each step to a temporary folder and renames it when complete, so a run killed at any moment leaves
every listed step loadable; a temporary folder left by a killed run or a full disk is deleted when the next run's
`manager` opens the folder. Paths may be local or ``gs://``.

Reading a step never succeeds silently on damaged data: unreadable or truncated array files and non-finite (NaN/Inf)
parameters raise `BadCheckpoint` naming the step folder, the first bad parameter and the other complete steps.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath
from flax import traverse_util

CHECKPOINTS = "checkpoints"
# The items of one step.
PARAMS, EMA_PARAMS, OPT_STATE, CONFIG, DATASET = "params", "ema_params", "opt_state", "config", "dataset"
BEST_METRIC = "eval_top1"  # the key of the metrics saved with an evaluated step; higher is better


def absolute(path: epath.PathLike) -> epath.Path:
    """`path` as the run uses it: ``~`` expanded and made absolute against the working directory (Orbax
    refuses relative paths), a trailing ``/`` dropped; links are kept as given. URLs (``gs://...``) as they are.
    Every entry point that takes a run's path (main.py's flags through `train_lib`, study.py, the report, the
    predictor, `inference.load`) resolves it here, once, before anything is read or written."""
    text = os.fspath(path)
    if "://" in text:
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def _rank(metrics: dict[str, float]) -> float:
    return float(metrics[BEST_METRIC])


def manager(directory: epath.PathLike, *, keep: int = 3) -> ocp.CheckpointManager:
    """A manager that keeps the last `keep` steps plus the best one by `BEST_METRIC`, also across resumes.

    `best_fn` makes Orbax write each step's metrics and read them back when a later run opens the folder, so the
    best step of an earlier run keeps its rank; steps saved without metrics are kept only while among the last
    `keep`. Temporary folders of unfinished saves (``<step>.orbax-checkpoint-tmp-*``) are deleted on opening.
    """
    policy = ocp.checkpoint_managers.AnyPreservationPolicy(
        [
            ocp.checkpoint_managers.LatestN(keep),
            ocp.checkpoint_managers.BestN(get_metric_fn=_rank, n=1, keep_checkpoints_without_metrics=False),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        best_fn=_rank,
        best_mode="max",
        keep_checkpoints_without_metrics=False,
        cleanup_tmp_directories=True,
        # The step's folder is made in `save` itself, so a folder that cannot be made (permissions, a full disk)
        # fails there; made in the background, the failure leaves Orbax's threads waiting, unreported, for ever.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
    )
    logging.getLogger("absl").addFilter(_unranked_saves)  # added once: addFilter skips a filter already there
    mngr = ocp.CheckpointManager(epath.Path(directory), options=options)
    # Orbax deletes them in a background thread that it joins only at the first save; join it here, so the
    # folder is settled when this returns and no file-system call of that thread overlaps the run's own
    # (tfds.testing.mock_data, for one, swaps the file system for every thread while a dataset is built).
    getattr(mngr, "_maybe_await_cleanup_tmp_directory", lambda: None)()
    return mngr


class SaveFailed(RuntimeError):
    """A checkpoint save failed (a path Orbax refuses, permissions, a full disk, a bucket error): training stops."""


@contextlib.contextmanager
def save_errors(directory: epath.Path, step: int | None):
    """Turns any error of Orbax's save of `step` (raised by ``save``, ``check_for_errors`` or
    ``wait_until_finished``, whichever sees it first) into one `SaveFailed` line: the step, the cause and the
    last complete step, which Orbax leaves loadable (a save is renamed into place only when complete)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - whatever broke the save, the run must stop here
        root = e
        while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
            root = root.__cause__ or root.__context__
        cause = (str(root).strip().splitlines() or ["(no message)"])[0][:300]
        kept = latest_step(directory)
        where = f"step {kept} is complete and loadable" if kept is not None else "no complete step was written yet"
        raise SaveFailed(
            f"saving the checkpoint of step {step} in {directory} failed ({type(root).__name__}: {cause}); training "
            f"stopped there, {where}. Fix the cause (disk space, permissions, the path) and rerun the same command "
            "to resume."
        ) from None


def save_args(state: Any, *, config: dict, dataset: dict) -> ocp.args.Composite:
    """The items of one training step (`state_items`; no EMA item when state.ema_params is None), for
    `manager(...).save`."""
    args = {k: ocp.args.StandardSave(v) for k, v in state_items(state, ema=state.ema_params is not None).items()}
    return ocp.args.Composite(**args, **{CONFIG: ocp.args.JsonSave(config), DATASET: ocp.args.JsonSave(dataset)})


def state_items(state: Any, *, ema: bool) -> dict[str, Any]:
    """``{item: tree}`` of a training state's saved items (`state` has params, opt_state, ema_params), the EMA
    only with `ema`: the restore targets of `restore_state`."""
    items = {PARAMS: state.params, OPT_STATE: state.opt_state}
    return items | ({EMA_PARAMS: state.ema_params} if ema else {})


def param_items(step_dir: epath.PathLike) -> list[str]:
    """The parameter items saved in a step: PARAMS, then EMA_PARAMS when the run had an EMA."""
    return [PARAMS] + ([EMA_PARAMS] if EMA_PARAMS in saved_items(step_dir) else [])


def latest_step(directory: epath.PathLike) -> int | None:
    """The latest complete step in a checkpoints folder; None when it holds none (or does not exist)."""
    directory = epath.Path(directory)
    steps = ocp.utils.checkpoint_steps(directory) if directory.exists() else []
    return max(steps) if steps else None


def restore_state(step_dir: epath.PathLike, targets: dict[str, Any]) -> dict[str, Any]:
    """`{item: arrays}` for each `{item: abstract tree}` of `targets` (leaves keep their shardings), each read and
    checked as `restore` does (`BadCheckpoint` for damaged data)."""
    return {item: restore(step_dir, item, abstract) for item, abstract in targets.items()}


def locate(path: epath.PathLike) -> tuple[epath.Path, int]:
    """Resolves a workdir, its ``checkpoints/`` folder or one step folder to (checkpoints dir, step).

    A workdir or checkpoints folder resolves to its latest complete step; relative paths and ``~`` resolve
    as `absolute` does. Raises FileNotFoundError when `path` holds no complete checkpoint.
    """
    path = absolute(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist.")
    if path.name.isdigit() and (path / PARAMS).exists():
        return path.parent, int(path.name)
    directory = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    steps = ocp.utils.checkpoint_steps(directory) if directory.is_dir() else []
    if not steps:
        raise FileNotFoundError(
            f"{path} holds no complete checkpoint (expected {CHECKPOINTS}/<step>/ with a 'params' item, "
            "as written by main.py); pass a training workdir or one of its step folders."
        )
    return directory, max(steps)


def saved_items(step_dir: epath.PathLike) -> set[str]:
    return {p.name for p in epath.Path(step_dir).iterdir() if p.is_dir()}


class BadCheckpoint(ValueError):
    """A step whose data cannot be used: unreadable, truncated, or holding NaN/Inf parameters."""

    def __init__(self, step_dir: epath.Path, problem: str):
        self.step_dir, self.problem = epath.Path(step_dir), problem
        super().__init__(f"checkpoint {self.step_dir} {problem}; {_other_steps_hint(self.step_dir)}.")


def _other_steps_hint(step_dir: epath.Path) -> str:
    directory = step_dir.parent
    try:
        others = sorted(s for s in ocp.utils.checkpoint_steps(directory) if str(s) != step_dir.name)
    except Exception:  # noqa: BLE001 - only for the hint
        others = []
    if not others:
        return f"no other complete step in {directory}: re-save it, or train again in a new --workdir"
    if not step_dir.name.isdigit() or int(step_dir.name) < others[-1]:  # not the latest: a resume does not read it
        return f"other steps of this run: {others}. Load one by passing {directory}/<step>"
    return (
        f"other steps of this run: {others}. Load one by passing {directory}/<step>; to resume training from "
        f"step {others[-1]}, move this step out of {directory} (e.g. mv {step_dir} "
        f"{directory.parent}/damaged-{step_dir.name}) and run the same command again"
    )


def corrupt(step_dir: epath.Path, e: BaseException) -> BadCheckpoint:
    """The error for a step whose items cannot be read, naming the other steps of the run."""
    while e.__cause__ is not None:  # tensorstore's own error names the array and the file
        e = e.__cause__
    text = str(e).strip().split(" See full TensorStore details")[0]
    reason = text.splitlines()[0][:300] if text else "(no message)"
    return BadCheckpoint(step_dir, f"is incomplete or corrupt ({type(e).__name__}: {reason})")


def _unranked_saves(record: logging.LogRecord) -> bool:
    """Drops Orbax's "Requested `tracked_metric`; did not provide metrics." warning: steps saved between evals
    (and the step saved on SIGTERM) have no eval metrics by design; they are kept while among the last `keep`."""
    return "did not provide metrics" not in record.getMessage()


class _QuietOrbax(logging.Filter):
    """Drops Orbax's notices that an item folder has no step-level or item metadata (seen when reading one item)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()  # the second notice precedes a BadCheckpoint that says more
        return "_CHECKPOINT_METADATA" not in message and "Failed to get item metadata" not in message


@contextlib.contextmanager
def _reading(step_dir: epath.Path):
    """Reads of `step_dir` with Orbax's notices quieted; any error (Orbax, JSON, tensorstore's ValueError, OSError
    or RuntimeError on damaged files) is raised as `corrupt`, whose message holds the reason."""
    _silence_abandoned_reads()
    quiet, logger = _QuietOrbax(), logging.getLogger("absl")
    logger.addFilter(quiet)
    try:
        yield
    except Exception as e:  # noqa: BLE001 - any failure of the read means a damaged item
        raise corrupt(step_dir, e) from None
    finally:
        logger.removeFilter(quiet)


def _abandoned_tasks(record: logging.LogRecord) -> bool:
    """Drops asyncio's reports of Orbax read tasks that nobody awaits any more."""
    message = record.getMessage()
    abandoned = message.startswith(("Task exception was never retrieved", "Task was destroyed but it is pending"))
    return not (abandoned and "orbax" in message)


def _is_abandoned_read(unraisable) -> bool:
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
        return True  # a tensorstore read finishing after Orbax closed its event loop
    code = getattr(unraisable.object, "cr_code", None)  # an Orbax coroutine dropped with its error
    return code is not None and "orbax" in code.co_filename


@functools.cache  # once per process
def _silence_abandoned_reads() -> None:
    """Keeps the real error of a failed read readable.

    When one array of a step cannot be read, Orbax stops waiting for the step's other reads; as they finish (in
    tensorstore's threads, while and after the error is raised) each one prints a traceback ("Event loop is
    closed", "Task exception was never retrieved"), hundreds of lines for a large model. From the first read
    through this module on, those reports (and only those) are dropped for the rest of the process.
    """
    logging.getLogger("asyncio").addFilter(_abandoned_tasks)
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_abandoned_read(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook


def read_json(step_dir: epath.PathLike, item: str) -> dict[str, Any] | None:
    """A JSON item of a step (None when absent), through Orbax's JSON handler."""
    step_dir = epath.Path(step_dir)
    if not (step_dir / item).is_dir():
        return None
    with _reading(step_dir):
        value = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / item)
    if not isinstance(value, dict):
        raise corrupt(step_dir, TypeError(f"item '{item}' holds {type(value).__name__}, not a JSON object"))
    return value


def saved_shapes(step_dir: epath.PathLike, item: str = PARAMS) -> dict[str, tuple[int, ...]]:
    """``{'a/b/kernel': shape}`` of an array item, from its metadata only (no array is read)."""
    return {k: v.shape for k, v in _saved_arrays(epath.Path(step_dir), item).items()}


def _saved_arrays(step_dir: epath.Path, item: str) -> dict[str, Any]:
    with _reading(step_dir):
        meta = ocp.Checkpointer(ocp.StandardCheckpointHandler()).metadata(step_dir / item)
        tree = getattr(meta, "item_metadata", meta)
        leaves = flatten(getattr(tree, "tree", tree))
    if not leaves:
        raise corrupt(step_dir, ValueError(f"the array metadata of item '{item}' cannot be read"))
    return leaves


def restore(step_dir: epath.PathLike, item: str, abstract: Any = None, sharding=None) -> Any:
    """The arrays of `item` with `abstract`'s shapes and dtypes (default: as saved), without the training state.

    Arrays land on `sharding`, else on the sharding each `abstract` leaf carries, else on the first local device,
    whatever the device layout at save time. `BadCheckpoint` when the files cannot be read or hold NaN/Inf.
    """
    step_dir = epath.Path(step_dir)
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if abstract is None:
        saved = _saved_arrays(step_dir, item)
        abstract = unflatten({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in saved.items()})
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding or getattr(a, "sharding", None) or default),
        abstract,
    )
    with _reading(step_dir):
        arrays = ocp.Checkpointer(ocp.StandardCheckpointHandler()).restore(
            step_dir / item, args=ocp.args.StandardRestore(target)
        )
        arrays = jax.block_until_ready(arrays)
    bad = first_nonfinite(arrays)
    if bad is not None:
        raise BadCheckpoint(step_dir, f"holds NaN/Inf values in '{item}' (first: {bad})")
    return arrays


def first_nonfinite(tree: Any) -> str | None:
    """The '/'-joined path of the first floating-point leaf of `tree` holding a NaN or Inf; None if all are finite.
    One jitted reduction over all leaves: works on sharded (also multi-host) arrays and moves only flags."""
    flat = {k: v for k, v in flatten(tree).items() if jnp.issubdtype(v.dtype, jnp.inexact)}
    if not flat:
        return None
    flags = jax.device_get(_all_finite(list(flat.values())))
    return next((key for key, ok in zip(flat, flags, strict=True) if not ok), None)


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.isfinite(x).all() for x in leaves])


def params_item(step_dir: epath.PathLike, *, ema: bool) -> str:
    """EMA_PARAMS when asked for and saved, else PARAMS."""
    return EMA_PARAMS if ema and EMA_PARAMS in saved_items(step_dir) else PARAMS


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """``{'a/b/kernel': leaf}`` -> nested dicts; the inverse of `flatten`."""
    return traverse_util.unflatten_dict(flat, sep="/")


def flatten(tree: Any) -> dict[str, Any]:
    """A pytree of arrays (or shape structs) -> ``{'a/b/kernel': leaf}``, the '/'-joined key paths."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{'a/b/kernel': shape}`` of a pytree of arrays or shape structs."""
    return {k: tuple(v.shape) for k, v in flatten(tree).items()}


def shape_mismatch(expected: dict[str, tuple], found: dict[str, tuple], limit: int = 5) -> str:
    """A readable list of mis-shaped / missing / unexpected keys (`limit` of each); '' when they agree."""
    groups = {
        "mis-shaped": [
            f"{k}: expected {expected[k]}, found {found[k]}"
            for k in sorted(set(expected) & set(found))
            if tuple(expected[k]) != tuple(found[k])
        ],
        "missing": [f"{k} {expected[k]}" for k in sorted(set(expected) - set(found))],
        "unexpected": [f"{k} {found[k]}" for k in sorted(set(found) - set(expected))],
    }
    lines = []
    for kind, items in groups.items():
        lines += [f"  {kind} {item}" for item in items[:limit]]
        if len(items) > limit:
            lines.append(f"  ... and {len(items) - limit} more {kind}")
    return "\n".join(lines)


# ---- Block layout: a run saved with model.scan on reads into a model with it off, and back. ----------------------
def _stack(*leaves):
    if all(isinstance(x, np.ndarray | np.generic) for x in leaves):
        return np.stack(leaves)
    return jnp.stack(leaves)


def _convert_mapping(node: Mapping, groups, to_scan: bool) -> dict | None:
    """`node` in the other layout, or None when `node` is not a parameter dict of this model."""
    node = dict(node)
    if to_scan and groups and all(name in node for _, names in groups for name in names):
        for scanned, names in groups:
            node[scanned] = jax.tree.map(_stack, *[node.pop(name) for name in names])
        return node
    if not to_scan and groups and all(scanned in node for scanned, _ in groups):
        for scanned, names in groups:
            stacked = node.pop(scanned)
            for j, name in enumerate(names):
                node[name] = jax.tree.map(lambda x, j=j: x[j], stacked)
        return node
    return None


def convert_params(tree: Any, model, *, to_scan: bool) -> Any:
    """`tree`'s parameters of `model` (an S2MLP or S2MLPv2) moved to the scanned or the unrolled layout.

    Scanned (``to_scan=True``): ``block_0`` ... ``block_{N-1}`` of each run of identical blocks are stacked along a
    new leading axis into one entry (S²-MLP: ``blocks``; S²-MLPv2: ``stage_{s}`` per stage); unrolled: the reverse.
    Every dict in `tree` that holds the blocks is converted, so a parameter tree, an EMA, or an optimizer state
    (Adam's ``mu``/``nu`` mirror the parameters) all work; dicts already in the target layout and other leaves are
    returned unchanged. Values are only stacked or sliced, so converting there and back gives the same arrays. Only
    the layout of `model` matters (its `scan` field is ignored): use ``model.clone(scan=...)`` for the other model.
    """
    groups = model.block_groups()

    def walk(node):
        if isinstance(node, Mapping):
            converted = _convert_mapping(node, groups, to_scan)
            if converted is None:
                converted = {k: walk(v) for k, v in node.items()}
            return converted if isinstance(node, dict) else type(node)(converted)
        if isinstance(node, tuple) and hasattr(node, "_fields"):  # optax states are NamedTuples
            return type(node)(*(walk(v) for v in node))
        if isinstance(node, list | tuple):
            return type(node)(walk(v) for v in node)
        return node

    return walk(tree)


def scan_params(tree: Any, model) -> Any:
    """`convert_params(tree, model, to_scan=True)`: unrolled blocks stacked into the scanned layout."""
    return convert_params(tree, model, to_scan=True)


def unscan_params(tree: Any, model) -> Any:
    """`convert_params(tree, model, to_scan=False)`: scanned blocks split into ``block_{i}``."""
    return convert_params(tree, model, to_scan=False)


def _other_layout(model, tree):
    """`tree`'s shapes moved to `model`'s other block layout (scanned <-> unrolled; None for Mixer), no shardings."""
    if not model.block_groups():
        return None
    plain = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    return jax.eval_shape(lambda t: convert_params(t, model, to_scan=not model.scan), plain)


# ---- Restoring a run: resume from its workdir, or start from another run's weights (config.init_from). ----------
def check_compatible(directory: epath.Path, step: int, model, abstract_params, model_name: str) -> bool:
    """The saved parameters must have exactly the shapes of `abstract_params` (`model`'s), in either block layout:
    True when they were saved in the other one (unrolled ``block_{i}`` vs scanned, see `convert_params`), so the
    restore converts them; False when they fit as they are. `model_name` is config.model.name, for the message."""
    step_dir = directory / str(step)
    saved_shapes_ = saved_shapes(step_dir)
    problems = shape_mismatch(flat_shapes(abstract_params), saved_shapes_)
    if problems:
        other = _other_layout(model, abstract_params)
        if other is not None and not shape_mismatch(flat_shapes(other), saved_shapes_):
            absl_logging.info("Step %d in %s was saved in the other block layout (model.scan): converting.", step,
                              directory)  # fmt: skip
            return True
        saved = (read_json(step_dir, CONFIG) or {}).get("model", {})
        raise ValueError(
            f"{directory} holds a checkpoint (step {step}) of model {saved.get('name')!r} "
            f"(overrides {saved.get('overrides') or {}}), whose parameters do not fit "
            f"config.model.name={model_name!r}:\n"
            f"{problems}\nNothing was changed in the workdir. Use a new --workdir, or fine-tune from this run "
            "with --config.init_from=<that workdir> (a new head is created)."
        )
    return False


def check_same_classes(step_dir: epath.Path, class_names, advice: str) -> None:
    """ValueError ending in `advice` when the step at `step_dir` was trained on other classes than `class_names`
    (the config's data), or the same ones in another order: its head's outputs would be read as the wrong labels."""
    saved = (read_json(step_dir, DATASET) or {}).get("class_names")
    now = list(class_names)
    if saved is None or list(saved) == now:
        return
    if len(saved) != len(now):
        what = f"{len(saved)} classes ({_some(saved)}), where config.data gives {len(now)} ({_some(now)})"
    else:
        i = next(i for i, (a, b) in enumerate(zip(saved, now, strict=True)) if a != b)
        what = f"other classes or another order of them (label {i} was {saved[i]!r}, config.data makes it {now[i]!r})"
    raise ValueError(
        f"{step_dir} was trained on {what}; config.data.name, config.data.data_dir and config.data.classes choose "
        f"them. {advice}"
    )


def _some(names, k: int = 4) -> str:
    return ", ".join(map(repr, names[:k])) + (", ..." if len(names) > k else "")


def _body(shapes: dict[str, tuple]) -> dict[str, tuple]:
    return {k: v for k, v in shapes.items() if not k.startswith("head/")}


def check_init_from(init_from: str, ema: bool, model, abstract_params, model_name: str) -> None:
    """`init_from` (config.init_from) must hold a checkpoint whose parameters (the EMA's with `ema` when saved),
    less the head, fit `abstract_params` of `model` (metadata only)."""
    try:
        directory, step = locate(init_from)
        step_dir = directory / str(step)
        saved = saved_shapes(step_dir, params_item(step_dir, ema=ema))
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"config.init_from={init_from!r}: {e}") from None
    problems = shape_mismatch(_body(flat_shapes(abstract_params)), _body(saved))
    other = _other_layout(model, abstract_params) if problems else None  # saved with the other model.scan
    if problems and (other is None or shape_mismatch(_body(flat_shapes(other)), _body(saved))):
        raise ValueError(f"config.init_from={init_from!r}: its parameters do not fit {model_name}:\n{problems}")


def fine_tune_params(init_from: str, ema: bool, model, fresh_params, model_name: str):
    """`init_from`'s parameters (the EMA's with `ema` when saved), in `model`'s block layout, with the head of
    `fresh_params` (numpy arrays)."""
    directory, step = locate(init_from)
    step_dir = directory / str(step)
    try:
        loaded = restore(step_dir, params_item(step_dir, ema=ema))
    except BadCheckpoint as e:
        raise ValueError(f"config.init_from={init_from!r}: {e}") from None
    loaded = jax.tree.map(np.asarray, dict(loaded))
    loaded = convert_params(loaded, model, to_scan=model.scan)  # saved with the other model.scan (Mixer: unchanged)
    loaded["head"] = fresh_params["head"]
    problems = shape_mismatch(flat_shapes(fresh_params), flat_shapes(loaded))
    if problems:
        raise ValueError(f"config.init_from={init_from!r}: its parameters do not fit {model_name}:\n{problems}")
    absl_logging.info("Fine-tuning from %s step %d (new head).", directory, step)
    return loaded


def restore_items(step_dir, targets: dict[str, Any], model, convert: bool, replicated) -> dict[str, Any]:
    """`restore_state(step_dir, targets)`; with `convert`, read (on the `replicated` sharding) in the other block
    layout and converted onto the targets' shardings."""
    if not convert:
        return restore_state(step_dir, targets)
    saved = jax.tree.map(lambda a: a.update(sharding=replicated), _other_layout(model, targets))
    restored = restore_state(step_dir, saved)
    return {
        item: jax.device_put(
            convert_params(arrays, model, to_scan=model.scan), jax.tree.map(lambda a: a.sharding, targets[item])
        )
        for item, arrays in restored.items()
    }


def restore_train_state(
    directory: epath.Path, step: int, trainer, *, ema_decay: float, grad_clip_norm: float = 0.0, convert: bool = False
):
    """The training state saved at `step`, each leaf on the sharding of `trainer` (a `train_lib.Trainer`), with
    the EMA setting `ema_decay` (config.ema_decay).

    A damaged step (unreadable files, NaN/Inf values) raises `BadCheckpoint`, which names the previous complete
    step and how to resume from it. An EMA missing from the checkpoint while ema_decay > 0 starts from the restored
    parameters; a saved EMA with ema_decay=0 is left out (later checkpoints hold none); both are logged as
    warnings. `convert` (from `check_compatible`): the step was saved in the other block layout (model.scan);
    parameters, EMA and optimizer state are read in that layout and converted.
    """
    step_dir = directory / str(step)
    use_ema, saved_ema = ema_decay > 0, EMA_PARAMS in saved_items(step_dir)
    items = state_items(trainer.targets, ema=use_ema and saved_ema)
    # Clipping (config.grad_clip_norm > 0) chains a stateless stage before AdamW: the state gains an empty first
    # entry. Turned on or off since the save, the state is read as saved and the entry added or dropped.
    saved_config = read_json(step_dir, CONFIG) or {}
    clips, saved_clips = grad_clip_norm > 0, float(saved_config.get("grad_clip_norm") or 0) > 0
    if saved_clips != clips:
        items[OPT_STATE] = (optax.EmptyState(), items[OPT_STATE]) if saved_clips else items[OPT_STATE][1]
        absl_logging.warning(
            "Step %d in %s was saved with%s gradient clipping; config.grad_clip_norm=%g turns it %s from here on.",
            step, directory, "" if saved_clips else "out", grad_clip_norm, "on" if clips else "off",
        )  # fmt: skip
    restored = restore_items(step_dir, items, trainer.model, convert, trainer.replicated)
    if saved_clips != clips:
        restored[OPT_STATE] = restored[OPT_STATE][1] if saved_clips else (optax.EmptyState(), restored[OPT_STATE])
    ema_params = restored.get(EMA_PARAMS)
    if use_ema and not saved_ema:
        absl_logging.warning(
            "Step %d in %s was saved without an EMA of the parameters; with config.ema_decay=%g the EMA starts "
            "from the restored parameters at step %d. To go on without an EMA, resume with --config.ema_decay=0.",
            step, directory, ema_decay, step,
        )  # fmt: skip
        ema_params = jax.device_put(restored[PARAMS], trainer.shardings.ema_params, may_alias=False)
    elif saved_ema and not use_ema:
        absl_logging.warning(
            "Step %d in %s holds an EMA of the parameters, but config.ema_decay=0 turns the EMA off: it is not "
            "resumed and later checkpoints hold none. To keep it, resume with --config.ema_decay=%s.",
            step, directory, saved_config.get("ema_decay"),
        )  # fmt: skip
    return trainer.abstract.replace(
        step=jax.device_put(jnp.asarray(step, jnp.int32), trainer.replicated),
        params=restored[PARAMS],
        opt_state=restored[OPT_STATE],
        ema_params=ema_params,
        bad_step=jax.device_put(jnp.asarray(-1, jnp.int32), trainer.replicated),
    )
