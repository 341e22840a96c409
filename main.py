"""Trains or evaluates a model: ``python main.py --config=configs/s2mlp_v2_medium.py --workdir=DIR``.

Modes: ``--mode=train`` (default; resumes from the latest checkpoint in DIR,
fine-tunes from ``--config.init_from=OTHER_RUN`` when DIR has none) and
``--mode=eval`` (evaluates DIR's latest checkpoint, or ``--checkpoint``).
Multi-host: ``--multihost`` calls ``jax.distributed.initialize()`` (TPU VMs and
SLURM/GPU clusters detect their peers), or pass the coordinator explicitly.
"""

import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (path.py or path.py:arg).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard logs.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (with auto-resume) or evaluate a checkpoint.")
flags.DEFINE_string("checkpoint", None, "--mode=eval: a workdir or checkpoint step folder (default: --workdir).")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() with auto-detection.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for explicit multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes, with --coordinator_address.")
flags.DEFINE_integer("process_id", None, "This process's index, with --coordinator_address.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(std_logging.Filter):
    """Keeps INFO lines from our own files; libraries (Orbax, JAX, TF) still show warnings and errors."""

    def filter(self, record) -> bool:
        return record.levelno >= std_logging.WARNING or "site-packages" not in record.pathname


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(_QuietLibraries())
    import jax

    if FLAGS.coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used only by CPU devices
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.multihost:
        jax.distributed.initialize()
    logging.info("JAX %s: process %d of %d, %d local / %d global devices (%s).", jax.__version__,
                 jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.devices()[0].platform)  # fmt: skip

    import train_lib

    if FLAGS.mode == "train":
        train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    else:
        train_lib.evaluate(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint)


if __name__ == "__main__":
    app.run(main)
