"""Model registry: ``get_model(name, **overrides)`` is the one way to build a model.

Each registered variant is one function returning its class and hyperparameters.
Every model is called as ``model.apply(variables, images, train=...)`` on NHWC
float images and returns float32 logits; `dtype` is the compute dtype
(parameters stay float32).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from s2mlp.models.layers import INITS, REMAT_POLICIES
from s2mlp.models.mixer import MlpMixer
from s2mlp.models.s2mlp import S2MLP
from s2mlp.models.s2mlpv2 import S2MLPv2
from s2mlp.shift import PATTERNS, num_groups

_REGISTRY: dict[str, Callable[[], tuple[type, dict[str, Any]]]] = {}

# The models of the papers' tables (the rest are tiny variants for tests and demos).
PAPER_MODELS = ("s2mlp_wide", "s2mlp_deep", "s2mlpv2_small", "s2mlpv2_medium", "mixer_s16", "mixer_b16", "mixer_l16")


def register(fn: Callable[[], tuple[type, dict[str, Any]]]):
    _REGISTRY[fn.__name__] = fn
    return fn


def model_names() -> list[str]:
    return sorted(_REGISTRY)


# ---- S²-MLP (S²-MLP paper §3.2, Table 2) ------------------------------------
@register
def s2mlp_wide():
    return S2MLP, dict(patch_size=16, hidden_dim=768, num_blocks=12, expansion=4, norm="layernorm")


@register
def s2mlp_deep():
    return S2MLP, dict(patch_size=16, hidden_dim=384, num_blocks=36, expansion=4, norm="affine")


@register
def s2mlp_tiny():
    return S2MLP, dict(patch_size=4, hidden_dim=32, num_blocks=2, expansion=2, norm="layernorm")


# ---- S²-MLPv2 (S²-MLPv2 paper §4, Table 1) ----------------------------------
@register
def s2mlpv2_small():
    return S2MLPv2, dict(patch_size=7, hidden_dims=(192, 384), num_blocks=(4, 14), mlp_ratio=3)


@register
def s2mlpv2_medium():
    return S2MLPv2, dict(patch_size=7, hidden_dims=(256, 512), num_blocks=(7, 17), mlp_ratio=3)


@register
def s2mlpv2_tiny():
    return S2MLPv2, dict(patch_size=4, hidden_dims=(16, 32), num_blocks=(1, 1), mlp_ratio=2)


# ---- MLP-Mixer (Tolstikhin et al. 2021, Table 1) -----------------------------
@register
def mixer_s16():
    return MlpMixer, dict(patch_size=16, num_blocks=8, hidden_dim=512, tokens_mlp_dim=256, channels_mlp_dim=2048)


@register
def mixer_b16():
    return MlpMixer, dict(patch_size=16, num_blocks=12, hidden_dim=768, tokens_mlp_dim=384, channels_mlp_dim=3072)


@register
def mixer_l16():
    return MlpMixer, dict(patch_size=16, num_blocks=24, hidden_dim=1024, tokens_mlp_dim=512, channels_mlp_dim=4096)


@register
def mixer_tiny():
    return MlpMixer, dict(patch_size=4, num_blocks=2, hidden_dim=32, tokens_mlp_dim=16, channels_mlp_dim=64)


# ---- building and validation ----------------------------------------------
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def input_divisor(model) -> int:
    """Image sides must be multiples of this: the patch size (× 2 per S²-MLPv2 downsampling)."""
    if isinstance(model, S2MLPv2):
        return model.patch_size * 2 ** (len(model.hidden_dims) - 1)
    return model.patch_size


def get_model(name: str, *, image_size: int | None = None, **overrides: Any):
    """Builds the registered model `name` with hyperparameters replaced by `overrides`.

    `num_classes` defaults to 1000. `dtype` may be a string ('float32', 'bfloat16').
    `image_size`, when given, is checked against the patch size (and, for Mixer,
    is the one resolution the model will accept). Raises ValueError naming the
    bad field and the valid choices before anything is compiled.
    """
    if name not in _REGISTRY:
        raise ValueError(f"model name {name!r} is unknown; choose one of {model_names()}.")
    cls, kwargs = _REGISTRY[name]()
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
    _validate(name, cls, kwargs)
    model = cls(**kwargs)
    if image_size is not None:
        divisor = input_divisor(model)
        if image_size <= 0 or image_size % divisor:
            raise ValueError(
                f"image_size={image_size} is not a positive multiple of {divisor} "
                f"(the patch size{' × 2 for the downsampling' if cls is S2MLPv2 else ''} of {name}); "
                f"use e.g. {max(divisor, round(image_size / divisor) * divisor)}."
            )
    return model


def _validate(name: str, cls: type, kw: dict[str, Any]) -> None:
    def fail(field: str, why: str):
        raise ValueError(f"{name}: {field}={kw[field]!r} {why}.")

    if not isinstance(kw["num_classes"], int) or kw["num_classes"] < 1:
        fail("num_classes", "must be a positive integer")
    if not 0.0 <= kw.get("drop_path_rate", 0.0) < 1.0:
        fail("drop_path_rate", "must be in [0, 1)")
    if kw["patch_size"] < 1:
        fail("patch_size", "must be a positive integer")
    if "scan" in kw and not isinstance(kw["scan"], bool):
        fail("scan", "must be True (one nn.scan per run of identical blocks) or False (unrolled blocks)")
    if kw.get("remat", "none") not in REMAT_POLICIES:
        fail("remat", f"is unknown; choose one of {list(REMAT_POLICIES)}")
    if kw.get("weight_init", "flax") not in INITS:
        fail("weight_init", f"is unknown; choose one of {list(INITS)} (docs/notes/initialisation.md)")
    if cls is S2MLP:
        if kw.get("shift_pattern", "ss1") not in PATTERNS:
            fail("shift_pattern", f"is unknown; choose one of {sorted(PATTERNS)}")
        groups = num_groups(kw.get("shift_pattern", "ss1"))
        if kw["hidden_dim"] < 1 or kw["hidden_dim"] % groups:
            fail("hidden_dim", f"must be a positive multiple of {groups} (the shift pattern's channel groups)")
        for field in ("num_blocks", "expansion"):
            if kw[field] < 1:
                fail(field, "must be a positive integer")
        if kw.get("norm", "layernorm") not in ("layernorm", "affine"):
            fail("norm", "is unknown; choose 'layernorm' or 'affine'")
        scale = kw.get("branch_scale_init")
        if scale is not None:
            if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0.0 < scale < float("inf"):
                fail("branch_scale_init", "must be a positive number, or None for ResMLP's depth rule")
            if kw.get("norm", "layernorm") != "affine":
                fail("branch_scale_init", "only sets the Affine that closes each branch: use it with norm='affine'")
    elif cls is S2MLPv2:
        if len(kw["hidden_dims"]) != len(kw["num_blocks"]) or not kw["hidden_dims"]:
            fail("hidden_dims", "must have one entry per stage, like num_blocks")
        if any(d < 4 or d % 4 for d in kw["hidden_dims"]):
            fail("hidden_dims", "must all be positive multiples of 4 (the shift's four channel groups)")
        if any(n < 1 for n in kw["num_blocks"]):
            fail("num_blocks", "must all be positive integers")
        patterns = kw.get("shift_patterns", ("ss1", "ss2"))
        if len(patterns) != 2 or any(p not in PATTERNS for p in patterns):
            fail("shift_patterns", f"must be two patterns (branches 1 and 2) from {sorted(PATTERNS)}")
        if any(d % num_groups(p) for d in kw["hidden_dims"] for p in patterns):
            fail("shift_patterns", "split channels into more groups than hidden_dims divide into")
    else:
        for field in ("num_blocks", "hidden_dim", "tokens_mlp_dim", "channels_mlp_dim"):
            if kw[field] < 1:
                fail(field, "must be a positive integer")


# ---- scanned <-> unrolled parameters ------------------------------------------
def block_groups(model) -> list[tuple[str, list[str]]]:
    """The model's runs of identical blocks: (scanned name, [unrolled names]) per run; [] for Mixer."""
    if isinstance(model, S2MLP):
        return [("blocks", [f"block_{i}" for i in range(model.num_blocks)])]
    if isinstance(model, S2MLPv2):
        groups, first = [], 0
        for stage, depth in enumerate(model.num_blocks):
            groups.append((f"stage_{stage}", [f"block_{i}" for i in range(first, first + depth)]))
            first += depth
        return groups
    return []


def _stack(*leaves):
    if all(isinstance(x, np.ndarray | np.generic) for x in leaves):
        return np.stack(leaves)
    return jnp.stack(leaves)


def _convert_mapping(node: Mapping, groups, to_scan: bool) -> dict | None:
    """`node` in the other layout, or None when `node` is not a parameter dict of this model."""
    node = dict(node)
    if to_scan and groups and all(name in node for _, names in groups for name in names):
        for scanned, names in groups:
            node[scanned] = jax.tree.map(_stack, *[node.pop(name) for name in names])
        return node
    if not to_scan and groups and all(scanned in node for scanned, _ in groups):
        for scanned, names in groups:
            stacked = node.pop(scanned)
            for j, name in enumerate(names):
                node[name] = jax.tree.map(lambda x, j=j: x[j], stacked)
        return node
    return None


def convert_params(tree: Any, model, *, to_scan: bool) -> Any:
    """`tree`'s parameters of `model` (an S2MLP or S2MLPv2) moved to the scanned or the unrolled layout.

    Scanned (``to_scan=True``): ``block_0`` ... ``block_{N-1}`` of each run of identical blocks are
    stacked along a new leading axis into one entry (S²-MLP: ``blocks``; S²-MLPv2: ``stage_{s}``
    per stage); unrolled: the reverse. Every dict in `tree` that holds the blocks is converted, so
    a parameter tree, an EMA, or an optimizer state (Adam's ``mu``/``nu`` mirror the parameters)
    all work; dicts already in the target layout and other leaves are returned unchanged. Values are
    only stacked or sliced, so converting there and back gives the same arrays. Only the layout of
    `model` matters (its `scan` field is ignored): use ``model.clone(scan=...)`` for the other model.
    """
    groups = block_groups(model)

    def walk(node):
        if isinstance(node, Mapping):
            converted = _convert_mapping(node, groups, to_scan)
            if converted is None:
                converted = {k: walk(v) for k, v in node.items()}
            return converted if isinstance(node, dict) else type(node)(converted)
        if isinstance(node, tuple) and hasattr(node, "_fields"):  # optax states are NamedTuples
            return type(node)(*(walk(v) for v in node))
        if isinstance(node, list | tuple):
            return type(node)(walk(v) for v in node)
        return node

    return walk(tree)


def scan_params(tree: Any, model) -> Any:
    """`convert_params(tree, model, to_scan=True)`: unrolled blocks stacked into the scanned layout."""
    return convert_params(tree, model, to_scan=True)


def unscan_params(tree: Any, model) -> Any:
    """`convert_params(tree, model, to_scan=False)`: scanned blocks split into ``block_{i}``."""
    return convert_params(tree, model, to_scan=False)
