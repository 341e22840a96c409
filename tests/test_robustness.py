"""Daily-use robustness of main.py / train_lib: SIGTERM and SIGINT, the workdir lock, eval-only records,
TensorBoard names, start-up logs, and faults that must fail up front without changing the workdir."""

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tensorflow as tf

import train_lib
from configs import tiny
from s2mlp import runs
from tests.conftest import xla_flags
from tests.test_training import LONG, _losses, _main, _rows, _snapshot, _write_image_folder, ocp_steps

ROOT = Path(__file__).resolve().parents[1]


def _long_config():
    config = tiny.get_config("s2mlp_tiny")
    for flag in LONG:
        field, value = flag.removeprefix("--config.").split("=")
        config[field] = int(value)
    return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of tests/test_training.py's LONG settings (30 steps, log every step)."""
    workdir = tmp_path_factory.mktemp("reference")
    metrics = train_lib.train_and_evaluate(_long_config(), str(workdir))
    return workdir, metrics


def _start(workdir, log: Path, *flags):
    return _main(workdir, *LONG, *flags, stdout=subprocess.DEVNULL, stderr=log.open("w"))


def _wait(proc, ready, what: str, timeout=300):
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _train_steps(workdir) -> list[int]:
    return [r["step"] for r in _rows(workdir) if "loss" in r]


def _logged(workdir) -> int:
    return max(_train_steps(workdir), default=0) if (Path(workdir) / "metrics.jsonl").exists() else 0


# ---- SIGTERM / SIGINT ------------------------------------------------------------------------------------------
def test_sigterm_saves_the_step_and_the_resume_gives_the_uninterrupted_losses(reference, tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "first.log"
    proc = _start(workdir, log)
    _wait(proc, lambda: _logged(workdir) >= 4, "step 4")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == train_lib.EXIT_STOPPED == 75
    stopped_at = _logged(workdir)
    assert stopped_at < 30, "the run finished before the signal"
    text = log.read_text()
    assert (
        f"stopped by SIGTERM at step {stopped_at}; checkpoint saved in {workdir / 'checkpoints'}; "
        "rerun the same command to resume." in text
    )
    assert stopped_at in ocp_steps(workdir)  # a checkpoint at the stop step, whatever the cadence
    # The same command resumes there and ends with the uninterrupted run's losses, each step once.
    resumed_log = tmp_path / "resumed.log"
    assert _start(workdir, resumed_log).wait(timeout=600) == 0
    assert _train_steps(workdir) == list(range(1, 31))
    assert _losses(workdir) == _losses(reference[0])
    # Start-up logs: the dataset, the compile, and TensorFlow's native start-up lines once.
    text = resumed_log.read_text()
    assert "Dataset digits: train split 'train' 1,497 images, eval split 'test' 300 images, 10 classes." in text
    assert f"Resumed from {workdir / 'checkpoints'} at step {stopped_at}." in text
    assert "Compiling the train step…" in text and "compiled in " in text
    assert text.count("All log messages before absl::InitializeLog() is called") <= 1
    assert text.count("oneDNN custom operations are on") <= 1
    # Orbax's warning about the stop step's checkpoint having no eval metrics is not shown (it is by design).
    assert "did not provide metrics" not in log.read_text() + text
    # TensorBoard shows each step once: the first attempt's points after its stop step were dropped.
    points = _scalar_points(workdir)
    assert len(points) == len(set(points)) and ("train/loss", 30) in points


def test_kill_before_the_first_checkpoint_then_rerun_logs_each_step_once(reference, tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "first.log"
    proc = _start(workdir, log, "--config.checkpoint_every_steps=30")  # the first checkpoint is the last step
    _wait(proc, lambda: _logged(workdir) >= 3, "step 3")
    proc.kill()
    proc.wait(timeout=60)
    killed_at = _logged(workdir)
    assert 3 <= killed_at < 30 and ocp_steps(workdir) == []
    assert len([p for p in workdir.glob("events.out.tfevents.*")]) == 1
    rerun_log = tmp_path / "rerun.log"
    assert _start(workdir, rerun_log).wait(timeout=600) == 0
    assert _train_steps(workdir) == list(range(1, 31))  # each step once, the killed attempt's rows dropped
    assert _losses(workdir) == _losses(reference[0])
    points = _scalar_points(workdir)
    assert len(points) == len(set(points)) and {s for t, s in points if t == "train/loss"} == set(range(1, 31))
    text = rerun_log.read_text()
    assert f"Dropped {killed_at} rows after step 0 from {workdir / 'metrics.jsonl'} (trained again)." in text
    assert "TensorBoard points after step 0 from" in text


def test_a_failed_checkpoint_save_stops_the_run_at_that_step_in_one_line(tmp_path):
    workdir = tmp_path / "run"
    # root ignores permissions: run without CAP_DAC_OVERRIDE so a read-only folder is read-only for the trainer.
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []
    flags = ["--config.total_steps=300", "--config.checkpoint_every_steps=100", "--config.eval_every_steps=300",
             "--config.log_every_steps=1"]  # fmt: skip
    cmd = [*prefix, sys.executable, "main.py", "--config=configs/tiny.py:s2mlp_tiny", f"--workdir={workdir}", *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait(proc, lambda: (workdir / "checkpoints" / "100").is_dir(), "the checkpoint of step 100")
    proc.send_signal(signal.SIGSTOP)  # the checkpoints folder turns read-only between two saves
    (workdir / "checkpoints").chmod(0o555)
    proc.send_signal(signal.SIGCONT)
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:
        (workdir / "checkpoints").chmod(0o755)
    assert proc.returncode == 1, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("E")]
    assert len(errors) == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    assert (
        errors[0]
        .split("] ", 1)[1]
        .startswith(f"SaveFailed: saving the checkpoint of step 200 in {workdir / 'checkpoints'} failed (")
    ), errors[0]
    assert errors[0].endswith(
        "training stopped there, step 100 is complete and loadable. Fix the cause (disk space, permissions, the "
        "path) and rerun the same command to resume."
    ), errors[0]
    assert max(_train_steps(workdir)) <= 201  # stopped at once, not a checkpoint interval later
    assert ocp_steps(workdir) == [100]
    from s2mlp import inference

    assert inference.load(workdir).step == 100  # the previous complete step is loadable


def test_dropping_tensorboard_points_after_a_step(tmp_path):
    first = runs.TensorBoardWriter(tmp_path, "test")
    first.write_config(tiny.get_config())
    for step in range(1, 7):
        first.write_scalars(step, {"loss": float(step), **({"eval_top1": 0.5} if step % 3 == 0 else {})})
    first.close()
    runs.drop_events_after(tmp_path, 4)
    assert sorted(_scalar_points(tmp_path)) == sorted(
        [("train/loss", s) for s in range(1, 5)] + [("test/top1", 3)]
    )  # the config text and hparams of step 0 go too: every start writes them anew
    assert _tags(tmp_path).keys() == {"scalars"}
    runs.drop_events_after(tmp_path, 0)  # an attempt that saved no checkpoint: nothing of it is kept
    assert list(tmp_path.glob("events.out.tfevents.*")) == []


def test_an_eval_on_the_train_split_gets_its_own_tensorboard_group(tmp_path):
    """config.data.eval_split='train' wrote its loss to 'train/loss', beside the training loss."""
    writer = runs.TensorBoardWriter(tmp_path, "train")
    writer.write_scalars(3, {"loss": 2.0, "eval_loss": 1.5, "eval_top1": 0.5})
    writer.close()
    assert sorted(_scalar_points(tmp_path)) == [("train/loss", 3), ("train_eval/loss", 3), ("train_eval/top1", 3)]


def test_a_second_signal_ends_the_run_at_once(tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "run.log"
    proc = _start(workdir, log, "--config.total_steps=100000", "--config.checkpoint_every_steps=100000")
    _wait(proc, lambda: _logged(workdir) >= 2, "step 2")
    proc.send_signal(signal.SIGTERM)
    _wait(proc, lambda: "SIGTERM received" in log.read_text(), "the SIGTERM handler")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == -signal.SIGINT  # killed by the default action, not a clean stop (75)
    assert "stopped by SIGTERM" not in log.read_text()


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    """jax.distributed on 127.0.0.1: JAX's preemption service carries the notice to the other process."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workdir, logs = tmp_path / "run", [tmp_path / "p0.log", tmp_path / "p1.log"]
    flags = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--config.batch_size=8"]
    flags += ["--config.total_steps=100000", "--config.checkpoint_every_steps=100000"]
    procs = [
        _main(
            workdir,
            *LONG,
            *flags,
            f"--process_id={i}",
            env={"XLA_FLAGS": xla_flags(2)},
            stdout=subprocess.DEVNULL,
            stderr=logs[i].open("w"),
        )
        for i in range(2)
    ]
    _wait(procs[0], lambda: _logged(workdir) >= 3, "step 3")
    procs[1].send_signal(signal.SIGTERM)
    assert [p.wait(timeout=300) for p in procs] == [75, 75]
    stopped_at = _logged(workdir)
    message = f"stopped by SIGTERM at step {stopped_at}; checkpoint saved in {workdir / 'checkpoints'}"
    assert all(message in log.read_text() for log in logs)
    assert ocp_steps(workdir) == [stopped_at]


# ---- the workdir lock -----------------------------------------------------------------------------------------
def test_two_trainers_in_one_workdir_and_a_killed_one_does_not_block_its_resume(reference, tmp_path):
    workdir = tmp_path / "run"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_start(workdir, logs[0])]
    time.sleep(1)
    procs.append(_start(workdir, logs[1]))
    _wait(procs[0], lambda: any(p.poll() is not None for p in procs), "one trainer to be refused", timeout=600)
    loser = next(i for i, p in enumerate(procs) if p.poll() is not None)
    winner = procs[1 - loser]
    assert procs[loser].returncode == 1
    message = logs[loser].read_text()
    assert "Traceback" not in message
    assert f"WorkdirBusy: --workdir={workdir} is in use by another trainer (pid {winner.pid} on " in message
    assert f"on {socket.gethostname()} since " in message and "Nothing was changed." in message
    # kill -9 the winner past its step-10 checkpoint: the kernel drops its lock, so the same command resumes.
    _wait(winner, lambda: ocp_steps(workdir) and max(ocp_steps(workdir)) >= 10 and _logged(workdir) >= 12, "step 12")
    winner.send_signal(signal.SIGKILL)
    winner.wait()
    assert _logged(workdir) < 30, "the run finished before it was killed"
    assert _start(workdir, tmp_path / "resume.log").wait(timeout=600) == 0
    # metrics.jsonl lost the rows of the steps trained again: each step appears once, as uninterrupted.
    assert _train_steps(workdir) == list(range(1, 31))
    assert [r["step"] for r in _rows(workdir) if "eval_top1" in r] == [15, 30]
    assert _losses(workdir) == _losses(reference[0])
    assert (workdir / ".lock").read_text() == ""  # emptied at the end; the file stays


def test_a_held_lock_refuses_the_run_naming_the_holder_and_changes_nothing(reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    (workdir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in _rows(workdir) if r["step"] <= 20) + "\n")
    shutil.rmtree(workdir / "checkpoints" / "30")  # an unfinished run: step 20 is its latest checkpoint
    with (workdir / ".lock").open("r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write("pid 4242 on otherhost since 2026-01-01 00:00:00 UTC\n")
        f.flush()
        before = _snapshot(workdir)
        done = subprocess.run(
            [sys.executable, "main.py", "--config=configs/tiny.py:s2mlp_tiny", f"--workdir={workdir}", *LONG],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert done.returncode == 1, done.stderr[-2000:]
    assert (
        f"WorkdirBusy: --workdir={workdir} is in use by another trainer (pid 4242 on otherhost since "
        "2026-01-01 00:00:00 UTC). Wait for it to end (or stop it: SIGTERM saves a checkpoint), or choose another "
        "--workdir. Nothing was changed." in done.stderr
    )
    assert _snapshot(workdir) == before


def test_a_run_failing_after_taking_the_lock_puts_the_lock_file_back(reference, tmp_path):
    """A damaged checkpoint shows only when it is read (after the lock is taken): the workdir stays as it was."""
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    (workdir / ".lock").write_text("pid 1 on somehost since 2026-01-01 00:00:00 UTC\n")  # a dead holder's record
    for data in (workdir / "checkpoints" / "30" / "opt_state").glob("ocdbt.process_*/d/*"):
        data.write_bytes(b"")
    before = _snapshot(workdir)
    config = _long_config()
    config.total_steps = 40
    with pytest.raises(ValueError):
        train_lib.train_and_evaluate(config, str(workdir))
    assert _snapshot(workdir) == before
    assert (workdir / ".lock").read_text() == "pid 1 on somehost since 2026-01-01 00:00:00 UTC\n"


# ---- eval-only records and TensorBoard names -------------------------------------------------------------------
def _tags(directory: Path) -> dict[str, set]:
    """{plugin name: tags} of every TensorBoard event under `directory` (not its subfolders)."""
    found: dict[str, set] = {}
    for path in directory.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                found.setdefault(value.metadata.plugin_data.plugin_name, set()).add(value.tag)
    return found


def _scalar_points(directory: Path) -> list[tuple[str, int]]:
    points = []
    for path in directory.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            values = event.summary.value
            points += [(v.tag, event.step) for v in values if v.metadata.plugin_data.plugin_name == "scalars"]
    return points


def test_tensorboard_groups_tags_per_split_with_config_text_and_hparams(reference):
    tags = _tags(reference[0])
    assert tags["scalars"] == {
        "train/loss", "train/grad_norm", "train/lr", "train/images_per_s",
        "test/top1", "test/top5", "test/loss", "test/ema_top1", "test/ema_top5", "test/ema_loss",
    }  # fmt: skip
    assert tags["text"] == {"config", "test/num_examples"}
    assert "hparams" in tags
    # metrics.jsonl keeps its flat keys.
    assert set(_rows(reference[0])[-1]) == {
        "step", "eval_top1", "eval_top5", "eval_loss", "eval_num_examples",
        "eval_ema_top1", "eval_ema_top5", "eval_ema_loss", "eval_ema_num_examples",
    }  # fmt: skip


def test_eval_only_results_get_their_own_folder_and_leave_the_run_as_it_was(reference, tmp_path):
    workdir, metrics = reference
    before = _snapshot(workdir)
    out = train_lib.evaluate(_long_config(), str(workdir), eval_dir=str(tmp_path / "evals"))
    assert _snapshot(workdir) == before  # a read-only run can be evaluated: nothing is written into it
    record = json.loads((tmp_path / "evals" / "test_step30" / "metrics.json").read_text())
    assert record["step"] == 30 and record["split"] == "test"
    assert record["checkpoint"] == str(workdir / "checkpoints" / "30")
    for key in ("eval_top1", "eval_top5", "eval_ema_top1", "eval_num_examples"):
        assert record[key] == out[key] == metrics[key], key
    assert _tags(tmp_path / "evals" / "test_step30")["scalars"] == {
        "test/top1", "test/top5", "test/loss", "test/ema_top1", "test/ema_top5", "test/ema_loss",
    }  # fmt: skip
    # Default: <workdir>/eval/<split>_step<N>/, again without a point on the training curves; a rerun replaces it.
    train_lib.evaluate(_long_config(), str(workdir))
    train_lib.evaluate(_long_config(), str(workdir))
    outside_eval = lambda snapshot: {k: v for k, v in snapshot.items() if "/eval/" not in k}  # noqa: E731
    assert outside_eval(_snapshot(workdir)) == outside_eval(before)  # eval/ also holds the run's per-class results
    assert json.loads((workdir / "eval" / "test_step30" / "metrics.json").read_text()) == record | {
        "checkpoint": str(workdir / "checkpoints" / "30")
    }
    assert sorted(_scalar_points(workdir / "eval" / "test_step30")) == sorted(
        (f"test/{k}", 30) for k in ("top1", "top5", "loss", "ema_top1", "ema_top5", "ema_loss")
    )


def test_rerunning_a_finished_run_says_so_and_returns_its_last_eval(reference, caplog):
    workdir, metrics = reference
    before = _snapshot(workdir)
    with caplog.at_level("INFO", logger="absl"):
        again = train_lib.train_and_evaluate(_long_config(), str(workdir))
    assert f"Already finished at step 30; nothing to do (checkpoints in {workdir / 'checkpoints'})." in caplog.text
    assert again == {k: v for k, v in metrics.items()}
    assert _snapshot(workdir) == before


# ---- faults: one clear message, nothing written -----------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value",
    [
        ("base_lr", float("inf")),
        ("base_lr", float("nan")),
        ("min_lr", float("inf")),
        ("weight_decay", float("nan")),
        ("ema_decay", float("nan")),
        ("augment.label_smoothing", float("nan")),
        ("augment.mixup", float("inf")),
        ("augment.cutmix", float("-inf")),
    ],
)
def test_non_finite_floats_are_refused_before_anything(field, value, tmp_path):
    config = tiny.get_config("s2mlp_tiny")
    parent, _, leaf = field.rpartition(".")
    (config[parent] if parent else config)[leaf] = value
    with pytest.raises(ValueError) as e:
        train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    assert str(e.value) == f"config.{field}={value} must be a finite number."
    assert not (tmp_path / "run").exists()


def test_nan_before_any_checkpoint_says_none_was_written(tmp_path):
    config = tiny.get_config("s2mlp_tiny")
    config.base_lr = config.min_lr = 1e40  # the second update overflows the parameters
    config.log_every_steps = 1
    with pytest.raises(FloatingPointError) as e:
        train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    assert "NaN/Inf at step 2;" in str(e.value) and "No checkpoint was written yet." in str(e.value)
    assert "None" not in str(e.value)


def test_a_missing_init_from_is_named_before_compiling_and_writes_nothing(tmp_path):
    config = tiny.get_config("s2mlp_tiny")
    config.init_from = str(tmp_path / "no_such_run")
    with pytest.raises(ValueError) as e:
        train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    assert str(e.value).startswith(f"config.init_from={config.init_from!r}: checkpoint path ")
    assert not (tmp_path / "run").exists()


def test_an_empty_class_folder_fails_before_the_run_is_touched(reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    _write_image_folder(tmp_path / "images")
    for image in (tmp_path / "images" / "train" / "dog").iterdir():
        image.unlink()
    config = tiny.get_config("s2mlp_tiny")
    config.data.name, config.data.data_dir, config.data.eval_split = "directory", str(tmp_path / "images"), "validation"
    before = _snapshot(workdir)
    with pytest.raises(ValueError, match="holds no images"):
        train_lib.train_and_evaluate(config, str(workdir))
    assert _snapshot(workdir) == before  # config.json, events, metrics.jsonl, checkpoints as they were


def test_a_read_only_workdir_fails_up_front_in_one_message(tmp_path):
    workdir = tmp_path / "readonly"
    workdir.mkdir()
    workdir.chmod(0o555)
    # root ignores permissions: run without CAP_DAC_OVERRIDE so the folder is read-only for the trainer too.
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []
    cmd = [*prefix, sys.executable, "main.py", "--config=configs/tiny.py:s2mlp_tiny", f"--workdir={workdir}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-2000:]
    assert (
        f"ValueError: --workdir={workdir}: {workdir} is not writable (read-only file system or permissions); "
        "choose a writable --workdir (or --eval_dir for --mode=eval)." in done.stderr
    )
    assert "Traceback" not in done.stderr and "events writer" not in done.stderr
    assert list(workdir.iterdir()) == []


def test_metrics_rows_after_the_restored_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4)] + [{"step": 2, "eval_top1": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs.drop_rows_after(path, 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [rows[0], rows[1], rows[4]]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_a_torn_last_metrics_row_is_dropped_on_resume_and_skipped_by_the_report(tmp_path):
    """A full disk or a kill while a row is written leaves a partial last line: the resume drops it, the report
    reads the rows before it."""
    from s2mlp import report

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": float(s)} for s in (1, 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')
    assert report.read_metrics(path) == {1: {"loss": 1.0}, 2: {"loss": 2.0}}
    runs.drop_rows_after(path, 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows


def test_resuming_or_evaluating_as_another_model_is_refused_and_changes_nothing(tiny_s2mlp_run, tmp_path):
    """Same parameter shapes, another function: another shift pattern (resume) or input normalisation (eval)."""
    workdir = tmp_path / "run"
    shutil.copytree(tiny_s2mlp_run, workdir)
    before = _snapshot(workdir)
    config = tiny.get_config("s2mlp_tiny")
    config.total_steps = 8
    config.model.overrides = {"shift_pattern": "none"}
    with pytest.raises(ValueError) as e:
        train_lib.train_and_evaluate(config, str(workdir))
    assert str(e.value) == (
        f"{workdir / 'checkpoints' / '6'} was trained as another model (config.model.overrides.shift_pattern: "
        f"'ss1' -> 'none'). {train_lib.RESUME_ADVICE}"
    )
    config = tiny.get_config("s2mlp_tiny")
    config.data.normalization = "minus_one_to_one"
    with pytest.raises(ValueError, match=r"\(config.data.normalization: 'imagenet' -> 'minus_one_to_one'\)\. --mode="):
        train_lib.evaluate(config, str(workdir))
    assert _snapshot(workdir) == before


def test_resuming_or_evaluating_on_other_classes_is_refused_and_changes_nothing(tiny_s2mlp_run, tmp_path):
    """The same class count in another order fits the head: eval read every output as the wrong label (the demo's
    87% read as 1.3%) and a resume trained on permuted labels. Another count gave the advice to fine-tune."""
    workdir = tmp_path / "run"
    shutil.copytree(tiny_s2mlp_run, workdir)
    before, step_dir = _snapshot(workdir), workdir / "checkpoints" / "6"
    config = tiny.get_config("s2mlp_tiny")
    config.total_steps, config.data.classes = 8, tuple("9876543210")
    with pytest.raises(ValueError) as e:
        train_lib.train_and_evaluate(config, str(workdir))
    assert str(e.value) == (
        f"{step_dir} was trained on other classes or another order of them (label 0 was '0', config.data makes it "
        f"'9'); config.data.name, config.data.data_dir and config.data.classes choose them. {train_lib.RESUME_ADVICE}"
    )
    config.data.classes = ("3", "7", "1")
    with pytest.raises(ValueError) as e:
        train_lib.evaluate(config, str(workdir))
    assert str(e.value) == (
        f"{step_dir} was trained on 10 classes ('0', '1', '2', '3', ...), where config.data gives 3 ('3', '7', '1'); "
        f"config.data.name, config.data.data_dir and config.data.classes choose them. {train_lib.EVAL_ADVICE}"
    )
    assert _snapshot(workdir) == before


def test_evaluating_another_runs_checkpoint_leaves_this_runs_results_alone(tiny_s2mlp_run, tmp_path):
    """They went to <workdir>/eval/<split>_step<N>/, over the per-class results this run's training wrote there."""
    mine, other = tmp_path / "mine", tmp_path / "other"
    shutil.copytree(tiny_s2mlp_run, mine)
    shutil.copytree(tiny_s2mlp_run, other)
    before = _snapshot(mine)
    assert (mine / "eval" / "test_step6" / "per_class.json").is_file()
    out = train_lib.evaluate(tiny.get_config("s2mlp_tiny"), str(mine), checkpoint=str(other))
    record = json.loads((mine / "eval" / "other" / "test_step6" / "metrics.json").read_text())
    assert record["checkpoint"] == str(other / "checkpoints" / "6") and record["eval_top1"] == out["eval_top1"]
    assert {k: v for k, v in _snapshot(mine).items() if "/eval/other/" not in k} == before


def test_evaluating_two_runs_of_one_name_keeps_the_first_ones_results(tiny_s2mlp_run, tmp_path):
    """Both would go to <workdir>/eval/other/<split>_step<N>/: the second is refused before compiling, naming the
    first checkpoint and --eval_dir, and leaves every file as it was; with --eval_dir both are kept."""
    mine, first, second = tmp_path / "mine", tmp_path / "a" / "other", tmp_path / "b" / "other"
    for path in (mine, first, second):
        shutil.copytree(tiny_s2mlp_run, path)
    config = tiny.get_config("s2mlp_tiny")
    train_lib.evaluate(config, str(mine), checkpoint=str(first))
    before, out_dir = _snapshot(mine), mine / "eval" / "other" / "test_step6"
    with pytest.raises(ValueError) as e:
        train_lib.evaluate(config, str(mine), checkpoint=str(second))
    assert str(e.value) == (
        f"{out_dir} holds the results of another checkpoint ({first / 'checkpoints' / '6'}); nothing was changed. "
        "Pass --eval_dir=<another folder> to keep both."
    )
    assert _snapshot(mine) == before
    train_lib.evaluate(config, str(mine), checkpoint=str(second), eval_dir=str(tmp_path / "evals_b"))
    record = json.loads((tmp_path / "evals_b" / "test_step6" / "metrics.json").read_text())
    assert record["checkpoint"] == str(second / "checkpoints" / "6") and _snapshot(mine) == before
    train_lib.evaluate(config, str(mine), checkpoint=str(first))  # the same checkpoint again: its results replaced
    assert json.loads((out_dir / "metrics.json").read_text())["checkpoint"] == str(first / "checkpoints" / "6")


def test_resuming_with_a_changed_recipe_names_the_changes(tiny_s2mlp_run, tmp_path, caplog):
    """A recipe change on a resume (as the NaN message advises) trains on, with a warning naming each change."""
    workdir = tmp_path / "run"
    shutil.copytree(tiny_s2mlp_run, workdir)
    config = tiny.get_config("s2mlp_tiny")
    config.total_steps, config.base_lr, config.compilation_cache_dir = 7, 1e-3, str(tmp_path / "cache")
    with caplog.at_level("WARNING"):
        train_lib.train_and_evaluate(config, str(workdir))
    changes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Resuming with a changed config")]
    assert len(changes) == 1 and changes[0].startswith(
        "Resuming with a changed config: config.base_lr: 0.002 -> 0.001; config.total_steps: 6 -> 7. "
    )
    assert json.loads((workdir / "config.json").read_text())["base_lr"] == 1e-3
