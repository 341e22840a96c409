"""main.py's command line: ``--config.model.overrides.FIELD=VALUE`` merges one model field into the config's."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

import main
from configs import overrides
from s2mlp import models
from s2mlp.models.s2mlp import S2MLP
from s2mlp.models.s2mlpv2 import S2MLPv2
from s2mlp.runs import QuietLibraries

ROOT = Path(__file__).resolve().parents[1]


def _parse(*args):
    """main.py's real flag parsing (absl + config_flags + the model overrides), in this process."""
    main.FLAGS.unparse_flags()
    main.parse_flags(["main.py", "--workdir=/nonexistent/unused", *args])
    return main.get_config()


def test_values_are_python_literals_else_strings():
    rest, fields = overrides.split_model_overrides(
        [
            "main.py",
            "--config=configs/demo.py",
            "--config.model.overrides.shift_pattern=eight",
            "--config.model.overrides.hidden_dim=64",
            '--config.model.overrides.shift_patterns=("none","none")',
            "--config.model.overrides.hidden_dims=[16,32]",
            "--config.model.overrides.drop_path_rate=1e-3",
            "--config.model.overrides.num_classes",  # space-separated value
            "7",
            "--config.model.overrides.norm=None",
            "--config.batch_size=8",
        ]
    )
    assert rest == ["main.py", "--config=configs/demo.py", "--config.batch_size=8"]
    assert fields == {
        "shift_pattern": "eight",
        "hidden_dim": 64,
        "shift_patterns": ("none", "none"),
        "hidden_dims": (16, 32),
        "drop_path_rate": 0.001,
        "num_classes": 7,
        "norm": None,
    }


def test_one_field_merges_into_the_configs_own_overrides():
    config = _parse(
        "--config=configs/demo.py", "--config.model.overrides.shift_pattern=eight", "--config.batch_size=32"
    )
    # configs/demo.py sets hidden_dim, num_blocks, mlp_ratio and patch_size: they stay.
    assert config.model.overrides.to_dict() == {
        "hidden_dim": 64,
        "num_blocks": 4,
        "mlp_ratio": 2,
        "patch_size": 4,
        "shift_pattern": "eight",
    }
    assert config.batch_size == 32  # the other --config.* flags still work
    model = models.from_config(config, num_classes=10)
    assert isinstance(model, S2MLP) and (model.shift_pattern, model.hidden_dim, model.num_blocks) == ("eight", 64, 4)


def test_an_existing_field_is_replaced_and_a_whole_dict_merges():
    config = _parse(
        "--config=configs/demo.py",
        "--config.model.overrides.hidden_dim=96",
        '--config.model.overrides={"num_blocks": 2}',
    )
    assert config.model.overrides.to_dict() == {"hidden_dim": 96, "num_blocks": 2, "mlp_ratio": 2, "patch_size": 4}


def test_s2mlpv2_shift_patterns_on_an_empty_overrides():
    config = _parse(
        "--config=configs/tiny.py:s2mlpv2_tiny",
        """--config.model.overrides.shift_patterns=("none","none")""",
        "--config.model.overrides.mlp_ratio=3",
    )
    assert config.model.overrides.to_dict() == {"shift_patterns": ("none", "none"), "mlp_ratio": 3}
    model = models.from_config(config, num_classes=10)
    assert isinstance(model, S2MLPv2) and model.shift_patterns == ("none", "none") and model.mlp_ratio == 3


def _run(workdir, *args):
    cmd = [sys.executable, "main.py", f"--workdir={workdir}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_a_run_trains_the_overridden_model(tmp_path):
    done = _run(
        tmp_path,
        "--config=configs/tiny.py:s2mlpv2_tiny",
        "--config.total_steps=1",
        """--config.model.overrides.shift_patterns=("none","none")""",
        "--config.model.overrides.hidden_dims=(8,16)",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # The start-up line names the fields that differ from the registered model's, so the override shows.
    assert "Training s2mlpv2_tiny (hidden_dims=(8, 16), drop_path_rate=0.1, shift_patterns=('none', 'none'), " in (
        done.stderr
    )
    written = json.loads((tmp_path / "config.json").read_text())["model"]["overrides"]
    assert written == {"shift_patterns": ["none", "none"], "hidden_dims": [8, 16]}
    from s2mlp import checkpoint as ckpt

    assert ckpt.saved_shapes(tmp_path / "checkpoints" / "1")["head/kernel"] == (16, 10)


def test_an_unknown_field_fails_in_one_line_naming_the_valid_fields(tmp_path):
    workdir = tmp_path / "run"
    done = _run(workdir, "--config=configs/tiny.py:s2mlp_tiny", "--config.model.overrides.shift_patern=eight")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("E") and "main.py" in line]
    valid = sorted({f.name for f in dataclasses.fields(S2MLP)} - {"parent", "name"})
    assert "shift_pattern" in valid and "hidden_dim" in valid
    assert len(errors) == 1 and errors[0].endswith(
        "ValueError: config.model: model override(s) ['shift_patern'] are not fields of s2mlp_tiny (S2MLP); "
        f"valid: {valid}."
    ), errors
    assert not workdir.exists()


@pytest.mark.parametrize(
    "arg",
    [
        "--config.model.overrides=eight",
        "--config.model.overrides.hidden_dim",
        "--config.model.overrides.shift.pattern=8",  # a dotted key: no model field
        '--config.model.overrides={"a.b": 1}',
    ],
)
def test_a_malformed_override_flag_fails_before_anything_runs(arg):
    with pytest.raises(SystemExit) as e:
        main.parse_flags(["main.py", "--config=configs/demo.py", "--workdir=/nonexistent/unused", arg])
    assert "FATAL Flags parsing error" in str(e.value) and "config.model.overrides" in str(e.value)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--checkpoint=/a/run"], "--checkpoint and --eval_dir apply to --mode=eval only"),
        (["--eval_dir=/a/evals"], "--checkpoint and --eval_dir apply to --mode=eval only"),
        (["--coordinator_address=h:1", "--num_processes=2"], "--num_processes and --process_id need each other"),
        (["--num_processes=2", "--process_id=0"], "--num_processes and --process_id need each other"),
        (["--multihost", "--coordinator_address=h:1"], "--multihost detects all three instead"),
    ],
)
def test_flags_that_would_be_ignored_or_half_given_fail_before_anything_runs(args, message, capsys):
    with pytest.raises(SystemExit):
        _parse("--config=configs/tiny.py:s2mlp_tiny", *args)
    err = capsys.readouterr().err
    assert "FATAL Flags parsing error" in err and message in err, err
    _parse("--config=configs/tiny.py:s2mlp_tiny", "--multihost")  # alone: fine
    _parse("--config=configs/tiny.py:s2mlp_tiny", "--coordinator_address=h:1")  # the cluster gives the rest
    _parse("--config=configs/tiny.py:s2mlp_tiny", "--coordinator_address=h:1", "--num_processes=2", "--process_id=1")


@pytest.mark.parametrize(
    "spec,message",
    [
        ("configs/demo.py:bogus", "ERROR --config=configs/demo.py:bogus: TypeError: get_config() takes 0 positional"),
        ("configs/fashion_mnist.py:vit", "ERROR --config=configs/fashion_mnist.py:vit: ValueError: model='vit'"),
    ],
)
def test_a_config_file_that_fails_to_load_fails_in_one_line(spec, message):
    """It got absl's 'FATAL Flags parsing error' with config_flags' traceback."""
    with pytest.raises(SystemExit) as e:
        main.parse_flags(["main.py", f"--config={spec}", "--workdir=/nonexistent/unused"])
    assert str(e.value).startswith(message) and "\n" not in str(e.value), e.value


def test_eval_dir_flag():
    _parse("--config=configs/tiny.py:s2mlp_tiny", "--mode=eval", "--eval_dir=/somewhere/evals")
    assert (main.FLAGS.mode, main.FLAGS.eval_dir) == ("eval", "/somewhere/evals")


def test_library_warnings_show_once_and_library_info_not_at_all():
    import logging

    quiet = QuietLibraries(str(ROOT))
    record = lambda path, level, msg: logging.LogRecord("absl", level, path, 7, msg, (), None)  # noqa: E731
    lib = "/usr/lib/python3/site-packages/orbax/checkpoint_manager.py"
    assert [quiet.filter(record(lib, logging.WARNING, "no metrics")) for _ in range(3)] == [True, False, False]
    assert quiet.filter(record(lib, logging.WARNING, "another warning"))
    assert not quiet.filter(record(lib, logging.INFO, "saving"))
    assert [quiet.filter(record(str(ROOT / "train_lib.py"), logging.INFO, "step 1")) for _ in range(2)] == [True, True]


def test_own_info_lines_show_when_the_package_is_installed_in_site_packages():
    import logging

    quiet = QuietLibraries(str(ROOT))
    quiet._package = "/venv/lib/python3.11/site-packages/s2mlp/"  # as after a non-editable `pip install .`
    record = lambda path: logging.LogRecord("absl", logging.INFO, path, 7, "msg", (), None)  # noqa: E731
    assert quiet.filter(record("/venv/lib/python3.11/site-packages/s2mlp/inference.py"))
    assert quiet.filter(record(str(ROOT / "train_lib.py")))
    assert not quiet.filter(record("/venv/lib/python3.11/site-packages/orbax/checkpoint_manager.py"))
    assert not quiet.filter(record(str(ROOT / ".venv/lib/python3.11/site-packages/jax/_src/xla_bridge.py")))


def test_a_misspelled_overrides_group_is_an_unknown_field():
    """It got config_flags' raw KeyError (the overrides' own flags are skipped only for the exact group name)."""
    config = ml_collections.ConfigDict({"model": {"overrides": {}}})
    message = overrides.unknown_field(config, ["--config.model.overridess.hidden_dim=8"])
    assert message.startswith("--config.model.overridess.hidden_dim=8: the config has no field 'model.overridess.")
