"""Fine-tunes a trained run on CIFAR-10 at 224×224 with a new 10-class head.

    python main.py --config=configs/finetune_cifar10.py --workdir=$WORKDIR \
        --config.init_from=$IMAGENET_WORKDIR --config.model.name=s2mlpv2_small

`init_from` is a workdir (its latest step) or a step folder; its EMA weights
are used when present. tfds prepares CIFAR-10 itself (`data.download=True`,
needs internet once; or run `tfds build cifar10` beforehand). Sized for one
accelerator; 10k steps at batch 512 (≈100 epochs). No paper figure to compare.
"""

from configs import common


def get_config():
    config = common.get_config("v2")
    config.model.name = "s2mlpv2_small"
    config.data.name = "cifar10"
    config.data.download = True
    config.data.train_split = "train"
    config.data.eval_split = "test"
    config.data.shuffle_buffer = 50_000
    config.data.eval_crop_pct = 1.0
    config.augment.ops = "random_resized_crop(0.08)|flip|normalize"
    config.augment.mixup = 0.0
    config.augment.cutmix = 0.0
    config.batch_size = 512
    config.eval_batch_size = 512
    config.base_lr = 1e-4
    config.weight_decay = 0.0
    config.warmup_epochs = 1
    config.total_steps = 10_000
    config.grad_clip_norm = 1.0
    config.ema_decay = 0.0
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 1000
    return config
