"""S²-MLPv2-Small/7 on ImageNet-1K, the S²-MLPv2 paper's recipe.

    python main.py --config=configs/s2mlp_v2_small.py --workdir=$WORKDIR \
        --config.data.data_dir=$TFDS_DATA_DIR

The paper trained on 4×A100 with batch 1024 (300 epochs = 375k steps).
Paper: 82.0% top-1, 25M params, 6.9G FLOPs. Not reproduced here.
"""

from configs import common


def get_config():
    config = common.get_config("v2")
    config.model.name = "s2mlpv2_small"
    return config
