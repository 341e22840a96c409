"""S²-MLP (Yu et al., WACV 2022): the paper's §3.2 and Fig. 1.

Patch layer (a Dense on each flattened p×p×3 patch, written as a p×p stride-p conv) + norm, N identical blocks,
global average pool, Dense head. Each block puts the norm at the *end* of its residual branches (paper Fig. 1)::

    x = x + Norm(fc2(Shift(GELU(fc1(x)))))       fc1, fc2: c -> c
    x = x + Norm(fc4(GELU(fc3(x))))              fc3: c -> r·c, fc4: r·c -> c  (r: mlp_ratio)

Parameter names follow the paper's FC1..FC4. Works at any H, W divisible by the patch size; the token grid is
(H/p, W/p).

Initialisation (the paper does not give it; docs/notes/initialisation.md): `weight_init` picks the Dense/conv kernels
('flax': lecun_normal, 'timm': truncated normal std 0.02); with norm='affine' the Affine closing each residual branch
starts at `branch_scale_init` (None: ResMLP's depth rule, 1e-6 for 36 blocks) while the patch norm's starts at 1, as
in ResMLP.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from s2mlp.models.blocks import block_output, block_stack, branch_keys, drop_path, drop_path_schedule
from s2mlp.models.fields import ModelFields, common_fields, invalid, renamed_field
from s2mlp.models.layers import Dtype, classifier_head, dense, make_norm, mlp, patch_conv, resmlp_branch_scale
from s2mlp.shift import PATTERNS, num_groups, spatial_shift


class S2MLPBlock(nn.Module):
    """One spatial-shift block on (B, h, w, c) tokens.

    Called as ``block(x, rate, key, train)``: `rate` is this block's DropPath rate (a float32 scalar),
    `key` its DropPath key (None: nothing dropped). With `scanned` (inside ``nn.scan``) it returns
    ``(x, None)`` and sows its output as ``out``.
    """

    mlp_ratio: int
    norm: str = "layernorm"
    shift_pattern: str = "ss1"
    dtype: Dtype = jnp.float32
    branch_scale: float = 1.0  # initial scale of the branch-closing Affine (norm='affine' only)
    weight_init: str = "flax"
    scanned: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, rate: jax.Array, key: jax.Array | None, train: bool):
        c = x.shape[-1]
        keys = branch_keys(key)
        init = dict(dtype=self.dtype, weight_init=self.weight_init)
        y = dense(c, **init, name="fc1")(x)
        y = spatial_shift(nn.gelu(y, approximate=False), self.shift_pattern)
        y = dense(c, **init, name="fc2")(y)
        y = make_norm(self.norm, self.dtype, "norm1", self.branch_scale)(y)
        x = x + drop_path(y, rate, keys[0], deterministic=not train)
        y = mlp(x, self.mlp_ratio * c, **init, names=("fc3", "fc4"))
        y = make_norm(self.norm, self.dtype, "norm2", self.branch_scale)(y)
        x = x + drop_path(y, rate, keys[1], deterministic=not train)
        return block_output(self, x)


class S2MLP(ModelFields, nn.Module):
    """S²-MLP on NHWC images (B, H, W, 3); returns float32 logits (B, num_classes).

    `mlp_ratio` is the paper's expansion ratio r of the channel MLP (fc3: c -> r·c). Intermediates (``stem_out``,
    ``block_{i}_out``, ``pre_logits``) are sown into the ``'intermediates'`` collection; pass
    ``mutable=['intermediates']`` to get them.

    `scan`: run the N identical blocks as one ``nn.scan`` (parameters ``blocks/...`` with a leading axis of length N
    instead of ``block_0`` ... ``block_{N-1}``, outputs one stacked entry ``intermediates['blocks']['out']`` of shape
    (N, B, h, w, c)): the compiled program holds one block, so compile time does not grow with depth. Same function
    and parameters either way (`s2mlp.checkpoint.convert_params` maps one layout to the other). `remat` ('none',
    'full', 'dots'): recompute each block's activations in the backward pass (`blocks.REMAT_POLICIES`).
    `branch_scale_init`, `weight_init`: see the module docstring (`resmlp_branch_scale`, `layers.kernel_init`); the
    head starts at zero either way.
    """

    num_classes: int
    patch_size: int
    hidden_dim: int
    num_blocks: int
    mlp_ratio: int
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
        init = dict(dtype=self.dtype, weight_init=self.weight_init)
        x = patch_conv(self.hidden_dim, self.patch_size, **init, name="patch_embed")(images.astype(self.dtype))
        x = make_norm(self.norm, self.dtype, "patch_norm")(x)  # scale 1, like ResMLP's non-branch Affines
        self.sow("intermediates", "stem_out", x)
        scale = resmlp_branch_scale(self.num_blocks) if self.branch_scale_init is None else self.branch_scale_init
        rates, keys = drop_path_schedule(self, self.drop_path_rate, self.num_blocks, train=train)
        kwargs = dict(mlp_ratio=self.mlp_ratio, norm=self.norm, shift_pattern=self.shift_pattern, branch_scale=scale)
        kwargs |= init
        x = block_stack(
            self, S2MLPBlock, kwargs, x, first=0, depth=self.num_blocks, rates=rates, keys=keys, train=train,
            scan=self.scan, remat=self.remat, scan_name="blocks",
        )  # fmt: skip
        return classifier_head(self, jnp.mean(x, axis=(1, 2)), self.num_classes, self.dtype)

    # ---- the model's fields, and its parameter layouts (the rest: `ModelFields`) --------
    @nn.nowrap
    def block_groups(self) -> list[tuple[str, list[str]]]:
        """The run of identical blocks: [(scanned name, [unrolled names])] (see `s2mlp.checkpoint.convert_params`)."""
        return [("blocks", [f"block_{i}" for i in range(self.num_blocks)])]

    @classmethod
    def upgrade_fields(cls, fields: Mapping[str, Any], name: str | None = None) -> dict[str, Any]:
        """`fields` with the former name ``expansion`` of `mlp_ratio` replaced (FutureWarning)."""
        return renamed_field(fields, "expansion", "mlp_ratio", name or cls.__name__)

    @classmethod
    def check_fields(cls, fields: Mapping[str, Any], name: str | None = None) -> None:
        """Raises ValueError ``"{name}: {field}={value!r} ..."`` for the first bad field of `fields` (constructor
        arguments, missing ones taking the defaults); `name`, the class name by default, starts the message
        (`get_model` gives the registry name). The checks every model shares are in `fields.common_fields`."""
        name = name or cls.__name__
        kw = common_fields(cls, fields, name)
        if kw["shift_pattern"] not in PATTERNS:
            raise invalid(name, kw, "shift_pattern", f"is unknown; choose one of {sorted(PATTERNS)}")
        groups = num_groups(kw["shift_pattern"])
        if kw["hidden_dim"] < 1 or kw["hidden_dim"] % groups:
            why = f"must be a positive multiple of {groups} (the shift pattern's channel groups)"
            raise invalid(name, kw, "hidden_dim", why)
        for field in ("num_blocks", "mlp_ratio"):
            if kw[field] < 1:
                raise invalid(name, kw, field, "must be a positive integer")
        if kw["norm"] not in ("layernorm", "affine"):
            raise invalid(name, kw, "norm", "is unknown; choose 'layernorm' or 'affine'")
        scale = kw["branch_scale_init"]
        if scale is not None:
            if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0.0 < scale < float("inf"):
                why = "must be a positive number, or None for ResMLP's depth rule"
                raise invalid(name, kw, "branch_scale_init", why)
            if kw["norm"] != "affine":
                why = "only sets the Affine that closes each branch: use it with norm='affine'"
                raise invalid(name, kw, "branch_scale_init", why)
