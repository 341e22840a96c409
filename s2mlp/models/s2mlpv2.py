"""S²-MLPv2 (Yu et al., 2021): §3.1-3.2 (shift, Eq. 1; split attention, Eqs. 2-4), §4 (block, Eq. 5) and Table 1.

ViP's two-stage pyramid: a 7×7 stride-7 conv patch embedding, stage 1 blocks, a 2×2 stride-2 conv downsampling
(c1 -> c2), stage 2 blocks, final LayerNorm, mean pool, Dense head. Pre-norm blocks (Eq. 5) with DropPath on both
branches::

    y = x + S2MLPv2Module(LN(x))
    z = y + ChannelMLP(LN(y))           Dense(3c) -> GELU -> Dense(c)

S2MLPv2Module: Dense c -> 3c, split into X1, X2, X3; X1 <- SS1(X1), X2 <- SS2(X2), X3 unshifted; split attention
over the three; Dense c -> c. Split attention (ResNeSt via ViP, Eqs. 2-4) with hidden width c/4 and biases, the
choice that reproduces the paper's 25.1M / 55.3M parameters. Stage s has `depths[s]` blocks of width
`hidden_dims[s]`. Works at any H, W divisible by 14 (patch 7, then downsampling by 2). `weight_init` picks the
Dense/conv kernels ('flax' or 'timm'; docs/notes/initialisation.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from s2mlp.models.blocks import block_output, block_stack, branch_keys, drop_path, drop_path_schedule
from s2mlp.models.fields import ModelFields, common_fields, invalid, renamed_field
from s2mlp.models.layers import Dtype, classifier_head, dense, make_norm, mlp, patch_conv
from s2mlp.shift import PATTERNS, num_groups, spatial_shift


class SplitAttention(nn.Module):
    """Re-weights K branches (B, K, h, w, c) per channel; returns (B, h, w, c)."""

    dtype: Dtype = jnp.float32
    weight_init: str = "flax"

    @nn.compact
    def __call__(self, branches: jax.Array) -> jax.Array:
        _, k, _, _, c = branches.shape
        init = dict(dtype=self.dtype, weight_init=self.weight_init)
        a = jnp.mean(jnp.sum(branches, axis=1), axis=(1, 2))  # (B, c)
        a = dense(c // 4, **init, name="fc1")(a)
        a = dense(k * c, **init, name="fc2")(nn.gelu(a, approximate=False))
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
        init = dict(dtype=self.dtype, weight_init=self.weight_init)
        x = dense(3 * c, **init, name="fc1")(x)
        x1, x2, x3 = jnp.split(x, 3, axis=-1)
        p1, p2 = self.shift_patterns
        branches = jnp.stack([spatial_shift(x1, p1), spatial_shift(x2, p2), x3], axis=1)
        x = SplitAttention(self.dtype, self.weight_init, name="split_attention")(branches)
        return dense(c, **init, name="fc2")(x)


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
        keys = branch_keys(key)
        mixer = S2MLPv2Module(self.shift_patterns, self.dtype, self.weight_init, name="spatial_mlp")
        y = mixer(make_norm("layernorm", self.dtype, "norm1")(x))
        x = x + drop_path(y, rate, keys[0], deterministic=not train)
        y = make_norm("layernorm", self.dtype, "norm2")(x)
        init = dict(dtype=self.dtype, weight_init=self.weight_init)
        y = mlp(y, self.mlp_ratio * c, **init, names=("channel_mlp_fc1", "channel_mlp_fc2"))
        x = x + drop_path(y, rate, keys[1], deterministic=not train)
        return block_output(self, x)


class S2MLPv2(ModelFields, nn.Module):
    """S²-MLPv2 on NHWC images (B, H, W, 3); returns float32 logits (B, num_classes).

    Stage s: `depths[s]` blocks of width `hidden_dims[s]` (Table 1: small (4, 14) blocks of (192, 384) channels);
    `mlp_ratio` is the channel MLP's expansion (Dense c -> mlp_ratio·c). Intermediates (``stem_out``,
    ``block_{i}_out`` numbered across both stages, ``pre_logits``) are sown into the ``'intermediates'`` collection.
    `weight_init`: 'flax' or 'timm' kernels for every Dense and conv (`layers.kernel_init`); the head starts at zero.

    `scan`: run each stage's blocks as one ``nn.scan`` (parameters ``stage_{s}/...`` with a leading axis of the
    stage's depth instead of ``block_{i}``, outputs one stacked entry ``intermediates['stage_{s}']['out']``);
    `remat`: recompute each block's activations in the backward pass. See `S2MLP` and `checkpoint.convert_params`.
    """

    num_classes: int
    hidden_dims: Sequence[int] = (192, 384)
    depths: Sequence[int] = (4, 14)
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
        init = dict(dtype=self.dtype, weight_init=self.weight_init)
        x = patch_conv(self.hidden_dims[0], self.patch_size, **init, name="patch_embed")(images.astype(self.dtype))
        self.sow("intermediates", "stem_out", x)
        rates, keys = drop_path_schedule(self, self.drop_path_rate, sum(self.depths), train=train)
        kwargs = dict(mlp_ratio=self.mlp_ratio, shift_patterns=tuple(self.shift_patterns), **init)
        first = 0
        for stage, (dim, depth) in enumerate(zip(self.hidden_dims, self.depths)):
            if stage > 0:
                x = patch_conv(dim, 2, **init, name=f"downsample_{stage}")(x)
            x = block_stack(
                self, S2MLPv2Block, kwargs, x, first=first, depth=depth, rates=rates[first : first + depth],
                keys=None if keys is None else keys[first : first + depth], train=train, scan=self.scan,
                remat=self.remat, scan_name=f"stage_{stage}",
            )  # fmt: skip
            first += depth
        x = make_norm("layernorm", self.dtype, "final_norm")(x)
        return classifier_head(self, jnp.mean(x, axis=(1, 2)), self.num_classes, self.dtype)

    # ---- the model's fields, and its parameter layouts -----------------------------------
    @staticmethod
    def divisor_of(fields: Mapping[str, Any]) -> int:
        """Image sides must be multiples of this: the patch size × 2 per downsampling, of a model with `fields`."""
        return fields["patch_size"] * 2 ** (len(fields["hidden_dims"]) - 1)

    @nn.nowrap
    def block_groups(self) -> list[tuple[str, list[str]]]:
        """Each stage's run of identical blocks: (``stage_{s}``, [``block_{i}`` numbered across stages])."""
        groups, first = [], 0
        for stage, depth in enumerate(self.depths):
            groups.append((f"stage_{stage}", [f"block_{i}" for i in range(first, first + depth)]))
            first += depth
        return groups

    @classmethod
    def upgrade_fields(cls, fields: Mapping[str, Any], name: str | None = None) -> dict[str, Any]:
        """`fields` with ``num_blocks`` (a tuple or list: the former name of `depths`) replaced (FutureWarning).

        An integer ``num_blocks`` stays, so that it is refused as a field S²-MLPv2 does not have.
        """
        if not isinstance(fields.get("num_blocks"), tuple | list):
            return dict(fields)
        return renamed_field(fields, "num_blocks", "depths", name or cls.__name__)

    @classmethod
    def check_fields(cls, fields: Mapping[str, Any], name: str | None = None) -> None:
        """Raises ValueError ``"{name}: {field}={value!r} ..."`` for the first bad field, as `S2MLP.check_fields`."""
        name = name or cls.__name__
        kw = common_fields(cls, fields, name)
        if len(kw["hidden_dims"]) != len(kw["depths"]) or not kw["hidden_dims"]:
            raise invalid(name, kw, "hidden_dims", "must have one entry per stage, like depths")
        if any(d < 4 or d % 4 for d in kw["hidden_dims"]):
            why = "must all be positive multiples of 4 (the shift's four channel groups)"
            raise invalid(name, kw, "hidden_dims", why)
        if any(n < 1 for n in kw["depths"]):
            raise invalid(name, kw, "depths", "must all be positive integers")
        patterns = kw["shift_patterns"]
        if len(patterns) != 2 or any(p not in PATTERNS for p in patterns):
            why = f"must be two patterns (branches 1 and 2) from {sorted(PATTERNS)}"
            raise invalid(name, kw, "shift_patterns", why)
        if any(d % num_groups(p) for d in kw["hidden_dims"] for p in patterns):
            why = "split channels into more groups than hidden_dims divide into"
            raise invalid(name, kw, "shift_patterns", why)
