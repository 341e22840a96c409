"""DropPath (stochastic depth) and the block stack of the S² models (unrolled or one ``nn.scan``, with remat).

The models draw one ``'dropout'`` key per forward pass and split it per block (`drop_path_schedule`), so
block i drops the same examples whether the blocks are unrolled or scanned.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def drop_path(x: jax.Array, rate: jax.Array, key: jax.Array | None, *, deterministic: bool) -> jax.Array:
    """Stochastic depth with the rate as an array and an explicit key (the S² blocks' DropPath in both layouts):
    identity when `deterministic` or `key` is None, else `_keep_or_drop` with ``keep = 1 - rate``."""
    if deterministic or key is None:
        return x
    return _keep_or_drop(x, 1.0 - jnp.asarray(rate, jnp.float32), key)


def _keep_or_drop(x: jax.Array, keep, key: jax.Array) -> jax.Array:
    """Each example of `x` kept with probability `keep` and scaled by ``1 / keep``, else zeroed: the one
    implementation of `drop_path` and `DropPath`. `keep` is a float32 array (`drop_path`, whose rates are arrays
    inside ``nn.scan``) or a Python float (`DropPath`: 1 - rate in double precision, as the Mixer has always drawn
    it; a float32 ``1 - float32(rate)`` can differ in the last bit)."""
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


def drop_path_schedule(model: nn.Module, rate: float, depth: int, *, train: bool) -> tuple[jax.Array, jax.Array | None]:
    """The DropPath rate of each of `depth` blocks (float32, 0 ... `rate`) and their keys for `block_stack`: one
    per block, split from one ``'dropout'`` key of `model`; None (nothing is dropped) at eval or when `rate` is 0."""
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
REMAT_POLICIES = {"none": None, "full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


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

    Unrolled (scan=False): submodules ``block_{first}`` ... ``block_{first+depth-1}``, each output sown into
    `parent`'s ``'intermediates'`` as ``block_{i}_out``. Scanned (scan=True): one ``nn.scan`` submodule `scan_name`
    whose parameters carry a leading axis of length `depth` (block j of the run at index j), its outputs sown as one
    stacked entry ``intermediates[scan_name]['out']`` of shape (depth, *x.shape). `rates` (float32, one per block)
    and `keys` (one DropPath key per block, or None when nothing is dropped) are indexed the same way in both
    layouts, so the two compute the same function (`s2mlp.checkpoint.convert_params` maps the parameters). `remat`
    ('none', 'full', 'dots') wraps each block in ``nn.remat`` with `REMAT_POLICIES[remat]`.
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
    """What a block run by `block_stack` returns: `x`; inside ``nn.scan`` (``block.scanned``) the carry
    ``(x, None)``, with `x` sown as ``out``."""
    if not block.scanned:
        return x
    block.sow("intermediates", "out", x)
    return x, None


class DropPath(nn.Module):
    """`drop_path` as a Module (Mixer's blocks): the key from the ``'dropout'`` RNG stream, the rate a float;
    identity when `deterministic` or ``rate == 0``."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        return _keep_or_drop(x, 1.0 - self.rate, self.make_rng("dropout"))


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Linearly increasing DropPath rates 0 ... `rate` over `depth` blocks."""
    if depth == 1:
        return [rate]
    return [rate * i / (depth - 1) for i in range(depth)]
