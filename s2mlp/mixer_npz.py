"""google-research/vision_transformer's published MLP-Mixer ``.npz`` checkpoints, loaded into `s2mlp.models`.

Those files are ``np.savez`` archives of the parameter tree flattened with '/',
the format that vision_transformer's ``vit_jax/checkpoint.py`` reads in ``load``
(``np.load(f, allow_pickle=False)``, then ``recover_tree`` splits each key at '/';
``load_pretrained`` builds on it): ``stem/kernel`` (p, p, 3, C),
``MixerBlock_{i}/{LayerNorm_0,token_mixing,LayerNorm_1,channel_mixing}/...``
with ``Dense_0``/``Dense_1`` inside each MLP, ``pre_head_layer_norm/{scale,bias}``
and ``head/{kernel,bias}``. Our `MlpMixer` uses exactly these names (those of
``vit_jax/models_mixer.py``), so the arrays are used unchanged.

Files are read with ``allow_pickle=False``: nothing in them is executed. A file
that is not a readable ``.npz`` (truncated, not a zip archive, a bare ``.npy``)
and one whose parameters hold NaN or Inf are refused with a ValueError naming
the file (and the first non-finite key).

    model, params = load_mixer_npz("imagenet1k_Mixer-B_16.npz", "mixer_b16")
    clf = classifier_from_npz("imagenet1k_Mixer-B_16.npz", "mixer_b16")   # the inference.Classifier interface

`save_mixer_npz` writes the same format (used by the tests and the notebook).
"""

from __future__ import annotations

import io
import math
import zipfile
import zlib
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np
from etils import epath

from s2mlp import checkpoint as ckpt
from s2mlp import models

__all__ = ["classifier_from_npz", "first_nonfinite", "load_mixer_npz", "save_mixer_npz"]

TOKEN_KERNEL = "MixerBlock_0/token_mixing/Dense_0/kernel"  # (tokens, tokens_mlp_dim): fixes the resolution


def save_mixer_npz(path_or_file: epath.PathLike | BinaryIO, params: Any) -> None:
    """Writes `params` as vision_transformer does: ``np.savez`` of the '/'-flattened tree."""
    flat = {k: np.asarray(v) for k, v in ckpt.flatten(params).items()}
    if hasattr(path_or_file, "write"):
        np.savez(path_or_file, **flat)
        return
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    epath.Path(path_or_file).write_bytes(buffer.getvalue())


def _read_npz(path_or_file) -> tuple[str, dict[str, np.ndarray]]:
    if hasattr(path_or_file, "read"):
        name, source = getattr(path_or_file, "name", "<file object>"), path_or_file
    else:
        path = epath.Path(path_or_file)
        if not path.exists():
            raise FileNotFoundError(f"Mixer checkpoint {path} does not exist.")
        name, source = str(path), io.BytesIO(path.read_bytes())
    try:
        loaded = np.load(source, allow_pickle=False)
    except ValueError:  # neither a zip nor a .npy header: numpy would unpickle it, which allow_pickle=False refuses
        raise ValueError(
            f"{name}: not an .npz archive (it starts with neither a zip nor an .npy header, and pickles are never "
            "loaded); it is damaged or not a vision_transformer checkpoint."
        ) from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:  # a truncated or damaged zip, or an unreadable file
        raise ValueError(
            f"{name}: not a readable .npz file ({type(e).__name__}: {e}); it is truncated or damaged: "
            "download or copy it again."
        ) from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"{name}: holds a single array, not an .npz archive of named parameters.")
    with loaded as archive:
        flat = {}
        for key in archive.files:
            try:
                flat[key] = archive[key]
            except ValueError as e:  # object arrays need pickle: refused
                raise ValueError(f"{name}: {key} is not a plain array ({e}); refusing to unpickle it.") from None
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # a damaged member
                raise ValueError(
                    f"{name}: array {key} cannot be read ({type(e).__name__}: {e}); the file is truncated or "
                    "damaged: download or copy it again."
                ) from None
    return name, flat


def first_nonfinite(flat: dict[str, np.ndarray]) -> tuple[str, int] | None:
    """(key, count) of the first array, in sorted key order, holding NaN or Inf; None when all are finite."""
    for key in sorted(flat):
        value = np.asarray(flat[key])
        bad = np.count_nonzero(~np.isfinite(value)) if np.issubdtype(value.dtype, np.inexact) else 0
        if bad:
            return key, int(bad)
    return None


def _describe(flat: dict[str, np.ndarray]) -> str:
    """What the file holds, and the registered Mixer of that shape if there is one."""
    try:
        found = dict(
            patch_size=int(flat["stem/kernel"].shape[0]),
            num_blocks=len({k.split("/")[0] for k in flat if k.startswith("MixerBlock_")}),
            hidden_dim=int(flat["stem/kernel"].shape[-1]),
            tokens_mlp_dim=int(flat[TOKEN_KERNEL].shape[1]),
            channels_mlp_dim=int(flat["MixerBlock_0/channel_mixing/Dense_0/kernel"].shape[1]),
        )
    except (KeyError, IndexError):
        return "The file does not have the layout of any MLP-Mixer."
    same = [
        n
        for n in models.model_names()
        if n.startswith("mixer") and all(getattr(models.get_model(n), k) == v for k, v in found.items())
    ]
    hint = f"; that is model_name={same[0]!r}" if same else "; no registered model has these sizes"
    return "The file holds a Mixer with " + ", ".join(f"{k}={v}" for k, v in found.items()) + hint + "."


def load_mixer_npz(path_or_file, model_name: str = "mixer_b16", num_classes: int | None = None,
                   *, dtype: str = "float32") -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """Loads a vision_transformer Mixer ``.npz`` into the registered model `model_name`.

    `path_or_file`: a local or ``gs://`` path, or a binary file object.
    `num_classes`: default the size of ``head/bias`` in the file. The image size
    is read from the token-mixing kernel ((H/p)·(W/p) tokens, square images).
    Returns ``(model, params)``: a `MlpMixer` and a nested dict of float32
    arrays. Raises ValueError listing every missing, unexpected and mis-shaped
    key when the file does not hold `model_name`'s parameters (and the others
    the module docstring names).
    """
    import jax.numpy as jnp

    name, flat = _read_npz(path_or_file)
    missing = [k for k in ("head/bias", TOKEN_KERNEL) if k not in flat]
    if missing:
        raise ValueError(
            f"{name}: missing {missing}; not a vision_transformer MLP-Mixer checkpoint "
            f"(found {len(flat)} arrays, e.g. {sorted(flat)[:4]})."
        )
    num_classes = int(flat["head/bias"].shape[0]) if num_classes is None else num_classes
    probe = models.get_model(model_name, num_classes=num_classes)
    if type(probe).__name__ != "MlpMixer":
        raise ValueError(f"model_name={model_name!r} is not an MLP-Mixer; choose a mixer_* model.")
    tokens = int(flat[TOKEN_KERNEL].shape[0])
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{name}: {TOKEN_KERNEL} has {tokens} tokens, not a square grid.")
    image_size = side * probe.patch_size
    model = models.get_model(model_name, image_size=image_size, num_classes=num_classes, dtype=dtype)
    abstract = models.abstract_params(model, image_size)
    problems = ckpt.shape_mismatch(ckpt.flat_shapes(abstract), {k: v.shape for k, v in flat.items()}, limit=20)
    if problems:
        raise ValueError(
            f"{name} does not hold the parameters of {model_name} "
            f"(num_classes={num_classes}, {image_size}x{image_size} images):\n{problems}\n{_describe(flat)}"
        )
    bad = first_nonfinite(flat)
    if bad is not None:
        key, count = bad
        raise ValueError(
            f"{name}: parameter {key} holds {count} NaN/Inf value(s) of {flat[key].size}; refusing to load a "
            "non-finite checkpoint (a diverged run or a damaged file)."
        )
    return model, ckpt.unflatten({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})


def classifier_from_npz(path_or_file, model_name: str = "mixer_b16", num_classes: int | None = None, *,
                        class_names: Sequence[str] | None = None, eval_crop_pct: float = 0.875):  # fmt: skip
    """A Mixer ``.npz`` as an `s2mlp.inference.Classifier`, to run beside S²-MLP on the same images.

    Normalisation is vision_transformer's value range (-1, 1) ('minus_one_to_one').
    Preprocessing resizes the shorter side to ``image_size / eval_crop_pct`` and
    centre-crops, like our own runs; vit_jax's eval instead resizes the whole
    image to the square (``eval_crop_pct=1.0`` comes closest for square images).
    """
    from s2mlp import inference

    model, params = load_mixer_npz(path_or_file, model_name, num_classes)
    image_size = math.isqrt(params["MixerBlock_0"]["token_mixing"]["Dense_0"]["kernel"].shape[0]) * model.patch_size
    return inference.from_params(
        model,
        params,
        image_size=image_size,
        normalization="minus_one_to_one",
        eval_crop_pct=eval_crop_pct,
        class_names=class_names,
        model_name=model_name,
    )
