"""S²-MLP (Yu et al., WACV 2022): the paper's §3.2 and Fig. 1.

Patch layer (a Dense on each flattened p×p×3 patch, written as a p×p stride-p
conv) + norm, N identical blocks, global average pool, Dense head. Each block
puts the norm at the *end* of its residual branches (paper Fig. 1)::

    x = x + Norm(fc2(Shift(GELU(fc1(x)))))       fc1, fc2: c -> c
    x = x + Norm(fc4(GELU(fc3(x))))              fc3: c -> r·c, fc4: r·c -> c

Parameter names follow the paper's FC1..FC4. Works at any H, W divisible by
the patch size; the token grid is (H/p, W/p).

Initialisation (the paper does not give it; docs/notes/initialisation.md): `weight_init` picks
the Dense/conv kernels ('flax': lecun_normal, 'timm': truncated normal std 0.02); with
norm='affine' the Affine closing each residual branch starts at `branch_scale_init`
(None: ResMLP's depth rule, 1e-6 for 36 blocks) while the patch norm's starts at 1, as in ResMLP.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from s2mlp.models.layers import (
    Dtype,
    block_stack,
    drop_path,
    drop_path_rates,
    kernel_init,
    make_norm,
    resmlp_branch_scale,
)
from s2mlp.shift import spatial_shift


class S2MLPBlock(nn.Module):
    """One spatial-shift block on (B, h, w, c) tokens.

    Called as ``block(x, rate, key, train)``: `rate` is this block's DropPath rate (a float32 scalar),
    `key` its DropPath key (None: nothing dropped). With `scanned` (inside ``nn.scan``) it returns
    ``(x, None)`` and sows its output as ``out``.
    """

    expansion: int
    norm: str = "layernorm"
    shift_pattern: str = "ss1"
    dtype: Dtype = jnp.float32
    branch_scale: float = 1.0  # initial scale of the branch-closing Affine (norm='affine' only)
    weight_init: str = "flax"
    scanned: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, rate: jax.Array, key: jax.Array | None, train: bool):
        c = x.shape[-1]
        keys = (None, None) if key is None else tuple(jax.random.split(key))
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, dtype=self.dtype, kernel_init=kernel_init(self.weight_init), name=name
        )
        y = dense(c, "fc1")(x)
        y = spatial_shift(nn.gelu(y, approximate=False), self.shift_pattern)
        y = dense(c, "fc2")(y)
        y = make_norm(self.norm, self.dtype, "norm1", self.branch_scale)(y)
        x = x + drop_path(y, rate, keys[0], deterministic=not train)
        y = dense(self.expansion * c, "fc3")(x)
        y = dense(c, "fc4")(nn.gelu(y, approximate=False))
        y = make_norm(self.norm, self.dtype, "norm2", self.branch_scale)(y)
        x = x + drop_path(y, rate, keys[1], deterministic=not train)
        if not self.scanned:
            return x
        self.sow("intermediates", "out", x)
        return x, None


class S2MLP(nn.Module):
    """S²-MLP on NHWC images (B, H, W, 3); returns float32 logits (B, num_classes).

    Intermediates (``stem_out``, ``block_{i}_out``, ``pre_logits``) are sown into the
    ``'intermediates'`` collection; pass ``mutable=['intermediates']`` to get them. With
    ``scan=True`` the blocks' outputs are one stacked entry ``intermediates['blocks']['out']``
    of shape (num_blocks, B, h, w, c) instead of ``block_{i}_out``.

    `scan`: run the N identical blocks as one ``nn.scan`` (parameters ``blocks/...`` with a leading
    axis of length N, instead of ``block_0`` ... ``block_{N-1}``): the compiled program holds one
    block, so compile time does not grow with depth. Same function and parameters either way
    (`s2mlp.models.convert_params` maps one layout to the other). `remat` ('none', 'full', 'dots'):
    recompute each block's activations in the backward pass (`layers.REMAT_POLICIES`).

    `branch_scale_init` (norm='affine' only): initial scale of the Affine closing each
    residual branch; None picks ResMLP's rule from `num_blocks` (`resmlp_branch_scale`).
    `weight_init`: 'flax' or 'timm' kernels (`layers.kernel_init`); the head starts at zero either way.
    """

    num_classes: int
    patch_size: int
    hidden_dim: int
    num_blocks: int
    expansion: int
    norm: str = "layernorm"
    shift_pattern: str = "ss1"
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    branch_scale_init: float | None = None
    weight_init: str = "flax"
    scan: bool = False
    remat: str = "none"

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        p = self.patch_size
        x = nn.Conv(
            self.hidden_dim,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            kernel_init=kernel_init(self.weight_init),
            name="patch_embed",
        )(images.astype(self.dtype))
        x = make_norm(self.norm, self.dtype, "patch_norm")(x)  # scale 1, like ResMLP's non-branch Affines
        self.sow("intermediates", "stem_out", x)
        scale = self.branch_scale_init
        scale = resmlp_branch_scale(self.num_blocks) if scale is None else scale
        rates = jnp.asarray(drop_path_rates(self.drop_path_rate, self.num_blocks), jnp.float32)
        keys = None
        if train and self.drop_path_rate > 0:
            keys = jax.random.split(self.make_rng("dropout"), self.num_blocks)
        kwargs = dict(
            expansion=self.expansion,
            norm=self.norm,
            shift_pattern=self.shift_pattern,
            dtype=self.dtype,
            branch_scale=scale,
            weight_init=self.weight_init,
        )
        x = block_stack(
            self, S2MLPBlock, kwargs, x, first=0, depth=self.num_blocks, rates=rates, keys=keys, train=train,
            scan=self.scan, remat=self.remat, scan_name="blocks",
        )  # fmt: skip
        x = jnp.mean(x, axis=(1, 2))
        self.sow("intermediates", "pre_logits", x)
        x = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="head")(x)
        return x.astype(jnp.float32)
