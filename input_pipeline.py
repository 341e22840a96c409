"""tf.data input pipeline: tfds datasets, image directories and scikit-learn's digits.

Train batches are a pure function of (config.seed, step, process_index): the stream is the
concatenation of per-epoch shuffles (explicit seeds per epoch), every random choice of the
augmentation is a stateless op keyed by (seed, process_index, epoch, index in epoch), and
`create_train_iterator(config, start_step=k)` re-enters that stream at batch k by skipping
undecoded records of one epoch at most. Mixup/CutMix/label smoothing run on device, not here.
TensorFlow is kept off accelerators (`_hide_accelerators`, called by every entry point).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import math
import operator
import os
import time
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from s2mlp.preprocessing import mean_std

log = logging.getLogger(__name__)

DIGITS_SPLIT_SEED = 0  # fixed: the digits held-out split never depends on config.seed
DIGITS_NUM_EVAL = 300
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
PROGRESS_SECONDS = 5.0  # long start-up passes (image verification, tfds label reads) log progress this often
RANDAUGMENT_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
_AUTO = tf.data.AUTOTUNE


@dataclasses.dataclass
class DatasetInfo:
    num_classes: int
    num_train: int
    num_eval: int
    class_names: list[str]


@dataclasses.dataclass
class _Source:
    kind: str  # how records hold images: 'encoded' bytes, 'path' to a file, 'raw' uint8 (H, W, 3)
    info: DatasetInfo  # num_train counts the train subset when there is one
    # (split, process_index, process_count, keep) -> this process's share of the split (of the records at the
    # sorted positions `keep` of the split's record order when keep is not None): a finite tf.data.Dataset of
    # (image, int32 label) in a fixed order; shares are contiguous and differ in size by at most one.
    shard: Callable[[str, int, int, np.ndarray | None], tf.data.Dataset]
    train_split: str
    train_keep: np.ndarray | None  # the train subset (`_select_subset`), None: the whole split

    def train_shard(self, process_index: int, process_count: int) -> tf.data.Dataset:
        return self.shard(self.train_split, process_index, process_count, self.train_keep)


class _Progress:
    """Logs `done / total`, rate and ETA of a long pass every PROGRESS_SECONDS, and nothing for short ones."""

    def __init__(self, what: str, total: int, unit: str = "images"):
        self.what, self.total, self.unit, self.done = what, total, unit, 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS and self.done < self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            log.info(
                "%s: %d / %d %s (%.0f%%), %.0f %s/s, ETA %s",
                self.what,
                self.done,
                self.total,
                self.unit,
                100.0 * self.done / self.total,
                rate,
                self.unit,
                _duration((self.total - self.done) / rate),
            )

    def seconds(self) -> float:
        return time.monotonic() - self.start


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m{secs:02d}s" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def _hide_accelerators():
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices; it was hidden by an earlier call
        pass


# ---------------------------------------------------------------- sources
def _tfds_builder(config, prepare: bool):
    name, data_dir = config.data.name, config.data.data_dir
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"config.data.name={name!r} is not a tfds dataset, 'directory' or 'digits'.") from e
    if not builder.is_prepared():
        root = str(builder.data_dir_root)
        if not config.data.download:
            build = f"`tfds build {name} --data_dir={root}`"
            if name.split(":")[0] == "imagenet2012":
                manual = os.path.join(root, "downloads", "manual")
                fix = (
                    f"ImageNet needs a manual download: tfds expects {manual}/ILSVRC2012_img_train.tar and "
                    f"{manual}/ILSVRC2012_img_val.tar; put them there and build it once with {build}."
                )
            else:
                fix = f"build it once with {build}, or set config.data.download=True."
            raise ValueError(
                f"tfds dataset {name!r} is not prepared in config.data.data_dir={root} "
                f"(looked for {builder.data_dir}); {fix}"
            )
        if prepare:
            builder.download_and_prepare()
    return builder


def _tfds_read(builder, split, num_threads: int, *, in_order: bool = False) -> tf.data.Dataset:
    """(encoded image, int32 label) records of `split` (a tfds split or ReadInstruction) in a fixed order.

    in_order: read the files one after the other, so that record i of a sub-range [a, b) of the split is record
    a + i of the whole split (tfds otherwise interleaves 16 files, an order that depends on the range).
    """
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    read_config = tfds.ReadConfig(options=_options(num_threads), **({"interleave_cycle_length": 1} if in_order else {}))
    ds = builder.as_dataset(
        split=split, shuffle_files=False, read_config=read_config, decoders={image_key: tfds.decode.SkipDecoding()}
    )
    return ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32)))


@functools.lru_cache(maxsize=8)
def _tfds_labels(name: str, data_dir: str | None, split: str) -> np.ndarray:
    """The labels of `split` in record order (files read in order): one pass that reads every record."""
    builder = tfds.builder(name, data_dir=data_dir)
    ds = _tfds_read(builder, split, 0, in_order=True)
    progress = _Progress(f"Reading the labels of {name} {split} to select the train subset", _count(ds), "records")
    labels = []
    for batch in ds.map(lambda image, label: label).batch(4096).as_numpy_iterator():
        labels.append(batch)
        progress.update(len(batch))
    labels = np.concatenate(labels) if labels else np.zeros([0], np.int32)
    log.info("Read %d labels of %s %s in %.1fs.", len(labels), name, split, progress.seconds())
    return labels


def _tfds_range(builder, split: str, lo: int, hi: int):
    """ReadInstruction of records lo..hi-1 of `split` (which may be a sub-split spec like 'train[:90%]+validation')."""
    pieces, start = [], 0
    for inst in tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits):
        a = inst.from_ or 0
        b = builder.info.splits[inst.splitname].num_examples if inst.to is None else inst.to
        x, y = max(lo, start), min(hi, start + b - a)
        if x < y:
            pieces.append(tfds.core.ReadInstruction(inst.splitname, from_=a + x - start, to=a + y - start, unit="abs"))
        start += b - a
    return functools.reduce(operator.add, pieces)


def _tfds_source(config) -> _Source:
    builder = _tfds_builder(config, prepare=True)
    num_threads = config.data.num_threads

    def shard(split, index, count, keep=None):
        if keep is None:
            return _tfds_read(
                builder, tfds.split_for_jax_process(split, process_index=index, process_count=count), num_threads
            )
        part = np.array_split(keep, count)[index]
        if not len(part):
            return _tfds_read(builder, split, num_threads).take(0)
        lo, hi = int(part[0]), int(part[-1]) + 1  # read this range of the split, keep the subset's records
        mask = np.zeros(hi - lo, bool)
        mask[part - lo] = True
        ds = _tfds_read(builder, _tfds_range(builder, split, lo, hi), num_threads, in_order=True).enumerate()
        ds = ds.filter(lambda i, rec: tf.gather(mask, i)).map(lambda i, rec: rec)
        return ds.apply(tf.data.experimental.assert_cardinality(len(part)))

    _, label_key = builder.info.supervised_keys or ("image", "label")
    labels = builder.info.features[label_key]
    train = config.data.train_split
    keep = None
    if _subset_requested(config):
        keep = _select_subset(_tfds_labels(config.data.name, config.data.data_dir, train), list(labels.names), config)
    info = DatasetInfo(
        labels.num_classes,
        len(keep) if keep is not None else _count(shard(train, 0, 1)),
        _count(shard(config.data.eval_split, 0, 1)),
        list(labels.names),
    )
    return _Source("encoded", info, shard, train, keep)


def _subset_requested(config) -> bool:
    return config.data.train_per_class > 0 or config.data.train_fraction != 1.0


def _select_subset(labels: np.ndarray, class_names: list[str], config) -> np.ndarray | None:
    """Sorted positions (in the train split's record order) of the train subset; None: the whole split.

    A pure function of (labels, config.data.train_fraction / train_per_class, config.data.subset_seed): one
    seeded permutation of the split orders each class's records, and each class keeps its first
    k_c = train_per_class, or k_c = max(1, floor(train_fraction * n_c + 0.5)) of its n_c records (stratified).
    Subsets are nested: with the same subset_seed, a smaller fraction or count is part of a larger one.
    """
    if not _subset_requested(config):
        return None
    data = config.data
    counts = np.bincount(labels, minlength=len(class_names))
    if data.train_per_class > 0:
        short = [(name, int(n)) for name, n in zip(class_names, counts, strict=False) if n < data.train_per_class]
        if short:
            (name, n), more = short[0], len(short) - 1
            raise ValueError(
                f"config.data.train_per_class={data.train_per_class}: class {name!r} has only {n} examples in "
                f"config.data.train_split={data.train_split!r}"
                + (f" ({more} more classes have too few)" if more else "")
                + "; lower train_per_class, or use config.data.train_fraction for a stratified fraction."
            )
        want = np.full(len(counts), data.train_per_class)
    else:
        want = np.where(counts > 0, np.maximum(1, np.floor(data.train_fraction * counts + 0.5)), 0).astype(np.int64)
    order = np.random.RandomState(data.subset_seed).permutation(len(labels))  # RandomState: stable across numpy
    by_class = order[np.argsort(labels[order], kind="stable")]  # grouped by class, each in the seeded order
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(labels)) - starts[labels[by_class]]
    keep = np.sort(by_class[rank < want[labels[by_class]]])
    how = f"{data.train_per_class} per class" if data.train_per_class > 0 else f"train_fraction={data.train_fraction}"
    _log_once(
        f"Training on {len(keep)} of the {len(labels)} examples of {data.train_split} ({how}, "
        f"subset_seed={data.subset_seed})."
    )
    return keep


@functools.lru_cache(maxsize=64)
def _log_once(message: str) -> None:
    log.info(message)


def _verify_image(path: str) -> str | None:
    """Returns None if PIL fully decodes `path` as JPEG, PNG, GIF or BMP (what tf.io.decode_image reads), else the
    reason. Files are picked by extension (IMAGE_EXTENSIONS), but the format is read from their content."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format not in ("JPEG", "PNG", "GIF", "BMP"):
                return f"format {im.format} is not decodable by tf.io.decode_image"
            im.draft(None, (1, 1))  # JPEG: decode at 1/8 scale; still reads every byte, so truncation shows
            im.load()
    except Exception as e:  # noqa: BLE001 - any failure means an unreadable image
        return f"{type(e).__name__}: {e}"
    return None


@functools.lru_cache(maxsize=16)
def _scan_split(root: str, split: str, classes: tuple[str, ...]) -> tuple[list[str], list[int], list[str]]:
    """Lists root/split/<class>/*.{jpg,jpeg,png}; returns (paths, labels, bad 'path (reason)' entries)."""
    folder = os.path.join(root, split)  # validate_data_config checked that it exists
    extra = sorted(set(os.listdir(folder)) - set(classes))
    if extra and any(os.path.isdir(os.path.join(folder, c)) for c in extra):
        raise ValueError(f"{folder} has class folders absent from the train split: {extra[:10]}")
    paths, labels = [], []
    for label, name in enumerate(classes):
        d = os.path.join(folder, name)
        files = _image_files(d) if os.path.isdir(d) else []
        paths += [os.path.join(d, f) for f in files]
        labels += [label] * len(files)
    progress, reasons = _Progress(f"Verifying the images of {folder}", len(paths)), []
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1))) as pool:
        for reason in pool.map(_verify_image, paths):
            reasons.append(reason)
            progress.update()
    bad = [f"{p} ({r})" for p, r in zip(paths, reasons, strict=True) if r]
    keep = [i for i, r in enumerate(reasons) if not r]
    labels = [labels[i] for i in keep]
    log.info(
        "%s: %d readable images in %d classes, %d unreadable; verified in %.1fs.",
        folder,
        len(keep),
        len(set(labels)),
        len(bad),
        progress.seconds(),
    )
    return [paths[i] for i in keep], labels, bad


def _class_folders(folder: str) -> tuple[str, ...]:
    return tuple(sorted(c for c in os.listdir(folder) if os.path.isdir(os.path.join(folder, c))))


def _image_files(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


def _directory_source(config) -> _Source:
    root = config.data.data_dir
    classes = _class_folders(os.path.join(root, config.data.train_split))
    splits = {}
    for split in (config.data.train_split, config.data.eval_split):
        paths, labels, bad = _scan_split(root, split, classes)
        if bad:
            listing = "\n  ".join(bad[:50]) + (f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else "")
            if config.data.bad_images == "fail":
                raise ValueError(
                    f"{len(bad)} unreadable images in {root}/{split} (set config.data.bad_images='skip' "
                    f"to leave them out, or fix them):\n  {listing}"
                )
            log.warning("Skipping %d unreadable images in %s/%s:\n  %s", len(bad), root, split, listing)
        if split == config.data.train_split and len(set(labels)) < len(classes):
            empty = os.path.join(root, split, classes[min(set(range(len(classes))) - set(labels))])
            raise ValueError(
                f"class folder {empty} has no readable images (config.data.bad_images='skip' left them all out); "
                "add readable images to it or remove the folder."
            )
        splits[split] = (np.array([p.encode() for p in paths], dtype=object), np.array(labels, np.int32))

    def shard(split, index, count, keep=None):
        paths, labels = (np.array_split(a if keep is None else a[keep], count)[index] for a in splits[split])
        return tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), labels))

    train = config.data.train_split
    keep = _select_subset(splits[train][1], list(classes), config)
    num_train = len(splits[train][1]) if keep is None else len(keep)
    info = DatasetInfo(len(classes), num_train, len(splits[config.data.eval_split][1]), list(classes))
    return _Source("path", info, shard, train, keep)


@functools.lru_cache(maxsize=1)
def _digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's bundled digits as uint8 (N, 8, 8, 3) in 0..255; fixed 1,497 / 300 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.repeat(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None], 3, axis=-1)
    perm = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(images))
    idx = {"train": perm[:-DIGITS_NUM_EVAL], "test": perm[-DIGITS_NUM_EVAL:]}
    return {k: (images[i], digits.target[i].astype(np.int32)) for k, i in idx.items()}


def _digits_source(config) -> _Source:
    data = _digits()

    def shard(split, index, count, keep=None):
        arrays = data[split] if keep is None else tuple(a[keep] for a in data[split])
        return tf.data.Dataset.from_tensor_slices(tuple(np.array_split(a, count)[index] for a in arrays))

    train, names = config.data.train_split, [str(i) for i in range(10)]
    keep = _select_subset(data[train][1], names, config)
    num_train = len(data[train][1]) if keep is None else len(keep)
    return _Source("raw", DatasetInfo(10, num_train, len(data[config.data.eval_split][1]), names), shard, train, keep)


def _source(config) -> _Source:
    validate_data_config(config)
    name = config.data.name
    return {"digits": _digits_source, "directory": _directory_source}.get(name, _tfds_source)(config)


def _count(ds) -> int:
    n = int(ds.cardinality())
    if n < 0:
        n = int(ds.reduce(np.int64(0), lambda c, _: c + 1))  # unknown cardinality: count (reads the shard)
    return n


def _block_shuffle(records, block: int, key):
    """Stateless shuffle: a permutation keyed by `key` of each run of `block` consecutive records (block >= n:
    of the whole dataset). Unlike Dataset.shuffle, it does not depend on TF's global seed."""

    def permute(j, recs):
        perm = tf.random.experimental.stateless_shuffle(
            tf.range(tf.shape(recs[1])[0]), tf.random.experimental.stateless_fold_in(key, j)
        )
        return tuple(tf.gather(t, perm) for t in recs)

    return records.batch(block).enumerate().map(permute).prefetch(1).unbatch()


def _options(num_threads: int = 0) -> tf.data.Options:
    """Deterministic tf.data options; num_threads > 0 (config.data.num_threads): a private pool of that many
    threads for the iterator's ops, each op single-threaded; 0: tf.data's default (shared pool, AUTOTUNE)."""
    options = tf.data.Options()
    options.deterministic = True
    if num_threads > 0:
        options.threading.private_threadpool_size = num_threads
        options.threading.max_intra_op_parallelism = 1
    return options


# ---------------------------------------------------------------- decoding, cropping, resizing
def _decode(image, kind):
    """Record image -> uint8 (H, W, 3)."""
    if kind == "path":
        image = tf.io.read_file(image)
    if kind == "raw":
        return image
    return tf.io.decode_image(image, channels=3, expand_animations=False)


def _crop_window(shape, key, area_min):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        tf.zeros([1, 0, 4]),
        seed=key,
        min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(area_min, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return begin, size


def _decode_inception_crop(image, kind, key, area_min):
    """Inception crop (area `area_min`..1 of the image, aspect 3/4..4/3); JPEGs decode only the window."""
    if kind == "path":
        image = tf.io.read_file(image)
    if kind == "raw":
        begin, size = _crop_window(tf.shape(image), key, area_min)
        return tf.slice(image, begin, size)

    def jpeg():
        begin, size = _crop_window(tf.image.extract_jpeg_shape(image), key, area_min)
        return tf.image.decode_and_crop_jpeg(image, tf.stack([begin[0], begin[1], size[0], size[1]]), channels=3)

    def other():
        decoded = tf.io.decode_image(image, channels=3, expand_animations=False)
        begin, size = _crop_window(tf.shape(decoded), key, area_min)
        return tf.slice(decoded, begin, size)

    return tf.cond(tf.io.is_jpeg(image), jpeg, other)


def _resize(image, size) -> tf.Tensor:
    """uint8 (H, W, 3) -> uint8 (size[0], size[1], 3), bicubic with antialiasing like timm's PIL resize."""
    return _u8(tf.image.resize(image, size, method="bicubic", antialias=True))


def _eval_image(image, kind, config):
    """Eval: resize the shorter side to image_size / eval_crop_pct, centre-crop image_size (digits: resize)."""
    s = config.image_size
    image = _decode(image, kind)
    if kind == "raw":
        return _resize(image, [s, s])
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    short = math.floor(s / config.data.eval_crop_pct)  # torchvision Resize(short): long side truncated
    new = tf.where(h <= w, tf.stack([short, w * short // h]), tf.stack([h * short // w, short]))
    image = _resize(image, new)
    top, left = (new[0] - s + 1) // 2, (new[1] - s + 1) // 2
    return tf.ensure_shape(image[top : top + s, left : left + s], [s, s, 3])


# ---------------------------------------------------------------- RandAugment (timm semantics, stateless)
@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
    num_ops: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.0
    magnitude_max: float = 10.0
    increasing: bool = False
    prob: float = 0.5  # timm applies each chosen op with probability 0.5


def parse_randaugment(spec: str) -> RandAugmentSpec | None:
    """timm config string, e.g. 'rand-m9-mstd0.5' or 'rand-m9-n2-mstd0.5-inc1'; '' -> None (off)."""
    if not spec:
        return None
    parts = spec.split("-")
    keys = {
        "m": "magnitude",
        "n": "num_ops",
        "mstd": "magnitude_std",
        "mmax": "magnitude_max",
        "inc": "increasing",
        "p": "prob",
    }
    fields = {}
    try:
        if parts[0] != "rand":
            raise ValueError(parts[0])
        for part in parts[1:]:
            key = next(k for k in sorted(keys, key=len, reverse=True) if part.startswith(k))
            fields[keys[key]] = type(getattr(RandAugmentSpec, keys[key]))(float(part[len(key) :]))
    except (StopIteration, ValueError):
        raise ValueError(
            f"config.augment.randaugment={spec!r} is not a timm RandAugment string like "
            f"'rand-m9-mstd0.5' (keys m, n, mstd, mmax, inc, p); use '' to turn it off."
        ) from None
    return RandAugmentSpec(**fields)


def _u8(x):
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def _grey(f):  # PIL 'L' of float (H, W, 3) -> (H, W, 1)
    return tf.round(tf.reduce_sum(f * tf.constant([0.299, 0.587, 0.114]), -1, keepdims=True))


def _blend(degenerate, f, factor):  # PIL ImageEnhance: degenerate + factor * (image - degenerate)
    return _u8(degenerate + factor * (f - degenerate))


def _sharpness(f, factor):
    kernel = tf.tile(tf.constant([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]])[:, :, None, None] / 13.0, [1, 1, 3, 1])
    smooth = tf.round(tf.nn.depthwise_conv2d(f[None], kernel, [1, 1, 1, 1], "VALID")[0])
    interior = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]]) > 0  # PIL keeps the border pixels
    return _blend(tf.where(interior, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), f), f, factor)


def _equalize(image):
    def channel(c):  # PIL ImageOps.equalize on one uint8 channel
        v = tf.cast(tf.reshape(c, [-1]), tf.int32)
        hist = tf.math.bincount(v, minlength=256, maxlength=256)
        step = (tf.reduce_sum(hist) - tf.gather(hist, tf.reduce_max(v))) // 255
        lut = tf.minimum((tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1), 255)
        return tf.cast(tf.where(step > 0, tf.reshape(tf.gather(lut, v), tf.shape(c)), tf.cast(c, tf.int32)), tf.uint8)

    return tf.stack([channel(image[..., i]) for i in range(3)], -1)


def _affine(f, matrix, fill):
    """Output pixel (x, y) samples the input at (a x + b y + c, d x + e y + f); outside -> `fill` (RGB)."""
    x = tf.concat([f, tf.ones_like(f[..., :1])], -1)[None]  # 4th channel tracks what came from inside
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=x,
        transforms=tf.concat([tf.stack(matrix), [0.0, 0.0]], 0)[None],
        output_shape=tf.shape(f)[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )[0]
    return _u8(out[..., :3] + (1.0 - out[..., 3:]) * fill)


def _rotate(f, degrees, fill):
    h, w = tf.cast(tf.shape(f)[0], tf.float32), tf.cast(tf.shape(f)[1], tf.float32)
    cy, cx, rad = (h - 1) / 2, (w - 1) / 2, degrees * math.pi / 180
    c, s = tf.cos(rad), tf.sin(rad)
    return _affine(f, [c, s, cx - c * cx - s * cy, -s, c, cy + s * cx - c * cy], fill)


_OP_FNS = {  # (float image (H, W, 3) in 0..255, op argument, fill RGB) -> uint8 image
    "AutoContrast": lambda f, a, fill: _u8(
        tf.math.divide_no_nan(f - tf.reduce_min(f, [0, 1]), tf.reduce_max(f, [0, 1]) - tf.reduce_min(f, [0, 1])) * 255.0
        + tf.where(tf.reduce_max(f, [0, 1]) > tf.reduce_min(f, [0, 1]), 0.0, f)
    ),
    "Equalize": lambda f, a, fill: _equalize(_u8(f)),
    "Invert": lambda f, a, fill: _u8(255.0 - f),
    "Rotate": _rotate,
    "Posterize": lambda f, a, fill: _u8(f - tf.math.floormod(f, 2.0 ** (8.0 - tf.clip_by_value(a, 0.0, 8.0)))),
    "Solarize": lambda f, a, fill: _u8(tf.where(f < a, f, 255.0 - f)),
    "SolarizeAdd": lambda f, a, fill: _u8(tf.where(f < 128.0, tf.minimum(f + a, 255.0), f)),
    "Color": lambda f, a, fill: _blend(_grey(f), f, a),
    "Contrast": lambda f, a, fill: _blend(tf.floor(tf.reduce_mean(_grey(f)) + 0.5), f, a),
    "Brightness": lambda f, a, fill: _blend(0.0, f, a),
    "Sharpness": lambda f, a, fill: _sharpness(f, a),
    "ShearX": lambda f, a, fill: _affine(f, [1.0, a, 0.0, 0.0, 1.0, 0.0], fill),
    "ShearY": lambda f, a, fill: _affine(f, [1.0, 0.0, 0.0, a, 1.0, 0.0], fill),
    "TranslateXRel": lambda f, a, fill: _affine(
        f, [1.0, 0.0, a * tf.cast(tf.shape(f)[1], tf.float32), 0.0, 1.0, 0.0], fill
    ),
    "TranslateYRel": lambda f, a, fill: _affine(
        f, [1.0, 0.0, 0.0, 0.0, 1.0, a * tf.cast(tf.shape(f)[0], tf.float32)], fill
    ),
}


def _op_argument(name, level, sign, increasing):
    """timm's level -> argument maps; level = magnitude / 10 and sign = +-1 at random."""
    if name == "Rotate":
        return 30.0 * level * sign
    if name == "Posterize":  # bits kept
        return 4.0 - tf.floor(4.0 * level) if increasing else tf.floor(4.0 * level)
    if name == "Solarize":  # threshold
        return 256.0 - tf.floor(256.0 * level) if increasing else tf.floor(256.0 * level)
    if name == "SolarizeAdd":
        return tf.floor(110.0 * level)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):  # enhancement factor, 1 = identity
        return 1.0 + 0.9 * level * sign if increasing else 1.8 * level + 0.1
    if name in ("ShearX", "ShearY"):
        return 0.3 * level * sign
    if name in ("TranslateXRel", "TranslateYRel"):  # fraction of the image size
        return 0.45 * level * sign
    return tf.constant(0.0)


def randaugment_op(image, name: str, magnitude, seed, *, fill=(128.0, 128.0, 128.0), increasing=False):
    """Applies one timm RandAugment op at `magnitude` (0..10) to uint8 (H, W, 3); returns uint8 (H, W, 3)."""
    level = tf.cast(magnitude, tf.float32) / 10.0
    sign = tf.where(tf.random.stateless_uniform([], seed) < 0.5, -1.0, 1.0)
    f = tf.cast(image, tf.float32)
    return _OP_FNS[name](f, _op_argument(name, level, sign, increasing), tf.constant(fill, tf.float32))


def randaugment(image, spec: RandAugmentSpec, seed, fill):
    """timm RandAugment on uint8 (H, W, 3): `num_ops` ops drawn with replacement, each applied with probability
    `spec.prob` at a magnitude ~ N(m, mstd) clipped to [0, mmax] (uniform(0, m) when mstd is inf)."""

    def layer(i, image):
        k = tf.unstack(tf.random.experimental.stateless_split(tf.random.experimental.stateless_fold_in(seed, i), 4))
        op = tf.random.stateless_uniform([], k[0], 0, len(RANDAUGMENT_OPS), dtype=tf.int32)
        if math.isinf(spec.magnitude_std):
            mag = tf.random.stateless_uniform([], k[1], 0.0, spec.magnitude)
        else:
            mag = spec.magnitude + spec.magnitude_std * tf.random.stateless_normal([], k[1])
        mag = tf.clip_by_value(mag, 0.0, spec.magnitude_max)
        branches = [
            functools.partial(randaugment_op, image, name, mag, k[3], fill=fill, increasing=spec.increasing)
            for name in RANDAUGMENT_OPS
        ] + [lambda: image]  # the last branch: op not applied
        op = tf.where(tf.random.stateless_uniform([], k[2]) < spec.prob, op, len(RANDAUGMENT_OPS))
        return i + 1, tf.ensure_shape(tf.switch_case(op, branches), image.shape)

    # A loop, not a Python for: the 15 branches are traced once whatever num_ops is.
    return tf.while_loop(lambda i, _: i < spec.num_ops, layer, (tf.constant(0), image))[1]


def random_erase(x, prob: float, seed):
    """timm RandomErasing 'pixel' mode on normalised float (H, W, 3): with probability `prob`, one rectangle
    of area 2%..1/3 and aspect 0.3..3.3 (10 tries) is filled with N(0, 1) noise per pixel and channel."""
    k = tf.unstack(tf.random.experimental.stateless_split(seed, 6))
    h_img, w_img = tf.shape(x)[0], tf.shape(x)[1]
    area = tf.random.stateless_uniform([10], k[0], 0.02, 1 / 3) * tf.cast(h_img * w_img, tf.float32)
    ratio = tf.exp(tf.random.stateless_uniform([10], k[1], math.log(0.3), math.log(1 / 0.3)))
    hs, ws = tf.cast(tf.round(tf.sqrt(area * ratio)), tf.int32), tf.cast(tf.round(tf.sqrt(area / ratio)), tf.int32)
    fits = (hs < h_img) & (ws < w_img)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    h, w = hs[first], ws[first]
    top = tf.random.stateless_uniform([], k[2], 0, h_img - h + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], k[3], 0, w_img - w + 1, dtype=tf.int32)
    rows, cols = tf.range(h_img)[:, None, None], tf.range(w_img)[None, :, None]
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    erase = (tf.random.stateless_uniform([], k[4]) < prob) & tf.reduce_any(fits)
    return tf.where(erase & inside, tf.random.stateless_normal(tf.shape(x), k[5]), x)


# ---------------------------------------------------------------- public API
def validate_data_config(config, *, process_count: int = 1) -> None:
    """Cheap checks (no image is read); raises ValueError naming the config field and the fix."""

    def need(ok, field, fix):
        if not ok:
            raise ValueError(f"{field}={_get(config, field)!r}: {fix}")

    need(
        isinstance(config.data.name, str) and config.data.name,
        "config.data.name",
        "give a tfds dataset name, 'directory' or 'digits'.",
    )
    for field in ("config.batch_size", "config.eval_batch_size"):
        need(
            _get(config, field) > 0 and _get(config, field) % process_count == 0,
            field,
            f"must be a positive multiple of the process count ({process_count}).",
        )
    need(config.image_size > 0, "config.image_size", "must be positive.")
    need(0 < config.augment.crop_area_min <= 1, "config.augment.crop_area_min", "must be in (0, 1].")
    need(0 <= config.augment.random_erase <= 1, "config.augment.random_erase", "is a probability in [0, 1].")
    need(0 < config.data.eval_crop_pct <= 1, "config.data.eval_crop_pct", "must be in (0, 1].")
    need(config.data.bad_images in ("fail", "skip"), "config.data.bad_images", "use 'fail' or 'skip'.")
    need(config.data.shuffle_buffer >= 1, "config.data.shuffle_buffer", "must be >= 1.")
    need(
        _is_int(config.data.num_threads) and config.data.num_threads >= 0,
        "config.data.num_threads",
        "must be an int >= 0 (0: tf.data's default thread pool).",
    )
    fraction, per_class = config.data.train_fraction, config.data.train_per_class
    need(
        isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction <= 1,
        "config.data.train_fraction",
        "must be in (0, 1] (1.0: the whole train split).",
    )
    need(
        _is_int(per_class) and per_class >= 0,
        "config.data.train_per_class",
        "must be an int >= 0 (0: off; n > 0: n examples of each class).",
    )
    need(
        per_class == 0 or fraction == 1.0,
        "config.data.train_per_class",
        f"and config.data.train_fraction={fraction!r} are both set; use one of them (leave the other at "
        "train_per_class=0 / train_fraction=1.0).",
    )
    need(
        _is_int(config.data.subset_seed) and 0 <= config.data.subset_seed < 2**32,
        "config.data.subset_seed",
        "must be an int in [0, 2**32).",
    )
    try:
        mean_std(config.data.normalization)
    except ValueError as e:
        raise ValueError(f"config.data.normalization: {e}") from None
    parse_randaugment(config.augment.randaugment)
    if config.data.name == "digits":
        for field in ("config.data.train_split", "config.data.eval_split"):
            need(_get(config, field) in ("train", "test"), field, "digits has splits 'train' and 'test'.")
    elif config.data.name == "directory":
        root = config.data.data_dir
        for field in ("config.data.train_split", "config.data.eval_split"):
            need(
                root and os.path.isdir(os.path.join(root, _get(config, field))),
                field,
                f"folder {os.path.join(root or '<config.data.data_dir unset>', str(_get(config, field)))} "
                f"does not exist; 'directory' datasets are data_dir/<split>/<class>/*.jpg.",
            )
        train_dir = os.path.join(root, config.data.train_split)
        need(
            _class_folders(train_dir),
            "config.data.train_split",
            f"folder {train_dir} has no class sub-folders; 'directory' datasets are data_dir/<split>/<class>/*.jpg.",
        )
        for split in dict.fromkeys((config.data.train_split, config.data.eval_split)):
            for name in _class_folders(os.path.join(root, split)):
                folder = os.path.join(root, split, name)
                if not _image_files(folder):
                    raise ValueError(
                        f"config.data.data_dir={root!r}: class folder {folder} holds no images "
                        f"({', '.join('*' + e for e in IMAGE_EXTENSIONS)}); remove the folder or add images to it."
                    )
    else:
        builder = _tfds_builder(config, prepare=False)
        if builder.is_prepared():
            for field in ("config.data.train_split", "config.data.eval_split"):
                try:
                    builder.info.splits[_get(config, field)]
                except (KeyError, ValueError) as e:
                    raise ValueError(
                        f"{field}={_get(config, field)!r} is not a split of {config.data.name}: {e}"
                    ) from None


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _get(config, field: str):
    return functools.reduce(getattr, field.split(".")[1:], config)


def dataset_info(config) -> DatasetInfo:
    """Class count and names, and example counts of the train/eval splits (after skipping bad images)."""
    _hide_accelerators()
    return _source(config).info


def _local_batch(config, field: str, process_count: int) -> int:
    if _get(config, field) % process_count:
        raise ValueError(f"{field}={_get(config, field)} is not divisible by process_count={process_count}.")
    return _get(config, field) // process_count


def create_train_iterator(
    config, *, start_step: int = 0, process_index: int = 0, process_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """Endless {'image': float32 (B, S, S, 3) normalised, 'label': int32 (B,)}, B = batch_size // process_count.

    The stream is epoch after epoch of this process's shard, each shuffled with its own seed; batches may
    span epochs. Starting at `start_step` skips (undecoded) start_step * B % n records of one epoch.
    """
    _hide_accelerators()
    batch = _local_batch(config, "config.batch_size", process_count)
    source = _source(config)
    records = source.train_shard(process_index, process_count)
    n = _count(records)
    if n == 0:
        raise ValueError(f"config.data.train_split={config.data.train_split!r} has no examples for this process.")
    first_epoch, offset = divmod(start_step * batch, n)
    block = n if source.kind != "encoded" else min(n, config.data.shuffle_buffer)  # in memory: full permutation
    seed = tf.constant([config.seed, process_index], tf.int64)
    shuffle_key = tf.random.experimental.stateless_fold_in(seed, 1)
    example_key = tf.random.experimental.stateless_fold_in(seed, 2)

    def epoch_stream(epoch):
        ds = _block_shuffle(records, block, tf.random.experimental.stateless_fold_in(shuffle_key, epoch)).enumerate()
        ds = ds.map(lambda i, rec: (epoch, i, rec[0], rec[1]))
        return ds.skip(tf.where(epoch == first_epoch, tf.constant(offset, tf.int64), tf.constant(0, tf.int64)))

    aug = config.augment
    ra_spec = parse_randaugment(aug.randaugment)
    mean, std = mean_std(config.data.normalization)
    fill = tuple(float(round(v)) for v in mean)  # timm fills geometric ops with the mean colour
    size = [config.image_size, config.image_size]

    def augment(epoch, index, image, label):
        key = tf.random.experimental.stateless_fold_in(
            tf.random.experimental.stateless_fold_in(example_key, epoch), index
        )
        k = tf.unstack(tf.random.experimental.stateless_split(key, 4))
        if aug.inception_crop:
            image = _decode_inception_crop(image, source.kind, k[0], aug.crop_area_min)
        else:
            image = _decode(image, source.kind)
        image = _resize(image, size)
        if aug.flip:
            image = tf.cond(tf.random.stateless_uniform([], k[1]) < 0.5, lambda: image[:, ::-1], lambda: image)
        if ra_spec is not None:
            image = randaugment(image, ra_spec, k[2], fill)
        x = (tf.cast(image, tf.float32) - mean) / std
        if aug.random_erase > 0:
            x = random_erase(x, aug.random_erase, k[3])
        return {"image": tf.ensure_shape(x, size + [3]), "label": label}

    ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch_stream)
    ds = ds.map(tf.autograph.experimental.do_not_convert(augment), num_parallel_calls=_AUTO)
    ds = ds.batch(batch, drop_remainder=True).prefetch(_AUTO)
    return ds.with_options(_options(config.data.num_threads)).as_numpy_iterator()


def create_eval_iterator(config, *, process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """One pass over config.data.eval_split: {'image': (B, S, S, 3), 'label': (B,), 'mask': float32 (B,)}.

    Each process reads its contiguous share; shares are padded (mask 0) to the same number of batches.
    """
    _hide_accelerators()
    batch = _local_batch(config, "config.eval_batch_size", process_count)
    source = _source(config)
    split = config.data.eval_split
    num_batches = max(-(-_count(source.shard(split, p, process_count)) // batch) for p in range(process_count))
    mean, std = mean_std(config.data.normalization)
    s = config.image_size

    def prepare(image, label):
        x = (tf.cast(_eval_image(image, source.kind, config), tf.float32) - mean) / std
        return {"image": x, "label": label, "mask": tf.constant(1.0)}

    pad = {"image": tf.zeros([s, s, 3]), "label": tf.constant(0, tf.int32), "mask": tf.constant(0.0)}
    ds = source.shard(split, process_index, process_count).map(prepare, num_parallel_calls=_AUTO)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat()).take(num_batches * batch)
    return ds.batch(batch).prefetch(_AUTO).with_options(_options(config.data.num_threads)).as_numpy_iterator()
