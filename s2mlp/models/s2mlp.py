"""S²-MLP (Yu et al., WACV 2022): SPEC §2.

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

from s2mlp.models.layers import DropPath, Dtype, drop_path_rates, kernel_init, make_norm, resmlp_branch_scale
from s2mlp.shift import spatial_shift


class S2MLPBlock(nn.Module):
    """One spatial-shift block on (B, h, w, c) tokens."""

    expansion: int
    norm: str = "layernorm"
    shift_pattern: str = "ss1"
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    branch_scale: float = 1.0  # initial scale of the branch-closing Affine (norm='affine' only)
    weight_init: str = "flax"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        c = x.shape[-1]
        drop = DropPath(self.drop_path_rate)
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, dtype=self.dtype, kernel_init=kernel_init(self.weight_init), name=name
        )
        y = dense(c, "fc1")(x)
        y = spatial_shift(nn.gelu(y, approximate=False), self.shift_pattern)
        y = dense(c, "fc2")(y)
        y = make_norm(self.norm, self.dtype, "norm1", self.branch_scale)(y)
        x = x + drop(y, deterministic=not train)
        y = dense(self.expansion * c, "fc3")(x)
        y = dense(c, "fc4")(nn.gelu(y, approximate=False))
        y = make_norm(self.norm, self.dtype, "norm2", self.branch_scale)(y)
        return x + drop(y, deterministic=not train)


class S2MLP(nn.Module):
    """S²-MLP on NHWC images (B, H, W, 3); returns float32 logits (B, num_classes).

    Intermediates (``stem_out``, ``block_{i}_out``, ``pre_logits``) are sown into the
    ``'intermediates'`` collection; pass ``mutable=['intermediates']`` to get them.

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
        for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.num_blocks)):
            x = S2MLPBlock(
                self.expansion,
                self.norm,
                self.shift_pattern,
                rate,
                self.dtype,
                scale,
                self.weight_init,
                name=f"block_{i}",
            )(x, train=train)
            self.sow("intermediates", f"block_{i}_out", x)
        x = jnp.mean(x, axis=(1, 2))
        self.sow("intermediates", "pre_logits", x)
        x = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="head")(x)
        return x.astype(jnp.float32)
