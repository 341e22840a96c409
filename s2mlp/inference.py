"""Load a trained checkpoint and classify images: no TensorFlow, no training state.

    from s2mlp import inference
    clf = inference.load("/tmp/s2mlp_demo")          # a workdir, its checkpoints/ or a step folder
    result = clf.predict(images, k=5)                # uint8 or float images in [0, 255]
    print(result.format(0))                          # top-5 of the first image with class names

`load` reads the run's config and dataset items (JSON) and the parameters (tensorstore
arrays, the EMA ones when the run kept them), never the optimizer state, and **never
executes code from the checkpoint** (nothing is unpickled). Before any array is read, the
saved shapes are checked against the model the config builds: a checkpoint that does not
fit its config is refused with the list of differing keys.

`Classifier.preprocess` is the eval preprocessing of the training pipeline
(`input_pipeline`'s eval branch) with NumPy in and out: `s2mlp.preprocessing.preprocess`
(re-exported here) at the run's image_size, `s2mlp.preprocessing.eval_crop_pct` (the digits
and IDX files ignore eval_crop_pct) and config.data.normalization. On the same image it
matches the tf.data pipeline to within one grey level (a rounding tie).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from s2mlp import checkpoint as ckpt
from s2mlp import models
from s2mlp.preprocessing import eval_crop_pct, preprocess, resize_bicubic

__all__ = ["Classifier", "ConfigView", "Prediction", "from_params", "load", "preprocess", "resize_bicubic"]


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
    """A model, its parameters (on the first local device) and the eval preprocessing of its run.

    ``config`` is a `ConfigView` of the run's config, or any object with the same fields;
    ``checkpoint_dir`` and ``step`` say where it came from.
    """

    model: Any
    params: Any
    config: Any
    class_names: list[str]
    checkpoint_dir: epath.Path | None = None
    step: int | None = None
    params_item: str | None = None  # the checkpoint item the parameters came from: 'params' or 'ema_params'
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
            crop_pct=eval_crop_pct(self.config.data),
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
            padded = min(max(8, 1 << (len(chunk) - 1).bit_length()), batch_size)
            chunks.append(self.logits(np.pad(chunk, [(0, padded - len(chunk))] + [(0, 0)] * 3))[: len(chunk)])
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


def load(path: epath.PathLike, *, ema: bool = True, dtype: str | None = None) -> Classifier:
    """Loads a run's model for inference from `path`.

    `path`: a training workdir, its ``checkpoints/`` folder (both: the latest
    step) or one step folder ``checkpoints/<step>``; local or ``gs://``.
    `ema`: take the EMA parameters when the run kept them (else the raw ones).
    `dtype`: compute dtype override ('float32', 'bfloat16'); default the run's.

    Reads the ``config`` and ``dataset`` items and one parameter item, as the
    module docstring says. Raises FileNotFoundError when `path` holds no
    checkpoint; ValueError naming the path when the checkpoint is incomplete or
    corrupt, or does not fit its own config.
    """
    directory, step = ckpt.locate(path)
    step_dir = directory / str(step)
    if ckpt.PARAMS not in ckpt.saved_items(step_dir):
        raise FileNotFoundError(f"{step_dir} has no '{ckpt.PARAMS}' item: not a checkpoint written by main.py.")
    item = ckpt.params_item(step_dir, ema=ema)

    raw_config = ckpt.read_json(step_dir, ckpt.CONFIG)
    if raw_config is None:
        raise ValueError(f"checkpoint {step_dir} has no '{ckpt.CONFIG}' item, so its model cannot be rebuilt.")
    config = ConfigView(raw_config)
    dataset = ckpt.read_json(step_dir, ckpt.DATASET) or {}
    found = ckpt.saved_shapes(step_dir, item)

    num_classes = dataset.get("num_classes") or found.get("head/bias", (None,))[0]
    if not num_classes:
        raise ValueError(f"checkpoint {step_dir}: no 'dataset' item and no 'head/bias' to tell the class count.")
    try:
        model = models.from_config(config, int(num_classes), dtype=dtype)
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"checkpoint {step_dir}: its config does not build a model: {e}") from None
    abstract = models.abstract_params(model, config.image_size)
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
    return Classifier(model=model, params=params, config=config, class_names=names, checkpoint_dir=directory, step=step,
                      params_item=item)  # fmt: skip


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
