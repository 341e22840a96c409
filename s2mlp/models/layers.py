"""What the three models share: their layers (patch conv, Dense, MLP, norms, DropPath, head), initialisers,
the block stack of the S² models, and the checks of the fields every model has.

Initialisation options (docs/notes/initialisation.md): `kernel_init(weight_init)` for every Dense and
conv kernel except the zero-initialised heads, and `resmlp_branch_scale(depth)` for the initial
scale of the Affine that closes each S²-MLP residual branch.

The helpers that build layers (`patch_conv`, `dense`, `mlp`, `classifier_head`) are called inside a
model's ``@nn.compact`` method and create their submodules there, under the names they are given.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
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


def patch_conv(
    features: int, patch: int, *, dtype: Dtype, weight_init: str, name: str, padding: str = "VALID"
) -> nn.Conv:
    """A patch×patch conv with stride patch: one Dense on each flattened patch×patch×C patch.

    The stems of all three models and S²-MLPv2's 2×2 downsampling. Mixer keeps vision_transformer's
    ``padding='SAME'``, the same as 'VALID' on sides divisible by the patch.
    """
    return nn.Conv(
        features,
        (patch, patch),
        strides=(patch, patch),
        padding=padding,
        dtype=dtype,
        kernel_init=kernel_init(weight_init),
        name=name,
    )


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
    """Dense(hidden) -> GELU -> Dense back to x's width, on the last axis of `x`.

    Every model's channel MLP (S²-MLP's fc3/fc4, S²-MLPv2's channel_mlp_fc1/fc2) and Mixer's two MLPs.
    GELU is exact (erf) unless `approximate_gelu` (tanh, Mixer's: Flax's default, as vision_transformer).
    """
    y = dense(hidden, dtype=dtype, weight_init=weight_init, name=names[0])(x)
    y = nn.gelu(y, approximate=approximate_gelu)
    return dense(x.shape[-1], dtype=dtype, weight_init=weight_init, name=names[1])(y)


def classifier_head(model: nn.Module, features: jax.Array, num_classes: int, dtype: Dtype) -> jax.Array:
    """Float32 logits (B, num_classes) of the pooled `features` (B, c) by a zero-initialised Dense ``head``.

    `features` are sown into `model`'s ``'intermediates'`` as ``pre_logits`` first.
    """
    model.sow("intermediates", "pre_logits", features)
    logits = nn.Dense(num_classes, kernel_init=nn.initializers.zeros, dtype=dtype, name="head")(features)
    return logits.astype(jnp.float32)


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


def drop_path_schedule(model: nn.Module, rate: float, depth: int, *, train: bool) -> tuple[jax.Array, jax.Array | None]:
    """The DropPath rate of each of `depth` blocks (float32, 0 ... `rate`) and their keys for `block_stack`.

    Keys: one per block, split from one ``'dropout'`` key of `model`; None (nothing is dropped) at
    eval or when `rate` is 0.
    """
    rates = jnp.asarray(drop_path_rates(rate, depth), jnp.float32)
    if not train or rate <= 0:
        return rates, None
    return rates, jax.random.split(model.make_rng("dropout"), depth)


def branch_keys(key: jax.Array | None) -> tuple[jax.Array | None, jax.Array | None]:
    """The DropPath keys of a block's two residual branches, from the block's key (None: nothing dropped)."""
    return (None, None) if key is None else tuple(jax.random.split(key))


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


def block_output(block: nn.Module, x: jax.Array):
    """What a block run by `block_stack` returns: `x`.

    Inside ``nn.scan`` (``block.scanned``): the carry ``(x, None)``, with `x` sown as ``out``.
    """
    if not block.scanned:
        return x
    block.sow("intermediates", "out", x)
    return x, None


# ---- fields ---------------------------------------------------------------------
def invalid(name: str, fields: Mapping[str, Any], field: str, why: str) -> ValueError:
    """The error of a bad model field: ``"{name}: {field}={value!r} {why}."``."""
    return ValueError(f"{name}: {field}={fields[field]!r} {why}.")


def common_fields(cls: type[nn.Module], fields: Mapping[str, Any], name: str) -> dict[str, Any]:
    """`fields` over `cls`'s defaults, once the fields every model shares are checked.

    Shared: ``num_classes``, ``drop_path_rate``, ``patch_size``, ``weight_init`` and, where `cls` has
    them, ``scan`` and ``remat``. Raises ValueError starting ``"{name}: "`` (see `invalid`); the model
    classes' ``check_fields`` then check their own fields in the returned dict.
    """
    own = [f for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]
    kw = {f.name: f.default for f in own if f.default is not dataclasses.MISSING} | dict(fields)
    missing = sorted(f.name for f in own if f.name not in kw)
    if missing:
        raise ValueError(f"{name}: missing field(s) {missing} of {cls.__name__}.")
    if not isinstance(kw["num_classes"], int) or kw["num_classes"] < 1:
        raise invalid(name, kw, "num_classes", "must be a positive integer")
    if not 0.0 <= kw["drop_path_rate"] < 1.0:
        raise invalid(name, kw, "drop_path_rate", "must be in [0, 1)")
    if kw["patch_size"] < 1:
        raise invalid(name, kw, "patch_size", "must be a positive integer")
    if "scan" in kw and not isinstance(kw["scan"], bool):
        why = "must be True (one nn.scan per run of identical blocks) or False (unrolled blocks)"
        raise invalid(name, kw, "scan", why)
    if kw.get("remat", "none") not in REMAT_POLICIES:
        raise invalid(name, kw, "remat", f"is unknown; choose one of {list(REMAT_POLICIES)}")
    if kw["weight_init"] not in INITS:
        why = f"is unknown; choose one of {list(INITS)} (docs/notes/initialisation.md)"
        raise invalid(name, kw, "weight_init", why)
    return kw


def renamed_field(fields: Mapping[str, Any], old: str, new: str, name: str) -> dict[str, Any]:
    """`fields` with the field's former name `old` replaced by `new`, warning (FutureWarning) that it was used.

    Saved runs and recorded commands keep working. Raises ValueError when both names are given.
    """
    fields = dict(fields)
    if old not in fields:
        return fields
    if new in fields:
        raise ValueError(f"{name}: {old}={fields[old]!r} is the former name of {new}; give only {new}.")
    warnings.warn(
        f"{name}: model field {old!r} is now {new!r}; write {new}={fields[old]!r}.", FutureWarning, stacklevel=4
    )
    fields[new] = fields.pop(old)
    return fields
