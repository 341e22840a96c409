"""The training recipe: the checks of the trainer's config fields, and what the train step reads of them.

`validate_config` checks every field the trainer reads (and asks the model registry and `s2mlp.evals` to
check theirs) before anything is compiled or written; `configs/overrides.py:check` calls it, with the data
fields' checks, for main.py and study.py. Below it, the trainer reads typed options, not the ConfigDict:
`OptimizerOptions` (the schedule and AdamW) and `StepOptions` (label smoothing, Mixup/CutMix, accumulation,
EMA, device augmentation). Imports no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import optax

from s2mlp import augment_chain, evals, models


def validate_config(config, *, num_devices: int) -> None:
    """Checks the trainer's fields, the model's (`models.check_config`) and the evals' (`evals.from_config`);
    raises ValueError naming `config.<field>` and the fix. The data fields (and the batch's split over processes)
    are `input_pipeline.validate_data_config`'s; `configs/overrides.py:check` runs both."""

    def check(ok: bool, field: str, why: str):
        if not ok:
            value = functools.reduce(lambda node, key: node[key], field.split("."), config)  # "augment.mixup"
            raise ValueError(f"config.{field}={value!r} {why}.")

    _check_finite_floats(config)  # base_lr=inf, weight_decay=nan, ...
    check(config.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
    per_step = num_devices * config.grad_accum_steps
    check(
        config.batch_size > 0 and config.batch_size % per_step == 0,
        "batch_size",
        f"must be a positive multiple of devices ({num_devices}) × grad_accum_steps ({config.grad_accum_steps}) "
        f"= {per_step}; e.g. {max(per_step, config.batch_size // per_step * per_step)}",
    )
    check(
        config.eval_batch_size > 0 and config.eval_batch_size % num_devices == 0,
        "eval_batch_size",
        f"must be a positive multiple of the device count {num_devices}",
    )
    check(config.base_lr > 0, "base_lr", "must be positive")
    for field in ("min_lr", "weight_decay", "warmup_epochs"):
        check(config[field] >= 0, field, "must be >= 0")
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
    models.check_config(config)  # model name, overrides, rates, compute_dtype and image_size
    evals.from_config(config)  # config.evals (presets, names) and config.best_eval


def _check_finite_floats(config, prefix: str = "config") -> None:
    """Every float field of `config` must be finite: ``--config.base_lr=inf`` is refused here."""
    for key, value in config.items():
        if hasattr(value, "items"):  # a nested ConfigDict or dict
            _check_finite_floats(value, f"{prefix}.{key}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{prefix}.{key}={value} must be a finite number.")


@dataclasses.dataclass(frozen=True)
class OptimizerOptions:
    """The config fields the learning-rate schedule and the optimizer read."""

    batch_size: int
    base_lr: float
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    @classmethod
    def from_config(cls, config) -> OptimizerOptions:
        return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """The config fields `train_step` reads (``augment.*`` for the first four)."""

    label_smoothing: float = 0.0
    mixup: float = 0.0  # Beta alpha; 0 turns Mixup off
    cutmix: float = 0.0  # Beta alpha; 0 turns CutMix off
    mix_switch_prob: float = 0.5
    grad_accum_steps: int = 1
    ema_decay: float = 0.0  # 0 turns the EMA off
    device_ops: tuple[augment_chain.Op, ...] = ()  # config.augment.ops after 'to_device': the batch arrives uint8
    normalization: str = "imagenet"  # config.data.normalization, for a 'normalize' among device_ops
    # P when the train stream interleaves its positions over P processes (config.data.aug_repeats > 1), else 1:
    # `stream_positions` then keys the device ops by an example's position in the stream, not its row.
    interleaved_processes: int = 1

    @classmethod
    def from_config(cls, config) -> StepOptions:
        aug = config.augment
        return cls(
            **{name: aug[name] for name in ("label_smoothing", "mixup", "cutmix", "mix_switch_prob")},
            grad_accum_steps=config.grad_accum_steps,
            ema_decay=config.ema_decay,
            device_ops=augment_chain.parse(aug.ops).device,
            normalization=config.data.normalization,
            interleaved_processes=jax.process_count() if config.data.get("aug_repeats", 0) > 1 else 1,
        )


def stream_positions(batch_size: int, interleaved_processes: int) -> jax.Array:
    """The position in the global stream's batch of each row of the global batch.

    The repeated-augmentation stream deals position g to process g mod P (input_pipeline's
    `_repeated_train_dataset`), and the global batch concatenates the processes' shares, so row p·b + k (b =
    batch_size / P) holds position p + k·P; with P = 1 (or the plain stream) rows are positions.
    """
    rows = jax.numpy.arange(batch_size)
    b = batch_size // interleaved_processes
    return (rows % b) * interleaved_processes + rows // b


def learning_rate_schedule(options: OptimizerOptions, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then cosine to `min_lr`; peak lr = base_lr × batch_size / 1024."""
    peak = options.base_lr * options.batch_size / 1024
    warmup = int(options.warmup_epochs * steps_per_epoch + 1e-6)  # whole steps; 0.29 × 100 is 28.999999999999996
    warmup = min(warmup, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), options.min_lr)


def make_optimizer(options: OptimizerOptions, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW; weight decay on the kernels only, not on biases and norm scales.

    The mask goes by the leaf's name, not its rank: a scanned block stack (`scan=True`) gives each bias and scale a
    leading block axis, and must be decayed as the unrolled blocks are."""

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "kernel", params)

    adamw = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=options.weight_decay, mask=decay_mask)
    if options.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(options.grad_clip_norm), adamw)
    return adamw
