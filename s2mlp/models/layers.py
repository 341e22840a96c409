"""What the three models share: their layers (patch conv, Dense, MLP, norms, head) and initialisers.

DropPath and the block stack of the S² models are in `s2mlp.models.blocks`; the checks of the fields every
model has, in `s2mlp.models.fields`. Initialisation options: docs/notes/initialisation.md.

The helpers that build layers (`patch_conv`, `dense`, `mlp`, `classifier_head`) are called inside a
model's ``@nn.compact`` method and create their submodules there, under the names they are given.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# weight_init='flax': Flax's defaults (lecun_normal kernels, zero biases).
# weight_init='timm': the timm/DeiT convention: kernels truncated normal with std 0.02, zero biases.
INITS = ("flax", "timm")
TIMM_STD = 0.02
# Std of a unit normal truncated to [-2, 2]: dividing by it makes the truncated samples' std TIMM_STD.
_UNIT_TRUNCATED_STD = 0.87962566103423978


def kernel_init(weight_init: str) -> nn.initializers.Initializer:
    """The kernel initialiser of Dense and conv layers for ``weight_init`` in `INITS`.

    ``'timm'`` draws from a normal truncated at ±2 of its underlying std, rescaled so the
    kernel's std is exactly 0.02 (the std of timm's ``trunc_normal_(std=.02)``, whose bounds
    ±2 are absolute and so never cut); every value lies within ±0.0455.
    """
    if weight_init == "flax":
        return nn.initializers.lecun_normal()
    if weight_init == "timm":
        return nn.initializers.truncated_normal(stddev=TIMM_STD / _UNIT_TRUNCATED_STD, lower=-2.0, upper=2.0)
    raise ValueError(f"weight_init={weight_init!r} is unknown; choose one of {list(INITS)}.")


def resmlp_branch_scale(depth: int) -> float:
    """ResMLP's initial scale of each residual branch for a network of `depth` blocks: the LayerScale rule of CaiT
    (Touvron et al., 2021, §2.1), used by ResMLP-12/24/36: 0.1 up to 18 blocks, 1e-5 up to 24, 1e-6 deeper."""
    return 0.1 if depth <= 18 else 1e-5 if depth <= 24 else 1e-6


class Affine(nn.Module):
    """ResMLP's Aff: a per-channel scale (init `scale_init`, 1 by default) and bias (init 0), no statistics."""

    dtype: Dtype | None = None
    scale_init: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.constant(self.scale_init), (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        dtype = self.dtype or x.dtype
        return x * scale.astype(dtype) + bias.astype(dtype)


def make_norm(kind: str, dtype: Dtype, name: str, affine_scale_init: float = 1.0) -> nn.Module:
    """``'layernorm'`` (eps 1e-6, scale 1) or ``'affine'`` (ResMLP Aff, scale `affine_scale_init`)."""
    if kind == "layernorm":
        return nn.LayerNorm(epsilon=1e-6, dtype=dtype, name=name)
    if kind == "affine":
        return Affine(dtype=dtype, scale_init=affine_scale_init, name=name)
    raise ValueError(f"norm={kind!r} is unknown; choose 'layernorm' or 'affine'.")


def patch_conv(
    features: int, patch: int, *, dtype: Dtype, weight_init: str, name: str, padding: str = "VALID"
) -> nn.Conv:
    """A patch×patch conv with stride patch: one Dense on each flattened patch×patch×C patch. The stems of all three
    models and S²-MLPv2's 2×2 downsampling; Mixer keeps vision_transformer's ``padding='SAME'``, the same as 'VALID'
    on sides divisible by the patch."""
    size, init = (patch, patch), kernel_init(weight_init)
    return nn.Conv(features, size, strides=size, padding=padding, dtype=dtype, kernel_init=init, name=name)


def dense(features: int, *, dtype: Dtype, weight_init: str, name: str | None = None) -> nn.Dense:
    """A Dense with `weight_init` kernels and zero biases; ``name=None`` lets Flax number it (``Dense_0``, ...)."""
    return nn.Dense(features, dtype=dtype, kernel_init=kernel_init(weight_init), name=name)


def mlp(
    x: jax.Array,
    hidden: int,
    *,
    dtype: Dtype,
    weight_init: str,
    names: tuple[str | None, str | None] = (None, None),
    approximate_gelu: bool = False,
) -> jax.Array:
    """Dense(hidden) -> GELU -> Dense back to x's width, on the last axis of `x`: every model's channel MLP (S²-MLP's
    fc3/fc4, S²-MLPv2's channel_mlp_fc1/fc2) and Mixer's two MLPs. GELU is exact (erf) unless `approximate_gelu`
    (tanh, Mixer's: Flax's default, as vision_transformer)."""
    y = dense(hidden, dtype=dtype, weight_init=weight_init, name=names[0])(x)
    y = nn.gelu(y, approximate=approximate_gelu)
    return dense(x.shape[-1], dtype=dtype, weight_init=weight_init, name=names[1])(y)


def classifier_head(model: nn.Module, features: jax.Array, num_classes: int, dtype: Dtype) -> jax.Array:
    """Float32 logits (B, num_classes) of the pooled `features` (B, c) by a zero-initialised Dense ``head``;
    `features` are first sown into `model`'s ``'intermediates'`` as ``pre_logits``."""
    model.sow("intermediates", "pre_logits", features)
    logits = nn.Dense(num_classes, kernel_init=nn.initializers.zeros, dtype=dtype, name="head")(features)
    return logits.astype(jnp.float32)
