"""Scanned block stacks (`scan`), rematerialisation (`remat`) and parameter conversion between layouts.

A scanned model computes the same logits and gradients as the unrolled one after
`s2mlp.models.convert_params`, DropPath included (both layouts draw block i's DropPath key from the
same split); checkpoints of either layout resume, evaluate and fine-tune in the other.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import train_lib
from configs import tiny
from s2mlp import checkpoint as ckpt
from s2mlp import inference, models
from s2mlp.models import convert_params, get_model, scan_params, unscan_params
from s2mlp.models.blocks import drop_path_rates
from s2mlp.models.s2mlp import S2MLPBlock

CASES = {
    "s2mlp_tiny": (dict(num_blocks=3), 16),
    "s2mlp_tiny_affine": (dict(num_blocks=3, norm="affine"), 16),
    "s2mlpv2_tiny": (dict(depths=(2, 3)), 24),
}


def _setup(case):
    overrides, size = CASES[case]
    name = case.removesuffix("_affine")
    unrolled = get_model(name, num_classes=10, drop_path_rate=0.3, **overrides)
    x = jax.random.normal(jax.random.key(1), (4, size, size, 3))
    params = unrolled.init(jax.random.key(0), x, train=False)["params"]
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))  # perturbed, so the zero head passes gradients back
    params = jax.tree.unflatten(treedef, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    return unrolled, unrolled.clone(scan=True), params, x


def _loss_and_grads(model, params, x, train=True):
    def loss(p):
        logits = model.apply({"params": p}, x, train=train, rngs={"dropout": jax.random.key(3)})
        return jnp.sum(jnp.sin(logits)), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("case", sorted(CASES))
def test_scanned_equals_unrolled_with_drop_path(case):
    unrolled, scanned, params, x = _setup(case)
    scanned_params = scan_params(params, unrolled)
    abstract = jax.eval_shape(lambda: scanned.init(jax.random.key(0), x, train=False))["params"]
    assert jax.tree.map(jnp.shape, abstract) == jax.tree.map(jnp.shape, scanned_params)
    logits_u, grads_u = _loss_and_grads(unrolled, params, x)
    logits_s, grads_s = _loss_and_grads(scanned, scanned_params, x)
    np.testing.assert_allclose(logits_s, logits_u, rtol=1e-5, atol=1e-6)
    _assert_trees_close(grads_s, scan_params(grads_u, unrolled))
    eval_logits, _ = _loss_and_grads(scanned, scanned_params, x, train=False)
    assert not np.allclose(eval_logits, logits_s)  # DropPath was active in training


@pytest.mark.parametrize("case", ["s2mlp_tiny", "s2mlpv2_tiny"])
def test_scanned_intermediates_are_the_stacked_block_outputs(case):
    unrolled, scanned, params, x = _setup(case)
    apply = lambda m, p: m.apply({"params": p}, x, train=False, mutable=["intermediates"])[1]["intermediates"]  # noqa: E731
    flat = jax.jit(lambda p: apply(unrolled, p))(params)
    stacked = jax.jit(lambda p: apply(scanned, p))(scan_params(params, unrolled))
    for scan_name, names in models.block_groups(unrolled):
        (out,) = stacked[scan_name]["out"]
        assert out.shape == (len(names), *flat[names[0] + "_out"][0].shape)
        for j, name in enumerate(names):
            np.testing.assert_allclose(out[j], flat[name + "_out"][0], rtol=1e-5, atol=1e-6)
    assert set(stacked) == {"stem_out", "pre_logits", *(g for g, _ in models.block_groups(unrolled))}


@pytest.mark.parametrize("case", ["s2mlp_tiny", "s2mlpv2_tiny"])
def test_remat_gives_the_same_gradients(case):
    unrolled, scanned, params, x = _setup(case)
    scanned_params = scan_params(params, unrolled)
    _, reference = _loss_and_grads(unrolled, params, x)
    for remat in ("full", "dots"):
        _, grads = _loss_and_grads(unrolled.clone(remat=remat), params, x)
        _assert_trees_close(grads, reference)
        _, grads = _loss_and_grads(scanned.clone(remat=remat), scanned_params, x)
        _assert_trees_close(grads, scan_params(reference, unrolled))


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_recipe_optimizer_updates_scanned_as_unrolled(case):
    """Weight decay spares biases and norm scales in both layouts (the scanned ones have a block axis, rank 2)."""
    unrolled, _, params, _ = _setup(case)
    config = tiny.get_config("s2mlp_tiny")
    config.weight_decay = 0.5
    tx = train_lib.make_optimizer(train_lib.OptimizerOptions.from_config(config), lambda step: 1.0)
    zero = jax.tree.map(jnp.zeros_like, params)  # zero gradients: the update is the weight decay alone
    update = jax.jit(lambda grads, params: tx.update(grads, tx.init(params), params)[0])
    update_u = update(zero, params)
    update_s = update(scan_params(zero, unrolled), scan_params(params, unrolled))
    _assert_trees_close(update_s, scan_params(update_u, unrolled), rtol=0, atol=0)
    for path, leaf in jax.tree_util.tree_leaves_with_path(update_s):
        decayed = path[-1].key == "kernel"
        assert bool(np.any(leaf != 0)) == decayed, jax.tree_util.keystr(path)


def test_drop_path_rates_per_block_are_linear_in_depth():
    """Unrolled blocks get rates 0, r/(N-1), ..., r; the scanned stack gets the same array as its scanned input."""
    model, _, params, x = _setup("s2mlp_tiny")
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, S2MLPBlock) and context.method_name == "__call__":
            seen.append(float(args[1]))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(0)})
    assert seen == pytest.approx([0.0, 0.15, 0.3], abs=1e-7)
    assert drop_path_rates(0.3, 3) == pytest.approx([0.0, 0.15, 0.3])


def test_convert_round_trips_exactly_including_optimizer_state():
    for case in ("s2mlp_tiny", "s2mlpv2_tiny"):
        unrolled, _, params, _ = _setup(case)
        params = jax.tree.map(np.asarray, params)
        scanned = convert_params(params, unrolled, to_scan=True)
        if case == "s2mlp_tiny":
            assert scanned["blocks"]["fc1"]["kernel"].shape == (3, 32, 32)
            np.testing.assert_array_equal(scanned["blocks"]["fc3"]["bias"][2], params["block_2"]["fc3"]["bias"])
            assert not any(k.startswith("block_") for k in scanned)
        else:
            assert set(scanned) == {"patch_embed", "stage_0", "stage_1", "downsample_1", "final_norm", "head"}
            np.testing.assert_array_equal(scanned["stage_1"]["norm1"]["scale"][0], params["block_2"]["norm1"]["scale"])
        back = unscan_params(scanned, unrolled)
        assert jax.tree.structure(back) == jax.tree.structure(params)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
            np.testing.assert_array_equal(a, b)
        assert convert_params(scanned, unrolled, to_scan=True) is not None  # already scanned: unchanged
        state = optax.adamw(1e-3).init(params)
        converted = convert_params(state, unrolled, to_scan=True)
        assert jax.tree.structure(converted) == jax.tree.structure(optax.adamw(1e-3).init(scanned))
        for a, b in zip(jax.tree.leaves(convert_params(converted, unrolled, to_scan=False)), jax.tree.leaves(state)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("scan", "yes", ["scan='yes'", "True", "False"]),
        ("remat", "some", ["remat='some'", "'none'", "'full'", "'dots'"]),
    ],
)
def test_bad_scan_and_remat_values_are_named(field, value, words):
    with pytest.raises(ValueError) as e:
        get_model("s2mlp_tiny", **{field: value})
    assert all(w in str(e.value) for w in words)


# ---- checkpoints across layouts -------------------------------------------------------------
def _config(scan: bool, total_steps: int):
    config = tiny.get_config("s2mlp_tiny")
    config.model.overrides.scan = scan
    config.total_steps = total_steps
    return config


def _rows(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_checkpoints_resume_evaluate_and_fine_tune_across_layouts(tiny_s2mlp_run, tmp_path):
    """An unrolled run (6 steps, checkpoint at 6) goes on scanned and back; evaluation and init_from convert too."""
    saved_eval = [r for r in _rows(tiny_s2mlp_run) if r["step"] == 6 and "eval_top1" in r][0]
    metrics = train_lib.evaluate(_config(scan=True, total_steps=6), tiny_s2mlp_run, eval_dir=str(tmp_path / "eval"))
    assert metrics["eval_loss"] == pytest.approx(saved_eval["eval_loss"], rel=1e-5)
    assert metrics["eval_top1"] == saved_eval["eval_top1"]

    scanned_dir, unrolled_dir = tmp_path / "scanned", tmp_path / "unrolled"
    for d in (scanned_dir, unrolled_dir):
        shutil.copytree(tiny_s2mlp_run, d, ignore=shutil.ignore_patterns("*.lock"))
    train_lib.train_and_evaluate(_config(scan=True, total_steps=7), str(scanned_dir))
    train_lib.train_and_evaluate(_config(scan=False, total_steps=7), str(unrolled_dir))
    loss = lambda d: [r["loss"] for r in _rows(d) if r["step"] == 7 and "loss" in r]  # noqa: E731
    assert loss(scanned_dir) and loss(scanned_dir) == pytest.approx(loss(unrolled_dir), rel=1e-5)
    assert "blocks/fc1/kernel" in ckpt.saved_shapes(scanned_dir / "checkpoints" / "7")
    # inference.load rebuilds each checkpoint's own layout from its config.
    loaded_scanned = inference.load(scanned_dir / "checkpoints" / "7")
    loaded_unrolled = inference.load(unrolled_dir / "checkpoints" / "7")
    assert loaded_scanned.model.scan and not loaded_unrolled.model.scan
    _assert_trees_close(loaded_scanned.params, scan_params(loaded_unrolled.params, loaded_unrolled.model))
    train_lib.train_and_evaluate(_config(scan=False, total_steps=8), str(scanned_dir))  # scanned -> unrolled
    assert "block_1/fc1/kernel" in ckpt.saved_shapes(scanned_dir / "checkpoints" / "8")

    config = _config(scan=True, total_steps=1)
    config.init_from = tiny_s2mlp_run
    model = models.from_config(config, 10)
    fresh = models.abstract_params(model, 16)
    ckpt.check_init_from(config.init_from, config.init_from_ema, model, fresh, config.model.name)
    fresh = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), fresh)
    params = ckpt.fine_tune_params(config.init_from, config.init_from_ema, model, fresh, config.model.name)
    saved = ckpt.restore(Path(tiny_s2mlp_run) / "checkpoints" / "6", "ema_params")
    np.testing.assert_array_equal(params["blocks"]["fc2"]["kernel"][1], saved["block_1"]["fc2"]["kernel"])


# ---- persistent compilation cache and profiler traces -------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def _cache_entries(cache: Path) -> set[str]:
    """The compiled programs in JAX's cache folder (each entry '<name>-<hash>-cache', plus an '-atime' file)."""
    return {p.name for p in cache.iterdir() if p.name.endswith("-cache")}


def test_second_start_loads_the_train_step_from_the_compilation_cache(tmp_path):
    cache = tmp_path / "cache"
    cmd = [sys.executable, "main.py", "--config=configs/tiny.py:s2mlp_tiny", f"--config.compilation_cache_dir={cache}"]
    cmd += ["--config.total_steps=2", "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run([*cmd, f"--workdir={tmp_path / 'run1'}"], cwd=ROOT, env=env, check=True, capture_output=True)
    first = _cache_entries(cache)
    assert any(name.startswith("jit_train_step-") for name in first), sorted(first)
    done = subprocess.run(
        [*cmd, f"--workdir={tmp_path / 'run2'}"], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    )
    assert _cache_entries(cache) == first, "the second start compiled programs the first had cached"
    assert "Training s2mlp_tiny" in done.stderr


def test_profile_steps_writes_a_trace_into_the_workdir(tmp_path):
    config = _config(scan=True, total_steps=3)
    config.profile_steps = (2, 2)
    train_lib.train_and_evaluate(config, str(tmp_path))
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_bad_profile_steps_are_named(tmp_path):
    config = _config(scan=True, total_steps=3)
    config.profile_steps = (0, 3)
    with pytest.raises(ValueError, match=r"config.profile_steps=\(0, 3\) must be \(first_step, num_steps\)"):
        train_lib.train_and_evaluate(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()
