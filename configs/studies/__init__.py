"""Study configs for ``python study.py`` (see study.py for the format).

Wall-time estimates in the studies' docstrings for the 2-core development CPU are computed, not
measured, from one measured rate: configs/fashion_mnist.py's S²-MLP (38.8 M MACs per image) trains
at ~270 images/s uncontended (2026-12-05, AMD EPYC, 2 cores, AVX-512), i.e. ~10.5 G forward MACs of
training images per second (`CPU_MACS_PER_S`; a train step costs about 3× the forward). For
smaller models a step takes ``CPU_STEP_S + batch × MACs / CPU_MACS_PER_S``: an assumed floor of
50 ms per step (dispatch, the input batch, the update) that bounds the speed-up of small models;
an eval image costs a third of a train image. Runs add ~10 s of set-up (compiles, mostly cached
after a study's first run of each program; reading the data). With the floor at 20-80 ms
instead, the estimates move by about ±25%.
"""

import ml_collections

CPU_MACS_PER_S = 270 * 38.8e6
CPU_STEP_S = 0.050


def fields(mapping: dict) -> ml_collections.ConfigDict:
    """A dict of dotted config fields (``'model.overrides.shift_pattern'``), kept in the order written."""
    return ml_collections.ConfigDict(mapping, allow_dotted_keys=True, sort_keys=False)


def recipe(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict | None = None) -> dict:
    """The dotted fields of training config `config` that differ from `reference` (default: configs/common.py's
    'v2'), less the model's name and overrides: `config`'s recipe and data, for a study whose base is the
    reference and whose runs pick the models (a base's model overrides would merge into every run's)."""
    from configs import common

    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict) and value:
                out |= flat(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value
        return out

    mine, theirs = flat(config.to_dict()), flat((reference or common.get_config("v2")).to_dict())
    model = ("model.name", "model.overrides")
    return {k: v for k, v in mine.items() if (k not in theirs or theirs[k] != v) and not k.startswith(model)}


# configs/fashion_mnist.py's recipe as both Fashion-MNIST studies ran it (2026-12-05). The config's own recipe has
# since moved on (a pixel shift in place of the inception crop, DropPath 0.05); the studies keep the recipe of their
# committed results (docs/studies/*_fmnist), so that their commands reproduce them.
FASHION_MNIST_AS_RUN = {"augment.ops": "inception_crop(0.6)|flip|normalize|erase(0.25)", "model.drop_path_rate": 0.1}

# The data settings of both studies on tfds data (cifar10, cifar100: 32×32; imagenette at 128×128 with patch 8), 100
# epochs; each study keeps its own recipe (shift_ablation: common.py's deit, mixer_vs_s2mlp: its v2).
TFDS = {
    "image_size": 32,
    "data.eval_split": "test",
    "data.eval_crop_pct": 1.0,
    "augment.ops": "resize|flip|randaugment(2, 9, 0.5, increasing=True)|normalize|erase(0.25)",  # v2's, no crop
    "batch_size": 256,
    "eval_batch_size": 500,
    "num_epochs": 100,
    "warmup_epochs": 5,
    "log_every_steps": 100,
    "eval_every_steps": 1000,
    "checkpoint_every_steps": 1000,
    # No EMA: v2's 0.99996 averages over ~25k steps (DeiT's ~375k-step runs); after these runs' 3.6k-19.5k steps
    # 46-87% of it would still be the initial weights, and the EMA's eval ranks the kept checkpoints.
    "ema_decay": 0.0,
}
IMAGENETTE = {"image_size": 128, "model.overrides.patch_size": 8, "data.eval_split": "validation",
              "data.eval_crop_pct": 0.875,
              "augment.ops": "random_resized_crop(0.08)|flip|randaugment(2, 9, 0.5, increasing=True)|normalize|"
                             "erase(0.25)"}  # fmt: skip
