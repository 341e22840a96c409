"""Shift-pattern ablation of S²-MLP (S²-MLP paper, §4.3 and Table 7): every pattern of s2mlp/shift.py × 3 seeds.

    python study.py --study=configs/studies/shift_ablation.py --workdir=runs/shift_ablation
    python study.py --study=configs/studies/shift_ablation.py:fashion_mnist --workdir=runs/shift_fmnist
    python study.py --study=configs/studies/shift_ablation.py:cifar10 --workdir=runs/shift_cifar10
    python study.py --study=configs/studies/shift_ablation.py:imagenet100 --workdir=runs/shift_in100 \
        --config.data.data_dir=$TFDS_DATA_DIR

Each seed also draws its own train subset (``study.tied``: ``data.subset_seed`` = ``seed``), so
where a study trains on part of the data (the digits: 20%) the spread over seeds covers the
draw of the data as well as the training; one subset for every seed can favour one pattern
(README, "Results on the digits"). With the whole train split the subset seed does nothing.

The argument picks the data:

- ``digits`` (default): configs/demo.py's small S²-MLP (c=64, 4 blocks, r=2) at 16×16 with patch 2
  (an 8×8 token grid) on a class-balanced fifth of scikit-learn's digits (each seed its own),
  offline; the 300 held-out test images stay whole. 11 patterns × 3 seeds = 33 runs of 300 steps
  at batch 64, about 40-60 s each on a 2-core CPU. The digits are easy: on the full train split
  ss1 sits at the ceiling (97-99%), so the study trains on 20% of it to leave room between the
  patterns. docs/studies/shift_ablation holds the run of 2026-12-06 (AMD EPYC, 2 cores: 27-46 s a run,
  18 min 9 s for the 33), each seed its own fifth.
- ``fashion_mnist``: configs/fashion_mnist.py's data and recipe (Zalando's IDX files where Debian's
  dataset-fashion-mnist puts them, 28×28, the whole 60,000-image train split, the 10,000 test images; the
  recipe's crop and DropPath as the study first ran them, ``studies.FASHION_MNIST_AS_RUN``) with a smaller
  S²-MLP than its own: patch 2 (the config's uses 4), width 32, 4 blocks, mlp_ratio 2, 26,538 parameters and
  4.89 M MACs per image for every pattern (the shift has no weights and no MACs). Patch 2 leaves a 14×14
  token grid, the grid of Table 7's models (patch 16 at 224²); width 32 splits into the eight groups of
  ``eight``. 11 patterns × 3 seeds = 33 runs of 2 epochs each (936 steps at batch 128, a fixed number of
  steps: every run sees the whole train split twice), eval every epoch. Sized to the 2-hour budget: a first
  sizing (width 48, 3 epochs: 58,234 parameters, 10.95 M MACs) measured ~460 img/s and ~7 min a run
  uncontended, ~3.9 h for the study; pilots of 200 steps (2026-12-05, AMD EPYC, 2 cores, AVX-512) gave
  ~420 img/s at width 48 and ~650 img/s at width 32 (the small model is bound by its elementwise work, not
  its MACs), so width 32 and 2 epochs: ~3 min of training and ~35 s of start-up, compilation and evals per run.
  Measured (2026-12-05 22:09 to 12-06 00:07 UTC, same machine, one sitting): 1 h 57 min for the 33 runs, 190-270 s
  a run (median 206 s), ~630 img/s. Results: docs/studies/shift_ablation_fmnist and the README (eight 69.2%, ss1
  66.4%, none 46.9% after 2 epochs).
- ``cifar10``, ``cifar100``, ``imagenette``: tfds datasets (``--config.data.data_dir`` where they
  are prepared); a wider S²-MLP for 100 epochs, S²-MLP's DeiT recipe. An accelerator run.
- ``imagenet100``: Table 7 as the paper ran it (§4.2): S²-MLP-wide (configs/s2mlp_wide.py: the
  wide settings, c=768, N=12, r=4, patch 16, 224²) with S²-MLP's DeiT recipe (configs/common.py
  'deit': AdamW, lr 1e-3 at batch 1024, 5 warmup epochs, label smoothing, DropPath, repeated
  augmentation ×3), 300 epochs, on ImageNet-1k (tfds ``imagenet2012``) restricted to 100 classes
  (``data.classes='imagenet100'``: CMC's list, configs/imagenet100_classes.txt; the paper does not
  list its "randomly selected 100 categories"): 126,689 train images, the 5,000 validation images
  of those classes. One seed, as the paper's single numbers. Compute per run: 71.5M parameters
  and 13.99 G MACs per image (100-class head; ``python -m s2mlp.summary`` for the 1000-class
  model), × 3 (forward and backward) × 2 FLOPs × 126,689 images × 300 epochs ≈ 3.2e18 FLOPs
  (36,900 steps of 1,024), about 7.1 A100-hours at 40% of 312 bf16 TFLOP/s (2.2 H100-hours at
  40% of 989); 11 runs ≈ 78 A100-hours. Reading: with tfds every epoch reads the whole ImageNet
  train split (~140 GB, of which the 100 classes are a tenth) and each start reads its labels
  once, so a fast GPU waits on the disk; image folders of ImageNet (``--config.data.name=directory``,
  data_dir/train/<wnid>/, data_dir/validation/<wnid>/) read only the 100 classes' files.
- ``imagenet``: S²-MLP-wide (configs/s2mlp_wide.py, ImageNet-1k, 224², 300 epochs), one seed.
  Table 7 itself was measured on ImageNet-100 (``imagenet100`` above). Compute per run: 14.0
  forward GMACs × 3 (forward and backward) × 2 FLOPs × 1.28M images × 300 epochs ≈ 3.2e19 FLOPs,
  i.e. about 72 GPU-hours on an A100 at 40% of its 312 bf16 TFLOP/s (about 22 H100-hours at 40%
  of 989), so 11 runs ≈ 800 A100-hours.

All sizes are in the knobs below; pilot runs sized the digits and fashion_mnist.
"""

from configs import studies
from configs.studies import fields

PATTERNS = ["ss1", "eight", "up_right", "left_down", "vertical", "horizontal", "up", "down", "left", "right", "none"]
SEEDS = [0, 1, 2]

# ---- knobs: every size of the study, per data argument ------------------------------------
DIGITS = {
    # configs/demo.py's S²-MLP (c=64, 4 blocks, r=2) at 16×16 with patch 2: the same 8×8 token grid as the demo's
    # 32×32 / patch 4 (one token per pixel of the 8×8 originals) at a quarter of the stem's work.
    "image_size": 16,
    "model.overrides.patch_size": 2,
    # A fifth of the train split (30 images per class): on all of it ss1 reaches 97% and the directional patterns
    # crowd against the ceiling; pilot runs at 20% gave ss1 97%, vertical 93%, up 87%, none 58% (seed 0).
    "data.train_fraction": 0.2,
    "total_steps": 300,  # ~40 s of training per run on a 2-core CPU (batch 64: ~64 epochs of 300 images)
    "warmup_epochs": 2,
    "log_every_steps": 50,
    "eval_every_steps": 50,  # the top-1-vs-step curve of the report
    "checkpoint_every_steps": 100,
}
FASHION_MNIST = {  # configs/fashion_mnist.py (its recipe and data) with a smaller S²-MLP at patch 2, 2 epochs
    # 14×14 tokens (Table 7's grid; the config's own model uses patch 4) of width 32 (8 shift groups of 4
    # channels), 4 blocks: 26,538 parameters, 4.89 M MACs. Sized to ~2 h for the study on the 2-core CPU.
    **studies.FASHION_MNIST_AS_RUN,
    "model.overrides.patch_size": 2,
    "model.overrides.hidden_dim": 32,
    "model.overrides.num_blocks": 4,
    "num_epochs": 2,  # 936 steps at batch 128; ~3 min of training per run (pilot: ~650 img/s, uncontended)
    "warmup_epochs": 0.5,
    "log_every_steps": 100,
    "eval_every_steps": 468,  # every epoch
    "checkpoint_every_steps": 468,
}
TFDS = {  # cifar10 / cifar100 / imagenette: a wider S²-MLP on the studies' tfds recipe
    "model.name": "s2mlp_tiny",
    "model.overrides": {"hidden_dim": 256, "num_blocks": 8, "mlp_ratio": 4, "patch_size": 4},
    "compute_dtype": "bfloat16",
    **studies.TFDS,
}
IMAGENETTE = studies.IMAGENETTE
IMAGENET100 = {"data.classes": "imagenet100"}  # on configs/s2mlp_wide.py: the DeiT recipe, repeated augmentation ×3


def get_config(data: str = "digits"):
    from ml_collections import ConfigDict

    study = ConfigDict()
    seeds = SEEDS
    if data == "digits":
        study.base = "configs/demo.py"
        overrides = dict(DIGITS)
    elif data == "fashion_mnist":
        study.base = "configs/fashion_mnist.py"
        overrides = dict(FASHION_MNIST)
    elif data in ("cifar10", "cifar100", "imagenette"):
        study.base = "configs/common.py:deit"
        overrides = {**TFDS, "data.name": data, **(IMAGENETTE if data == "imagenette" else {})}
    elif data in ("imagenet", "imagenet100"):
        study.base = "configs/s2mlp_wide.py"
        overrides, seeds = (dict(IMAGENET100) if data == "imagenet100" else {}), [0]
    else:
        raise ValueError(
            f"data={data!r} is unknown; choose digits, fashion_mnist, cifar10, cifar100, imagenette, imagenet or "
            "imagenet100."
        )
    study.overrides = fields(overrides)
    study.grid = fields({"model.overrides.shift_pattern": PATTERNS, "seed": seeds})
    study.name_fields = fields({"model.overrides.shift_pattern": "shift"})
    study.tied = fields({"data.subset_seed": "seed"})  # each seed its own train subset
    return study
