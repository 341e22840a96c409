"""tf.data input pipeline: checks the data config, opens the data source once (`build`) and assembles the train
and eval pipelines from `data_sources` (where examples come from) and `image_ops` (what is done to each image).

Train batches are a pure function of (config.seed, step, process_index): the stream is the concatenation of
per-epoch shuffles (explicit seeds per epoch), every random choice of the augmentation is a stateless op keyed by
(seed, process_index, epoch, index in epoch), and `build(config).train_iterator(start_step=k)` re-enters that stream
at batch k by skipping undecoded records of one epoch at most. With config.data.aug_repeats > 1 (DeiT's repeated
augmentation, `Data._repeated_train_dataset`) the stream is one global stream, keyed by (seed, epoch, index in
epoch), that the processes interleave. Mixup/CutMix/label smoothing run on device, not here. TensorFlow is kept off
accelerators (`_hide_accelerators`, called by `build`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Iterator

import numpy as np
import tensorflow as tf
from absl import logging

import data_sources
import image_ops
from data_sources import DatasetInfo
from s2mlp import augment_chain
from s2mlp.preprocessing import mean_std

_AUTO = tf.data.AUTOTUNE
_fold_in = tf.random.experimental.stateless_fold_in


def _hide_accelerators():
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices; it was hidden by an earlier call
        pass


# ---------------------------------------------------------------- checks
def validate_data_config(config, *, process_count: int = 1) -> None:
    """Cheap checks (no image is read); raises ValueError naming the config field and the fix."""
    _validate(config, process_count)


def _validate(config, process_count: int):
    """validate_data_config's checks; returns the tfds builder it made for a tfds dataset, else None."""

    def need(ok, field, fix):
        if not ok:
            raise ValueError(f"config.{field}={_get(config, field)!r}: {fix}")

    need(
        isinstance(config.data.name, str) and config.data.name,
        "data.name",
        "give a tfds dataset name, 'directory', 'idx' or 'digits'.",
    )
    for field in ("batch_size", "eval_batch_size"):
        need(
            _get(config, field) > 0 and _get(config, field) % process_count == 0,
            field,
            f"must be a positive multiple of the process count ({process_count}).",
        )
    need(0 < config.data.eval_crop_pct <= 1, "data.eval_crop_pct", "must be in (0, 1].")
    need(config.data.bad_images in ("fail", "skip"), "data.bad_images", "use 'fail' or 'skip'.")
    need(config.data.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1.")
    need(
        _is_int(config.data.num_threads) and config.data.num_threads >= 0,
        "data.num_threads",
        "must be an int >= 0 (0: tf.data's default thread pool).",
    )
    fraction, per_class = config.data.train_fraction, config.data.train_per_class
    if not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction <= 1):
        raise ValueError(f"config.data.train_fraction={fraction!r} must be in (0, 1] (1.0: the whole train split).")
    need(
        _is_int(per_class) and per_class >= 0,
        "data.train_per_class",
        "must be an int >= 0 (0: off; n > 0: n examples of each class).",
    )
    need(
        per_class == 0 or fraction == 1.0,
        "data.train_per_class",
        f"and config.data.train_fraction={fraction!r} are both set; use one of them (leave the other at "
        "train_per_class=0 / train_fraction=1.0).",
    )
    need(
        _is_int(config.data.subset_seed) and 0 <= config.data.subset_seed < 2**32,
        "data.subset_seed",
        "must be an int in [0, 2**32).",
    )
    need(
        _is_int(config.data.aug_repeats) and config.data.aug_repeats >= 0,
        "data.aug_repeats",
        "must be an int >= 0 (0 or 1: off; n > 1: each chosen image n times an epoch, DeiT's repeated augmentation).",
    )
    try:
        mean_std(config.data.normalization)
    except ValueError as e:
        raise ValueError(f"config.data.normalization: {e}") from None
    augment_chain.parse(config.augment.ops)
    splits = ("data.train_split", "data.eval_split")
    if config.data.name == "digits":
        for field in splits:
            need(_get(config, field) in ("train", "test"), field, "digits has splits 'train' and 'test'.")
        _check_classes(config)
        return None
    if config.data.name == "idx":
        root = config.data.data_dir
        need(
            root and os.path.isdir(root),
            "data.data_dir",
            "must be a folder holding IDX files (e.g. /usr/share/datasets/fashion-mnist from Debian's "
            "dataset-fashion-mnist package).",
        )
        for field in splits:
            need(_get(config, field) in data_sources.IDX_SPLITS, field, "'idx' datasets have splits 'train', 'test'.")
            data_sources.idx_files(root, _get(config, field))
        _check_classes(config)  # reads the IDX files when config.data.classes is set (once per process)
        return None
    if config.data.name == "directory":
        root = config.data.data_dir
        for field in splits:
            need(
                root and os.path.isdir(os.path.join(root, _get(config, field))),
                field,
                f"folder {os.path.join(root or '<config.data.data_dir unset>', str(_get(config, field)))} "
                f"does not exist; 'directory' datasets are data_dir/<split>/<class>/*.jpg.",
            )
        train_dir = os.path.join(root, config.data.train_split)
        need(
            data_sources.class_folders(train_dir),
            "data.train_split",
            f"folder {train_dir} has no class sub-folders; 'directory' datasets are data_dir/<split>/<class>/*.jpg.",
        )
        classes, wanted = data_sources.directory_classes(config)  # checks config.data.classes
        for split in dict.fromkeys((config.data.train_split, config.data.eval_split)):
            for name in data_sources.class_folders(os.path.join(root, split)):
                if name in classes and name not in wanted:  # a class config.data.classes leaves out is never read
                    continue
                folder = os.path.join(root, split, name)
                if not data_sources.image_files(folder):
                    extensions = ", ".join("*" + e for e in data_sources.IMAGE_EXTENSIONS)
                    also = "" if name in classes else " and a train folder of that class (the eval split adds none)"
                    raise ValueError(
                        f"config.data.data_dir={root!r}: class folder {folder} holds no images "
                        f"({extensions}); remove the folder or add images to it{also}."
                    )
        return None
    builder = data_sources.tfds_builder(config)
    if builder.is_prepared():
        for field in splits:
            try:
                builder.info.splits[_get(config, field)]
            except (KeyError, ValueError) as e:
                raise ValueError(
                    f"config.{field}={_get(config, field)!r} is not a split of {config.data.name}: {e}"
                ) from None
        _check_classes(config, builder)  # a dataset that tfds still has to prepare is checked once it is
    return builder


def _check_classes(config, builder=None) -> None:
    """config.data.classes names classes of the dataset (ValueError naming the first unknown one, and the closest)."""
    if config.data.classes == "":
        return
    names, where = data_sources.class_names(config, builder)
    data_sources.select_classes(config, names, where)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _get(config, dotted: str):
    """config's field at `dotted`, e.g. 'data.name' (the same convention as train_lib's)."""
    return functools.reduce(getattr, dotted.split("."), config)


# ---------------------------------------------------------------- the data, built once
@dataclasses.dataclass(frozen=True, eq=False)
class Recipe:
    """The config fields the pipelines read, copied by `build` (later edits of the config don't reach a Data)."""

    seed: int
    image_size: int
    batch: int  # train examples per batch of this process: config.batch_size // process_count
    eval_batch: int  # config.eval_batch_size // process_count
    shuffle_buffer: int
    num_threads: int  # tf.data threads per iterator; 0: tf.data's default pool
    mean: np.ndarray  # normalisation, per channel
    std: np.ndarray
    augment: augment_chain.Chain  # config.augment.ops; the pipeline runs its host ops
    eval_crop_pct: float
    repeats: int  # config.data.aug_repeats; 1: off (0 reads as 1)

    @classmethod
    def from_config(cls, config, process_count: int) -> Recipe:
        mean, std = mean_std(config.data.normalization)
        return cls(
            seed=config.seed,
            image_size=config.image_size,
            batch=config.batch_size // process_count,  # validate_data_config checked the divisibility
            eval_batch=config.eval_batch_size // process_count,
            shuffle_buffer=config.data.shuffle_buffer,
            num_threads=config.data.num_threads,
            mean=mean,
            std=std,
            augment=augment_chain.parse(config.augment.ops),
            eval_crop_pct=config.data.eval_crop_pct,
            repeats=max(int(config.data.aug_repeats), 1),
        )


@dataclasses.dataclass(frozen=True, eq=False)
class Data:
    """One process's view of a dataset, made by `build`: its DatasetInfo and its train and eval iterators, which
    reuse the source (tfds builder, scanned image folder, IDX files or digits) opened and counted once."""

    info: DatasetInfo
    source: data_sources.Source = dataclasses.field(repr=False)
    recipe: Recipe = dataclasses.field(repr=False)
    process_index: int = 0
    process_count: int = 1
    train_records: int = 0  # records in this process's share of the train split (or subset)
    eval_batches: int = 0  # eval batches of every process (the largest share, padded up)

    def train_iterator(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Endless {'image': float32 (B, S, S, 3) normalised, 'label': int32 (B,)}, B = batch_size // process_count.

        The stream is epoch after epoch of this process's shard, each shuffled with its own seed; batches may
        span epochs. Starting at `start_step` skips (undecoded) start_step * B % n records of one epoch.
        """
        return self.train_dataset(start_step).as_numpy_iterator()

    def eval_iterator(self) -> Iterator[dict[str, np.ndarray]]:
        """One pass over config.data.eval_split: {'image': (B, S, S, 3), 'label': (B,), 'mask': float32 (B,)}.

        Each process reads its contiguous share; shares are padded (mask 0) to the same number of batches.
        """
        return self.eval_dataset().as_numpy_iterator()

    def train_dataset(self, start_step: int = 0) -> tf.data.Dataset:
        """The tf.data.Dataset behind `train_iterator`."""
        source, r = self.source, self.recipe
        if r.repeats > 1:
            return self._repeated_train_dataset(start_step)
        records, n = source.train_shard(self.process_index, self.process_count), self.train_records
        if n == 0:
            raise ValueError(f"config.data.train_split={source.train_split!r} has no examples for this process.")
        first_epoch, offset = divmod(start_step * r.batch, n)
        block = n if source.kind != "encoded" else min(n, r.shuffle_buffer)  # in memory: full permutation
        seed = tf.constant([r.seed, self.process_index], tf.int64)
        shuffle_key, example_key = _fold_in(seed, 1), _fold_in(seed, 2)

        def epoch_stream(epoch):
            ds = _block_shuffle(records, block, _fold_in(shuffle_key, epoch)).enumerate()
            return ds.map(lambda i, rec: (epoch, i, rec[0], rec[1]))

        ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch_stream).skip(offset)
        return self._augment_and_batch(ds, example_key)

    def _repeated_train_dataset(self, start_step: int) -> tf.data.Dataset:
        """Repeated augmentation (DeiT's RASampler; S²-MLP paper §4, "Training details"), r = config.data.aug_repeats.

        One global stream, the same for every process count: epoch e is N positions (N: the train split or its
        subset; steps per epoch as without repeats). The N records, in their fixed order, are cut into blocks of
        `m` (in memory and image folders: one block, the whole split; tfds: config.data.shuffle_buffer); each block
        of size s is permuted (keyed by seed, epoch, block) and position q of the block holds record perm[q // r]:
        the first ceil(s / r) records of the permutation, each r times in a row (the last one fewer when r does not
        divide s). Position j of the epoch is augmented with a key of (seed, epoch, j), so each copy differs.
        Process p of P takes the global positions g = e·N + j with g ≡ p (mod P), DeiT's interleave: the r copies
        of an image go to r different processes (min(r, P)), and the union of the processes' batch t is the
        1-process stream's batch t, bit for bit. Every process reads the whole train split each epoch and decodes
        its share only.

        Why not the plain stream's contiguous shards (each process shuffles its own part): the copies of an image
        would all stay on the process that holds it, so processes could not split them as DeiT does. The
        interleave costs each process a read (not a decode) of the whole split per epoch, and buys a global batch
        that is a function of (seed, step) alone, whatever the process count.

        DeiT's RASampler (facebookresearch/deit, samplers.py) permutes the dataset, repeats each index 3 times,
        gives replica p the elements p, p+P, ... and keeps the first floor(N // 256 · 256 / P) of them; here an
        epoch keeps N positions (its commented-out ceil(N / P) per replica), as the stream runs epoch into epoch
        and needs no whole number of 256-batches.
        """
        source, r = self.source, self.recipe
        n, p, count, reps = self.info.num_train, self.process_index, self.process_count, r.repeats
        if n == 0:
            raise ValueError(f"config.data.train_split={source.train_split!r} has no examples.")
        records = source.train_shard(0, 1)  # the whole split (or subset), in its fixed order, in every process
        first_epoch, offset = divmod(start_step * r.batch * count, n)  # global positions before start_step
        block = n if source.kind != "encoded" else min(n, r.shuffle_buffer)
        seed = tf.constant([r.seed, 0], tf.int64)  # no process index: every process draws the same epochs
        shuffle_key, example_key = _fold_in(seed, 3), _fold_in(seed, 4)

        def epoch_stream(epoch):
            key = _fold_in(shuffle_key, epoch)
            mine = tf.math.floormod(p - epoch * n, count)  # j ≡ mine (mod P): this process's positions
            low = tf.where(epoch == first_epoch, tf.constant(offset, tf.int64), tf.constant(0, tf.int64))

            def pick(b, recs):
                size = tf.shape(recs[1], out_type=tf.int64)[0]
                start = b * block
                perm = tf.random.experimental.stateless_shuffle(tf.range(size), _fold_in(key, b))
                j = tf.range(start + tf.math.floormod(mine - start, count), start + size, count)
                j = tf.boolean_mask(j, j >= low)
                rows = tf.gather(perm, (j - start) // reps)
                return (tf.fill(tf.shape(j), epoch), j, *(tf.gather(t, rows) for t in recs))

            return records.batch(block).enumerate().map(pick).prefetch(1).unbatch()

        ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch_stream)
        return self._augment_and_batch(ds, example_key)

    def _augment_and_batch(self, ds: tf.data.Dataset, example_key) -> tf.data.Dataset:
        """(epoch, index, image, label) records -> batches of images after the chain's host ops (normalised float32,
        or uint8 when ops run on the device); each record's random choices are keyed by (example_key, epoch, index)."""
        r = self.recipe
        context = image_ops.Context(self.source.kind, r.image_size, r.mean, r.std)
        shape = [r.image_size, r.image_size, 3]

        def augment(epoch, index, image, label):
            image = image_ops.apply(r.augment.host, image, _fold_in(_fold_in(example_key, epoch), index), context)
            return {"image": tf.ensure_shape(image, shape), "label": label}

        ds = ds.map(tf.autograph.experimental.do_not_convert(augment), num_parallel_calls=_AUTO)
        ds = ds.batch(r.batch, drop_remainder=True).prefetch(_AUTO)
        return ds.with_options(data_sources.dataset_options(r.num_threads))

    def eval_dataset(self) -> tf.data.Dataset:
        """The tf.data.Dataset behind `eval_iterator`."""
        source, r = self.source, self.recipe
        s = r.image_size
        key, pad_label = self._eval_label()

        def prepare(image, label):
            image = image_ops.eval_image(image, source.kind, s, r.eval_crop_pct)
            return {"image": image_ops.normalize(image, r.mean, r.std), key: label, "mask": tf.constant(1.0)}

        pad = {"image": tf.zeros([s, s, 3]), key: pad_label, "mask": tf.constant(0.0)}
        prepare = tf.autograph.experimental.do_not_convert(prepare)
        ds = source.eval_shard(self.process_index, self.process_count).map(prepare, num_parallel_calls=_AUTO)
        ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat()).take(self.eval_batches * r.eval_batch)
        return ds.batch(r.eval_batch).prefetch(_AUTO).with_options(data_sources.dataset_options(r.num_threads))

    def _eval_label(self) -> tuple[str, tf.Tensor]:
        """The eval batches' label key and the label of a padding example."""
        return "label", tf.constant(0, tf.int32)


def build(config, *, process_index: int = 0, process_count: int = 1) -> Data:
    """Checks the data config (validate_data_config), opens the source (tfds builder, image-folder scan, digits)
    and counts the splits, once; the returned Data's iterators reuse all of it."""
    _hide_accelerators()
    builder = _validate(config, process_count)
    source = data_sources.source(config, builder=builder)
    recipe = Recipe.from_config(config, process_count)
    train_records = data_sources.count_records(source.train_shard(process_index, process_count))
    eval_batches = _eval_batches(source, recipe, process_count, f"config.data.eval_split={source.eval_split!r}")
    return Data(source.info, source, recipe, process_index, process_count, train_records, eval_batches)


def _eval_batches(source, recipe: Recipe, process_count: int, field: str) -> int:
    """Eval batches of every process: the largest share, padded up. An eval without examples would fail at its first
    evaluation, mid-run: it is refused before anything is compiled."""
    largest = max(data_sources.count_records(source.eval_shard(p, process_count)) for p in range(process_count))
    if not largest:
        raise ValueError(f"{field} has no examples (of the kept classes); give a split with images to evaluate on.")
    return -(-largest // recipe.eval_batch)


def _block_shuffle(records, block: int, key):
    """Stateless shuffle: a permutation keyed by `key` of each run of `block` consecutive records (block >= n:
    of the whole dataset). Unlike Dataset.shuffle, it does not depend on TF's global seed."""

    def permute(j, recs):
        perm = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(recs[1])[0]), _fold_in(key, j))
        return tuple(tf.gather(t, perm) for t in recs)

    return records.batch(block).enumerate().map(permute).prefetch(1).unbatch()


# ---------------------------------------------------------------- one-call conveniences (each builds anew)
def dataset_info(config) -> DatasetInfo:
    """Class count and names, and example counts of the train/eval splits (after skipping bad images)."""
    return build(config).info


def create_train_iterator(
    config, *, start_step: int = 0, process_index: int = 0, process_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    return build(config, process_index=process_index, process_count=process_count).train_iterator(start_step)


def create_eval_iterator(config, *, process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    return build(config, process_index=process_index, process_count=process_count).eval_iterator()


# ---------------------------------------------------------------- more evals (config.evals)
@dataclasses.dataclass(frozen=True, eq=False)
class MultiLabelData(Data):
    """A `Data` for an eval whose images have a set of labels (`build_eval` with `labels`, ImageNet ReaL): its
    eval batches hold 'labels', an int32 (B, K) multi-hot (all zero: an image without a label), not 'label'."""

    def _eval_label(self) -> tuple[str, tf.Tensor]:
        return "labels", tf.zeros([self.info.num_classes], tf.int32)


def build_eval(config, *, data: str, split: str, labels: str = "", process_index: int = 0, process_count: int = 1):
    """The eval data of split `split` of dataset `data` ('digits', 'idx', 'directory' in config.data.data_dir, or a
    tfds dataset) with config's eval preprocessing and batch size: a `Data` whose `eval_iterator` is used (its train
    split is left unread). With `labels` (a tfds feature holding several labels per image, ImageNet ReaL's
    'real_label') a `MultiLabelData`. Opens only that split (the checks and source of `build`, for a copy of config
    with data.name=data and both splits=split); ValueError as `build`'s, naming that copy's fields."""
    copy = config.copy_and_resolve_references()
    copy.data.name, copy.data.train_split, copy.data.eval_split = data, split, split
    copy.data.train_fraction, copy.data.train_per_class = 1.0, 0
    _hide_accelerators()
    try:
        builder = _validate(copy, process_count)
    except ValueError as e:  # named as build_eval's arguments, not as the copy's fields
        raise ValueError(re.sub(r"config\.data\.(train|eval)_split=", "split=", str(e))) from None
    if labels and builder is None:
        raise ValueError(f"labels={labels!r} needs a tfds dataset; {data!r} has one label per image.")
    source = (data_sources.multi_label_source(copy, labels, builder=builder) if labels
              else data_sources.source(copy, builder=builder))  # fmt: skip
    recipe = Recipe.from_config(copy, process_count)
    eval_batches = _eval_batches(source, recipe, process_count, f"split={split!r} of {data!r}")
    return (MultiLabelData if labels else Data)(
        source.info, source, recipe, process_index, process_count, 0, eval_batches
    )


def build_evals(config, data: Data, specs: list, process_index: int = 0, process_count: int = 1) -> list[tuple]:
    """(spec, data) of each eval of `specs` (`s2mlp.evals.from_config`): the main eval on `data` (the run's `build`),
    then each other eval's data (`build_eval`, its split only). ValueError naming config.evals when one cannot be
    read or labels other classes than the run's dataset."""
    sets = [(specs[0], data)]
    for spec in specs[1:]:
        try:
            extra = build_eval(config, data=spec.data, split=spec.split, labels=spec.labels,
                               process_index=process_index, process_count=process_count)  # fmt: skip
        except ValueError as e:
            raise ValueError(f"config.evals: eval {spec.name!r} ({spec.describe()}): {e}") from None
        if list(extra.info.class_names) != list(data.info.class_names):
            raise ValueError(
                f"config.evals: eval {spec.name!r} ({spec.describe()}) has {extra.info.num_classes} classes "
                f"{list(extra.info.class_names)[:5]}..., the run's dataset {config.data.name} has "
                f"{data.info.num_classes} {list(data.info.class_names)[:5]}...; an eval must label the same classes "
                "in the same order."
            )
        logging.info("Eval %r: %s, %s images.", spec.name, spec.describe(), f"{extra.info.num_eval:,}")
        sets.append((spec, extra))
    return sets
