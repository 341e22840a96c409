"""Does the weight initialisation matter at small scale? Flax's defaults vs timm's, for Mixer and S²-MLP, × 3 seeds.

    python study.py --study=configs/studies/init_ablation.py --workdir=runs/init_ablation

``model.overrides.weight_init`` is 'flax' (lecun_normal kernels: this codebase's default, and
vision_transformer's for Mixer) or 'timm' (truncated normal, std 0.02: the convention of the timm/DeiT
code the papers trained with); heads start at zero in both (docs/notes/initialisation.md). The models,
recipe and data are mixer_vs_s2mlp's digits setting (the two models match exactly in parameters and
MACs) on a class-balanced 30% of the train split, each seed its own 30% (mixer_vs_s2mlp's
``study.tied``, kept here): 2 models × 2 inits × 3 seeds = 12 runs of 300 steps, about 40-60 s
each on a 2-core CPU (measured 2026-12-06 on an AMD EPYC, 2 cores: 26-84 s a run, 8 min 55 s for the 12).
docs/studies/init_ablation holds that run, each seed its own subset. The data argument is as in
mixer_vs_s2mlp.py, but only ``digits`` is sized here.
"""

from configs.studies import fields, mixer_vs_s2mlp

SEEDS = [0, 1, 2]
INITS = ["flax", "timm"]
FRACTION = 0.3


def get_config(data: str = "digits"):
    study = mixer_vs_s2mlp.get_config(data)
    study.runs = [run for run in study.runs if run["name"] in ("mixer", "s2mlp")]
    study.overrides = fields({**study.overrides.to_dict(), "data.train_fraction": FRACTION})
    study.grid = fields({"model.overrides.weight_init": INITS, "seed": SEEDS})
    study.name_fields = fields({"model.overrides.weight_init": "init"})
    return study
