"""MLP-Mixer (Tolstikhin et al., 2021), for side-by-side runs (§2 and Table 1 of that paper).

Parameter names and shapes are exactly those of google-research/vision_transformer (``stem``,
``MixerBlock_{i}/{LayerNorm_0,token_mixing,LayerNorm_1,channel_mixing}`` with ``Dense_0``/``Dense_1`` inside each
MLP, ``pre_head_layer_norm``, ``head``), so its published ``.npz`` checkpoints load unchanged (see `s2mlp.mixer_npz`).
GELU is flax's default (tanh approximation), as there. DropPath (default 0) and the compute `dtype` are the only
additions; neither adds parameters. `weight_init` ('flax', the default, as there; or 'timm': truncated normal std
0.02 kernels) only changes initial values (docs/notes/initialisation.md).

The token-mixing MLP has a weight per token, so a Mixer is tied to the resolution it was built for:
(image_size / patch)² tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from s2mlp.models.blocks import DropPath, drop_path_rates
from s2mlp.models.fields import ModelFields, common_fields, invalid
from s2mlp.models.layers import Dtype, classifier_head, mlp, patch_conv


class MlpBlock(nn.Module):
    mlp_dim: int
    dtype: Dtype = jnp.float32
    weight_init: str = "flax"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return mlp(x, self.mlp_dim, dtype=self.dtype, weight_init=self.weight_init, approximate_gelu=True)


class MixerBlock(nn.Module):
    """Token mixing then channel mixing on (B, tokens, channels), pre-norm."""

    tokens_mlp_dim: int
    channels_mlp_dim: int
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    weight_init: str = "flax"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        drop = DropPath(self.drop_path_rate)
        y = jnp.swapaxes(nn.LayerNorm(dtype=self.dtype)(x), 1, 2)
        y = jnp.swapaxes(MlpBlock(self.tokens_mlp_dim, self.dtype, self.weight_init, name="token_mixing")(y), 1, 2)
        x = x + drop(y, deterministic=not train)
        y = nn.LayerNorm(dtype=self.dtype)(x)
        y = MlpBlock(self.channels_mlp_dim, self.dtype, self.weight_init, name="channel_mixing")(y)
        return x + drop(y, deterministic=not train)


class MlpMixer(ModelFields, nn.Module):
    """MLP-Mixer on NHWC images (B, H, W, 3); returns float32 logits (B, num_classes)."""

    num_classes: int
    patch_size: int
    num_blocks: int
    hidden_dim: int
    tokens_mlp_dim: int
    channels_mlp_dim: int
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    weight_init: str = "flax"

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        p = self.patch_size
        stem = patch_conv(
            self.hidden_dim, p, dtype=self.dtype, weight_init=self.weight_init, name="stem", padding="SAME"
        )
        x = stem(images.astype(self.dtype))
        b, h, w, c = x.shape
        if not self.is_initializing() and "MixerBlock_0" in self.variables.get("params", {}):
            built_for = self.variables["params"]["MixerBlock_0"]["token_mixing"]["Dense_0"]["kernel"].shape[0]
            if built_for != h * w:
                side = int(round(built_for**0.5)) * p
                raise ValueError(
                    f"MlpMixer was built for {built_for} tokens (images of {side}x{side} with patch {p}) "
                    f"but got {h * w} tokens from {images.shape[1]}x{images.shape[2]} images. Mixer's "
                    f"token-mixing MLP fixes the resolution: resize the images to {side}x{side}."
                )
        x = x.reshape(b, h * w, c)
        self.sow("intermediates", "stem_out", x)
        for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.num_blocks)):
            x = MixerBlock(
                self.tokens_mlp_dim, self.channels_mlp_dim, rate, self.dtype, self.weight_init, name=f"MixerBlock_{i}"
            )(x, train=train)
            self.sow("intermediates", f"block_{i}_out", x)
        x = nn.LayerNorm(dtype=self.dtype, name="pre_head_layer_norm")(x)
        return classifier_head(self, jnp.mean(x, axis=1), self.num_classes, self.dtype)

    # ---- the model's fields (the rest of the registry's interface: `ModelFields`) -------------
    @classmethod
    def check_fields(cls, fields: Mapping[str, Any], name: str | None = None) -> None:
        """Raises ValueError ``"{name}: {field}={value!r} ..."`` for the first bad field, as `S2MLP.check_fields`."""
        name = name or cls.__name__
        kw = common_fields(cls, fields, name)
        for field in ("num_blocks", "hidden_dim", "tokens_mlp_dim", "channels_mlp_dim"):
            if kw[field] < 1:
                raise invalid(name, kw, field, "must be a positive integer")
