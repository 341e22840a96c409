"""Behaviour checked against its definition, each test written to fail on a one-line bug the other files miss.

- S²-MLPv2's token mixer against a NumPy transcription of the S²-MLPv2 paper (§3.1 Eq. 1, §3.2 Eqs. 2-4,
  §4.1 Eqs. 6-10) with the same parameters, and split attention's invariant: K identical branches come back.
- Whole models at eval (S²-MLP §3.2, S²-MLPv2 §4, MLP-Mixer Eq. 1) against layer-by-layer NumPy forwards.
- Stochastic depth in the S² blocks (DropPath, Huang et al. 2016, as the papers' recipes use it): each residual
  branch is zeroed or scaled by 1 / (1 - rate), per example, in both block layouts (`model.scan`).
- The train step: label-smoothed targets (S²-MLPv2 §5, "label smoothing with a smooth ratio of 0.1"), the EMA,
  fresh Mixup/CutMix/DropPath randomness each step, and gradient clipping by the global norm.
- `eval_step`'s top-1/top-5 counts and masking on a handmade batch, and `Trainer.evaluate`'s averages.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import train_lib
from s2mlp import evals
from s2mlp.models import get_model, scan_params
from s2mlp.models.s2mlpv2 import S2MLPv2Module, SplitAttention


def _shapes(module, *args, **kwargs):
    """The parameter shapes of `module` (``jax.eval_shape``: an eager ``init`` takes seconds on CPU)."""
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))["params"]


def _random_params(params, seed: int, std: float = 0.5):
    """Arrays shaped like `params` of N(0, std²) noise (biases and scales too, so each one matters)."""
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [(std * rng.standard_normal(p.shape)).astype(np.float32) for p in leaves])


def _normal(shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# =============================================================================
# S²-MLPv2's token mixer (S²-MLPv2 paper §3-4).
# =============================================================================
def _gelu(x: np.ndarray) -> np.ndarray:
    """σ of Eq. 3: GELU, x Φ(x) with the exact normal CDF."""
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _ss1(x: np.ndarray) -> np.ndarray:
    """SS1, Eq. 1, for (B, rows, cols, c): quarter 1 moves +1 along the rows (X[2:h] <- X[1:h-1]), quarter 2
    -1 along the rows, quarter 3 +1 along the columns, quarter 4 -1 along the columns; the row or column that
    receives nothing keeps its value (the assignment leaves it)."""
    q = x.shape[-1] // 4
    y = x.copy()
    y[:, 1:, :, :q] = x[:, :-1, :, :q]
    y[:, :-1, :, q : 2 * q] = x[:, 1:, :, q : 2 * q]
    y[:, :, 1:, 2 * q : 3 * q] = x[:, :, :-1, 2 * q : 3 * q]
    y[:, :, :-1, 3 * q :] = x[:, :, 1:, 3 * q :]
    return y


def _ss2(x: np.ndarray) -> np.ndarray:
    """SS2, Eq. 8: quarters 1 and 2 move +1 / -1 along the columns, quarters 3 and 4 +1 / -1 along the rows."""
    q = x.shape[-1] // 4
    y = x.copy()
    y[:, :, 1:, :q] = x[:, :, :-1, :q]
    y[:, :, :-1, q : 2 * q] = x[:, :, 1:, q : 2 * q]
    y[:, 1:, :, 2 * q : 3 * q] = x[:, :-1, :, 2 * q : 3 * q]
    y[:, :-1, :, 3 * q :] = x[:, 1:, :, 3 * q :]
    return y


def _split_attention(branches: list[np.ndarray], p) -> np.ndarray:
    """Eqs. 2-4 on K feature maps (B, rows, cols, c), per example.

    Eq. 2 pools each map over its n patches (the text: "averages them"; ViP's code takes the mean) and sums
    over the K maps; Eq. 3: â = σ(a W1) W2 (with biases), reshaped to Â (K, c) row by row; softmax along the
    first dimension (the K maps) gives Ā; Eq. 4: X̂[i] = Σ_k X_k[i] ⊙ Ā[k].
    """
    k, c = len(branches), branches[0].shape[-1]
    a = sum(x.mean(axis=(1, 2)) for x in branches)  # (B, c)
    a_hat = _gelu(a @ p["fc1"]["kernel"] + p["fc1"]["bias"]) @ p["fc2"]["kernel"] + p["fc2"]["bias"]  # (B, Kc)
    a_hat = a_hat.reshape(-1, k, c)
    e = np.exp(a_hat - a_hat.max(axis=1, keepdims=True))
    a_bar = e / e.sum(axis=1, keepdims=True)  # (B, K, c): sums to 1 over the K maps
    return sum(x * a_bar[:, i, None, None, :] for i, x in enumerate(branches))


def _s2mlpv2_module(x: np.ndarray, p) -> np.ndarray:
    """Eqs. 6-10: MLP1 to 3c, split into X1, X2, X3, SS1(X1), SS2(X2), X3 kept, split attention, MLP2."""
    c = x.shape[-1]
    x_hat = x @ p["fc1"]["kernel"] + p["fc1"]["bias"]  # Eq. 6
    x1, x2, x3 = x_hat[..., :c], x_hat[..., c : 2 * c], x_hat[..., 2 * c :]  # Eq. 7
    attended = _split_attention([_ss1(x1), _ss2(x2), x3], p["split_attention"])  # Eqs. 8-9
    return attended @ p["fc2"]["kernel"] + p["fc2"]["bias"]  # Eq. 10


def _float64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


@pytest.mark.parametrize("shape", [(2, 5, 6, 8), (1, 4, 3, 16)])
def test_s2mlpv2_module_is_the_papers_equations_6_to_10(shape):
    """S²-MLPv2 §4.1: Ŷ = MLP2(SA(SS1(X1), SS2(X2), X3)) with (X1, X2, X3) = MLP1(X) split along the channels."""
    x = _normal(shape, seed=0)
    module = S2MLPv2Module()
    params = _random_params(_shapes(module, x), seed=1)
    out = np.asarray(jax.jit(module.apply)({"params": params}, x))
    expected = _s2mlpv2_module(x.astype(np.float64), _float64(params))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # Where the reference tells the branches apart: SS1 in place of SS2 (or no shift) gives another output.
    p = _float64(params)
    x_hat = x.astype(np.float64) @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    c = shape[-1]
    ss2, ss1 = _ss2(x_hat[..., c : 2 * c]), _ss1(x_hat[..., c : 2 * c])
    assert not np.allclose(ss2, ss1, atol=1e-3) and not np.allclose(ss2, x_hat[..., c : 2 * c], atol=1e-3)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_split_attention_of_identical_branches_is_that_branch(k, seed):
    """Eq. 4 with X_1 = ... = X_K: Σ_k X ⊙ Ā[k] = X, whatever the parameters, as Ā sums to 1 over the K maps."""
    x = _normal((2, 3, 4, 8), seed=seed)
    branches = jnp.stack([x] * k, axis=1)
    attention = SplitAttention()
    params = _random_params(_shapes(attention, branches), seed=seed + 10, std=2.0)
    out = np.asarray(jax.jit(attention.apply)({"params": params}, branches))
    np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-6)


def test_split_attention_is_the_papers_equations_2_to_4():
    """Three different maps, parameters large enough that Ā is far from uniform."""
    branches = [_normal((2, 3, 5, 12), seed=s) for s in range(3)]
    attention = SplitAttention()
    stacked = jnp.stack(branches, axis=1)
    params = _random_params(_shapes(attention, stacked), seed=5, std=1.5)
    out = np.asarray(jax.jit(attention.apply)({"params": params}, stacked))
    expected = _split_attention([b.astype(np.float64) for b in branches], _float64(params))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    uniform = sum(branches) / 3  # Table 6's "sum pooling": the test would not see a broken softmax without this
    assert not np.allclose(out, uniform, atol=1e-2)


# =============================================================================
# Whole models at eval, layer by layer in NumPy.
# =============================================================================
def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU's tanh approximation (Mixer's, as vision_transformer's code)."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _dense(x, p):
    return x @ p["kernel"] + p["bias"]


def _layernorm(x, p, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _affine(x, p):
    """ResMLP's Aff: a per-channel scale and bias."""
    return x * p["scale"] + p["bias"]


def _patch_embed(images, p):
    """A fully-connected layer on each non-overlapping p×p×3 patch unfolded (S²-MLP §3.2; kernel (p, p, 3, c))."""
    patch = p["kernel"].shape[0]
    b, h, w, ch = images.shape
    patches = images.reshape(b, h // patch, patch, w // patch, patch, ch).transpose(0, 1, 3, 2, 4, 5)
    return np.einsum("bhwijc,ijco->bhwo", patches, p["kernel"]) + p["bias"]


def _s2mlp(images, p, *, norm: str, shift) -> np.ndarray:
    """S²-MLP (S²-MLP §3.2, Fig. 1): e_i = Norm(W0 p_i + b0); per block x + Norm(FC2(shift(GELU(FC1 x)))), then
    x + Norm(FC4(GELU(FC3 x))); global average pooling; the classifier."""
    n = _layernorm if norm == "layernorm" else _affine
    x = n(_patch_embed(images, p["patch_embed"]), p["patch_norm"])
    for i in range(sum(k.startswith("block_") for k in p)):
        q = p[f"block_{i}"]
        x = x + n(_dense(shift(_gelu(_dense(x, q["fc1"]))), q["fc2"]), q["norm1"])
        x = x + n(_dense(_gelu(_dense(x, q["fc3"])), q["fc4"]), q["norm2"])
    return _dense(x.mean(axis=(1, 2)), p["head"])


def _s2mlpv2(images, p, depths) -> np.ndarray:
    """S²-MLPv2 (S²-MLPv2 §4): Y = S²-MLPv2(LN(X)) + X, Z = CM-MLP(LN(Y)) + Y (Eq. 5), ViP's two-level pyramid
    (§4.2: p×p patches, then 2×2 patches merged between the stages), a final LayerNorm, average pooling."""
    x, first = _patch_embed(images, p["patch_embed"]), 0
    for stage, depth in enumerate(depths):
        if stage:
            x = _patch_embed(x, p[f"downsample_{stage}"])
        for i in range(first, first + depth):
            q = p[f"block_{i}"]
            x = x + _s2mlpv2_module(_layernorm(x, q["norm1"]), q["spatial_mlp"])
            x = x + _dense(_gelu(_dense(_layernorm(x, q["norm2"]), q["channel_mlp_fc1"])), q["channel_mlp_fc2"])
        first += depth
    return _dense(_layernorm(x, p["final_norm"]).mean(axis=(1, 2)), p["head"])


def _mixer(images, p) -> np.ndarray:
    """MLP-Mixer (Tolstikhin et al., 2021, Eq. 1): U = X + W2 σ(W1 LN(X)) across the tokens (per channel),
    Y = U + W4 σ(W3 LN(U)) across the channels; then LayerNorm, average pooling over the tokens, the head."""
    x = _patch_embed(images, p["stem"])
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, tokens, c)
    for i in range(sum(k.startswith("MixerBlock_") for k in p)):
        q = p[f"MixerBlock_{i}"]
        t, c = q["token_mixing"], q["channel_mixing"]
        y = _layernorm(x, q["LayerNorm_0"]).swapaxes(1, 2)  # (B, c, tokens)
        x = x + _dense(_gelu_tanh(_dense(y, t["Dense_0"])), t["Dense_1"]).swapaxes(1, 2)
        x = x + _dense(_gelu_tanh(_dense(_layernorm(x, q["LayerNorm_1"]), c["Dense_0"])), c["Dense_1"])
    return _dense(_layernorm(x, p["pre_head_layer_norm"]).mean(axis=1), p["head"])


def _scaled_params(abstract, seed: int):
    """Kernels N(0, 1/fan_in), norm scales 1 + N(0, 0.2²), biases N(0, 0.2²): every parameter matters, and the
    activations stay O(1) through the blocks."""
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        noise = rng.standard_normal(a.shape)
        if path[-1].key == "kernel":
            return (noise / math.sqrt(math.prod(a.shape[:-1]))).astype(np.float32)
        return ((1.0 if path[-1].key == "scale" else 0.0) + 0.2 * noise).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


MODEL_CASES = {
    # name: (registry name, overrides, image side, the NumPy model)
    "s2mlp": ("s2mlp_tiny", {}, 16, lambda x, p: _s2mlp(x, p, norm="layernorm", shift=_ss1)),
    "s2mlp_ss2": ("s2mlp_tiny", {"shift_pattern": "ss2"}, 16, lambda x, p: _s2mlp(x, p, norm="layernorm", shift=_ss2)),
    "s2mlp_affine": ("s2mlp_tiny", {"norm": "affine"}, 16, lambda x, p: _s2mlp(x, p, norm="affine", shift=_ss1)),
    "s2mlpv2": ("s2mlpv2_tiny", {"depths": (2, 1)}, 24, lambda x, p: _s2mlpv2(x, p, depths=(2, 1))),
    "mixer": ("mixer_tiny", {}, 16, _mixer),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_model_at_eval_is_its_papers_layers(case):
    name, overrides, size, reference = MODEL_CASES[case]
    model = get_model(name, num_classes=7, **overrides)
    x = _normal((2, size, size, 3), seed=3)
    params = _scaled_params(_shapes(model, x, train=False), seed=4)
    logits = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))(params, x))
    expected = reference(x.astype(np.float64), _float64(params))
    assert logits.shape == expected.shape == (2, 7)
    assert np.abs(expected).max() > 0.5 and np.abs(expected[0] - expected[1]).max() > 0.1
    # Float32 against float64: 2e-7 of the largest logit measured; GELU's tanh form in place of erf gives 3e-5.
    np.testing.assert_allclose(logits, expected, rtol=0, atol=2e-6 * np.abs(expected).max())


# =============================================================================
# DropPath in the S² blocks, both layouts.
# =============================================================================
# Every parameter zero except the bias that closes each residual branch: the first branch of every block then
# adds e0 (channel 0) and the second e1 (channel 1) to a zero input, so a block's increment on channels 0 and 1
# is what DropPath made of each branch: 0 or 1 / (1 - rate).
DROP_CASES = {
    # name: (model, image side, the bias closing branch 1, the bias closing branch 2)
    "s2mlp": (dict(name="s2mlp_tiny", num_blocks=3), 8, ("norm1", "bias"), ("norm2", "bias")),
    "s2mlpv2": (
        dict(name="s2mlpv2_tiny", hidden_dims=(16,), depths=(3,)),
        8,
        ("spatial_mlp", "fc2", "bias"),
        ("channel_mlp_fc2", "bias"),
    ),
}
DROP_RATE = 0.5  # blocks 0, 1, 2 get 0, 0.25, 0.5 (linear in depth)
DROP_BATCH = 4096


def _branch_params(model, size, first, second):
    x = jnp.zeros((1, size, size, 3))
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), _shapes(model, x, train=False))
    for i in range(3):
        for path, channel in ((first, 0), (second, 1)):
            node = params[f"block_{i}"]
            for key in path[:-1]:
                node = node[key]
            node[path[-1]][channel] = 1.0
    return params


def _block_increments(case: str, scan: bool, train: bool, seed: int = 0) -> np.ndarray:
    """(3 blocks, B, rows, cols, 2): what each block added on channels 0 and 1."""
    fields, size, first, second = DROP_CASES[case]
    model = get_model(**fields, num_classes=10, drop_path_rate=DROP_RATE)
    params = _branch_params(model, size, first, second)
    if scan:
        model, params = model.clone(scan=True), scan_params(params, model)
    x = jnp.asarray(_normal((DROP_BATCH, size, size, 3), seed=seed))

    def blocks(p, key):
        _, state = model.apply({"params": p}, x, train=train, rngs={"dropout": key}, mutable=["intermediates"])
        inter = state["intermediates"]
        if scan:
            return inter["blocks" if case == "s2mlp" else "stage_0"]["out"][0]
        return jnp.stack([inter[f"block_{i}_out"][0] for i in range(3)])

    outs = np.asarray(jax.jit(blocks)(params, jax.random.key(seed)))
    assert outs.shape[:4] == (3, DROP_BATCH, size // 4, size // 4)
    np.testing.assert_array_equal(outs[..., 2:], 0.0)  # nothing else is added
    before = np.concatenate([np.zeros_like(outs[:1]), outs[:-1]])
    return (outs - before)[..., :2]


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("case", sorted(DROP_CASES))
def test_drop_path_zeroes_or_scales_each_branch_by_one_over_keep(case, scan):
    increments = _block_increments(case, scan, train=True)
    kept = {}
    for i, rate in enumerate([0.0, DROP_RATE / 2, DROP_RATE]):
        keep = 1.0 - rate
        scale = increments[i]  # (B, rows, cols, 2 branches)
        assert (scale == scale[:, :1, :1]).all(), f"block {i}: one decision per example, for all its tokens"
        scale = scale[:, 0, 0]  # (B, 2)
        kept[i] = np.abs(scale - 1.0 / keep) < 1e-5
        assert (kept[i] | (scale == 0.0)).all(), f"block {i}: values {np.unique(scale)[:6]}, expected 0 or {1 / keep}"
        # Over 4096 draws the kept fraction is `keep` and the expectation 1 (std of the mean <= 0.016).
        np.testing.assert_allclose(kept[i].mean(axis=0), keep, atol=0.04, err_msg=f"block {i}")
        np.testing.assert_allclose(scale.mean(axis=0), 1.0, atol=0.07, err_msg=f"block {i}")
    # Independent draws: each branch of a block, and the same branch of two blocks (std of a frequency <= 0.008).
    for (i, a), (j, b) in [((1, 0), (1, 1)), ((2, 0), (2, 1)), ((1, 0), (2, 0)), ((1, 1), (2, 1))]:
        joint, product = (kept[i][:, a] & kept[j][:, b]).mean(), kept[i][:, a].mean() * kept[j][:, b].mean()
        assert abs(joint - product) < 0.04, f"block {i} branch {a} and block {j} branch {b}: {joint} vs {product}"


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("case", sorted(DROP_CASES))
def test_drop_path_is_the_identity_at_eval(case, scan):
    np.testing.assert_array_equal(_block_increments(case, scan, train=False), 1.0)


# =============================================================================
# The train step.
# =============================================================================
NUM_CLASSES = 10
IMAGE = 16


@functools.cache
def _trainer(drop_path_rate=0.0, grad_clip_norm=0.0, **options):
    """A Trainer of a one-block S²-MLP on one device (cached: each compiles its own train step)."""
    model = get_model("s2mlp_tiny", num_classes=NUM_CLASSES, hidden_dim=16, num_blocks=1, drop_path_rate=drop_path_rate)
    return train_lib.setup(
        model,
        image_size=IMAGE,
        optimizer=train_lib.OptimizerOptions(batch_size=1024, base_lr=1e-3, grad_clip_norm=grad_clip_norm),
        options=train_lib.StepOptions(**options),
        steps_per_epoch=1,
        total_steps=10,
        mesh=train_lib.make_mesh(jax.devices()[:1]),
    )


def _params(trainer, seed=0):
    """Random parameters of the trainer's model (not the zero-initialised head: logits differ per class)."""
    return _random_params(trainer.abstract.params, seed=seed, std=0.3)


def _batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(n, IMAGE, IMAGE, 3)).astype(np.float32),
        "label": rng.integers(0, NUM_CLASSES, size=n).astype(np.int32),
    }


def _step_loss(trainer, params, batch, step: int, rng=1) -> float:
    """The loss of one train step from a fresh state at `step` (the step donates its state)."""
    state = trainer.create(params)
    state = state.replace(step=jnp.asarray(step, jnp.int32))
    _, metrics = trainer.train_step(state, trainer.to_global(batch), jax.random.key(rng))
    return float(metrics["loss"])


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_train_step_loss_is_the_cross_entropy_against_smoothed_targets():
    """Label smoothing s (Szegedy et al., 2016): target 1 - s + s/K on the label, s/K elsewhere; no Mixup/CutMix."""
    s = 0.1
    trainer = _trainer(label_smoothing=s, ema_decay=0.9)  # the EMA test's trainer: one compile for both
    params, batch = _params(trainer), _batch()
    loss = _step_loss(trainer, params, batch, step=0)
    logp = _log_softmax(trainer.model.apply({"params": params}, batch["image"], train=False))
    targets = np.full((len(batch["label"]), NUM_CLASSES), s / NUM_CLASSES)
    targets[np.arange(len(batch["label"])), batch["label"]] += 1.0 - s
    smoothed = -(targets * logp).sum(-1).mean()
    hard = -logp[np.arange(len(batch["label"])), batch["label"]].mean()
    assert loss == pytest.approx(smoothed, rel=1e-5)
    assert abs(smoothed - hard) > 0.02  # measured 0.09: the smoothing is visible in the loss


def test_ema_after_one_step_is_the_decayed_average():
    """The EMA model (S²-MLPv2 §5, as DeiT): e_0 = θ_0, then e_t = d e_(t-1) + (1 - d) θ_t after each update."""
    d = 0.9
    trainer = _trainer(label_smoothing=0.1, ema_decay=d)
    params = _params(trainer)
    state = trainer.create(params)
    for e, p in zip(jax.tree.leaves(jax.device_get(state.ema_params)), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(e, p)
    state, _ = trainer.train_step(state, trainer.to_global(_batch()), jax.random.key(1))
    state = jax.device_get(state)
    leaves = zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(params), jax.tree.leaves(state.params), strict=True)
    for e, before, after in leaves:
        assert np.abs(after - before).max() > 1e-4  # every leaf moved (Adam's first step moves each by about lr)
        np.testing.assert_allclose(e, d * before + (1 - d) * after, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "randomness",
    [
        dict(mixup=0.8),
        dict(cutmix=1.0),
        dict(drop_path_rate=0.5),
    ],
    ids=["mixup", "cutmix", "drop_path"],
)
def test_each_step_draws_fresh_randomness(randomness):
    """Same state, batch and key: a different `state.step` draws another Mixup λ / CutMix box / DropPath mask;
    the same step draws the same ones."""
    trainer = _trainer(**randomness)
    params, batch = _params(trainer), _batch()
    first, again = _step_loss(trainer, params, batch, step=3), _step_loss(trainer, params, batch, step=3)
    assert first == again
    others = [_step_loss(trainer, params, batch, step=s) for s in (0, 4)]
    assert first not in others and others[0] != others[1], (first, others)


def test_the_recipe_reaches_the_step_and_the_optimizer_from_the_config():
    """Every field `train_step` and `make_optimizer` read comes from its config field (distinct values each)."""
    from configs import tiny

    config = tiny.get_config("s2mlp_tiny")
    config.augment.update(label_smoothing=0.11, mixup=0.22, cutmix=0.33, mix_switch_prob=0.44)
    config.update(grad_accum_steps=3, ema_decay=0.55, grad_clip_norm=0.66, weight_decay=0.77, batch_size=48)
    config.update(base_lr=0.88, min_lr=0.099, warmup_epochs=5)
    step = train_lib.StepOptions.from_config(config)
    assert step == train_lib.StepOptions(0.11, 0.22, 0.33, 0.44, grad_accum_steps=3, ema_decay=0.55)
    optimizer = train_lib.OptimizerOptions.from_config(config)
    assert optimizer == train_lib.OptimizerOptions(48, 0.88, 0.099, 5, weight_decay=0.77, grad_clip_norm=0.66)


def _adam_mu(grad_clip_norm: float, grads):
    options = train_lib.OptimizerOptions(batch_size=1024, base_lr=1e-3, grad_clip_norm=grad_clip_norm)
    tx = train_lib.make_optimizer(options, lambda step: 1e-3)
    params = jax.tree.map(jnp.zeros_like, grads)
    _, state = tx.update(grads, tx.init(params), params)
    return optax.tree_utils.tree_get(state, "mu")


GRADS = {"dense": {"kernel": jnp.array([[6.0, 0.0], [0.0, 0.0]]), "bias": jnp.array([0.0, 8.0])}}  # global norm 10


@pytest.mark.parametrize(
    "grad_clip_norm, grads, factor",
    [
        (1.0, GRADS, 0.1),  # norm 10 clipped to 1
        (0.0, GRADS, 1.0),  # 0 turns clipping off
        (20.0, GRADS, 1.0),  # below the threshold: unchanged
        (1.0, jax.tree.map(lambda g: g / 20, GRADS), 1.0),  # norm 0.5
    ],
)
def test_gradient_clipping_by_global_norm_reaches_adams_first_moment(grad_clip_norm, grads, factor):
    """After one update Adam's first moment is (1 - b1) g with b1 = 0.9, g the gradient clipped to global norm
    `grad_clip_norm` (Pascanu et al., 2013): g · min(1, max_norm / ||g||)."""
    mu = _adam_mu(grad_clip_norm, grads)
    for got, g in zip(jax.tree.leaves(mu), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(np.asarray(got), 0.1 * factor * np.asarray(g), rtol=1e-6, atol=1e-7)


# =============================================================================
# eval_step.
# =============================================================================
class _LogitsModel:
    """A stand-in model without parameters whose logits are the batch's 'image' (B, 8)."""

    num_classes = 8

    def init(self, rng, images, train):
        return {"params": {}}

    def apply(self, variables, images, train):
        assert train is False
        return images


ROW = [0.5, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0]  # ranks: class 1, 2, 3, 0, 4, 5, 6, 7
EVAL_CASES = [  # (label, mask, top-1 hit, top-5 hit)
    (1, 1.0, 1, 1),  # the highest logit
    (3, 1.0, 0, 1),  # the third highest
    (4, 1.0, 0, 1),  # the fifth highest
    (5, 1.0, 0, 0),  # the sixth highest
    (7, 1.0, 0, 0),  # the lowest
    (1, 0.0, 0, 0),  # a hit, masked out (padding)
    (3, 0.0, 0, 0),  # a top-5 hit, masked out
]


def _eval_batch(cases):
    return {
        "image": np.tile(np.array(ROW, np.float32), (len(cases), 1)),
        "label": np.array([c[0] for c in cases], np.int32),
        "mask": np.array([c[1] for c in cases], np.float32),
    }


def _nll(batch) -> np.ndarray:
    return -_log_softmax(batch["image"])[np.arange(len(batch["label"])), batch["label"]]


def test_eval_step_counts_top1_top5_and_masks():
    batch = _eval_batch(EVAL_CASES)
    out = jax.device_get(jax.jit(lambda b: evals.eval_step({}, b, model=_LogitsModel()))(batch))
    assert int(out["correct_top1"]) == sum(c[2] for c in EVAL_CASES) == 1
    assert int(out["correct_top5"]) == sum(c[3] for c in EVAL_CASES) == 3
    assert float(out["count"]) == 5.0
    assert float(out["loss"]) == pytest.approx(float((_nll(batch) * batch["mask"]).sum()), rel=1e-6)


def test_evaluate_averages_over_the_real_examples_of_all_batches():
    trainer = train_lib.setup(
        _LogitsModel(),
        image_size=1,
        optimizer=train_lib.OptimizerOptions(batch_size=1024, base_lr=1e-3),
        options=train_lib.StepOptions(),
        steps_per_epoch=1,
        total_steps=1,
        mesh=train_lib.make_mesh(jax.devices()[:1]),
    )
    batches = [_eval_batch(EVAL_CASES[:4]), _eval_batch(EVAL_CASES[4:])]
    metrics = trainer.evaluate({}, batches)
    nll = sum(float((_nll(b) * b["mask"]).sum()) for b in batches)
    assert metrics == pytest.approx({"top1": 1 / 5, "top5": 3 / 5, "loss": nll / 5, "num_examples": 5}, rel=1e-6)
