"""Pixel normalisation shared by the tf.data pipeline and the inference API, and the pipeline's eval
preprocessing for inference (NumPy in and out).

Kept free of TensorFlow so inference, benchmarks and notebooks run without it.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from PIL import Image

# name -> (mean, std) applied to pixel values in [0, 255].
NORMALIZATIONS = {
    # timm / DeiT / ViP statistics, used by every recipe here.
    "imagenet": (np.array([0.485, 0.456, 0.406]) * 255.0, np.array([0.229, 0.224, 0.225]) * 255.0),
    # vision_transformer's value range (-1, 1), for its published Mixer checkpoints.
    "minus_one_to_one": (np.array([127.5, 127.5, 127.5]), np.array([127.5, 127.5, 127.5])),
}


def fill_colour(mean) -> tuple[float, float, float]:
    """The RGB colour RandAugment's geometric ops fill with: the normalisation mean, rounded (timm's choice)."""
    return tuple(float(round(float(v))) for v in mean)


def mean_std(kind: str) -> tuple[np.ndarray, np.ndarray]:
    if kind not in NORMALIZATIONS:
        raise ValueError(f"normalization={kind!r} is unknown; choose one of {sorted(NORMALIZATIONS)}.")
    mean, std = NORMALIZATIONS[kind]
    return mean.astype(np.float32), std.astype(np.float32)


# ---------------------------------------------------------------- the training pipeline's eval branch, without TF
def _as_image_list(images) -> list[np.ndarray]:
    """One image (H, W), (H, W, C) or a batch (B, H, W, C) / list of images -> list of (H, W, C)."""
    if isinstance(images, list | tuple):
        out = []
        for image in map(np.asarray, images):
            if image.ndim not in (2, 3):
                raise ValueError(f"each image of a list must be (H, W) or (H, W, C), got shape {image.shape}.")
            out.append(image)
    else:
        images = np.asarray(images)
        if images.ndim not in (2, 3, 4):
            raise ValueError(
                f"images must be one image (H, W) / (H, W, C) or a batch (B, H, W, C), got shape {images.shape}."
            )
        out = list(images) if images.ndim == 4 else [images]
    if not out:
        raise ValueError("no images given: pass one image, a batch or a non-empty list.")
    return out


def _to_rgb_float(image: np.ndarray) -> np.ndarray:
    """(H, W) / (H, W, 1|3|4) uint8 or float in [0, 255] -> float32 (H, W, 3) in [0, 255]."""
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"an image must have 1 (grey), 3 (RGB) or 4 (RGBA) channels last, got shape {image.shape}; "
            "a batch is (B, H, W, C)."
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"an image is empty: shape {image.shape}.")
    if image.dtype == np.uint8:
        image = image.astype(np.float32)
    elif np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float32)
        lo, hi = float(image.min()), float(image.max())
        if lo < 0 or hi > 255:
            raise ValueError(
                f"pixel values must lie in [0, 255] (uint8, or float on the same scale); found [{lo:g}, {hi:g}]. "
                "Pass images before any normalisation."
            )
        if 0 < hi <= 1.0:
            warnings.warn(
                f"float image values lie in [{lo:g}, {hi:g}]: inputs are read on the 0..255 scale; "
                "multiply images in [0, 1] by 255.",
                stacklevel=3,
            )
    else:
        raise ValueError(f"unsupported image dtype {image.dtype}; use uint8 or float in [0, 255].")
    if image.shape[-1] == 4:
        image = image[..., :3]  # RGBA: the alpha channel is dropped
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image


def resize_bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Float32 (H, W, C) -> (height, width, C): Pillow's bicubic resize, one float ('F') plane per channel.

    Pillow's BICUBIC is the Keys cubic kernel (a = -0.5), widened by the scale when downsampling (the
    antialias): the resampling of TensorFlow's ``tf.image.resize(..., 'bicubic', antialias=True)`` in the
    tf.data pipeline. Against it, on noise and noisy gradients (8x8 to 640x480 pixels, resized up and down to
    5..333 pixels), the float outputs differ by at most 4e-3 grey levels (tests/test_inference.py checks 5e-3).
    ``jax.image.resize(..., 'bicubic', antialias=True)`` matches as closely (3e-3) but compiles once per new
    pair of sizes (~0.2 s each), which a folder of photos of many sizes would pay per image; Pillow needs none.
    """
    image = np.asarray(image, np.float32)
    planes = [
        Image.fromarray(np.ascontiguousarray(image[..., c]), mode="F").resize(
            (int(width), int(height)), Image.Resampling.BICUBIC
        )
        for c in range(image.shape[-1])
    ]
    return np.stack([np.asarray(p, np.float32) for p in planes], axis=-1)


# Sources held in memory as decoded images of one square size (the pipeline's 'raw' records): their eval resizes the
# whole image to image_size (`image_ops.eval_image`) and config.data.eval_crop_pct does not apply.
WHOLE_IMAGE_SOURCES = ("digits", "idx")


def eval_crop_pct(data_config) -> float:
    """The crop fraction of a run's eval (`config.data`): eval_crop_pct, 1.0 for WHOLE_IMAGE_SOURCES."""
    return 1.0 if data_config.get("name") in WHOLE_IMAGE_SOURCES else float(data_config["eval_crop_pct"])


def resize_shape(height: int, width: int, image_size: int, crop_pct: float) -> tuple[int, int]:
    """The size the shorter side is resized to before the centre crop, exactly as the tf.data pipeline computes it."""
    short = math.floor(image_size / crop_pct)
    hw = np.array([height, width], np.float32)
    new = np.maximum(np.floor(hw * np.float32(short) / hw.min()), image_size).astype(int)
    return int(new[0]), int(new[1])


def preprocess(images, *, image_size: int, crop_pct: float, normalization: str) -> np.ndarray:
    """Images -> the float32 batch (B, image_size, image_size, 3) a model was evaluated on.

    `images`: one image (H, W) grey, (H, W, 1|3|4), a batch (B, H, W, C) or a list of images of any sizes; uint8,
    or float on the same 0..255 scale (outside [0, 255]: refused; in [0, 1]: a warning). Grey images are repeated
    to RGB, alpha is dropped. Each image's shorter side is resized to ``floor(image_size / crop_pct)``
    (`resize_bicubic`, the pipeline's antialiased bicubic), rounded and clipped to whole grey levels (the pipeline
    stores uint8), centre-cropped to image_size and normalised: ``(x - mean) / std``.
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct={crop_pct} must be in (0, 1].")
    mean, std = mean_std(normalization)
    s = image_size
    out = []
    for image in _as_image_list(images):
        image = _to_rgb_float(image)
        h, w = resize_shape(image.shape[0], image.shape[1], s, crop_pct)
        if (h, w) != image.shape[:2]:
            image = np.clip(np.round(resize_bicubic(image, h, w)), 0.0, 255.0)
        top, left = round((h - s) / 2), round((w - s) / 2)  # torchvision's CenterCrop: halves round to even
        image = image[top : top + s, left : left + s]
        out.append((image - mean) / std)
    return np.stack(out).astype(np.float32)
