"""S²-MLP-wide on ImageNet-1K, the S²-MLP paper's (DeiT) recipe.

    python main.py --config=configs/s2mlp_wide.py --workdir=$WORKDIR \
        --config.data.data_dir=$TFDS_DATA_DIR

Sized for 8+ accelerators with batch 1024 (e.g. a TPU v4-8/v5e-8 or 8×A100;
lower `batch_size` and the lr follows it). 300 epochs = 375k steps.
Paper: 80.0% top-1, 71M params (excl. head), 14.0G FLOPs. Not reproduced here.
"""

from configs import common


def get_config():
    config = common.get_config("deit")
    config.model.name = "s2mlp_wide"
    return config
