"""``python -m benchmarks.run --input_pipeline``: the tf.data input pipeline's images/s, as ratios to anchors.

Writes ``--num_images`` JPEGs of ImageNet-like size (default 500×375, quality 90, smooth
random content plus noise) into a temporary image folder ``<tmp>/train/<class>/`` (and
links to them in ``<tmp>/validation/<class>/``, enough for one eval window), then times seven
pipelines on those files, each batching ``--batch`` images of side ``--image_size``:

* anchor "decode floor": plain tf.data, ``tf.io.decode_jpeg`` of the whole file and nothing else
  (each example returns only its shape, so batching costs nothing);
* anchor "plain tf.data crop+flip": plain tf.data, ``tf.image.decode_and_crop_jpeg`` of an
  inception-crop window (``tf.image.stateless_sample_distorted_bounding_box``: area 0.08–1, aspect
  3/4–4/3, 10 attempts, the whole image as the box), ``tf.image.resize`` bilinear without antialiasing,
  ``tf.image.stateless_random_flip_left_right``, scaled to [0, 1] float32; per-example stateless keys
  folded in from the element index;
* "train: crop+flip": the repo's ``input_pipeline.build(config).train_iterator`` with
  ``configs.common.get_config('v2')``, ``config.data.name='directory'`` and its chain (``augment.ops``)
  without the ``randaugment`` and ``erase`` ops (`crop_flip_config`): decode of the random-resized-crop window
  (timm's), bicubic antialiased resize, flip, normalisation;
* "train: crop+flip, bilinear": the same with ``random_resized_crop(0.08, 'bilinear')``: bilinear resize without
  antialiasing, as the plain anchor;
* "train: full v2 recipe": the same with the v2 chain unchanged (adds RandAugment rand-m9-mstd0.5 and
  random erasing 0.25);
* "train: v2, to_device after flip (host part)": the v2 chain with ``to_device`` after ``flip``: what the host
  still does when RandAugment, normalisation and erasing run in the train step (uint8 batches);
* "eval": the repo's ``eval_iterator`` (decode, resize of the shorter side to image_size / 0.875, centre
  crop, normalisation).

The anchors read the same JPEG files, loaded into memory once
(``Dataset.from_tensor_slices(bytes).repeat()``), so no file IO is timed; the repo's 'directory'
source reads each file from disk (``tf.io.read_file``, page-cached after the first pass) inside its map.
Every pipeline maps with ``num_parallel_calls=AUTOTUNE``, batches, prefetches (AUTOTUNE) and is
iterated with ``as_numpy_iterator``.

For each core count k (``--input_cores``) every thread of this process is pinned to k CPU cores
(Linux ``sched_setaffinity`` on every task) and each pipeline gets a tf.data private threadpool of k
threads with intra-op parallelism 1 (``config.data.num_threads = k`` for the repo's; the same options,
set directly, for the anchors). Timing runs in ``--repeats`` rounds: round r times every pipeline once,
in the same order, each on a fresh iterator (only one alive at a time, so no background prefetching
overlaps another's window): 2 untimed warm-up batches, then one window of 4 batches. Slow drifts of a
shared machine's load thus reach every row alike. ``input_pipeline.build(config)`` runs once per (config,
k); each round only makes a new iterator. images/s is the median [min–max] over rounds; "vs plain
crop+flip" and "vs decode floor" divide a row's median by that anchor's median at the same k, so they
hold on any host. After the table, the targets at 1 core (printed, never asserted): train
crop+flip ≥ 0.9× plain crop+flip, full v2 recipe ≥ 0.5× plain crop+flip, eval ≥ 0.8× decode floor,
and the full recipe's per-core scaling from 1 core to the largest k (linear ≈ 1.0).

Then, at 1 core, the **per-op cost table**: each op of the chain registry (s2mlp/augment_chain.py) once, with
where it may run. Its host cost is timed in the same rounds as the table above, as the repo's iterator of a
chain (``PER_OP``): a decoding op's (``random_resized_crop``, ``inception_crop`` bilinear, ``resize``) is its whole
pipeline's ms per image (file read, decode, resize, batching, with the uint8 batch sent on ``to_device``); every
other op's is the ms per image of the chain through it minus that of the chain without it, paired round by round
(so a cheap op can read slightly negative on a noisy machine). Its device cost is the op alone,
``s2mlp.augment.apply`` jitted on a batch of ``--batch`` random uint8 images of ``--image_size`` (erase: on
normalised ones) on JAX's default backend, timed ``--repeats`` times after a compile. Needs TensorFlow and
ml_collections (imported here only).
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

COLUMNS = (
    "pipeline",
    "cores",
    "image",
    "JPEG",
    "batch",
    "images/s",
    "images/s per core",
    "vs plain crop+flip",
    "vs decode floor",
)
DECODE_FLOOR = "anchor: decode floor (tf.data, files in memory)"
PLAIN_CROP_FLIP = "anchor: plain tf.data crop+flip (files in memory)"
TRAIN_CROP_FLIP = "train: crop+flip"
TRAIN_CROP_FLIP_BILINEAR = "train: crop+flip, bilinear"
TRAIN_FULL = "train: full v2 recipe"
TRAIN_TO_DEVICE = "train: v2, to_device after flip (host part)"
EVAL = "eval"
PIPELINES = (
    DECODE_FLOOR,
    PLAIN_CROP_FLIP,
    TRAIN_CROP_FLIP,
    TRAIN_CROP_FLIP_BILINEAR,
    TRAIN_FULL,
    TRAIN_TO_DEVICE,
    EVAL,
)  # fmt: skip  (timing order within a round)
# The per-op cost table (1 core): one host chain per op, the op last. An op's host cost is the time per image of its
# chain minus that of the chain without it (`split_last`), in the same round; a decoding op, alone in its chain, is
# charged its whole chain (file read, decode, resize, batching). Chains that end on uint8 send their batches to the
# device (`to_device|normalize`, not timed); `normalize` therefore also pays for float32 batches.
# configs/common.py's v2 chain
_V2 = "random_resized_crop(0.08)|flip|randaugment(2, 9, 0.5, increasing=True)|normalize|erase(0.25)".split("|")
PER_OP = (
    _V2[0],
    "inception_crop(0.08, 'bilinear')",
    "resize",
    "|".join(_V2[:2]),
    f"{_V2[0]}|pad_crop(4)",
    *("|".join(_V2[:k]) for k in (3, 4, 5)),
)
PER_OP_COLUMNS = ("op", "runs on", "host ms/image (1 core)", "host: timed as", "device ms/image (jitted)")
WARMUP_BATCHES = 2
WINDOW_BATCHES = 4
ANCHOR_SEED = 0
# (name, the pipeline timed, the anchor, the least ratio); all at 1 core.
TARGETS = (
    (TRAIN_CROP_FLIP, PLAIN_CROP_FLIP, 0.9),
    (TRAIN_FULL, PLAIN_CROP_FLIP, 0.5),
    (EVAL, DECODE_FLOOR, 0.8),
)


def write_jpegs(root: str, count: int, eval_count: int, size: tuple[int, int], *, quality: int = 90) -> list[str]:
    """Writes `count` JPEGs to root/train/c{k}/ (2 classes) and links `eval_count` of them (cycling) into
    root/validation/c{k}/; returns the train files' paths."""
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
    return paths


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


def anchor_datasets(files: list[bytes], *, image_size: int, batch: int, threads: int) -> dict:
    """{name: tf.data.Dataset} of the two anchors, plain tf.data on the JPEG bytes `files` (held in memory),
    with a private threadpool of `threads` threads and intra-op parallelism 1, like the repo's pipelines."""
    import tensorflow as tf

    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    records = tf.data.Dataset.from_tensor_slices(files).repeat().enumerate()  # the bytes are in memory
    base = tf.constant([ANCHOR_SEED, 0], tf.int64)
    size = [image_size, image_size]

    def decode_floor(index, jpeg):
        return tf.shape(tf.io.decode_jpeg(jpeg, channels=3))

    def crop_flip(index, jpeg):
        keys = tf.random.experimental.stateless_split(tf.random.experimental.stateless_fold_in(base, index), 2)
        begin, window, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.image.extract_jpeg_shape(jpeg),
            tf.zeros([1, 0, 4]),
            seed=keys[0],
            min_object_covered=0.0,
            aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.08, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        crop = tf.stack([begin[0], begin[1], window[0], window[1]])
        image = tf.image.decode_and_crop_jpeg(jpeg, crop, channels=3)
        image = tf.image.resize(image, size, method="bilinear", antialias=False)
        image = tf.image.stateless_random_flip_left_right(image, keys[1])
        return tf.ensure_shape(image / 255.0, size + [3])

    out = {}
    for name, fn in ((DECODE_FLOOR, decode_floor), (PLAIN_CROP_FLIP, crop_flip)):
        ds = records.map(tf.autograph.experimental.do_not_convert(fn), num_parallel_calls=tf.data.AUTOTUNE)
        out[name] = ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE).with_options(options)
    return out


def chain_variant(config, edit):
    """A copy of `config` whose chain (``augment.ops``, s2mlp/augment_chain.py, host ops) becomes ``edit(ops)``: the
    ops' texts, joined."""
    from s2mlp import augment_chain

    config = config.copy_and_resolve_references()
    config.augment.ops = "|".join(edit(augment_chain.parse(config.augment.ops).host))
    return config


def crop_flip_config(config):
    """`config` without its randaugment and erase ops."""
    return chain_variant(config, lambda ops: [op.text for op in ops if op.name not in ("randaugment", "erase")])


def bilinear_config(config):
    """`config` with its crop (random_resized_crop or inception_crop) resized bilinearly."""
    crops = ("random_resized_crop", "inception_crop")
    return chain_variant(
        config,
        lambda ops: [f"{op.name}({op.kwargs['area_min']}, 'bilinear')" if op.name in crops else op.text for op in ops],
    )


def to_device_config(config):
    """`config` with the ops after its flip sent to the device."""

    def edit(ops):
        texts = []
        for op in ops:
            texts += [op.text, "to_device"] if op.name == "flip" else [op.text]
        return texts

    return chain_variant(config, edit)


def host_chain(chain: str) -> str:
    """`chain` as a whole recipe: a chain of host ops ending on uint8 sends its batches to the device (the
    `to_device|normalize` after it, not timed here)."""
    from s2mlp import augment_chain

    try:
        augment_chain.parse(chain)  # ends on normalised images: a whole recipe already
        return chain
    except ValueError:
        return f"{chain}|to_device|normalize"


def split_last(chain: str) -> tuple[str, str | None]:
    """(the last op of `chain` as written, the chain without it; None for a chain of one op)."""
    base, _, text = chain.rpartition("|")
    return text, base or None


def last_op(chain: str):
    """The last host op of `chain`, parsed (s2mlp/augment_chain.py): the op a PER_OP row times."""
    from s2mlp import augment_chain

    return augment_chain.parse(host_chain(chain)).host[-1]


def host_chain_config(config, chain: str):
    """A copy of `config` whose recipe is `host_chain(chain)`."""
    config = config.copy_and_resolve_references()
    config.augment.ops = host_chain(chain)
    return config


def device_costs(config, batch: int, repeats: int) -> dict[str, list[float]]:
    """{op text: ms per image of each timed call} for every op of PER_OP that can run on the device: the op alone,
    jitted on a batch of `batch` uint8 images of config.image_size (erase: on normalised ones), as the train step
    runs it (`s2mlp.augment.apply`)."""
    import jax
    import jax.numpy as jnp

    from s2mlp import augment, preprocessing

    size, norm = config.image_size, config.data.normalization
    images = jax.random.randint(jax.random.key(0), (batch, size, size, 3), 0, 256).astype(jnp.uint8)
    floats = augment.normalize(images, *preprocessing.mean_std(norm))
    out = {}
    for chain in PER_OP:
        op = last_op(chain)
        if not op.spec.device:
            continue
        run = jax.jit(lambda x, key, ops=(op,): augment.apply(ops, x, key, norm))
        x = floats if op.spec.takes == "float" else images
        run(x, jax.random.key(2)).block_until_ready()  # compile
        times = []
        for r in range(repeats):
            start = time.perf_counter()
            run(x, jax.random.key(3 + r)).block_until_ready()
            times.append(1000 * (time.perf_counter() - start) / batch)
        out[op.text] = times
    return out


def per_op_rows(host_rates: dict[str, list[float]], device_ms: dict[str, list[float]]) -> list[dict]:
    """The per-op cost table's rows: host ms/image per round (an op's chain minus the chain without it), device ms."""
    from benchmarks.common import spread

    rows = []
    for chain in PER_OP:
        (text, base), spec = split_last(chain), last_op(chain).spec
        ms = [1000 / r for r in host_rates[chain]]
        if base is not None:
            ms = [a - 1000 / b for a, b in zip(ms, host_rates[base], strict=True)]
        device = device_ms.get(text)
        row = {"op": text, "host_ms": ms, "device_ms": device}
        row["cells"] = [
            text,
            "host, device" if spec.device else "host",
            spread(ms),
            f"added to {base.replace('|', ' + ')}" if base else "the whole pipeline",
            spread(device) if device else "—",
        ]
        rows.append(row)
    return rows


def augment_text(config) -> str:
    return f"augment.ops={config.augment.ops!r}"


def window_rate(make, batch: int) -> float:
    """images/s of one window of WINDOW_BATCHES batches of a fresh iterator `make()`, after WARMUP_BATCHES
    untimed ones; the iterator (and its background threads) is gone before this returns."""
    batches = make()
    for _ in range(WARMUP_BATCHES):
        next(batches)
    start = time.perf_counter()
    for _ in range(WINDOW_BATCHES):
        next(batches)
    rate = WINDOW_BATCHES * batch / (time.perf_counter() - start)
    del batches
    gc.collect()
    return rate


def ratio(x: float) -> str:
    return f"{x:.2f}×"


def targets(medians: dict, core_counts: list[int]) -> list[str]:
    """The throughput targets at 1 core (BENCHMARKS.md) with the measured ratios, and the full recipe's scaling."""
    lines = []
    if 1 not in core_counts:
        lines.append("targets: not checked (they are at 1 core; run with --input_cores including 1)")
    else:
        for name, anchor, least in TARGETS:
            got = medians[name, 1] / medians[anchor, 1]
            lines.append(
                f"target: {name} ≥ {least}× {anchor.split(' (')[0].removeprefix('anchor: ')} at 1 core: "
                f"{ratio(got)} {'PASS' if got >= least else 'MISS'}"
            )
    top = max(core_counts)
    if 1 in core_counts and top > 1:
        scale = (medians[TRAIN_FULL, top] / top) / medians[TRAIN_FULL, 1]
        lines.append(
            f"scaling: {TRAIN_FULL}, images/s per core at {top} cores ÷ at 1 core: {ratio(scale)} (linear ≈ 1.00×)"
        )
    else:
        lines.append(f"scaling: {TRAIN_FULL}: not measured (needs 1 core and more than 1 in --input_cores)")
    return lines


def main(args, argv: list[str], started: str) -> dict:
    import jax
    import tensorflow as tf

    import input_pipeline
    from benchmarks.common import fmt, header, markdown_table
    from configs import common

    width, height = (int(x) for x in args.jpeg_size.split(","))
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count()))
    core_counts = sorted(
        {len(allowed) if k == "all" else min(int(k), len(allowed)) for k in args.input_cores.split(",")}
    )
    batch = args.batch
    rates = {(name, cores): [] for cores in core_counts for name in PIPELINES}
    with tempfile.TemporaryDirectory(prefix="s2mlp_jpegs_") as root:
        # Each round's eval iterator makes a fresh pass: give it enough images for the warm-up and one window.
        eval_count = (WARMUP_BATCHES + WINDOW_BATCHES + 1) * batch
        paths = write_jpegs(root, args.num_images, eval_count, (width, height))
        files = []
        for path in paths:
            with open(path, "rb") as f:
                files.append(f.read())
        mean_bytes = sum(map(len, files)) / len(files)
        full = common.get_config("v2")
        full.data.name = "directory"
        full.data.data_dir = root
        full.image_size = args.image_size
        full.batch_size = full.eval_batch_size = batch
        crop_flip = crop_flip_config(full)
        bilinear, to_device = bilinear_config(crop_flip), to_device_config(full)
        op_configs = {chain: host_chain_config(full, chain) for chain in PER_OP} if 1 in core_counts else {}
        op_rates = {chain: [] for chain in op_configs}
        device_ms = {}
        pinning = True
        for cores in core_counts:
            for config in (full, crop_flip, bilinear, to_device, *op_configs.values()):
                config.data.num_threads = cores  # tf.data's private pool: k threads
            with pinned(allowed[:cores]) as ok:
                pinning &= ok
                anchors = anchor_datasets(files, image_size=args.image_size, batch=batch, threads=cores)
                full_data = input_pipeline.build(full)  # each source is scanned once per (config, k)
                crop_flip_data = input_pipeline.build(crop_flip)
                bilinear_data, to_device_data = input_pipeline.build(bilinear), input_pipeline.build(to_device)
                makers = {
                    DECODE_FLOOR: anchors[DECODE_FLOOR].as_numpy_iterator,
                    PLAIN_CROP_FLIP: anchors[PLAIN_CROP_FLIP].as_numpy_iterator,
                    TRAIN_CROP_FLIP: crop_flip_data.train_iterator,
                    TRAIN_CROP_FLIP_BILINEAR: bilinear_data.train_iterator,
                    TRAIN_FULL: full_data.train_iterator,
                    TRAIN_TO_DEVICE: to_device_data.train_iterator,
                    EVAL: full_data.eval_iterator,
                }
                op_data = {chain: input_pipeline.build(c) for chain, c in op_configs.items()} if cores == 1 else {}
                for _ in range(args.repeats):  # rounds: every pipeline once, same order, one iterator alive
                    for name in PIPELINES:
                        rates[name, cores].append(window_rate(makers[name], batch))
                    for chain, data in op_data.items():
                        op_rates[chain].append(window_rate(data.train_iterator, batch))
                if cores == 1:
                    device_ms = device_costs(full, batch, args.repeats)
    medians = {key: statistics.median(values) for key, values in rates.items()}
    rows = []
    for cores in core_counts:
        for name in PIPELINES:
            values = rates[name, cores]
            per_core = [r / cores for r in values]
            row = {
                "pipeline": name,
                "cores": cores,
                "images_per_s": values,
                "images_per_s_per_core": per_core,
                "vs_plain_crop_flip": medians[name, cores] / medians[PLAIN_CROP_FLIP, cores],
                "vs_decode_floor": medians[name, cores] / medians[DECODE_FLOOR, cores],
            }
            row["cells"] = [
                name, str(cores), str(args.image_size), f"{width}×{height} q90 ({mean_bytes / 1024:.0f} KiB)",
                str(batch),
                f"{fmt(statistics.median(values))} [{fmt(min(values))}–{fmt(max(values))}]",
                f"{fmt(statistics.median(per_core))} [{fmt(min(per_core))}–{fmt(max(per_core))}]",
                ratio(row["vs_plain_crop_flip"]), ratio(row["vs_decode_floor"]),
            ]  # fmt: skip
            rows.append(row)
    target_lines = targets(medians, core_counts)
    op_rows = per_op_rows(op_rates, device_ms) if op_rates else []

    extra = [
        f"tensorflow {tf.__version__}; {args.num_images} JPEGs; anchors: plain tf.data on the files' bytes read "
        f"into memory once (no file IO timed); train/eval: input_pipeline.build(config) iterators on the "
        f"'directory' dataset, which reads each file from disk (page-cached) in its map; "
        f"configs.common.get_config('v2'): {TRAIN_FULL} with {augment_text(full)}; {TRAIN_CROP_FLIP} with "
        f"{augment_text(crop_flip)}; {TRAIN_CROP_FLIP_BILINEAR} with {augment_text(bilinear)}; {TRAIN_TO_DEVICE} "
        f"with {augment_text(to_device)} (uint8 batches; the ops after to_device run in the train step)",
        f"k cores: every thread pinned to k cores ({'sched_setaffinity' if pinning else 'NOT pinned: no affinity API'})"
        f" and a tf.data private threadpool of k threads (config.data.num_threads = k) for every pipeline",
        f"{args.repeats} rounds, each timing every pipeline once in table order on a fresh iterator (one alive at a "
        f"time): {WARMUP_BATCHES} warm-up batches, then a window of {WINDOW_BATCHES} batches; images/s: median "
        f"[min–max] over rounds; vs columns: median ÷ the anchor's median at the same k",
    ]
    text = (
        header(argv, extra, started)
        + "\n\n"
        + markdown_table(COLUMNS, rows)
        + "\n\n"
        + "\n".join(f"- {line}" for line in target_lines)
        + "\n"
    )
    if op_rows:
        text += (
            f"\nPer op, at 1 core (ms per image, median [min–max] over rounds; the plain crop+flip anchor takes "
            f"{fmt(1000 / medians[PLAIN_CROP_FLIP, 1])} ms, the decode floor {fmt(1000 / medians[DECODE_FLOOR, 1])} "
            f"ms; device: the op alone, jitted on {batch} images, JAX backend {jax.default_backend()}):\n\n"
            + markdown_table(PER_OP_COLUMNS, op_rows)
            + "\n"
        )
    print(text)
    if args.output:
        with open(args.output, "a") as f:
            f.write(text + "\n")
    return {"rows": rows, "markdown": text, "targets": target_lines, "per_op": op_rows}
