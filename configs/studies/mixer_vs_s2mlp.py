"""MLP-Mixer vs S²-MLP vs S²-MLPv2 of similar size, on all and on parts of the training data, × 3 seeds.

    python study.py --study=configs/studies/mixer_vs_s2mlp.py --workdir=runs/mixer_vs_s2mlp
    python study.py --study=configs/studies/mixer_vs_s2mlp.py:fashion_mnist --workdir=runs/mvs_fmnist
    python study.py --study=configs/studies/mixer_vs_s2mlp.py:imagenet100 --workdir=runs/mvs_in100 \
        --config.data.data_dir=$TFDS_DATA_DIR

The question (S²-MLP paper, §1 and §4.2): with the same parameter and compute budget, does the
spatial shift (local token mixing, no spatial weights) beat Mixer's dense token-mixing MLP, the
more so when training data is scarce? ``data.train_fraction`` takes a seeded, class-balanced
fraction of the train split (all, 30%, 10%; Fashion-MNIST: all, 10%, 1%); the test split stays
whole. Each seed draws its own subset (``study.tied``: ``data.subset_seed`` = ``seed``), so the
spread over seeds covers which examples were drawn as well as the training: with one subset for
every seed, a gap at 10% of the digits reversed on another draw (README, "Results on the digits").

The argument picks the data:

- ``digits`` (default): the three families at ~100k parameters on scikit-learn's digits at
  16×16, patch 2 (an 8×8 token grid, one token per pixel of the 8×8 originals), configs/demo.py's
  recipe (written out below, because the base here is configs/common.py, which has no model
  overrides to clash with Mixer's fields). Mixer and S²-MLP match exactly in parameters and MACs;
  S²-MLPv2 in parameters only (see ``MODELS['digits']``). 3 models × 3 fractions × 3 seeds = 27
  runs of 300 steps, about 40-60 s each on a 2-core CPU. Pilot runs (seed 0): at 10% of the data
  Mixer 89%, S²-MLP 95%. docs/studies/mixer_vs_s2mlp holds the run with the subset tied to the
  seed (2026-12-05).
- ``fashion_mnist``: configs/fashion_mnist.py's data and recipe (`studies.recipe`: Zalando's IDX files where
  Debian puts them, 28×28, AdamW at lr 3e-3 for batch 128, flip, random erasing, label smoothing; the mild
  inception crop and DropPath 0.1 the study ran with, ``studies.FASHION_MNIST_AS_RUN``) with ~117k-parameter
  models (``MODELS['fashion_mnist']``) on 100%, 10% and 1% of the 60,000 train images (6,000 per class, so 600
  and 60 per class). Mixer and S²-MLP at patch 4 (a 7×7 grid of 49 tokens) and width 48 match in parameters
  (116,970 vs 116,986) and within 0.7% in MACs (5.49 M vs 5.53 M): both match exactly only when the token
  count equals the width, and a width of 49 does not split into the shift's 4 groups, so 48 it is, with
  Mixer's token MLP 49 -> 47 -> 49 (patch 2's 196 tokens would need width 196). S²-MLPv2 needs patch 2 (its
  side must divide by twice the patch): widths (24, 48), depths (1, 5), 118,180 parameters (+1.0%) and 5.71 M
  MACs (+3.3%). 3 models × 3 fractions × 3 seeds = 27 runs of a fixed 2,400 steps at batch 128 (5 epochs at
  100%, 51 at 10%, 512 at 1%): fixed steps, not epochs, as the digits study does, so every run gets the same
  updates and compute (a fixed epoch count would give the 1% runs 4 steps an epoch). Warmup is half an epoch,
  so it shrinks with the fraction (234, 23 and 2 steps), the same for the three models within a row. Eval
  every 400 steps. Compute per run: ~5.5 M MACs × 3 × 128 × 2,400 ≈ 5.1 T MACs of training (+0.3 T for six
  evals of 10,000 images); ≈ 0.14 P MACs for the study. Estimated on the 2-core CPU
  (configs/studies/__init__.py: computed from the measured rate, not measured): ~117 ms per step (~1,100
  img/s), ~5 min per run, ~2.3 h for the study uncontended (about twice that when the machine is shared).
  Measured (2026-12-05, `lscpu`: AMD EPYC, 2 cores, AVX-512; Python 3.11, JAX 0.10.2): 431-627 s per run
  (median 506 s; 530-790 img/s), 4 h 20 min summed over three sittings; the estimate was low by half. Test
  top-1, mean ± std over 3 seeds (docs/studies/mixer_vs_s2mlp_fmnist): at 100% Mixer 84.68 ± 0.15, S²-MLP
  85.25 ± 0.37, S²-MLPv2 85.06 ± 0.27 (a tie); at 10% 84.39 ± 0.30, 85.43 ± 0.08, 84.83 ± 0.68; at 1% 78.18 ±
  0.42, 80.74 ± 0.14, 78.18 ± 0.20 (README, "Results on Fashion-MNIST", says which differences are ties).
- ``cifar10``, ``cifar100``, ``imagenette``: tfds datasets, 100 epochs, no EMA; models of 4.4-5.3M parameters,
  not matched (at 32²: Mixer 4,360,970, S²-MLP 5,281,034, S²-MLPv2 4,853,834; at Imagenette's 128² with patch 8:
  4.79M, 5.32M, 4.87M): over 64 tokens the Mixer's token MLP is small beside S²-MLP's width-256 MLPs.
- ``imagenet``: the papers' ~55-60M models at 224², S²-MLPv2's recipe for all three: mixer_b16
  (12.6 GMACs), s2mlp_deep (10.5), s2mlpv2_medium (16.3). Compute per run: GMACs × 3 (forward
  and backward) × 2 FLOPs × 1.28M images × 300 epochs = GMACs × 2.3e18 FLOPs, i.e. about
  5 A100-hours per forward GMAC at 40% of 312 bf16 TFLOP/s: ≈ 65, 54 and 83 A100-hours for one
  seed at the full data (a tenth of the data trains a tenth of the steps), ≈ 850 A100-hours for
  the whole 27-run study.
- ``imagenet100``: the same three models and recipe on ImageNet-100 (``data.classes=
  'imagenet100'``: CMC's 100 classes of ImageNet-1k, 126,689 train and 5,000 validation images;
  the S²-MLP paper's ablations (§4.2) use an ImageNet100 of its own, whose classes it does not
  list): all, 30% and 10% of the 100 classes' train images, 300 epochs each, without the EMA of weights
  (0.99996 averages over ~25k steps; these runs take 3.7k-37k at batch 1024). Parameters with the
  100-class head: mixer_b16 59.2M, s2mlp_deep 53.6M, s2mlpv2_medium 54.8M; 12.60, 10.46 and 16.28
  G MACs per image. Compute per run at all of the data: GMACs × 3 × 2 × 126,689 × 300 = GMACs ×
  2.3e17 FLOPs: ≈ 6.4, 5.3 and 8.3 A100-hours (40% of 312 bf16 TFLOP/s); 30% and 10% train that
  share of the steps; ≈ 84 A100-hours for the 27 runs. With tfds each epoch reads the whole
  ImageNet train split (see shift_ablation's ``imagenet100`` for the image-folder alternative).
"""

from configs import fashion_mnist, studies
from configs.studies import fields

SEEDS = [0, 1, 2]
FRACTIONS = {"digits": [1.0, 0.3, 0.1], "fashion_mnist": [1.0, 0.1, 0.01]}  # others: the digits'

# ---- knobs: every size of the study, per data argument ------------------------------------
MODELS = {  # label -> model name and its overrides (merged into the base's, which has none)
    "digits": {  # 8×8 tokens of width 64: Mixer's token MLP (64 -> 64 -> 64 over tokens) has exactly the
        # parameters and MACs of S²-MLP's fc1 + fc2 (64 -> 64 over channels), so the two match exactly:
        # 102,218 parameters and 6.34 M MACs each. S²-MLPv2 is matched on parameters (104,346, +2.1%); its
        # pyramid halves the token grid in stage 2, so it does 2.26 M MACs (36%): MACs cannot match both.
        "mixer": (
            "mixer_tiny",
            {"patch_size": 2, "hidden_dim": 64, "num_blocks": 4, "tokens_mlp_dim": 64, "channels_mlp_dim": 128},
        ),
        "s2mlp": ("s2mlp_tiny", {"patch_size": 2, "hidden_dim": 64, "num_blocks": 4, "mlp_ratio": 2}),
        "s2mlpv2": ("s2mlpv2_tiny", {"patch_size": 2, "hidden_dims": (32, 64), "depths": (2, 2), "mlp_ratio": 2}),
    },  # fmt: skip
    "fashion_mnist": {  # 7×7 tokens of width 48: Mixer's token MLP 49 -> 47 -> 49 has S²-MLP's fc1 + fc2
        # parameters to 2 (4,702 vs 4,704 a block) and 98% of their MACs. 8 blocks: Mixer 116,970 parameters and
        # 5.49 M MACs, S²-MLP 116,986 and 5.53 M; S²-MLPv2 (patch 2: 14×14 tokens, then 7×7) 118,180 and 5.71 M.
        "mixer": (
            "mixer_tiny",
            {"patch_size": 4, "hidden_dim": 48, "num_blocks": 8, "tokens_mlp_dim": 47, "channels_mlp_dim": 96},
        ),
        "s2mlp": ("s2mlp_tiny", {"patch_size": 4, "hidden_dim": 48, "num_blocks": 8, "mlp_ratio": 2}),
        "s2mlpv2": ("s2mlpv2_tiny", {"patch_size": 2, "hidden_dims": (24, 48), "depths": (1, 5), "mlp_ratio": 2}),
    },  # fmt: skip
    "tfds": {
        "mixer": (
            "mixer_tiny",
            {"patch_size": 4, "hidden_dim": 256, "num_blocks": 8, "tokens_mlp_dim": 128, "channels_mlp_dim": 1024},
        ),
        "s2mlp": ("s2mlp_tiny", {"patch_size": 4, "hidden_dim": 256, "num_blocks": 8, "mlp_ratio": 4}),
        "s2mlpv2": ("s2mlpv2_tiny", {"patch_size": 4, "hidden_dims": (128, 256), "depths": (2, 6), "mlp_ratio": 3}),
    },  # fmt: skip
    "imagenet": {"mixer": ("mixer_b16", {}), "s2mlp": ("s2mlp_deep", {}), "s2mlpv2": ("s2mlpv2_medium", {})},
}
DIGITS = {  # configs/demo.py's recipe; total_steps sizes the study
    "compute_dtype": "float32",
    "model.drop_path_rate": 0.0,
    "data.name": "digits",
    "data.eval_split": "test",
    "data.shuffle_buffer": 2_000,
    "data.eval_crop_pct": 1.0,
    "image_size": 16,  # 16×16, patch 2: one token per pixel of the 8×8 originals, as the demo's 32×32 / patch 4
    "augment.ops": "resize|normalize",
    "augment.mixup": 0.0,
    "augment.cutmix": 0.0,
    "batch_size": 64,
    "eval_batch_size": 96,
    "total_steps": 300,  # ~40 s per run on a 2-core CPU; the same 300 steps at every fraction (~128 epochs at 10%)
    "warmup_epochs": 2,
    "base_lr": 0.032,
    "ema_decay": 0.0,
    "log_every_steps": 50,
    "eval_every_steps": 50,
    "checkpoint_every_steps": 100,
}
FASHION_MNIST = {  # configs/fashion_mnist.py's recipe and data (the base is configs/common.py:v2), sized here
    **{k: v for k, v in studies.recipe(fashion_mnist.get_config()).items() if k != "num_epochs"},  # total_steps
    **studies.FASHION_MNIST_AS_RUN,
    "total_steps": 2_400,  # at every fraction; ~3.8 min of training per run (an estimate, uncontended)
    "warmup_epochs": 0.5,
    "log_every_steps": 100,
    "eval_every_steps": 400,
    "checkpoint_every_steps": 400,
}
TFDS = studies.TFDS  # cifar10 / cifar100 / imagenette (32×32; imagenette at 128×128 with patch 8)
IMAGENETTE = studies.IMAGENETTE


def get_config(data: str = "digits"):
    from ml_collections import ConfigDict

    study = ConfigDict()
    study.base = "configs/common.py:v2"
    if data == "digits":
        overrides, models = dict(DIGITS), MODELS["digits"]
    elif data == "fashion_mnist":
        overrides, models = dict(FASHION_MNIST), MODELS["fashion_mnist"]
    elif data in ("cifar10", "cifar100", "imagenette"):
        overrides = {**TFDS, "data.name": data}
        models = MODELS["tfds"]
    elif data in ("imagenet", "imagenet100"):
        # ImageNet-100 without the EMA, as on tfds: its runs (≤ 37k steps) are far shorter than 0.99996 needs.
        overrides = {"data.classes": "imagenet100", "ema_decay": 0.0} if data == "imagenet100" else {}
        models = MODELS["imagenet"]
    else:
        raise ValueError(
            f"data={data!r} is unknown; choose digits, fashion_mnist, cifar10, cifar100, imagenette, imagenet or "
            "imagenet100."
        )
    runs = []
    for label, (name, model_overrides) in models.items():
        run = {"name": label, "model.name": name, "model.overrides": model_overrides}
        if data == "imagenette":
            run |= IMAGENETTE
        runs.append(fields(run))
    study.overrides = fields(overrides)
    study.runs = runs
    study.grid = fields({"data.train_fraction": FRACTIONS.get(data, FRACTIONS["digits"]), "seed": SEEDS})
    study.name_fields = fields({"data.train_fraction": "fraction"})
    study.tied = fields({"data.subset_seed": "seed"})  # each seed its own train subset
    return study
