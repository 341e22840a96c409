"""Training and evaluation of S²-MLP, S²-MLPv2 and Mixer, top to bottom: the train state · mesh and sharding · the
train step · the trainer (`setup`: what training, `evaluate`, the benchmarks and the tests all compile) · the train
loop · eval-only.

One jitted train step runs over a 1-D device mesh ``('data',)``: the global batch is sharded over 'data', parameters
are replicated (or FSDP-sharded over 'data' with ``config.fsdp``). Multi-host runs feed each process's share of the
batch through `jax.make_array_from_process_local_data`.

Importing this module needs no TensorFlow (the input pipeline is imported inside `train_and_evaluate`/`evaluate`), so
the train step and the benchmarks run without it. The config arrives checked (`configs/overrides.py`; the recipe's
fields and checks are `s2mlp/recipe.py`'s). Around the trainer: the workdir's lock, metric writers, stop signals and
progress in `s2mlp/runs.py`; the train state on disk (save, resume, fine-tune, block-layout conversion) in
`s2mlp/checkpoint.py`; eval steps, metrics and per-class results in `s2mlp/evals.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from collections.abc import Callable, Iterable
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

from s2mlp import augment, evals, models, report, runs
from s2mlp import checkpoint as ckpt
from s2mlp.mixup import mix_batch, smooth_labels
from s2mlp.recipe import (
    OptimizerOptions,
    StepOptions,
    learning_rate_schedule,
    make_optimizer,
    stream_positions,
    validate_config,
)
from s2mlp.runs import EXIT_STOPPED, Stopped, WorkdirBusy  # noqa: F401 - main.py reads them here

jax.config.update("jax_threefry_partitionable", True)  # random bits independent of the sharding

# Errors whose message says what is wrong and how to fix it: main.py prints them without a traceback.
CLEAR_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, WorkdirBusy, ckpt.SaveFailed)


# ---- the train state ---------------------------------------------------------------------------------------------
@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any  # None when the EMA is off
    bad_step: jax.Array  # first step (1-based, as logged) whose loss, gradient or update was not finite; -1 if none


def create_state(params, tx: optax.GradientTransformation, use_ema: bool) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=params if use_ema else None,
        bad_step=jnp.full((), -1, jnp.int32),
    )


# ---- mesh and sharding -------------------------------------------------------------------------------------------
def make_mesh(devices=None) -> jax.sharding.Mesh:
    """`devices` (default: all devices of all processes) on one 'data' axis."""
    devices = list(devices or jax.devices())
    return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


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


# ---- the train step (the eval steps are in s2mlp/evals.py) -------------------------------------------------------
def train_step(state: TrainState, batch, rng, *, model, tx, options: StepOptions, batch_sharding=None):
    """One update on the global batch {'image': (B, H, W, 3), 'label': (B,)}.

    Rows are taken in the stream's order (`stream_positions`: repeated augmentation on several processes
    interleaves them), so each example gets the same draws whatever the device or process count: the chain's
    device ops (`options.device_ops`, uint8 images in) with per-example keys of (seed, step, position); label
    smoothing over `model.num_classes`, Mixup/CutMix on the whole batch, then `grad_accum_steps` micro-batches
    whose gradients are averaged. A non-finite loss, gradient or updated parameter leaves the state unchanged and
    records the step in `bad_step`. `batch_sharding` (`setup` passes it) keeps the reordered batch sharded.
    """
    rng = jax.random.fold_in(rng, state.step)
    mix_rng, drop_rng = jax.random.split(rng)
    if options.interleaved_processes > 1:
        # Rows into the stream's order (one exchange between devices), so every per-row draw below (device ops,
        # Mixup's partner, DropPath, micro-batches) takes an example as one process would, whatever the count.
        # The gather would leave the batch replicated (every device computing all of it): shard it again.
        order = jnp.argsort(stream_positions(batch["label"].shape[0], options.interleaved_processes))
        batch = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x[order], batch_sharding), batch)
    images = batch["image"]
    if options.device_ops:  # a stream of its own: the other streams stay as without device ops
        positions = jnp.arange(images.shape[0])  # stream positions: the rows, now in the stream's order
        images = augment.apply(options.device_ops, images, jax.random.fold_in(rng, 1), options.normalization, positions)
    targets = smooth_labels(batch["label"], model.num_classes, options.label_smoothing)
    images, targets = mix_batch(
        mix_rng, images, targets, mixup=options.mixup, cutmix=options.cutmix, switch_prob=options.mix_switch_prob
    )

    def loss_fn(params, images, targets, rng):
        logits = model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
        return optax.softmax_cross_entropy(logits, targets).mean()

    grad_fn = jax.value_and_grad(loss_fn)
    accum = options.grad_accum_steps
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
        d = options.ema_decay
        ema_params = keep_if_bad(jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema_params, params), ema_params)
    new_state = state.replace(
        step=state.step + 1,
        params=keep_if_bad(params, state.params),
        opt_state=keep_if_bad(opt_state, state.opt_state),
        ema_params=ema_params,
        bad_step=jnp.where((state.bad_step < 0) & ~finite, state.step + 1, state.bad_step),
    )
    return new_state, {"loss": loss, "grad_norm": grad_norm}


# ---- the trainer: compiled the same way for training, eval-only runs, the benchmarks and the tests ---------------
@dataclasses.dataclass(frozen=True)
class Trainer:
    """The jitted functions of one model and recipe on one mesh, and the state's shapes and shardings.

    ``init(rng)`` and ``create(params)`` return a sharded `TrainState`; ``train_step(state, batch, rng)`` donates
    `state`; ``eval_step(params, batch)`` returns sums. Nothing is compiled until first called (or lowered).
    """

    model: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: jax.sharding.Mesh
    abstract: TrainState  # shapes and dtypes only
    shardings: TrainState
    batch_sharding: NamedSharding
    init: Callable
    create: Callable
    train_step: Callable
    eval_step: Callable
    multi_label_eval_step: Callable
    image_dtype: Any = jnp.float32  # of the train batches: uint8 when the chain has device ops

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def targets(self) -> TrainState:
        """The abstract state with each leaf's sharding: where a restore puts it."""
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract, self.shardings
        )

    def to_global(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return to_global(batch, self.batch_sharding)

    def batch_spec(self, batch_size: int, image_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The global train batch's shapes, for compiling the train step before the first batch arrives."""
        shape = (batch_size, image_size, image_size, 3)
        return {
            "image": jax.ShapeDtypeStruct(shape, self.image_dtype, sharding=self.batch_sharding),
            "label": jax.ShapeDtypeStruct(shape[:1], jnp.int32, sharding=self.batch_sharding),
        }

    def eval_sums(self, params, batches: Iterable[dict[str, np.ndarray]], *, multi_label: bool = False):
        """`eval_step`'s sums (`multi_label_eval_step`'s with `multi_label`) over one pass of `batches`, on the host;
        every real (mask 1) example counted once."""
        step = self.multi_label_eval_step if multi_label else self.eval_step
        sums = None
        for batch in batches:
            out = step(params, self.to_global(batch))
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        return jax.device_get(sums)

    def evaluate(
        self, params, batches: Iterable[dict[str, np.ndarray]], *, multi_label: bool = False
    ) -> dict[str, float]:
        """Top-1, top-5, loss and num_examples over one pass of `batches` (`eval_metrics`)."""
        return evals.eval_metrics(self.eval_sums(params, batches, multi_label=multi_label))


def setup(
    model,
    *,
    image_size: int,
    optimizer: OptimizerOptions,
    options: StepOptions,
    steps_per_epoch: int,
    total_steps: int,
    mesh: jax.sharding.Mesh | None = None,
    fsdp: bool = False,
) -> Trainer:
    """The `Trainer` of `model` (`models.from_config`, `models.get_model`) and a recipe; default mesh: all devices."""
    mesh = mesh or make_mesh()
    schedule = learning_rate_schedule(optimizer, steps_per_epoch, total_steps)
    tx = make_optimizer(optimizer, schedule)
    create = functools.partial(create_state, tx=tx, use_ema=options.ema_decay > 0)

    def init(rng):
        return create(model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)["params"])

    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = state_sharding(mesh, abstract, fsdp)
    batch_sharding, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    step = functools.partial(train_step, model=model, tx=tx, options=options, batch_sharding=batch_sharding)
    jit_eval = functools.partial(jax.jit, in_shardings=(shardings.params, batch_sharding))
    return Trainer(
        model=model,
        tx=tx,
        schedule=schedule,
        mesh=mesh,
        abstract=abstract,
        shardings=shardings,
        batch_sharding=batch_sharding,
        init=jax.jit(init, out_shardings=shardings),
        # Inside jit, so the EMA gets its own buffers (the step donates both) and every leaf its sharding.
        create=jax.jit(create, out_shardings=shardings),
        train_step=jax.jit(
            step,
            in_shardings=(shardings, batch_sharding, replicated),
            out_shardings=(shardings, replicated),
            donate_argnums=0,
        ),
        eval_step=jit_eval(functools.partial(evals.eval_step, model=model)),
        multi_label_eval_step=jit_eval(functools.partial(evals.multi_label_eval_step, model=model)),
        image_dtype=jnp.uint8 if options.device_ops else jnp.float32,
    )


def setup_from_config(config, num_classes: int, *, steps_per_epoch: int = 1, total_steps: int = 1, mesh=None):
    """`setup` with the model and recipe of `config` (the schedule's length matters only for training)."""
    return setup(
        models.from_config(config, num_classes),
        image_size=config.image_size,
        optimizer=OptimizerOptions.from_config(config),
        options=StepOptions.from_config(config),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        mesh=mesh,
        fsdp=config.fsdp,
    )


# ---- train loop --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Run:
    """What the train loop reads and never reassigns; built by `_prepare`."""

    config: Any
    workdir: epath.Path
    data: Any  # input_pipeline.Data
    trainer: Trainer
    total_steps: int
    step_rng: jax.Array
    mngr: ocp.CheckpointManager
    writer: Any  # a clu MetricWriter (process 0 writes metrics.jsonl and TensorBoard events; others nothing)
    stop: runs.StopSignals
    saved_config: dict  # the JSON items saved with every checkpoint
    saved_dataset: dict
    evals: list[tuple[evals.EvalSpec, Any]]  # (spec, data): the main eval first, then config.evals
    best: evals.EvalSpec  # the eval whose top-1 ranks the best checkpoint (config.best_eval)

    @property
    def ckpt_dir(self) -> epath.Path:
        return self.workdir / ckpt.CHECKPOINTS


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the last eval metrics. Every check
    runs before anything is compiled or written into `workdir`. Raises `WorkdirBusy` when another trainer holds the
    workdir, and `Stopped` when SIGTERM/SIGINT stopped training (after a checkpoint)."""
    workdir = ckpt.absolute(workdir)  # relative, ~, trailing '/': resolved once, here
    with contextlib.ExitStack() as cleanup:  # the workdir lock and the signal handlers, released on any exit
        prepared = _prepare(config, workdir, cleanup)
        if prepared is None:
            return runs.last_eval(workdir / runs.METRICS_FILE)
        return _train(*prepared)


def _checked_data(config) -> tuple[Any, list[tuple[evals.EvalSpec, Any]]]:
    """Checks `config` (the recipe, model and evals, then the data), then opens its data: (the run's
    `input_pipeline.Data`, each eval's (spec, data) with the main eval first)."""
    import input_pipeline  # TensorFlow lives behind this import.

    validate_config(config, num_devices=jax.device_count())
    index, count = jax.process_index(), jax.process_count()
    data = input_pipeline.build(config, process_index=index, process_count=count)
    return data, input_pipeline.build_evals(config, data, evals.from_config(config), index, count)


def _prepare(config, workdir: epath.Path, cleanup: contextlib.ExitStack) -> tuple[_Run, TrainState] | None:
    """Checks, data, trainer, the state (resumed, fine-tuned or fresh) and the writers; None when already done."""
    logging.info("Workdir: %s", workdir)
    data, eval_sets = _checked_data(config)
    info = data.info
    logging.info(
        "Dataset %s: train split %r %s images, eval split %r %s images, %d classes.",
        config.data.name, config.data.train_split, f"{info.num_train:,}", config.data.eval_split,
        f"{info.num_eval:,}", info.num_classes,
    )  # fmt: skip
    steps_per_epoch = max(info.num_train // config.batch_size, 1)
    total_steps = config.total_steps or config.num_epochs * steps_per_epoch
    trainer = setup_from_config(config, info.num_classes, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    ckpt_dir = workdir / ckpt.CHECKPOINTS
    config_json = json.loads(config.to_json_best_effort())  # as every checkpoint saves it
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    latest = ckpt.latest_step(ckpt_dir)
    convert, config_at_latest = False, None  # convert: the latest step was saved in the other block layout
    if latest is not None:
        convert, config_at_latest = _check_checkpoint(ckpt_dir, latest, trainer, config, info, RESUME_ADVICE)
    elif config.get("init_from"):
        ckpt.check_init_from(config.init_from, config.init_from_ema, trainer.model, trainer.abstract.params,
                             config.model.name)  # fmt: skip
    if latest is not None and latest >= total_steps:
        logging.info("Already finished at step %d; nothing to do (checkpoints in %s).", latest, ckpt_dir)
        return None
    runs.check_writable(workdir, "--workdir")
    lock = cleanup.enter_context(runs.WorkdirLock(workdir))  # WorkdirBusy when another trainer runs here
    if ckpt.latest_step(ckpt_dir) != latest:
        raise WorkdirBusy(f"a trainer that just ended saved new checkpoints in {ckpt_dir}; rerun to resume from them.")
    stop = cleanup.enter_context(runs.StopSignals())  # from here on SIGTERM/SIGINT stop after the current step

    if latest is not None:
        state = ckpt.restore_train_state(
            ckpt_dir, latest, trainer, ema_decay=config.ema_decay, grad_clip_norm=config.grad_clip_norm, convert=convert
        )
        logging.info("Resumed from %s at step %d.", ckpt_dir, latest)
        if changed := report.config_changes(config_at_latest or {}, config_json):
            logging.warning(
                "Resuming with a changed config: %s. From here on the run trains with the new values; config.json "
                "will hold them, and each checkpoint keeps the config it was trained with.",
                "; ".join(changed),
            )
    else:
        state = trainer.init(init_rng)
        if config.get("init_from"):
            # Replicated first: FSDP-sharded parameters of several processes are not all addressable here.
            fresh = jax.device_get(jax.jit(lambda p: p, out_shardings=trainer.replicated)(state.params))
            state = trainer.create(
                ckpt.fine_tune_params(config.init_from, config.init_from_ema, trainer.model, fresh, config.model.name)
            )
    # Opened once the state is in hand, so a failed restore leaves the folder as it was (opening it deletes
    # the temporary folders of unfinished saves).
    mngr = ckpt.manager(ckpt_dir, keep=config.keep_checkpoints)

    lock.started()  # the first writes into the workdir follow
    run = _Run(
        config=config,
        workdir=workdir,
        data=data,
        trainer=trainer,
        total_steps=total_steps,
        step_rng=step_rng,
        mngr=mngr,
        writer=runs.run_writers(workdir, config, [s.name for s, _ in eval_sets[1:]], resumed_at=latest or 0),
        stop=stop,
        saved_config=config_json,
        saved_dataset={"num_classes": info.num_classes, "class_names": list(info.class_names)},
        evals=eval_sets,
        best=evals.best_spec([spec for spec, _ in eval_sets], config.get("best_eval") or ""),
    )
    return run, state


RESUME_ADVICE = (
    "Nothing was changed in the workdir. Resume with the run's settings (its config.json), or train the new one "
    "in a new --workdir (--config.init_from=<this workdir> starts it from these weights)."
)
EVAL_ADVICE = "--mode=eval builds the model from the command line's config: evaluate with the run's settings."


def _check_checkpoint(directory: epath.Path, step: int, trainer: Trainer, config, info, advice: str):
    """ValueError ending in `advice` when step `step` of `directory` was trained on other classes (or another
    order of them) than `info` (the config's data) gives, as a model whose parameters do not fit `trainer`'s, or
    as another model function with the same parameters (e.g. another shift pattern or input normalisation).
    Returns (whether the step was saved in the other block layout (model.scan), so the restore converts it; the
    config saved with it, None when it has none)."""
    step_dir = directory / str(step)
    ckpt.check_same_classes(step_dir, info.class_names, advice)
    convert = ckpt.check_compatible(directory, step, trainer.model, trainer.abstract.params, config.model.name)
    saved = ckpt.read_json(step_dir, ckpt.CONFIG)
    changed = models.function_changes(saved, trainer.model, config.model.name, info.num_classes)
    if changed is None:  # no config item, or one this version cannot build: shapes only
        return convert, saved
    normalization = saved.get("data", {}).get("normalization", config.data.normalization)
    if normalization != config.data.normalization:
        changed.append(f"data.normalization: {normalization!r} -> {config.data.normalization!r}")
    if changed:
        raise ValueError(f"{step_dir} was trained as another model (config.{'; config.'.join(changed)}). {advice}")
    return convert, saved


def _train(run: _Run, state: TrainState) -> dict[str, float]:
    """Steps from `state.step` to `run.total_steps`, with metrics, evals and checkpoints on their schedules."""
    config, trainer, start_step = run.config, run.trainer, int(state.step)
    train_iter = run.data.train_iterator(start_step)
    changed = models.changed_fields(trainer.model, config.model.name)
    logging.info(
        "Training %s (%s%s params) for %d steps from step %d; %d images/step over %d devices.",
        config.model.name, "".join(f"{k}={v!r}, " for k, v in changed.items()),
        f"{sum(x.size for x in jax.tree.leaves(trainer.abstract.params)):,}", run.total_steps, start_step,
        config.batch_size, jax.device_count(),
    )  # fmt: skip
    logging.info("Compiling the train step…")
    t_compile = time.time()
    batch_spec = trainer.batch_spec(config.batch_size, config.image_size)
    step_fn = trainer.train_step.lower(state, batch_spec, run.step_rng).compile()
    logging.info("compiled in %.1f s.", time.time() - t_compile)
    meter = runs.Throughput(start_step, run.total_steps, config.batch_size)
    eval_metrics: dict[str, float] = {}
    confusion = None  # of the main eval at the last evaluated step
    pending: list[dict[str, jax.Array]] = []  # train metrics of the steps since the last logged one
    step = saved = start_step  # saved: the step of the latest save started (Orbax completes it in the background)
    trace = runs.ProfileTrace(config.get("profile_steps"), run.workdir / "profile")
    try:  # the metrics and the checkpoint already started are completed, also when training stops with an error
        with jax.set_mesh(trainer.mesh), trace:
            for step in range(start_step + 1, run.total_steps + 1):
                batch = trainer.to_global(next(train_iter))
                trace.before(step)
                state, metrics = step_fn(state, batch, run.step_rng)
                trace.after(step, state)
                with ckpt.save_errors(run.ckpt_dir, saved):  # a failed background save stops the run at once
                    run.mngr.check_for_errors()
                pending.append(metrics)
                # Two steps in flight at most: unchecked, the loop runs ahead of the device (up to log_every_steps
                # steps), and a stop signal would wait for all of them before the checkpoint.
                if len(pending) > 1:
                    pending[-2]["loss"].block_until_ready()
                last = step == run.total_steps
                checkpoint = step % config.checkpoint_every_steps == 0 or last
                # A row at each checkpoint too: a run resumed from it writes the rows an uninterrupted run writes.
                if step % config.log_every_steps == 0 or checkpoint:
                    _write_train_metrics(run, state, step, pending, meter)
                evaluated = step % config.eval_every_steps == 0 or last
                if evaluated:
                    # The parameters' and their EMA's: eval_*, eval_ema_*, eval_NAME_*, eval_NAME_ema_*.
                    items = [(k, p) for k, p in [("", state.params), ("ema_", state.ema_params)] if p is not None]
                    eval_metrics, confusion = evals.evaluate_sets(trainer.eval_sums, run.evals, items)
                    run.writer.write_scalars(step, eval_metrics)
                    logging.info("eval step %d: %s", step, " | ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
                if checkpoint:
                    saved = _save(run, state, step, eval_metrics if evaluated else None)
                if run.stop.should_stop(step) and not last:
                    if pending:
                        _write_train_metrics(run, state, step, pending, meter)
                    if not checkpoint:
                        saved = _save(run, state, step, eval_metrics if evaluated else None)
                    break
    finally:
        run.writer.flush()
        with ckpt.save_errors(run.ckpt_dir, saved):  # SaveFailed naming the step whose save did not complete
            run.mngr.wait_until_finished()
    if run.stop.received and step < run.total_steps:
        message = (
            f"stopped by {run.stop.received} at step {step}; checkpoint saved in {run.ckpt_dir}; "
            "rerun the same command to resume."
        )
        logging.warning(message)
        raise Stopped(message)
    if confusion is not None and jax.process_index() == 0:  # training finished (a stop raised above)
        item = ckpt.EMA_PARAMS if state.ema_params is not None else ckpt.PARAMS
        out_dir = evals.out_dir(run.workdir / "eval", config.data.eval_split, step)
        evals.write_per_class(out_dir, confusion, run.data.info.class_names, spec=run.evals[0][0], step=step, item=item)
    if eval_metrics:
        logging.info(
            "Done: held-out top-1 %.2f%% at step %d (%d examples). Checkpoints: %s; metrics: %s; "
            "TensorBoard: tensorboard --logdir=%s",
            100 * eval_metrics.get("eval_ema_top1", eval_metrics["eval_top1"]), run.total_steps,
            eval_metrics["eval_num_examples"], run.ckpt_dir, run.workdir / runs.METRICS_FILE, run.workdir,
        )  # fmt: skip
    return eval_metrics


def _write_train_metrics(run: _Run, state: TrainState, step: int, pending: list, meter: runs.Throughput) -> None:
    """The means of `pending` (then emptied), the lr and the throughput: to the writers and the log. First a
    FloatingPointError naming the first step whose loss or gradient was NaN/Inf, and the last good checkpoint (every
    save follows this write of its step, so no checkpoint holds a state after a bad step)."""
    if (bad := int(state.bad_step)) >= 0:
        kept = run.mngr.latest_step()
        where = "No checkpoint was written yet"
        if kept is not None:
            where = f"The last good checkpoint (step {kept}) is kept in {run.ckpt_dir}"
        raise FloatingPointError(
            f"The loss or gradient became NaN/Inf at step {bad}; training stopped and that update was not "
            f"applied. {where}. Lower base_lr, enable grad_clip_norm, or use compute_dtype='float32'."
        )
    means = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
    pending.clear()
    images_per_s, eta = meter.next(step)
    means |= {"lr": float(run.trainer.schedule(step - 1)), "images_per_s": images_per_s}
    run.writer.write_scalars(step, means)
    logging.info(
        "step %d/%d | loss %.4f | lr %.3e | %.1f img/s | ETA %s",
        step, run.total_steps, means["loss"], means["lr"], images_per_s, report.hms(eta),
    )  # fmt: skip


def _save(run: _Run, state: TrainState, step: int, metrics: dict[str, float] | None) -> int:
    """Checkpoints `state` (asynchronously); `metrics` rank the step among the kept ones: the top-1 of the eval
    named by config.best_eval (the main one by default), the EMA's when on. Returns `step`."""
    args = ckpt.save_args(state, config=run.saved_config, dataset=run.saved_dataset)
    prefix = run.best.prefix
    best = {ckpt.BEST_METRIC: metrics.get(f"{prefix}ema_top1", metrics[f"{prefix}top1"])} if metrics else None
    with ckpt.save_errors(run.ckpt_dir, step):
        run.mngr.save(step, args=args, metrics=best)
    return step


# ---- eval-only: the latest (or a given) checkpoint of a run ------------------------------------------------------
def evaluate(config, workdir: str, checkpoint: str | None = None, eval_dir: str | None = None) -> dict[str, float]:
    """Evaluates `checkpoint` (default: `workdir`'s latest) on config.data.eval_split and every eval of config.evals;
    returns the metrics (metrics.jsonl's keys).

    The results get their own folder, ``<eval_dir>/<split>_step<N>/`` (default eval_dir: ``<workdir>/eval``, or
    ``<workdir>/eval/<run>`` for a `checkpoint` of another run, named by its directory): ``metrics.json``,
    TensorBoard events tagged ``<split>/top1``, ``<eval name>/top1``, ... and the main eval's ``per_class.json``
    (+ ``confusion.png`` up to 100 classes; of the EMA when saved). They add no point to the training curves, and
    nothing else is written, so a read-only run can be evaluated with ``--eval_dir`` elsewhere.
    """
    workdir = ckpt.absolute(workdir)
    data, eval_sets = _checked_data(config)
    specs = [spec for spec, _ in eval_sets]
    trainer = setup_from_config(config, data.info.num_classes)
    directory, step = ckpt.locate(checkpoint or workdir)
    step_dir = directory / str(step)
    # Another run's checkpoint: its results in a folder of its own, not over this run's <split>_step<N>.
    other = directory.parent != workdir and directory != workdir
    results = ckpt.absolute(eval_dir) if eval_dir else workdir / "eval" / (directory.parent.name if other else "")
    convert, _ = _check_checkpoint(directory, step, trainer, config, data.info, EVAL_ADVICE)
    split = config.data.eval_split
    out_dir = evals.out_dir(results, split, step)
    runs.check_writable(out_dir, "--eval_dir" if eval_dir else "--workdir")
    runs.check_eval_dir(out_dir, step_dir)
    saved = ckpt.param_items(step_dir)  # the parameters, then their EMA when saved
    with jax.set_mesh(trainer.mesh):
        targets = dict.fromkeys(saved, trainer.targets.params)
        restored = ckpt.restore_items(step_dir, targets, trainer.model, convert, trainer.replicated)
        items = [("ema_" if item == ckpt.EMA_PARAMS else "", restored[item]) for item in saved]
        out, confusion = evals.evaluate_sets(trainer.eval_sums, eval_sets, items)
    if jax.process_index() == 0:
        described = {s.name: {"data": s.data, "split": s.split, **({"labels": s.labels} if s.labels else {})}
                     for s in specs}  # fmt: skip
        record = {"step": step, "checkpoint": str(step_dir), "split": split, "evals": described, **out}
        runs.write_eval_results(out_dir, record, out, split, [s.name for s in specs[1:]])
        evals.write_per_class(out_dir, confusion, data.info.class_names, spec=specs[0], step=step, item=saved[-1])
    logging.info(
        "eval of %s step %d on %s: %s. Results: %s",
        directory, step, ", ".join(repr(s.name) for s in specs), " | ".join(f"{k} {v:.4f}" for k, v in out.items()),
        out_dir,
    )  # fmt: skip
    return out
