"""Models, registry and MACs (`s2mlp/models`, `s2mlp/flops.py`) against the papers (S²-MLP §3, S²-MLPv2 §4, Mixer).

Parameter counts and MACs use abstract shapes only (``jax.eval_shape``); forwards use cheap
deterministic parameters built with NumPy (a jitted ``init`` of a big model costs a minute on CPU).
Each paper model is compiled once at 224 (the compile serves both the forward and XLA's flop count).
"""

from __future__ import annotations

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2mlp.flops import FAST_COMPILE, cost_flops, count_macs, jaxpr_macs, xla_flops
from s2mlp.models import PAPER_MODELS, from_config, get_model, model_names
from s2mlp.models.blocks import DropPath
from s2mlp.models.mixer import MlpMixer
from s2mlp.models.s2mlp import S2MLP
from s2mlp.models.s2mlpv2 import S2MLPv2
from s2mlp.shift import PATTERNS

# name -> (parameters with the 1000-class head, without it), from the papers' tables.
PARAMS = {
    "s2mlp_wide": (72_241_384, 71_472_384),
    "s2mlp_deep": (53_917_288, 53_532_288),
    "s2mlpv2_small": (25_133_416, 24_748_416),
    "s2mlpv2_medium": (55_303_976, 54_790_976),
    "mixer_s16": (18_528_264, 18_015_264),
    "mixer_b16": (59_880_472, 59_111_472),
    "mixer_l16": (208_196_168, 207_171_168),
}
# name -> multiply-accumulates of the dots and convs of a batch-1 forward at 224.
MACS = {
    "s2mlp_wide": 13_989_033_984,
    "s2mlp_deep": 10_462_682_112,
    "s2mlpv2_small": 6_901_767_168,
    "s2mlpv2_medium": 16_284_307_456,
    "mixer_s16": 3_776_958_464,
    "mixer_b16": 12_601_767_936,
    "mixer_l16": 44_547_678_208,
}
PAPER_GMACS = {"s2mlp_wide": 14.0, "s2mlp_deep": 10.5, "s2mlpv2_small": 6.9, "s2mlpv2_medium": 16.3}
TINY = sorted(set(model_names()) - set(PAPER_MODELS))


# ---- helpers ---------------------------------------------------------------------
def abstract_params(model, size: int = 224):
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def compiled_apply(model, params, x, *, train: bool = False, intermediates: bool = False):
    """``model.apply`` jitted and compiled once for these shapes; call as ``f(params, x, dropout_key)``."""

    mutable = ["intermediates"] if intermediates else False

    def apply(p, x, key):
        return model.apply(p, x, train=train, rngs={"dropout": key}, mutable=mutable)

    compiled = jax.jit(apply).lower(params, x, jax.random.key(0)).compile(FAST_COMPILE)
    return lambda p, x, key=None: compiled(p, x, jax.random.key(0) if key is None else key)


def count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def flat_shapes(tree) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(tree, sep="/").items()}


def cheap_params(abstract, seed: int = 0):
    """Parameters shaped like `abstract`: norm scales 1, biases small, kernels N(0, 1/fan_in) (tiled noise)."""
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(1 << 20).astype(np.float32)

    def leaf(path, shape):
        name, n = path[-1].key, math.prod(shape.shape)
        start = int(rng.integers(len(pool)))
        values = np.resize(np.roll(pool, start), n).reshape(shape.shape)
        if name == "scale":
            return jnp.ones(shape.shape, shape.dtype)
        if name == "bias":
            return jnp.asarray(0.1 * values, shape.dtype)
        return jnp.asarray(values / math.sqrt(n // shape.shape[-1]), shape.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def images(size: int, batch: int = 1, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32))


@functools.cache
def compiled_paper_model(name: str):
    """(compiled batch-1 eval forward at 224, abstract params): one compile per paper model."""
    model = get_model(name)
    abstract = abstract_params(model)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    compiled = jax.jit(lambda p, x: model.apply(p, x, train=False)).lower(abstract, x).compile(FAST_COMPILE)
    return compiled, abstract


# ---- parameter counts ------------------------------------------------------------
def test_registry_lists_the_paper_models_and_tiny_variants():
    assert set(PAPER_MODELS) == set(PARAMS) == set(MACS)
    assert set(PAPER_MODELS) <= set(model_names())
    assert TINY == ["mixer_tiny", "s2mlp_tiny", "s2mlpv2_tiny"]


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_exact_parameter_counts(name):
    params = abstract_params(get_model(name))["params"]
    total, without_head = PARAMS[name]
    assert count(params) == total
    assert count(params) - count(params["head"]) == without_head
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("name", ["s2mlp_wide", "s2mlp_deep"])
def test_s2mlp_matches_the_papers_parameter_formula(name):
    model = get_model(name)
    params = abstract_params(model)["params"]
    c, r, p, n = model.hidden_dim, model.mlp_ratio, model.patch_size, model.num_blocks
    norm = 2 * c  # LayerNorm scale + bias, or Affine scale + bias
    block = c * c * (2 * r + 2) + c * (3 + r)  # S²-MLP paper §3.4, norms excluded
    assert all(count(params[f"block_{i}"]) == block + 2 * norm for i in range(n))
    assert count(params) == (3 * p * p * c + c + norm) + n * (block + 2 * norm) + (c * 1000 + 1000)


def test_s2mlp_deep_differs_from_the_printed_51m():
    def without_head(name):
        params = abstract_params(get_model(name))["params"]
        return count(params) - count(params["head"])

    assert round(without_head("s2mlp_deep") / 1e6, 1) == 53.5 != 51  # the paper's own formula, not its table
    assert round(without_head("s2mlp_wide") / 1e6) == 71


def test_mixer_b16_has_vision_transformers_parameter_tree():
    params = abstract_params(get_model("mixer_b16"))["params"]
    shapes = flat_shapes(params)
    expected = {
        "stem/kernel": (16, 16, 3, 768),
        "stem/bias": (768,),
        "MixerBlock_0/LayerNorm_0/scale": (768,),
        "MixerBlock_0/LayerNorm_0/bias": (768,),
        "MixerBlock_0/token_mixing/Dense_0/kernel": (196, 384),
        "MixerBlock_0/token_mixing/Dense_0/bias": (384,),
        "MixerBlock_0/token_mixing/Dense_1/kernel": (384, 196),
        "MixerBlock_0/token_mixing/Dense_1/bias": (196,),
        "MixerBlock_0/LayerNorm_1/scale": (768,),
        "MixerBlock_0/LayerNorm_1/bias": (768,),
        "MixerBlock_0/channel_mixing/Dense_0/kernel": (768, 3072),
        "MixerBlock_0/channel_mixing/Dense_0/bias": (3072,),
        "MixerBlock_0/channel_mixing/Dense_1/kernel": (3072, 768),
        "MixerBlock_0/channel_mixing/Dense_1/bias": (768,),
        "pre_head_layer_norm/scale": (768,),
        "pre_head_layer_norm/bias": (768,),
        "head/kernel": (768, 1000),
        "head/bias": (1000,),
    }
    outside_blocks_1_to_11 = {
        k: v for k, v in shapes.items() if k.split("/")[0] not in {f"MixerBlock_{i}" for i in range(1, 12)}
    }
    assert outside_blocks_1_to_11 == expected
    assert set(params) == {"stem", "pre_head_layer_norm", "head"} | {f"MixerBlock_{i}" for i in range(12)}
    block_0 = flat_shapes(params["MixerBlock_0"])
    assert all(flat_shapes(params[f"MixerBlock_{i}"]) == block_0 for i in range(12))


# ---- MACs ----------------------------------------------------------------------
@pytest.mark.parametrize("name", PAPER_MODELS)
def test_exact_macs(name):
    macs = count_macs(get_model(name))
    assert macs == MACS[name]
    if name in PAPER_GMACS:
        assert round(macs / 1e9, 1) == PAPER_GMACS[name]


@pytest.mark.parametrize("name", ["s2mlp_wide", "s2mlp_deep"])
def test_s2mlp_macs_equal_the_papers_multiplication_formula(name):
    model = get_model(name)
    c, r, p, n, m = model.hidden_dim, model.mlp_ratio, model.patch_size, model.num_blocks, (224 // 16) ** 2
    assert count_macs(model) == n * m * c * c * (2 * r + 2) + 3 * m * c * p * p + c * 1000  # S²-MLP paper §3.4


def test_s2mlpv2_macs_with_the_weighted_sum_give_6_91_and_16_30():
    # The split-attention weighted sum Σ_k X_k ⊙ Ā[k] is 3·h·w·c elementwise multiplies per block.
    for name, printed in [("s2mlpv2_small", 6.91), ("s2mlpv2_medium", 16.30)]:
        model = get_model(name)
        stages = enumerate(zip(model.hidden_dims, model.depths, strict=True))
        extra = sum(3 * (32 // 2**s) ** 2 * c * d for s, (c, d) in stages)
        macs = count_macs(model)
        assert round((macs + extra) / 1e9, 2) == printed
        assert round(macs / 1e9, 2) == {"s2mlpv2_small": 6.90, "s2mlpv2_medium": 16.28}[name]


def test_summary_computes_the_formulas_and_its_notes_from_the_models():
    from s2mlp import summary

    params, flops, classifier = summary.s2mlp_formula(get_model("s2mlp_deep"))
    norms = (1 + 2 * 36) * 2 * 384  # the patch norm and two per block, which the paper's formula leaves out
    assert params == PARAMS["s2mlp_deep"][1] - norms == 53_476_224  # 53.5M, printed as 51M
    assert flops - classifier + 384 * 1000 == MACS["s2mlp_deep"]  # the classifier once, after the pooling
    assert round(flops / 1e9, 2) == 10.54  # the classifier on all 196 patches, as §3.4 writes it
    assert round(summary.s2mlp_formula(get_model("s2mlp_wide"))[0] / 1e6) == 71
    extra = summary.split_attention_multiplies(get_model("s2mlpv2_medium"))
    assert round((MACS["s2mlpv2_medium"] + extra) / 1e9, 2) == 16.30
    # Made-up counts come back in the table and notes: nothing there is typed in.
    fake = [(name, 1_000_001 + i, 1_000_000 + i, (i + 1) * 1_230_000_000, float("nan")) for i, name in
            enumerate(PAPER_MODELS)]  # fmt: skip
    table, notes = summary.table(fake), summary.notes(fake)
    assert "| note: s2mlp_deep | 1,000,002 | 1,000,001 | 2.46 |" in table and "53.5M (‡)" in table
    assert "our exact count is 1,000,001 without the head (1,000,002 with)" in notes
    assert f"has {6 * 1.23:.2f} GMACs" in notes  # mixer_b16, the 6th paper model
    assert (
        f"gives {(3 * 1.23e9 + summary.split_attention_multiplies(get_model('s2mlpv2_small'))) / 1e9:.2f}G /" in notes
    )


def test_count_macs_walks_nested_jaxprs():
    a, w = jax.ShapeDtypeStruct((8, 16), jnp.float32), jax.ShapeDtypeStruct((16, 32), jnp.float32)
    dot = 8 * 32 * 16

    @jax.custom_jvp
    def custom_jvp(a, w):
        return a @ w

    custom_jvp.defjvp(lambda primals, tangents: (custom_jvp(*primals), custom_jvp(*primals)))

    @jax.custom_vjp
    def custom_vjp(a, w):
        return a @ w

    custom_vjp.defvjp(lambda a, w: (a @ w, (a, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))

    cases = {
        "plain": (lambda a, w: a @ w, dot),
        "jit + remat": (lambda a, w: jax.jit(jax.checkpoint(lambda a, w: a @ w))(a, w), dot),
        "custom_jvp": (custom_jvp, dot),
        "custom_vjp": (custom_vjp, dot),
        "scan x5": (lambda a, w: jax.lax.scan(lambda c, _: (c @ jnp.eye(16), None), a, None, length=5)[0], 5 * 2048),
        "cond takes the max": (lambda a, w: jax.lax.cond(a.sum() > 0, lambda: (a @ w).sum(), lambda: a.sum()), dot),
        "batched dot": (lambda a, w: jnp.einsum("bij,bjk->bik", a[None].repeat(3, 0), w[None].repeat(3, 0)), 3 * dot),
    }
    for label, (fn, expected) in cases.items():
        assert jaxpr_macs(jax.make_jaxpr(fn)(a, w)) == expected, label
    x, k = jax.ShapeDtypeStruct((2, 9, 9, 12), jnp.float32), jax.ShapeDtypeStruct((3, 3, 4, 6), jnp.float32)
    grouped = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=3
    )
    assert jaxpr_macs(jax.make_jaxpr(grouped)(x, k)) == (2 * 9 * 9 * 6) * (3 * 3) * (12 // 3)


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_xla_flops_cross_check(name):
    compiled, _ = compiled_paper_model(name)
    ratio = cost_flops(compiled.cost_analysis()) / 2 / MACS[name]
    assert 1.0 <= ratio <= 1.08, ratio  # XLA also counts GELU, LayerNorm, softmax, ...


def test_xla_flops_and_its_return_forms():
    assert cost_flops({"flops": 6.0}) == cost_flops([{"flops": 6.0}]) == 6.0
    model = get_model("s2mlp_tiny")
    flops = xla_flops(model, 32)
    assert flops / 2 >= count_macs(model, 32) > 0
    params, x = abstract_params(model, 32), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    default = jax.jit(lambda p, x: model.apply(p, x, train=False)).lower(params, x).compile()
    assert cost_flops(default.cost_analysis()) == flops  # the fast compile does not change the count


# ---- forwards --------------------------------------------------------------------
@pytest.mark.parametrize("name", PAPER_MODELS)
def test_paper_model_forward_at_224(name):
    compiled, abstract = compiled_paper_model(name)
    logits = compiled(cheap_params(abstract), images(224))
    assert logits.shape == (1, 1000) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_forward_at_224_and_intermediates(name):
    model = get_model(name, image_size=224)
    params, x = cheap_params(abstract_params(model)), images(224, batch=2)
    logits, state = compiled_apply(model, params, x, intermediates=True)(params, x)
    assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    depth = sum(model.depths) if isinstance(model, S2MLPv2) else model.num_blocks
    blocks = [f"block_{i}_out" for i in range(depth)]
    assert set(state["intermediates"]) == {"stem_out", "pre_logits", *blocks}


@pytest.mark.parametrize("size, grid", [(160, 40), (288, 72)])
def test_s2mlp_at_other_resolutions(size, grid):
    tiny = get_model("s2mlp_tiny", image_size=size)
    params, x = cheap_params(abstract_params(tiny, size)), images(size)
    logits, state = compiled_apply(tiny, params, x, intermediates=True)(params, x)
    assert state["intermediates"]["block_1_out"][0].shape == (1, grid, grid, 32)
    assert logits.shape == (1, 1000) and np.isfinite(np.asarray(logits)).all()
    wide = get_model("s2mlp_wide", image_size=size, num_classes=10)
    params = cheap_params(abstract_params(wide, size))
    logits = compiled_apply(wide, params, x)(params, x)
    assert logits.shape == (1, 10) and np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("size, grids", [(154, (22, 11)), (294, (42, 21))])
def test_s2mlpv2_at_other_resolutions(size, grids):
    model = get_model("s2mlpv2_tiny", patch_size=7, image_size=size)
    params, x = cheap_params(abstract_params(model, size)), images(size)
    logits, state = compiled_apply(model, params, x, intermediates=True)(params, x)
    assert state["intermediates"]["block_0_out"][0].shape == (1, grids[0], grids[0], 16)
    assert state["intermediates"]["block_1_out"][0].shape == (1, grids[1], grids[1], 32)
    assert logits.shape == (1, 1000) and np.isfinite(np.asarray(logits)).all()


def test_s2mlpv2_rejects_sides_not_divisible_by_14():
    with pytest.raises(ValueError, match=r"image_size=160 .*multiple of 14"):
        get_model("s2mlpv2_small", image_size=160)


def test_mixer_at_another_resolution_raises():
    model = get_model("mixer_tiny", image_size=32)
    params = cheap_params(abstract_params(model, 32))
    assert jax.eval_shape(lambda p, x: model.apply(p, x, train=False), params, images(32)).shape == (1, 1000)
    with pytest.raises(ValueError, match=r"resolution.*32x32"):
        model.apply(params, images(64), train=False)


@pytest.mark.parametrize("name", TINY)
def test_bfloat16_compute_is_close_and_params_stay_float32(name):
    f32, bf16 = get_model(name), get_model(name, dtype="bfloat16")
    abstract = abstract_params(bf16, 32)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(abstract))
    params, x = cheap_params(abstract, seed=1), images(32, batch=2)  # random head kernel: logits not all zero
    ref = np.asarray(compiled_apply(f32, params, x)(params, x))
    low = compiled_apply(bf16, params, x)(params, x)
    assert low.dtype == jnp.float32
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(np.asarray(low), ref, rtol=0, atol=0.05 * np.abs(ref).max() + 0.02)
    assert not np.array_equal(np.asarray(low), ref)  # bf16 really was used


@pytest.mark.parametrize("name", TINY)
def test_drop_path_is_identity_at_eval_and_stochastic_in_training(name):
    model, plain = get_model(name, drop_path_rate=0.5), get_model(name, drop_path_rate=0.0)
    params, x = cheap_params(abstract_params(model, 32), seed=2), images(32, batch=4)
    evaluate = compiled_apply(model, params, x)
    evaluated = np.asarray(evaluate(params, x, jax.random.key(0)))
    np.testing.assert_array_equal(evaluated, np.asarray(evaluate(params, x, jax.random.key(1))))
    np.testing.assert_array_equal(evaluated, np.asarray(compiled_apply(plain, params, x)(params, x)))
    train = compiled_apply(model, params, x, train=True)
    trained = [np.asarray(train(params, x, jax.random.key(s))) for s in (0, 1)]
    assert not np.allclose(trained[0], trained[1])
    assert not np.allclose(trained[0], evaluated)


def test_drop_path_keeps_the_expectation():
    x = jnp.ones((20_000, 3, 2))
    out = np.asarray(DropPath(0.5).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)}))
    assert set(np.unique(out)) == {0.0, 2.0}  # kept branches scaled by 1 / (1 - rate)
    assert (out == out[:, :1, :1]).all()  # one decision per example
    assert abs(out.mean() - 1.0) < 0.03
    np.testing.assert_array_equal(np.asarray(DropPath(0.5).apply({}, x, deterministic=True)), np.asarray(x))


def test_mixer_drop_path_scales_by_one_minus_rate_in_double_precision():
    # Block 3 of 24 at drop_path_rate=0.3: float32(1 - rate) and 1 - float32(rate) differ in the last bit, and so
    # do the scales 1 / keep. Mixer's DropPath has always taken 1 - rate in double precision (the S² blocks, whose
    # rates are float32 arrays inside nn.scan, take the float32 form); sharing one implementation keeps both.
    rate = 0.3 * 10 / 23
    x = jnp.ones((1_000, 2))
    out = np.asarray(DropPath(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)}))
    assert set(np.unique(out)) == {0.0, np.float32(1.0) / np.float32(1.0 - rate)}
    assert np.float32(1.0) / np.float32(1.0 - rate) != np.float32(1.0) / (np.float32(1.0) - np.float32(rate))


# ---- registry errors and shift patterns ------------------------------------------------
@pytest.mark.parametrize(
    "name, kwargs, words",
    [
        ("s2mlp_huge", {}, ["s2mlp_huge", "s2mlp_wide", "mixer_b16"]),
        ("s2mlp_tiny", {"widht": 3}, ["widht", "hidden_dim"]),
        ("s2mlp_tiny", {"hidden_dim": 30}, ["hidden_dim=30", "multiple of 4"]),
        ("s2mlp_tiny", {"hidden_dim": 36, "shift_pattern": "eight"}, ["hidden_dim=36", "multiple of 8"]),
        ("s2mlp_tiny", {"shift_pattern": "diagonal"}, ["shift_pattern", "ss1"]),
        ("s2mlp_tiny", {"drop_path_rate": -0.1}, ["drop_path_rate=-0.1"]),
        ("s2mlpv2_tiny", {"hidden_dims": (16, 30)}, ["hidden_dims"]),
        ("mixer_tiny", {"hidden_dim": 0}, ["hidden_dim=0"]),
        ("s2mlp_tiny", {"dtype": "float64"}, ["dtype='float64'", "bfloat16"]),
        ("s2mlp_wide", {"image_size": 200}, ["image_size=200", "16"]),
        ("mixer_b16", {"image_size": 230}, ["image_size=230", "16"]),
    ],
)
def test_registry_errors_name_the_field(name, kwargs, words):
    with pytest.raises(ValueError) as error:
        get_model(name, **kwargs)
    for word in words:
        assert word in str(error.value)


TINY_FIELDS = {  # a valid set of fields per class; each case below spoils one
    S2MLP: dict(num_classes=10, patch_size=4, hidden_dim=32, num_blocks=2, mlp_ratio=2),
    S2MLPv2: dict(num_classes=10, patch_size=4, hidden_dims=(16, 32), depths=(1, 1)),
    MlpMixer: dict(num_classes=10, patch_size=4, num_blocks=2, hidden_dim=32, tokens_mlp_dim=16, channels_mlp_dim=64),
}


@pytest.mark.parametrize(
    "cls, bad, message",
    [
        (S2MLP, {"num_classes": 0}, "num_classes=0 must be a positive integer."),
        (MlpMixer, {"drop_path_rate": 1.0}, "drop_path_rate=1.0 must be in [0, 1)."),
        (S2MLPv2, {"patch_size": 0}, "patch_size=0 must be a positive integer."),
        (S2MLPv2, {"remat": "all"}, "remat='all' is unknown; choose one of ['none', 'full', 'dots']."),
        (MlpMixer, {"weight_init": "he"}, "weight_init='he' is unknown; choose one of ['flax', 'timm'] "
                                          "(docs/notes/initialisation.md)."),
        (S2MLP, {"hidden_dim": 36, "shift_pattern": "eight"},
         "hidden_dim=36 must be a positive multiple of 8 (the shift pattern's channel groups)."),
        (S2MLP, {"mlp_ratio": 0}, "mlp_ratio=0 must be a positive integer."),
        (S2MLP, {"norm": "batchnorm"}, "norm='batchnorm' is unknown; choose 'layernorm' or 'affine'."),
        (S2MLP, {"branch_scale_init": 0.1},
         "branch_scale_init=0.1 only sets the Affine that closes each branch: use it with norm='affine'."),
        (S2MLPv2, {"depths": (1, 1, 1)}, "hidden_dims=(16, 32) must have one entry per stage, like depths."),
        (S2MLPv2, {"depths": (1, 0)}, "depths=(1, 0) must all be positive integers."),
        (S2MLPv2, {"shift_patterns": ("ss1",)},
         f"shift_patterns=('ss1',) must be two patterns (branches 1 and 2) from {sorted(PATTERNS)}."),
        (MlpMixer, {"tokens_mlp_dim": 0}, "tokens_mlp_dim=0 must be a positive integer."),
        (S2MLPv2, {"depths": 2}, "depths=2 must be a tuple of integers, one per stage."),
        (S2MLPv2, {"hidden_dims": (16, "32")}, "hidden_dims=(16, '32') must be a tuple of integers, one per stage."),
        (S2MLP, {"num_blocks": 2.5}, "num_blocks=2.5 must be an integer."),
        (S2MLP, {"hidden_dim": None}, "hidden_dim=None must be an integer."),
        (MlpMixer, {"drop_path_rate": "0.1"}, "drop_path_rate='0.1' must be a number."),
        (S2MLP, {"shift_pattern": 8}, "shift_pattern=8 must be a string."),
        (S2MLPv2, {"shift_patterns": "ss1"}, "shift_patterns='ss1' must be a tuple of strings."),
    ],
)  # fmt: skip
def test_each_class_checks_its_fields_with_the_registrys_messages(cls, bad, message):
    cls.check_fields(TINY_FIELDS[cls])  # valid: no error
    with pytest.raises(ValueError) as error:
        cls.check_fields({**TINY_FIELDS[cls], **bad})
    assert str(error.value) == f"{cls.__name__}: {message}"
    with pytest.raises(ValueError) as error:
        cls.check_fields({**TINY_FIELDS[cls], **bad}, "some_model")
    assert str(error.value) == f"some_model: {message}"
    name = {S2MLP: "s2mlp_tiny", S2MLPv2: "s2mlpv2_tiny", MlpMixer: "mixer_tiny"}[cls]
    with pytest.raises(ValueError) as error:
        get_model(name, **{**TINY_FIELDS[cls], **bad})
    assert str(error.value) == f"{name}: {message}"  # get_model raises the class's own error


def test_check_fields_names_missing_fields():
    with pytest.raises(ValueError) as error:
        MlpMixer.check_fields({"num_classes": 10, "patch_size": 4})
    expected = (
        "MlpMixer: missing field(s) ['channels_mlp_dim', 'hidden_dim', 'num_blocks', 'tokens_mlp_dim'] of MlpMixer."
    )
    assert str(error.value) == expected


def test_input_divisor_and_block_groups_belong_to_the_models():
    assert get_model("s2mlp_wide").input_divisor == get_model("mixer_b16").input_divisor == 16
    assert get_model("s2mlpv2_small").input_divisor == 14 and get_model("s2mlpv2_tiny").input_divisor == 8
    assert get_model("s2mlpv2_tiny", hidden_dims=(16,), depths=(2,)).input_divisor == 4  # one stage: no downsampling
    assert get_model("s2mlp_tiny").block_groups() == [("blocks", ["block_0", "block_1"])]
    v2 = get_model("s2mlpv2_tiny", depths=(2, 1))
    assert v2.block_groups() == [("stage_0", ["block_0", "block_1"]), ("stage_1", ["block_2"])]
    assert get_model("mixer_tiny").block_groups() == []
    with pytest.raises(ValueError) as error:
        get_model("s2mlpv2_tiny", image_size=30)
    assert str(error.value) == (
        "image_size=30 is not a positive multiple of 8 (the patch size × 2 for the downsampling of s2mlpv2_tiny); "
        "use e.g. 32."
    )


@pytest.mark.parametrize(
    "name, old, new",
    [
        ("s2mlp_tiny", {"expansion": 3}, {"mlp_ratio": 3}),
        ("s2mlpv2_tiny", {"num_blocks": (2, 1)}, {"depths": (2, 1)}),
        ("s2mlpv2_tiny", {"num_blocks": [2, 1]}, {"depths": (2, 1)}),  # a list, as JSON gives it
    ],
)
def test_former_field_names_build_the_same_model_with_a_future_warning(name, old, new):
    (new_field,) = new
    with pytest.warns(FutureWarning, match=f"is now '{new_field}'"):
        model = get_model(name, num_classes=10, **old)
    reference = get_model(name, num_classes=10, **new)
    assert np.array_equal(getattr(model, new_field), new[new_field])
    size = reference.input_divisor * 4
    assert count(abstract_params(model, size)) == count(abstract_params(reference, size))
    assert count(abstract_params(model, size)) != count(abstract_params(get_model(name, num_classes=10), size))


def test_former_field_names_in_a_saved_config_still_load():
    saved = {"model": {"name": "s2mlp_tiny", "overrides": {"hidden_dim": 64, "num_blocks": 4, "expansion": 2}},
             "image_size": 32}  # fmt: skip
    with pytest.warns(FutureWarning, match="mlp_ratio"):
        assert from_config(saved, 10).mlp_ratio == 2
    saved = {"model": {"name": "s2mlpv2_tiny", "overrides": {"num_blocks": [1, 2]}}, "image_size": 32}
    with pytest.warns(FutureWarning, match="depths"):
        assert from_config(saved, 10).depths == (1, 2)


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("s2mlp_tiny", {"expansion": 3, "mlp_ratio": 3}, "s2mlp_tiny: expansion=3 is the former name of mlp_ratio; "
                                                         "give only mlp_ratio."),
        ("s2mlpv2_tiny", {"num_blocks": (1, 1), "depths": (1, 1)},
         "s2mlpv2_tiny: num_blocks=(1, 1) is the former name of depths; give only depths."),
        ("s2mlpv2_tiny", {"num_blocks": 2}, "model override(s) ['num_blocks'] are not fields of s2mlpv2_tiny"),
        ("s2mlp_wide", {"depths": (1, 1)}, "model override(s) ['depths'] are not fields of s2mlp_wide"),
        ("mixer_tiny", {"mlp_ratio": 2}, "model override(s) ['mlp_ratio'] are not fields of mixer_tiny"),
    ],
)  # fmt: skip
def test_old_and_new_name_together_or_in_the_wrong_family_are_refused(name, overrides, message):
    with pytest.raises(ValueError) as error:
        get_model(name, **overrides)
    assert str(error.value).startswith(message)


def test_every_shift_pattern_runs_in_s2mlp_tiny():
    x = images(32, batch=2)
    params = cheap_params(abstract_params(get_model("s2mlp_tiny"), 32), seed=3)
    for pattern in PATTERNS:  # traced (shapes and code path) for every pattern
        model = get_model("s2mlp_tiny", shift_pattern=pattern, image_size=32)
        assert flat_shapes(abstract_params(model, 32)) == flat_shapes(params)  # the shift has no parameters
        assert jax.eval_shape(lambda p, x: model.apply(p, x, train=False), params, x).shape == (2, 1000)
    outputs = {}
    for pattern in ["none", "ss1", "eight"]:  # and run for a few
        model = get_model("s2mlp_tiny", shift_pattern=pattern)
        outputs[pattern] = np.asarray(compiled_apply(model, params, x)(params, x))
        assert np.isfinite(outputs[pattern]).all()
    assert not np.allclose(outputs["none"], outputs["ss1"])
    assert not np.allclose(outputs["ss1"], outputs["eight"])


# ---- initialisation options (docs/notes/initialisation.md) ----------------------------
def initial_params(model, size: int = 32, seed: int = 0):
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    return jax.jit(lambda key: model.init(key, x, train=False))(jax.random.key(seed))["params"]


def test_resmlp_depth_rule_for_the_branch_scale():
    from s2mlp.models.layers import resmlp_branch_scale

    rule = {depth: resmlp_branch_scale(depth) for depth in (1, 12, 18, 19, 24, 25, 36)}
    assert rule == {1: 0.1, 12: 0.1, 18: 0.1, 19: 1e-5, 24: 1e-5, 25: 1e-6, 36: 1e-6}


@pytest.mark.parametrize(
    "overrides, branch", [({}, 0.1), ({"branch_scale_init": 0.3}, 0.3), ({"num_blocks": 20}, 1e-5)]
)
def test_affine_branch_scale_init_and_the_patch_norm_at_one(overrides, branch):
    params = initial_params(get_model("s2mlp_tiny", norm="affine", **overrides))
    scales = {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params, sep="/").items() if "norm" in k}
    assert len(scales) == 2 * (1 + 2 * overrides.get("num_blocks", 2))
    for key, value in scales.items():
        expected = 0.0 if key.endswith("bias") else 1.0 if key.startswith("patch_norm") else branch
        np.testing.assert_array_equal(value, np.full((32,), expected, np.float32), err_msg=key)


def test_layernorm_s2mlp_ignores_nothing_silently():
    layernorm = initial_params(get_model("s2mlp_tiny"))
    np.testing.assert_array_equal(np.asarray(layernorm["block_1"]["norm2"]["scale"]), np.ones(32, np.float32))
    with pytest.raises(ValueError, match=r"branch_scale_init=0\.1 .*norm='affine'"):
        get_model("s2mlp_tiny", branch_scale_init=0.1)


def test_s2mlp_deep_block_std_at_init_is_bounded_and_grows_with_scale_one():
    model = get_model("s2mlp_deep", num_classes=10)
    params = initial_params(model)
    assert float(params["block_35"]["norm2"]["scale"][0]) == np.float32(1e-6)  # ResMLP-36's rule
    assert float(params["patch_norm"]["scale"][0]) == 1.0
    scale_one = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.ones_like(v) if path[-2].key in ("norm1", "norm2") and path[-1].key == "scale" else v,
        params,
    )
    x = images(32, batch=2)
    forward = compiled_apply(model, {"params": params}, x, intermediates=True)

    def block_std(p):
        inter = forward({"params": p}, x)[1]["intermediates"]
        return [float(jnp.std(inter[f"block_{i}_out"][0])) for i in range(36)]

    default, one = block_std(params), block_std(scale_one)
    assert default[-1] / default[0] < 1.001  # measured 1.0000
    assert one[-1] / one[0] > 1e5  # measured 1.9e6: 72 unnormalised branches in series
    assert one[13] > 100  # measured 266


@pytest.mark.parametrize("name", TINY)
def test_flax_weight_init_reproduces_the_previous_initialisation(name):
    # Sum of squares of all parameters and three kernel entries, from the code before `weight_init`
    # existed (Flax defaults: lecun_normal kernels, zero biases), key 0, 10 classes, 32×32.
    previous = {
        "s2mlp_tiny": (
            503.43661801925714,
            "block_0/fc1/kernel",
            [-0.0005295187584124506, -0.27489787340164185, 0.09349459409713745],
        ),
        "s2mlpv2_tiny": (
            661.5327480906813,
            "block_0/channel_mlp_fc1/kernel",
            [0.12638480961322784, 0.14881595969200134, -0.18076051771640778],
        ),
        "mixer_tiny": (
            549.1989812678705,
            "MixerBlock_0/channel_mixing/Dense_0/kernel",
            [-0.028238967061042786, -0.08310973644256592, 0.180719256401062],
        ),
    }
    total, key, first = previous[name]
    flat = flax.traverse_util.flatten_dict(initial_params(get_model(name, num_classes=10, weight_init="flax")), sep="/")
    assert sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in flat.values()) == pytest.approx(total, rel=1e-6)
    np.testing.assert_allclose(np.asarray(flat[key]).ravel()[:3], first, rtol=1e-6)
    default = flax.traverse_util.flatten_dict(initial_params(get_model(name, num_classes=10)), sep="/")
    assert flat_shapes(default) == flat_shapes(flat)


@pytest.mark.parametrize("name", TINY)
def test_timm_weight_init_truncated_normal_002_zero_biases_zero_head(name):
    overrides = {"hidden_dim": 64} if name != "s2mlpv2_tiny" else {"hidden_dims": (32, 64)}
    flax_params = initial_params(get_model(name, num_classes=10, **overrides))
    flat = flax.traverse_util.flatten_dict(
        initial_params(get_model(name, num_classes=10, weight_init="timm", **overrides)), sep="/"
    )
    assert flat_shapes(flat) == flat_shapes(flax_params)  # only values change
    kernels = {k: np.asarray(v) for k, v in flat.items() if k.endswith("kernel") and not k.startswith("head")}
    assert len(kernels) == {"s2mlp_tiny": 9, "s2mlpv2_tiny": 14, "mixer_tiny": 9}[name]
    pooled = np.concatenate([v.ravel() for v in kernels.values()])
    assert pooled.size > 20_000
    assert abs(pooled.std() / 0.02 - 1) < 0.03 and abs(pooled.mean()) < 0.001
    assert np.abs(pooled).max() <= 2 * 0.02 / 0.8796256610342398 + 1e-7  # truncated at ±2 underlying stds
    assert np.abs(pooled).max() > 0.04  # and the tails up to the cut are there
    for key, value in flat.items():
        if key.endswith("bias") or key.startswith("head"):
            np.testing.assert_array_equal(np.asarray(value), 0.0, err_msg=key)
        elif key.endswith("scale"):
            np.testing.assert_array_equal(np.asarray(value), 1.0, err_msg=key)
    key = max(kernels, key=lambda k: kernels[k].size)  # one big kernel alone, and its lecun_normal 'flax' twin
    assert abs(kernels[key].std() / 0.02 - 1) < 0.05
    lecun = np.asarray(flax.traverse_util.flatten_dict(flax_params, sep="/")[key])
    assert abs(lecun.std() * math.sqrt(math.prod(lecun.shape[:-1])) - 1) < 0.05


@pytest.mark.parametrize(
    "name, kwargs, words",
    [
        ("s2mlp_tiny", {"weight_init": "xavier"}, ["weight_init='xavier'", "'flax'", "'timm'"]),
        ("s2mlpv2_tiny", {"weight_init": "jax"}, ["weight_init='jax'", "'timm'"]),
        ("mixer_tiny", {"weight_init": "TIMM"}, ["weight_init='TIMM'", "'flax'"]),
        ("s2mlp_tiny", {"norm": "affine", "branch_scale_init": 0.0}, ["branch_scale_init=0.0", "positive"]),
        ("s2mlp_tiny", {"norm": "affine", "branch_scale_init": -1e-6}, ["branch_scale_init=-1e-06", "None"]),
        ("s2mlp_tiny", {"norm": "affine", "branch_scale_init": "auto"}, ["branch_scale_init='auto'", "None"]),
        ("s2mlp_deep", {"branch_scale_init": float("nan")}, ["branch_scale_init=nan"]),
        ("mixer_tiny", {"branch_scale_init": 0.1}, ["branch_scale_init", "not fields"]),
    ],
)
def test_initialisation_options_reject_bad_values(name, kwargs, words):
    with pytest.raises(ValueError) as error:
        get_model(name, **kwargs)
    for word in words:
        assert word in str(error.value)


def _recorded(model, module_type, attribute, *, train):
    """`attribute` of every `module_type` submodule called in one forward pass of `model` (32×32 input)."""
    seen = []

    def record(f, args, kwargs, context):
        if isinstance(context.module, module_type) and context.method_name == "__call__":
            seen.append(getattr(context.module, attribute))
        return f(*args, **kwargs)

    x = jnp.zeros((1, 32, 32, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    with flax.linen.intercept_methods(record):
        model.apply(variables, x, train=train, rngs={"dropout": jax.random.key(1)})
    return seen


def test_mixer_drop_path_rates_rise_linearly_over_its_blocks_and_its_norms_take_eps_1e_6():
    """0, rate/2, rate over 3 blocks (each block's two branches), as the S² models; every block had the full rate.
    vision_transformer's LayerNorm epsilon, 1e-6 (1e-5 stayed inside the eval test's tolerance)."""
    model = get_model("mixer_tiny", num_classes=10, num_blocks=3, drop_path_rate=0.5)
    assert _recorded(model, DropPath, "rate", train=True) == pytest.approx([0.0, 0.0, 0.25, 0.25, 0.5, 0.5])
    assert set(_recorded(model, flax.linen.LayerNorm, "epsilon", train=False)) == {1e-6}


@pytest.mark.parametrize("name, fields, stack", [("s2mlp_tiny", {"num_blocks": 3}, "blocks"),
                                                 ("s2mlpv2_tiny", {"depths": (1, 3)}, "stage_1")])  # fmt: skip
def test_scanned_blocks_start_from_different_weights(name, fields, stack):
    """Each block of a scanned stack draws its own initial weights (with one key for all, training started from
    identical blocks)."""
    model = get_model(name, num_classes=10, scan=True, **fields)
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)), train=False)["params"][stack]
    for kernel in [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params) if "kernel" in str(path[-1])]:
        assert kernel.shape[0] == 3 and not np.allclose(kernel[0], kernel[1]) and not np.allclose(kernel[1], kernel[2])
