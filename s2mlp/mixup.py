"""Label smoothing, Mixup and CutMix on device, inside the jitted train step.

timm semantics (the papers' recipe): per batch, one λ ~ Beta(α, α); with both
enabled, CutMix is chosen with probability `switch_prob`. Each image is mixed
with the image at the mirrored batch position (``x[::-1]``) and the targets
with the same weight. For CutMix, λ is corrected to the exact pasted area.

The mirrored position is over the whole global batch, so on a sharded batch each device mixes
with another device's shard (one exchange per step). That keeps the step identical on 1 and N
devices; mixing within each shard instead saved ~10-14 ms per 64 images on 8 CPU devices (best and median), far
below the step's cost (BENCHMARKS.md, "Mixup/CutMix across devices"), so the exchange stays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_labels(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """int labels (B,) -> float32 targets (B, K): 1 - s + s/K on the label, s/K elsewhere."""
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return one_hot * (1.0 - smoothing) + smoothing / num_classes


def _cutmix_mask(rng: jax.Array, lam: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
    """A (H, W, 1) box mask (1 = keep own pixels) of area ≈ 1 - lam, and the exact kept fraction."""
    cut = jnp.sqrt(1.0 - lam)
    cut_h, cut_w = (cut * height).astype(jnp.int32), (cut * width).astype(jnp.int32)
    rng_y, rng_x = jax.random.split(rng)
    cy = jax.random.randint(rng_y, (), 0, height)
    cx = jax.random.randint(rng_x, (), 0, width)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    kept = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    return (~inside)[..., None], kept


def mix_batch(
    rng: jax.Array, images: jax.Array, targets: jax.Array, *, mixup: float, cutmix: float, switch_prob: float = 0.5
) -> tuple[jax.Array, jax.Array]:
    """Mixes (B, H, W, C) images and (B, K) targets; identity when both alphas are 0."""
    if mixup <= 0 and cutmix <= 0:
        return images, targets
    rng_lam, rng_switch, rng_box = jax.random.split(rng, 3)
    use_cutmix = jnp.asarray(mixup <= 0) | ((cutmix > 0) & (jax.random.uniform(rng_switch) < switch_prob))
    alpha = jnp.where(use_cutmix, max(cutmix, 1e-6), max(mixup, 1e-6))
    lam = jax.random.beta(rng_lam, alpha, alpha)
    mask, kept = _cutmix_mask(rng_box, lam, images.shape[1], images.shape[2])
    flipped = images[::-1]
    mixed_up = lam.astype(images.dtype) * images + (1 - lam).astype(images.dtype) * flipped
    cut_mixed = jnp.where(mask[None], images, flipped)
    images = jnp.where(use_cutmix, cut_mixed, mixed_up)
    lam = jnp.where(use_cutmix, kept, lam)
    return images, lam * targets + (1.0 - lam) * targets[::-1]
