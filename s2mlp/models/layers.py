"""Small building blocks shared by the models: DropPath, Affine, the norm switch."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per example.

    Identity when `deterministic` or ``rate == 0``. In training each example's
    branch is kept with probability ``1 - rate`` and scaled by ``1 / (1 - rate)``.
    Draws from the ``'dropout'`` RNG stream.
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Linearly increasing DropPath rates 0 ... `rate` over `depth` blocks."""
    if depth == 1:
        return [rate]
    return [rate * i / (depth - 1) for i in range(depth)]


class Affine(nn.Module):
    """ResMLP's Aff: a per-channel scale (init 1) and bias (init 0), no statistics."""

    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        dtype = self.dtype or x.dtype
        return x * scale.astype(dtype) + bias.astype(dtype)


def make_norm(kind: str, dtype: Dtype, name: str) -> nn.Module:
    """``'layernorm'`` (eps 1e-6) or ``'affine'`` (ResMLP Aff)."""
    if kind == "layernorm":
        return nn.LayerNorm(epsilon=1e-6, dtype=dtype, name=name)
    if kind == "affine":
        return Affine(dtype=dtype, name=name)
    raise ValueError(f"norm={kind!r} is unknown; choose 'layernorm' or 'affine'.")
