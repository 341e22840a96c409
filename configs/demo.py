"""The demo: a small S²-MLP learns scikit-learn's handwritten digits, offline, on a laptop CPU.

    python main.py --config=configs/demo.py --workdir=/tmp/s2mlp_demo

1,797 8×8 digit images bundled with scikit-learn (no download), upsampled to
32×32; a fixed held-out split of 300 images. Sized for a 2-core CPU: a few
minutes, reaching ≥ 95% held-out top-1 (see README for the measured figures).
Leaves checkpoints, metrics.jsonl and TensorBoard logs in the workdir.
"""

from configs import common


def get_config():
    config = common.get_config("v2")
    config.model.name = "s2mlp_tiny"
    config.model.overrides = dict(hidden_dim=64, num_blocks=4, mlp_ratio=2, patch_size=4)
    config.model.drop_path_rate = 0.0
    config.compute_dtype = "float32"

    config.data.name = "digits"
    config.data.eval_split = "test"
    config.data.shuffle_buffer = 2_000
    config.data.eval_crop_pct = 1.0
    config.image_size = 32

    # Resize only: digits are centred (a crop would cut strokes off) and a mirrored 3 is not a 3.
    config.augment.ops = "resize|normalize"
    config.augment.mixup = 0.0
    config.augment.cutmix = 0.0
    config.augment.label_smoothing = 0.1

    config.batch_size = 64
    config.eval_batch_size = 96  # a multiple of 1, 2, 4 and 8 devices; the last batch is masked
    config.total_steps = 600
    config.warmup_epochs = 2
    config.base_lr = 0.032  # per 1024 images: 2e-3 at batch 64
    config.weight_decay = 0.05
    config.ema_decay = 0.0
    config.log_every_steps = 50
    config.eval_every_steps = 200
    config.checkpoint_every_steps = 200
    return config
