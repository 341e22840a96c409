"""Fashion-MNIST (Zalando: 60,000 train / 10,000 test 28×28 grey images, 10 clothing classes), offline.

    apt-get install dataset-fashion-mnist   # Debian/Ubuntu: Zalando's four IDX files, 30 MB
    python main.py --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist

The argument picks the model (default ``s2mlp``): ``s2mlp``, ``mixer`` or ``s2mlpv2``, all under this
one recipe and seed. The files are read as they ship (``config.data.name='idx'``, gzip or raw) from
``config.data.data_dir`` (default: where Debian puts them); a user with tfds' ``fashion_mnist`` prepared
can use ``--config.data.name=fashion_mnist --config.data.data_dir=TFDS_DATA_DIR`` instead.

Models (`MODELS`): patch 2 on 28×28, a 14×14 token grid (patch 4 leaves 7×7 tokens of 4×4 pixels,
too coarse for the stitching and textures that separate shirts from T-shirts and coats).

- ``s2mlp``: S²-MLP, width 96, 8 blocks, mlp_ratio 2: 451,690 parameters, 86.9 M MACs per image.
- ``mixer``: Mixer of matched parameters (452,034, +0.08%) under the same recipe: width 96, 8 blocks,
  token MLP 196 -> 47 -> 196, channel MLP 96 -> 192 -> 96. Its MACs are 72.2 M (83%): with 196 tokens
  and width 96 a Mixer cannot match S²-MLP in parameters and MACs at once (both match only when the
  token count equals the width; configs/studies/mixer_vs_s2mlp.py explains).
- ``s2mlpv2``: S²-MLPv2, patch 2, widths (48, 96), depths (2, 6), mlp_ratio 2: 569,026 parameters
  (+26%; its pyramid puts most of them at 7×7 tokens) and 30.0 M MACs (34%).

Recipe: the S²-MLPv2 paper's AdamW / cosine / label smoothing / DropPath, with augmentations that suit
small grey, centred images: a mild inception crop (area 35-100%), horizontal flip (clothes are
left-right symmetric), random erasing 0.25; no RandAugment (its colour ops do little on grey images),
no Mixup/CutMix, no EMA (short run). The lr is higher than ImageNet's (a short run of a small model).

Measured: no run of this config has finished yet. The first (``:s2mlp``, ``--workdir`` outside the checkout),
on the 2-core development machine (``lscpu``: AMD EPYC, 2 cores, AVX-512) shared with the test suite, trained at
25-45 img/s and gave 73.77% held-out top-1 at step 1,407 of 7,020 (epoch 3, 1 h 35 min in): a point on the
way, not a result. A result is added here (command, machine, wall time, accuracy) once a run completes.
"""

from configs import common

MODELS = {  # label -> model name and its overrides
    "s2mlp": ("s2mlp_tiny", {"patch_size": 2, "hidden_dim": 96, "num_blocks": 8, "mlp_ratio": 2}),
    "mixer": (
        "mixer_tiny",
        {"patch_size": 2, "hidden_dim": 96, "num_blocks": 8, "tokens_mlp_dim": 47, "channels_mlp_dim": 192},
    ),
    "s2mlpv2": ("s2mlpv2_tiny", {"patch_size": 2, "hidden_dims": (48, 96), "depths": (2, 6), "mlp_ratio": 2}),
}
DATA_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package


def get_config(model: str = "s2mlp"):
    if model not in MODELS:
        raise ValueError(f"model={model!r} is unknown; choose one of {list(MODELS)}.")
    config = common.get_config("v2")
    config.model.name, config.model.overrides = MODELS[model]
    config.model.drop_path_rate = 0.1
    config.compute_dtype = "float32"  # CPU: bfloat16 matmuls are slower than float32 here

    config.data.name = "idx"
    config.data.data_dir = DATA_DIR
    config.data.train_split = "train"
    config.data.eval_split = "test"
    config.data.shuffle_buffer = 60_000
    config.data.eval_crop_pct = 1.0
    config.data.normalization = "minus_one_to_one"  # no ImageNet colour statistics for grey images
    config.image_size = 28

    config.augment.inception_crop = True
    config.augment.crop_area_min = 0.35
    config.augment.flip = True
    config.augment.randaugment = ""
    config.augment.random_erase = 0.25
    config.augment.mixup = 0.0
    config.augment.cutmix = 0.0
    config.augment.label_smoothing = 0.1

    config.batch_size = 128
    config.eval_batch_size = 1000  # 10,000 test images: 10 batches, a multiple of 1, 2, 4 and 8 devices
    config.num_epochs = 15
    config.warmup_epochs = 2
    config.base_lr = 8e-3  # per 1024 images: 1e-3 at batch 128
    config.min_lr = 1e-5
    config.weight_decay = 0.05
    config.ema_decay = 0.0
    config.log_every_steps = 100
    config.eval_every_steps = 1_407  # every 3 epochs (468 steps each)
    config.checkpoint_every_steps = 469
    return config
