"""Model registry: ``get_model(name, **overrides)`` is the one way to build a model.

Each registered variant is a model class and its hyperparameters; each class checks its own
fields (``check_fields``) and knows its input divisor and block layout. Every model is called
as ``model.apply(variables, images, train=...)`` on NHWC float images and returns float32
logits; `dtype` is the compute dtype (parameters stay float32).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from s2mlp.models.mixer import MlpMixer
from s2mlp.models.s2mlp import S2MLP
from s2mlp.models.s2mlpv2 import S2MLPv2

# name -> (class, hyperparameters): the papers' models (PAPER_MODELS) and tiny variants for tests and demos.
_REGISTRY: dict[str, tuple[type, dict[str, Any]]] = {
    # S²-MLP (S²-MLP paper §3.2, Table 2)
    "s2mlp_wide": (S2MLP, dict(patch_size=16, hidden_dim=768, num_blocks=12, mlp_ratio=4, norm="layernorm")),
    "s2mlp_deep": (S2MLP, dict(patch_size=16, hidden_dim=384, num_blocks=36, mlp_ratio=4, norm="affine")),
    "s2mlp_tiny": (S2MLP, dict(patch_size=4, hidden_dim=32, num_blocks=2, mlp_ratio=2, norm="layernorm")),
    # S²-MLPv2 (S²-MLPv2 paper §4, Table 1)
    "s2mlpv2_small": (S2MLPv2, dict(patch_size=7, hidden_dims=(192, 384), depths=(4, 14), mlp_ratio=3)),
    "s2mlpv2_medium": (S2MLPv2, dict(patch_size=7, hidden_dims=(256, 512), depths=(7, 17), mlp_ratio=3)),
    "s2mlpv2_tiny": (S2MLPv2, dict(patch_size=4, hidden_dims=(16, 32), depths=(1, 1), mlp_ratio=2)),
    # MLP-Mixer (Tolstikhin et al. 2021, Table 1)
    "mixer_s16": (
        MlpMixer,
        dict(patch_size=16, num_blocks=8, hidden_dim=512, tokens_mlp_dim=256, channels_mlp_dim=2048),
    ),
    "mixer_b16": (
        MlpMixer,
        dict(patch_size=16, num_blocks=12, hidden_dim=768, tokens_mlp_dim=384, channels_mlp_dim=3072),
    ),
    "mixer_l16": (
        MlpMixer,
        dict(patch_size=16, num_blocks=24, hidden_dim=1024, tokens_mlp_dim=512, channels_mlp_dim=4096),
    ),
    "mixer_tiny": (MlpMixer, dict(patch_size=4, num_blocks=2, hidden_dim=32, tokens_mlp_dim=16, channels_mlp_dim=64)),
}

# The models of the papers' tables (the rest are tiny variants for tests and demos).
PAPER_MODELS = ("s2mlp_wide", "s2mlp_deep", "s2mlpv2_small", "s2mlpv2_medium", "mixer_s16", "mixer_b16", "mixer_l16")


def model_names() -> list[str]:
    return sorted(_REGISTRY)


# ---- building ----------------------------------------------------------------------
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def get_model(name: str, *, image_size: int | None = None, **overrides: Any):
    """Builds the registered model `name` with hyperparameters replaced by `overrides`.

    `num_classes` defaults to 1000. `dtype` may be a string ('float32', 'bfloat16'). `image_size`, when given, is
    checked against the patch size (and, for Mixer, is the one resolution the model will accept). Raises ValueError
    naming the bad field and the valid choices (the model class's ``check_fields``) before anything is compiled.
    Former field names (S²-MLP's ``expansion``, now ``mlp_ratio``; S²-MLPv2's tuple ``num_blocks``, now
    ``depths``) are still accepted, with a FutureWarning (the class's ``upgrade_fields``).
    """
    if name not in _REGISTRY:
        raise ValueError(f"model name {name!r} is unknown; choose one of {model_names()}.")
    cls, kwargs = _checked_fields(name, image_size, overrides)
    return cls(**kwargs)


def _checked_fields(name: str, image_size: int | None, overrides: dict[str, Any]) -> tuple[type, dict[str, Any]]:
    """`get_model`'s checks of a registered `name`: the model class and the fields to build it with."""
    cls, kwargs = _REGISTRY[name]
    overrides = cls.upgrade_fields(overrides, name)
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"model override(s) {unknown} are not fields of {name} ({cls.__name__}); valid: {sorted(fields)}."
        )
    kwargs = {"num_classes": 1000, **kwargs, **overrides}
    if isinstance(kwargs.get("dtype"), str):
        if kwargs["dtype"] not in _DTYPES:
            raise ValueError(f"model dtype={kwargs['dtype']!r} is unknown; choose one of {sorted(_DTYPES)}.")
        kwargs["dtype"] = _DTYPES[kwargs["dtype"]]
    cls.check_fields(kwargs, name)
    if image_size is not None:
        divisor = cls.divisor_of(kwargs)  # every registered model sets its patch size (and stages)
        if image_size <= 0 or image_size % divisor:
            downsampling = " × 2 for the downsampling" if divisor != kwargs["patch_size"] else ""
            raise ValueError(
                f"image_size={image_size} is not a positive multiple of {divisor} "
                f"(the patch size{downsampling} of {name}); "
                f"use e.g. {max(divisor, round(image_size / divisor) * divisor)}."
            )
    return cls, kwargs


def changed_fields(model, name: str) -> dict[str, Any]:
    """The fields of `model` whose values differ from the registered model `name`'s (the class count aside):
    what the config's overrides, DropPath rate and dtype changed, for the trainer's start-up line."""
    reference, values = (_values(m, skip=("parent", "name", "num_classes")) for m in (get_model(name), model))
    return {k: jnp.dtype(v).name if k == "dtype" else v for k, v in values.items() if v != reference[k]}


def _values(model, skip) -> dict[str, Any]:
    """``{field: value}`` of `model`'s fields, less those in `skip`."""
    return {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in skip}


def from_config(config, num_classes: int, *, dtype: str | None = None):
    """The model of a training config: the one "config -> model" of the trainer, inference, benchmarks and tools.

    `config` is an ``ml_collections.ConfigDict`` or a run's saved ``config.json`` as a mapping; it reads ``model.name``,
    ``model.overrides``, ``model.drop_path_rate``, ``image_size`` and ``compute_dtype`` (`dtype` replaces the latter).
    JSON lists (e.g. ``hidden_dims``) become tuples. Raises ValueError starting ``config.model:`` naming the field.
    """
    cls, kwargs = _config_fields(config, num_classes, dtype)
    return cls(**kwargs)


def check_config(config) -> None:
    """`from_config`'s checks, building nothing: the config boundary's model check (`s2mlp.recipe`)."""
    _config_fields(config, num_classes=1000, dtype=None)


def _config_fields(config, num_classes: int, dtype: str | None) -> tuple[type, dict[str, Any]]:
    model = config["model"]
    if model["name"] not in _REGISTRY:
        raise ValueError(f"config.model.name={model['name']!r} is unknown; choose one of {model_names()}.")
    dtype_field = "dtype" if dtype else "config.compute_dtype"
    dtype = dtype or config.get("compute_dtype", "float32")
    if dtype not in _DTYPES:
        raise ValueError(f"{dtype_field}={dtype!r} is unknown; choose one of {sorted(_DTYPES)}.")
    overrides = _as_tuples(dict(model.get("overrides") or {}))
    set_by = {"num_classes": "the dataset", "drop_path_rate": "config.model.drop_path_rate", "dtype": dtype_field}
    if clash := sorted(set_by.keys() & overrides.keys()):
        field = clash[0]
        raise ValueError(
            f"config.model.overrides.{field}={overrides[field]!r}: {field} is set by {set_by[field]}; "
            "remove the override."
        )
    overrides |= {
        "num_classes": num_classes,
        "drop_path_rate": model.get("drop_path_rate", 0.0),
        "dtype": _DTYPES[dtype],
    }
    try:
        return _checked_fields(model["name"], config["image_size"], overrides)
    except ValueError as e:
        raise ValueError(f"config.model: {e}") from None


def abstract_params(model, image_size: int) -> Any:
    """Shapes and dtypes of `model`'s parameters (``jax.ShapeDtypeStruct`` leaves), computed without allocating."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)["params"]


def _as_tuples(value: Any) -> Any:
    """JSON turns tuples (e.g. S²-MLPv2's hidden_dims) into lists; the models want tuples back."""
    if isinstance(value, list | tuple):
        return tuple(_as_tuples(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _as_tuples(v) for k, v in value.items()}
    return value


# Module fields that say how a model is laid out, computed or initialised, not which function its parameters compute:
# a checkpoint may be resumed or evaluated with other values (scan is converted on restore).
_NOT_THE_FUNCTION = frozenset({"parent", "name", "scan", "remat", "dtype", "drop_path_rate", "weight_init",
                               "branch_scale_init"})  # fmt: skip


def function_changes(saved_config, model, name: str, num_classes: int) -> list[str] | None:
    """Where `model` (`from_config`'s, of config.model.name `name`) computes another function than the model of
    `saved_config` (a checkpoint's config item) with the same parameters: ``'model.name: <saved> -> <new>'``, or
    ``'model.overrides.<field>: <saved> -> <new>'`` per field; [] when none; None when `saved_config` is missing or
    this version cannot build its model."""
    try:
        saved = from_config(saved_config, num_classes)
    except (TypeError, KeyError, ValueError):
        return None
    if saved_config["model"]["name"] != name:
        return [f"model.name: {saved_config['model']['name']!r} -> {name!r}"]
    a, b = (_values(m, skip=_NOT_THE_FUNCTION) for m in (saved, model))
    return [f"model.overrides.{k}: {a[k]!r} -> {b[k]!r}" for k in sorted(a) if a[k] != b[k]]


def block_groups(model) -> list[tuple[str, list[str]]]:
    """The model's runs of identical blocks: (scanned name, [unrolled names]) per run; [] for Mixer."""
    return model.block_groups()


def __getattr__(name: str):
    """`convert_params`, `scan_params` and `unscan_params` live with the checkpoint layout (`s2mlp.checkpoint`);
    importable from here too."""
    if name in ("convert_params", "scan_params", "unscan_params"):
        from s2mlp import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
