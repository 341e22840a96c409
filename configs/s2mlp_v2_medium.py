"""S²-MLPv2-Medium/7 on ImageNet-1K, the S²-MLPv2 paper's recipe.

    python main.py --config=configs/s2mlp_v2_medium.py --workdir=$WORKDIR \
        --config.data.data_dir=$TFDS_DATA_DIR

The paper trained on 4×A100 with batch 744 (GPU memory bound) and states one
initial lr, 2e-3, for both models (S²-MLPv2 §5, "Implementation details"), so
the peak lr is 2e-3 at 744 (base_lr below is per 1024 images, as everywhere
here) and scales linearly from there at another batch. On 16 devices use
--config.batch_size=1024 (744 divides by 1, 2, 3, 4, 6, 8, 12 and 24 devices).
300 epochs ≈ 517k steps at 744.
Paper: 83.6% top-1, 55M params, 16.3G FLOPs. Not reproduced here.
"""

from configs import common


def get_config():
    config = common.get_config("v2")
    config.model.name = "s2mlpv2_medium"
    config.batch_size = 744
    config.base_lr = 2e-3 * 1024 / 744  # the paper's 2e-3 at its batch 744 (not scaled down from 1024)
    config.eval_batch_size = 744
    return config
