"""The study runner (study.py) and the report (s2mlp/report.py) on tiny configs.

Grid expansion and validation are pure config work; one end-to-end study (2 shift patterns × 2
seeds of configs/tiny.py) runs through ``python study.py``, is SIGKILLed after the first
checkpoint of a run, resumes, reports, and is skipped on a further call; the report is checked
on hand-written workdirs with known metrics.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections
import pytest

import study
from configs import overrides as overrides_lib
from configs import studies
from configs.studies import fields, init_ablation, mixer_vs_s2mlp, shift_ablation
from s2mlp import report
from tests.conftest import xla_flags

ROOT = Path(__file__).resolve().parents[1]


def _study(base="configs/demo.py", overrides=None, grid=None, runs=None, **extra):
    s = ml_collections.ConfigDict()
    s.base = base
    s.overrides = fields(overrides or {})
    s.grid = fields(grid if grid is not None else {})
    if runs:
        s.runs = [fields(r) for r in runs]
    for k, v in extra.items():
        s[k] = fields(v)
    return s


def test_grid_expands_to_the_product_with_overrides_merged_names_and_commands(tmp_path):
    s = _study(
        overrides={"total_steps": 10},
        grid={"model.overrides.shift_pattern": ["eight", "none"], "seed": [0, 1]},
        name_fields={"model.overrides.shift_pattern": "shift"},
    )
    runs = study.expand(s, "runs/x", check=False)  # configs/demo.py's eval batch of 100 is for 1 device
    assert [r.name for r in runs] == [f"shift={p},seed={s}" for p in ("eight", "none") for s in (0, 1)]
    assert runs[1].overrides == {"total_steps": 10, "model.overrides.shift_pattern": "eight", "seed": 1}
    # Merged into configs/demo.py's own model overrides, which stay.
    assert runs[1].config.model.overrides.to_dict() == {
        "hidden_dim": 64, "num_blocks": 4, "mlp_ratio": 2, "patch_size": 4, "shift_pattern": "eight"
    }  # fmt: skip
    assert (runs[1].config.seed, runs[1].config.total_steps, runs[1].workdir) == (1, 10, "runs/x/shift=eight,seed=1")
    assert runs[1].command == (
        "python main.py --config=configs/demo.py --workdir=runs/x/shift=eight,seed=1 --config.total_steps=10 "
        "--config.model.overrides.shift_pattern=eight --config.seed=1"
    )
    assert not (tmp_path / "runs").exists()


def test_a_run_directory_holding_another_config_is_refused_naming_the_fields(tmp_path):
    s = _study(base="configs/tiny.py:s2mlp_tiny", grid={"seed": [0]})
    (run,) = study.expand(s, str(tmp_path / "w"), check=False)
    Path(run.workdir).mkdir(parents=True)
    saved = json.loads(run.config.to_json_best_effort())
    saved |= {"base_lr": 0.5, "compilation_cache_dir": "/elsewhere"}  # the second is where the machine keeps things
    (Path(run.workdir) / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError) as e:
        study.validate(run)
    assert str(e.value) == (
        f"study run 'run': {run.workdir} holds a run of a different config (fields config.base_lr: 0.5 -> 0.002); "
        "use a new --workdir or remove that run directory."
    )


def test_model_overrides_dicts_of_the_study_and_a_run_merge_and_study_json_keeps_their_values(tmp_path):
    s = _study(overrides={"model.overrides": {"hidden_dim": 16}}, runs=[{"model.overrides": {"num_blocks": 1}}],
               grid={"seed": [0]})  # fmt: skip
    (run,) = study.expand(s, "runs/x", check=False)
    assert run.overrides == {"model.overrides": {"hidden_dim": 16, "num_blocks": 1}, "seed": 0}
    assert run.config.model.overrides.to_dict() == {"hidden_dim": 16, "num_blocks": 1, "mlp_ratio": 2, "patch_size": 4}
    assert "--config.model.overrides.hidden_dim=16 --config.model.overrides.num_blocks=1" in run.command
    study.write_study_json(s, [run], str(tmp_path))
    listing = json.loads((tmp_path / "study.json").read_text())
    assert listing["runs"][0]["overrides"]["model.overrides"] == {"hidden_dim": 16, "num_blocks": 1}


def test_explicit_runs_cross_the_grid_with_labels_and_quoted_tuples():
    s = _study(
        base="configs/tiny.py:s2mlp_tiny",
        runs=[
            {
                "name": "v2",
                "model.name": "s2mlpv2_tiny",
                "image_size": 24,
                "model.overrides": {"hidden_dims": (8, 16), "depths": (1, 1)},
            },
            {"name": "mixer", "model.name": "mixer_tiny", "model.overrides.hidden_dim": 16},
        ],  # fmt: skip
        grid={"data.train_fraction": [1.0, 0.5]},
        name_fields={"data.train_fraction": "fraction"},
    )
    runs = study.expand(s, "w")
    assert [r.name for r in runs] == ["v2,fraction=1.0", "v2,fraction=0.5", "mixer,fraction=1.0", "mixer,fraction=0.5"]
    assert runs[1].config.model.overrides.to_dict() == {"hidden_dims": (8, 16), "depths": (1, 1)}
    assert runs[1].config.data.train_fraction == 0.5 and runs[1].config.image_size == 24
    assert runs[1].command == (
        "python main.py --config=configs/tiny.py:s2mlp_tiny --workdir=w/v2,fraction=0.5 "
        "--config.model.name=s2mlpv2_tiny --config.image_size=24 '--config.model.overrides.depths=(1, 1)' "
        "'--config.model.overrides.hidden_dims=(8, 16)' --config.data.train_fraction=0.5"
    )


def test_shipped_study_configs_expand(tmp_path):
    # The digits studies pass every check here (8 devices); the tfds and ImageNet variants need their data, so
    # only their fields are checked; the fashion_mnist ones are checked on IDX files written here.
    assert len(study.expand(shift_ablation.get_config(), "w")) == 33
    names = [r.name for r in study.expand(mixer_vs_s2mlp.get_config(), "w")]
    assert len(names) == 27 and names[0] == "mixer,fraction=1.0,seed=0" and names[-1] == "s2mlpv2,fraction=0.1,seed=2"
    names = [r.name for r in study.expand(init_ablation.get_config(), "w")]
    assert len(names) == 12 and names[0] == "mixer,init=flax,seed=0" and names[-1] == "s2mlp,init=timm,seed=2"
    for data in ("cifar10", "imagenette", "imagenet"):
        assert len(study.expand(shift_ablation.get_config(data), "w", check=False)) in (11, 33)
        assert len(study.expand(mixer_vs_s2mlp.get_config(data), "w", check=False)) in (9, 27)
    from tests.test_idx import write_dataset

    write_dataset(tmp_path / "fmnist", num_classes=10, sizes={"train": 20, "test": 10})
    for module, count, last in (
        (shift_ablation, 33, "shift=none,seed=2"),
        (mixer_vs_s2mlp, 27, "s2mlpv2,fraction=0.01,seed=2"),
    ):
        s = module.get_config("fashion_mnist")
        s.overrides["data.data_dir"] = str(tmp_path / "fmnist")  # instead of Debian's folder
        runs = study.expand(s, "w")
        assert len(runs) == count and runs[-1].name == last
        assert {(r.config.data.name, r.config.image_size, r.config.batch_size) for r in runs} == {("idx", 28, 128)}


def test_imagenet100_studies_are_table_7_as_the_paper_ran_it():
    # S²-MLP paper §4.2 and Table 7: S²-MLP-wide, the DeiT recipe with repeated augmentation, 300 epochs, 100 classes.
    runs = study.expand(shift_ablation.get_config("imagenet100"), "w", check=False)
    assert len(runs) == 11 and runs[0].name == "shift=ss1" and runs[-1].name == "shift=none"
    for run in runs:
        c = run.config
        assert (c.model.name, c.data.name, c.data.classes, c.data.aug_repeats) == (
            "s2mlp_wide", "imagenet2012", "imagenet100", 3,
        )  # fmt: skip
        assert (c.num_epochs, c.batch_size, c.base_lr, c.warmup_epochs, c.ema_decay) == (300, 1024, 1e-3, 5.0, 0.0)
        assert (c.augment.label_smoothing, c.model.drop_path_rate, c.image_size) == (0.1, 0.1, 224)
        assert " --config.data.classes=imagenet100 " in run.command
    runs = study.expand(mixer_vs_s2mlp.get_config("imagenet100"), "w", check=False)
    assert len(runs) == 27 and {r.config.model.name for r in runs} == {"mixer_b16", "s2mlp_deep", "s2mlpv2_medium"}
    assert {(r.config.data.classes, r.config.data.aug_repeats) for r in runs} == {("imagenet100", 0)}
    assert all(r.config.data.subset_seed == r.config.seed for r in runs)


def test_every_shipped_study_draws_a_train_subset_per_seed():
    # The low-data comparisons vary the data as well as the training: data.subset_seed = seed in every run.
    datas = ("digits", "fashion_mnist", "cifar10", "imagenet")
    for module, data in [(m, d) for m in (shift_ablation, mixer_vs_s2mlp, init_ablation) for d in datas]:
        runs = study.expand(module.get_config(data), "w", check=False)
        assert all(r.config.data.subset_seed == r.config.seed for r in runs), (module.__name__, data)
        assert all(r.command.endswith(f" --config.data.subset_seed={r.config.seed}") for r in runs)
        assert len({r.config.data.subset_seed for r in runs}) == (
            1 if data == "imagenet" and module is shift_ablation else 3
        )


def test_fashion_mnist_studies_keep_its_recipe_and_match_model_sizes():
    from configs import fashion_mnist
    from s2mlp import flops, models

    # The recipe as the studies ran it: the config's, with the two fields it has changed since pinned back.
    recipe = report.flatten(json.loads(fashion_mnist.get_config().to_json_best_effort()))
    assert {k: recipe[k] for k in studies.FASHION_MNIST_AS_RUN} != studies.FASHION_MNIST_AS_RUN
    recipe |= studies.FASHION_MNIST_AS_RUN
    sized = ("total_steps", "num_epochs", "warmup_epochs", "log_every_steps", "eval_every_steps",
             "checkpoint_every_steps", "seed", "data.train_fraction", "data.subset_seed")  # fmt: skip
    for module in (shift_ablation, mixer_vs_s2mlp):
        for run in study.expand(module.get_config("fashion_mnist"), "w", check=False):
            config = report.flatten(json.loads(run.config.to_json_best_effort()))
            differ = {k for k in recipe.keys() | config.keys() if recipe.get(k) != config.get(k)}
            assert {k for k in differ if not k.startswith("model.") and k not in sized} == set(), run.name
    sizes = {}
    for label, (name, overrides) in mixer_vs_s2mlp.MODELS["fashion_mnist"].items():
        model = models.get_model(name, num_classes=10, image_size=28, **overrides)
        params = sum(x.size for x in jax.tree.leaves(models.abstract_params(model, 28)))
        sizes[label] = (params, flops.count_macs(model, 28))
    # As the study's docstring says: Mixer and S²-MLP match in parameters and, within 0.7%, in MACs.
    assert sizes == {"mixer": (116_970, 5_494_752), "s2mlp": (116_986, 5_532_384), "s2mlpv2": (118_180, 5_713_824)}
    overrides = {**fashion_mnist.MODELS["s2mlp"][1], "patch_size": 2, "hidden_dim": 32, "num_blocks": 4}  # ablation's
    assert {k: v for k, v in shift_ablation.FASHION_MNIST.items() if k.startswith("model.overrides.")} == {
        f"model.overrides.{k}": v for k, v in overrides.items() if k != "mlp_ratio"
    }
    model = models.get_model("s2mlp_tiny", num_classes=10, image_size=28, **overrides)
    assert sum(x.size for x in jax.tree.leaves(models.abstract_params(model, 28))) == 26_538
    assert flops.count_macs(model, 28) == 4_892_480


@pytest.mark.parametrize(
    "change, message",
    [
        ({"grid": {"model.name": ["s2mlp_tiny", "nope"]}}, "config.model.name='nope' is unknown"),
        ({"grid": {"model.overrides.shift_patern": ["ss1"]}}, "model override(s) ['shift_patern']"),
        ({"grid": {"model.overrides.shift_pattern": ["diagonal"]}}, "shift_pattern='diagonal' is unknown"),
        ({"grid": {"data.nme": ["digits"]}}, "config.data.nme is not a field"),
        ({"grid": {"optim.lr": [1.0]}}, "config.optim.lr is not a field of the base config (no config.optim)"),
        ({"grid": {}}, "study.grid is empty"),
        ({"grid": {"seed": []}}, "study.grid['seed']=[] must be a non-empty list"),
        ({"grid": {"data.train_fraction": [0.5, 1.5]}}, "config.data.train_fraction=1.5 must be in (0, 1]"),
        ({"grid": {"data.train_fraction": [0.0]}}, "config.data.train_fraction=0.0 must be in (0, 1]"),
        ({"grid": {"seed": [0]}, "base": "configs/nope.py"}, "study.base='configs/nope.py'"),
    ],
)
def test_bad_study_fails_before_anything_is_created(tmp_path, change, message):
    s = _study(base=change.get("base", "configs/tiny.py:s2mlp_tiny"), grid=change["grid"])
    with pytest.raises(ValueError) as e:
        study.run_study(s, str(tmp_path / "w"), compilation_cache="")
    assert message in str(e.value)
    assert not (tmp_path / "w").exists()


def test_a_dry_run_lists_every_run_with_what_its_checks_would_refuse(tmp_path):
    """E.g. a tfds study before its data is prepared: the commands are listed, each with the check's message."""
    s = _study(base="configs/tiny.py:s2mlp_tiny", grid={"data.train_fraction": [0.5, 1.5]})
    lines = []
    runs = study.run_study(s, str(tmp_path / "w"), dry_run=True, out=lines.append)
    assert [r.name for r in runs] == ["train_fraction=0.5", "train_fraction=1.5"]
    assert [line.startswith("  would fail: ") for line in lines] == [False, False, True]  # 2 runs, 1 refusal
    assert "config.data.train_fraction=1.5 must be in (0, 1]" in lines[2] and "train_fraction=1.5" in lines[1]
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--study=configs/studies/nope.py"], "ERROR --study=configs/studies/nope.py: no such file"),
        (
            ["--study=configs/studies/shift_ablation.py", "--study.grdi.seed=(0,)"],
            "ERROR --study.grdi.seed=(0,): the config has no field 'grdi.seed'",
        ),
        (  # it got ERROR "'data'": ml_collections cannot set a study's dotted keys
            ["--study=configs/studies/shift_ablation.py", "--study.overrides.data.train_fraction=0.5"],
            "ERROR --study.overrides.data.train_fraction=0.5: the study's dotted keys cannot be set from the command "
            "line; give a config field for every run as --config.data.train_fraction=VALUE",
        ),
        (
            ["--study=configs/studies/shift_ablation.py", "--study.grid.model.overrides.shift_pattern=('ss1',)"],
            "the study's dotted keys cannot be set from the command line; edit the study file's grid (--only chooses",
        ),
        (  # it got absl's FATAL line with config_flags' traceback
            ["--study=configs/studies/shift_ablation.py:bogus"],
            "ERROR --study=configs/studies/shift_ablation.py:bogus: ValueError: data='bogus' is unknown",
        ),
        (
            ["--study=configs/studies/shift_ablation.py", "--config.seed=3"],
            "--config.seed=3: study.grid['seed'] sets config.seed for each run; choose runs with --only",
        ),
        (
            ["--study=configs/studies/shift_ablation.py", "--config.model.overrides.shift_pattern=ss1"],
            "--config.model.overrides.shift_pattern=ss1: study.grid['model.overrides.shift_pattern'] sets",
        ),
        (
            ["--study=configs/studies/shift_ablation.py", "--config.data.nope=1"],
            "--config.data.nope=1: the config has no field 'data.nope'; did you mean data.name,",
        ),
    ],
)
def test_a_missing_study_file_or_field_fails_in_one_line(tmp_path, flags, message):
    cmd = [sys.executable, "study.py", *flags, f"--workdir={tmp_path / 'w'}", "--dry_run"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "w").exists()


def test_config_flags_of_study_py_set_every_runs_config_and_command(tmp_path):
    """main.py's --config.FIELD=VALUE flags, as the study configs' docstrings give them (e.g. data_dir); before,
    a model override was dropped without a word and any other field was an unknown flag."""
    flags = ["--config.data.train_fraction=0.5", "--config.model.overrides.hidden_dim=24", "--config.data.data_dir=7"]
    cmd = [sys.executable, "study.py", "--study=configs/studies/shift_ablation.py", f"--workdir={tmp_path / 'w'}"]
    done = subprocess.run([*cmd, "--dry_run", "--only=shift=ss1,*", *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    commands = [line for line in done.stdout.splitlines() if line.startswith("  python main.py")]
    assert done.returncode == 0 and len(commands) == 3, done.stderr[-2000:]
    for line in commands:  # the study's own overrides stay, the command line's win
        assert "--config.data.train_fraction=0.5 " in line and "--config.model.overrides.hidden_dim=24 " in line
        assert "--config.model.overrides.patch_size=2 " in line and " --config.data.data_dir=7 " in line, line
    assert "--config.data.train_fraction=0.2 " not in commands[0] and not (tmp_path / "w").exists()

    args = ["--config.data.data_dir=7", "--config.data.train_fraction", "0.5"]
    given = {"args": args, "model.overrides": {"hidden_dim": 24}}
    runs = study.expand(shift_ablation.get_config(), str(tmp_path / "w"), check=False, command_line=given)
    config = runs[0].config
    assert config.data.data_dir == "7" and config.data.train_fraction == 0.5  # typed as the fields are
    assert " --config.data.data_dir=7 " in runs[0].command  # a str field takes no quotes: main.py keeps them
    import main  # the printed command gives main.py this run's config (with quotes, data_dir was "'7'")

    main.FLAGS.unparse_flags()
    main.parse_flags(shlex.split(runs[0].command)[1:])
    assert main.get_config().to_json_best_effort(sort_keys=True) == config.to_json_best_effort(sort_keys=True)
    assert config.model.overrides.hidden_dim == 24 and config.model.overrides.patch_size == 2
    assert [r.config.model.overrides.shift_pattern for r in runs[::3]] == list(shift_ablation.PATTERNS)


def test_config_flags_of_study_py_are_parsed_as_main_py_parses_them(tmp_path):
    """Booleans ('true', or a bare flag that must not take the next argument as its value), tuples (repeated
    flags), and a model field over a study's own dotted ``model.overrides.FIELD`` key (imagenette's patch_size)."""
    rest, args = overrides_lib.split_config_args(
        ["--config.fsdp", "--only=x", "--config.data.download=true", "--config.profile_steps=1",
         "--config.profile_steps=2", "--config.evals=real", "--config.seed", "-3"]
    )  # fmt: skip
    assert rest == ["--only=x"] and args[-2:] == ["--config.seed", "-3"]
    parsed = overrides_lib.parse_config_args(study.load_config_file("configs/demo.py"), args)
    assert parsed == {"fsdp": True, "data.download": True, "profile_steps": (1, 2), "evals": ("real",), "seed": -3}
    with pytest.raises(ValueError, match=r"^--config.fsdp=maybe: .*Non-boolean argument"):
        overrides_lib.parse_config_args(study.load_config_file("configs/demo.py"), ["--config.fsdp=maybe"])
    imagenette = shift_ablation.get_config("imagenette")
    assert imagenette.overrides["model.overrides.patch_size"] == 8  # the study's dotted key, after its dict
    runs = study.expand(
        imagenette, str(tmp_path / "w"), check=False, command_line={"model.overrides": {"patch_size": 4}}
    )
    assert {r.config.model.overrides.patch_size for r in runs} == {4}
    assert all(r.command.count("--config.model.overrides.patch_size=") == 1 for r in runs)
    axis = {"model.overrides": [{"hidden_dim": 24}, {"hidden_dim": 48}]}  # a grid of whole dicts: it won silently
    whole, given = _study(base="configs/tiny.py:s2mlp_tiny", grid=axis), {"model.overrides": {"hidden_dim": 32}}
    with pytest.raises(ValueError, match=r"^--config.model.overrides.hidden_dim=32: study.grid\['model.overrides'\]"):
        study.expand(whole, str(tmp_path / "w2"), check=False, command_line=given)


def test_a_rerun_may_point_data_dir_elsewhere_but_not_change_the_run(tmp_path):
    """The studies' docstrings give --config.data.data_dir: data that moved (or the flag added to a study started
    without it) refused every run as 'a run of a different config'."""
    s = _study(base="configs/tiny.py:s2mlp_tiny", grid={"seed": [0]})
    run = study.expand(s, str(tmp_path / "w"))[0]
    Path(run.workdir).mkdir(parents=True)
    (Path(run.workdir) / "config.json").write_text(run.config.to_json_best_effort())
    moved = study.expand(s, str(tmp_path / "w"), command_line={"args": ["--config.data.data_dir=/elsewhere"]})
    assert moved[0].config.data.data_dir == "/elsewhere"
    with pytest.raises(ValueError, match="holds a run of a different config \\(fields config.base_lr: "):
        study.expand(s, str(tmp_path / "w"), command_line={"args": ["--config.base_lr=0.5"]})


def test_tied_field_copies_its_axis_in_each_run_and_command(tmp_path):
    s = _study(
        base="configs/tiny.py:s2mlp_tiny",
        grid={"data.train_fraction": [1.0, 0.5], "seed": [3, 4]},
        name_fields={"data.train_fraction": "fraction"},
        tied={"data.subset_seed": "seed"},
    )
    lines = []
    runs = study.run_study(s, str(tmp_path / "w"), dry_run=True, out=lines.append)
    assert [r.name for r in runs] == [f"fraction={f},seed={k}" for f in (1.0, 0.5) for k in (3, 4)]  # names as before
    assert [r.config.data.subset_seed for r in runs] == [3, 4, 3, 4]
    assert runs[3].overrides == {"data.train_fraction": 0.5, "seed": 4, "data.subset_seed": 4}
    assert lines[3] == (
        f"run 4 of 4: fraction=0.5,seed=4\n  python main.py --config=configs/tiny.py:s2mlp_tiny "
        f"--workdir={tmp_path / 'w'}/fraction=0.5,seed=4 --config.data.train_fraction=0.5 --config.seed=4 "
        "--config.data.subset_seed=4"
    )
    assert not (tmp_path / "w").exists()
    study.write_study_json(s, runs, str(tmp_path / "w"))
    listing = json.loads((tmp_path / "w" / "study.json").read_text())
    assert listing["tied"] == {"data.subset_seed": "seed"} and listing["runs"][1]["overrides"]["data.subset_seed"] == 4


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tied": {"data.subset_seed": "sed"}},
         "study.tied['data.subset_seed']='sed' must name an axis of study.grid, one of ['data.train_fraction', "
         "'seed']."),
        ({"tied": {"data.subset_seed": "seed"}, "overrides": {"data.subset_seed": 1}},
         "study.tied['data.subset_seed']: config.data.subset_seed is also set by study.overrides; a tied field takes "
         "its value from study.grid['seed'] only, so set it in one place."),
        ({"tied": {"seed": "data.train_fraction"}},
         "study.tied['seed']: config.seed is also set by study.grid; a tied field takes its value from "
         "study.grid['data.train_fraction'] only, so set it in one place."),
        ({"tied": {"data.subset_seed": "seed"}, "runs": [{"name": "a", "data.subset_seed": 2}]},
         "study.tied['data.subset_seed']: config.data.subset_seed is also set by study.runs;"),
        ({"tied": {"data.subset_sed": "seed"}},
         "study.tied['data.subset_sed']: config.data.subset_sed is not a field of the base config; valid fields here:"),
    ],
)  # fmt: skip
def test_bad_tied_field_is_refused_in_one_line(tmp_path, change, message):
    s = _study(
        base="configs/tiny.py:s2mlp_tiny",
        overrides=change.get("overrides"),
        grid={"data.train_fraction": [1.0, 0.5], "seed": [0, 1]},
        runs=change.get("runs"),
        tied=change["tied"],
    )
    with pytest.raises(ValueError) as e:
        study.run_study(s, str(tmp_path / "w"), compilation_cache="")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert not (tmp_path / "w").exists()


def _shift_study():
    return _study(
        base="configs/tiny.py:s2mlp_tiny",
        grid={"model.overrides.shift_pattern": ["ss1", "eight", "none"], "seed": [0, 1]},
        name_fields={"model.overrides.shift_pattern": "shift"},
    )


def test_only_takes_several_globs(tmp_path):
    lines = []
    only = ["shift=ss1,*", "shift=none,seed=1"]
    runs = study.run_study(_shift_study(), str(tmp_path / "w"), only=only, dry_run=True, out=lines.append)
    assert [r.name for r in runs] == ["shift=ss1,seed=0", "shift=ss1,seed=1", "shift=none,seed=1"]
    assert [line.splitlines()[0] for line in lines] == [f"run {k} of 3: {r.name}" for k, r in enumerate(runs, 1)]
    assert not (tmp_path / "w").exists()


def test_only_matching_nothing_names_the_runs(tmp_path):
    with pytest.raises(ValueError) as e:
        study.run_study(_shift_study(), str(tmp_path / "w"), only=["shift_pattern=ss1,*", "x"], dry_run=True)
    assert str(e.value) == (
        "--only='shift_pattern=ss1,*' --only='x' matches no run of this study; its 6 runs are named "
        "shift=ss1,seed=0, shift=ss1,seed=1, shift=eight,seed=0, shift=eight,seed=1, shift=none,seed=0, ..."
    )


STUDY_FILE = """
from ml_collections import ConfigDict

from configs.studies import fields


def get_config(arg=""):
    s = ConfigDict()
    s.base = "configs/tiny.py:s2mlp_tiny"
    s.overrides = fields({"total_steps": 24, "checkpoint_every_steps": 4, "eval_every_steps": 12})
    s.grid = fields({"model.overrides.shift_pattern": ["ss1", "none"], "seed": [0, 1]})
    return s
"""
NAMES = [f"shift_pattern={p},seed={s}" for p in ("ss1", "none") for s in (0, 1)]


def _runner(study_file, workdir, **popen):
    cmd = [sys.executable, "study.py", f"--study={study_file}", f"--workdir={workdir}"]
    env = {**os.environ, "XLA_FLAGS": xla_flags(2)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, **popen)


def test_study_runs_survives_sigkill_resumes_reports_and_skips_finished_runs(tmp_path):
    study_file = tmp_path / "study_tiny.py"
    study_file.write_text(STUDY_FILE)
    workdir = tmp_path / "w"
    # Killed once the second run has saved its first checkpoint.
    proc = _runner(study_file, workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = workdir / NAMES[1] / "checkpoints"
    deadline = time.time() + 240
    while not (ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())):
        assert proc.poll() is None and time.time() < deadline, "the runner ended before the second run checkpointed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((workdir / "study.json").read_text())["runs"][1]["name"] == NAMES[1]
    assert (workdir / NAMES[0] / "result.json").is_file() and not (workdir / NAMES[1] / "result.json").exists()

    proc = _runner(study_file, workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert f"run 1 of 4: {NAMES[0]}: done, skipped" in out
    assert f"run 2 of 4: {NAMES[1]} (resuming from step" in out
    results = [json.loads((workdir / n / "result.json").read_text()) for n in NAMES]
    assert results[1]["resumed_from_step"] >= 4 and results[2]["resumed_from_step"] is None
    assert all(r["wall_s"] > 0 and r["metrics"]["eval_num_examples"] == 300 for r in results)
    # The resumed run logged every step once it finished (the last row of a repeated step counts).
    assert sorted(report.read_metrics(workdir / NAMES[1] / "metrics.jsonl")) == list(range(2, 25, 2))
    table = (workdir / "report.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| shift_pattern=ss1 |", "| shift_pattern=none |"))]
    assert len(rows) == 2 and all("(2)" in r and "| 24/24 |" in r for r in rows), table
    # ss1 and none have the same MACs: final top-1 per configuration instead of against MACs.
    assert (workdir / "top1_vs_step.png").stat().st_size > 0 and (workdir / "top1_by_config.png").stat().st_size > 0
    assert not (workdir / "top1_vs_gmacs.png").exists()

    # A further call trains nothing.
    before = {n: (workdir / n / "metrics.jsonl").read_bytes() for n in NAMES}
    lines = []
    spec = study.load_config_file(str(study_file))
    study.run_study(spec, str(workdir), compilation_cache="", report=False, out=lines.append)
    assert lines == [f"run {k} of 4: {n}: done, skipped" for k, n in enumerate(NAMES, 1)]
    assert {n: (workdir / n / "metrics.jsonl").read_bytes() for n in NAMES} == before


def test_a_run_that_fails_a_check_ends_the_study_with_one_line(tmp_path):
    """A run's checked failure (here its workdir held by another trainer) ends the runner as main.py ends: the
    error's one line, status 1, no traceback."""
    import fcntl

    study_file = tmp_path / "study_tiny.py"
    study_file.write_text(STUDY_FILE)
    (tmp_path / "w" / NAMES[0]).mkdir(parents=True)
    with open(tmp_path / "w" / NAMES[0] / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = _runner(study_file, tmp_path / "w", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out
    assert f"WorkdirBusy: --workdir={tmp_path / 'w' / NAMES[0]} is in use by another trainer" in out
    assert "Traceback" not in out and not (tmp_path / "w" / NAMES[1]).exists()


def _workdir(path: Path, seed: int, pattern: str, top1: list[float], *, ema=False, result=None, fields=None,
             **overrides):  # fmt: skip
    path.mkdir(parents=True)
    config = {"model": {"name": "s2mlp_tiny", "overrides": {"shift_pattern": pattern, **overrides}}, "seed": seed,
              "image_size": 16, "data": {"name": "digits"}, "total_steps": 20, **(fields or {})}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    key = "eval_ema_top1" if ema else "eval_top1"
    rows = [{"step": 5 * (i + 1), "loss": 1.0, "images_per_s": 100.0 * (i + 1)} for i in range(len(top1))]
    rows += [{"step": 5 * (i + 1), key: t} for i, t in enumerate(top1)]
    rows.insert(1, {"step": 5, key: 0.0})  # a step logged again after a resume: the later row wins
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if result:
        (path / "result.json").write_text(json.dumps(result))


def test_report_on_handwritten_workdirs(tmp_path, capsys):
    _workdir(tmp_path / "a0", 0, "ss1", [0.5, 0.7, 0.6], result={"wall_s": 60})
    _workdir(tmp_path / "a1", 1, "ss1", [0.4, 0.8, 0.8], result={"wall_s": 120})
    _workdir(tmp_path / "b0", 0, "none", [0.3, 0.3, 0.2, 0.25])
    (tmp_path / "c0").mkdir()
    (tmp_path / "c0" / "config.json").write_text(
        json.dumps({"model": {"name": "s2mlp_tiny", "overrides": {"shift_pattern": "up"}}, "seed": 0,
                    "image_size": 16, "data": {"name": "digits"}, "total_steps": 20})
    )  # fmt: skip
    out = tmp_path / "out"
    paths = [str(tmp_path / n) for n in ("a0", "a1", "b0", "c0")]
    assert report.main([*paths, f"--out={out}"]) == 0
    lines = (out / "report.md").read_text().splitlines()
    # final: mean(0.6, 0.8) = 70.00, sample std = 0.1414 -> 14.14, min-max 60-80; best: 70 and 80 -> 75.00 ± 7.07.
    # MACs of s2mlp_tiny at 16×16 (16 tokens, c=32, r=2, 2 blocks, 10 classes): 16·48·32 + 2·16·(2·32² + 2·2·32²)
    # + 32·10 = 221,504 (0.222 MMACs); median of 100, 200, 300 img/s (twice) = 200; wall mean(60, 120) s. Workdirs not
    # named by the study runner are labelled by the fields that vary.
    row = (
        "| shift_pattern=ss1 | s2mlp_tiny | 70.00 ± 14.14 [60.00–80.00] (2) | 75.00 ± 7.07 [70.00–80.00] (2) | 14,826 "
        "| 0.222 | 200 | 15/20 |"
    )
    assert row + " 0:01:30 |" in lines
    assert "| shift_pattern=none | s2mlp_tiny | 25.00 (1) | 30.00 (1) | 14,826 | 0.222 | 250 | 20/20 | — |" in lines
    assert "| shift_pattern=up | s2mlp_tiny | no metrics yet | — | — | — | — | — | — |" in lines
    assert "| configuration | model | final top-1 % (n) | best top-1 % (n) | params | MMACs |" in lines[2]
    assert "`eval_top1`" in "\n".join(lines) and "finished runs: 0:03:00; 1 run(s) not finished" in "\n".join(lines)
    assert "| shift_pattern=ss1 | s2mlp_tiny | 70.00 ± 14.14 [60.00–80.00] (2)" in capsys.readouterr().out
    # The title names the workdirs; every configuration has the same MACs: top-1 per configuration, not vs MACs.
    assert lines[0] == "# Study report: a0, a1, b0, c0"
    assert lines[-2:] == ["![top-1 vs step](top1_vs_step.png)", "![top-1 per config](top1_by_config.png)"]
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "top1_by_config.png", "top1_vs_step.png"]
    for png in ("top1_vs_step.png", "top1_by_config.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_report_of_workdirs_pools_a_subset_seed_that_follows_the_seed(tmp_path):
    """Without a study.json each seed's own subset made a row of its own (n = 1, labels alike)."""

    def data(seed):
        return {"data": {"name": "digits", "subset_seed": seed, "train_fraction": 0.1}}

    for seed, top1 in enumerate((0.9, 0.93, 0.96)):
        _workdir(tmp_path / f"r{seed}", seed, "ss1", [top1], fields=data(seed))
    _workdir(tmp_path / "other", 0, "none", [0.5], fields=data(0))
    assert report.main([str(tmp_path / n) for n in ("r0", "r1", "r2", "other")] + [f"--out={tmp_path / 'o'}"]) == 0
    text = (tmp_path / "o" / "report.md").read_text()
    lines = text.splitlines()
    assert lines[4].startswith("| shift_pattern=ss1 | s2mlp_tiny | 93.00 ± 3.00 [90.00–96.00] (3) |"), lines
    assert lines[5].startswith("| shift_pattern=none | s2mlp_tiny | 50.00 (1) |") and lines[6] == ""
    assert "Each seed also sets data.subset_seed (equal to the seed in every run), so the spread covers both." in text
    _workdir(tmp_path / "r3", 3, "ss1", [0.9], fields={"data": {**data(3)["data"], "subset_seed": 7}})  # not tied
    assert report.main([str(tmp_path / n) for n in ("r0", "r1", "r3")] + [f"--out={tmp_path / 'o2'}"]) == 0
    assert "subset_seed=7" in (tmp_path / "o2" / "report.md").read_text()
    assert report.main([str(tmp_path / "r0"), f"--out={tmp_path / 'o3'}"]) == 0  # one run: nothing to pool
    assert "Each seed also sets" not in (tmp_path / "o3" / "report.md").read_text()


def test_report_final_top1_takes_the_finished_runs_of_a_row_when_it_has_some(tmp_path):
    """A run stopped at step 10 of 20 was averaged into the row's final top-1 with runs that reached step 20."""
    _workdir(tmp_path / "a0", 0, "ss1", [0.5, 0.7, 0.6, 0.6])
    _workdir(tmp_path / "a1", 1, "ss1", [0.4, 0.8, 0.7, 0.8])
    _workdir(tmp_path / "a2", 2, "ss1", [0.1, 0.2])  # stopped at step 10
    assert report.main([str(tmp_path / n) for n in ("a0", "a1", "a2")] + [f"--out={tmp_path / 'out'}"]) == 0
    lines = (tmp_path / "out" / "report.md").read_text().splitlines()
    # final: mean(0.6, 0.8) of the two finished runs; best over all three: mean(0.7, 0.8, 0.2) = 56.67 ± 32.15
    assert (
        "| all | s2mlp_tiny | 70.00 ± 14.14 [60.00–80.00] (2) | 56.67 ± 32.15 [20.00–80.00] (3) | 14,826 | 0.222 | 200 "
        "| 10-20/20 |"
    ) in lines[4]


def test_report_leaves_resumed_runs_out_of_the_wall_time_per_run_and_names_them(tmp_path):
    _workdir(tmp_path / "a0", 0, "ss1", [0.5, 0.7], result={"wall_s": 60, "resumed_from_step": None})
    _workdir(tmp_path / "a1", 1, "ss1", [0.4, 0.8], result={"wall_s": 10, "resumed_from_step": 12})
    _workdir(tmp_path / "b0", 0, "none", [0.3, 0.3], result={"wall_s": 30, "resumed_from_step": 5})
    assert report.main([str(tmp_path / n) for n in ("a0", "a1", "b0")] + [f"--out={tmp_path / 'out'}"]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    # a1's 10 s is its last attempt only: ss1's wall per run is a0's alone; b0 has no run timed whole.
    assert "| shift_pattern=ss1 | s2mlp_tiny | 75.00 ± 7.07 [70.00–80.00] (2) |" in text
    assert "| 10/20 | 0:01:00 |" in text
    assert "| shift_pattern=none | s2mlp_tiny | 30.00 (1) | 30.00 (1) | 14,826 | 0.222 | 150 | 10/20 | — |" in text
    assert "Total wall time of the finished runs: 0:01:40." in text
    assert "2 run(s) resumed from a checkpoint (a1, b0): their wall time counts the last attempt only" in text


def test_report_of_runs_counted_in_epochs_takes_a_finished_runs_last_step_as_its_total(tmp_path):
    # total_steps=0 with num_epochs: the config does not give the step count, a finished run (result.json) does.
    epochs = {"total_steps": 0, "num_epochs": 2}
    _workdir(tmp_path / "a0", 0, "ss1", [0.5, 0.7], result={"wall_s": 60}, fields=epochs)
    _workdir(tmp_path / "b0", 0, "none", [0.3], fields=epochs)  # still training: no total known
    assert report.main([str(tmp_path / "a0"), str(tmp_path / "b0"), f"--out={tmp_path / 'out'}"]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| 150 | 10/10 | 0:01:00 |" in text and "| 100 | 5/? | — |" in text
    assert "image_size=16, num_epochs=2" in text and "total_steps" not in text


def test_report_on_a_partly_run_study_lists_the_runs_not_started_on_one_line(tmp_path):
    s = tmp_path / "s"
    names = [f"shift={p},seed={k}" for p in ("ss1", "none", "up") for k in (0, 1)]
    s.mkdir()
    (s / "study.json").write_text(json.dumps({"base": "configs/tiny.py", "runs": [{"name": n} for n in names]}))
    _workdir(s / names[0], 0, "ss1", [0.5, 0.7])
    _workdir(s / names[1], 1, "ss1", [0.6, 0.9])
    (s / names[2]).mkdir()  # started: its config is written, no metrics yet
    (s / names[2] / "config.json").write_text((s / names[0] / "config.json").read_text().replace("ss1", "none"))
    (s / names[4] / "checkpoints").mkdir(parents=True)  # started, no config yet
    assert report.main([str(s)]) == 0
    text = (s / "report.md").read_text()
    lines = text.splitlines()
    assert lines[0] == "# Study report: s"
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| configuration")]
    assert rows == [
        "| shift=ss1 | s2mlp_tiny | 80.00 ± 14.14 [70.00–90.00] (2) | 80.00 ± 14.14 [70.00–90.00] (2) | 14,826 | 0.222 "
        "| 150 | 10/20 | — |",
        "| shift=none | s2mlp_tiny | no metrics yet | — | — | — | — | — | — |",
        "| shift=up | — | no metrics yet | — | — | — | — | — | — |",
    ]
    assert "Not started (2): shift=none,seed=1, shift=up,seed=1" in lines
    assert "3 configurations, 4 runs." in text
    assert (s / "top1_by_config.png").is_file() and not (s / "top1_vs_gmacs.png").exists()


def test_report_plots_top1_against_macs_only_where_configurations_differ_in_macs(tmp_path):
    _workdir(tmp_path / "s" / "x", 0, "ss1", [0.5, 0.9])
    _workdir(tmp_path / "s" / "y", 0, "none", [0.5, 0.7])
    assert report.main([str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "top1_by_config.png").is_file() and not (tmp_path / "s" / "top1_vs_gmacs.png").exists()
    config = json.loads((tmp_path / "s" / "y" / "config.json").read_text())
    config["model"]["overrides"]["hidden_dim"] = 16
    (tmp_path / "s" / "y" / "config.json").write_text(json.dumps(config))
    assert report.main([str(tmp_path / "s")]) == 0
    # c=16: 16·48·16 + 2·16·(2·16² + 2·2·16²) + 16·10 = 61,600 MACs (s2mlp_tiny's c=32 at 0.222 MMACs).
    text = (tmp_path / "s" / "report.md").read_text()
    assert "![top-1 vs MACs](top1_vs_gmacs.png)" in text and "| 0.222 |" in text and "| 0.0616 |" in text
    # The figure of the earlier report is gone.
    assert (tmp_path / "s" / "top1_vs_gmacs.png").is_file() and not (tmp_path / "s" / "top1_by_config.png").exists()


def test_report_out_refuses_another_studys_report_unless_forced(tmp_path, capsys):
    _workdir(tmp_path / "a", 0, "ss1", [0.5])
    _workdir(tmp_path / "b", 0, "none", [0.3])
    out = tmp_path / "out"
    assert report.main([str(tmp_path / "a"), f"--out={out}"]) == 0
    assert report.main([str(tmp_path / "a"), f"--out={out}"]) == 0  # the same study's report: overwritten
    capsys.readouterr()
    assert report.main([str(tmp_path / "b"), f"--out={out}"]) == 2
    assert capsys.readouterr().err == (
        f"error: --out={out} holds the report of 'a', not of 'b'; choose another --out, or pass --force to "
        "overwrite it.\n"
    )
    assert (out / "report.md").read_text().startswith("# Study report: a\n")
    assert report.main([str(tmp_path / "b"), f"--out={out}", "--force"]) == 0
    assert (out / "report.md").read_text().startswith("# Study report: b\n")
    (out / "report.md").write_text("# Study report\n")  # a report.md from before reports named their study
    assert report.main([str(tmp_path / "b"), f"--out={out}"]) == 2
    assert "holds a report.md that names no study, not of 'b'" in capsys.readouterr().err


def test_report_pools_the_fields_a_study_ties_to_the_seed(tmp_path):
    s = tmp_path / "s"
    names = [f"fraction=0.1,seed={k}" for k in (0, 1)]
    for k, name in enumerate(names):
        _workdir(s / name, k, "ss1", [0.5, 0.6 + 0.2 * k])
        config = json.loads((s / name / "config.json").read_text())
        config["data"] |= {"train_fraction": 0.1, "subset_seed": k}
        (s / name / "config.json").write_text(json.dumps(config))
    listing = {"base": "configs/tiny.py", "runs": [{"name": n} for n in names]}
    (s / "study.json").write_text(json.dumps(listing))
    assert report.main([str(s)]) == 0  # without `tied`, two subsets are two configurations
    assert "2 configurations, 2 runs." in (s / "report.md").read_text()
    (s / "study.json").write_text(json.dumps({**listing, "tied": {"data.subset_seed": "seed"}}))
    assert report.main([str(s)]) == 0
    text = (s / "report.md").read_text()
    assert "| fraction=0.1 | s2mlp_tiny | 70.00 ± 14.14 [60.00–80.00] (2) |" in text
    assert "1 configurations, 2 runs." in text
    assert "Each seed also sets data.subset_seed (tied to the seed by the study), so the spread covers both." in text


def test_report_uses_the_ema_metric_and_a_study_dir(tmp_path):
    _workdir(tmp_path / "s" / "x", 0, "ss1", [0.5, 0.9], ema=True)
    _workdir(tmp_path / "s" / "y", 1, "ss1", [0.5, 0.7], ema=True)
    assert report.main([str(tmp_path / "s")]) == 0
    text = (tmp_path / "s" / "report.md").read_text()
    assert "| all | s2mlp_tiny | 80.00 ± 14.14 [70.00–90.00] (2) |" in text and "`eval_ema_top1`" in text


def test_report_reads_eval_top1_of_a_run_without_an_ema_beside_runs_with_one(tmp_path):
    _workdir(tmp_path / "s" / "x", 0, "ss1", [0.5, 0.9], ema=True)
    _workdir(tmp_path / "s" / "y", 0, "none", [0.5, 0.7])  # no EMA: eval_top1 only
    assert report.main([str(tmp_path / "s")]) == 0
    text = (tmp_path / "s" / "report.md").read_text()
    assert "| shift_pattern=ss1 | s2mlp_tiny | 90.00 (1) |" in text
    assert "| shift_pattern=none | s2mlp_tiny | 70.00 (1) |" in text
    assert "Top-1 is `eval_ema_top1` (`eval_top1` for a run without an EMA)" in text


def test_report_pools_seeds_whose_configs_differ_only_where_the_machine_runs(tmp_path):
    """compilation_cache_dir and profile_steps may differ between the sittings of a study: one configuration."""
    _workdir(tmp_path / "s" / "a", 0, "ss1", [0.5, 0.6], fields={"compilation_cache_dir": "~/.cache/x"})
    _workdir(tmp_path / "s" / "b", 1, "ss1", [0.5, 0.8], fields={"compilation_cache_dir": "/scratch/y"})
    assert report.main([str(tmp_path / "s")]) == 0
    text = (tmp_path / "s" / "report.md").read_text()
    assert "1 configurations, 2 runs." in text and "| all | s2mlp_tiny | 70.00 ± 14.14 [60.00–80.00] (2) |" in text


def test_report_names_a_path_that_is_not_a_workdir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    assert f"{tmp_path / 'empty'} is neither a training workdir" in capsys.readouterr().err
    assert not (tmp_path / "empty" / "report.md").exists()
