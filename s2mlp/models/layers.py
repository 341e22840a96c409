"""Small building blocks shared by the models: DropPath, Affine, the norm switch, initialisers.

Initialisation options (docs/notes/initialisation.md): `kernel_init(weight_init)` for every Dense and
conv kernel except the zero-initialised heads, and `resmlp_branch_scale(depth)` for the initial
scale of the Affine that closes each S²-MLP residual branch.
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
    """ResMLP's initial scale of each residual branch for a network of `depth` blocks.

    The LayerScale rule of CaiT (Touvron et al., 2021, §2.1), used by ResMLP-12/24/36:
    0.1 up to 18 blocks, 1e-5 up to 24, 1e-6 deeper.
    """
    if depth <= 18:
        return 0.1
    if depth <= 24:
        return 1e-5
    return 1e-6


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


def drop_path(x: jax.Array, rate: jax.Array, key: jax.Array | None, *, deterministic: bool) -> jax.Array:
    """DropPath with the rate as an array and an explicit key: the S² blocks' DropPath in both layouts.

    The models draw one ``'dropout'`` key per forward pass and split it per block (`block_stack`),
    so block i drops the same examples whether the blocks are unrolled or scanned.

    Identity when `deterministic` or `key` is None; otherwise as `DropPath`: each example's
    branch is kept with probability ``1 - rate`` and scaled by ``1 / (1 - rate)``.
    """
    if deterministic or key is None:
        return x
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


# Rematerialisation of each block's activations in the backward pass (`remat` model field):
# 'none' keeps every activation; 'full' saves nothing (the block is recomputed); 'dots' saves the
# matmul outputs and recomputes the rest (GELU, norms, shifts).
REMAT_POLICIES = {
    "none": None,
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def block_stack(
    parent: nn.Module,
    block_cls: type[nn.Module],
    block_kwargs: dict[str, Any],
    x: jax.Array,
    *,
    first: int,
    depth: int,
    rates: jax.Array,
    keys: jax.Array | None,
    train: bool,
    scan: bool,
    remat: str,
    scan_name: str,
) -> jax.Array:
    """Applies `depth` identical blocks `block_cls(**block_kwargs)` to `x` inside `parent`'s compact call.

    Unrolled (scan=False): submodules ``block_{first}`` ... ``block_{first+depth-1}``, each output sown
    into `parent`'s ``'intermediates'`` as ``block_{i}_out``. Scanned (scan=True): one ``nn.scan``
    submodule `scan_name` whose parameters carry a leading axis of length `depth` (block j of the run
    at index j), its outputs sown as one stacked entry ``intermediates[scan_name]['out']`` of shape
    (depth, *x.shape). `rates` (float32, one per block) and `keys` (one DropPath key per block, or
    None when nothing is dropped) are indexed the same way in both layouts, so the two compute the
    same function (`s2mlp.models.convert_params` maps the parameters). `remat` ('none', 'full',
    'dots') wraps each block in ``nn.remat`` with `REMAT_POLICIES[remat]`.
    """
    cls = block_cls
    if remat != "none":
        # self=0, x=1, rate=2, key=3, train=4: `train` is a Python bool.
        cls = nn.remat(cls, policy=REMAT_POLICIES[remat], static_argnums=(4,), prevent_cse=not scan)
    if scan:
        cls = nn.scan(
            cls,
            variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True},
            in_axes=(0, 0, nn.broadcast),
            length=depth,
        )
        x, _ = cls(**block_kwargs, scanned=True, name=scan_name)(x, rates, keys, train)
        return x
    for j in range(depth):
        key = None if keys is None else keys[j]
        x = cls(**block_kwargs, name=f"block_{first + j}")(x, rates[j], key, train)
        parent.sow("intermediates", f"block_{first + j}_out", x)
    return x
