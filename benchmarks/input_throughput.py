"""``python -m benchmarks.run --input_pipeline``: images/s per CPU core of the tf.data input pipeline.

Writes ``--num_images`` JPEGs of ImageNet-like size (default 500×375, quality 90, smooth
random content plus noise) into a temporary image folder ``<tmp>/train/<class>/`` (and
links to them in ``<tmp>/validation/<class>/``, enough for one eval pass), then times the repo's own
iterators on it, ``input_pipeline.build(config)``'s ``train_iterator`` and ``eval_iterator``, with
``configs.common.get_config()``'s recipe and ``config.data.name='directory'``:

* train: JPEG decode of the inception-crop window, bicubic resize, flip, RandAugment
  rand-m9-mstd0.5, normalisation, random erasing 0.25, batching;
* eval: JPEG decode, resize of the shorter side to image_size / 0.875, centre crop,
  normalisation, batching.

Each setting runs with every thread of this process pinned to k CPU cores (Linux
``sched_setaffinity`` on every task) and tf.data's private threadpool set to k threads
(``config.data.num_threads = k``), for k = 1 and k = all cores; images/s is the median
[min–max] over ``--repeats`` windows of 4 batches each, after 2 warm-up batches. Needs
TensorFlow and ml_collections (imported here only).
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

COLUMNS = ("pipeline", "cores", "image", "JPEG", "batch", "images/s", "images/s per core")
WARMUP_BATCHES = 2
WINDOW_BATCHES = 4


def write_jpegs(root: str, count: int, eval_count: int, size: tuple[int, int], *, quality: int = 90) -> float:
    """Writes `count` JPEGs to root/train/c{k}/ (2 classes) and links `eval_count` of them (cycling) into
    root/validation/c{k}/; returns the mean bytes per file."""
    from PIL import Image

    rng = np.random.default_rng(0)
    width, height = size
    paths = []
    for i in range(count):
        folder = os.path.join(root, "train", f"c{i % 2}")
        os.makedirs(folder, exist_ok=True)
        coarse = rng.integers(0, 256, (max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
        pixels = np.clip(smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8)
        paths.append(os.path.join(folder, f"{i:05d}.jpg"))
        Image.fromarray(pixels).save(paths[-1], quality=quality)
    for i in range(eval_count):
        folder = os.path.join(root, "validation", f"c{i % 2}")
        os.makedirs(folder, exist_ok=True)
        source, target = paths[i % count], os.path.join(folder, f"{i:05d}.jpg")
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
    return sum(os.path.getsize(p) for p in paths) / count


def _tasks() -> list[int]:
    return [int(t) for t in os.listdir("/proc/self/task")]


@contextlib.contextmanager
def pinned(cores: list[int]):
    """Every thread of this process (and every thread they start) runs only on `cores`; restored afterwards."""
    if not hasattr(os, "sched_setaffinity") or not os.path.isdir("/proc/self/task"):
        yield False
        return
    before = os.sched_getaffinity(0)
    for tid in _tasks():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, cores)
    try:
        yield True
    finally:
        for tid in _tasks():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, before)


def _rates(batches, batch: int, repeats: int) -> list[float]:
    for _ in range(WARMUP_BATCHES):
        next(batches)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(WINDOW_BATCHES):
            next(batches)
        rates.append(WINDOW_BATCHES * batch / (time.perf_counter() - start))
    return rates


def main(args, argv: list[str], started: str) -> dict:
    import input_pipeline
    from benchmarks.common import fmt, header, markdown_table
    from configs import common

    width, height = (int(x) for x in args.jpeg_size.split(","))
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count()))
    core_counts = sorted(
        {len(allowed) if k == "all" else min(int(k), len(allowed)) for k in args.input_cores.split(",")}
    )
    batch = args.batch
    rows = []
    with tempfile.TemporaryDirectory(prefix="s2mlp_jpegs_") as root:
        # The eval iterator makes one pass: give it enough images for the warm-up and every window.
        eval_count = (WARMUP_BATCHES + WINDOW_BATCHES * args.repeats + 1) * batch
        mean_bytes = write_jpegs(root, args.num_images, eval_count, (width, height))
        config = common.get_config("v2")
        config.data.name = "directory"
        config.data.data_dir = root
        config.image_size = args.image_size
        config.batch_size = config.eval_batch_size = batch
        pinning = True
        for cores in core_counts:
            config.data.num_threads = cores  # tf.data's private pool: one thread per pinned core
            with pinned(allowed[:cores]) as ok:
                pinning &= ok
                data = input_pipeline.build(config)  # the folder is scanned once for both iterators
                for name, make in (
                    ("train (decode+inception crop+flip+RandAugment+erase)", data.train_iterator),
                    ("eval (decode+resize+center crop)", data.eval_iterator),
                ):
                    batches = make()  # made inside the pinned block; only one iterator alive at a time
                    rates = _rates(batches, batch, args.repeats)
                    del batches
                    gc.collect()
                    row = {
                        "pipeline": name,
                        "cores": cores,
                        "images_per_s": rates,
                        "images_per_s_per_core": [r / cores for r in rates],
                    }
                    per_core = row["images_per_s_per_core"]
                    row["cells"] = [
                        name, str(cores), str(args.image_size), f"{width}×{height} q90 ({mean_bytes / 1024:.0f} KiB)",
                        str(batch),
                        f"{fmt(statistics.median(rates))} [{fmt(min(rates))}–{fmt(max(rates))}]",
                        f"{fmt(statistics.median(per_core))} [{fmt(min(per_core))}–{fmt(max(per_core))}]",
                    ]  # fmt: skip
                    rows.append(row)
    import tensorflow as tf

    extra = [
        f"tensorflow {tf.__version__}; input_pipeline.build(config).train_iterator / eval_iterator on a "
        f"'directory' dataset of {args.num_images} JPEGs per split, configs.common.get_config('v2') augmentation",
        f"k cores: every thread pinned to k cores ({'sched_setaffinity' if pinning else 'NOT pinned: no affinity API'})"
        f" and config.data.num_threads = k (tf.data private_threadpool_size); images/s: median [min–max] of "
        f"{args.repeats} windows of {WINDOW_BATCHES} batches after {WARMUP_BATCHES} warm-up batches",
    ]
    text = header(argv, extra, started) + "\n\n" + markdown_table(COLUMNS, rows) + "\n"
    print(text)
    if args.output:
        with open(args.output, "a") as f:
            f.write(text + "\n")
    return {"rows": rows, "markdown": text}
