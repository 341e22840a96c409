"""Trains or evaluates a model: ``python main.py --config=configs/s2mlp_v2_medium.py --workdir=DIR``.

Modes: ``--mode=train`` (default; resumes from the latest checkpoint in DIR, fine-tunes from
``--config.init_from=OTHER_RUN`` when DIR has none) and ``--mode=eval`` (evaluates DIR's latest checkpoint, or
``--checkpoint``). Multi-host: ``--multihost`` calls ``jax.distributed.initialize()`` (TPU VMs and SLURM/GPU clusters
detect their peers), or pass the coordinator explicitly.

Model hyperparameters: ``--config.model.overrides.FIELD=VALUE`` sets one field of the model (any field of its class,
e.g. ``shift_pattern=eight``, ``hidden_dim=64``, ``shift_patterns='("none","none")'``) and merges into the config's
own overrides; VALUE is a Python literal where it parses as one, else a string. These flags are taken off the command
line before absl parses it (ml_collections only accepts fields a config already defines).

Exit status: 0 done; 1 a clear error (bad config or data, locked workdir, ...), printed as one message without a
traceback; ``train_lib.EXIT_STOPPED`` (75) stopped by SIGTERM/SIGINT with a checkpoint saved (rerun the same command
to resume).
"""

import contextlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from configs import overrides

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
flags.register_multi_flags_validator(
    ["mode", "checkpoint", "eval_dir"],
    lambda f: f["mode"] == "eval" or (f["checkpoint"] is None and f["eval_dir"] is None),
    "--checkpoint and --eval_dir apply to --mode=eval only: add --mode=eval, or leave them out to train.",
)
PROCESS_FLAGS = ("coordinator_address", "num_processes", "process_id")


def _processes_given_one_way(f) -> bool:
    """All three process flags, or the address alone (SLURM, Open MPI tell JAX the rest), or --multihost alone."""
    given = tuple(f[k] is not None for k in PROCESS_FLAGS)
    return given == (False, False, False) or not f["multihost"] and given in ((True, True, True), (True, False, False))


flags.register_multi_flags_validator(
    [*PROCESS_FLAGS, "multihost"],
    _processes_given_one_way,
    "--num_processes and --process_id need each other and --coordinator_address (or give the address alone where "
    "the cluster tells JAX the rest); --multihost detects all three instead: use one way.",
)


_model_overrides: dict = {}  # from the command line; merged into FLAGS.config.model.overrides


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for `app.run`, through the config boundary (the model overrides kept aside)."""
    rest, fields = overrides.parse_command_line(argv, app.parse_flags_with_usage)
    _model_overrides.clear()
    _model_overrides.update(fields)
    return rest


def get_config():
    """The loaded config with the command line's model overrides merged in (after `parse_flags`)."""
    return overrides.merge_model_overrides(FLAGS.config, _model_overrides)


def main(argv):
    del argv
    from s2mlp import runs

    logging.get_absl_handler().addFilter(runs.QuietLibraries(ROOT))
    import jax

    if FLAGS.coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used only by CPU devices
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.multihost:
        jax.distributed.initialize()
    logging.info("JAX %s: process %d of %d, %d local / %d global devices (%s).", jax.__version__,
                 jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.devices()[0].platform)  # fmt: skip

    with runs.native_stderr_once(), contextlib.suppress(ImportError):
        import tensorflow  # noqa: F401 - loaded here so its native start-up lines print once

    import train_lib

    config = get_config()
    runs.enable_compilation_cache(config.get("compilation_cache_dir", ""))  # before the first compile
    try:
        if FLAGS.mode == "train":
            train_lib.train_and_evaluate(config, FLAGS.workdir)
        else:
            train_lib.evaluate(config, FLAGS.workdir, FLAGS.checkpoint, eval_dir=FLAGS.eval_dir)
    except train_lib.Stopped:
        # The message is logged, the checkpoint complete and the metrics flushed: exit now. The interpreter's
        # teardown (TensorFlow's and XLA's threads and destructors) would take seconds of a preemption notice.
        runs.exit_now(train_lib.EXIT_STOPPED)
    except train_lib.CLEAR_ERRORS as e:
        # A checked failure: its message says what is wrong and the fix; a traceback would only bury it.
        logging.error("%s: %s", type(e).__name__, e)
        if isinstance(e, train_lib.ckpt.SaveFailed):  # Orbax's save threads may wait for ever: do not join them
            runs.exit_now(1)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
