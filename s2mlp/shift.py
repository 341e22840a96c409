"""The spatial-shift operation of S²-MLP and S²-MLPv2 (S²-MLP paper §3.2 and Algorithm 1).

Arrays are NHWC, ``x[b, i, j, c]``: axis 1 is rows (height), axis 2 is columns (width). Channels are split into
equal consecutive groups and each group is moved by one position along one spatial axis. "+1 along axis k" means
``out[.., t, ..] = x[.., t - 1, ..]`` for ``t >= 1``; the one row/column that receives no value **keeps its own
original value** (Algorithm 1 of both papers, applied literally). It is *not* ``jnp.roll`` (which wraps around) and
*not* a zero-padded convolution (which zeroes the border): the three agree only in the interior.

The op is built from slices and concatenates only, so XLA fuses it into the
elementwise work around it: no gather, no scatter, no parameters, no FLOPs.

Named patterns (a direction is ``(d_rows, d_cols)``; "down" is ``(+1, 0)``,
content moving to higher row indices, "right" is ``(0, +1)``):

=============  ======  ====================================================
pattern        groups  directions, in channel order
=============  ======  ====================================================
``ss1``        4       down, up, right, left     (S²-MLP; S²-MLPv2 branch 1)
``ss2``        4       right, left, down, up     (S²-MLPv2 branch 2)
``eight``      8       ss1's four, then the diagonals (+1,+1) (+1,-1)
                       (-1,+1) (-1,-1)           (S²-MLP Table 7 (b))
``up_right``   2       up, right                 (Table 7 (c))
``left_down``  2       left, down                (Table 7 (d))
``vertical``   2       down, up                  (Table 7 (e))
``horizontal`` 2       right, left               (Table 7 (f))
``up``, ``down``, ``left``, ``right``
               1       that one direction        (Table 7 (g)-(j))
``none``       1       no shift                  (Table 7 "w/o")
=============  ======  ====================================================

The figure in the paper does not say which single direction is which of (g)-(j); the four single-direction runs
span 77.5-78.4 top-1 there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DOWN, UP, RIGHT, LEFT = (1, 0), (-1, 0), (0, 1), (0, -1)

PATTERNS: dict[str, tuple[tuple[int, int], ...]] = {
    "ss1": (DOWN, UP, RIGHT, LEFT),
    "ss2": (RIGHT, LEFT, DOWN, UP),
    "eight": (DOWN, UP, RIGHT, LEFT, (1, 1), (1, -1), (-1, 1), (-1, -1)),
    "up_right": (UP, RIGHT),
    "left_down": (LEFT, DOWN),
    "vertical": (DOWN, UP),
    "horizontal": (RIGHT, LEFT),
    "up": (UP,),
    "down": (DOWN,),
    "left": (LEFT,),
    "right": (RIGHT,),
    "none": ((0, 0),),
}


def num_groups(pattern: str) -> int:
    """Number of channel groups of `pattern`; channels must divide by it."""
    return len(_directions(pattern))


def _directions(pattern: str) -> tuple[tuple[int, int], ...]:
    if pattern not in PATTERNS:
        raise ValueError(f"shift_pattern={pattern!r} is unknown; choose one of {sorted(PATTERNS)}.")
    return PATTERNS[pattern]


def shift_axis(x: jax.Array, axis: int, step: int) -> jax.Array:
    """Moves `x` by `step` in {-1, 0, +1} along `axis`, keeping the border.

    ``step=+1``: ``out[t] = x[t - 1]`` for ``t >= 1`` and ``out[0] = x[0]``.
    ``step=-1``: ``out[t] = x[t + 1]`` for ``t < n - 1`` and ``out[n-1] = x[n-1]``.
    """
    n = x.shape[axis]
    if step == 0 or n == 1:
        return x
    take = lambda start, stop: jax.lax.slice_in_dim(x, start, stop, axis=axis)  # noqa: E731
    if step == 1:
        return jnp.concatenate([take(0, 1), take(0, n - 1)], axis=axis)
    if step == -1:
        return jnp.concatenate([take(1, n), take(n - 1, n)], axis=axis)
    raise ValueError(f"step must be -1, 0 or +1, got {step}.")


def spatial_shift(x: jax.Array, pattern: str = "ss1") -> jax.Array:
    """Applies the spatial shift `pattern` to NHWC `x` of shape (B, H, W, C); same shape and dtype out.

    C is split into ``num_groups(pattern)`` equal consecutive groups; group g is moved by the g-th direction of the
    pattern (see the module docstring). A diagonal move is a row move then a column move, each keeping the border.
    """
    directions = _directions(pattern)
    if x.ndim != 4:
        raise ValueError(f"spatial_shift expects NHWC input (B, H, W, C), got shape {x.shape}.")
    channels = x.shape[-1]
    if channels % len(directions):
        raise ValueError(
            f"shift_pattern={pattern!r} splits channels into {len(directions)} groups, "
            f"but the input has {channels} channels; use a multiple of {len(directions)}."
        )
    groups = jnp.split(x, len(directions), axis=-1) if len(directions) > 1 else [x]
    moved = [shift_axis(shift_axis(g, 1, dr), 2, dc) for g, (dr, dc) in zip(groups, directions)]
    return moved[0] if len(moved) == 1 else jnp.concatenate(moved, axis=-1)


def shift_as_conv_kernel(pattern: str, channels: int) -> jax.Array:
    """The one-hot depthwise 3×3 kernel (3, 3, 1, C) equal to the shift in the interior.

    Each group's kernel has a single 1 at the neighbour it copies from (paper §3.3): the output at (i, j) reads the
    input at (i - dr, j - dc). Use with ``feature_group_count=C`` and SAME padding; at the border the convolution
    zero-pads, while `spatial_shift` keeps the border value.
    """
    directions = _directions(pattern)
    per_group = channels // len(directions)
    kernel = jnp.zeros((3, 3, 1, channels), jnp.float32)
    for g, (dr, dc) in enumerate(directions):
        kernel = kernel.at[1 - dr, 1 - dc, 0, g * per_group : (g + 1) * per_group].set(1.0)
    return kernel
