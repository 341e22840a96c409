"""Pixel normalisation shared by the tf.data pipeline and the inference API.

Kept free of TensorFlow so inference, benchmarks and notebooks run without it.
"""

from __future__ import annotations

import numpy as np

# name -> (mean, std) applied to pixel values in [0, 255].
NORMALIZATIONS = {
    # timm / DeiT / ViP statistics, used by every recipe here.
    "imagenet": (np.array([0.485, 0.456, 0.406]) * 255.0, np.array([0.229, 0.224, 0.225]) * 255.0),
    # vision_transformer's value range (-1, 1), for its published Mixer checkpoints.
    "minus_one_to_one": (np.array([127.5, 127.5, 127.5]), np.array([127.5, 127.5, 127.5])),
}


def mean_std(kind: str) -> tuple[np.ndarray, np.ndarray]:
    if kind not in NORMALIZATIONS:
        raise ValueError(f"normalization={kind!r} is unknown; choose one of {sorted(NORMALIZATIONS)}.")
    mean, std = NORMALIZATIONS[kind]
    return mean.astype(np.float32), std.astype(np.float32)
