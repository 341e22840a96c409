"""The spatial shift (`s2mlp/shift.py`) against the S²-MLP paper's Algorithm 1, by hand and by NumPy."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2mlp.shift import PATTERNS, num_groups, shift_as_conv_kernel, spatial_shift

SHAPES = [(1, 1, 1, 4), (2, 1, 5, 8), (2, 3, 7, 12), (1, 6, 4, 4), (2, 5, 5, 16)]


# ---- references -------------------------------------------------------------
def literal_ss1(x: np.ndarray) -> np.ndarray:
    """The S²-MLP paper's Algorithm 1 for SS1, transcribed with copy semantics."""
    c = x.shape[-1] // 4
    q1, q2, q3, q4 = (slice(k * c, (k + 1) * c) for k in range(4))
    y = x.copy()
    y[:, 1:, :, q1] = x[:, :-1, :, q1]
    y[:, :-1, :, q2] = x[:, 1:, :, q2]
    y[:, :, 1:, q3] = x[:, :, :-1, q3]
    y[:, :, :-1, q4] = x[:, :, 1:, q4]
    return y


def literal_ss2(x: np.ndarray) -> np.ndarray:
    """SS2: the same with the axes swapped (q1, q2 along columns; q3, q4 along rows)."""
    c = x.shape[-1] // 4
    q1, q2, q3, q4 = (slice(k * c, (k + 1) * c) for k in range(4))
    y = x.copy()
    y[:, :, 1:, q1] = x[:, :, :-1, q1]
    y[:, :, :-1, q2] = x[:, :, 1:, q2]
    y[:, 1:, :, q3] = x[:, :-1, :, q3]
    y[:, :-1, :, q4] = x[:, 1:, :, q4]
    return y


def source_index(n: int, step: int) -> np.ndarray:
    """Where each of `n` positions reads from after a ±1 move keeping the border: t - step, clamped."""
    return np.clip(np.arange(n) - step, 0, n - 1)


def numpy_shift(x: np.ndarray, pattern: str) -> np.ndarray:
    """Any pattern: group g reads x[i - dr, j - dc], the border keeping its own value."""
    groups = np.split(x, num_groups(pattern), axis=-1)
    moved = [
        g[:, source_index(x.shape[1], dr)][:, :, source_index(x.shape[2], dc)]
        for g, (dr, dc) in zip(groups, PATTERNS[pattern], strict=True)
    ]
    return np.concatenate(moved, axis=-1)


def random(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---- the literal algorithm ----------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pattern, literal", [("ss1", literal_ss1), ("ss2", literal_ss2)])
def test_equals_literal_algorithm(pattern, literal, shape):
    x = random(shape)
    np.testing.assert_array_equal(np.asarray(spatial_shift(jnp.asarray(x), pattern)), literal(x))


def test_ss2_is_ss1_with_axes_swapped():
    x = random((2, 5, 7, 8))
    swapped = np.swapaxes(literal_ss1(np.swapaxes(x, 1, 2)), 1, 2)
    np.testing.assert_array_equal(np.asarray(spatial_shift(jnp.asarray(x), "ss2")), swapped)


# ---- by hand on a 3×3 grid ----------------------------------------------------
GRID = np.arange(1, 10, dtype=np.float32).reshape(3, 3)  # [[1 2 3] [4 5 6] [7 8 9]]
DOWN = [[1, 2, 3], [1, 2, 3], [4, 5, 6]]  # (+1, 0): out[i] = x[i-1], row 0 kept
UP = [[4, 5, 6], [7, 8, 9], [7, 8, 9]]  # (-1, 0): out[i] = x[i+1], row 2 kept
RIGHT = [[1, 1, 2], [4, 4, 5], [7, 7, 8]]  # (0, +1): out[:, j] = x[:, j-1], column 0 kept
LEFT = [[2, 3, 3], [5, 6, 6], [8, 9, 9]]  # (0, -1): out[:, j] = x[:, j+1], column 2 kept
DOWN_RIGHT = [[1, 1, 2], [1, 1, 2], [4, 4, 5]]
DOWN_LEFT = [[2, 3, 3], [2, 3, 3], [5, 6, 6]]
UP_RIGHT = [[4, 4, 5], [7, 7, 8], [7, 7, 8]]
UP_LEFT = [[5, 6, 6], [8, 9, 9], [8, 9, 9]]
BY_HAND = {
    "ss1": [DOWN, UP, RIGHT, LEFT],
    "ss2": [RIGHT, LEFT, DOWN, UP],
    "eight": [DOWN, UP, RIGHT, LEFT, DOWN_RIGHT, DOWN_LEFT, UP_RIGHT, UP_LEFT],
    "up_right": [UP, RIGHT],
    "left_down": [LEFT, DOWN],
    "vertical": [DOWN, UP],
    "horizontal": [RIGHT, LEFT],
    "up": [UP],
    "down": [DOWN],
    "left": [LEFT],
    "right": [RIGHT],
    "none": [GRID],
}


def test_by_hand_covers_every_pattern():
    assert set(BY_HAND) == set(PATTERNS)


@pytest.mark.parametrize("pattern", sorted(BY_HAND))
@pytest.mark.parametrize("per_group", [1, 2])
def test_3x3_by_hand(pattern, per_group):
    groups = num_groups(pattern)
    channels = groups * per_group
    offsets = 100.0 * np.arange(channels, dtype=np.float32)  # tells the channels apart
    x = GRID[None, :, :, None] + offsets
    expected = np.stack([np.asarray(BY_HAND[pattern][c // per_group], np.float32) for c in range(channels)], -1)
    expected = expected[None] + offsets
    out = spatial_shift(jnp.asarray(x), pattern)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(out), expected)


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_every_pattern_reads_the_right_neighbour(pattern):
    shape = (2, 5, 6, 2 * num_groups(pattern))
    x = random(shape, seed=1)
    out = np.asarray(spatial_shift(jnp.asarray(x), pattern))
    assert out.shape == shape
    np.testing.assert_array_equal(out, numpy_shift(x, pattern))
    # A permutation with border copies: every output value is an input value of its own channel.
    for c in range(shape[-1]):
        assert np.isin(out[..., c], x[..., c]).all()


# ---- against the conv form and jnp.roll ---------------------------------------
def depthwise_conv(x: jax.Array, pattern: str) -> jax.Array:
    kernel = shift_as_conv_kernel(pattern, x.shape[-1])
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1]
    )


@pytest.mark.parametrize("pattern", ["ss1", "ss2", "eight", "up_right"])
@pytest.mark.parametrize("shape", [(2, 5, 7, 8), (1, 6, 4, 16)])
def test_conv_form_agrees_in_the_interior_only(pattern, shape):
    x = jnp.asarray(random(shape, seed=2))
    shifted, conv = np.asarray(spatial_shift(x, pattern)), np.asarray(depthwise_conv(x, pattern))
    np.testing.assert_allclose(shifted[:, 1:-1, 1:-1], conv[:, 1:-1, 1:-1], rtol=0, atol=1e-6)
    border = np.ones(shape, bool)
    border[:, 1:-1, 1:-1] = False
    assert not np.allclose(shifted[border], conv[border])  # the conv zero-pads; the paper keeps the value


def rolled(x: jax.Array, pattern: str) -> jax.Array:
    groups = jnp.split(x, num_groups(pattern), axis=-1)
    moved = [jnp.roll(g, (dr, dc), axis=(1, 2)) for g, (dr, dc) in zip(groups, PATTERNS[pattern], strict=True)]
    return jnp.concatenate(moved, axis=-1)


@pytest.mark.parametrize("pattern", ["ss1", "ss2"])
def test_roll_wraps_around_so_it_differs_at_the_border(pattern):
    x = jnp.asarray(random((2, 5, 6, 8), seed=3))
    shifted, roll = np.asarray(spatial_shift(x, pattern)), np.asarray(rolled(x, pattern))
    np.testing.assert_array_equal(shifted[:, 1:-1, 1:-1], roll[:, 1:-1, 1:-1])
    assert not np.array_equal(shifted, roll)
    # Exactly the received row/column differs: e.g. ss1's q1 (down) row 0 gets the last row from roll.
    q1 = slice(0, 2) if pattern == "ss1" else slice(4, 6)
    np.testing.assert_array_equal(roll[:, 0, :, q1], np.asarray(x)[:, -1, :, q1])
    np.testing.assert_array_equal(shifted[:, 0, :, q1], np.asarray(x)[:, 0, :, q1])


# ---- errors, jit, grad, HLO -----------------------------------------------------
@pytest.mark.parametrize("pattern, channels", [("ss1", 6), ("eight", 12), ("up_right", 3), ("ss2", 2)])
def test_channels_not_divisible_raise(pattern, channels):
    with pytest.raises(ValueError, match="shift_pattern"):
        spatial_shift(jnp.zeros((1, 3, 3, channels)), pattern)


def test_unknown_pattern_and_bad_rank_raise():
    with pytest.raises(ValueError, match="shift_pattern='diagonal'"):
        spatial_shift(jnp.zeros((1, 3, 3, 4)), "diagonal")
    with pytest.raises(ValueError, match="NHWC"):
        spatial_shift(jnp.zeros((3, 3, 4)), "ss1")


@pytest.mark.parametrize("pattern", ["ss1", "ss2", "eight", "left_down"])
def test_jit_and_grad_is_the_transpose(pattern):
    shape = (2, 4, 5, 8)
    x, w = random(shape, seed=4), random(shape, seed=5)
    f = jax.jit(lambda x: spatial_shift(x, pattern))
    np.testing.assert_array_equal(np.asarray(f(jnp.asarray(x))), numpy_shift(x, pattern))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(spatial_shift(x, pattern) * w)))(jnp.asarray(x))
    # Transpose of the gather out[b, i, j, c] = x[b, r(i), s(j), c]: scatter-add w back to the sources.
    expected = np.zeros(shape, np.float32)
    per_group = shape[-1] // num_groups(pattern)
    for c in range(shape[-1]):
        dr, dc = PATTERNS[pattern][c // per_group]
        rows, cols = np.meshgrid(source_index(shape[1], dr), source_index(shape[2], dc), indexing="ij")
        for b in range(shape[0]):
            np.add.at(expected[b, :, :, c], (rows, cols), w[b, :, :, c])
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-6, atol=1e-6)


def hlo_ops(compiled_text: str) -> set[str]:
    """Every ``name(`` in an HLO module's text: the opcodes (plus a few harmless metadata words)."""
    return set(re.findall(r"\b([a-z][a-z0-9_-]*)\(", compiled_text))


@pytest.mark.parametrize("pattern", ["ss1", "eight"])
def test_compiled_hlo_has_no_gather_or_scatter(pattern):
    x = jax.ShapeDtypeStruct((2, 14, 14, 64), jnp.float32)
    forward = jax.jit(lambda x: spatial_shift(x, pattern)).lower(x).compile().as_text()
    backward = jax.jit(jax.grad(lambda x: jnp.sum(spatial_shift(x, pattern) ** 2))).lower(x).compile().as_text()
    for hlo in (forward, backward):
        ops = hlo_ops(hlo)
        assert "slice" in ops or "fusion" in ops  # the parser sees the opcodes
        assert not ops & {"gather", "scatter"}, sorted(ops)
