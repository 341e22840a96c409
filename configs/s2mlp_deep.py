"""S²-MLP-deep on ImageNet-1K, the S²-MLP paper's (DeiT) recipe.

    python main.py --config=configs/s2mlp_deep.py --workdir=$WORKDIR \
        --config.data.data_dir=$TFDS_DATA_DIR

Sized for 8+ accelerators with batch 1024. 300 epochs = 375k steps.
Paper: 80.7% top-1, 51M params printed (its own formula gives 53.5M; we build
53,532,288 excl. head), 10.5G FLOPs. Not reproduced here.
"""

from configs import common


def get_config():
    config = common.get_config("deit")
    config.model.name = "s2mlp_deep"
    return config
