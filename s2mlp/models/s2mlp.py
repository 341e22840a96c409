"""S²-MLP (Yu et al., WACV 2022): SPEC §2.

Patch layer (a Dense on each flattened p×p×3 patch, written as a p×p stride-p
conv) + norm, N identical blocks, global average pool, Dense head. Each block
puts the norm at the *end* of its residual branches (paper Fig. 1)::

    x = x + Norm(fc2(Shift(GELU(fc1(x)))))       fc1, fc2: c -> c
    x = x + Norm(fc4(GELU(fc3(x))))              fc3: c -> r·c, fc4: r·c -> c

Parameter names follow the paper's FC1..FC4. Works at any H, W divisible by
the patch size; the token grid is (H/p, W/p).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from s2mlp.models.layers import DropPath, Dtype, drop_path_rates, make_norm
from s2mlp.shift import spatial_shift


class S2MLPBlock(nn.Module):
    """One spatial-shift block on (B, h, w, c) tokens."""

    expansion: int
    norm: str = "layernorm"
    shift_pattern: str = "ss1"
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        c = x.shape[-1]
        drop = DropPath(self.drop_path_rate)
        y = nn.Dense(c, dtype=self.dtype, name="fc1")(x)
        y = spatial_shift(nn.gelu(y, approximate=False), self.shift_pattern)
        y = nn.Dense(c, dtype=self.dtype, name="fc2")(y)
        y = make_norm(self.norm, self.dtype, "norm1")(y)
        x = x + drop(y, deterministic=not train)
        y = nn.Dense(self.expansion * c, dtype=self.dtype, name="fc3")(x)
        y = nn.Dense(c, dtype=self.dtype, name="fc4")(nn.gelu(y, approximate=False))
        y = make_norm(self.norm, self.dtype, "norm2")(y)
        return x + drop(y, deterministic=not train)


class S2MLP(nn.Module):
    """S²-MLP on NHWC images (B, H, W, 3); returns float32 logits (B, num_classes).

    Intermediates (``stem_out``, ``block_{i}_out``, ``pre_logits``) are sown into the
    ``'intermediates'`` collection; pass ``mutable=['intermediates']`` to get them.
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

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        p = self.patch_size
        x = nn.Conv(self.hidden_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="patch_embed")(
            images.astype(self.dtype)
        )
        x = make_norm(self.norm, self.dtype, "patch_norm")(x)
        self.sow("intermediates", "stem_out", x)
        for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.num_blocks)):
            x = S2MLPBlock(self.expansion, self.norm, self.shift_pattern, rate, self.dtype, name=f"block_{i}")(
                x, train=train
            )
            self.sow("intermediates", f"block_{i}_out", x)
        x = jnp.mean(x, axis=(1, 2))
        self.sow("intermediates", "pre_logits", x)
        x = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="head")(x)
        return x.astype(jnp.float32)
