"""Study configs for ``python study.py`` (see study.py for the format)."""

import ml_collections


def fields(mapping: dict) -> ml_collections.ConfigDict:
    """A dict of dotted config fields (``'model.overrides.shift_pattern'``), kept in the order written."""
    return ml_collections.ConfigDict(mapping, allow_dotted_keys=True, sort_keys=False)


# The recipe of both studies on tfds data (cifar10, cifar100: 32×32; imagenette at 128×128 with patch 8), 100 epochs.
TFDS = {
    "image_size": 32,
    "data.eval_split": "test",
    "data.eval_crop_pct": 1.0,
    "augment.inception_crop": False,
    "batch_size": 256,
    "eval_batch_size": 500,
    "num_epochs": 100,
    "warmup_epochs": 5,
    "log_every_steps": 100,
    "eval_every_steps": 1000,
    "checkpoint_every_steps": 1000,
}
IMAGENETTE = {"image_size": 128, "model.overrides.patch_size": 8, "data.eval_split": "validation",
              "data.eval_crop_pct": 0.875, "augment.inception_crop": True}  # fmt: skip
