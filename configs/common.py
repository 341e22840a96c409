"""Shared defaults: every config starts from `get_config()` here and changes what differs.

`get_config('v2')` is S²-MLPv2's recipe (S²-MLPv2 paper §5, implementation details): AdamW, lr 2e-3 per 1024 images,
cosine to 1e-5, 10 warmup epochs, weight decay 0.05, RandAugment rand-m9-mstd0.5-inc1,
Mixup 0.8 / CutMix 1.0, random erasing 0.25, label smoothing 0.1, DropPath 0.1,
EMA of weights, 300 epochs at 224×224. `get_config('deit')` is S²-MLP's
(DeiT's: lr 1e-3 per 1024, 5 warmup epochs, no EMA, and DeiT's repeated
augmentation, 3 copies of each chosen image an epoch: S²-MLP paper §4, "Training details").
The S²-MLPv2 paper (§5, implementation details) lists no repeated augmentation, so 'v2' has none.
"""

import os

import ml_collections


def get_config(recipe: str = "v2") -> ml_collections.ConfigDict:
    """The shared defaults with `recipe` 'v2' (S²-MLPv2 paper) or 'deit' (S²-MLP paper)."""
    if recipe not in ("v2", "deit"):
        raise ValueError(f"recipe={recipe!r} is unknown; choose 'v2' or 'deit'.")
    config = ml_collections.ConfigDict()

    # ---- model: s2mlp.models.get_model(model.name, **model.overrides) ----
    config.model = ml_collections.ConfigDict()
    config.model.name = "s2mlpv2_small"
    config.model.drop_path_rate = 0.1
    config.model.overrides = ml_collections.ConfigDict()  # e.g. {'shift_pattern': 'eight'}
    config.compute_dtype = "bfloat16"  # activations; parameters stay float32

    # ---- data -------------------------------------------------------------
    config.data = ml_collections.ConfigDict()
    config.data.name = "imagenet2012"  # any tfds image dataset, 'directory' or 'digits'
    config.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # tfds data_dir / image root
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.download = False  # let tfds download datasets that need no manual step
    config.data.shuffle_buffer = 16_384  # records; tfds: ~1.8 GB of ImageNet JPEGs per host
    config.data.bad_images = "fail"  # 'directory' datasets: 'fail' or 'skip' unreadable files
    config.data.normalization = "imagenet"
    config.data.eval_crop_pct = 0.875  # eval: resize shorter side to image_size / crop_pct, center crop
    # Training on part of the train split (low-data studies; eval is untouched). train_fraction in (0, 1] is
    # class-balanced (stratified): max(1, floor(fraction * n_c + 0.5)) examples of each class c.
    config.data.train_fraction = 1.0
    config.data.train_per_class = 0  # > 0: exactly this many examples of each class (not with train_fraction)
    config.data.subset_seed = 0  # picks the subset; independent of config.seed, so seeds vary training, not data
    # The classes to train and evaluate on, relabelled 0..K-1: '' (all), a list of class names (in label order),
    # a preset ('imagenet100': CMC's ImageNet-100) or 'random:K:SEED' (K classes drawn with SEED).
    config.data.classes = ml_collections.FieldReference("", field_type=object)
    # DeiT's repeated augmentation: each epoch takes N/aug_repeats images, each aug_repeats times with its own
    # augmentation (copies spread over processes); the epoch keeps N examples. 0 or 1: off.
    config.data.aug_repeats = 0
    config.data.num_threads = 0  # tf.data threads per iterator; 0: tf.data's default pool (AUTOTUNE)
    config.image_size = 224

    # ---- augmentation -----------------------------------------------------------
    config.augment = ml_collections.ConfigDict()
    # The per-image ops, in order (s2mlp/augment_chain.py; README "Augmentation"), DeiT's (timm's): random resized
    # crop (area 8-100%) to image_size, flip, RandAugment rand-m9-mstd0.5-inc1 (DeiT's and ViP's `--aa` default),
    # normalisation, random erasing 0.25. Ops after a 'to_device' run inside the jitted train step instead of tf.data.
    config.augment.ops = "random_resized_crop(0.08)|flip|randaugment(2, 9, 0.5, increasing=True)|normalize|erase(0.25)"
    config.augment.mixup = 0.8  # Beta(alpha, alpha); 0 turns it off
    config.augment.cutmix = 1.0  # Beta(alpha, alpha); 0 turns it off
    config.augment.mix_switch_prob = 0.5  # when both are on: chance of CutMix per batch
    config.augment.label_smoothing = 0.1

    # ---- optimisation --------------------------------------------------------
    config.batch_size = 1024  # global, over all devices and hosts
    config.eval_batch_size = 1024
    config.num_epochs = 300
    config.warmup_epochs = 10.0  # a float: a fraction of an epoch is allowed (e.g. 0.5 for short runs)
    config.base_lr = 2e-3  # per 1024 images: lr = base_lr * batch_size / 1024
    config.min_lr = 1e-5
    config.weight_decay = 0.05
    config.grad_clip_norm = 0.0  # global-norm clipping; 0 turns it off
    config.grad_accum_steps = 1
    config.ema_decay = 0.99996  # 0 turns the EMA of weights off
    config.fsdp = False  # shard parameters and optimizer state over the data axis

    # ---- cadences and bookkeeping ------------------------------------------
    config.seed = 0
    config.log_every_steps = 100
    config.eval_every_steps = 5000
    config.checkpoint_every_steps = 5000
    config.keep_checkpoints = 3
    config.total_steps = 0  # 0: num_epochs worth of steps; > 0 overrides
    # JAX's persistent compilation cache, set by main.py (study.py uses its own, WORKDIR/compilation_cache): a
    # later start of the same program loads the compiled steps. Default $XDG_CACHE_HOME/s2mlp/jax or
    # ~/.cache/s2mlp/jax; '' turns it off.
    config.compilation_cache_dir = os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "s2mlp", "jax")
    # A jax.profiler trace of num_steps train steps from first_step into WORKDIR/profile (README "Profiling");
    # (first_step, num_steps), e.g. (10, 5); (0, 0) turns it off.
    config.profile_steps = (0, 0)

    # ---- modes -----------------------------------------------------------------
    config.init_from = ""  # fine-tune: a workdir or checkpoint step folder; the head is replaced
    config.init_from_ema = True  # take the EMA weights of init_from when it has them

    # ---- evaluations (s2mlp/evals.py) --------------------------------------------
    # config.data.eval_split is always evaluated: the main eval (metrics eval_top1, ...; TensorBoard
    # <eval_split>/top1). More evals, each a preset ('validation', 'real': ImageNet ReaL labels, 'v2': ImageNet-V2
    # matched frequency) or 'name=NAME,data=DATASET,split=SPLIT[,labels=FEATURE]'; eval NAME writes eval_NAME_top1,
    # ... and TensorBoard NAME/top1. E.g. --config.evals='("real", "v2")'.
    config.evals = ()
    config.best_eval = ""  # the eval whose top-1 (the EMA's when on) ranks the best checkpoint; '': the main eval

    if recipe == "deit":
        # S²-MLP (S²-MLP paper §4, following DeiT): the DeiT recipe. lr 1e-3 at batch 1024 (5e-4 per 512),
        # 5 warmup epochs (DeiT's; the paper does not say), no EMA, repeated augmentation ×3 (DeiT's RASampler).
        config.base_lr = 1e-3
        config.warmup_epochs = 5.0
        config.ema_decay = 0.0
        config.data.aug_repeats = 3
    return config
