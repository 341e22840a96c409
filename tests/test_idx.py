"""Tests of the IDX data source (config.data.name='idx': MNIST's file format, data_sources.py) and of
Fashion-MNIST through tfds' `fashion_mnist` builder.

The tests write their own small IDX files (40 train / 20 test 8×8 grey images of 4 classes, gzip or raw) into
tmp_path; the real Fashion-MNIST files are never needed. tfds is mocked (`tfds.testing.mock_data`, policy
USE_FILES on metadata written by the test), as tests/test_input_pipeline.py mocks imagenet2012.
"""

import collections
import gzip
import hashlib
import json
import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import naming, splits

import data_sources
import input_pipeline as ip
import train_lib
from configs import fashion_mnist, tiny
from configs.common import get_config
from s2mlp import checkpoint as ckpt
from s2mlp.preprocessing import mean_std
from tests.test_input_pipeline import assert_batches_equal, take

NUM_CLASSES = 4
SIZES = {"train": 40, "test": 20}  # 10 train and 5 test images of each class
STEMS = {"train": "train", "test": "t10k"}
NO_AUGMENT = {
    "augment.ops": "resize|normalize",
}
AUGMENT_ALL = {
    "augment.ops": "inception_crop(0.08)|flip|randaugment(2, 9, 0.5)|normalize|erase(0.5)",
}


# ---------------------------------------------------------------- writing IDX files
def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """The IDX encoding of `array`: two zero bytes, the element type, the number of dimensions, each dimension as a
    big-endian uint32, then the elements (big-endian) row-major."""
    dtype = data_sources.IDX_TYPES[type_code]
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=dtype).tobytes()


def write_idx(path, array: np.ndarray, type_code: int = 0x08, *, compress: bool = False) -> str:
    data = idx_bytes(array, type_code)
    path = f"{path}.gz" if compress else str(path)
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(data)
    return path


def make_split(n: int, seed: int, shape=(8, 8), num_classes: int = NUM_CLASSES):
    """n distinct random uint8 images of `shape`, labels 0..num_classes-1 in turn (n / num_classes each)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    images[:, 0, 0] = np.arange(n)  # distinct, so records can be counted as (pixels, label) pairs
    return images, (np.arange(n) % num_classes).astype(np.uint8)


def write_dataset(root, *, compress=False, shape=(8, 8), num_classes=NUM_CLASSES, sizes=SIZES, names=None):
    """IDX files of a train and a test split in `root` (MNIST's names); returns split -> (images, labels, paths)."""
    os.makedirs(root, exist_ok=True)
    out = {}
    for k, (split, n) in enumerate(sizes.items()):
        images, labels = make_split(n, k, shape, num_classes)
        stem = os.path.join(root, STEMS[split])
        paths = (
            write_idx(f"{stem}-images-idx{images.ndim}-ubyte", images, compress=compress),
            write_idx(f"{stem}-labels-idx1-ubyte", labels, compress=compress),
        )
        out[split] = (images, labels, paths)
    if names is not None:
        with open(os.path.join(root, data_sources.IDX_CLASS_NAMES_FILE), "w", encoding="utf-8") as f:
            f.write("\n".join(names) + "\n")
    return out


def make_config(data_dir, **overrides):
    config = get_config()
    config.data.name, config.data.data_dir = "idx", str(data_dir)
    config.data.train_split, config.data.eval_split = "train", "test"
    config.data.eval_crop_pct, config.data.normalization = 1.0, "minus_one_to_one"
    config.image_size, config.batch_size, config.eval_batch_size = 8, 8, 10
    for key, value in {**NO_AUGMENT, **overrides}.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, value)
    return config


@pytest.fixture(params=["gzip", "raw"])
def idx_data(tmp_path, request):
    root = tmp_path / "idx"
    return root, write_dataset(root, compress=request.param == "gzip")


def normalised(images: np.ndarray, normalization="minus_one_to_one") -> np.ndarray:
    """uint8 (N, H, W) grey -> float32 (N, H, W, 3) as the pipeline normalises them."""
    mean, std = mean_std(normalization)
    return (np.repeat(images[..., None], 3, axis=-1).astype(np.float32) - mean) / std


def pixels(batch_images: np.ndarray, normalization="minus_one_to_one") -> np.ndarray:
    """The pipeline's normalised images back to uint8 (N, H, W, 3)."""
    mean, std = mean_std(normalization)
    return np.round(batch_images * std + mean).astype(np.uint8)


def records(batches, n=None) -> collections.Counter:
    """(grey pixels, label) of the first n examples of `batches` (of a pipeline without augmentation)."""
    images = pixels(np.concatenate([b["image"] for b in batches]))[:n]
    labels = np.concatenate([b["label"] for b in batches])[:n]
    assert (images == images[..., :1]).all()  # grey: three equal channels
    return collections.Counter((im[..., 0].tobytes(), int(t)) for im, t in zip(images, labels, strict=True))


def split_records(images, labels, keep=None) -> collections.Counter:
    if keep is not None:
        images, labels = images[keep], labels[keep]
    return collections.Counter((im.tobytes(), int(t)) for im, t in zip(images, labels, strict=True))


# ---------------------------------------------------------------- the data read back exactly
@pytest.mark.parametrize("normalization", ["minus_one_to_one", "imagenet"])
def test_eval_gives_the_stored_pixels_and_labels_exactly(idx_data, normalization):
    root, written = idx_data
    config = make_config(root, **{"data.normalization": normalization})
    data = ip.build(config)
    assert (data.info.num_classes, data.info.num_train, data.info.num_eval) == (4, 40, 20)
    assert data.info.class_names == ["0", "1", "2", "3"]  # no class_names.txt: the indices
    for split in ("test", "train"):
        images, labels, _ = written[split]
        config.data.eval_split = split
        batches = list(ip.build(config).eval_iterator())
        assert len(batches) == len(labels) // 10 and all(b["mask"].all() for b in batches)
        got = np.concatenate([b["image"] for b in batches])
        assert got.shape == (len(labels), 8, 8, 3) and got.dtype == np.float32
        # The file's order, the grey channel repeated to 3, normalised: exactly, not approximately.
        np.testing.assert_array_equal(got, normalised(images, normalization))
        np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), labels.astype(np.int32))


def test_train_epoch_is_the_train_split(idx_data):
    root, written = idx_data
    images, labels, _ = written["train"]
    batches = take(ip.build(make_config(root)).train_iterator(), 5)  # 5 batches of 8 = one epoch
    assert batches[0]["image"].shape == (8, 8, 8, 3) and batches[0]["label"].dtype == np.int32
    assert records(batches) == split_records(images, labels)


def test_rgb_and_single_channel_idx_images(tmp_path):
    """IDX images of shape (N, H, W, 3) are read as RGB; (N, H, W, 1) like (N, H, W)."""
    rgb = np.random.default_rng(3).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    grey = np.random.default_rng(4).integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
    labels = (np.arange(40) % 4).astype(np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", grey)  # MNIST's name (idx3) whatever the dimensions
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", rgb)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:20])
    config = make_config(tmp_path)
    test = list(ip.build(config).eval_iterator())
    np.testing.assert_array_equal(pixels(np.concatenate([b["image"] for b in test])), rgb)
    config.data.eval_split = "train"
    train = list(ip.build(config).eval_iterator())
    np.testing.assert_array_equal(pixels(np.concatenate([b["image"] for b in train])), grey.repeat(3, axis=-1))


def test_28x28_images_at_another_image_size(tmp_path):
    written = write_dataset(tmp_path, shape=(28, 28), sizes={"train": 8, "test": 4})
    config = make_config(tmp_path, image_size=16, eval_batch_size=4, batch_size=4)
    data = ip.build(config)
    assert next(data.train_iterator())["image"].shape == (4, 16, 16, 3)
    (batch,) = list(data.eval_iterator())
    assert batch["image"].shape == (4, 16, 16, 3)
    assert batch["label"].tolist() == written["test"][1].tolist()


def test_fashion_mnist_batches_and_cadences_are_the_ones_its_rows_ran_at():
    """The S²-MLPv2 at batch 64 (its three seeds), the others at 128; evals every ~5 epochs, checkpoints every
    ~1 epoch, a step past each at both batches (60,000 images: 468 steps an epoch at 128, 937 at 64)."""
    got = {}
    for model in fashion_mnist.MODELS:
        c = fashion_mnist.get_config(model)
        got[model] = (c.batch_size, c.eval_every_steps, c.checkpoint_every_steps)
    assert got == {"s2mlp": (128, 2_345, 469), "mixer": (128, 2_345, 469), "s2mlpv2": (64, 4_690, 938)}


def test_the_shipped_fashion_mnist_recipe_shifts_and_mirrors_each_stored_image(tmp_path):
    """configs/fashion_mnist.py's train chain without its erasing: an epoch holds every stored image once, shifted
    by at most 2 pixels with zeros shifted in (`pad_crop(2)`), mirrored or not, with its own label."""
    written = write_dataset(tmp_path, shape=(28, 28), sizes={"train": 8, "test": 4})
    config = fashion_mnist.get_config()
    assert config.augment.ops == "resize|pad_crop(2)|flip|normalize|erase(0.25)"
    config.augment.ops = "resize|pad_crop(2)|flip|normalize"
    config.data.data_dir, config.batch_size, config.eval_batch_size = str(tmp_path), 8, 4
    (batch,) = take(ip.build(config).train_iterator(), 1)  # one epoch
    images, labels, _ = written["train"]
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    views = {  # (stored index, dy, dx, mirrored) -> the 28×28 image it gives
        (i, dy, dx, m): (v[:, ::-1] if m else v)
        for i in range(len(images))
        for dy in range(5)
        for dx in range(5)
        for m in (False, True)
        for v in [padded[i, dy : dy + 28, dx : dx + 28]]
    }
    found = []
    for image, label in zip(pixels(batch["image"]), batch["label"]):
        assert (image == image[..., :1]).all()  # grey, as read
        match = [key for key, view in views.items() if np.array_equal(view, image[..., 0])]
        assert match, "a train image that is no shift (|dy|, |dx| <= 2) or mirror of a stored image"
        assert labels[match[0][0]] == label
        found.append(match[0][0])
    assert sorted(found) == list(range(len(images)))


# ---------------------------------------------------------------- damaged files: one-line errors naming the file
def _rewrite(path: str, data: bytes) -> None:
    """Replaces the content of `path` by `data` (gzip-compressed when the file is a .gz)."""
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(data)


def _damage(written, damage):
    """Applies `damage` to the written dataset; returns (the file the error names, a pattern of the message)."""
    images, labels = written["train"][:2]
    images_file, labels_file = written["train"][2]
    need = "dimensions (40, 8, 8) of 1-byte elements need 2,576 bytes"
    if damage == "magic":
        _rewrite(images_file, b"PK\x03\x04" + bytes(100))
        return images_file, r"has magic number 0x504b0304; an IDX file starts with two zero bytes, an element type \("
    if damage == "empty":
        _rewrite(images_file, b"")
        return images_file, r"has magic number 0x\(empty\)"
    if damage == "header_cut":
        _rewrite(images_file, bytes([0, 0, 8, 3, 0, 0, 0, 40, 0]))
        return images_file, re.escape("is truncated: its header declares 3 dimensions but ends first.")
    if damage == "truncated":  # the IDX bytes cut (then compressed, for a .gz)
        _rewrite(images_file, idx_bytes(images)[:-10])
        return images_file, re.escape(f"is truncated: {need}, it has 2,566.")
    if damage == "gzip_cut":  # the compressed stream itself cut short
        with open(images_file, "rb") as f:
            data = f.read()
        with open(images_file, "wb") as f:
            f.write(data[: len(data) // 2])
        return images_file, r"is truncated: its gzip stream ends early \(EOFError: "
    if damage == "not_gzip":  # a .gz name on uncompressed IDX bytes
        with open(images_file, "wb") as f:
            f.write(idx_bytes(images))
        return images_file, re.escape("cannot be read: BadGzipFile: Not a gzipped file (b'\\x00\\x00')")
    if damage == "gzip_corrupt":  # compressed bytes flipped: the deflate stream is invalid
        with open(images_file, "rb") as f:
            data = bytearray(f.read())
        data[20:40] = bytes(b ^ 0xFF for b in data[20:40])
        with open(images_file, "wb") as f:
            f.write(data)
        return images_file, re.escape(
            "is corrupt: its gzip data does not decompress (zlib.error: Error -3 while decompressing"
        )
    if damage == "longer":
        _rewrite(images_file, idx_bytes(images) + bytes(7))
        return images_file, re.escape(f"is longer than its header says: {need}, it has 2,583.")
    if damage == "count":
        _rewrite(labels_file, idx_bytes(labels[:39]))
        return images_file, re.escape(
            f"IDX files {images_file} (40 images) and {labels_file} (39 labels) must hold as many images as labels."
        )
    if damage == "labels_2d":
        _rewrite(labels_file, idx_bytes(labels[:, None]))
        return labels_file, re.escape("holds uint8 of shape (40, 1); labels must be integers, shape (N,).")
    if damage == "labels_float":
        _rewrite(labels_file, idx_bytes(labels.astype(np.float32), 0x0D))
        return labels_file, re.escape("holds >f4 of shape (40,); labels must be integers, shape (N,).")
    if damage == "negative_label":
        signed = labels.astype(np.int8)
        signed[3] = -2
        _rewrite(labels_file, idx_bytes(signed, 0x09))
        return labels_file, re.escape("has a negative label (-2); labels are 0..K-1.")
    shapes = {"images_float": images.astype(np.float32), "images_2d": images.reshape(40, 64),
              "images_2_channels": images.reshape(40, 8, 4, 2)}  # fmt: skip
    array = shapes[damage]
    _rewrite(images_file, idx_bytes(array, 0x0D if array.dtype == np.float32 else 0x08))
    dtype = ">f4" if array.dtype == np.float32 else "uint8"
    return images_file, re.escape(
        f"holds {dtype} of shape {array.shape}; images must be unsigned bytes (type 0x08) of shape (N, H, W), "
        "(N, H, W, 1) or (N, H, W, 3)."
    )


DAMAGES = ["magic", "empty", "header_cut", "truncated", "longer", "count", "labels_2d", "labels_float",
           "negative_label", "images_float", "images_2d", "images_2_channels"]  # fmt: skip
GZIP_DAMAGES = ["gzip_cut", "gzip_corrupt", "not_gzip"]


@pytest.mark.parametrize(
    "kind, damage", [(k, d) for k in ("gzip", "raw") for d in DAMAGES] + [("gzip", d) for d in GZIP_DAMAGES]
)
def test_damaged_file_is_refused_naming_it(tmp_path, kind, damage):
    root = tmp_path / "idx"
    written = write_dataset(root, compress=kind == "gzip")
    path, pattern = _damage(written, damage)
    config = make_config(root)
    ip.validate_data_config(config)  # the cheap checks find the files; reading them finds the damage
    with pytest.raises(ValueError) as error:
        ip.build(config)
    message = str(error.value)
    assert "\n" not in message, message
    assert re.search(r"^IDX files? " + re.escape(path) + r"\b", message), message
    assert re.search(pattern, message), message


def test_missing_or_ambiguous_files_and_bad_fields_are_refused_before_reading(tmp_path):
    root = tmp_path / "idx"
    written = write_dataset(root)
    labels = written["test"][2][1]

    def refused(config, message):
        with pytest.raises(ValueError) as error:
            ip.validate_data_config(config)
        assert str(error.value) == message
        with pytest.raises(ValueError, match=re.escape(message)):
            ip.build(config)

    os.remove(labels)
    refused(
        make_config(root),
        f"config.data.data_dir={str(root)!r} has no IDX file t10k-labels-idx1-ubyte[.gz] for split 'test'; 'idx' "
        "datasets are a folder with train-{images-idx3,labels-idx1}-ubyte[.gz] and t10k-{...} (MNIST's file names).",
    )
    write_idx(root / "test-labels-idx1-ubyte", written["test"][1])  # 'test' stands for 't10k' too
    assert ip.build(make_config(root)).info.num_eval == 20
    write_idx(root / "t10k-labels.idx1-ubyte", written["test"][1], compress=True)  # '.' before idx, gzip: a second
    refused(
        make_config(root),
        f"config.data.data_dir={str(root)!r} has 2 files that could be t10k-labels-idx1-ubyte[.gz]: "
        "['t10k-labels.idx1-ubyte.gz', 'test-labels-idx1-ubyte']; keep one set of IDX files per folder.",
    )
    missing = str(tmp_path / "nowhere")
    for data_dir in (missing, None, str(labels)):  # not a folder, unset, a file
        refused(
            make_config(root, **{"data.data_dir": data_dir}),
            f"config.data.data_dir={data_dir!r}: must be a folder holding IDX files (e.g. "
            "/usr/share/datasets/fashion-mnist from Debian's dataset-fashion-mnist package).",
        )
    assert not os.path.exists(missing)
    for field in ("train_split", "eval_split"):
        refused(
            make_config(root, **{f"data.{field}": "validation"}),
            f"config.data.{field}='validation': 'idx' datasets have splits 'train', 'test'.",
        )


def test_emnist_style_prefixed_names(tmp_path):
    written = write_dataset(tmp_path, compress=True)
    for _, _, paths in written.values():
        for path in paths:
            os.rename(path, os.path.join(tmp_path, "emnist-letters-" + os.path.basename(path).replace("t10k", "test")))
    data = ip.build(make_config(tmp_path))
    assert (data.info.num_train, data.info.num_eval) == (40, 20)


# ---------------------------------------------------------------- class names
def test_class_names_file_is_used_and_too_few_names_are_refused(tmp_path):
    names = ["shoe", "bag", "coat", "long sleeve shirt"]
    write_dataset(tmp_path, names=names)
    with open(tmp_path / data_sources.IDX_CLASS_NAMES_FILE, "a", encoding="utf-8") as f:
        f.write("\n\n")  # blank lines are ignored
    config = make_config(tmp_path)
    assert ip.build(config).info.class_names == names
    config.data.train_per_class = 11  # the subset's message names the class by its name
    with pytest.raises(ValueError, match=r"config.data.train_per_class=11: class 'shoe' has only 10 examples"):
        ip.build(config)
    names_file = tmp_path / data_sources.IDX_CLASS_NAMES_FILE
    names_file.write_text("shoe\nbag\ncoat\n", encoding="utf-8")
    with pytest.raises(ValueError) as error:
        ip.build(make_config(tmp_path))
    assert str(error.value) == (
        f"{names_file} names 3 classes but the labels go up to 3; give one name per line for each of the 4 classes."
    )


def test_class_names_of_fashion_mnist_are_recognised_by_the_label_digest(tmp_path):
    fashion, other = data_sources.FASHION_MNIST_LABELS_SHA256[1], "0" * 64
    assert data_sources.idx_class_names(str(tmp_path), 10, [other, fashion]) == data_sources.FASHION_MNIST_CLASSES
    assert data_sources.idx_class_names(str(tmp_path), 10, [other]) == [str(i) for i in range(10)]
    assert data_sources.idx_class_names(str(tmp_path), 4, [fashion]) == ["0", "1", "2", "3"]  # ten classes only
    (tmp_path / data_sources.IDX_CLASS_NAMES_FILE).write_text("\n".join("abcdefghij"), encoding="utf-8")
    assert data_sources.idx_class_names(str(tmp_path), 10, [fashion]) == list("abcdefghij")  # the file wins


def test_label_digest_reaches_the_class_names(tmp_path, monkeypatch):
    """The digest idx_split computes (SHA-256 of the label bytes, header excluded, gzip or not) is the one
    compared with FASHION_MNIST_LABELS_SHA256: a dataset whose test labels have a listed digest gets the names."""
    written = write_dataset(tmp_path, num_classes=10, compress=True)
    digest = hashlib.sha256(written["test"][1].tobytes()).hexdigest()
    assert data_sources.idx_split(str(tmp_path), "test")[2] == digest
    assert ip.build(make_config(tmp_path)).info.class_names == [str(i) for i in range(10)]
    monkeypatch.setattr(data_sources, "FASHION_MNIST_LABELS_SHA256", ("f" * 64, digest))
    assert ip.build(make_config(tmp_path)).info.class_names == data_sources.FASHION_MNIST_CLASSES


def test_the_constants_are_digests_of_zalandos_label_files():
    digests = data_sources.FASHION_MNIST_LABELS_SHA256
    assert len(digests) == 2 and all(re.fullmatch(r"[0-9a-f]{64}", d) for d in digests)
    assert len(data_sources.FASHION_MNIST_CLASSES) == 10
    real = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist, where installed: checked too
    if os.path.isdir(real):
        assert [data_sources.idx_split(real, s)[2] for s in ("train", "test")] == list(digests)


# ---------------------------------------------------------------- subsets, process shares, resume
def test_train_fraction_and_per_class_subsets(tmp_path):
    written = write_dataset(tmp_path)
    images, labels, _ = written["train"]
    config = make_config(tmp_path, **{"data.train_fraction": 0.5})
    data = ip.build(config)
    keep = data.source.train_keep
    assert (data.info.num_train, data.info.num_eval) == (20, 20)
    assert collections.Counter(labels[keep].tolist()) == {c: 5 for c in range(4)}  # stratified
    assert records(take(data.train_iterator(), 3), 20) == split_records(images, labels, keep)  # one epoch: the subset
    config.seed = 3  # the training seed shuffles differently but keeps the data
    np.testing.assert_array_equal(ip.build(config).source.train_keep, keep)
    config.data.subset_seed = 7
    other = ip.build(config).source.train_keep
    assert collections.Counter(labels[other].tolist()) == {c: 5 for c in range(4)} and set(other) != set(keep)
    config.data.train_fraction, config.data.subset_seed = 0.2, 0  # nested: 20% is part of 50%
    assert set(ip.build(config).source.train_keep) < set(keep)
    config.data.train_fraction, config.data.train_per_class = 1.0, 3
    data = ip.build(config)
    assert data.info.num_train == 12
    assert collections.Counter(labels[data.source.train_keep].tolist()) == {c: 3 for c in range(4)}


def test_a_label_without_examples_gets_the_fix_that_works_and_is_kept_with_a_warning(tmp_path, caplog):
    """EMNIST letters label 1..26, so class '0' has no examples: train_per_class was refused for any count with the
    advice to lower it; data.classes kept it silently, a head output no example trains."""
    written = write_dataset(tmp_path)
    for _, labels, paths in written.values():  # labels 1..4: class '0' empty in both splits
        write_idx(paths[1], labels + 1)
    with pytest.raises(ValueError) as e:
        ip.build(make_config(tmp_path, **{"data.train_per_class": 3}))
    assert str(e.value) == (
        "config.data.train_per_class=3: class '0' has only 0 examples in config.data.train_split='train'; no count "
        "can take from it: leave it out with config.data.classes, or use config.data.train_fraction (a class "
        "without examples takes none)."
    )
    with pytest.raises(ValueError) as e:
        ip.build(make_config(tmp_path, **{"data.train_per_class": 11}))
    assert str(e.value).endswith(
        "class '1' has only 10 examples in config.data.train_split='train' (4 more classes have too few); lower "
        "train_per_class, or use config.data.train_fraction for a stratified fraction. Class '0' has none: no count "
        "can take from it; leave it out with config.data.classes, or use config.data.train_fraction (a class without "
        "examples takes none)."
    )
    data = ip.build(make_config(tmp_path, **{"data.train_per_class": 3, "data.classes": ("1", "2", "3", "4")}))
    assert data.info.num_classes == 4 and data.info.num_train == 12
    with caplog.at_level("WARNING"):
        assert ip.build(make_config(tmp_path, **{"data.classes": ("1", "2")})).info.num_train == 20
        assert not caplog.records
        assert ip.build(make_config(tmp_path, **{"data.classes": ("0", "1", "2")})).info.num_train == 20
    assert [r.getMessage() for r in caplog.records] == [
        "config.data.classes=('0', '1', '2'): 1 kept class(es) have no examples in config.data.train_split='train' "
        "('0'): no example trains their outputs; leave them out unless that is meant."
    ]


@pytest.mark.parametrize("subset", [{}, {"data.train_fraction": 0.5}])
def test_two_processes_get_disjoint_shares_that_make_the_whole(tmp_path, subset):
    written = write_dataset(tmp_path)
    images, labels, _ = written["train"]
    config = make_config(tmp_path, **subset)
    whole = ip.build(config)
    expected = split_records(images, labels, whole.source.train_keep)
    datas = [ip.build(config, process_index=p, process_count=2) for p in (0, 1)]
    n = len(expected) // 2
    assert [d.train_records for d in datas] == [n, n]
    epochs = [records(take(d.train_iterator(), -(-n // 4)), n) for d in datas]  # local batch 4: the first epoch
    assert not set(epochs[0]) & set(epochs[1]) and epochs[0] + epochs[1] == expected
    # Eval: each process its contiguous share (10 each, in local batches of 5), every test example once.
    evals = [list(d.eval_iterator()) for d in datas]
    assert [len(e) for e in evals] == [2, 2] and all(b["mask"].all() for e in evals for b in e)
    got = [records(e) for e in evals]
    assert not set(got[0]) & set(got[1])
    assert got[0] + got[1] == split_records(*written["test"][:2])


@pytest.mark.parametrize("subset", [{}, {"data.train_fraction": 0.5}])
def test_resume_is_bit_exact(tmp_path, subset):
    write_dataset(tmp_path, compress=True)
    config = make_config(tmp_path, **AUGMENT_ALL, **subset)
    data = ip.build(config)
    k = 4  # batches 4..7 cross an epoch's end (40 or 20 examples in batches of 8)
    reference = take(data.train_iterator(), k + 4)
    assert_batches_equal(take(data.train_iterator(start_step=k), 4), reference[k:])
    assert_batches_equal(take(ip.build(config).train_iterator(start_step=k), 4), reference[k:])  # a fresh build
    two = ip.build(config, process_index=1, process_count=2)
    assert_batches_equal(take(two.train_iterator(start_step=3), 2), take(two.train_iterator(), 5)[3:])


# ---------------------------------------------------------------- Fashion-MNIST through tfds (mocked)
MOCK_FASHION = 12  # examples in each split of the mocked fashion_mnist


@pytest.fixture(scope="module")
def fashion_mnist_metadata(tmp_path_factory):
    """A tfds data_dir whose fashion_mnist metadata says MOCK_FASHION per split, so the builder reads as prepared;
    `tfds.testing.mock_data(policy=USE_FILES, data_dir=...)` then serves random examples. No download."""
    root = str(tmp_path_factory.mktemp("tfds_fashion"))
    builder = tfds.builder("fashion_mnist", data_dir=root)
    os.makedirs(builder.data_dir)
    template = naming.ShardedFileTemplate(
        data_dir=builder.data_dir, dataset_name=builder.name, filetype_suffix="tfrecord", split="train"
    )
    split_infos = [
        splits.SplitInfo(name=s, shard_lengths=[MOCK_FASHION], num_bytes=0, filename_template=template.replace(split=s))
        for s in ("train", "test")
    ]
    builder.info.set_splits(splits.SplitDict(split_infos))
    builder.info.write_to_directory(builder.data_dir)
    return root


def test_fashion_mnist_through_tfds(fashion_mnist_metadata):
    config = make_config(
        fashion_mnist_metadata,
        **{"data.name": "fashion_mnist", "image_size": 28, "batch_size": 4, "eval_batch_size": 4},
    )
    with tfds.testing.mock_data(
        num_examples=MOCK_FASHION, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=fashion_mnist_metadata
    ):
        builder = tfds.builder("fashion_mnist", data_dir=fashion_mnist_metadata)
        assert builder.info.features["image"].shape == (28, 28, 1)  # grey PNGs
        data = ip.build(config)
        assert (data.info.num_classes, data.info.num_train, data.info.num_eval) == (10, MOCK_FASHION, MOCK_FASHION)
        assert data.info.class_names == data_sources.FASHION_MNIST_CLASSES  # tfds' names are Zalando's too
        train = next(data.train_iterator())
        evals = list(data.eval_iterator())
    assert train["image"].shape == (4, 28, 28, 3) and train["image"].dtype == np.float32
    assert len(evals) == 3 and all(b["image"].shape == (4, 28, 28, 3) for b in evals)
    for image in (train["image"], evals[0]["image"]):  # grey decoded to three equal channels
        np.testing.assert_array_equal(image, np.repeat(image[..., :1], 3, axis=-1))
    assert all(0 <= b["label"].min() and b["label"].max() < 10 for b in (train, *evals))


# ---------------------------------------------------------------- end to end
def test_tiny_training_run_on_an_idx_dataset(tmp_path):
    names = ["sandal", "bag", "coat", "shirt"]
    write_dataset(tmp_path / "data", compress=True, names=names)
    config = tiny.get_config("s2mlp_tiny")  # batch 16, eval batch 64, 6 steps, eval and checkpoint every 3
    config.data.name, config.data.data_dir = "idx", str(tmp_path / "data")
    config.data.eval_split, config.image_size = "test", 8
    workdir = tmp_path / "run"
    metrics = train_lib.train_and_evaluate(config, str(workdir))
    assert metrics["eval_num_examples"] == 20 and 0 <= metrics["eval_top1"] <= 1
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows if "loss" in r) == [2, 3, 4, 6]  # logged every 2, checkpoints
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert [(r["step"], r["eval_num_examples"]) for r in rows if "eval_top1" in r] == [(3, 20), (6, 20)]
    directory, step = ckpt.locate(workdir)
    assert step == 6 and ckpt.saved_shapes(directory / "6")["head/kernel"] == (32, 4)
    assert ckpt.read_json(directory / "6", "dataset") == {"num_classes": 4, "class_names": names}
    assert ckpt.read_json(directory / "6", "config")["data"]["name"] == "idx"
