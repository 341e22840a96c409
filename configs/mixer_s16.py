"""Mixer-S16 on ImageNet-1K under our recipe, for side-by-side runs with S²-MLP.

    python main.py --config=configs/mixer_s16.py --workdir=$WORKDIR \
        --config.data.data_dir=$TFDS_DATA_DIR           # S²-MLPv2's recipe
    python main.py --config=configs/mixer_s16.py:deit ...  # S²-MLP's (DeiT) recipe

Only the model differs from configs/s2mlp_v2_small.py (recipe 'v2') or
configs/s2mlp_wide.py (recipe 'deit'), so the comparison isolates the backbone.
Sized for 8+ accelerators with batch 1024. Reference: neither S² paper quotes an
ImageNet-1K top-1 for Mixer-S/16; their Mixer row (76.4% top-1 from scratch,
S²-MLP Table 3, S²-MLPv2 Table 2) is Mixer-B/16, configs/mixer_b16.py.
"""

from configs import common


def get_config(recipe="v2"):
    config = common.get_config(recipe)
    config.model.name = "mixer_s16"
    return config
