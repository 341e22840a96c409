"""A tiny config for every code path, used by the tests: seconds per run on a CPU.

    python main.py --config=configs/tiny.py:s2mlp_tiny --workdir=/tmp/tiny

The argument is a registered model name (s2mlp_tiny, s2mlpv2_tiny, mixer_tiny).
"""

from configs import common


def get_config(model="s2mlp_tiny"):
    config = common.get_config("v2")
    config.model.name = model
    config.model.drop_path_rate = 0.1
    config.compute_dtype = "float32"
    config.data.name = "digits"
    config.data.eval_split = "test"
    config.data.shuffle_buffer = 256
    config.data.eval_crop_pct = 1.0
    config.image_size = 16 if model != "s2mlpv2_tiny" else 24
    config.augment.ops = "inception_crop(0.08)|normalize"
    config.batch_size = 16
    config.eval_batch_size = 64
    config.total_steps = 6
    config.warmup_epochs = 0
    config.ema_decay = 0.9
    config.log_every_steps = 2
    config.eval_every_steps = 3
    config.checkpoint_every_steps = 3
    config.keep_checkpoints = 2
    return config
