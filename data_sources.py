"""Where the examples come from: tfds datasets, image folders ('directory'), IDX files ('idx': MNIST, Fashion-MNIST,
KMNIST, EMNIST) and scikit-learn's digits.

`source(config)` opens one of them as a `Source`: the class names, the split sizes and, per process, a finite
tf.data.Dataset of (image, int32 label) records in a fixed order. Training and eval may keep only some classes,
relabelled 0..K-1 (config.data.classes: names, a preset such as 'imagenet100', or 'random:K:SEED';
`select_classes`), and the train split may be cut to a class-balanced subset of those (config.data.train_fraction
/ train_per_class, picked by config.data.subset_seed). Image folders are scanned and every image verified once
per process; tfds label reads (for the classes or the subset) likewise.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import difflib
import functools
import glob
import gzip
import hashlib
import logging
import math
import operator
import os
import re
import time
import zlib
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

log = logging.getLogger(__name__)

DIGITS_SPLIT_SEED = 0  # fixed: the digits held-out split never depends on config.seed
DIGITS_NUM_EVAL = 300
DIGITS_CLASSES = [str(i) for i in range(10)]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
PROGRESS_SECONDS = 5.0  # long start-up passes (image verification, tfds label reads) log progress this often
# config.data.classes presets: name -> a text file of class names, one a line ('#' starts a comment line).
CLASS_PRESETS = {"imagenet100": os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                                             "imagenet100_classes.txt")}  # fmt: skip


@dataclasses.dataclass
class DatasetInfo:
    """What a model and the trainer need to know of a dataset; num_train counts the train subset if there is one."""

    num_classes: int
    num_train: int
    num_eval: int
    class_names: list[str]


@dataclasses.dataclass
class Source:
    """An opened dataset (`source`): its DatasetInfo and the records of its splits, process by process."""

    kind: str  # how records hold images: 'encoded' bytes, 'path' to a file, 'raw' uint8 (H, W, 3)
    info: DatasetInfo
    # (split, process_index, process_count, keep) -> this process's share of the split (of the records at the
    # sorted positions `keep` of the split's record order when keep is not None): a finite tf.data.Dataset of
    # (image, int32 label) in a fixed order; shares are contiguous and differ in size by at most one (a tfds split
    # of several parts, 'a+b', by up to one per part: tfds divides each part). Labels are the dataset's own:
    # `train_shard` / `eval_shard` relabel them (`label_map`).
    shard: Callable[[str, int, int, np.ndarray | None], tf.data.Dataset]
    train_split: str
    train_keep: np.ndarray | None  # the train examples used (classes, then subset), None: the whole split
    eval_split: str = ""
    # split -> the sorted positions of the split's records of the kept classes (config.data.classes), None: all
    class_keep: Callable[[str], np.ndarray | None] = lambda split: None
    label_map: np.ndarray | None = None  # int32 (C,): the dataset's label -> 0..K-1, -1 when dropped; None: same

    def train_shard(self, process_index: int, process_count: int) -> tf.data.Dataset:
        return self._relabel(self.shard(self.train_split, process_index, process_count, self.train_keep))

    def eval_shard(self, process_index: int, process_count: int) -> tf.data.Dataset:
        """This process's share of the eval split (the kept classes, relabelled; never the train subset)."""
        keep = self.class_keep(self.eval_split)
        return self._relabel(self.shard(self.eval_split, process_index, process_count, keep))

    def _relabel(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        if self.label_map is None:
            return ds
        table = tf.constant(self.label_map, tf.int32)
        return ds.map(lambda image, label: (image, tf.gather(table, label)))


# ---------------------------------------------------------------- class selection (config.data.classes)
@dataclasses.dataclass(frozen=True)
class ClassSelection:
    """The classes config.data.classes keeps: their names and dataset labels, in the new label order 0..K-1."""

    names: list[str]
    ids: np.ndarray  # int (K,): the dataset's labels of `names`
    num_dataset_classes: int

    @property
    def label_map(self) -> np.ndarray:
        table = np.full(self.num_dataset_classes, -1, np.int32)
        table[self.ids] = np.arange(len(self.ids), dtype=np.int32)
        return table

    def positions(self, labels: np.ndarray) -> np.ndarray:
        """Sorted positions of the records (dataset labels `labels`, in record order) of the kept classes."""
        labels = np.asarray(labels)
        ok = (labels >= 0) & (labels < self.num_dataset_classes)
        return np.flatnonzero(ok & (self.label_map[np.where(ok, labels, 0)] >= 0))


def class_preset(name: str) -> list[str]:
    """The class names of CLASS_PRESETS[name], in the file's order."""
    with open(CLASS_PRESETS[name], encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def _describe(spec) -> str:
    """config.data.classes as the one-line errors show it (long lists abridged)."""
    text = repr(spec)
    if len(text) <= 80 or not isinstance(spec, (list, tuple)):
        return text
    return f"({', '.join(repr(n) for n in spec[:2])}, ...; {len(spec)} names)"


def select_classes(config, names: list[str], where: str) -> ClassSelection | None:
    """The classes that config.data.classes keeps of a dataset with class names `names` (label order); None: all.

    config.data.classes is '' (every class), a list of class names (new labels 0..K-1 in the order given), a
    preset of CLASS_PRESETS (the preset's names sorted, the order of tfds' imagenet2012 labels and of torchvision's
    ImageFolder), or 'random:K:SEED': K classes drawn with numpy's RandomState(SEED), kept in the dataset's label
    order (the first K of one seeded permutation, so with one SEED a smaller K is part of a larger). ValueError,
    one line, for an unknown name (with the closest names), a duplicate, an empty list or a malformed string;
    `where` names the dataset in those messages.
    """
    spec = config.data.classes
    field = f"config.data.classes={_describe(spec)}"
    if isinstance(spec, str):
        if spec == "":
            return None
        if spec in CLASS_PRESETS:
            wanted = sorted(class_preset(spec))
        elif spec.startswith("random:"):
            match = re.fullmatch(r"random:(\d+):(\d+)", spec)
            if not match:
                raise ValueError(f"{field}: write 'random:K:SEED', e.g. 'random:100:0' (K classes drawn with SEED).")
            k, seed = int(match.group(1)), int(match.group(2))
            if not 1 <= k <= len(names) or seed >= 2**32:
                raise ValueError(
                    f"{field}: K must be in 1..{len(names)} ({where} has {len(names)} classes) and SEED in [0, 2**32)."
                )
            ids = np.sort(np.random.RandomState(seed).permutation(len(names))[:k])
            return ClassSelection([names[i] for i in ids], ids, len(names))
        else:
            close = difflib.get_close_matches(spec, [*CLASS_PRESETS, "random:K:SEED"], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"{field}: not a preset ({', '.join(map(repr, CLASS_PRESETS))}) or 'random:K:SEED'{hint}; give class "
                f"names as a list, e.g. ({spec!r},), or '' for every class."
            )
    elif isinstance(spec, (list, tuple)):
        wanted = list(spec)
    else:
        raise ValueError(
            f"{field}: give a list of class names, a preset ({', '.join(map(repr, CLASS_PRESETS))}), "
            "'random:K:SEED', or '' for every class."
        )
    if not wanted:
        raise ValueError(f"{field}: selects no class; list at least one, or set '' for every class.")
    odd = [w for w in wanted if not isinstance(w, str)]
    if odd:
        raise ValueError(f"{field}: {odd[0]!r} is not a class name (a string); names are {names[:3]!r}, ...")
    twice = [n for n, c in collections.Counter(wanted).items() if c > 1]
    if twice:
        raise ValueError(f"{field}: {twice[0]!r} is listed {wanted.count(twice[0])} times; list each class once.")
    index = {n: i for i, n in enumerate(names)}
    unknown = [w for w in wanted if w not in index]
    if unknown:
        more = f" ({len(unknown) - 1} more unknown)" if len(unknown) > 1 else ""
        close = difflib.get_close_matches(unknown[0], names, n=3)
        listing = ", ".join(map(repr, names[:5])) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        hint = f"closest: {', '.join(map(repr, close))}" if close else f"its {len(names)} classes are {listing}"
        raise ValueError(f"{field}: {unknown[0]!r} is not a class of {where}{more}; {hint}.")
    return ClassSelection(wanted, np.array([index[w] for w in wanted], np.int64), len(names))


def _train_keep(labels: np.ndarray, selection: ClassSelection | None, names: list[str], config) -> np.ndarray | None:
    """Sorted positions (in the train split's record order; dataset labels `labels`) of the train examples used:
    those of the kept classes, then the subset (`_select_subset`) taken within them. None: the whole split."""
    if selection is None:
        return _select_subset(labels, names, config)
    positions = selection.positions(labels)
    if not len(positions):
        raise ValueError(
            f"config.data.classes={_describe(config.data.classes)}: none of its {len(selection.names)} classes has "
            f"examples in config.data.train_split={config.data.train_split!r}."
        )
    kept = selection.label_map[labels[positions]]
    empty = [selection.names[i] for i in np.flatnonzero(np.bincount(kept, minlength=len(selection.names)) == 0)]
    if empty:  # a head output that no example trains
        log.warning(
            "config.data.classes=%s: %d kept class(es) have no examples in config.data.train_split=%r (%s): no "
            "example trains their outputs; leave them out unless that is meant.",
            _describe(config.data.classes), len(empty), config.data.train_split, ", ".join(map(repr, empty[:5])),
        )  # fmt: skip
    subset = _select_subset(kept, selection.names, config)
    return positions if subset is None else positions[subset]


def _progress(items, what: str, total: int, unit: str = "images", size=None):
    """Yields `items` (each counts size(item), default 1), logging `done / total`, rate and ETA of a long pass every
    PROGRESS_SECONDS, and nothing for short ones."""
    done, start = 0, time.monotonic()
    last = start
    for item in items:
        yield item
        done += 1 if size is None else size(item)
        now = time.monotonic()
        if now - last >= PROGRESS_SECONDS and done < total:
            last, rate = now, done / max(now - start, 1e-9)
            log.info(
                f"{what}: {done} / {total} {unit} ({100.0 * done / total:.0f}%), {rate:.0f} {unit}/s, "
                f"ETA {_duration((total - done) / rate)}"
            )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m{secs:02d}s" if minutes >= 60 else f"{minutes}m{secs:02d}s"


# ---------------------------------------------------------------- sources
def tfds_builder(config):
    """The tfds builder of config.data.name in config.data.data_dir; ValueError when the name is not a tfds
    dataset, or when the dataset is not prepared and config.data.download is off (naming the fix). Downloads
    nothing: `source` prepares a builder that is not prepared yet."""
    name, data_dir = config.data.name, config.data.data_dir
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"config.data.name={name!r} is not a tfds dataset, 'directory', 'idx' or 'digits'.") from e
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
    return builder


def _tfds_read(builder, split, num_threads: int, *, in_order: bool = False, label=None) -> tf.data.Dataset:
    """(encoded image, int32 label) records of `split` (a tfds split or ReadInstruction) in a fixed order; label:
    example -> its label, if not the int32 of the label feature.

    in_order: read the files one after the other, so that record i of a sub-range [a, b) of the split is record
    a + i of the whole split (tfds otherwise interleaves 16 files, an order that depends on the range).
    """
    keys = builder.info.supervised_keys or ("image", "label")
    image_key, label = keys[0], label or (lambda ex: tf.cast(ex[keys[1]], tf.int32))
    read_config = tfds.ReadConfig(
        options=dataset_options(num_threads), **({"interleave_cycle_length": 1} if in_order else {})
    )
    ds = builder.as_dataset(
        split=split, shuffle_files=False, read_config=read_config, decoders={image_key: tfds.decode.SkipDecoding()}
    )
    return ds.map(lambda ex: (ex[image_key], label(ex)))


@dataclasses.dataclass(frozen=True)
class _TfdsSplit:
    """A split of a tfds dataset, keyed by (name, data_dir, split); carries the builder that reads it."""

    name: str
    data_dir: str | None
    split: str
    builder: tfds.core.DatasetBuilder = dataclasses.field(compare=False, repr=False)


@functools.lru_cache(maxsize=8)
def _tfds_labels(key: _TfdsSplit) -> np.ndarray:
    """The labels of a split in record order (files read in order): one pass that reads every record, once per
    process for each (name, data_dir, split)."""
    name, split = key.name, key.split
    ds = _tfds_read(key.builder, split, 0, in_order=True)
    batches = ds.map(lambda image, label: label).batch(4096).as_numpy_iterator()
    what = f"Reading the labels of {name} {split} to select its examples (classes, subset)"
    start = time.monotonic()
    labels = list(_progress(batches, what, count_records(ds), "records", len))
    labels = np.concatenate(labels) if labels else np.zeros([0], np.int32)
    log.info("Read %d labels of %s %s in %.1fs.", len(labels), name, split, time.monotonic() - start)
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


def _tfds_source(config, builder) -> Source:
    builder = builder or tfds_builder(config)
    if not builder.is_prepared():  # tfds_builder refused this unless config.data.download is on
        builder.download_and_prepare()
    num_threads = config.data.num_threads

    def shard(split, index, count, keep=None):
        if keep is None:
            share = tfds.split_for_jax_process(split, process_index=index, process_count=count)
            if not builder.info.splits[share].num_examples:  # more processes than records (tfds refuses to read it)
                return _tfds_read(builder, split, num_threads).take(0)
            return _tfds_read(builder, share, num_threads)
        part = np.array_split(keep, count)[index]
        if not len(part):
            return _tfds_read(builder, split, num_threads).take(0)
        lo, hi = int(part[0]), int(part[-1]) + 1  # read this range of the split, keep the subset's records
        mask = np.zeros(hi - lo, bool)
        mask[part - lo] = True
        ds = _tfds_read(builder, _tfds_range(builder, split, lo, hi), num_threads, in_order=True).enumerate()
        ds = ds.filter(lambda i, _: tf.gather(mask, i)).map(lambda _, rec: rec)
        return ds.apply(tf.data.experimental.assert_cardinality(len(part)))

    def labels_of(split):
        return _tfds_labels(_TfdsSplit(config.data.name, config.data.data_dir, split, builder))

    def num_records(split):
        return count_records(shard(split, 0, 1))

    where = f"tfds dataset {config.data.name!r}"
    return _opened("encoded", config, shard, tfds_class_names(builder), where, labels_of, num_records)


def _opened(kind, config, shard, names, where, labels_of, num_records) -> Source:
    """The Source of `shard` (Source.shard) over a dataset of class names `names` (label order). where: how
    config.data.classes' errors name the dataset (None: `names` are the kept classes already, as an image folder
    scans only those); labels_of(split): the labels of the split's records in order (read only to select classes
    or a subset); num_records(split): the split's size."""
    selection = None if where is None else select_classes(config, names, where)
    train, evals = config.data.train_split, config.data.eval_split
    keep = None
    if selection is not None or _subset_requested(config):
        keep = _train_keep(labels_of(train), selection, names, config)

    @functools.cache
    def class_keep(split):  # Source.class_keep, each split's labels read once
        return None if selection is None else selection.positions(labels_of(split))

    eval_keep = class_keep(evals)
    kept = names if selection is None else selection.names
    num_train = num_records(train) if keep is None else len(keep)
    info = DatasetInfo(len(kept), num_train, num_records(evals) if eval_keep is None else len(eval_keep), kept)
    label_map = None if selection is None else selection.label_map
    return Source(kind, info, shard, train, keep, evals, class_keep, label_map)


def tfds_class_names(builder) -> list[str]:
    """The class names of a tfds dataset's label feature (its supervised_keys' label, else 'label')."""
    _, label_key = builder.info.supervised_keys or ("image", "label")
    return list(builder.info.features[label_key].names)


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
            (name, n), more = min(short, key=lambda s: s[1] == 0), len(short) - 1  # a class with examples first
            empty = [c for c, k in short if k == 0]
            none = "no count can take from it"
            leave_out = (
                "leave it out with config.data.classes, or use config.data.train_fraction (a class without examples "
                "takes none)."
            )
            if not n:
                fix = f"{none}: {leave_out}"
            else:
                fix = "lower train_per_class, or use config.data.train_fraction for a stratified fraction."
                fix += f" Class {empty[0]!r} has none: {none}; {leave_out}" if empty else ""
            raise ValueError(
                f"config.data.train_per_class={data.train_per_class}: class {name!r} has only {n} examples in "
                f"config.data.train_split={data.train_split!r}"
                + (f" ({more} more classes have too few)" if more else "")
                + f"; {fix}"
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
    """Returns None if PIL fully decodes `path` and its content is a JPEG, PNG, GIF or BMP image, else the reason.

    Files are picked by extension (IMAGE_EXTENSIONS), but the format is read from their content, so a .png that
    holds a JPEG passes. tf.io.decode_image also reads WebP and JPEG XL; those, and PIL's 'MPO' (multi-picture
    JPEG), are refused here."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format not in ("JPEG", "PNG", "GIF", "BMP"):
                return f"format {im.format} is not decodable by tf.io.decode_image"
            if im.format == "BMP" and (why := _bmp_unreadable_by_tf(path, im.mode)):
                return f"a BMP {why} is misread by tf.io.decode_image; save it as 24-bit RGB"
            im.draft(None, (1, 1))  # JPEG: decode at 1/8 scale; still reads every byte, so truncation shows
            im.load()
    except Exception as e:  # noqa: BLE001 - any failure means an unreadable image
        return f"{type(e).__name__}: {e}"
    return None


def _bmp_unreadable_by_tf(path: str, mode: str) -> str | None:
    """What of a BMP tf.io.decode_image cannot read (it fails, or reads the bytes as other pixels); None if nothing.

    TF reads uncompressed 8-bit grey, 24-bit and 32-bit BMPs: not 1-bit ones, palettes (it takes the indices for
    grey), 16-bit ones or run-length-compressed ones."""
    if mode not in ("RGB", "RGBA", "L"):
        return f"of PIL mode {mode!r} (1-bit or palette)"
    with open(path, "rb") as f:
        header = f.read(34)
    if len(header) == 34 and int.from_bytes(header[14:18], "little") >= 40:  # a BITMAPINFOHEADER or later
        bits, compression = int.from_bytes(header[28:30], "little"), int.from_bytes(header[30:34], "little")
        if bits not in (8, 24, 32) or compression not in (0, 3) or (compression == 3 and bits != 32):
            return f"of {bits} bits per pixel, compression {compression}"
    return None


@functools.lru_cache(maxsize=16)
def _scan_split(
    root: str, split: str, classes: tuple[str, ...], wanted: tuple[str, ...]
) -> tuple[list[str], list[int], list[str]]:
    """Lists root/split/<class>/*.{jpg,jpeg,png} of the `wanted` classes (label: the index in `wanted`; `classes`:
    every class of the train split); returns (paths, labels, bad 'path (reason)' entries)."""
    folder = os.path.join(root, split)  # input_pipeline.validate_data_config checked that it exists
    extra = sorted(set(class_folders(folder)) - set(classes))  # folders only: a README.txt is no class
    if extra:
        raise ValueError(
            f"config.data.eval_split={split!r}: {folder} has class folders the train split lacks: {extra[:10]}; the "
            "eval split may lack classes but not add any (remove those folders, or add them to the train split)."
        )
    paths, labels = [], []
    for label, name in enumerate(wanted):
        d = os.path.join(folder, name)
        files = image_files(d) if os.path.isdir(d) else []
        paths += [os.path.join(d, f) for f in files]
        labels += [label] * len(files)
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1))) as pool:
        reasons = list(_progress(pool.map(_verify_image, paths), f"Verifying the images of {folder}", len(paths)))
    bad = [f"{p} ({r})" for p, r in zip(paths, reasons, strict=True) if r]
    keep = [i for i, r in enumerate(reasons) if not r]
    labels = [labels[i] for i in keep]
    log.info(
        f"{folder}: {len(keep)} readable images in {len(set(labels))} classes, {len(bad)} unreadable; "
        f"verified in {time.monotonic() - start:.1f}s."
    )
    return [paths[i] for i in keep], labels, bad


def class_folders(folder: str) -> tuple[str, ...]:
    return tuple(sorted(c for c in os.listdir(folder) if os.path.isdir(os.path.join(folder, c))))


def image_files(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


def directory_classes(config) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(every class folder of the train split, the classes config.data.classes keeps of them in label order)."""
    train_dir = os.path.join(config.data.data_dir, config.data.train_split)
    classes = class_folders(train_dir)
    selection = select_classes(config, list(classes), f"folder {train_dir}")
    return classes, classes if selection is None else tuple(selection.names)


def _directory_source(config) -> Source:
    root = config.data.data_dir
    classes, wanted = directory_classes(config)  # only the kept classes' folders are scanned, labels 0..K-1
    splits = {}
    for split in (config.data.train_split, config.data.eval_split):
        paths, labels, bad = _scan_split(root, split, classes, wanted)
        if bad:
            listing = "\n  ".join(bad[:50]) + (f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else "")
            if config.data.bad_images == "fail":
                raise ValueError(
                    f"{len(bad)} unreadable images in {root}/{split} (set config.data.bad_images='skip' "
                    f"to leave them out, or fix them):\n  {listing}"
                )
            log.warning("Skipping %d unreadable images in %s/%s:\n  %s", len(bad), root, split, listing)
        if split == config.data.train_split and len(set(labels)) < len(wanted):
            empty = os.path.join(root, split, wanted[min(set(range(len(wanted))) - set(labels))])
            raise ValueError(
                f"class folder {empty} has no readable images (config.data.bad_images='skip' left them all out); "
                "add readable images to it or remove the folder."
            )
        splits[split] = (np.array([p.encode() for p in paths], dtype=object), np.array(labels, np.int32))
    return _in_memory_source("path", splits, list(wanted), config)


@functools.lru_cache(maxsize=1)
def _digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's bundled digits as uint8 (N, 8, 8, 3) in 0..255; fixed 1,497 / 300 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.repeat(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None], 3, axis=-1)
    perm = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(images))
    idx = {"train": perm[:-DIGITS_NUM_EVAL], "test": perm[-DIGITS_NUM_EVAL:]}
    return {k: (images[i], digits.target[i].astype(np.int32)) for k, i in idx.items()}


def _in_memory_source(kind: str, splits: dict, names: list[str], config, where: str | None = None) -> Source:
    """A Source over split -> (uint8 images (N, H, W, 3) or encoded file paths (N,), int32 labels (N,)) held in
    memory; names and where as `_opened` takes them."""

    def shard(split, index, count, keep=None):
        arrays = splits[split] if keep is None else tuple(a[keep] for a in splits[split])
        return tf.data.Dataset.from_tensor_slices(tuple(np.array_split(a, count)[index] for a in arrays))

    def labels_of(split):
        return splits[split][1]

    return _opened(kind, config, shard, names, where, labels_of, lambda split: len(labels_of(split)))


# ---------------------------------------------------------------- IDX files (MNIST's format)
# The IDX format (LeCun et al.'s MNIST page; Fashion-MNIST, KMNIST and EMNIST use it too): two zero bytes, the
# element type, the number of dimensions, each dimension as a big-endian uint32, then the elements, row-major.
IDX_TYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}  # fmt: skip
IDX_SPLITS = {"train": ("train",), "test": ("t10k", "test")}  # split -> file-name stems, e.g. t10k-images-idx3-ubyte
IDX_CLASS_NAMES_FILE = "class_names.txt"  # optional, in config.data.data_dir: one class name per line
# Zalando's Fashion-MNIST, recognised by the SHA-256 of the labels (the label file less its 8-byte header).
FASHION_MNIST_LABELS_SHA256 = (
    "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7",  # train-labels-idx1-ubyte
    "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9",  # t10k-labels-idx1-ubyte
)
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]  # fmt: skip


def idx_files(data_dir: str, split: str) -> tuple[str, str]:
    """The (images, labels) files of `split` in `data_dir`: ``[prefix]<stem>-images-idx3-ubyte[.gz]`` and
    ``...-labels-idx1-ubyte[.gz]`` ('-' or '.' before 'idx'), stem 'train' for 'train', 't10k' or 'test' for
    'test'. ValueError naming what was looked for when there is not exactly one of each."""
    found = []
    for kind, ndim in (("images", 3), ("labels", 1)):
        paths = sorted(
            {
                p
                for stem in IDX_SPLITS[split]
                for ext in ("", ".gz")
                for p in glob.glob(os.path.join(glob.escape(data_dir), f"*{stem}-{kind}[-.]idx{ndim}-ubyte{ext}"))
            }
        )
        want = f"{IDX_SPLITS[split][0]}-{kind}-idx{ndim}-ubyte[.gz]"
        if not paths:
            raise ValueError(
                f"config.data.data_dir={data_dir!r} has no IDX file {want} for split {split!r}; 'idx' datasets are "
                "a folder with train-{images-idx3,labels-idx1}-ubyte[.gz] and t10k-{...} (MNIST's file names)."
            )
        if len(paths) > 1:
            raise ValueError(
                f"config.data.data_dir={data_dir!r} has {len(paths)} files that could be {want}: "
                f"{[os.path.basename(p) for p in paths]}; keep one set of IDX files per folder."
            )
        found.append(paths[0])
    return found[0], found[1]


def read_idx(path: str) -> np.ndarray:
    """The array an IDX file (raw or gzip) holds; ValueError naming the file and what is wrong with it."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except EOFError as e:  # a gzip stream cut short (an interrupted download or copy)
        raise ValueError(f"IDX file {path} is truncated: its gzip stream ends early (EOFError: {e}).") from None
    except zlib.error as e:  # damaged compressed data
        raise ValueError(f"IDX file {path} is corrupt: its gzip data does not decompress (zlib.error: {e}).") from None
    except OSError as e:  # gzip.BadGzipFile (not gzip, or a CRC mismatch) is an OSError
        raise ValueError(f"IDX file {path} cannot be read: {type(e).__name__}: {e}") from None
    if len(data) < 4 or data[0] or data[1] or data[2] not in IDX_TYPES:
        raise ValueError(
            f"IDX file {path} has magic number 0x{data[:4].hex() or '(empty)'}; an IDX file starts with two zero "
            f"bytes, an element type ({', '.join(f'0x{t:02x}' for t in IDX_TYPES)}) and the number of dimensions."
        )
    dtype, ndim = IDX_TYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"IDX file {path} is truncated: its header declares {ndim} dimensions but ends first.")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = header + math.prod(dims) * dtype.itemsize
    if len(data) != size:
        what = "truncated" if len(data) < size else "longer than its header says"
        raise ValueError(
            f"IDX file {path} is {what}: dimensions {dims} of {dtype.itemsize}-byte elements need {size:,} bytes, "
            f"it has {len(data):,}."
        )
    return np.frombuffer(data, dtype, offset=header).reshape(dims)


@functools.lru_cache(maxsize=4)
def _idx_split(images_path: str, labels_path: str, _mtimes: tuple) -> tuple[np.ndarray, np.ndarray, str]:
    """(uint8 images (N, H, W, 3), int32 labels (N,), SHA-256 of the labels as bytes) of one split."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))):
        raise ValueError(
            f"IDX file {images_path} holds {images.dtype} of shape {images.shape}; images must be unsigned bytes "
            "(type 0x08) of shape (N, H, W), (N, H, W, 1) or (N, H, W, 3)."
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(
            f"IDX file {labels_path} holds {labels.dtype} of shape {labels.shape}; labels must be integers, shape (N,)."
        )
    if len(images) != len(labels):
        raise ValueError(
            f"IDX files {images_path} ({len(images):,} images) and {labels_path} ({len(labels):,} labels) must "
            "hold as many images as labels."
        )
    if len(labels) and labels.min() < 0:
        raise ValueError(f"IDX file {labels_path} has a negative label ({labels.min()}); labels are 0..K-1.")
    if images.ndim == 3:
        images = images[..., None]
    images = np.ascontiguousarray(np.broadcast_to(images, (*images.shape[:3], 3)))  # grey -> the models' RGB
    return images, labels.astype(np.int32), hashlib.sha256(labels.astype(">u1").tobytes()).hexdigest()


def idx_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(images, labels, label-file SHA-256) of `split` of the IDX files in `data_dir`, read once per process
    (again when a file changes)."""
    paths = idx_files(data_dir, split)
    return _idx_split(*paths, tuple(os.stat(p).st_mtime_ns for p in paths))


def idx_class_names(data_dir: str, num_classes: int, label_digests: list[str]) -> list[str]:
    """data_dir/class_names.txt when present (one name a line), Fashion-MNIST's ten when its label files are
    recognised, else '0', '1', ..."""
    names_file = os.path.join(data_dir, IDX_CLASS_NAMES_FILE)
    if os.path.exists(names_file):
        with open(names_file, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        if len(names) < num_classes:
            raise ValueError(
                f"{names_file} names {len(names)} classes but the labels go up to {num_classes - 1}; "
                f"give one name per line for each of the {num_classes} classes."
            )
        return names
    if num_classes == 10 and any(d in FASHION_MNIST_LABELS_SHA256 for d in label_digests):
        return list(FASHION_MNIST_CLASSES)
    return [str(i) for i in range(num_classes)]


def _idx_splits(config) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """({split: (images, labels)} of the train and eval splits of the IDX files, the class names)."""
    data_dir = config.data.data_dir
    splits = {s: idx_split(data_dir, s) for s in dict.fromkeys((config.data.train_split, config.data.eval_split))}
    num_classes = int(max(int(labels.max()) + 1 if len(labels) else 0 for _, labels, _ in splits.values()))
    names = idx_class_names(data_dir, num_classes, [digest for _, _, digest in splits.values()])
    return {s: (images, labels) for s, (images, labels, _) in splits.items()}, names


def class_names(config, builder=None) -> tuple[list[str], str]:
    """(every class name of config.data.name in label order, how errors name the dataset), read cheaply: the tfds
    metadata of `builder` (prepared), the train split's folder names, the IDX label files (read once per process),
    the digits. For `input_pipeline.validate_data_config`'s check of config.data.classes."""
    name = config.data.name
    if name == "digits":
        return DIGITS_CLASSES, "digits"
    if name == "directory":
        train_dir = os.path.join(config.data.data_dir, config.data.train_split)
        return list(class_folders(train_dir)), f"folder {train_dir}"
    if name == "idx":
        return _idx_splits(config)[1], f"the IDX files in {config.data.data_dir}"
    return tfds_class_names(builder), f"tfds dataset {name!r}"


def source(config, *, builder=None) -> Source:
    """Opens config.data.name ('digits', 'directory', 'idx' or a tfds dataset): scans and verifies an image folder,
    reads IDX files, reads a tfds split's labels when a train subset is asked for, counts the splits. Expects a
    config that passed `input_pipeline.validate_data_config`; builder: the tfds dataset's builder (`tfds_builder`),
    if already made."""
    name = config.data.name
    if name == "digits":
        return _in_memory_source("raw", _digits(), DIGITS_CLASSES, config, "digits")
    if name == "directory":
        return _directory_source(config)
    if name == "idx":
        return _in_memory_source("raw", *_idx_splits(config), config, f"the IDX files in {config.data.data_dir}")
    return _tfds_source(config, builder)


def multi_label_source(config, labels: str, *, builder=None) -> Source:
    """config.data.eval_split of tfds dataset config.data.name, each record (encoded image, int32 (K,) multi-hot of
    the labels in feature `labels`, a Sequence of ClassLabel: ImageNet ReaL's 'real_label'); an image without a
    label has an all-zero vector. Only `shard(config.data.eval_split, ...)` is meant to be read (an eval set)."""
    builder = builder or tfds_builder(config)
    if not builder.is_prepared():
        builder.download_and_prepare()
    feature = builder.info.features[labels] if labels in builder.info.features.keys() else None
    if not (isinstance(feature, tfds.features.Sequence) and isinstance(feature.feature, tfds.features.ClassLabel)):
        found = {k: type(v).__name__ for k, v in builder.info.features.items()}
        raise ValueError(
            f"labels={labels!r} is not a feature of {config.data.name} holding several class labels per image "
            f"(a Sequence of ClassLabel); its features: {found}."
        )
    classes = feature.feature

    def multi_hot(ex):  # no label: all zero (a sum over none)
        return tf.minimum(tf.reduce_sum(tf.one_hot(ex[labels], classes.num_classes, dtype=tf.int32), axis=0), 1)

    def shard(split, index, count, keep=None):
        share = tfds.split_for_jax_process(split, process_index=index, process_count=count)
        return _tfds_read(builder, share, config.data.num_threads, label=multi_hot)

    split = config.data.eval_split
    info = DatasetInfo(classes.num_classes, 0, count_records(shard(split, 0, 1)), list(classes.names))
    return Source("encoded", info, shard, split, None, eval_split=split)


def count_records(ds) -> int:
    """Records in `ds`: its cardinality, or a pass over it when that is unknown."""
    n = int(ds.cardinality())
    if n < 0:
        n = int(ds.reduce(np.int64(0), lambda c, _: c + 1))  # unknown cardinality: count (reads the shard)
    return n


def dataset_options(num_threads: int = 0) -> tf.data.Options:
    """Deterministic tf.data options; num_threads > 0 (config.data.num_threads): a private pool of that many
    threads for the iterator's ops, each op single-threaded; 0: tf.data's default (shared pool, AUTOTUNE)."""
    options = tf.data.Options()
    options.deterministic = True
    if num_threads > 0:
        options.threading.private_threadpool_size = num_threads
        options.threading.max_intra_op_parallelism = 1
    return options
