"""The on-disk layout of a training run, shared by the trainer and the inference API.

A workdir holds ``config.json``, ``metrics.jsonl``, TensorBoard events and
``checkpoints/<step>/``; each step is an Orbax composite checkpoint with items:

- ``params``: the model parameters (float32 pytree);
- ``ema_params``: the EMA of the parameters (only when the EMA is on);
- ``opt_state``: the optimizer state (training only);
- ``config``: the run's config as JSON;
- ``dataset``: ``{"num_classes": K, "class_names": [...]}`` as JSON.

Orbax writes each step to a temporary folder and renames it when complete, so a
run killed at any moment leaves every listed step loadable. Paths may be local
or ``gs://``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINTS = "checkpoints"
BEST_METRIC = "eval_top1"


def manager(directory: epath.PathLike, *, keep: int = 3) -> ocp.CheckpointManager:
    """A manager that keeps the last `keep` steps plus the best one by `BEST_METRIC`."""
    policy = ocp.checkpoint_managers.AnyPreservationPolicy(
        [
            ocp.checkpoint_managers.LatestN(keep),
            ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda m: m[BEST_METRIC], n=1, keep_checkpoints_without_metrics=False
            ),
        ]
    )
    options = ocp.CheckpointManagerOptions(preservation_policy=policy)
    return ocp.CheckpointManager(epath.Path(directory), options=options)


def locate(path: epath.PathLike) -> tuple[epath.Path, int]:
    """Resolves a workdir, its ``checkpoints/`` folder or one step folder to (checkpoints dir, step).

    A workdir or checkpoints folder resolves to its latest complete step.
    Raises FileNotFoundError when `path` holds no complete checkpoint.
    """
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist.")
    if path.name.isdigit() and (path / "params").exists():
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


def corrupt(step_dir: epath.Path, e: BaseException) -> ValueError:
    """The error for a step whose items cannot be read, naming the other steps of the run."""
    text = str(e).strip().split(" See full TensorStore details")[0]
    reason = text.splitlines()[0][:300] if text else "(no message)"
    try:
        others = sorted(s for s in ocp.utils.checkpoint_steps(step_dir.parent) if str(s) != step_dir.name)
    except Exception:  # noqa: BLE001 - only for the hint
        others = []
    hint = f"other steps of this run: {others} (pass {step_dir.parent}/<step>)" if others else "re-save it"
    return ValueError(f"checkpoint {step_dir} is incomplete or corrupt ({type(e).__name__}: {reason}); {hint}.")


class _QuietOrbax(logging.Filter):
    """Drops Orbax's notice that an item folder has no step-level metadata (expected when reading one item)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "_CHECKPOINT_METADATA" not in record.getMessage()


@contextlib.contextmanager
def _quiet_orbax():
    quiet, logger = _QuietOrbax(), logging.getLogger("absl")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def read_json(step_dir: epath.PathLike, item: str) -> dict[str, Any] | None:
    """A JSON item of a step (None when absent), through Orbax's JSON handler."""
    step_dir = epath.Path(step_dir)
    if not (step_dir / item).is_dir():
        return None
    try:
        with _quiet_orbax():
            value = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / item)
    except Exception as e:  # noqa: BLE001 - any Orbax / JSON failure means a damaged item
        raise corrupt(step_dir, e) from e
    if not isinstance(value, dict):
        raise corrupt(step_dir, TypeError(f"item '{item}' holds {type(value).__name__}, not a JSON object"))
    return value


def saved_shapes(step_dir: epath.PathLike, item: str = "params") -> dict[str, tuple[int, ...]]:
    """``{'a/b/kernel': shape}`` of an array item, from its metadata only (no array is read)."""
    return {k: v.shape for k, v in _saved_arrays(epath.Path(step_dir), item).items()}


def _saved_arrays(step_dir: epath.Path, item: str) -> dict[str, Any]:
    try:
        with _quiet_orbax():
            meta = ocp.Checkpointer(ocp.StandardCheckpointHandler()).metadata(step_dir / item)
        tree = getattr(meta, "item_metadata", meta)
        leaves = flatten(getattr(tree, "tree", tree))
    except Exception as e:  # noqa: BLE001
        raise corrupt(step_dir, e) from e
    if not leaves:
        raise corrupt(step_dir, ValueError(f"the array metadata of item '{item}' cannot be read"))
    return leaves


def restore(step_dir: epath.PathLike, item: str, abstract: Any = None, sharding=None) -> Any:
    """The arrays of `item` with `abstract`'s shapes and dtypes (default: as saved), without the training state.

    Arrays land on `sharding` (default: the first local device), whatever the device layout at save time.
    """
    step_dir = epath.Path(step_dir)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if abstract is None:
        saved = _saved_arrays(step_dir, item)
        abstract = unflatten({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in saved.items()})
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)
    try:
        with _quiet_orbax():
            arrays = ocp.Checkpointer(ocp.StandardCheckpointHandler()).restore(
                step_dir / item, args=ocp.args.StandardRestore(target)
            )
        return jax.block_until_ready(arrays)
    except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError/OSError/RuntimeError on damaged files
        raise corrupt(step_dir, e) from e


def params_item(step_dir: epath.PathLike, *, ema: bool) -> str:
    """'ema_params' when asked for and saved, else 'params'."""
    return "ema_params" if ema and "ema_params" in saved_items(step_dir) else "params"


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """``{'a/b/kernel': leaf}`` -> nested dicts; the inverse of `flatten`."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


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
