"""What surrounds the train loop: the workdir's lock and files, metric writers, stop signals, profiler, log filter.

TF-free at import (clu, which TensorBoard events need, is imported by `TensorBoardWriter`).
A workdir holds ``config.json``, ``metrics.jsonl`` (one JSON row per logged step), TensorBoard
events, ``checkpoints/`` (`s2mlp.checkpoint`) and ``.lock`` (`WorkdirLock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging as std_logging
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from s2mlp import checkpoint as ckpt
from s2mlp.report import METRICS_FILE, metrics_row, read_metrics

# Exit status of main.py when SIGTERM/SIGINT stopped training after saving a checkpoint (sysexits' EX_TEMPFAIL:
# "try again"); rerunning the same command resumes. Checked errors exit with 1; a second signal kills the process.
EXIT_STOPPED = 75
EVAL_RECORD = "metrics.json"  # an eval-only run's results, in its <split>_step<N>/ folder


class WorkdirBusy(RuntimeError):
    """Another live trainer holds the workdir's lock."""


class JsonlWriter:
    """Appends ``{"step": s, name: value, ...}`` lines to a file; the two MetricWriter methods the trainer's
    `clu.metric_writers.MultiWriter` calls (write_scalars, flush)."""

    def __init__(self, path: epath.Path):
        self._path = path

    def write_scalars(self, step: int, scalars) -> None:
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with self._path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def flush(self):
        pass


class ProfileTrace(contextlib.AbstractContextManager):
    """A `jax.profiler` trace of steps first .. first+num-1 into `logdir`; `steps` = (first, num), config.profile_steps.

    Open the trace with TensorBoard's profile plugin (``tensorboard --logdir=WORKDIR/profile``) or load
    ``WORKDIR/profile/plugins/profile/<run>/*.xplane.pb`` / ``*.trace.json.gz`` in Perfetto (README).
    """

    def __init__(self, steps: tuple[int, int], logdir: epath.Path):
        self.first, self.num = tuple(steps or (0, 0))
        self.logdir, self.active = logdir, False

    def before(self, step: int) -> None:
        if self.num and step == self.first:
            jax.profiler.start_trace(str(self.logdir))
            self.active = True

    def after(self, step: int, state) -> None:
        if self.active and step == self.first + self.num - 1:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            logging.info(
                "Profiler trace of steps %d-%d written to %s.", self.first, self.first + self.num - 1, self.logdir
            )

    def __exit__(self, *exc) -> None:
        self.stop()  # a run that ends or stops inside the traced steps still writes what it traced


def run_writers(workdir: epath.Path, config, evals: Sequence[str], *, resumed_at: int):
    """The metric writers of a run in `workdir` (a clu MultiWriter): on process 0 metrics.jsonl and TensorBoard events
    (`evals`: config.evals' names), after writing config.json and dropping what an earlier attempt logged after step
    `resumed_at`, its last checkpoint (0 when it saved none), since that is trained again; on the others none."""
    from clu import metric_writers

    if jax.process_index() != 0:
        return metric_writers.MultiWriter([])
    drop_rows_after(workdir / METRICS_FILE, resumed_at)
    drop_events_after(workdir, resumed_at)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    tensorboard = TensorBoardWriter(workdir, config.data.eval_split, evals=evals)
    tensorboard.write_config(config)
    return metric_writers.MultiWriter([tensorboard, JsonlWriter(workdir / METRICS_FILE)])


def write_eval_results(out_dir: epath.Path, record: dict[str, Any], metrics: dict[str, float], split: str,
                       evals: Sequence[str]) -> None:  # fmt: skip
    """An eval-only run's results in `out_dir`: ``metrics.json`` (`record`) and TensorBoard events of `metrics` at
    record['step'] (`TensorBoardWriter`'s tags), replacing those of an earlier eval of the same step."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("events.out.tfevents.*"):  # an earlier eval of this step: replaced, not doubled
        old.unlink()
    (out_dir / EVAL_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    tensorboard = TensorBoardWriter(out_dir, split, evals=evals)
    tensorboard.write_scalars(record["step"], metrics)
    tensorboard.close()


def check_eval_dir(out_dir: epath.Path, step_dir: epath.Path) -> None:
    """ValueError when `out_dir` holds an eval-only run's results of another checkpoint than `step_dir` (say two
    runs of one name, each evaluated from the same workdir): `write_eval_results` would replace them."""
    record = out_dir / EVAL_RECORD
    if not record.exists():
        return
    try:
        before = json.loads(record.read_text()).get("checkpoint")
    except ValueError:  # torn by a killed eval: replaced
        return
    if before != str(step_dir):
        raise ValueError(
            f"{out_dir} holds the results of another checkpoint ({before}); nothing was changed. Pass "
            "--eval_dir=<another folder> to keep both."
        )


def last_eval(path: epath.Path) -> dict[str, float]:
    """The eval metrics of the last evaluated step in metrics.jsonl ({} when there is none)."""
    evals = [row for row in read_metrics(path).values() if "eval_top1" in row]
    return {k: v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else {}


class TensorBoardWriter:
    """TensorBoard events with tags grouped per split: ``train/loss``, ``train/lr``, ``<eval_split>/top1``,
    ``<eval_split>/ema_top1``, ... (``train_eval/top1``, ... when the eval split is 'train') and, for each other
    eval NAME of `evals` (config.evals), ``NAME/top1``, ``NAME/ema_top1``, ...; each eval's example count is text
    (once), not a curve. Takes metrics.jsonl's flat keys (``eval_top1``, ``eval_NAME_top1``: `s2mlp.evals`)."""

    def __init__(self, logdir: epath.Path, eval_split: str, evals: Sequence[str] = ()):
        from clu import metric_writers

        self._writer = metric_writers.SummaryWriter(str(logdir))
        # An eval on the train split gets its own group: 'train/loss' is the training loss.
        self._split = "train_eval" if eval_split == "train" else eval_split
        self._evals = tuple(evals)
        self._counted: set[str] = set()

    def write_scalars(self, step: int, scalars) -> None:
        from s2mlp.evals import split_key

        named = {}
        for key, value in scalars.items():
            if not key.startswith("eval_"):
                named[f"train/{key}"] = value
                continue
            name, metric = split_key(key, self._evals)
            group = name or self._split
            if metric.endswith("num_examples"):
                if group not in self._counted:
                    self._writer.write_texts(step, {f"{group}/num_examples": f"{int(value):,}"})
                    self._counted.add(group)
            else:
                named[f"{group}/{metric}"] = value
        self._writer.write_scalars(step, named)

    def write_config(self, config) -> None:
        """The config as text (JSON) and its scalar fields as hparams (``model.name``, ``base_lr``, ...)."""
        self._writer.write_texts(0, {"config": "```\n" + config.to_json_best_effort(indent=2) + "\n```"})
        self._writer.write_hparams(flat_scalars(config.to_dict()))

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


def flat_scalars(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{'model.name': 's2mlp_tiny', 'base_lr': 0.002, ...}``: every leaf as bool, int, float or str."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flat_scalars(value, name + ".")
        elif value is not None:
            flat[name] = value if isinstance(value, bool | int | float | str) else str(value)
    return flat


def drop_rows_after(path: epath.Path, step: int) -> None:
    """Rewrites metrics.jsonl (atomically) without rows after `step`: after a resume each step appears once. A
    line that is not a JSON row (torn by a full disk or a kill during its write) is dropped too."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if (row := metrics_row(line)) is not None and row["step"] <= step]
    if len(kept) < len(lines):
        tmp = path.parent / (path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)
        logging.info("Dropped %d rows after step %d from %s (trained again).", len(lines) - len(kept), step, path)


def drop_events_after(logdir: epath.Path, step: int) -> None:
    """Rewrites the TensorBoard event files of `logdir` (its eval/ and profile/ folders aside) without the points
    after `step`, nor the step-0 config text and hparams (each start writes them anew); a file left without any
    point is removed. With `drop_rows_after`, a restarted run shows each step once, also when the attempt before
    ended ahead of its first checkpoint (`step` 0). A file cut short by a kill keeps its readable events."""
    import tensorflow as tf
    from tensorboard.compat.proto import event_pb2

    dropped = 0
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        records = tf.data.TFRecordDataset(str(path)).ignore_errors()  # a record cut by a kill ends the file
        events = [event_pb2.Event.FromString(record.numpy()) for record in records]
        keep = [e for e in events if not e.HasField("summary") or 0 < e.step <= step]
        dropped += sum(len(e.summary.value) for e in events) - sum(len(e.summary.value) for e in keep)
        if not any(e.HasField("summary") for e in keep):
            path.unlink()
        elif len(keep) < len(events):
            tmp = path.parent / (path.name + ".tmp")
            with tf.io.TFRecordWriter(str(tmp)) as writer:
                for event in keep:
                    writer.write(event.SerializeToString())
            tmp.replace(path)
    if dropped:
        logging.info("Dropped %d TensorBoard points after step %d from %s (trained again).", dropped, step, logdir)


def check_writable(path: epath.Path, flag: str) -> None:
    """`path` (or, when it does not exist yet, its nearest existing parent) must be a writable folder."""
    if "://" in str(path):  # a bucket: its permissions show only on the first write
        return
    existing = path
    while not os.path.exists(existing) and existing != existing.parent:
        existing = existing.parent
    if not os.path.isdir(existing):
        raise ValueError(f"{flag}={path}: {existing} is not a folder; choose another {flag}.")
    for p in [existing] + [existing / name for name in ("config.json", METRICS_FILE, ckpt.CHECKPOINTS, LOCK_FILE)]:
        if os.path.exists(p) and not os.access(p, os.W_OK):
            raise ValueError(
                f"{flag}={path}: {p} is not writable (read-only file system or permissions); choose a writable "
                f"{flag}{' (or --eval_dir for --mode=eval)' if flag == '--workdir' else ''}."
            )


LOCK_FILE = ".lock"


class WorkdirLock:
    """An exclusive `fcntl.flock` on ``WORKDIR/.lock`` while a trainer runs in WORKDIR.

    Process 0 takes it (creating WORKDIR) and tells the other processes whether it got it. The file names
    its holder (pid, host, start time) and is emptied when the run ends; it is never deleted while in use
    (deleting a lock file races with the next taker). The kernel releases the lock when its process dies,
    so a killed run never blocks its resume. A run that fails before `started()` puts the file (and a
    workdir it created) back as they were. Workdirs on buckets (``gs://``) are not locked.
    """

    def __init__(self, workdir: epath.Path):
        self._path = workdir / LOCK_FILE
        self._fd: int | None = None
        self._started = False
        self._undo: list[Any] = []  # what __exit__ does when the run failed before it started

    def __enter__(self) -> WorkdirLock:
        from jax.experimental import multihost_utils

        error = ""
        if jax.process_index() == 0 and "://" not in str(self._path):
            error = self._take()
        elif jax.process_index() == 0:
            logging.warning("%s is not a local path: it is not locked against a second trainer.", self._path.parent)
        if jax.process_count() > 1:
            busy = multihost_utils.broadcast_one_to_all(np.int32(bool(error)))
            error = error or (f"process 0 found --workdir={self._path.parent} in use by another trainer." * int(busy))
        if error:
            self.__exit__()
            raise WorkdirBusy(error)
        return self

    def _take(self) -> str:
        """Locks the file and writes the holder into it; '' when done, else why not."""
        workdir = self._path.parent
        if not workdir.exists():
            workdir.mkdir(parents=True)
            self._undo.append(lambda: os.rmdir(workdir) if not os.listdir(workdir) else None)
        existed = self._path.exists()
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "holder not recorded"
            os.close(fd)
            return (
                f"--workdir={workdir} is in use by another trainer ({holder}). Wait for it to end "
                "(or stop it: SIGTERM saves a checkpoint), or choose another --workdir. Nothing was changed."
            )
        self._fd = fd
        if existed:
            st, content = os.fstat(fd), os.pread(fd, 1 << 16, 0)
            self._undo.insert(0, lambda: self._write(content, times=(st.st_atime_ns, st.st_mtime_ns)))
        else:
            self._undo.insert(0, lambda: os.unlink(self._path))
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        self._write(f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode())
        return ""

    def _write(self, content: bytes, times: tuple[int, int] | None = None) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, content, 0)
        if times:
            os.utime(self._fd, ns=times)

    def started(self) -> None:
        """The run passed every check and writes into the workdir from here on: no undo on failure."""
        self._started = True

    def __exit__(self, *exc) -> None:
        if self._fd is not None and self._started:
            os.ftruncate(self._fd, 0)
        for undo in [] if self._started else self._undo:
            undo()
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None
        self._undo.clear()


class Stopped(Exception):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint; main.py exits with EXIT_STOPPED."""


class StopSignals:
    """SIGTERM and SIGINT ask the train loop to stop after the current step (it saves a checkpoint there).

    A second signal ends the process at once (the first restores the default handlers, so the shell sees
    128 + signum). One process: the handler sets a flag that the loop reads after every step. Several
    processes must stop at the same step: there SIGTERM is left to JAX's preemption service
    (`jax.distributed.initialize` starts it; it catches SIGTERM on any process) and the loop asks
    `multihost_utils.reached_preemption_sync_point(step)` after every step, which turns True on every
    process at the same step. SIGINT keeps Python's default there (stop at once; rerunning resumes from
    the last periodic checkpoint).
    """

    def __init__(self):
        from jax._src import distributed  # whether jax.distributed started the preemption service

        self.received: str | None = None
        manager = getattr(getattr(distributed, "global_state", None), "preemption_sync_manager", None)
        self._synced = jax.process_count() > 1 and manager is not None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        for other in self._previous:
            signal.signal(other, signal.SIG_DFL)  # the next one ends the process, even inside a long XLA call
        logging.warning("%s received: stopping after the current step (a second signal ends at once).", self.received)

    def should_stop(self, step: int) -> bool:
        if self._synced:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.received = self.received or "SIGTERM"
        return self.received is not None

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class QuietLibraries(std_logging.Filter):
    """Keeps INFO lines from this project's files (the checkout `checkout`, where main.py and study.py are, and the
    `s2mlp` package, wherever it is installed); libraries (Orbax, JAX, TF) still show warnings and errors, each
    distinct one once (Orbax warns at every checkpoint saved without eval metrics, for one). main.py and study.py
    add it to absl's handler."""

    def __init__(self, checkout: str):
        super().__init__()
        self._checkout = os.path.join(os.path.abspath(checkout), "")
        self._package = os.path.join(os.path.dirname(os.path.abspath(__file__)), "")
        self._seen: set[tuple[str, int, str]] = set()

    def _own(self, path: str) -> bool:
        """The `s2mlp` package (also installed in site-packages), or the checkout less a virtualenv inside it."""
        path = os.path.abspath(path)
        return path.startswith(self._package) or (path.startswith(self._checkout) and "site-packages" not in path)

    def filter(self, record) -> bool:
        if self._own(record.pathname):
            return True
        if record.levelno < std_logging.WARNING:
            return False
        if record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname:
            # A failed save: a traceback from each of Orbax's save threads. The trainer stops with one line naming
            # the step and the cause (checkpoint.SaveFailed); a failed read raises checkpoint.BadCheckpoint.
            return False
        key = (record.pathname, record.lineno, record.getMessage())
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


def enable_compilation_cache(directory: str) -> None:
    """JAX's persistent compilation cache in `directory` ('~' expanded; '' leaves it off), for every program.

    Call before the first compile. Entries are keyed by the program, the JAX/XLA versions and the
    devices, so one directory serves every run (main.py: config.compilation_cache_dir; study.py's runner:
    WORKDIR/compilation_cache).
    """
    if not directory:
        return
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class Throughput:
    """Images/s since the last logged step and the ETA from the mean step time since the start."""

    def __init__(self, start_step: int, total_steps: int, batch_size: int):
        self.start_step, self.total_steps, self.batch_size = start_step, total_steps, batch_size
        self.t_start = self.t_last = time.time()
        self.step_last = start_step

    def next(self, step: int) -> tuple[float, float]:
        """(images/s since the previous call, seconds left); call once per logged step."""
        now = time.time()
        images_per_s = (step - self.step_last) * self.batch_size / (now - self.t_last)
        eta = (self.total_steps - step) * (now - self.t_start) / max(step - self.start_step, 1)
        self.t_last, self.step_last = now, step
        return images_per_s, eta


def exit_now(status: int):
    """Exits with `status` once the logs are flushed, without the interpreter's teardown (joining library threads,
    TensorFlow's and XLA's destructors: seconds, or for ever after a failed save)."""
    if jax.process_count() > 1:
        jax.distributed.shutdown()
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@contextlib.contextmanager
def native_stderr_once():
    """Passes each distinct line that native code writes to stderr meanwhile on once.

    TensorFlow loads two extension modules (``_pywrap_cpu_feature_guard`` and the profiler's
    ``_pywrap_profiler_plugin``) that each carry their own copy of absl's C++ logging and of TF's start-up
    check, so absl's "All log messages before absl::InitializeLog()" warning and TF's oneDNN notice print
    twice; Python's logging is not involved. Lines are compared without their timestamp and thread id.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            seen = set()
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                key = re.sub(r"^[IWEF]\d{4} [\d:.]+\s+\d+ ", "", line)
                if key not in seen:
                    seen.add(key)
                    sys.stderr.write(line)
            sys.stderr.flush()
