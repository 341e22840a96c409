"""The checks of the fields every model has (each class's ``check_fields`` adds its own), renamed fields, and
`ModelFields`: the rest of what the registry asks of a model class.

The registry (`s2mlp.models.get_model`) calls a class's ``upgrade_fields`` then ``check_fields`` before it
builds the Module, so a bad field fails with one line naming it, before anything is traced.
"""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from s2mlp.models.blocks import REMAT_POLICIES
from s2mlp.models.layers import INITS


class ModelFields:
    """What the registry asks of a model class besides its ``check_fields``; these defaults suit a model of one
    stage, no renamed field and no scanned blocks (Mixer), the S² models override what differs."""

    @staticmethod
    def divisor_of(fields: Mapping[str, Any]) -> int:
        """Image sides must be multiples of this: the patch size of a model with `fields` (checked before building)."""
        return fields["patch_size"]

    @property
    def input_divisor(self) -> int:
        """Image sides must be multiples of this (`divisor_of` this model's fields)."""
        return self.divisor_of(vars(self))

    @classmethod
    def upgrade_fields(cls, fields: Mapping[str, Any], name: str | None = None) -> dict[str, Any]:
        """`fields` with the former names of renamed fields replaced (FutureWarning, `renamed_field`); here none."""
        return dict(fields)

    def block_groups(self) -> list[tuple[str, list[str]]]:
        """The runs of identical blocks, (scanned name, [unrolled names]) each (`s2mlp.checkpoint.convert_params`):
        [] here, as Mixer's blocks are always unrolled (``MixerBlock_{i}``, vision_transformer's names)."""
        return []


# Annotation (as written in the model classes) -> what a value of it is, for the type check of `common_fields`.
_KINDS = {"int": "an integer", "float": "a number", "str": "a string",
          "Sequence[int]": "a tuple of integers, one per stage", "Sequence[str]": "a tuple of strings"}  # fmt: skip


def _is(value, annotation: str) -> bool:
    if annotation.startswith("Sequence["):
        return isinstance(value, tuple | list) and all(_is(v, annotation[9:-1]) for v in value)
    if annotation == "str":
        return isinstance(value, str)
    kinds = numbers.Integral if annotation == "int" else numbers.Real  # NumPy's too; bools are no model's numbers
    return isinstance(value, kinds) and not isinstance(value, bool)


def invalid(name: str, fields: Mapping[str, Any], field: str, why: str) -> ValueError:
    """The error of a bad model field: ``"{name}: {field}={value!r} {why}."``."""
    return ValueError(f"{name}: {field}={fields[field]!r} {why}.")


def common_fields(cls: type[nn.Module], fields: Mapping[str, Any], name: str) -> dict[str, Any]:
    """`fields` over `cls`'s defaults, once the fields every model shares are checked: ``num_classes``,
    ``drop_path_rate``, ``patch_size``, ``weight_init`` and, where `cls` has them, ``scan`` and ``remat``. Raises
    ValueError starting ``"{name}: "`` (see `invalid`); the classes' ``check_fields`` then check their own fields.
    """
    own = [f for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]
    kw = {f.name: f.default for f in own if f.default is not dataclasses.MISSING} | dict(fields)
    missing = sorted(f.name for f in own if f.name not in kw)
    if missing:
        raise ValueError(f"{name}: missing field(s) {missing} of {cls.__name__}.")
    for f in own:  # the types the annotations name; the checks below and the classes' check the values
        if f.type in _KINDS and not _is(kw[f.name], f.type):
            raise invalid(name, kw, f.name, f"must be {_KINDS[f.type]}")
    if not isinstance(kw["num_classes"], int) or kw["num_classes"] < 1:
        raise invalid(name, kw, "num_classes", "must be a positive integer")
    if not 0.0 <= kw["drop_path_rate"] < 1.0:
        raise invalid(name, kw, "drop_path_rate", "must be in [0, 1)")
    if kw["patch_size"] < 1:
        raise invalid(name, kw, "patch_size", "must be a positive integer")
    if "scan" in kw and not isinstance(kw["scan"], bool):
        why = "must be True (one nn.scan per run of identical blocks) or False (unrolled blocks)"
        raise invalid(name, kw, "scan", why)
    if kw.get("remat", "none") not in REMAT_POLICIES:
        raise invalid(name, kw, "remat", f"is unknown; choose one of {list(REMAT_POLICIES)}")
    if kw["weight_init"] not in INITS:
        why = f"is unknown; choose one of {list(INITS)} (docs/notes/initialisation.md)"
        raise invalid(name, kw, "weight_init", why)
    return kw


def renamed_field(fields: Mapping[str, Any], old: str, new: str, name: str) -> dict[str, Any]:
    """`fields` with the field's former name `old` replaced by `new`, warning (FutureWarning) that it was used, so
    saved runs and recorded commands keep working. Raises ValueError when both names are given."""
    fields = dict(fields)
    if old not in fields:
        return fields
    if new in fields:
        raise ValueError(f"{name}: {old}={fields[old]!r} is the former name of {new}; give only {new}.")
    warnings.warn(
        f"{name}: model field {old!r} is now {new!r}; write {new}={fields[old]!r}.", FutureWarning, stacklevel=4
    )
    fields[new] = fields.pop(old)
    return fields
