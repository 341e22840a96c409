"""Mixer-B16 on ImageNet-1K under our recipe: configs/mixer_s16.py with the model Mixer-B/16.

    python main.py --config=configs/mixer_b16.py --workdir=$WORKDIR \
        --config.data.data_dir=$TFDS_DATA_DIR           # S²-MLPv2's recipe
    python main.py --config=configs/mixer_b16.py:deit ...  # S²-MLP's (DeiT) recipe

Sized for 8+ accelerators with batch 1024. Reference: Mixer-B/16 reaches 76.4% top-1
trained from scratch on ImageNet-1K with the Mixer paper's own recipe (as quoted by
S²-MLP Table 3 and S²-MLPv2 Table 2, with 59M parameters and 11.6B FLOPs).
"""

from configs import mixer_s16


def get_config(recipe="v2"):
    config = mixer_s16.get_config(recipe)
    config.model.name = "mixer_b16"
    return config
