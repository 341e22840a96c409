"""Trains or evaluates a model: ``python main.py --config=configs/s2mlp_v2_medium.py --workdir=DIR``.

Modes: ``--mode=train`` (default; resumes from the latest checkpoint in DIR,
fine-tunes from ``--config.init_from=OTHER_RUN`` when DIR has none) and
``--mode=eval`` (evaluates DIR's latest checkpoint, or ``--checkpoint``).
Multi-host: ``--multihost`` calls ``jax.distributed.initialize()`` (TPU VMs and
SLURM/GPU clusters detect their peers), or pass the coordinator explicitly.

Model hyperparameters: ``--config.model.overrides.FIELD=VALUE`` sets one field of
the model (any field of its class, e.g. ``shift_pattern=eight``, ``hidden_dim=64``,
``shift_patterns='("none","none")'``) and merges into the config's own overrides.
These flags are taken off the command line before absl parses it (ml_collections
only accepts fields a config already defines) and applied after the config is
loaded; VALUE is a Python literal where it parses as one, else a string.

Exit status: 0 done; 1 a clear error (bad config or data, locked workdir, ...),
printed as one message without a traceback; ``train_lib.EXIT_STOPPED`` (75) stopped
by SIGTERM/SIGINT with a checkpoint saved (rerun the same command to resume).
"""

import ast
import contextlib
import difflib
import importlib.util
import os
import re
import sys
import tempfile

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file("config", None, "Path to a config file (path.py or path.py:arg).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard logs.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (with auto-resume) or evaluate a checkpoint.")
flags.DEFINE_string("checkpoint", None, "--mode=eval: a workdir or checkpoint step folder (default: --workdir).")
flags.DEFINE_string(
    "eval_dir", None, "--mode=eval: where results go, as <eval_dir>/<split>_step<N>/ (default: <workdir>/eval)."
)
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() with auto-detection.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for explicit multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes, with --coordinator_address.")
flags.DEFINE_integer("process_id", None, "This process's index, with --coordinator_address.")
flags.mark_flags_as_required(["config", "workdir"])


OVERRIDES_FLAG = "--config.model.overrides"
_model_overrides: dict = {}  # from the command line; merged into FLAGS.config.model.overrides


def _literal(text: str):
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
            fields[name.removeprefix(OVERRIDES_FLAG + ".")] = _literal(text)
        elif name == OVERRIDES_FLAG:
            if not eq:
                text = next(args, "")
            value = _literal(text)
            if not isinstance(value, dict):
                raise ValueError(
                    f"{OVERRIDES_FLAG}={text!r} is not a dict literal; set one field with "
                    f"{OVERRIDES_FLAG}.FIELD=VALUE, or pass e.g. {OVERRIDES_FLAG}='{{\"hidden_dim\": 64}}'."
                )
            fields.update(value)
        else:
            rest.append(arg)
    return rest, fields


def apply_model_overrides(config, fields: dict):
    """Merges `fields` into ``config.model.overrides`` (the config's other overrides stay); returns `config`."""
    if fields:
        merged = {**dict(config.model.get("overrides") or {}), **fields}
        with config.unlocked():
            config.model.overrides = ml_collections.ConfigDict(merged)
    return config


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for `app.run`, with the model overrides taken off first (kept in `_model_overrides`)."""
    try:
        rest, fields = split_model_overrides(argv)
    except ValueError as e:
        sys.exit(f"FATAL Flags parsing error: {e}")
    _model_overrides.clear()
    _model_overrides.update(fields)
    config_file = _missing_config_file(rest)
    if config_file:
        sys.exit(f"ERROR {config_file}")
    saved, sys.argv = sys.argv, rest  # config_flags reads its --config.* overrides from sys.argv
    try:
        return app.parse_flags_with_usage(rest)
    except (AttributeError, KeyError) as e:  # ml_collections: a --config.FIELD the config does not have
        sys.exit(f"ERROR {_unknown_field(rest) or e}")
    finally:
        sys.argv = saved


def _config_spec(argv: list[str]) -> str | None:
    """The value of --config (``path.py`` or ``path.py:arg``) in `argv`."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.removeprefix("--config=")
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _missing_config_file(argv: list[str]) -> str | None:
    """'--config=PATH: no such file; ...' with the nearest config files' names, or None when the file exists."""
    spec = _config_spec(argv)
    path = (spec or "").partition(":")[0]
    if not path or os.path.isfile(path):
        return None
    folder = os.path.dirname(path)
    names = sorted(f for f in os.listdir(folder or ".") if f.endswith(".py")) if os.path.isdir(folder or ".") else []
    near = [os.path.join(folder, n) for n in difflib.get_close_matches(os.path.basename(path), names, n=3, cutoff=0.6)]
    hint = f"did you mean {', '.join(near)}?" if near else f"the configs are in {os.path.join(ROOT, 'configs')}."
    return f"--config={spec}: no such file (relative paths start at the working directory {os.getcwd()}); {hint}"


def _unknown_field(argv: list[str]) -> str | None:
    """'--config.FIELD=VALUE: the config has no field FIELD; nearest: ...' for the first such flag in `argv`."""
    config = _load_config_file(_config_spec(argv) or "")
    fields = _dotted_fields(config)
    for arg in argv:
        if arg.startswith("--config.") and not arg.startswith(OVERRIDES_FLAG):
            field = arg.removeprefix("--config.").partition("=")[0]
            if field not in fields and not any(f.startswith(field + ".") for f in fields):
                parent = field.rpartition(".")[0]
                siblings = sorted(f for f in fields if f.rpartition(".")[0] == parent)  # the same group first
                near = difflib.get_close_matches(field, siblings, n=3, cutoff=0.5)
                near += [f for f in difflib.get_close_matches(field, sorted(fields), n=3, cutoff=0.5) if f not in near]
                near = near[:3]
                return f"{arg}: the config has no field {field!r}" + (
                    f"; did you mean {', '.join(near)}?" if near else "; see the config file for its fields."
                )
    return None


def _load_config_file(spec: str) -> ml_collections.ConfigDict:
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_main_config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _dotted_fields(config, prefix: str = "") -> set[str]:
    """Every leaf field of `config` as a dotted name ('batch_size', 'data.name', ...)."""
    fields = set()
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            fields |= _dotted_fields(value, f"{prefix}{key}.")
        else:
            fields.add(prefix + key)
    return fields


def get_config():
    """The loaded config with the command line's model overrides merged in (after `parse_flags`)."""
    return apply_model_overrides(FLAGS.config, _model_overrides)


def main(argv):
    del argv
    from s2mlp.runs import QuietLibraries

    logging.get_absl_handler().addFilter(QuietLibraries(os.path.dirname(os.path.abspath(__file__))))
    import jax

    if FLAGS.coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used only by CPU devices
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.multihost:
        jax.distributed.initialize()
    logging.info("JAX %s: process %d of %d, %d local / %d global devices (%s).", jax.__version__,
                 jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.devices()[0].platform)  # fmt: skip

    with _native_stderr_once():
        with contextlib.suppress(ImportError):
            import tensorflow  # noqa: F401 - loaded here so its native start-up lines print once

    import train_lib

    config = get_config()
    train_lib.enable_compilation_cache(config.get("compilation_cache_dir", ""))  # before the first compile
    try:
        if FLAGS.mode == "train":
            train_lib.train_and_evaluate(config, FLAGS.workdir)
        else:
            train_lib.evaluate(config, FLAGS.workdir, FLAGS.checkpoint, eval_dir=FLAGS.eval_dir)
    except train_lib.Stopped:
        # The message is logged, the checkpoint complete and the metrics flushed: exit now. The interpreter's
        # teardown (TensorFlow's and XLA's threads and destructors) would take seconds of a preemption notice.
        _exit_now(train_lib.EXIT_STOPPED)
    except train_lib.CLEAR_ERRORS as e:
        # A checked failure: its message says what is wrong and the fix; a traceback would only bury it.
        logging.error("%s: %s", type(e).__name__, e)
        if isinstance(e, train_lib.ckpt.SaveFailed):  # Orbax's save threads may wait for ever: do not join them
            _exit_now(1)
        sys.exit(1)


def _exit_now(status: int):
    """Exits with `status` once the logs are flushed, without the interpreter's teardown (joining library threads,
    TensorFlow's and XLA's destructors: seconds, or for ever after a failed save)."""
    import jax

    if jax.process_count() > 1:
        jax.distributed.shutdown()
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@contextlib.contextmanager
def _native_stderr_once():
    """Passes each distinct line that native code writes to stderr meanwhile on once.

    TensorFlow loads two extension modules (``_pywrap_cpu_feature_guard`` and the profiler's
    ``_pywrap_profiler_plugin``) that each carry their own copy of absl's C++ logging and of TF's start-up
    check, so absl's "All log messages before absl::InitializeLog()" warning and TF's oneDNN notice print
    twice; Python's logging is not involved. Lines are compared without their timestamp and thread id.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            seen = set()
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                key = re.sub(r"^[IWEF]\d{4} [\d:.]+\s+\d+ ", "", line)
                if key not in seen:
                    seen.add(key)
                    sys.stderr.write(line)
            sys.stderr.flush()


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
