"""End-to-end training through main.py / train_lib on tiny configs: digits, tfds mock data, image folders.

Covers resume after `kill -9`, eval counting, NaN handling, a workdir of another model, fine-tuning,
eval-only mode and a 2-process × 2-device run over jax.distributed on 127.0.0.1.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import train_lib
from configs import tiny
from s2mlp import checkpoint as ckpt
from tests.conftest import xla_flags

ROOT = Path(__file__).resolve().parents[1]
LONG = (
    "--config.total_steps=30",
    "--config.eval_every_steps=15",
    "--config.checkpoint_every_steps=10",
    "--config.log_every_steps=1",
)


def _rows(workdir) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _losses(workdir) -> dict[int, float]:
    """Train loss by step; after a resume the later row of a step wins."""
    return {r["step"]: r["loss"] for r in _rows(workdir) if "loss" in r}


def _main(workdir, *overrides, env=None, config="configs/tiny.py:s2mlp_tiny", **popen):
    cmd = [sys.executable, "main.py", f"--config={config}", f"--workdir={workdir}", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, **popen)


def _snapshot(path: Path) -> dict[str, tuple[int, float]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime) for p in path.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """30 steps of s2mlp_tiny on digits (8 devices): eval at 15 and 30, checkpoints every 10, EMA on."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    config = tiny.get_config("s2mlp_tiny")
    for flag in LONG:
        field, value = flag.removeprefix("--config.").split("=")
        config[field] = int(value)
    metrics = train_lib.train_and_evaluate(config, str(workdir))
    return config, workdir, metrics


def test_training_writes_metrics_checkpoints_and_counts_eval_once(tiny_run):
    config, workdir, metrics = tiny_run
    assert metrics["eval_num_examples"] == 300 and metrics["eval_ema_num_examples"] == 300  # digits' held-out split
    assert 0 <= metrics["eval_top1"] <= metrics["eval_top5"] <= 1
    assert sorted(_losses(workdir)) == list(range(1, 31))
    assert all(np.isfinite(v) for v in _losses(workdir).values())
    assert [r["step"] for r in _rows(workdir) if "eval_top1" in r] == [15, 30]
    assert list(Path(workdir).glob("events.out.tfevents.*")), "no TensorBoard events"
    directory, step = ckpt.locate(workdir)
    # keep_checkpoints=2: steps 20 and 30 stay (30 is also the best evaluated one); 10 is gone.
    assert step == 30 and sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) == [20, 30]
    assert {"params", "ema_params", "opt_state", "config", "dataset"} <= ckpt.saved_items(directory / "30")
    assert ckpt.read_json(directory / "30", "config")["model"]["name"] == "s2mlp_tiny"
    assert ckpt.read_json(directory / "30", "dataset")["class_names"] == [str(i) for i in range(10)]


def test_eval_only_mode_reproduces_the_final_eval(tiny_run):
    config, workdir, metrics = tiny_run
    again = train_lib.evaluate(config, str(workdir))
    for key in ("eval_top1", "eval_top5", "eval_ema_top1", "eval_num_examples"):
        assert again[key] == metrics[key], key
    np.testing.assert_allclose(again["eval_loss"], metrics["eval_loss"], rtol=1e-6)


def test_rerunning_a_finished_run_trains_nothing_and_keeps_files(tiny_run):
    config, workdir, _ = tiny_run
    before = _snapshot(Path(workdir) / "checkpoints")
    train_lib.train_and_evaluate(config, str(workdir))
    assert _snapshot(Path(workdir) / "checkpoints") == before


def test_workdir_of_another_model_fails_and_changes_nothing(tiny_run, tmp_path):
    _, workdir, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    before = _snapshot(copy)
    config = tiny.get_config("mixer_tiny")
    with pytest.raises(ValueError) as e:
        train_lib.train_and_evaluate(config, str(copy))
    message = str(e.value)
    assert "holds a checkpoint (step 30) of model 's2mlp_tiny'" in message
    assert "config.model.name='mixer_tiny'" in message
    assert "missing MixerBlock_0/LayerNorm_0/bias (32,)" in message and "unexpected block_0/fc1/bias (32,)" in message
    assert "Nothing was changed" in message
    assert _snapshot(copy) == before


def _write_image_folder(root: Path, classes=("cat", "dog", "owl"), per_class=(6, 3)):
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "validation"), per_class):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(20 + i, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.jpg")


def test_fine_tune_from_a_run_with_a_new_head_on_an_image_folder(tiny_run, tmp_path):
    _, source, _ = tiny_run
    _write_image_folder(tmp_path / "images")
    config = tiny.get_config("s2mlp_tiny")
    config.data.name, config.data.data_dir = "directory", str(tmp_path / "images")
    config.data.eval_split = "validation"
    config.init_from = str(source)
    config.total_steps, config.eval_batch_size = 1, 8
    metrics = train_lib.train_and_evaluate(config, str(tmp_path / "ft"))
    assert metrics["eval_num_examples"] == 9  # 3 classes × 3 images, the last batch padded
    directory, step = ckpt.locate(tmp_path / "ft")
    assert ckpt.saved_shapes(directory / str(step))["head/kernel"] == (32, 3)
    assert ckpt.read_json(directory / str(step), "dataset")["class_names"] == ["cat", "dog", "owl"]


def test_tfds_imagenet_path_with_mock_data(imagenet_metadata, tmp_path):
    import tensorflow_datasets as tfds

    from tests.conftest import MOCK_EXAMPLES

    config = tiny.get_config("s2mlp_tiny")
    config.data.name, config.data.eval_split = "imagenet2012", "validation"
    config.data.data_dir = imagenet_metadata
    config.augment.ops = "inception_crop(0.08)|flip|randaugment(2, 9, 0.5)|normalize|erase(0.25)"
    config.total_steps, config.eval_every_steps, config.checkpoint_every_steps = 2, 2, 2
    config.batch_size, config.eval_batch_size = 8, 8
    with tfds.testing.mock_data(
        num_examples=MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=imagenet_metadata
    ):
        metrics = train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    assert metrics["eval_num_examples"] == MOCK_EXAMPLES
    directory, step = ckpt.locate(tmp_path / "run")
    assert step == 2 and ckpt.saved_shapes(directory / "2")["head/kernel"] == (32, 1000)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny.get_config("s2mlp_tiny")
    config.total_steps, config.checkpoint_every_steps, config.eval_every_steps = 2, 2, 2
    train_lib.train_and_evaluate(config, str(tmp_path))
    good = ckpt.restore(tmp_path / "checkpoints" / "2", "params")
    config.total_steps, config.log_every_steps, config.checkpoint_every_steps = 6, 1, 1
    config.base_lr = config.min_lr = 1e40  # beyond float32: the next update overflows the parameters
    with pytest.raises(FloatingPointError, match=r"NaN/Inf at step 3; .* last good checkpoint \(step 2\) is kept"):
        train_lib.train_and_evaluate(config, str(tmp_path))
    directory, last = ckpt.locate(tmp_path)
    assert last == 2
    kept = ckpt.restore(directory / "2", "params")
    for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(kept)):
        np.testing.assert_array_equal(a, b)


def test_kill_9_then_resume_gives_the_uninterrupted_losses(tiny_run, tmp_path):
    """Killed mid-run (past the step-10 checkpoint), the same command finishes with identical losses."""
    _, reference, _ = tiny_run
    workdir = tmp_path / "killed"
    proc = _main(workdir, *LONG, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300

    def killable():
        done = ocp_steps(workdir)
        return done and max(done) >= 10 and max(_losses(workdir)) >= 12

    while not killable():
        assert proc.poll() is None and time.time() < deadline, "training ended or stalled before the kill"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(workdir))
    assert killed_at < 30, "the run finished before it was killed"
    assert _main(workdir, *LONG, stderr=subprocess.DEVNULL).wait() == 0
    assert _losses(workdir) == _losses(reference)  # bit-identical, every step
    assert ckpt.locate(workdir)[1] == 30


def ocp_steps(workdir: Path) -> list[int]:
    """Complete checkpoint steps (Orbax lists only finalised ones); [] before the first."""
    import orbax.checkpoint as ocp

    directory = workdir / ckpt.CHECKPOINTS
    return ocp.utils.checkpoint_steps(directory) if directory.exists() else []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_two_devices_each(tmp_path):
    """jax.distributed on 127.0.0.1: per-process data shards, one global batch, one checkpoint, exact eval."""
    port = _free_port()
    env = {"XLA_FLAGS": xla_flags(2)}
    procs = [
        _main(
            tmp_path,
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
            "--config.batch_size=8",
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "process 1 of 2, 2 local / 4 global devices" in outputs[1]
    rows = _rows(tmp_path)  # written by process 0 only
    assert sorted(_losses(tmp_path)) == [2, 3, 4, 6]  # logged every 2 steps and at the checkpoints
    assert [r["eval_num_examples"] for r in rows if "eval_num_examples" in r] == [300, 300]
    assert ckpt.locate(tmp_path)[1] == 6


def test_fsdp_fine_tune_on_two_processes_trains_as_one_process_does(tiny_run, tmp_path):
    """init_from with fsdp=True on 2 processes × 2 devices: the fresh parameters span both processes' devices, so
    they are gathered before the host reads them; the losses are those of a replicated fine-tune in one process
    (repeated augmentation and no DropPath make the batches and the step independent of the process count)."""
    _, source, _ = tiny_run
    overrides = {"init_from": str(source), "batch_size": 8, "total_steps": 3, "log_every_steps": 1,
                 "data.aug_repeats": 2, "model.drop_path_rate": 0.0}  # fmt: skip
    port, logs = _free_port(), [tmp_path / f"process{i}.log" for i in range(2)]
    procs = [
        _main(
            tmp_path / "two",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
            "--config.fsdp=True",
            *[f"--config.{k}={v}" for k, v in overrides.items()],
            env={"XLA_FLAGS": xla_flags(2)},
            stdout=logs[i].open("w"),  # a file, not a pipe: a full pipe would stall one process and so both
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    codes = [p.wait(timeout=600) for p in procs]
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert all("Fine-tuning from" in out for out in outputs)
    config = tiny.get_config("s2mlp_tiny")
    for key, value in overrides.items():
        group, _, field = key.rpartition(".")
        (config[group] if group else config)[field] = value
    train_lib.train_and_evaluate(config, str(tmp_path / "one"))
    two, one = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert sorted(two) == sorted(one) == [1, 2, 3]
    assert [two[s] for s in (1, 2, 3)] == pytest.approx([one[s] for s in (1, 2, 3)], rel=1e-5)


def test_device_augmentation_resumes_bit_exact(tmp_path):
    """Ops after 'to_device' (RandAugment, erasing in the train step): resuming from a checkpoint replays the same
    augmented batches, so the losses after it are the uninterrupted run's."""
    config = tiny.get_config("s2mlp_tiny")
    config.augment.ops = "inception_crop(0.08)|to_device|flip|randaugment(2, 9, 0.5)|normalize|erase(0.5)"
    config.total_steps, config.checkpoint_every_steps, config.eval_every_steps, config.log_every_steps = 8, 4, 8, 1
    train_lib.train_and_evaluate(config, str(tmp_path))
    reference = _losses(tmp_path)
    shutil.rmtree(tmp_path / ckpt.CHECKPOINTS / "8")  # as if killed after the step-4 checkpoint
    train_lib.train_and_evaluate(config, str(tmp_path))
    assert _losses(tmp_path) == reference and sorted(reference) == list(range(1, 9))


def test_rows_after_a_resume_are_the_uninterrupted_runs_when_logs_and_checkpoints_do_not_align(tmp_path):
    """Logged every 3 steps, checkpointed every 4: a checkpoint step writes a row too, so resuming from step 4
    rewrites exactly the rows (means over the same steps) that the uninterrupted run wrote."""
    config = tiny.get_config("s2mlp_tiny")
    config.total_steps, config.checkpoint_every_steps, config.eval_every_steps, config.log_every_steps = 8, 4, 8, 3
    train_lib.train_and_evaluate(config, str(tmp_path))
    reference = _rows(tmp_path)
    assert [r["step"] for r in reference if "loss" in r] == [3, 4, 6, 8]
    shutil.rmtree(tmp_path / ckpt.CHECKPOINTS / "8")  # as if killed after the step-4 checkpoint
    train_lib.train_and_evaluate(config, str(tmp_path))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]  # noqa: E731
    assert strip(_rows(tmp_path)) == strip(reference)


def test_a_stop_at_an_evaluated_step_saves_its_eval_metric(tmp_path, monkeypatch):
    """SIGTERM at step 6 (evaluated, not a checkpoint step): the checkpoint saved there carries its eval top-1,
    so the keep-the-best rule can rank it."""
    config = tiny.get_config("s2mlp_tiny")
    config.total_steps, config.checkpoint_every_steps, config.eval_every_steps, config.log_every_steps = 8, 4, 3, 1

    def stop_at_6(self, step):
        self.received = self.received or ("SIGTERM" if step == 6 else None)
        return self.received is not None

    monkeypatch.setattr(train_lib.runs.StopSignals, "should_stop", stop_at_6)
    with pytest.raises(train_lib.Stopped, match="stopped by SIGTERM at step 6"):
        train_lib.train_and_evaluate(config, str(tmp_path))
    assert ckpt.latest_step(tmp_path / ckpt.CHECKPOINTS) == 6
    assert "metrics" in ckpt.saved_items(tmp_path / ckpt.CHECKPOINTS / "6")
