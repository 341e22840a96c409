"""The config boundary: a config file plus command-line or study overrides become one checked config.

main.py and study.py both come through here:

- `load` runs a config file (``path.py`` or ``path.py:arg``: its ``get_config()`` / ``get_config(arg)``);
  `missing_file` and `unknown_field` are the one-line errors for a path or a ``--config.FIELD`` that is not
  there, with the nearest names;
- `set_field` sets a dotted field (a study's axes and overrides); ``model.overrides.FIELD`` values merge
  into the config's own model overrides, as `split_model_overrides` + `merge_model_overrides` do for main.py's
  ``--config.model.overrides.FIELD=VALUE`` (ml_collections only takes fields a config already defines);
- `check` runs every field's checks, each written once next to the code that reads the field (the recipe in
  `s2mlp.recipe.validate_config`, the model in its class's ``check_fields``, the evals in `s2mlp.evals`, the data
  in `input_pipeline.validate_data_config`), before anything is compiled or written. Messages name
  ``config.<field>=value`` and the fix.

Below the boundary, code receives the checked ConfigDict (and reads its own fields) or typed options built
from it (`s2mlp.recipe.OptimizerOptions`, `StepOptions`, `input_pipeline.Recipe`).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import difflib
import functools
import importlib.util
import operator
import os
import sys
from collections.abc import Callable
from pathlib import Path

import ml_collections

ROOT = Path(__file__).resolve().parents[1]  # the checkout: main.py, study.py, configs/
MODEL_OVERRIDES = "model.overrides"
OVERRIDES_FLAG = "--config." + MODEL_OVERRIDES


# ---- config files ----------------------------------------------------------------------------------------
def load(spec: str, *, root: Path | None = None) -> ml_collections.ConfigDict:
    """``path.py`` or ``path.py:arg`` -> its ``get_config()`` / ``get_config(arg)``. A relative path starts at
    `root` when given (study files name their base config from the checkout), else the working directory."""
    file, arg = config_file(spec, root=root), spec.partition(":")[2]
    module_spec = importlib.util.spec_from_file_location(f"_config_file_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # `from configs import common`
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def config_file(spec: str, *, root: Path | None = None) -> Path:
    """The file of ``path.py`` or ``path.py:arg``, as `load` resolves it."""
    path = Path(spec.partition(":")[0])
    return path if root is None or path.is_absolute() else root / path


def missing_file(spec: str, flag: str = "config") -> str | None:
    """'--config=PATH: no such file; ...' (`flag`'s) with the nearest config files' names, or None when it exists."""
    path = spec.partition(":")[0]
    if not path or os.path.isfile(path):
        return None
    folder = os.path.dirname(path)
    names = sorted(f for f in os.listdir(folder or ".") if f.endswith(".py")) if os.path.isdir(folder or ".") else []
    near = [os.path.join(folder, n) for n in difflib.get_close_matches(os.path.basename(path), names, n=3, cutoff=0.6)]
    hint = f"did you mean {', '.join(near)}?" if near else f"the configs are in {ROOT / 'configs'}."
    return f"--{flag}={spec}: no such file (relative paths start at the working directory {os.getcwd()}); {hint}"


def dotted_fields(config, prefix: str = "") -> set[str]:
    """Every leaf field of `config` as a dotted name ('batch_size', 'data.name', ...)."""
    fields = set()
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            fields |= dotted_fields(value, f"{prefix}{key}.")
        else:
            fields.add(prefix + key)
    return fields


RETIRED = {  # fields earlier versions had -> what replaced them
    f"augment.{name}": "the augmentation is one chain now, config.augment.ops (e.g. --config.augment.ops="
    "'inception_crop(0.08)|flip|normalize'; README, 'Augmentation')."
    for name in ("inception_crop", "crop_area_min", "flip", "randaugment", "random_erase")
}


def unknown_field(config, argv: list[str], flag: str = "config") -> str | None:
    """'--config.FIELD=VALUE: the config has no field FIELD; did you mean ...?' for the first such flag of `argv`
    (the nearest fields of the same group first), or None when every ``--config.FIELD`` exists (``--<flag>.``
    for another config flag, e.g. study.py's --study)."""
    fields = dotted_fields(config)
    for arg in argv:
        name = arg.partition("=")[0]
        if arg.startswith(f"--{flag}.") and not (name == OVERRIDES_FLAG or name.startswith(OVERRIDES_FLAG + ".")):
            field = arg.removeprefix(f"--{flag}.").partition("=")[0]
            if field not in fields and not any(f.startswith(field + ".") for f in fields):
                if field in RETIRED:
                    return f"{arg}: the config has no field {field!r}; {RETIRED[field]}"
                parent = field.rpartition(".")[0]
                siblings = sorted(f for f in fields if f.rpartition(".")[0] == parent)
                near = difflib.get_close_matches(field, siblings, n=3, cutoff=0.5)
                near += [f for f in difflib.get_close_matches(field, sorted(fields), n=3, cutoff=0.5) if f not in near]
                near = near[:3]
                return f"{arg}: the config has no field {field!r}" + (
                    f"; did you mean {', '.join(near)}?" if near else "; see the config file for its fields."
                )
    return None


def config_spec(argv: list[str], flag: str = "config") -> str:
    """The value of --config (or --`flag`; ``path.py`` or ``path.py:arg``) in `argv`."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{flag}="):
            return arg.removeprefix(f"--{flag}=")
        if arg == f"--{flag}" and i + 1 < len(argv):
            return argv[i + 1]
    return ""


def parse_command_line(
    argv: list[str], parse: Callable[[list[str]], list[str]], flag: str = "config"
) -> tuple[list[str], dict]:
    """main.py's command line (study.py's with `flag` 'study'): takes the model overrides off `argv`
    (`split_model_overrides`), then `parse`s the rest (absl's, which loads --config and applies its
    ``--config.FIELD`` flags); returns what `parse` returns and the model overrides. A bad override, a missing
    config file or an unknown field exits with one line."""
    try:
        rest, fields = split_model_overrides(argv)
    except ValueError as e:
        sys.exit(f"FATAL Flags parsing error: {e}")
    spec = config_spec(rest, flag)
    if message := missing_file(spec, flag):
        sys.exit(f"ERROR {message}")
    if spec:
        try:  # a config file that fails (e.g. an unknown argument): its one line, not absl's traceback
            load(spec)
        except Exception as e:  # noqa: BLE001 - whatever the user's config file raises
            sys.exit(f"ERROR --{flag}={spec}: {type(e).__name__}: {e}")
    saved, sys.argv = sys.argv, rest  # config_flags reads its --config.* overrides from sys.argv
    try:
        return parse(rest), fields
    except (AttributeError, KeyError) as e:  # ml_collections: a --config.FIELD the config does not have
        sys.exit(f"ERROR {unknown_field(load(spec), rest, flag) or dotted_key(rest, flag) or e}")
    finally:
        sys.argv = saved


def dotted_key(argv: list[str], flag: str) -> str | None:
    """study.py: '--study.overrides.data.X=V: ...' for a flag into a study's dotted keys (ml_collections cannot
    set them), pointing to --config.FIELD=VALUE; None for main.py or when there is none."""
    for arg in argv:
        group, _, field = arg.partition("=")[0].removeprefix(f"--{flag}.").partition(".")
        if flag != "config" and arg.startswith(f"--{flag}.") and "." in field:
            fix = (
                f"give a config field for every run as --config.{field}=VALUE, or edit the study file's {group}"
                if group == "overrides"
                else f"edit the study file's {group} (--only chooses runs)"
            )
            return f"{arg}: the study's dotted keys cannot be set from the command line; {fix}."
    return None


def split_config_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """study.py: takes main.py's ``--config.FIELD=VALUE`` flags (``--config.FIELD VALUE``, or a bare boolean
    ``--config.FIELD``) off `argv` (after `split_model_overrides`); returns the other arguments and those flags."""
    rest, taken = [], []
    for i, arg in enumerate(argv):
        after_bare_flag = i > 0 and argv[i - 1].startswith("--config.") and "=" not in argv[i - 1]
        if arg.startswith("--config.") or (after_bare_flag and not arg.startswith("--")):  # a flag, or its value
            taken.append(arg)
        else:
            rest.append(arg)
    return rest, taken


def parse_config_args(config, args: list[str]) -> dict:
    """`args` (``--config.FIELD`` flags) parsed as ml_collections parses them for main.py, on a copy of `config`
    (booleans from 'true' or a bare flag, tuples from repeated flags, a string field's text as it is): dotted field ->
    value. ValueError in one line for an unknown field or a bad value."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["study.py", *args]
    values = flags.FlagValues()
    try:
        config_flags.DEFINE_config_dict(
            "config", copy.deepcopy(config), flag_values=values, lock_config=False, sys_argv=argv
        )
        values(argv)
    except (AttributeError, KeyError) as e:  # a field the config does not have
        raise ValueError(unknown_field(config, args) or f"{' '.join(args)}: {e}") from None
    except (flags.Error, TypeError, ValueError) as e:  # e.g. 'flag --config.fsdp=maybe: Non-boolean argument ...'
        raise ValueError(str(e).removeprefix("flag ")) from None
    fields = [arg.partition("=")[0].removeprefix("--config.") for arg in args if arg.startswith("--config.")]
    return {field: functools.reduce(operator.getitem, field.split("."), values["config"].value) for field in fields}


def config_flag(config, field: str, value) -> str:
    """``--config.FIELD=VALUE`` as main.py reads `value` back into dotted `field` of `config` (before shell
    quoting); a string field takes the text as it is."""
    if not isinstance(value, str):
        return f"--config.{field}={repr(tuple(value) if isinstance(value, (list, tuple)) else value)}"
    text = value
    if not string_field(config, field):
        with contextlib.suppress(ValueError, SyntaxError):  # a string that reads as a literal ('1', 'True')
            ast.literal_eval(value)
            text = repr(value)  # must keep its quotes
    return f"--config.{field}={text}"


def string_field(config, field: str) -> bool:
    """Whether dotted `field` of `config` is a string field (also one whose value is None), whose command-line
    text ml_collections takes as it is, quotes included."""
    *parents, leaf = field.split(".")
    node = config
    for part in parents:
        node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    return isinstance(node, ml_collections.ConfigDict) and leaf in node and node.get_type(leaf) is str


# ---- overrides ----------------------------------------------------------------------------------------------
def literal(text: str):
    """A Python literal (int, float, tuple, bool, None, ...) where `text` is one, else the string itself."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text
    return tuple(value) if isinstance(value, list) else value


def split_model_overrides(argv: list[str]) -> tuple[list[str], dict]:
    """Takes ``--config.model.overrides.FIELD=VALUE`` (or ``... FIELD VALUE``) and ``--config.model.overrides=DICT``
    off `argv`; returns the other arguments and the fields, in command-line order (a later flag wins)."""
    rest, fields = [], {}
    args = iter(argv)
    for arg in args:
        name, eq, text = arg.partition("=")
        if name.startswith(OVERRIDES_FLAG + "."):
            if not eq:
                text = next(args, None)
                if text is None:
                    raise ValueError(f"{arg} needs a value: {arg}=VALUE.")
            fields[_model_field(name.removeprefix(OVERRIDES_FLAG + "."))] = literal(text)
        elif name == OVERRIDES_FLAG:
            if not eq:
                text = next(args, "")
            value = literal(text)
            if not isinstance(value, dict):
                raise ValueError(
                    f"{OVERRIDES_FLAG}={text!r} is not a dict literal; set one field with "
                    f"{OVERRIDES_FLAG}.FIELD=VALUE, or pass e.g. {OVERRIDES_FLAG}='{{\"hidden_dim\": 64}}'."
                )
            fields.update({_model_field(k): v for k, v in value.items()})
        else:
            rest.append(arg)
    return rest, fields


def _model_field(key) -> str:
    """A model field name as a flag or dict key gives it; ValueError for one no model can have (e.g. dotted)."""
    if not (isinstance(key, str) and key.isidentifier()):
        raise ValueError(f"{OVERRIDES_FLAG}.{key}: {key!r} is not a model field name; set one field per flag, e.g. "
                         f"{OVERRIDES_FLAG}.hidden_dim=64.")  # fmt: skip
    return key


def merge_model_overrides(config, fields: dict):
    """Merges `fields` into ``config.model.overrides`` (the config's other overrides stay); returns `config`."""
    if fields:
        merged = {**dict(config.model.get("overrides") or {}), **fields}
        with config.unlocked():
            config.model.overrides = ml_collections.ConfigDict(merged)
    return config


def set_field(config, field: str, value, where: str) -> None:
    """Sets dotted `field` of `config`; model overrides merge; ValueError starting `where` naming an unknown field."""
    if field == MODEL_OVERRIDES:
        if not isinstance(value, (dict, ml_collections.ConfigDict)):
            raise ValueError(f"{where}: config.{field}={value!r} must be a dict of model fields.")
        for key, v in value.items():
            set_field(config, f"{MODEL_OVERRIDES}.{key}", v, where)
        return
    *parents, leaf = field.split(".")
    node = config
    for i, part in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ValueError(
                f"{where}: config.{field} is not a field of the base config (no config.{'.'.join(parents[: i + 1])})."
            )
        node = node[part]
    if not isinstance(node, ml_collections.ConfigDict):
        raise ValueError(f"{where}: config.{field} is not a field of the base config.")
    if leaf not in node and ".".join(parents) != MODEL_OVERRIDES:
        raise ValueError(
            f"{where}: config.{field} is not a field of the base config; valid fields here: {sorted(node.keys())}."
        )
    try:
        with node.unlocked():
            node[leaf] = tuple(value) if isinstance(value, list) else value
    except TypeError as e:
        raise ValueError(f"{where}: config.{field}={value!r}: {e}") from None


# ---- checks -------------------------------------------------------------------------------------------------
def check(config, *, num_devices: int, process_count: int = 1) -> None:
    """Every field's check (recipe, model, evals, data); ValueError naming ``config.<field>=value`` and the fix.

    Imports the input pipeline (TensorFlow) for the data fields; nothing is compiled or written.
    """
    import input_pipeline
    from s2mlp import recipe

    recipe.validate_config(config, num_devices=num_devices)
    input_pipeline.validate_data_config(config, process_count=process_count)
