"""Fashion-MNIST (Zalando: 60,000 train / 10,000 test 28×28 grey images, 10 clothing classes), offline.

    apt-get install dataset-fashion-mnist   # Debian/Ubuntu: Zalando's four IDX files, 30 MB
    python main.py --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist

The argument picks the model (default ``s2mlp``): ``s2mlp``, ``mixer`` or ``s2mlpv2``, all under this
one recipe and seed. The files are read as they ship (``config.data.name='idx'``, gzip or raw) from
``config.data.data_dir`` (default: where Debian puts them); a user with tfds' ``fashion_mnist`` prepared
can use ``--config.data.name=fashion_mnist --config.data.data_dir=TFDS_DATA_DIR`` instead.

Models (`MODELS`), sized to train in under 2 hours on a 2-core CPU: patch 4 on 28×28, a 7×7 token grid.
Patch 2 (14×14 tokens) costs 4× the MACs per parameter, and in pilots (200 steps, same optimizer) the
patch-2 S²-MLP learned more slowly per step as well as per second (61-64% test top-1 after 200 steps at
width 64-96, against 75% for patch 4 at width 128), so within the time budget the coarser grid wins.

- ``s2mlp``: S²-MLP, width 128, 8 blocks, mlp_ratio 2: 803,466 parameters, 38.8 M MACs per image.
- ``mixer``: Mixer of matched parameters (803,402, -0.01%) under the same recipe: width 128, 8 blocks,
  token MLP 49 -> 333 -> 49, channel MLP 128 -> 256 -> 128. Its MACs are 59.4 M (153%): with 49 tokens
  and width 128 a Mixer cannot match S²-MLP in parameters and MACs at once (both match only when the
  token count equals the width; configs/studies/mixer_vs_s2mlp.py explains).
- ``s2mlpv2``: S²-MLPv2, patch 2, widths (48, 96), depths (2, 6), mlp_ratio 2: 569,026 parameters
  and 30.0 M MACs (its pyramid starts at 14×14 tokens and puts most blocks at 7×7).

Recipe: the S²-MLPv2 paper's AdamW / cosine / label smoothing / DropPath (0.05), with augmentations that suit
small grey, centred images: a shift of up to ±2 pixels (``pad_crop(2)``: torchvision's RandomCrop(28,
padding=2)), horizontal flip (clothes are left-right symmetric), random erasing 0.25; no RandAugment (its
colour ops do little on grey images), no Mixup/CutMix, no EMA. The lr is higher than ImageNet's (a short run
of a small model). 32 epochs fill the 2-hour budget on the 2-core CPU.

Measured (``:s2mlp``, 2026-12-05): ``python main.py --config=configs/fashion_mnist.py
--workdir=runs/fashion_mnist`` on the 2-core development machine (``lscpu``: AMD EPYC, 2 cores,
AVX-512; Python 3.11, JAX 0.10.2): 14,976 steps at batch 128 in 1 h 55 min of wall time, start to exit
(median 288 img/s; another job shared the cores for about 3 minutes) reached **92.88% test top-1** (99.87%
top-5; 86.1, 88.9, 90.1, 90.9, 92.1, 92.8% at epochs 5, 10, 15, 20, 25, 30). Short of the 94.0% goal: above
Zalando's MLP rows (88.3%) and its "2 Conv, < 100K parameters" row (92.5%), below "2 Conv + pooling + BN"
(93.4%). Shirt is the weak class (74.7%; confused with T-shirt/top, coat and pullover).

The first recipe of this config, a mild inception crop (``inception_crop(0.6)``: area 60-100%, aspect 3/4-4/3,
resized back to 28×28), DropPath 0.1 and 25 epochs, reached 91.63% (one seed; 1 h 49 min with a test suite
sharing the cores): its train loss stayed at 0.72 (the label-smoothing floor is about 0.5), the model
underfitting the augmented images, so the crop became a plain shift, DropPath halved and the schedule
lengthened to the budget (train loss 0.66 at the end). Both are single seeds; the two Fashion-MNIST studies keep
the first recipe (``configs/studies``: ``FASHION_MNIST_AS_RUN``).

Measured (``:s2mlpv2``, 2026-12-05): ``python main.py --config=configs/fashion_mnist.py:s2mlpv2
--workdir=runs/fashion_mnist_v2`` on the same machine, alone on it: 14,976 steps at batch 128 in 1 h 57 min
(median 286 img/s) reached **93.70% test top-1** (99.90% top-5; 84.6, 88.5, 90.4, 92.2, 92.7, 93.6% at epochs
5, 10, 15, 20, 25, 30; Shirt 78.2%). Ahead of ``:s2mlp`` from epoch 15 on, with 71% of its parameters and 77% of
its MACs: its first stage keeps the 14×14 grid the patch-4 model gives up. Above Zalando's "2 Conv + pooling +
BN" (93.4%), VGG16 (93.5%) and Capsule Network (93.6%) rows; still short of the 94.0% goal. One seed each:
the 0.82-point lead over ``:s2mlp`` is not yet a measured difference (the Mixer vs S²-MLP study's spread over
seeds of smaller models is 0.2-1.4 points).

A second seed (``:s2mlpv2``, 2026-12-06): ``python main.py --config=configs/fashion_mnist.py:s2mlpv2
--workdir=runs/fashion_mnist_v2_seed1 --config.seed=1`` on the same machine, in three sittings beside test suites
(each stopped by SIGTERM and resumed by rerunning the command, so its wall time says nothing), reached **93.61%**
(99.87% top-5; 84.5, 89.3, 90.4, 91.8, 92.6, 93.6% at epochs 5, 10, 15, 20, 25, 30; Shirt 78.2%). Over the two
seeds the row is **93.66%** (93.61-93.70): the seed moves it by 0.09 points, and the goal is 0.34 points away.

Measured (``:mixer``, 2026-12-06): ``python main.py --config=configs/fashion_mnist.py:mixer
--workdir=runs/fashion_mnist_mixer`` on the same machine, in four sittings (stopped by SIGTERM or killed, each
resumed by rerunning the command): 14,976 steps in 5 h 51 min of wall time, most of it beside test suites and
other jobs on the two cores (median 94 img/s; ~138 img/s alone, the first 400 steps), reached **92.33% test
top-1** (99.91% top-5; 85.0, 87.3, 89.4, 90.9, 91.8, 92.3% at epochs 5, 10, 15, 20, 25, 30; Shirt 76.3%). The
S²-MLP of the same recipe and seed is 0.55 points ahead (92.88%) with 65% of the Mixer's MACs, at about twice its
images/s on this CPU; one seed each, so the accuracy gap is within the spread over seeds (a tie), while the cost
gap is measured.

Without random erasing (``:s2mlpv2``, 2026-12-06): ``python main.py --config=configs/fashion_mnist.py:s2mlpv2
--workdir=runs/fashion_mnist_v2_noerase '--config.augment.ops=resize|pad_crop(2)|flip|normalize'``, same machine,
alone on it but for a minute of short checks, 14,976 steps in 2 h 9 min (median 263 img/s: the shared host ran ~8%
slower than for the run above, whose work was the same plus erasing) reached **93.74%** (99.86% top-5; 84.5, 88.1,
91.1, 91.8, 93.2, 93.7% at epochs 5, 10, 15, 20, 25, 30; Shirt 79.2%; final train loss 0.61). Tried because the
``:s2mlp`` run's train loss with erasing ended at 0.66, well above the label-smoothing floor (~0.5), as if the
small models underfit. 0.04 points above the seed-0 run with erasing and 0.08 above the mean of its two seeds,
whose own spread is 0.09 points: a tie, so the recipe keeps ``erase(0.25)`` and the goal stays unmet.

A deeper first stage (``:s2mlpv2``, 2026-12-06): ``python main.py --config=configs/fashion_mnist.py:s2mlpv2
--workdir=runs/fashion_mnist_v2_d35 '--config.model.overrides.depths=(3, 5)' --config.num_epochs=24``: 3 blocks at
14×14 and 5 at 7×7, 506,134 parameters and the same 30.0 M MACs (a 14×14 block of width 48 costs what a 7×7 block of
width 96 does), 24 epochs because its 14×14 blocks run slower on this CPU (~225 img/s at the start against ~250-286 for
depths (2, 6)). Same machine, alone on it: 11,232 steps in 1 h 57 min (median 209 img/s) reached **93.19%** (99.92%
top-5; 85.9, 89.0, 91.3, 92.8% at epochs 5, 10, 15, 20; Shirt 77.4%). Ahead of depths (2, 6) early (85.9 against
84.5-84.6 at epoch 5) but 0.47 points below the two-seed row at the end, beyond its 0.09-point spread (one seed):
within the 2-hour budget, a 14×14 block buys less than the epochs it costs. The config keeps depths (2, 6).
"""

from configs import common

MODELS = {  # label -> model name and its overrides
    "s2mlp": ("s2mlp_tiny", {"patch_size": 4, "hidden_dim": 128, "num_blocks": 8, "mlp_ratio": 2}),
    "mixer": (
        "mixer_tiny",
        {"patch_size": 4, "hidden_dim": 128, "num_blocks": 8, "tokens_mlp_dim": 333, "channels_mlp_dim": 256},
    ),
    "s2mlpv2": ("s2mlpv2_tiny", {"patch_size": 2, "hidden_dims": (48, 96), "depths": (2, 6), "mlp_ratio": 2}),
}
DATA_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package


def get_config(model: str = "s2mlp"):
    if model not in MODELS:
        raise ValueError(f"model={model!r} is unknown; choose one of {list(MODELS)}.")
    config = common.get_config("v2")
    config.model.name, config.model.overrides = MODELS[model]
    config.model.drop_path_rate = 0.05
    config.compute_dtype = "float32"  # CPU: bfloat16 matmuls are slower than float32 here

    config.data.name = "idx"
    config.data.data_dir = DATA_DIR
    config.data.train_split = "train"
    config.data.eval_split = "test"
    config.data.shuffle_buffer = 60_000
    config.data.eval_crop_pct = 1.0
    config.data.normalization = "minus_one_to_one"  # no ImageNet colour statistics for grey images
    config.image_size = 28

    # A chain starts by turning the record into uint8 pixels at image_size: at 28×28 `resize` passes them through.
    config.augment.ops = "resize|pad_crop(2)|flip|normalize|erase(0.25)"
    config.augment.mixup = 0.0
    config.augment.cutmix = 0.0
    config.augment.label_smoothing = 0.1

    config.batch_size = 128
    config.eval_batch_size = 1000  # 10,000 test images: 10 batches, a multiple of 1, 2, 4 and 8 devices
    config.num_epochs = 32
    config.warmup_epochs = 2
    config.base_lr = 0.024  # per 1024 images: 3e-3 at batch 128
    config.min_lr = 1e-5
    config.weight_decay = 0.05
    config.ema_decay = 0.0
    config.log_every_steps = 100
    # An epoch is 468 steps (60,000 // 128, the last partial batch dropped); these cadences, a step longer, are
    # the ones the committed runs used: an eval about every 5 epochs, a checkpoint about every epoch.
    config.eval_every_steps = 2_345
    config.checkpoint_every_steps = 469
    return config
