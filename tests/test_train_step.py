"""The train step, optimizer and config checks of train_lib, without the input pipeline."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import train_lib
from configs import common, tiny
from s2mlp import flops, models

NUM_CLASSES = 10


def _setup(config, devices, fsdp=False):
    config.fsdp = fsdp
    trainer = train_lib.setup_from_config(
        config, NUM_CLASSES, steps_per_epoch=10, total_steps=100, mesh=train_lib.make_mesh(devices)
    )
    return trainer.init(jax.random.key(0)), trainer.train_step, trainer.batch_sharding


def _batch(n, size, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(n, size, size, 3)).astype(np.float32),
        "label": rng.integers(0, NUM_CLASSES, size=n).astype(np.int32),
    }


def _run(config, devices, batches, fsdp=False):
    state, step, sharding = _setup(config, devices, fsdp)
    losses = []
    for b in batches:
        state, metrics = step(state, train_lib.to_global(b, sharding), jax.random.key(1))
        losses.append(float(metrics["loss"]))
    return jax.device_get(state), losses


def _assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("model,fsdp", [("s2mlp_tiny", False), ("s2mlpv2_tiny", True)])
def test_eight_devices_match_one_device(model, fsdp):
    """Mixup, CutMix, DropPath and EMA on: the sharded step computes the single-device step."""
    assert jax.device_count() == 8
    config = tiny.get_config(model)
    batches = [_batch(16, config.image_size, seed) for seed in range(3)]
    one, losses_one = _run(config, jax.devices()[:1], batches)
    eight, losses_eight = _run(config, jax.devices(), batches, fsdp=fsdp)
    np.testing.assert_allclose(losses_one, losses_eight, rtol=1e-5)
    _assert_trees_close(one.params, eight.params)
    _assert_trees_close(one.ema_params, eight.ema_params)
    assert int(eight.step) == 3


def test_repeated_augmentation_on_two_processes_takes_each_example_as_one_process_does():
    """With aug_repeats on P processes the global batch holds the 1-process batch's rows interleaved
    (`stream_positions`); DropPath, Mixup/CutMix and the micro-batches still treat each example as on 1 process."""
    config = tiny.get_config("s2mlp_tiny")
    config.grad_accum_steps = 2
    assert config.model.drop_path_rate > 0 and config.augment.mixup > 0 and config.augment.cutmix > 0
    batch = _batch(16, config.image_size)
    positions = np.asarray(train_lib.stream_positions(16, 2))
    results = []
    for processes, rows in ((1, np.arange(16)), (2, positions)):
        options = train_lib.StepOptions.from_config(config)
        options = dataclasses.replace(options, interleaved_processes=processes)
        trainer = train_lib.setup(
            models.from_config(config, NUM_CLASSES), image_size=config.image_size,
            optimizer=train_lib.OptimizerOptions.from_config(config), options=options, steps_per_epoch=10,
            total_steps=100, mesh=train_lib.make_mesh(jax.devices()[:4]),
        )  # fmt: skip
        state = trainer.init(jax.random.key(0))
        args = (state, trainer.to_global({k: v[rows] for k, v in batch.items()}), jax.random.key(1))
        device_flops = flops.cost_flops(trainer.train_step.lower(*args).compile().cost_analysis())
        _, metrics = trainer.train_step(*args)
        results.append((float(metrics["loss"]), float(metrics["grad_norm"]), device_flops))
    np.testing.assert_allclose(results[1][:2], results[0][:2], rtol=1e-5)
    # Each device still computes its quarter of the batch (the reordered batch is sharded again, not replicated).
    assert results[1][2] == pytest.approx(results[0][2], rel=0.02)


def test_fsdp_shards_parameters():
    config = tiny.get_config("s2mlp_tiny")
    state, _, _ = _setup(config, jax.devices(), fsdp=True)
    kernel = state.params["block_0"]["fc3"]["kernel"]  # (32, 64)
    assert kernel.sharding.spec == P(None, "data")
    assert state.params["block_0"]["fc3"]["bias"].sharding.spec == P()
    assert state.opt_state[0].mu["block_0"]["fc3"]["kernel"].sharding.spec == P(None, "data")


def test_two_micro_batches_equal_one_full_batch():
    config = tiny.get_config("s2mlp_tiny")
    config.model.drop_path_rate = 0.0  # DropPath draws per micro-batch; everything else is identical
    batches = [_batch(16, config.image_size, seed) for seed in range(2)]
    full, losses_full = _run(config, jax.devices()[:2], batches)
    config.grad_accum_steps = 2
    accum, losses_accum = _run(config, jax.devices()[:2], batches)
    np.testing.assert_allclose(losses_full, losses_accum, rtol=1e-5)
    _assert_trees_close(full.params, accum.params)


def test_non_finite_loss_skips_the_update_and_records_the_step():
    config = tiny.get_config("s2mlp_tiny")
    state, step, sharding = _setup(config, jax.devices()[:1])
    good = _batch(16, config.image_size)
    state, _ = step(state, train_lib.to_global(good, sharding), jax.random.key(1))
    before = jax.device_get(state.params)
    bad = dict(good, image=np.full_like(good["image"], np.nan))
    state, metrics = step(state, train_lib.to_global(bad, sharding), jax.random.key(1))
    assert not np.isfinite(float(metrics["loss"]))
    assert int(state.bad_step) == 2 and int(state.step) == 2  # the second step, as the loop logs it
    _assert_trees_close(before, jax.device_get(state.params), rtol=0, atol=0)
    state, _ = step(state, train_lib.to_global(good, sharding), jax.random.key(1))
    assert int(state.bad_step) == 2  # the first bad step is kept


def test_weight_decay_skips_biases_and_norm_scales():
    config = tiny.get_config("s2mlp_tiny")
    config.weight_decay = 0.5
    tx = train_lib.make_optimizer(train_lib.OptimizerOptions.from_config(config), lambda step: 1.0)
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "norm": {"scale": jnp.ones(2)}}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.5 * np.ones((2, 2)))
    np.testing.assert_array_equal(updates["dense"]["bias"], np.zeros(2))
    np.testing.assert_array_equal(updates["norm"]["scale"], np.zeros(2))


def test_learning_rate_schedule_warmup_then_cosine():
    config = common.get_config()
    config.batch_size, config.base_lr, config.min_lr, config.warmup_epochs = 512, 2e-3, 1e-5, 2
    options = train_lib.OptimizerOptions.from_config(config)
    schedule = train_lib.learning_rate_schedule(options, steps_per_epoch=10, total_steps=100)
    peak = 2e-3 * 512 / 1024
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(10)), peak / 2, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(20)), peak, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(60)), 1e-5 + (peak - 1e-5) * 0.5, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(100)), 1e-5, rtol=1e-5)
    config.warmup_epochs = 0.29  # 29 steps, though 0.29 * 10 * 10 is 28.999999999999996 in floating point
    schedule = train_lib.learning_rate_schedule(train_lib.OptimizerOptions.from_config(config), 100, 1000)
    np.testing.assert_allclose([float(schedule(28)), float(schedule(29))], [peak * 28 / 29, peak], rtol=1e-6)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("model.name", "resnet50", "config.model.name='resnet50' is unknown"),
        ("batch_size", 12, "config.batch_size=12 must be a positive multiple of devices (8)"),
        ("grad_accum_steps", 0, "config.grad_accum_steps=0 must be >= 1"),
        ("image_size", 30, "image_size=30 is not a positive multiple of 4"),
        ("base_lr", -1.0, "config.base_lr=-1.0 must be positive"),
        ("ema_decay", 1.5, "config.ema_decay=1.5 must be in [0, 1)"),
        ("augment.mixup", -0.2, "config.augment.mixup=-0.2 must be >= 0"),
        ("augment.label_smoothing", 1.0, "config.augment.label_smoothing=1.0 must be in [0, 1)"),
        ("model.drop_path_rate", -0.1, "drop_path_rate=-0.1 must be in [0, 1)"),
        ("model.overrides", {"hidden_dim": 30}, "hidden_dim=30 must be a positive multiple of 4"),
        ("model.overrides", {"widht": 3}, "['widht'] are not fields of s2mlp_tiny"),
    ],
)
def test_invalid_config_names_the_field(field, value, message):
    config = tiny.get_config("s2mlp_tiny")
    parent, _, leaf = field.rpartition(".")
    (config[parent] if parent else config)[leaf] = value
    if field == "batch_size":
        config.grad_accum_steps = 1
    with pytest.raises(ValueError) as e:
        train_lib.validate_config(config, num_devices=8)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "field,value,message",
    [
        (
            "compute_dtype",
            "fp8",
            "config.compute_dtype='fp8' is unknown; choose one of ['bfloat16', 'float16', 'float32']",
        ),
        (
            "model.overrides",
            {"num_classes": 7},
            "config.model.overrides.num_classes=7: num_classes is set by the dataset",
        ),
        ("model.overrides", {"dtype": "bfloat16"}, "dtype is set by config.compute_dtype; remove the override"),
        (
            "model.overrides",
            {"drop_path_rate": 0.2},
            "config.model.overrides.drop_path_rate=0.2: drop_path_rate is set by config.model.drop_path_rate",
        ),
    ],
)
def test_fields_the_trainer_sets_are_refused_as_model_overrides(field, value, message):
    config = tiny.get_config("s2mlp_tiny")
    parent, _, leaf = field.rpartition(".")
    (config[parent] if parent else config)[leaf] = value
    with pytest.raises(ValueError) as e:
        train_lib.validate_config(config, num_devices=1)
    assert message in str(e.value)


def test_a_dtype_argument_is_named_as_the_callers_not_the_configs():
    from s2mlp import models

    with pytest.raises(ValueError, match=r"^dtype='fp8' is unknown; choose one of"):
        models.from_config(tiny.get_config("s2mlp_tiny"), 10, dtype="fp8")


def test_the_config_check_builds_no_model(monkeypatch):
    """The boundary checks the model's fields without building it; the run builds it once (`models.from_config`)."""
    from s2mlp import models
    from s2mlp.models.s2mlp import S2MLP

    built, real = [], S2MLP.__post_init__
    monkeypatch.setattr(S2MLP, "__post_init__", lambda self: (built.append(self), real(self))[1])
    config = tiny.get_config("s2mlp_tiny")
    train_lib.validate_config(config, num_devices=1)
    assert built == []
    model = models.from_config(config, 10)
    assert built == [model] and model.num_classes == 10


def test_batch_must_divide_by_devices_times_accumulation():
    config = tiny.get_config("s2mlp_tiny")
    config.batch_size, config.grad_accum_steps = 24, 2
    with pytest.raises(ValueError, match=r"devices \(8\) × grad_accum_steps \(2\) = 16"):
        train_lib.validate_config(config, num_devices=8)


def _one_weight_updates(grads, **options):
    """The optimizer's updates of one kernel weight (lr 1) for the gradients `grads`, step by step."""
    tx = train_lib.make_optimizer(train_lib.OptimizerOptions(batch_size=1024, base_lr=1.0, **options), lambda s: 1.0)
    params = {"w": {"kernel": jnp.zeros(1)}}
    state, out = tx.init(params), []
    for g in grads:
        updates, state = tx.update({"w": {"kernel": jnp.asarray([g])}}, state, params)
        out.append(float(updates["w"]["kernel"][0]))
    return out


def test_adamw_moments_and_gradient_clipping_before_it():
    """AdamW's b1 0.9, b2 0.999, eps 1e-8 (DeiT's): after gradients 1 then 0 the step is -m̂/(sqrt(v̂)+eps), with
    m̂ = 0.09/0.19 and v̂ = 0.000999/0.001999. Clipping (grad_clip_norm) acts on the gradients, before Adam: clipped
    to 1, gradients 100 then 1 give two equal gradients and a step of -1 (unclipped, or clipping Adam's own updates,
    -0.677)."""
    m, v = 0.09 / 0.19, 0.000999 / 0.001999
    assert _one_weight_updates([1.0, 0.0]) == pytest.approx([-1.0, -m / (np.sqrt(v) + 1e-8)], rel=1e-4)
    assert _one_weight_updates([100.0, 1.0], grad_clip_norm=1.0)[1] == pytest.approx(-1.0, rel=1e-4)
    assert _one_weight_updates([100.0, 1.0])[1] == pytest.approx(-0.6775, abs=1e-3)


def test_step_options_take_each_config_field():
    config = tiny.get_config("s2mlp_tiny")
    config.augment.mixup, config.augment.cutmix, config.augment.mix_switch_prob = 0.3, 0.7, 0.4
    config.augment.label_smoothing, config.ema_decay, config.grad_accum_steps = 0.15, 0.5, 2
    options = train_lib.StepOptions.from_config(config)
    assert (options.mixup, options.cutmix, options.mix_switch_prob) == (0.3, 0.7, 0.4)
    assert (options.label_smoothing, options.ema_decay, options.grad_accum_steps) == (0.15, 0.5, 2)


def test_one_step_is_the_smoothed_cross_entropy_and_moves_the_ema_by_one_minus_decay():
    """The step's loss and gradient norm are those of optax's cross-entropy against smoothed labels (label smoothing
    reaches the step), and the EMA after it is decay · old params + (1 - decay) · new params."""
    from s2mlp.mixup import smooth_labels

    config = tiny.get_config("s2mlp_tiny")
    config.augment.mixup = config.augment.cutmix = 0.0
    config.augment.label_smoothing, config.ema_decay, config.model.drop_path_rate = 0.1, 0.9, 0.0
    state, step, sharding = _setup(config, jax.devices()[:1])
    before = jax.device_get(state.params)
    batch = _batch(8, config.image_size)
    model = models.from_config(config, NUM_CLASSES)

    def loss(params):
        logits = model.apply({"params": params}, jnp.asarray(batch["image"]), train=False)
        return optax.softmax_cross_entropy(logits, smooth_labels(jnp.asarray(batch["label"]), NUM_CLASSES, 0.1)).mean()

    expected, grads = jax.value_and_grad(loss)(before)
    state, metrics = step(state, train_lib.to_global(batch, sharding), jax.random.key(1))
    assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(float(optax.global_norm(grads)), rel=1e-4)
    after = jax.device_get(state)
    _assert_trees_close(after.ema_params, jax.tree.map(lambda b, a: 0.9 * b + 0.1 * a, before, after.params))
