"""Workdirs as users type them (relative, ``~``, a trailing ``/``, through a symlink), from a working directory
that is not the checkout: train, resume, eval-only, fine-tune, report and predict; and the one-line errors of a
misspelled config field or a missing config file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests.test_training import ocp_steps

ROOT = Path(__file__).resolve().parents[1]
TINY = f"--config={ROOT}/configs/tiny.py:s2mlp_tiny"


def _run(cwd: Path, *args, home: Path | None = None, module: str | None = None):
    program = ["-m", module] if module else [str(ROOT / "main.py")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **({"HOME": str(home)} if home else {})}
    done = subprocess.run([sys.executable, *program, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_relative_workdir_from_another_directory_trains_resumes_evaluates_reports_and_predicts(tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    done = _run(cwd, TINY, "--workdir=runs/tiny/", "--config.total_steps=3")
    workdir = cwd / "runs" / "tiny"
    assert f"Workdir: {workdir}\n" in done.stderr
    assert ocp_steps(workdir) == [3]
    done = _run(cwd, TINY, "--workdir=runs/tiny", "--config.total_steps=6")  # resumes at 3
    assert f"Resumed from {workdir / 'checkpoints'} at step 3." in done.stderr and ocp_steps(workdir) == [3, 6]
    _run(cwd, TINY, "--workdir=runs/tiny", "--mode=eval", "--eval_dir=evals")
    assert json.loads((cwd / "evals" / "test_step6" / "metrics.json").read_text())["step"] == 6
    _run(cwd, TINY, "--workdir=runs/tiny", "--mode=eval", "--checkpoint=runs/tiny/checkpoints/3/", "--eval_dir=e3")
    assert json.loads((cwd / "e3" / "test_step3" / "metrics.json").read_text())["checkpoint"] == str(
        workdir / "checkpoints" / "3"
    )
    _run(cwd, TINY, "--workdir=runs/ft", "--config.total_steps=1", "--config.init_from=runs/tiny")
    assert ocp_steps(cwd / "runs" / "ft") == [1]
    _run(cwd, "runs/tiny", "--out=report", module="s2mlp.report")
    assert (cwd / "report" / "report.md").read_text().startswith("# Study report: tiny\n")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(cwd / "zero.png")
    done = _run(cwd, "--checkpoint=runs/tiny", "zero.png", module="s2mlp.predict")
    assert done.stdout.startswith("zero.png\n  1. ")
    assert f"note: {workdir / 'checkpoints'} step 6, EMA parameters." in done.stderr


def test_home_and_symlinked_workdirs(tmp_path, monkeypatch):
    home, real = tmp_path / "home", tmp_path / "real"
    home.mkdir(), real.mkdir()
    (home / "link").symlink_to(real)
    done = _run(tmp_path, TINY, "--workdir=~/link/run/", "--config.total_steps=2", home=home)
    assert f"Workdir: {home / 'link' / 'run'}\n" in done.stderr  # '~' expanded by the trainer, the link kept
    assert ocp_steps(real / "run") == [2]
    from s2mlp import inference

    monkeypatch.setenv("HOME", str(home))
    assert inference.load("~/link/run/").step == 2


def test_a_study_with_a_relative_workdir_runs_where_the_user_is(tmp_path, monkeypatch):
    import study
    from tests.test_study import _study

    monkeypatch.chdir(tmp_path)
    tiny = _study(base=f"{ROOT}/configs/tiny.py", overrides={"total_steps": 2}, grid={"seed": [0]})
    runs = study.run_study(tiny, "runs/st/", report=False, out=lambda *a: None)
    workdir = tmp_path / "runs" / "st" / runs[0].name
    assert runs[0].workdir == str(workdir) and f"--workdir={workdir}" in runs[0].command
    assert ocp_steps(workdir) == [2]


def test_a_misspelled_config_field_is_one_line_naming_the_nearest_and_creates_nothing(tmp_path):
    cmd = [sys.executable, "main.py", "--config=configs/demo.py", f"--workdir={tmp_path / 'w'}"]
    done = subprocess.run([*cmd, "--config.batch_sise=32"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "ERROR --config.batch_sise=32: the config has no field 'batch_sise'; did you mean batch_size, "
        "eval_batch_size, image_size?"
    ]
    done = subprocess.run([*cmd, "--config.data.nme=x"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.splitlines() == [
        "ERROR --config.data.nme=x: the config has no field 'data.nme'; did you mean data.name, data.num_threads, "
        "data.bad_images?"
    ]
    assert not (tmp_path / "w").exists()


def test_a_missing_config_file_is_one_line_naming_the_nearest_and_creates_nothing(tmp_path):
    cmd = [sys.executable, "main.py", "--config=configs/s2mlp_v2_meduim.py", f"--workdir={tmp_path / 'w'}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"ERROR --config=configs/s2mlp_v2_meduim.py: no such file (relative paths start at the working directory "
        f"{ROOT}); did you mean configs/s2mlp_v2_medium.py, configs/s2mlp_v2_small.py, configs/s2mlp_wide.py?"
    ]
    assert not (tmp_path / "w").exists()
