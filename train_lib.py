"""Training and evaluation of S²-MLP, S²-MLPv2 and Mixer: read top to bottom.

Sections: config checks · state and optimizer · mesh and sharding · steps ·
restore · train loop · eval-only.

One jitted train step runs over a 1-D device mesh ``('data',)``: the global
batch is sharded over 'data', parameters are replicated (or FSDP-sharded over
'data' with ``config.fsdp``). Multi-host runs feed each process's share of the
batch through `jax.make_array_from_process_local_data`.

Importing this module needs no TensorFlow: the input pipeline and the metric
writers (which use it) are imported inside `train_and_evaluate`/`evaluate`, so
the train step and the benchmarks run on hosts without TensorFlow.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import math
import os
import signal
import socket
import threading
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from s2mlp import checkpoint as ckpt
from s2mlp import models
from s2mlp.mixup import mix_batch, smooth_labels

jax.config.update("jax_threefry_partitionable", True)  # random bits independent of the sharding

# Exit status of main.py when SIGTERM/SIGINT stopped training after saving a checkpoint (sysexits' EX_TEMPFAIL:
# "try again"); rerunning the same command resumes. Checked errors exit with 1; a second signal kills the process.
EXIT_STOPPED = 75


class WorkdirBusy(RuntimeError):
    """Another live trainer holds the workdir's lock."""


# Errors whose message says what is wrong and how to fix it: main.py prints them without a traceback.
CLEAR_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, WorkdirBusy)


# =============================================================================
# Config checks: every bad value fails here, before anything is compiled.
# =============================================================================
def build_model(config, num_classes: int):
    """The config's model; ValueError naming the field when it is invalid."""
    overrides = dict(config.model.get("overrides", {}))
    try:
        return models.get_model(
            config.model.name,
            image_size=config.image_size,
            num_classes=num_classes,
            drop_path_rate=config.model.drop_path_rate,
            dtype=config.compute_dtype,
            **overrides,
        )
    except ValueError as e:
        raise ValueError(f"config.model: {e}") from None


def validate_config(config, *, num_devices: int, num_processes: int = 1) -> None:
    """Checks the recipe fields; raises ValueError naming `config.<field>` and the fix."""

    def check(ok: bool, field: str, why: str):
        if not ok:
            raise ValueError(f"config.{field}={_get(config, field)!r} {why}.")

    _check_finite_floats(config)  # base_lr=inf, weight_decay=nan, ...
    if config.model.name not in models.model_names():
        raise ValueError(f"config.model.name={config.model.name!r} is unknown; choose one of {models.model_names()}.")
    check(config.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
    per_step = num_devices * config.grad_accum_steps
    check(
        config.batch_size > 0 and config.batch_size % per_step == 0,
        "batch_size",
        f"must be a positive multiple of devices ({num_devices}) × grad_accum_steps ({config.grad_accum_steps}) "
        f"= {per_step}; e.g. {max(per_step, config.batch_size // per_step * per_step)}",
    )
    check(config.batch_size % num_processes == 0, "batch_size", f"must divide over {num_processes} processes")
    check(
        config.eval_batch_size > 0 and config.eval_batch_size % num_devices == 0,
        "eval_batch_size",
        f"must be a positive multiple of the device count {num_devices}",
    )
    check(config.base_lr > 0, "base_lr", "must be positive")
    check(config.min_lr >= 0, "min_lr", "must be >= 0")
    check(config.weight_decay >= 0, "weight_decay", "must be >= 0")
    check(config.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
    check(config.num_epochs > 0 or config.total_steps > 0, "num_epochs", "must be positive (or set total_steps)")
    check(config.total_steps >= 0, "total_steps", "must be >= 0 (0 means num_epochs worth of steps)")
    check(0 <= config.ema_decay < 1, "ema_decay", "must be in [0, 1); 0 turns the EMA off")
    check(config.grad_clip_norm >= 0, "grad_clip_norm", "must be >= 0; 0 turns clipping off")
    check(0 <= config.augment.label_smoothing < 1, "augment.label_smoothing", "must be in [0, 1)")
    check(config.augment.mixup >= 0, "augment.mixup", "must be >= 0 (the Beta alpha; 0 turns Mixup off)")
    check(config.augment.cutmix >= 0, "augment.cutmix", "must be >= 0 (the Beta alpha; 0 turns CutMix off)")
    check(0 <= config.augment.mix_switch_prob <= 1, "augment.mix_switch_prob", "must be in [0, 1]")
    for field in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        check(config[field] >= 1, field, "must be >= 1")
    profile = tuple(config.get("profile_steps") or (0, 0))
    check(
        len(profile) == 2
        and all(isinstance(v, int) and v >= 0 for v in profile)
        and (profile[0] >= 1 or not profile[1]),
        "profile_steps",
        "must be (first_step, num_steps) with first_step >= 1, e.g. (10, 5); (0, 0) turns profiling off",
    )
    check(
        config.compute_dtype in ("float32", "bfloat16", "float16"),
        "compute_dtype",
        "must be float32, bfloat16 or float16",
    )
    build_model(config, num_classes=1000)  # model name, overrides, rates and image_size


def _get(config, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


# =============================================================================
# State and optimizer.
# =============================================================================
@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any  # None when the EMA is off
    bad_step: jax.Array  # first step (1-based, as logged) whose loss, gradient or update was not finite; -1 if none


def learning_rate_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then cosine to `min_lr`; peak lr = base_lr × batch_size / 1024."""
    peak = config.base_lr * config.batch_size / 1024
    warmup = min(int(config.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), config.min_lr)


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW; no weight decay on biases and norm scales (every parameter with ndim < 2)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    adamw = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=config.weight_decay, mask=decay_mask)
    if config.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)
    return adamw


def create_state(params, tx: optax.GradientTransformation, use_ema: bool) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=params if use_ema else None,
        bad_step=jnp.full((), -1, jnp.int32),
    )


def init_state(rng: jax.Array, model, tx: optax.GradientTransformation, image_size: int, use_ema: bool) -> TrainState:
    params = model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)["params"]
    return create_state(params, tx, use_ema)


# =============================================================================
# Mesh and sharding.
# =============================================================================
def make_mesh() -> jax.sharding.Mesh:
    """All devices of all processes on one 'data' axis."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def state_sharding(mesh, abstract_state, fsdp: bool):
    """Replicated leaves, or with `fsdp` each leaf's largest axis divisible by the device count on 'data'."""
    n = mesh.shape["data"]

    def leaf(x):
        if fsdp and x.ndim >= 2:
            for axis in sorted(range(x.ndim), key=lambda a: -x.shape[a]):
                if x.shape[axis] % n == 0:
                    return NamedSharding(mesh, P(*[("data" if a == axis else None) for a in range(x.ndim)]))
        return NamedSharding(mesh, P())

    return jax.tree.map(leaf, abstract_state)


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Each process's share of the batch -> one global array sharded over 'data'."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


# =============================================================================
# Steps.
# =============================================================================
def train_step(state: TrainState, batch, rng, *, model, tx, config, num_classes: int):
    """One update on the global batch {'image': (B, H, W, 3), 'label': (B,)}.

    Label smoothing, Mixup/CutMix on the whole batch, then `grad_accum_steps`
    micro-batches whose gradients are averaged. A non-finite loss, gradient or
    updated parameter leaves the state unchanged and records the step in `bad_step`.
    """
    rng = jax.random.fold_in(rng, state.step)
    mix_rng, drop_rng = jax.random.split(rng)
    aug = config.augment
    targets = smooth_labels(batch["label"], num_classes, aug.label_smoothing)
    images, targets = mix_batch(
        mix_rng, batch["image"], targets, mixup=aug.mixup, cutmix=aug.cutmix, switch_prob=aug.mix_switch_prob
    )

    def loss_fn(params, images, targets, rng):
        logits = model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
        return optax.softmax_cross_entropy(logits, targets).mean()

    grad_fn = jax.value_and_grad(loss_fn)
    accum = config.grad_accum_steps
    if accum == 1:
        loss, grads = grad_fn(state.params, images, targets, drop_rng)
    else:
        # Micro-batch k holds examples k, k + accum, ...: every device keeps its share of each.
        micro = lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)  # noqa: E731

        def add_micro_batch(total, xs):
            k, images, targets = xs
            loss_grads = grad_fn(state.params, images, targets, jax.random.fold_in(drop_rng, k))
            return jax.tree.map(jnp.add, total, loss_grads), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
        total, _ = jax.lax.scan(add_micro_batch, zeros, (jnp.arange(accum), micro(images), micro(targets)))
        loss, grads = jax.tree.map(lambda x: x / accum, total)

    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    all_finite = lambda tree: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))  # noqa: E731
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(params)
    keep_if_bad = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    ema_params = state.ema_params
    if ema_params is not None:
        d = config.ema_decay
        ema_params = keep_if_bad(jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema_params, params), ema_params)
    new_state = state.replace(
        step=state.step + 1,
        params=keep_if_bad(params, state.params),
        opt_state=keep_if_bad(opt_state, state.opt_state),
        ema_params=ema_params,
        bad_step=jnp.where((state.bad_step < 0) & ~finite, state.step + 1, state.bad_step),
    )
    return new_state, {"loss": loss, "grad_norm": grad_norm}


def eval_step(params, batch, *, model):
    """Sums over the masked-in examples of {'image', 'label', 'mask'}: correct top-1/top-5, loss, count."""
    logits = model.apply({"params": params}, batch["image"], train=False)
    labels, mask = batch["label"], batch["mask"]
    top = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {
        "correct_top1": jnp.sum((top[:, 0] == labels) * mask),
        "correct_top5": jnp.sum(jnp.any(top == labels[:, None], axis=-1) * mask),
        "loss": jnp.sum(loss * mask),
        "count": jnp.sum(mask),
    }


def evaluate_params(eval_fn, params, batches, batch_sharding) -> dict[str, float]:
    """Top-1, top-5 and loss over one pass of `batches`; every real example counted once."""
    sums = None
    for batch in batches:
        out = eval_fn(params, to_global(batch, batch_sharding))
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    count = float(sums["count"])
    return {
        "top1": float(sums["correct_top1"]) / count,
        "top5": float(sums["correct_top5"]) / count,
        "loss": float(sums["loss"]) / count,
        "num_examples": count,
    }


def enable_compilation_cache(directory: str) -> None:
    """JAX's persistent compilation cache in `directory` ('~' expanded; '' leaves it off), for every program.

    Call before the first compile. Entries are keyed by the program, the JAX/XLA versions and the
    devices, so one directory serves every run (main.py: config.compilation_cache_dir; s2mlp/study.py's runner:
    WORKDIR/compilation_cache).
    """
    if not directory:
        return
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# =============================================================================
# Restore: resume from the workdir, or start from another run's weights.
# =============================================================================
def _layout_model(config, abstract_params):
    """The config's model (for `models.convert_params`), its class count read from `abstract_params`' head."""
    return build_model(config, int(abstract_params["head"]["bias"].shape[-1]))


def _other_layout(config, abstract_params):
    """`abstract_params` moved to the other block layout (scanned <-> unrolled; None for Mixer), no shardings."""
    model = _layout_model(config, abstract_params)
    if not models.block_groups(model):
        return None
    plain = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_params)
    return jax.eval_shape(lambda p: models.convert_params(p, model, to_scan=not model.scan), plain)


def _check_compatible(directory, step: int, abstract_params, config) -> bool:
    """The saved parameters must have exactly the shapes this config builds, in either block layout.

    Returns True when they were saved in the other layout (unrolled ``block_{i}`` vs scanned, see
    `models.convert_params`), so the restore converts them; False when they fit as they are.
    """
    step_dir = directory / str(step)
    saved_shapes = ckpt.saved_shapes(step_dir)
    problems = ckpt.shape_mismatch(ckpt.flat_shapes(abstract_params), saved_shapes)
    if problems:
        other = _other_layout(config, abstract_params)
        if other is not None and not ckpt.shape_mismatch(ckpt.flat_shapes(other), saved_shapes):
            logging.info("Step %d in %s was saved in the other block layout (model.scan): converting.", step, directory)
            return True
        saved = (ckpt.read_json(step_dir, ckpt.CONFIG) or {}).get("model", {})
        raise ValueError(
            f"{directory} holds a checkpoint (step {step}) of model {saved.get('name')!r} "
            f"(overrides {saved.get('overrides') or {}}), whose parameters do not fit "
            f"config.model.name={config.model.name!r}:\n"
            f"{problems}\nNothing was changed in the workdir. Use a new --workdir, or fine-tune from this run "
            "with --config.init_from=<that workdir> (a new head is created)."
        )
    return False


def _fine_tune_params(config, fresh_params):
    """`config.init_from`'s (EMA) parameters with this config's freshly initialised head."""
    directory, step = ckpt.locate(config.init_from)
    step_dir = directory / str(step)
    try:
        loaded = ckpt.restore(step_dir, ckpt.params_item(step_dir, ema=config.init_from_ema))
    except ckpt.BadCheckpoint as e:
        raise ValueError(f"config.init_from={config.init_from!r}: {e}") from None
    loaded = jax.tree.map(np.asarray, dict(loaded))
    model = _layout_model(config, fresh_params)
    if models.block_groups(model):  # a run saved in the other block layout (model.scan) is converted
        loaded = models.convert_params(loaded, model, to_scan=model.scan)
    loaded["head"] = fresh_params["head"]
    problems = ckpt.shape_mismatch(ckpt.flat_shapes(fresh_params), ckpt.flat_shapes(loaded))
    if problems:
        raise ValueError(
            f"config.init_from={config.init_from!r}: its parameters do not fit {config.model.name}:\n{problems}"
        )
    logging.info("Fine-tuning from %s step %d (new head).", directory, step)
    return loaded


def _restore_state(directory, step: int, abstract: TrainState, shardings, config, convert: bool = False) -> TrainState:
    """The training state saved at `step`, each leaf on its sharding, with this config's EMA setting.

    A damaged step (unreadable files, NaN/Inf values) raises `ckpt.BadCheckpoint`, which names the
    previous complete step and how to resume from it. An EMA missing from the checkpoint while
    config.ema_decay > 0 starts from the restored parameters; a saved EMA with config.ema_decay=0 is
    left out (later checkpoints hold none). Both are logged as warnings. `convert` (from
    `_check_compatible`): the step was saved in the other block layout (model.scan); parameters, EMA
    and optimizer state are read in that layout and converted (`models.convert_params`).
    """
    step_dir = directory / str(step)
    targets = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    use_ema, saved_ema = config.ema_decay > 0, ckpt.EMA_PARAMS in ckpt.saved_items(step_dir)
    items = {ckpt.PARAMS: targets.params, ckpt.OPT_STATE: targets.opt_state}
    if use_ema and saved_ema:
        items[ckpt.EMA_PARAMS] = targets.ema_params
    if convert:
        model = _layout_model(config, abstract.params)
        plain = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), items)
        saved_layout = jax.eval_shape(lambda t: models.convert_params(t, model, to_scan=not model.scan), plain)
        restored = {}
        for item, arrays in ckpt.restore_state(step_dir, saved_layout).items():
            converted = models.convert_params(arrays, model, to_scan=model.scan)
            restored[item] = jax.device_put(converted, jax.tree.map(lambda a: a.sharding, items[item]))
    else:
        restored = ckpt.restore_state(step_dir, items)
    ema_params = restored.get(ckpt.EMA_PARAMS)
    if use_ema and not saved_ema:
        logging.warning(
            "Step %d in %s was saved without an EMA of the parameters; with config.ema_decay=%g the EMA starts "
            "from the restored parameters at step %d. To go on without an EMA, resume with --config.ema_decay=0.",
            step, directory, config.ema_decay, step,
        )  # fmt: skip
        ema_params = jax.device_put(restored[ckpt.PARAMS], shardings.ema_params, may_alias=False)  # own buffers
    elif saved_ema and not use_ema:
        saved_decay = (ckpt.read_json(step_dir, ckpt.CONFIG) or {}).get("ema_decay")
        logging.warning(
            "Step %d in %s holds an EMA of the parameters, but config.ema_decay=0 turns the EMA off: it is not "
            "resumed and later checkpoints hold none. To keep it, resume with --config.ema_decay=%s.",
            step, directory, saved_decay,
        )  # fmt: skip
    replicated = jax.sharding.NamedSharding(shardings.step.mesh, P())
    return abstract.replace(
        step=jax.device_put(jnp.asarray(step, jnp.int32), replicated),
        params=restored[ckpt.PARAMS],
        opt_state=restored[ckpt.OPT_STATE],
        ema_params=ema_params,
        bad_step=jax.device_put(jnp.asarray(-1, jnp.int32), replicated),
    )


# =============================================================================
# Train loop.
# =============================================================================
def train_and_evaluate(config, workdir: str) -> dict[str, float]:
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the last eval metrics.

    Every check runs before anything is compiled or written into `workdir`. Raises `WorkdirBusy` when
    another trainer holds the workdir, and `Stopped` when SIGTERM/SIGINT stopped training (after a checkpoint).
    """
    with contextlib.ExitStack() as cleanup:  # the workdir lock and the signal handlers, released on any exit
        return _train_and_evaluate(config, workdir, cleanup)


def _train_and_evaluate(config, workdir: str, cleanup: contextlib.ExitStack) -> dict[str, float]:
    from clu import metric_writers

    import input_pipeline  # TensorFlow lives behind this import.

    # ---- checks, before anything is compiled or written -------------------------
    validate_config(config, num_devices=jax.device_count(), num_processes=jax.process_count())
    input_pipeline.validate_data_config(config, process_count=jax.process_count())
    info = input_pipeline.dataset_info(config)
    logging.info(
        "Dataset %s: train split %r %s images, eval split %r %s images, %d classes.",
        config.data.name, config.data.train_split, f"{info.num_train:,}", config.data.eval_split,
        f"{info.num_eval:,}", info.num_classes,
    )  # fmt: skip
    model = build_model(config, info.num_classes)
    steps_per_epoch = max(info.num_train // config.batch_size, 1)
    total_steps = config.total_steps or config.num_epochs * steps_per_epoch
    schedule = learning_rate_schedule(config, steps_per_epoch, total_steps)
    tx = make_optimizer(config, schedule)
    use_ema = config.ema_decay > 0

    workdir = epath.Path(workdir)
    ckpt_dir = workdir / ckpt.CHECKPOINTS
    rng = jax.random.key(config.seed)
    init_rng, step_rng = jax.random.split(rng)
    init = functools.partial(init_state, model=model, tx=tx, image_size=config.image_size, use_ema=use_ema)
    abstract = jax.eval_shape(lambda r: init(r), init_rng)
    saved_steps = ocp.utils.checkpoint_steps(ckpt_dir) if ckpt_dir.exists() else []
    latest = max(saved_steps) if saved_steps else None
    convert = False  # the latest step was saved in the other block layout (model.scan)
    if latest is not None:
        convert = _check_compatible(ckpt_dir, latest, abstract.params, config)
    elif config.get("init_from"):
        _check_init_from(config, abstract.params)
    if latest is not None and latest >= total_steps:
        logging.info("Already finished at step %d; nothing to do (checkpoints in %s).", latest, ckpt_dir)
        return _last_eval(workdir / "metrics.jsonl")
    _check_writable(workdir, "--workdir")
    primary = jax.process_index() == 0
    lock = cleanup.enter_context(WorkdirLock(workdir))  # WorkdirBusy when another trainer runs here
    if max(ocp.utils.checkpoint_steps(ckpt_dir) if ckpt_dir.exists() else [], default=None) != latest:
        raise WorkdirBusy(f"a trainer that just ended saved new checkpoints in {ckpt_dir}; rerun to resume from them.")
    stop = cleanup.enter_context(StopSignals())  # from here on SIGTERM/SIGINT stop after the current step

    # ---- mesh, sharding, jitted functions ------------------------------------
    mesh = make_mesh()
    shardings = state_sharding(mesh, abstract, config.fsdp)
    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    step_fn = jax.jit(
        functools.partial(train_step, model=model, tx=tx, config=config, num_classes=info.num_classes),
        in_shardings=(shardings, batch_sharding, replicated),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    eval_fn = jax.jit(functools.partial(eval_step, model=model), in_shardings=(shardings.params, batch_sharding))

    # ---- state: resume, fine-tune or fresh -------------------------------------
    if latest is not None:
        state = _restore_state(ckpt_dir, latest, abstract, shardings, config, convert)
        logging.info("Resumed from %s at step %d.", ckpt_dir, latest)
    else:
        state = jax.jit(init, out_shardings=shardings)(init_rng)
        if config.get("init_from"):
            params = _fine_tune_params(config, jax.device_get(state.params))
            # Inside jit, so the EMA gets its own buffers (the step donates both) and every leaf its sharding.
            create = functools.partial(create_state, tx=tx, use_ema=use_ema)
            state = jax.jit(create, out_shardings=shardings)(params)
    # Opened once the state is in hand, so a failed restore leaves the folder as it was (opening it deletes
    # the temporary folders of unfinished saves).
    mngr = ckpt.manager(ckpt_dir, keep=config.keep_checkpoints)
    start_step = int(state.step)

    # ---- writers (the first writes into the workdir) ------------------------------
    lock.started()
    writer = None
    if primary:
        if latest is not None:
            _drop_rows_after(workdir / "metrics.jsonl", start_step)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
        tensorboard = TensorBoardWriter(workdir, config.data.eval_split)
        tensorboard.write_config(config)
        writer = metric_writers.MultiWriter([tensorboard, JsonlWriter(workdir / "metrics.jsonl")])
    writer = writer or metric_writers.MultiWriter([])
    config_json = json.loads(config.to_json_best_effort())
    dataset_json = {"num_classes": info.num_classes, "class_names": list(info.class_names)}

    def evaluate_now(step: int) -> dict[str, float]:
        it = lambda: input_pipeline.create_eval_iterator(  # noqa: E731
            config, process_index=jax.process_index(), process_count=jax.process_count()
        )
        out = {f"eval_{k}": v for k, v in evaluate_params(eval_fn, state.params, it(), batch_sharding).items()}
        if use_ema:
            out |= {
                f"eval_ema_{k}": v for k, v in evaluate_params(eval_fn, state.ema_params, it(), batch_sharding).items()
            }
        writer.write_scalars(step, out)
        logging.info("eval step %d: %s", step, " | ".join(f"{k} {v:.4f}" for k, v in out.items()))
        return out

    def check_finite():
        bad = int(state.bad_step)
        if bad >= 0:
            kept = mngr.latest_step()
            where = "No checkpoint was written yet"
            if kept is not None:
                where = f"The last good checkpoint (step {kept}) is kept in {ckpt_dir}"
            raise FloatingPointError(
                f"The loss or gradient became NaN/Inf at step {bad}; training stopped and that update was not "
                f"applied. {where}. Lower base_lr, enable grad_clip_norm, or use compute_dtype='float32'."
            )

    def save(step: int, metrics: dict[str, float] | None):
        check_finite()
        args = ckpt.save_args(
            params=state.params,
            opt_state=state.opt_state,
            ema_params=state.ema_params,
            config=config_json,
            dataset=dataset_json,
        )
        best = None
        if metrics:  # ranks the step among the kept ones (the EMA's top-1 when on), also after a resume
            best = {ckpt.BEST_METRIC: metrics.get("eval_ema_top1", metrics["eval_top1"])}
        mngr.save(step, args=args, metrics=best)

    # ---- the loop --------------------------------------------------------------
    train_iter = input_pipeline.create_train_iterator(
        config, start_step=start_step, process_index=jax.process_index(), process_count=jax.process_count()
    )
    logging.info(
        "Training %s (%s params) for %d steps from step %d; %d images/step over %d devices.",
        config.model.name,
        f"{sum(x.size for x in jax.tree.leaves(abstract.params)):,}",
        total_steps,
        start_step,
        config.batch_size,
        jax.device_count(),
    )
    eval_metrics: dict[str, float] = {}
    pending: list[dict[str, jax.Array]] = []
    step_last = start_step

    def write_train_metrics(step: int):
        """The means since the last logged step, the lr and the throughput: to the writers and the log."""
        nonlocal t_last, step_last
        check_finite()
        means = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
        pending.clear()
        now = time.time()
        images_per_s = (step - step_last) * config.batch_size / (now - t_last)
        eta = (total_steps - step) * (now - t_start) / max(step - start_step, 1)
        means |= {"lr": float(schedule(step - 1)), "images_per_s": images_per_s}
        writer.write_scalars(step, means)
        logging.info(
            "step %d/%d | loss %.4f | lr %.3e | %.1f img/s | ETA %s",
            step, total_steps, means["loss"], means["lr"], images_per_s, _hms(eta),
        )  # fmt: skip
        t_last, step_last = now, step

    logging.info("Compiling the train step…")
    t_compile = time.time()
    step_fn = step_fn.lower(state, _batch_spec(config, batch_sharding), step_rng).compile()
    logging.info("compiled in %.1f s.", time.time() - t_compile)
    t_start = t_last = time.time()
    step = start_step
    trace = _ProfileTrace(config, workdir / "profile")
    with jax.set_mesh(mesh), _finish_writes(mngr, writer), trace:
        for step in range(start_step + 1, total_steps + 1):
            batch = to_global(next(train_iter), batch_sharding)
            trace.before(step)
            state, metrics = step_fn(state, batch, step_rng)
            trace.after(step, state)
            pending.append(metrics)
            last = step == total_steps
            if step % config.log_every_steps == 0 or last:
                write_train_metrics(step)
            if step % config.eval_every_steps == 0 or last:
                eval_metrics = evaluate_now(step)
            if step % config.checkpoint_every_steps == 0 or last:
                evaluated = step % config.eval_every_steps == 0 or last
                save(step, eval_metrics if evaluated else None)
            if stop.should_stop(step) and not last:
                if pending:
                    write_train_metrics(step)
                if step % config.checkpoint_every_steps:
                    save(step, None)
                break
    if stop.received and step < total_steps:
        message = (
            f"stopped by {stop.received} at step {step}; checkpoint saved in {ckpt_dir}; "
            "rerun the same command to resume."
        )
        logging.warning(message)
        raise Stopped(message)
    if eval_metrics:
        logging.info(
            "Done: held-out top-1 %.2f%% at step %d (%d examples). Checkpoints: %s; metrics: %s; "
            "TensorBoard: tensorboard --logdir=%s",
            100 * eval_metrics.get("eval_ema_top1", eval_metrics["eval_top1"]),
            total_steps,
            eval_metrics["eval_num_examples"],
            ckpt_dir,
            workdir / "metrics.jsonl",
            workdir,
        )
    return eval_metrics


# =============================================================================
# Eval-only: evaluate the latest (or a given) checkpoint of a run.
# =============================================================================
def evaluate(config, workdir: str, checkpoint: str | None = None, eval_dir: str | None = None) -> dict[str, float]:
    """Evaluates `checkpoint` (default: `workdir`'s latest) on config.data.eval_split; returns the metrics.

    The results get their own folder, ``<eval_dir>/<split>_step<N>/`` (default eval_dir: ``<workdir>/eval``):
    ``metrics.json`` (metrics.jsonl's keys) and TensorBoard events tagged ``<split>/top1``, ... They add no
    point to the training curves, and nothing else is written, so a read-only run can be evaluated with
    ``--eval_dir`` elsewhere.
    """
    import input_pipeline

    validate_config(config, num_devices=jax.device_count(), num_processes=jax.process_count())
    input_pipeline.validate_data_config(config, process_count=jax.process_count())
    info = input_pipeline.dataset_info(config)
    model = build_model(config, info.num_classes)
    directory, step = ckpt.locate(checkpoint or workdir)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, config.image_size, config.image_size, 3)), train=False)
    )["params"]
    convert = _check_compatible(directory, step, abstract, config)
    saved_layout = _other_layout(config, abstract) if convert else abstract
    split = config.data.eval_split
    out_dir = epath.Path(eval_dir or epath.Path(workdir) / "eval") / f"{split.replace('/', '_')}_step{step}"
    _check_writable(out_dir, "--eval_dir" if eval_dir else "--workdir")
    mesh = make_mesh()
    batch_sharding = NamedSharding(mesh, P("data"))
    eval_fn = jax.jit(functools.partial(eval_step, model=model))
    step_dir = directory / str(step)
    out = {}
    with jax.set_mesh(mesh):
        for item in ["params"] + (["ema_params"] if "ema_params" in ckpt.saved_items(step_dir) else []):
            params = ckpt.restore(step_dir, item, saved_layout, sharding=NamedSharding(mesh, P()))
            if convert:
                model_ = _layout_model(config, abstract)
                params = models.convert_params(params, model_, to_scan=model_.scan)
            it = input_pipeline.create_eval_iterator(
                config, process_index=jax.process_index(), process_count=jax.process_count()
            )
            prefix = "eval_ema_" if item == "ema_params" else "eval_"
            out |= {prefix + k: v for k, v in evaluate_params(eval_fn, params, it, batch_sharding).items()}
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        for old in out_dir.glob("events.out.tfevents.*"):  # an earlier eval of this step: replaced, not doubled
            old.unlink()
        record = {"step": step, "checkpoint": str(step_dir), "split": split, **out}
        (out_dir / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
        tensorboard = TensorBoardWriter(out_dir, split)
        tensorboard.write_scalars(step, out)
        tensorboard.close()
    logging.info(
        "eval of %s step %d on %r: %s. Results: %s",
        directory, step, split, " | ".join(f"{k} {v:.4f}" for k, v in out.items()), out_dir,
    )  # fmt: skip
    return out


# =============================================================================
# Small helpers.
# =============================================================================
class JsonlWriter:
    """A clu MetricWriter that appends ``{"step": s, name: value, ...}`` lines to a file."""

    def __init__(self, path: epath.Path):
        self._path = path

    def write_scalars(self, step: int, scalars) -> None:
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with self._path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def write_texts(self, step: int, texts) -> None:
        pass

    def write_hparams(self, hparams) -> None:
        pass

    def flush(self):
        pass

    def close(self):
        pass


class _ProfileTrace:
    """A `jax.profiler` trace of steps first .. first+num-1 of config.profile_steps = (first, num) into `logdir`.

    Open the trace with TensorBoard's profile plugin (``tensorboard --logdir=WORKDIR/profile``) or load
    ``WORKDIR/profile/plugins/profile/<run>/*.xplane.pb`` / ``*.trace.json.gz`` in Perfetto (README).
    """

    def __init__(self, config, logdir: epath.Path):
        self.first, self.num = tuple(config.get("profile_steps") or (0, 0))
        self.logdir, self.active = logdir, False

    def before(self, step: int) -> None:
        if self.num and step == self.first:
            jax.profiler.start_trace(str(self.logdir))
            self.active = True

    def after(self, step: int, state) -> None:
        if self.active and step == self.first + self.num - 1:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            logging.info(
                "Profiler trace of steps %d-%d written to %s.", self.first, self.first + self.num - 1, self.logdir
            )

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()  # a run that ends or stops inside the traced steps still writes what it traced


@contextlib.contextmanager
def _finish_writes(mngr, writer):
    """Completes the checkpoints and metrics already started, also when training stops with an error."""
    try:
        yield
    finally:
        mngr.wait_until_finished()
        writer.flush()


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _batch_spec(config, sharding) -> dict[str, jax.ShapeDtypeStruct]:
    """The global train batch as `create_train_iterator` yields it (per process), for compiling ahead of the loop."""
    shape = (config.batch_size, config.image_size, config.image_size, 3)
    return {
        "image": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding),
        "label": jax.ShapeDtypeStruct(shape[:1], jnp.int32, sharding=sharding),
    }


def _check_init_from(config, abstract_params) -> None:
    """`config.init_from` must hold a checkpoint whose parameters, less the head, fit this model (metadata only)."""
    try:
        directory, step = ckpt.locate(config.init_from)
        step_dir = directory / str(step)
        saved = ckpt.saved_shapes(step_dir, ckpt.params_item(step_dir, ema=config.init_from_ema))
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"config.init_from={config.init_from!r}: {e}") from None
    body = lambda shapes: {k: v for k, v in shapes.items() if not k.startswith("head/")}  # noqa: E731
    problems = ckpt.shape_mismatch(body(ckpt.flat_shapes(abstract_params)), body(saved))
    other = _other_layout(config, abstract_params) if problems else None  # saved with the other model.scan
    if other is not None and not ckpt.shape_mismatch(body(ckpt.flat_shapes(other)), body(saved)):
        problems = ""
    if problems:
        raise ValueError(
            f"config.init_from={config.init_from!r}: its parameters do not fit {config.model.name}:\n{problems}"
        )


def _last_eval(path: epath.Path) -> dict[str, float]:
    """The eval metrics of the last eval row of metrics.jsonl ({} when there is none)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    evals = [r for r in rows if "eval_top1" in r]
    return {k: v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else {}


class TensorBoardWriter:
    """TensorBoard events with tags grouped per split: ``train/loss``, ``train/lr``, ``<eval_split>/top1``,
    ``<eval_split>/ema_top1``, ...; the example count is text (once), not a curve. Takes metrics.jsonl's flat keys."""

    def __init__(self, logdir: epath.Path, eval_split: str):
        from clu import metric_writers

        self._writer = metric_writers.SummaryWriter(str(logdir))
        self._split = eval_split
        self._counted = False

    def write_scalars(self, step: int, scalars) -> None:
        named = {}
        for key, value in scalars.items():
            if not key.startswith("eval_"):
                named[f"train/{key}"] = value
            elif key.endswith("num_examples"):
                if not self._counted:
                    self._writer.write_texts(step, {f"{self._split}/num_examples": f"{int(value):,}"})
                    self._counted = True
            else:
                named[f"{self._split}/{key.removeprefix('eval_')}"] = value
        self._writer.write_scalars(step, named)

    def write_config(self, config) -> None:
        """The config as text (JSON) and its scalar fields as hparams (``model.name``, ``base_lr``, ...)."""
        self._writer.write_texts(0, {"config": "```\n" + config.to_json_best_effort(indent=2) + "\n```"})
        self._writer.write_hparams(_flat_scalars(config.to_dict()))

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


def _flat_scalars(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{'model.name': 's2mlp_tiny', 'base_lr': 0.002, ...}``: every leaf as bool, int, float or str."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _flat_scalars(value, name + ".")
        elif value is not None:
            flat[name] = value if isinstance(value, bool | int | float | str) else str(value)
    return flat


def _check_finite_floats(config, prefix: str = "config") -> None:
    """Every float field of `config` must be finite: ``--config.base_lr=inf`` is refused here."""
    for key, value in config.items():
        if isinstance(value, dict | ml_collections.ConfigDict):
            _check_finite_floats(value, f"{prefix}.{key}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{prefix}.{key}={value} must be a finite number.")


def _drop_rows_after(path: epath.Path, step: int) -> None:
    """Rewrites metrics.jsonl (atomically) without rows after `step`: after a resume each step appears once."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) < len(lines):
        tmp = path.parent / (path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)
        logging.info("Dropped %d rows after step %d from %s (trained again).", len(lines) - len(kept), step, path)


def _check_writable(path: epath.Path, flag: str) -> None:
    """`path` (or, when it does not exist yet, its nearest existing parent) must be a writable folder."""
    if "://" in str(path):  # a bucket: its permissions show only on the first write
        return
    existing = path
    while not os.path.exists(existing) and existing != existing.parent:
        existing = existing.parent
    if not os.path.isdir(existing):
        raise ValueError(f"{flag}={path}: {existing} is not a folder; choose another {flag}.")
    for p in [existing] + [existing / name for name in ("config.json", "metrics.jsonl", ckpt.CHECKPOINTS, LOCK_FILE)]:
        if os.path.exists(p) and not os.access(p, os.W_OK):
            raise ValueError(
                f"{flag}={path}: {p} is not writable (read-only file system or permissions); choose a writable "
                f"{flag}{' (or --eval_dir for --mode=eval)' if flag == '--workdir' else ''}."
            )


LOCK_FILE = ".lock"


class WorkdirLock:
    """An exclusive `fcntl.flock` on ``WORKDIR/.lock`` while a trainer runs in WORKDIR.

    Process 0 takes it (creating WORKDIR) and tells the other processes whether it got it. The file names
    its holder (pid, host, start time) and is emptied when the run ends; it is never deleted while in use
    (deleting a lock file races with the next taker). The kernel releases the lock when its process dies,
    so a killed run never blocks its resume. A run that fails before `started()` puts the file (and a
    workdir it created) back as they were. Workdirs on buckets (``gs://``) are not locked.
    """

    def __init__(self, workdir: epath.Path):
        self._path = workdir / LOCK_FILE
        self._fd: int | None = None
        self._started = False
        self._undo: list[Any] = []  # what __exit__ does when the run failed before it started

    def __enter__(self) -> WorkdirLock:
        from jax.experimental import multihost_utils

        error = ""
        if jax.process_index() == 0 and "://" not in str(self._path):
            error = self._take()
        elif jax.process_index() == 0:
            logging.warning("%s is not a local path: it is not locked against a second trainer.", self._path.parent)
        if jax.process_count() > 1:
            busy = multihost_utils.broadcast_one_to_all(np.int32(bool(error)))
            error = error or (f"process 0 found --workdir={self._path.parent} in use by another trainer." * int(busy))
        if error:
            self.__exit__()
            raise WorkdirBusy(error)
        return self

    def _take(self) -> str:
        """Locks the file and writes the holder into it; '' when done, else why not."""
        workdir = self._path.parent
        if not workdir.exists():
            workdir.mkdir(parents=True)
            self._undo.append(lambda: os.rmdir(workdir) if not os.listdir(workdir) else None)
        existed = self._path.exists()
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "holder not recorded"
            os.close(fd)
            return (
                f"--workdir={workdir} is in use by another trainer ({holder}). Wait for it to end "
                "(or stop it: SIGTERM saves a checkpoint), or choose another --workdir. Nothing was changed."
            )
        self._fd = fd
        if existed:
            st, content = os.fstat(fd), os.pread(fd, 1 << 16, 0)
            self._undo.insert(0, lambda: self._write(content, times=(st.st_atime_ns, st.st_mtime_ns)))
        else:
            self._undo.insert(0, lambda: os.unlink(self._path))
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        self._write(f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode())
        return ""

    def _write(self, content: bytes, times: tuple[int, int] | None = None) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, content, 0)
        if times:
            os.utime(self._fd, ns=times)

    def started(self) -> None:
        """The run passed every check and writes into the workdir from here on: no undo on failure."""
        self._started = True

    def __exit__(self, *exc) -> None:
        if self._fd is not None and self._started:
            os.ftruncate(self._fd, 0)
        for undo in [] if self._started else self._undo:
            undo()
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None
        self._undo.clear()


class Stopped(Exception):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint; main.py exits with EXIT_STOPPED."""


class StopSignals:
    """SIGTERM and SIGINT ask the train loop to stop after the current step (it saves a checkpoint there).

    A second signal ends the process at once (the first restores the default handlers, so the shell sees
    128 + signum). One process: the handler sets a flag that the loop reads after every step. Several
    processes must stop at the same step: there SIGTERM is left to JAX's preemption service
    (`jax.distributed.initialize` starts it; it catches SIGTERM on any process) and the loop asks
    `multihost_utils.reached_preemption_sync_point(step)` after every step, which turns True on every
    process at the same step. SIGINT keeps Python's default there (stop at once; rerunning resumes from
    the last periodic checkpoint).
    """

    def __init__(self):
        from jax._src import distributed  # whether jax.distributed started the preemption service

        self.received: str | None = None
        manager = getattr(getattr(distributed, "global_state", None), "preemption_sync_manager", None)
        self._synced = jax.process_count() > 1 and manager is not None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        for other in self._previous:
            signal.signal(other, signal.SIG_DFL)  # the next one ends the process, even inside a long XLA call
        logging.warning("%s received: stopping after the current step (a second signal ends at once).", self.received)

    def should_stop(self, step: int) -> bool:
        if self._synced:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.received = self.received or "SIGTERM"
        return self.received is not None

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
