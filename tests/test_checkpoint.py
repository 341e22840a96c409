"""Checkpoint faults: retention of the best step across a kill and resume, damaged or NaN steps, a stale
temporary folder, and turning the EMA on or off between runs (s2mlp/checkpoint.py and train_lib's restore)."""

import json
import logging
import shutil
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import train_lib
from configs import tiny
from s2mlp import checkpoint as ckpt
from s2mlp import inference
from tests.test_training import _losses, _main, _rows, ocp_steps
from tests.test_training import _snapshot as _all_files


def _snapshot(workdir: Path) -> dict[str, tuple[int, float]]:
    """Size and mtime of every file of a workdir except the trainer's lock file."""
    return {path: stat for path, stat in _all_files(workdir).items() if Path(path).name != ".lock"}


def _config(**fields):
    """s2mlp_tiny on digits, 6 steps, eval and checkpoint at 3 and 6, EMA 0.9, a loss row every step."""
    config = tiny.get_config("s2mlp_tiny")
    config.log_every_steps = 1
    for field, value in fields.items():
        config[field] = value
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    train_lib.train_and_evaluate(_config(), str(workdir))
    assert sorted(ocp_steps(workdir)) == [3, 6]
    return workdir


def _copy(run, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def _truncate_largest_files(item_dir: Path) -> None:
    """Cuts the item's largest data file in half (each of them, when Orbax keeps copies of equal size)."""
    files = [p for p in item_dir.rglob("*") if p.is_file()]
    largest = max(p.stat().st_size for p in files)
    for p in files:
        if p.stat().st_size == largest:
            with open(p, "r+b") as f:
                f.truncate(largest // 2)


# ---- 1. the best step survives a SIGKILL and a resume ----------------------------------------------------------
def test_best_step_is_kept_across_kill_and_resume(tmp_path):
    """keep_checkpoints=2 and evals at 20 and 40: after resuming, step 20 is kept for its eval metric alone."""
    flags = (
        "--config.total_steps=40",
        "--config.checkpoint_every_steps=5",
        "--config.eval_every_steps=20",
        "--config.log_every_steps=1",
    )

    def run_and_kill(done) -> list[int]:
        proc = _main(tmp_path, *flags, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not done(ocp_steps(tmp_path)):
            assert proc.poll() is None and time.time() < deadline, "training ended or stalled before the kill"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return sorted(ocp_steps(tmp_path))

    first = run_and_kill(lambda steps: steps and max(steps) >= 25)
    assert 20 in first and max(first) <= 30, first
    # Resumed and killed again after two more saves (by then the first one's deletions are done).
    second = run_and_kill(lambda steps: max(steps) >= max(first) + 10 and len(steps) <= 3)
    last = max(second)
    assert last < 40, "the resumed run finished before it was killed"
    assert second == [20, last - 5, last]  # step 20 is not among the last two: its eval keeps it
    saved = json.loads((tmp_path / "checkpoints" / "20" / "metrics" / "metrics").read_text())  # written by Orbax
    assert saved == {"eval_top1": next(r["eval_ema_top1"] for r in _rows(tmp_path) if "eval_ema_top1" in r)}

    assert _main(tmp_path, *flags, stderr=subprocess.DEVNULL).wait() == 0
    evals = {r["step"]: r["eval_ema_top1"] for r in _rows(tmp_path) if "eval_ema_top1" in r}
    assert sorted(evals) == [20, 40]
    best = max(evals, key=lambda s: (evals[s], s))  # a tie goes to the later step
    assert sorted(ocp_steps(tmp_path)) == sorted({35, 40, best})


# ---- 2. a damaged latest step ------------------------------------------------------------------------------------
def test_truncated_latest_step_stops_naming_it_and_the_way_back(run, tmp_path):
    workdir = _copy(run, tmp_path / "run")
    _truncate_largest_files(workdir / "checkpoints" / "6" / "params")
    stale = workdir / "checkpoints" / "9.orbax-checkpoint-tmp-1700000000000000"
    (stale / "params").mkdir(parents=True)
    before = _snapshot(workdir)
    proc = _main(workdir, "--config.total_steps=9", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, out[-3000:]
    step_dir = workdir / "checkpoints" / "6"
    assert f"checkpoint {step_dir} is incomplete or corrupt (" in out
    assert f"to resume training from step 3, move this step out of {workdir / 'checkpoints'}" in out
    assert f"mv {step_dir} {workdir}/damaged-6" in out
    for noise in ("TensorStore({", "Event loop is closed", "Task exception was never retrieved", "Traceback"):
        assert noise not in out, noise
    assert _snapshot(workdir) == before and stale.is_dir()  # nothing changed, not even the stale folder

    # Following the message resumes from step 3 and gives the uninterrupted run's losses.
    shutil.move(step_dir, workdir / "damaged-6")
    train_lib.train_and_evaluate(_config(), str(workdir))
    assert sorted(ocp_steps(workdir)) == [3, 6]
    assert _losses(workdir) == _losses(run)
    assert not stale.exists()  # 4. the stale temporary folder is deleted once the run has resumed


# ---- 3. the EMA turned on or off between runs --------------------------------------------------------------------
def test_ema_turned_on_for_a_run_saved_without_it_starts_from_the_restored_params(run, tmp_path, caplog):
    workdir = _copy(run, tmp_path / "run")
    for step in (3, 6):
        shutil.rmtree(workdir / "checkpoints" / str(step) / "ema_params")  # as saved with ema_decay=0
    with caplog.at_level(logging.WARNING):
        train_lib.train_and_evaluate(_config(total_steps=7, checkpoint_every_steps=1), str(workdir))
    assert "Step 6 in" in caplog.text and "saved without an EMA" in caplog.text
    assert "config.ema_decay=0.9 the EMA starts from the restored parameters at step 6" in caplog.text
    step_dir = workdir / "checkpoints"
    params6, params7 = (ckpt.restore(step_dir / str(s), "params") for s in (6, 7))
    ema7 = ckpt.restore(step_dir / "7", "ema_params")
    for e, p6, p7 in zip(jax.tree.leaves(ema7), jax.tree.leaves(params6), jax.tree.leaves(params7), strict=True):
        np.testing.assert_allclose(e, 0.9 * np.asarray(p6) + 0.1 * np.asarray(p7), rtol=1e-6, atol=1e-7)


def test_ema_turned_off_for_a_run_saved_with_it_resumes_without_it(run, tmp_path, caplog):
    workdir = _copy(run, tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        train_lib.train_and_evaluate(_config(total_steps=7, checkpoint_every_steps=1, ema_decay=0.0), str(workdir))
    assert "holds an EMA of the parameters, but config.ema_decay=0 turns the EMA off" in caplog.text
    assert "resume with --config.ema_decay=0.9" in caplog.text
    assert sorted(ocp_steps(workdir))[-2:] == [6, 7]  # (and step 3 when its eval was the best)
    assert "ema_params" not in ckpt.saved_items(workdir / "checkpoints" / "7")
    assert {"params", "opt_state", "metrics"} <= ckpt.saved_items(workdir / "checkpoints" / "7")


# ---- 5. non-finite parameters ------------------------------------------------------------------------------------
def _poison(step_dir: Path, item: str, leaf: str) -> None:
    """Rewrites `item` of `step_dir` with a NaN in `leaf` ('a/b/kernel')."""
    flat = ckpt.flatten(jax.device_get(ckpt.restore(step_dir, item)))
    flat[leaf] = np.array(flat[leaf]).copy()
    flat[leaf].flat[0] = np.nan
    shutil.rmtree(step_dir / item)
    ocp.Checkpointer(ocp.StandardCheckpointHandler()).save(
        step_dir / item, args=ocp.args.StandardSave(ckpt.unflatten(flat))
    )


def test_nan_parameters_are_refused_by_inference_fine_tuning_and_resume(run, tmp_path):
    workdir = _copy(run, tmp_path / "run")
    step_dir = workdir / "checkpoints" / "6"
    _poison(step_dir, "params", "block_1/fc2/kernel")
    expected = f"checkpoint {step_dir} holds NaN/Inf values in 'params' (first: block_1/fc2/kernel); other steps"

    with pytest.raises(ValueError) as e:
        inference.load(workdir, ema=False)
    assert expected in str(e.value)
    assert inference.load(workdir, ema=True).step == 6  # the EMA item is finite

    config = _config(init_from=str(workdir), init_from_ema=False)
    with pytest.raises(ValueError) as e:
        train_lib.train_and_evaluate(config, str(tmp_path / "fine_tune"))
    assert str(e.value).startswith(f"config.init_from={str(workdir)!r}: {expected}")

    before = _snapshot(workdir)
    with pytest.raises(ckpt.BadCheckpoint) as e:
        train_lib.train_and_evaluate(_config(total_steps=9), str(workdir))
    assert expected in str(e.value) and "to resume training from step 3" in str(e.value)
    assert _snapshot(workdir) == before


def test_a_bad_step_older_than_the_latest_gets_no_resume_advice(run, tmp_path):
    """A resume reads the latest step (6), so a damaged step 3 asks for no move before resuming."""
    workdir = _copy(run, tmp_path / "run")
    step_dir = workdir / "checkpoints" / "3"
    _poison(step_dir, "params", "block_1/fc2/kernel")
    with pytest.raises(ValueError) as e:
        inference.load(step_dir, ema=False)
    assert str(e.value).endswith(f"other steps of this run: [6]. Load one by passing {workdir / 'checkpoints'}/<step>.")


def test_gradient_clipping_turned_on_or_off_on_a_resume(run, tmp_path, caplog):
    """grad_clip_norm 0 -> 1 (as the NaN message advises) and back on resumes: the optimizer state gains or drops
    clipping's empty first stage (it used to call the good checkpoint corrupt and advise moving it out)."""
    workdir = _copy(run, tmp_path / "run")
    train_lib.train_and_evaluate(_config(total_steps=7, grad_clip_norm=1.0), str(workdir))
    train_lib.train_and_evaluate(_config(total_steps=8, grad_clip_norm=0.0), str(workdir))
    assert ckpt.latest_step(workdir / "checkpoints") == 8
    assert (
        f"Step 6 in {workdir / 'checkpoints'} was saved without gradient clipping; config.grad_clip_norm=1"
        in caplog.text
    )
    assert (
        f"Step 7 in {workdir / 'checkpoints'} was saved with gradient clipping; config.grad_clip_norm=0" in caplog.text
    )


def test_first_nonfinite_names_the_first_bad_leaf():
    tree = {"a": {"kernel": np.ones((2, 2), np.float32)}, "b": np.array([1.0, np.inf]), "step": np.array(3)}
    assert ckpt.first_nonfinite(tree) == "b"
    tree["b"][1] = 0.0
    assert ckpt.first_nonfinite(tree) is None


def test_opening_the_folder_deletes_unfinished_saves_before_it_returns(tmp_path):
    """A killed save leaves ``<step>.orbax-checkpoint-tmp-*``; `ckpt.manager` has removed it when it returns."""
    (tmp_path / "7.orbax-checkpoint-tmp-1795600000").mkdir()
    (tmp_path / "7.orbax-checkpoint-tmp-1795600000" / "params").mkdir()
    mngr = ckpt.manager(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert mngr.latest_step() is None
