"""Load a trained checkpoint and classify images: no TensorFlow, no training state.

    from s2mlp import inference
    clf = inference.load("/tmp/s2mlp_demo")          # a workdir, its checkpoints/ or a step folder
    result = clf.predict(images, k=5)                # uint8 or float images in [0, 255]
    print(result.format(0))                          # top-5 of the first image with class names

`load` reads the run's config and dataset items (JSON) and the parameters
(tensorstore arrays, the EMA ones when the run kept them), never the optimizer
state. **Loading never executes code from the checkpoint**: it reads JSON and
array data through Orbax/tensorstore only; nothing is unpickled. Before any
array is read, the saved parameter shapes are checked against the model the
config builds, so a checkpoint that does not fit its config is refused with the
list of differing keys.

`Classifier.preprocess` reproduces the eval preprocessing of the training
pipeline (`input_pipeline`'s eval branch) in NumPy: resize the shorter side to
``floor(image_size / eval_crop_pct)`` (bicubic, antialiased, rounded to whole
grey levels as the pipeline does), centre-crop ``image_size``, normalise with
``s2mlp.preprocessing.mean_std(config.data.normalization)``. On the same image
it matches the tf.data pipeline to within one grey level (a rounding tie).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from s2mlp import checkpoint as ckpt
from s2mlp import models
from s2mlp.preprocessing import mean_std

__all__ = [
    "Classifier",
    "ConfigView",
    "Prediction",
    "abstract_params",
    "build_model",
    "from_params",
    "load",
    "preprocess",
    "resize_bicubic",
]


# =============================================================================
# The run's config, read back from JSON.
# =============================================================================
class ConfigView(Mapping):
    """A read-only attribute view of a JSON config: ``config.data.normalization``, ``config.get('x', d)``.

    Stands in for the ``ml_collections.ConfigDict`` the run was trained with, so
    inference needs neither ml_collections nor the config files.
    """

    def __init__(self, data: Mapping[str, Any]):
        object.__setattr__(self, "_data", dict(data))

    def __getitem__(self, key: str) -> Any:
        value = self._data[key]
        return ConfigView(value) if isinstance(value, Mapping) else value

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"config has no field {key!r}; it has {sorted(self._data)}.") from None

    def __setattr__(self, key, value):
        raise AttributeError("ConfigView is read-only; edit the dict from to_dict() and wrap it again.")

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"ConfigView({json.dumps(self._data, indent=2, default=str)})"

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._data))


def _as_tuples(value: Any) -> Any:
    """JSON turns tuples (e.g. S²-MLPv2's hidden_dims) into lists; the models want tuples back."""
    if isinstance(value, list | tuple):
        return tuple(_as_tuples(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _as_tuples(v) for k, v in value.items()}
    return value


def build_model(config, num_classes: int, *, dtype: str | None = None):
    """The model of a run's config, as `train_lib.build_model` builds it (`dtype` overrides compute_dtype)."""
    overrides = _as_tuples(dict(config.model.get("overrides") or {}))
    return models.get_model(
        config.model.name,
        image_size=config.image_size,
        num_classes=num_classes,
        drop_path_rate=config.model.get("drop_path_rate", 0.0),
        dtype=dtype or config.get("compute_dtype", "float32"),
        **overrides,
    )


def abstract_params(model, image_size: int) -> Any:
    """Shapes and dtypes of `model`'s parameters, computed without allocating them."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)["params"]


# =============================================================================
# Preprocessing: the training pipeline's eval branch, without TensorFlow.
# =============================================================================
def _as_image_list(images) -> list[np.ndarray]:
    """One image (H, W), (H, W, C) or a batch (B, H, W, C) / list of images -> list of (H, W, C)."""
    if isinstance(images, list | tuple):
        out = []
        for image in images:
            image = np.asarray(image)
            if image.ndim not in (2, 3):
                raise ValueError(f"each image of a list must be (H, W) or (H, W, C), got shape {image.shape}.")
            out.append(image)
        return out
    images = np.asarray(images)
    if images.ndim in (2, 3):
        return [images]
    if images.ndim == 4:
        return list(images)
    raise ValueError(f"images must be one image (H, W) / (H, W, C) or a batch (B, H, W, C), got shape {images.shape}.")


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


def _cubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """(in_size, out_size) float32 resampling weights of the Keys cubic kernel (a = -0.5), antialiased.

    The weights of ``jax.image.resize(..., 'bicubic', antialias=True)`` and of
    TensorFlow's ``tf.image.resize(..., 'bicubic', antialias=True)`` (both are
    scale_and_translate with the same kernel), computed in NumPy so that a new
    image size costs no compilation.
    """
    inv_scale = np.float32(in_size) / np.float32(out_size)
    kernel_scale = max(inv_scale, np.float32(1.0))  # widen the kernel when downsampling: the antialias
    sample = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * inv_scale - np.float32(0.5)
    x = np.abs(sample[None, :] - np.arange(in_size, dtype=np.float32)[:, None]) / kernel_scale
    w = np.where(x >= 1.0, ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0, ((1.5 * x - 2.5) * x) * x + 1.0)
    w = np.where(x >= 2.0, 0.0, w).astype(np.float32)
    total = w.sum(axis=0, keepdims=True)
    return np.where(np.abs(total) > 1000 * np.finfo(np.float32).eps, w / np.where(total != 0, total, 1), 0)


def resize_bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Float32 (H, W, C) -> (height, width, C), bicubic with antialiasing (see `_cubic_weights`)."""
    rows = _cubic_weights(image.shape[0], height)
    cols = _cubic_weights(image.shape[1], width)
    return np.einsum("hwc,hy,wx->yxc", image.astype(np.float32), rows, cols, optimize=True).astype(np.float32)


def resize_shape(height: int, width: int, image_size: int, crop_pct: float) -> tuple[int, int]:
    """The size the shorter side is resized to before the centre crop, exactly as the tf.data pipeline computes it."""
    short = math.floor(image_size / crop_pct)
    hw = np.array([height, width], np.float32)
    new = np.maximum(np.floor(hw * np.float32(short) / hw.min()), image_size).astype(int)
    return int(new[0]), int(new[1])


def preprocess(images, *, image_size: int, crop_pct: float, normalization: str) -> np.ndarray:
    """Images -> the float32 batch (B, image_size, image_size, 3) a model was evaluated on.

    `images`: one image (H, W) grey, (H, W, 1|3|4), a batch (B, H, W, C) or a list of
    images of any sizes; uint8, or float with values on the same 0..255 scale
    (floats outside [0, 255] are refused; floats in [0, 1] give a warning).
    Grey images are repeated to RGB, alpha is dropped. Each image's shorter side
    is resized to ``floor(image_size / crop_pct)`` (bicubic with antialiasing, as
    ``jax.image.resize`` and TensorFlow's ``tf.image.resize`` with
    ``'bicubic', antialias=True``; computed in NumPy), rounded and
    clipped to whole grey levels (the pipeline stores uint8), centre-cropped to
    image_size and normalised: ``(x - mean) / std``.
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
        top, left = (h - s + 1) // 2, (w - s + 1) // 2
        image = image[top : top + s, left : left + s]
        out.append((image - mean) / std)
    return np.stack(out).astype(np.float32)


# =============================================================================
# The classifier.
# =============================================================================
class Prediction(NamedTuple):
    """Top-k of each image, best first. Unpacks as ``indices, probabilities, labels = clf.predict(...)``."""

    indices: np.ndarray  # int32 (B, k)
    probabilities: np.ndarray  # float32 (B, k), softmax over all classes
    labels: list[list[str]]  # (B, k) class names

    def format(self, i: int = 0) -> str:
        """Image `i`'s top-k, one line per class: ``'  1.  87.31%  tabby (281)'`` (the index only when it differs)."""
        rows = zip(self.indices[i], self.probabilities[i], self.labels[i], strict=True)
        return "\n".join(
            f"{r + 1:3d}. {100 * p:6.2f}%  {name}" + (f" ({idx})" if name != str(idx) else "")
            for r, (idx, p, name) in enumerate(rows)
        )


@dataclasses.dataclass
class Classifier:
    """A model, its parameters and the eval preprocessing of its run.

    Attributes: ``model`` (flax module), ``params`` (pytree of arrays on the
    first local device), ``config`` (`ConfigView` of the run's config, or any
    object with the same fields), ``class_names`` (list of K strings),
    ``image_size``; ``checkpoint_dir`` and ``step`` say where it came from.
    """

    model: Any
    params: Any
    config: Any
    class_names: list[str]
    checkpoint_dir: epath.Path | None = None
    step: int | None = None
    _apply: Any = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        model = self.model
        self._apply = jax.jit(lambda params, images: model.apply({"params": params}, images, train=False))

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def workdir(self) -> epath.Path | None:
        """The training workdir (holds ``metrics.jsonl``), when the checkpoint sits in ``<workdir>/checkpoints``."""
        d = self.checkpoint_dir
        return d.parent if d is not None and d.name == ckpt.CHECKPOINTS else None

    def preprocess(self, images) -> np.ndarray:
        """Images (uint8, or float in [0, 255]; any H×W; one, a batch or a list; grey ok) -> (B, S, S, 3) float32.

        See the module-level `preprocess` for the exact steps.
        """
        return preprocess(
            images,
            image_size=self.image_size,
            crop_pct=float(self.config.data.eval_crop_pct),
            normalization=self.config.data.normalization,
        )

    def logits(self, batch) -> np.ndarray:
        """Float32 logits (B, K) of an already preprocessed batch (B, S, S, 3); jitted per batch shape."""
        batch = jnp.asarray(batch, jnp.float32)
        if batch.ndim != 4 or batch.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"logits() takes a preprocessed batch (B, {self.image_size}, {self.image_size}, 3), got "
                f"{tuple(batch.shape)}; call predict() or preprocess() first for raw images."
            )
        return np.asarray(self._apply(self.params, batch))

    def predict(self, images, k: int = 5, *, batch_size: int = 64) -> Prediction:
        """Top-`k` classes of raw images (see `preprocess`), as a `Prediction` (a batch even for one image).

        Images run in chunks of at most `batch_size`, each padded to a power of two (at least 8) so that
        a few compiled shapes serve every call.
        """
        batch = self.preprocess(images)
        chunks = []
        for start in range(0, len(batch), batch_size):
            chunk = batch[start : start + batch_size]
            padded = min(max(8, 1 << (len(chunk) - 1).bit_length()), max(batch_size, len(chunk)))
            chunk = np.concatenate([chunk, np.zeros((padded - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            chunks.append(self.logits(chunk)[: min(batch_size, len(batch) - start)])
        logits = np.concatenate(chunks)
        exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs = exp / exp.sum(axis=-1, keepdims=True)
        k = max(1, min(k, logits.shape[-1]))
        top = np.argsort(-logits, axis=-1, kind="stable")[:, :k].astype(np.int32)
        return Prediction(
            indices=top,
            probabilities=np.take_along_axis(probs, top, axis=-1),
            labels=[[self.class_names[i] for i in row] for row in top],
        )


# =============================================================================
# Loading.
# =============================================================================
def load(path: epath.PathLike, *, ema: bool = True, dtype: str | None = None) -> Classifier:
    """Loads a run's model for inference from `path`.

    `path`: a training workdir, its ``checkpoints/`` folder (both: the latest
    step) or one step folder ``checkpoints/<step>``; local or ``gs://``.
    `ema`: take the EMA parameters when the run kept them (else the raw ones).
    `dtype`: compute dtype override ('float32', 'bfloat16'); default the run's.

    Reads the ``config`` and ``dataset`` items (JSON) and one parameter item
    (tensorstore); the optimizer state is never read and no code from the
    checkpoint is executed (no pickle). The saved shapes are compared with the
    model the config builds before any array is read. Raises FileNotFoundError
    when `path` holds no checkpoint; ValueError naming the path when the
    checkpoint is incomplete or corrupt, or does not fit its own config.
    """
    directory, step = ckpt.locate(path)
    step_dir = directory / str(step)
    items = ckpt.saved_items(step_dir)
    if "params" not in items:
        raise FileNotFoundError(f"{step_dir} has no 'params' item: not a checkpoint written by main.py.")
    item = ckpt.params_item(step_dir, ema=ema)

    raw_config = ckpt.read_json(step_dir, "config")
    if raw_config is None:
        raise ValueError(f"checkpoint {step_dir} has no 'config' item, so its model cannot be rebuilt.")
    config = ConfigView(raw_config)
    dataset = ckpt.read_json(step_dir, "dataset") or {}
    found = ckpt.saved_shapes(step_dir, item)

    num_classes = dataset.get("num_classes") or found.get("head/bias", (None,))[0]
    if not num_classes:
        raise ValueError(f"checkpoint {step_dir}: no 'dataset' item and no 'head/bias' to tell the class count.")
    try:
        model = build_model(config, int(num_classes), dtype=dtype)
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"checkpoint {step_dir}: its config does not build a model: {e}") from None
    abstract = abstract_params(model, config.image_size)
    problems = ckpt.shape_mismatch(ckpt.flat_shapes(abstract), found)
    if problems:
        raise ValueError(
            f"checkpoint {step_dir}: the saved '{item}' do not fit the model its config builds "
            f"(model.name={config.model.name!r}, overrides={dict(config.model.get('overrides') or {})}, "
            f"image_size={config.image_size}, num_classes={num_classes}):\n{problems}"
        )
    params = ckpt.restore(step_dir, item, abstract)

    names = [str(n) for n in dataset.get("class_names") or []]
    if len(names) != num_classes:
        names = [str(i) for i in range(num_classes)]
    return Classifier(model=model, params=params, config=config, class_names=names, checkpoint_dir=directory, step=step)


def from_params(model, params, *, image_size: int, normalization: str, eval_crop_pct: float,
                class_names: Sequence[str] | None = None, model_name: str = "") -> Classifier:  # fmt: skip
    """A `Classifier` around parameters that did not come from a training run (e.g. an imported `.npz`)."""
    num_classes = jax.tree.leaves(params["head"])[0].shape[-1]
    names = [str(n) for n in class_names] if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class_names given for a head with {num_classes} classes.")
    config = ConfigView(
        {
            "model": {"name": model_name, "overrides": {}},
            "image_size": image_size,
            "compute_dtype": "float32",
            "data": {"normalization": normalization, "eval_crop_pct": eval_crop_pct},
        }
    )
    return Classifier(model=model, params=params, config=config, class_names=names)
