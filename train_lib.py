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
import functools
import json
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
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


# =============================================================================
# Restore: resume from the workdir, or start from another run's weights.
# =============================================================================
def _check_compatible(directory, step: int, abstract_params, config) -> None:
    """The saved parameters must have exactly the shapes this config builds."""
    step_dir = directory / str(step)
    problems = ckpt.shape_mismatch(ckpt.flat_shapes(abstract_params), ckpt.saved_shapes(step_dir))
    if problems:
        saved = (ckpt.read_json(step_dir, "config") or {}).get("model", {})
        raise ValueError(
            f"{directory} holds a checkpoint (step {step}) of model {saved.get('name')!r} "
            f"(overrides {saved.get('overrides') or {}}), whose parameters do not fit "
            f"config.model.name={config.model.name!r}:\n"
            f"{problems}\nNothing was changed in the workdir. Use a new --workdir, or fine-tune from this run "
            "with --config.init_from=<that workdir> (a new head is created)."
        )


def _fine_tune_params(config, fresh_params):
    """`config.init_from`'s (EMA) parameters with this config's freshly initialised head."""
    directory, step = ckpt.locate(config.init_from)
    step_dir = directory / str(step)
    loaded = ckpt.restore(step_dir, ckpt.params_item(step_dir, ema=config.init_from_ema))
    loaded = jax.tree.map(np.asarray, dict(loaded))
    loaded["head"] = fresh_params["head"]
    problems = ckpt.shape_mismatch(ckpt.flat_shapes(fresh_params), ckpt.flat_shapes(loaded))
    if problems:
        raise ValueError(
            f"config.init_from={config.init_from!r}: its parameters do not fit {config.model.name}:\n{problems}"
        )
    logging.info("Fine-tuning from %s step %d (new head).", directory, step)
    return loaded


# =============================================================================
# Train loop.
# =============================================================================
def train_and_evaluate(config, workdir: str) -> dict[str, float]:
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the last eval metrics."""
    from clu import metric_writers

    import input_pipeline  # TensorFlow lives behind this import.

    # ---- checks, before any compilation --------------------------------------
    validate_config(config, num_devices=jax.device_count(), num_processes=jax.process_count())
    input_pipeline.validate_data_config(config, process_count=jax.process_count())
    info = input_pipeline.dataset_info(config)
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
    if latest is not None:
        _check_compatible(ckpt_dir, latest, abstract.params, config)

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
    mngr = ckpt.manager(ckpt_dir, keep=config.keep_checkpoints)
    if latest is not None:
        targets = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        items = {"params": targets.params, "opt_state": targets.opt_state}
        if use_ema:
            items["ema_params"] = targets.ema_params
        restored = mngr.restore(
            latest, args=ocp.args.Composite(**{k: ocp.args.StandardRestore(v) for k, v in items.items()})
        )
        state = abstract.replace(
            step=jax.device_put(jnp.asarray(latest, jnp.int32), replicated),
            params=restored["params"],
            opt_state=restored["opt_state"],
            ema_params=restored["ema_params"] if use_ema else None,
            bad_step=jax.device_put(jnp.asarray(-1, jnp.int32), replicated),
        )
        logging.info("Resumed from %s at step %d.", ckpt_dir, latest)
    else:
        state = jax.jit(init, out_shardings=shardings)(init_rng)
        if config.get("init_from"):
            params = _fine_tune_params(config, jax.device_get(state.params))
            # Inside jit, so the EMA gets its own buffers (the step donates both) and every leaf its sharding.
            create = functools.partial(create_state, tx=tx, use_ema=use_ema)
            state = jax.jit(create, out_shardings=shardings)(params)
    start_step = int(state.step)

    # ---- writers -----------------------------------------------------------------
    primary = jax.process_index() == 0
    writer = metric_writers.MultiWriter(
        [metric_writers.create_default_writer(str(workdir), just_logging=not primary, asynchronous=False)]
        + ([JsonlWriter(workdir / "metrics.jsonl")] if primary else [])
    )
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
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
            raise FloatingPointError(
                f"The loss or gradient became NaN/Inf at step {bad}; training stopped and that update was not "
                f"applied. The last good checkpoint (step {kept}) is kept in {ckpt_dir}. Lower base_lr, enable "
                "grad_clip_norm, or use compute_dtype='float32'."
            )

    def save(step: int, metrics: dict[str, float] | None):
        check_finite()
        items = {"params": state.params, "opt_state": state.opt_state}
        if use_ema:
            items["ema_params"] = state.ema_params
        args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
        args |= {"config": ocp.args.JsonSave(config_json), "dataset": ocp.args.JsonSave(dataset_json)}
        best = None
        if metrics:
            best = {ckpt.BEST_METRIC: metrics.get("eval_ema_top1", metrics["eval_top1"])}
        mngr.save(step, args=ocp.args.Composite(**args), metrics=best)

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
    t_last, step_last, t_start = time.time(), start_step, time.time()
    with jax.set_mesh(mesh), _finish_writes(mngr, writer):
        for step in range(start_step + 1, total_steps + 1):
            batch = to_global(next(train_iter), batch_sharding)
            state, metrics = step_fn(state, batch, step_rng)
            pending.append(metrics)
            last = step == total_steps
            if step % config.log_every_steps == 0 or last:
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
            if step % config.eval_every_steps == 0 or last:
                eval_metrics = evaluate_now(step)
            if step % config.checkpoint_every_steps == 0 or last:
                evaluated = step % config.eval_every_steps == 0 or last
                save(step, eval_metrics if evaluated else None)
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
def evaluate(config, workdir: str, checkpoint: str | None = None) -> dict[str, float]:
    """Evaluates `checkpoint` (default: `workdir`'s latest) on config.data.eval_split; writes the metrics."""
    from clu import metric_writers

    import input_pipeline

    validate_config(config, num_devices=jax.device_count(), num_processes=jax.process_count())
    input_pipeline.validate_data_config(config, process_count=jax.process_count())
    info = input_pipeline.dataset_info(config)
    model = build_model(config, info.num_classes)
    directory, step = ckpt.locate(checkpoint or workdir)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, config.image_size, config.image_size, 3)), train=False)
    )["params"]
    _check_compatible(directory, step, abstract, config)
    mesh = make_mesh()
    batch_sharding = NamedSharding(mesh, P("data"))
    eval_fn = jax.jit(functools.partial(eval_step, model=model))
    writer = metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() > 0)
    step_dir = directory / str(step)
    out = {}
    with jax.set_mesh(mesh):
        for item in ["params"] + (["ema_params"] if "ema_params" in ckpt.saved_items(step_dir) else []):
            params = ckpt.restore(step_dir, item, abstract, sharding=NamedSharding(mesh, P()))
            it = input_pipeline.create_eval_iterator(
                config, process_index=jax.process_index(), process_count=jax.process_count()
            )
            prefix = "eval_ema_" if item == "ema_params" else "eval_"
            out |= {prefix + k: v for k, v in evaluate_params(eval_fn, params, it, batch_sharding).items()}
    writer.write_scalars(step, out)
    writer.flush()
    logging.info("eval of %s step %d: %s", directory, step, out)
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

    def flush(self):
        pass

    def close(self):
        pass


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
