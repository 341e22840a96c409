"""S²-MLPv2 (Yu et al., 2021): the paper's §4 (Eqs. 1-5) and Table 1.

ViP's two-stage pyramid: a 7×7 stride-7 conv patch embedding, stage 1 blocks,
a 2×2 stride-2 conv downsampling (c1 -> c2), stage 2 blocks, final LayerNorm,
mean pool, Dense head. Pre-norm blocks (Eq. 5) with DropPath on both branches::

    y = x + S2MLPv2Module(LN(x))
    z = y + ChannelMLP(LN(y))           Dense(3c) -> GELU -> Dense(c)

S2MLPv2Module: Dense c -> 3c, split into X1, X2, X3; X1 <- SS1(X1),
X2 <- SS2(X2), X3 unshifted; split attention over the three; Dense c -> c.
Split attention (ResNeSt via ViP, Eqs. 2-4) with hidden width c/4 and biases,
the choice that reproduces the paper's 25.1M / 55.3M parameters.
Works at any H, W divisible by 14 (patch 7, then downsampling by 2).
`weight_init` picks the Dense/conv kernels ('flax' or 'timm'; docs/notes/initialisation.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from s2mlp.models.layers import Dtype, block_stack, drop_path, drop_path_rates, kernel_init
from s2mlp.shift import spatial_shift


def _layernorm(dtype: Dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-6, dtype=dtype, name=name)


class SplitAttention(nn.Module):
    """Re-weights K branches (B, K, h, w, c) per channel; returns (B, h, w, c)."""

    dtype: Dtype = jnp.float32
    weight_init: str = "flax"

    @nn.compact
    def __call__(self, branches: jax.Array) -> jax.Array:
        _, k, _, _, c = branches.shape
        a = jnp.mean(jnp.sum(branches, axis=1), axis=(1, 2))  # (B, c)
        a = nn.Dense(c // 4, dtype=self.dtype, kernel_init=kernel_init(self.weight_init), name="fc1")(a)
        a = nn.Dense(k * c, dtype=self.dtype, kernel_init=kernel_init(self.weight_init), name="fc2")(
            nn.gelu(a, approximate=False)
        )
        weights = jax.nn.softmax(a.reshape(-1, k, 1, 1, c).astype(jnp.float32), axis=1)
        return jnp.sum(branches * weights.astype(branches.dtype), axis=1)


class S2MLPv2Module(nn.Module):
    """The spatial-shift token mixer: Dense(3c), SS1 / SS2 / identity, split attention, Dense(c).

    `shift_patterns` are the shifts of branches 1 and 2 (("none", "none") for ablations).
    """

    shift_patterns: tuple[str, str] = ("ss1", "ss2")
    dtype: Dtype = jnp.float32
    weight_init: str = "flax"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = nn.Dense(3 * c, dtype=self.dtype, kernel_init=kernel_init(self.weight_init), name="fc1")(x)
        x1, x2, x3 = jnp.split(x, 3, axis=-1)
        p1, p2 = self.shift_patterns
        branches = jnp.stack([spatial_shift(x1, p1), spatial_shift(x2, p2), x3], axis=1)
        x = SplitAttention(self.dtype, self.weight_init, name="split_attention")(branches)
        return nn.Dense(c, dtype=self.dtype, kernel_init=kernel_init(self.weight_init), name="fc2")(x)


class S2MLPv2Block(nn.Module):
    """One pre-norm block, called as ``block(x, rate, key, train)`` like `s2mlp.S2MLPBlock`."""

    mlp_ratio: int = 3
    shift_patterns: tuple[str, str] = ("ss1", "ss2")
    dtype: Dtype = jnp.float32
    weight_init: str = "flax"
    scanned: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, rate: jax.Array, key: jax.Array | None, train: bool):
        c = x.shape[-1]
        keys = (None, None) if key is None else tuple(jax.random.split(key))
        mixer = S2MLPv2Module(self.shift_patterns, self.dtype, self.weight_init, name="spatial_mlp")
        x = x + drop_path(mixer(_layernorm(self.dtype, "norm1")(x)), rate, keys[0], deterministic=not train)
        y = _layernorm(self.dtype, "norm2")(x)
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, dtype=self.dtype, kernel_init=kernel_init(self.weight_init), name=name
        )
        y = dense(self.mlp_ratio * c, "channel_mlp_fc1")(y)
        y = dense(c, "channel_mlp_fc2")(nn.gelu(y, approximate=False))
        x = x + drop_path(y, rate, keys[1], deterministic=not train)
        if not self.scanned:
            return x
        self.sow("intermediates", "out", x)
        return x, None


class S2MLPv2(nn.Module):
    """S²-MLPv2 on NHWC images (B, H, W, 3); returns float32 logits (B, num_classes).

    Intermediates (``stem_out``, ``block_{i}_out`` numbered across both stages,
    ``pre_logits``) are sown into the ``'intermediates'`` collection. `weight_init`: 'flax' or
    'timm' kernels for every Dense and conv (`layers.kernel_init`); the head starts at zero either way.

    `scan`: run each stage's blocks as one ``nn.scan`` (parameters ``stage_{s}/...`` with a leading axis
    of the stage's depth, instead of ``block_{i}`` numbered across stages); the stage's outputs are then
    one stacked entry ``intermediates['stage_{s}']['out']``. `remat` ('none', 'full', 'dots'):
    recompute each block's activations in the backward pass. See `s2mlp.S2MLP` and
    `s2mlp.models.convert_params`.
    """

    num_classes: int
    hidden_dims: Sequence[int] = (192, 384)
    num_blocks: Sequence[int] = (4, 14)
    patch_size: int = 7
    mlp_ratio: int = 3
    drop_path_rate: float = 0.0
    shift_patterns: Sequence[str] = ("ss1", "ss2")  # branches 1 and 2; ("none", "none") for ablations
    dtype: Dtype = jnp.float32
    weight_init: str = "flax"
    scan: bool = False
    remat: str = "none"

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        p = self.patch_size
        conv = lambda features, size, name: nn.Conv(  # noqa: E731
            features,
            (size, size),
            strides=(size, size),
            padding="VALID",
            dtype=self.dtype,
            kernel_init=kernel_init(self.weight_init),
            name=name,
        )
        x = conv(self.hidden_dims[0], p, "patch_embed")(images.astype(self.dtype))
        self.sow("intermediates", "stem_out", x)
        total = sum(self.num_blocks)
        rates = jnp.asarray(drop_path_rates(self.drop_path_rate, total), jnp.float32)
        keys = None
        if train and self.drop_path_rate > 0:
            keys = jax.random.split(self.make_rng("dropout"), total)
        kwargs = dict(
            mlp_ratio=self.mlp_ratio,
            shift_patterns=tuple(self.shift_patterns),
            dtype=self.dtype,
            weight_init=self.weight_init,
        )
        first = 0
        for stage, (dim, depth) in enumerate(zip(self.hidden_dims, self.num_blocks)):
            if stage > 0:
                x = conv(dim, 2, f"downsample_{stage}")(x)
            x = block_stack(
                self, S2MLPv2Block, kwargs, x, first=first, depth=depth, rates=rates[first : first + depth],
                keys=None if keys is None else keys[first : first + depth], train=train, scan=self.scan,
                remat=self.remat, scan_name=f"stage_{stage}",
            )  # fmt: skip
            first += depth
        x = _layernorm(self.dtype, "final_norm")(x)
        x = jnp.mean(x, axis=(1, 2))
        self.sow("intermediates", "pre_logits", x)
        x = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="head")(x)
        return x.astype(jnp.float32)
