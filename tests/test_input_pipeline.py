"""Tests of the input pipeline (input_pipeline.py, data_sources.py, image_ops.py): sources, building once,
determinism/resumption, eval sharding, errors, RandAugment ops.

Nothing here downloads: tfds is mocked (`tfds.testing.mock_data`, policy USE_FILES on metadata written
by the test), 'digits' is scikit-learn's bundled data and 'directory' images are written to tmp_path.
"""

import collections
import logging
import math
import os
import re
import struct

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.datasets import load_digits

import data_sources
import image_ops
import input_pipeline as ip
from configs.common import get_config
from s2mlp.augment_chain import RandAugmentSpec
from s2mlp.preprocessing import mean_std
from tests.conftest import MOCK_EXAMPLES


def make_config(name="digits", **overrides):
    config = get_config()
    config.data.name = name
    config.data.eval_split = "test" if name == "digits" else "validation"
    config.image_size, config.batch_size, config.eval_batch_size = 16, 32, 32
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, value)
    return config


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# ---------------------------------------------------------------- mocked tfds imagenet2012
@pytest.fixture
def mock_imagenet(imagenet_metadata):
    with tfds.testing.mock_data(
        num_examples=MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=imagenet_metadata
    ):
        yield make_config(
            "imagenet2012",
            **{"data.data_dir": imagenet_metadata, "batch_size": 8, "eval_batch_size": 8, "image_size": 32},
        )


def test_tfds_mock_info_and_eval(mock_imagenet):
    config = mock_imagenet
    info = ip.dataset_info(config)
    assert (info.num_classes, info.num_train, info.num_eval, len(info.class_names)) == (1000, 20, 20, 1000)
    evals = list(ip.create_eval_iterator(config))
    assert len(evals) == 3  # 20 examples in batches of 8, the last padded
    assert evals[-1]["mask"].tolist() == [1.0] * 4 + [0.0] * 4
    assert all(e["image"].shape == (8, 32, 32, 3) and e["label"].dtype == np.int32 for e in evals)
    assert all(e["image"].dtype == np.float32 and e["mask"].dtype == np.float32 for e in evals)


def test_tfds_mock_train_shapes_and_resumption_across_epochs(mock_imagenet):
    config = mock_imagenet  # 20 examples, batch 8: batches 3..6 hold examples 24..55, epochs 1 and 2
    reference = take(ip.create_train_iterator(config), 7)
    batch = reference[0]
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    assert np.all((batch["label"] >= 0) & (batch["label"] < 1000)) and np.isfinite(batch["image"]).all()
    labels = np.concatenate([b["label"] for b in reference])
    assert collections.Counter(labels[:20].tolist()) == collections.Counter(labels[20:40].tolist())  # full epochs
    assert not np.array_equal(labels[:20], labels[20:40])  # reshuffled each epoch
    assert_batches_equal(take(ip.create_train_iterator(config, start_step=3), 4), reference[3:])


# ---------------------------------------------------------------- digits: determinism
AUGMENT_ALL = {
    "augment.ops": "inception_crop(0.08)|flip|randaugment(2, 9, 0.5)|normalize|erase(0.5)",
}


def test_digits_info_batches_and_resumption_across_epoch_boundary():
    config = make_config(**AUGMENT_ALL)
    info = ip.dataset_info(config)
    assert (info.num_classes, info.num_train, info.num_eval) == (10, 1497, 300)
    assert info.class_names == [str(i) for i in range(10)]
    config.data.train_split, config.batch_size = "test", 32  # train on the 300 held-out digits: short epochs
    k = 8  # batches 8..11 hold examples 256..383: epoch 0 ends at 300
    reference = take(ip.create_train_iterator(config), k + 4)
    assert reference[0]["image"].shape == (32, 16, 16, 3) and reference[0]["image"].dtype == np.float32
    assert reference[0]["label"].dtype == np.int32
    first_epoch = np.concatenate([b["label"] for b in reference])[:300]  # a permutation of the split
    assert collections.Counter(first_epoch.tolist()) == collections.Counter(data_sources._digits()["test"][1].tolist())
    resumed = take(ip.create_train_iterator(config, start_step=k), 4)
    assert_batches_equal(resumed, reference[k:])


def test_seed_changes_order_and_is_repeatable():
    config = make_config(**{"augment.ops": "inception_crop(0.08)|flip|normalize"})
    a = next(ip.create_train_iterator(config))
    tf.random.set_seed(7)  # TF's global seed must not matter: every random op is stateless
    try:
        b = next(ip.create_train_iterator(config))
    finally:
        tf.random.set_seed(None)
    assert_batches_equal([a], [b])
    config.seed = 1
    c = next(ip.create_train_iterator(config))
    assert not np.array_equal(a["label"], c["label"])
    first, second = (next(ip.create_train_iterator(config, process_index=i, process_count=2)) for i in (0, 1))
    assert not np.array_equal(first["label"], second["label"])


# ---------------------------------------------------------------- eval sharding
def eval_examples(config, process_count):
    """Runs every process's eval iterator; returns per-process batch counts and the masked-in examples."""
    mean, std = mean_std(config.data.normalization)
    counts, examples = [], collections.Counter()
    for index in range(process_count):
        batches = list(ip.create_eval_iterator(config, process_index=index, process_count=process_count))
        counts.append(len(batches))
        for b in batches:
            assert b["image"].shape == (config.eval_batch_size // process_count, 8, 8, 3)
            assert set(np.unique(b["mask"])) <= {0.0, 1.0}
            pixels = np.round(np.round(b["image"] * std + mean)[..., 0] * 16 / 255).astype(np.uint8)
            for image, label, mask in zip(pixels, b["label"], b["mask"], strict=True):
                if mask:
                    examples[(image.tobytes(), int(label))] += 1
    return counts, examples


def test_eval_centre_crop_starts_where_torchvisions_does():
    """torchvision's CenterCrop (timm's and DeiT's eval) starts at int(round(d / 2)), halves to even: a 500×375
    image resized to 341×256 is cropped from column 58, not 59; inference's NumPy twin agrees."""
    from s2mlp import preprocessing

    expected = [0, 0, 1, 2, 2, 2, 3, 4, 4, 4, 5, 6]
    assert [int(image_ops.centre_offset(tf.constant(d))) for d in range(12)] == expected
    ramp = np.broadcast_to(np.arange(341, dtype=np.uint8)[None, :, None], (256, 341, 3))
    ours = preprocessing.preprocess(ramp, image_size=224, crop_pct=0.875, normalization="minus_one_to_one")
    assert round(float(ours[0, 0, 0, 0] + 1) * 127.5) == 58  # the short side is already 224 / 0.875: no resize


def test_eval_two_processes_cover_each_example_once():
    digits = load_digits()
    everything = collections.Counter(
        (im.astype(np.uint8).tobytes(), int(t)) for im, t in zip(digits.images, digits.target, strict=True)
    )
    # 1,497 train examples -> shares of 749 and 748; local batch 11 -> 69 and 68 batches before padding.
    config = make_config(**{"image_size": 8, "eval_batch_size": 22, "data.eval_split": "train"})
    counts, train = eval_examples(config, 2)
    assert counts == [69, 69]
    assert sum(train.values()) == 1497
    config = make_config(**{"image_size": 8, "eval_batch_size": 64, "seed": 123})
    counts, test = eval_examples(config, 2)
    assert counts[0] == counts[1] == 5 and sum(test.values()) == 300
    assert train + test == everything  # disjoint and complete: each example exactly once
    # fixed, independent of seed
    held_out = np.random.RandomState(data_sources.DIGITS_SPLIT_SEED).permutation(1797)[-300:]
    assert test == collections.Counter(
        (digits.images[i].astype(np.uint8).tobytes(), int(digits.target[i])) for i in held_out
    )


# ---------------------------------------------------------------- directory datasets
@pytest.fixture
def image_dir(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for c, cls in enumerate(("cat", "dog")):
            os.makedirs(tmp_path / split / cls)
            for i in range(n):
                pixels = np.clip(rng.normal(60 + 120 * c, 30, (24 + i, 30, 3)), 0, 255).astype(np.uint8)
                fmt = "png" if i == 0 else "jpg"
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.{fmt}")
    (tmp_path / "train" / "cat" / "garbage.jpg").write_bytes(b"this is not an image")
    good = (tmp_path / "train" / "dog" / "1.jpg").read_bytes()
    (tmp_path / "train" / "dog" / "truncated.jpeg").write_bytes(good[: len(good) // 2])
    (tmp_path / "train" / "dog" / "notes.txt").write_text("ignored: not an image extension")
    bad = sorted(str(tmp_path / "train" / p) for p in ("cat/garbage.jpg", "dog/truncated.jpeg"))
    return make_config(
        "directory",
        **{
            "data.data_dir": str(tmp_path),
            "data.eval_split": "val",
            "batch_size": 4,
            "eval_batch_size": 4,
            "augment.ops": "inception_crop(0.08)|flip|normalize|erase(0.5)",
        },
    ), bad


def test_directory_bad_images_fail_lists_paths(image_dir):
    config, bad = image_dir
    with pytest.raises(ValueError, match="unreadable") as error:
        ip.dataset_info(config)
    for path in bad:
        assert path in str(error.value)


def test_directory_bad_images_skip(image_dir, caplog):
    config, bad = image_dir
    config.data.bad_images = "skip"
    with caplog.at_level(logging.WARNING):
        info = ip.dataset_info(config)
    assert (info.num_classes, info.num_train, info.num_eval, info.class_names) == (2, 6, 4, ["cat", "dog"])
    assert all(path in caplog.text for path in bad)
    labels = np.concatenate([b["label"] for b in take(ip.create_train_iterator(config), 3)])
    assert sorted(labels[:6].tolist()) == [0, 0, 0, 1, 1, 1]  # one epoch = the 6 readable images
    evals = list(ip.create_eval_iterator(config))
    assert [b["mask"].sum() for b in evals] == [4.0] and sorted(evals[0]["label"].tolist()) == [0, 0, 1, 1]
    assert evals[0]["image"].shape == (4, 16, 16, 3)


def test_directory_missing_split_folder(image_dir):
    config, _ = image_dir
    config.data.eval_split = "validation"
    with pytest.raises(ValueError, match=re.escape(os.path.join(config.data.data_dir, "validation"))):
        ip.validate_data_config(config)


# ---------------------------------------------------------------- configuration errors
def test_missing_imagenet_names_manual_tars(tmp_path):
    config = make_config("imagenet2012", **{"data.data_dir": str(tmp_path)})
    with pytest.raises(ValueError) as error:
        ip.validate_data_config(config)
    message = str(error.value)
    manual = os.path.join(str(tmp_path), "downloads", "manual")
    assert os.path.join(manual, "ILSVRC2012_img_train.tar") in message
    assert os.path.join(manual, "ILSVRC2012_img_val.tar") in message
    assert "tfds build imagenet2012" in message
    assert not os.path.exists(manual)  # nothing downloaded or created


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="config.data.name='no_such_dataset_xyz'"):
        ip.validate_data_config(make_config("no_such_dataset_xyz"))
    with pytest.raises(ValueError, match="config.batch_size"):
        ip.create_train_iterator(make_config(batch_size=30), process_count=4)
    with pytest.raises(ValueError, match="config.eval_batch_size"):
        ip.create_eval_iterator(make_config(eval_batch_size=30), process_count=4)
    with pytest.raises(ValueError, match=r"config.augment.ops=.*op 3 'randaugment\(2, 99\)': magnitude=99"):
        ip.validate_data_config(make_config(**{"augment.ops": "inception_crop|flip|randaugment(2, 99)|normalize"}))
    with pytest.raises(ValueError, match="config.data.eval_split"):
        ip.validate_data_config(make_config(**{"data.eval_split": "validation"}))


# ---------------------------------------------------------------- RandAugment and random erasing
IMAGE = tf.constant(np.random.default_rng(1).integers(20, 250, (16, 16, 3)), tf.uint8)
SEED = tf.constant([3, 4], tf.int64)


@pytest.mark.parametrize("name", image_ops.RANDAUGMENT_OPS)
def test_randaugment_op_changes_image_keeping_shape_and_dtype(name):
    out = image_ops.randaugment_op(IMAGE, name, 9.0, SEED)
    assert out.shape == IMAGE.shape and out.dtype == tf.uint8
    assert not np.array_equal(out.numpy(), IMAGE.numpy())


@pytest.mark.parametrize(
    "name, magnitude",
    [
        ("Rotate", 0.0),
        ("ShearX", 0.0),
        ("ShearY", 0.0),
        ("TranslateXRel", 0.0),
        ("TranslateYRel", 0.0),
        ("SolarizeAdd", 0.0),  # timm's maps are the identity at magnitude 0 for these ...
        ("Color", 5.0),
        ("Contrast", 5.0),
        ("Brightness", 5.0),
        ("Sharpness", 5.0),  # ... factor 1.8 m/10 + 0.1 = 1
    ],
)
def test_randaugment_op_identity(name, magnitude):
    np.testing.assert_array_equal(image_ops.randaugment_op(IMAGE, name, magnitude, SEED).numpy(), IMAGE.numpy())


def test_randaugment_op_values():
    image = IMAGE.numpy().astype(int)
    posterized = image_ops.randaugment_op(IMAGE, "Posterize", 5.0, SEED).numpy()  # 2 bits kept
    np.testing.assert_array_equal(posterized, image & 0b11000000)
    solarized = image_ops.randaugment_op(IMAGE, "Solarize", 5.0, SEED).numpy()  # threshold 128
    np.testing.assert_array_equal(solarized, np.where(image < 128, image, 255 - image))
    np.testing.assert_array_equal(image_ops.randaugment_op(IMAGE, "Invert", 3.0, SEED).numpy(), 255 - image)
    stretched = image_ops.randaugment_op(IMAGE, "AutoContrast", 0.0, SEED).numpy()
    assert stretched.min(axis=(0, 1)).tolist() == [0] * 3 and stretched.max(axis=(0, 1)).tolist() == [255] * 3
    assert image_ops.randaugment_op(IMAGE, "Equalize", 0.0, SEED).numpy().max() == 255
    fill = (10.0, 20.0, 30.0)
    shifted = image_ops.randaugment_op(IMAGE, "TranslateXRel", 10.0, SEED, fill=fill).numpy()  # 45% of 16 = 7.2 px
    assert {tuple(shifted[0, c]) for c in (0, 15)} & {fill}  # one border column is filled with the fill colour


def test_randaugment_and_erase_are_stateless():
    spec = RandAugmentSpec(2, 9.0, 0.5)
    a = image_ops.randaugment(IMAGE, spec, SEED, (128.0,) * 3)
    assert a.shape == IMAGE.shape and a.dtype == tf.uint8
    np.testing.assert_array_equal(a.numpy(), image_ops.randaugment(IMAGE, spec, SEED, (128.0,) * 3).numpy())
    x = tf.zeros([16, 16, 3])
    np.testing.assert_array_equal(image_ops.random_erase(x, 0.0, SEED).numpy(), x.numpy())
    erased = [image_ops.random_erase(x, 1.0, tf.constant([s, 0], tf.int64)).numpy() for s in range(20)]
    areas = [np.any(e != 0, axis=-1).mean() for e in erased]
    assert all(0.0 < a <= 0.5 for a in areas)  # 2%..1/3 of the image after rounding of the sides
    np.testing.assert_array_equal(erased[0], image_ops.random_erase(x, 1.0, tf.constant([0, 0], tf.int64)).numpy())


# ---------------------------------------------------------------- training on part of the train split
def digits_records(ds):
    """Identifies records of a 'raw' (digits) shard by (pixels, label)."""
    return [(image.tobytes(), int(label)) for image, label in ds.as_numpy_iterator()]


def one_epoch(config, n, process_index=0, process_count=1):
    """(8x8 grey pixels, label) of the first n train examples (image_size 8, no augmentation: identity resize)."""
    mean, std = mean_std(config.data.normalization)
    batches = take(ip.create_train_iterator(config, process_index=process_index, process_count=process_count), n)
    images = np.round(np.round(np.concatenate([b["image"] for b in batches]) * std + mean)[..., 0] * 16 / 255)
    labels = np.concatenate([b["label"] for b in batches])
    return collections.Counter((im.astype(np.uint8).tobytes(), int(t)) for im, t in zip(images, labels, strict=True))


NO_AUGMENT = {
    "augment.ops": "resize|normalize",
    "image_size": 8,
}
# Digits train split: class sizes 151, 157, 141, 155, 143, 157, 151, 148, 149, 145 (classes 0..9); a stratified
# 10 % keeps floor(0.1 n + 0.5) of each.
DIGITS_TENTH = {0: 15, 1: 16, 2: 14, 3: 16, 4: 14, 5: 16, 6: 15, 7: 15, 8: 15, 9: 15}


def test_train_fraction_is_stratified_seeded_and_disjoint_from_eval():
    config = make_config(**{**NO_AUGMENT, "data.train_fraction": 0.1, "batch_size": 151})
    assert ip.dataset_info(config).num_train == 151 and ip.dataset_info(config).num_eval == 300
    keep = data_sources.source(config).train_keep
    np.testing.assert_array_equal(keep, data_sources.source(config).train_keep)  # same subset on every call
    images, labels = data_sources._digits()["train"]
    assert collections.Counter(labels[keep].tolist()) == DIGITS_TENTH
    subset = collections.Counter(
        (np.round(im[..., 0] / 255 * 16).astype(np.uint8).tobytes(), int(t))
        for im, t in zip(images[keep], labels[keep], strict=True)
    )
    assert one_epoch(config, 1) == subset  # one epoch of the iterator is exactly the subset
    _, test = eval_examples(config, 1)
    assert sum(test.values()) == 300 and not set(subset) & set(test)  # disjoint from the eval split
    config.seed = 5  # config.seed shuffles differently but keeps the data
    np.testing.assert_array_equal(data_sources.source(config).train_keep, keep)
    config.data.subset_seed = 1
    other = data_sources.source(config).train_keep
    assert collections.Counter(labels[other].tolist()) == DIGITS_TENTH and len(set(other) & set(keep)) < 100
    config.data.train_fraction, config.data.subset_seed = 0.3, 0  # nested: 10 % is part of 30 %
    assert set(keep) < set(data_sources.source(config).train_keep)


def test_train_per_class_counts_and_two_process_shards():
    config = make_config(**{**NO_AUGMENT, "data.train_per_class": 7, "batch_size": 10})
    source = data_sources.source(config)
    assert source.info.num_train == 70
    labels = data_sources._digits()["train"][1]
    assert collections.Counter(labels[source.train_keep].tolist()) == {c: 7 for c in range(10)}
    whole = digits_records(source.train_shard(0, 1))
    shards = [digits_records(source.train_shard(p, 2)) for p in (0, 1)]
    assert [len(s) for s in shards] == [35, 35] and shards[0] + shards[1] == whole  # contiguous, cover the subset
    epochs = [one_epoch(config, 7, p, 2) for p in (0, 1)]  # 7 batches of 5 per process = one epoch each
    assert sum(epochs, collections.Counter()) == one_epoch(config, 7)
    config.data.train_per_class = 142  # class 2 has 141 examples
    with pytest.raises(ValueError, match=r"config.data.train_per_class=142: class '2' has only 141 examples"):
        ip.dataset_info(config)


def test_train_fraction_resumption_is_bit_exact():
    config = make_config(**{**AUGMENT_ALL, "data.train_fraction": 0.2, "batch_size": 32})
    assert ip.dataset_info(config).num_train == 299
    k = 8  # batches 8..11 (examples 256..383) cross the end of epoch 0
    reference = take(ip.create_train_iterator(config), k + 4)
    assert_batches_equal(take(ip.create_train_iterator(config, start_step=k), 4), reference[k:])


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"data.train_fraction": 0.0}, "config.data.train_fraction=0.0"),
        ({"data.train_fraction": 1.5}, "config.data.train_fraction=1.5"),
        ({"data.train_per_class": -1}, "config.data.train_per_class=-1"),
        ({"data.train_per_class": 5, "data.train_fraction": 0.5}, "config.data.train_per_class=5"),
        ({"data.subset_seed": -3}, "config.data.subset_seed=-3"),
        ({"data.num_threads": -1}, "config.data.num_threads=-1"),
    ],
)
def test_subset_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        ip.validate_data_config(make_config(**overrides))


class S2mlpTestTiny(tfds.core.GeneratorBasedBuilder):
    """A real (not mocked) tfds dataset built offline by the tests: 8x8 PNGs whose pixels all equal the example's
    id; train ids 0..49 with label (0, 0, 1, 1, 2)[id % 5] (classes of 20, 20, 10), validation ids 100..105."""

    VERSION = tfds.core.Version("1.0.0")
    url_infos = None  # nothing to download (and no checksums file to look up)

    def _info(self):
        features = {
            "image": tfds.features.Image(shape=(8, 8, 3)),
            "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
        }
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict(features), supervised_keys=("image", "label")
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(range(50)), "validation": self._generate_examples(range(100, 106))}

    def _generate_examples(self, ids):
        for i in ids:
            yield i, {"image": np.full((8, 8, 3), i, np.uint8), "label": (0, 0, 1, 1, 2)[i % 5]}


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny_tfds"))
    builder = tfds.builder("s2mlp_test_tiny", data_dir=root)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder, root


def tfds_ids(ds):
    return [int(tf.io.decode_image(image)[0, 0, 0]) for image, _ in ds]


@pytest.mark.parametrize("split, subset", [("train", 4), ("train[5:45]", 0.5)])
def test_tfds_train_subset_and_process_shards(tiny_tfds, split, subset):
    builder, root = tiny_tfds
    field = "data.train_per_class" if isinstance(subset, int) else "data.train_fraction"
    config = make_config(
        "s2mlp_test_tiny",
        **{**NO_AUGMENT, "data.data_dir": root, "data.train_split": split, field: subset, "batch_size": 4},
    )
    source = data_sources.source(config)
    in_order = tfds_ids(data_sources._tfds_read(builder, split, 0, in_order=True))  # the split's record order
    sizes = collections.Counter((0, 0, 1, 1, 2)[i % 5] for i in in_order)
    counts = {c: subset if field == "data.train_per_class" else int(n * subset + 0.5) for c, n in sizes.items()}
    assert (source.info.num_train, source.info.num_eval) == (sum(counts.values()), 6)
    expected = [in_order[i] for i in source.train_keep]
    assert collections.Counter((0, 0, 1, 1, 2)[i % 5] for i in expected) == counts
    for count in (1, 2, 3):
        shards = [tfds_ids(source.train_shard(p, count)) for p in range(count)]
        assert sum(shards, []) == expected  # contiguous shares that together are exactly the subset
        assert [data_sources.count_records(source.train_shard(p, count)) for p in range(count)] == [
            len(s) for s in shards
        ]
    reference = take(ip.create_train_iterator(config), 6)  # batches 3..5 cross the end of epoch 0
    assert_batches_equal(take(ip.create_train_iterator(config, start_step=3), 3), reference[3:])
    config.data.subset_seed = 1
    assert data_sources.source(config).train_keep.tolist() != source.train_keep.tolist()


def test_a_tfds_split_smaller_than_the_process_count_gives_empty_shares(tiny_tfds):
    """6 validation records on 8 processes: tfds refuses to read an empty share ("Instruction [] corresponds to no
    data!"), which ended the run on those processes."""
    builder, root = tiny_tfds
    source = data_sources.source(make_config("s2mlp_test_tiny", **{**NO_AUGMENT, "data.data_dir": root}))
    shards = [tfds_ids(source.eval_shard(p, 8)) for p in range(8)]
    assert sorted(sum(shards, [])) == list(range(100, 106)) and shards[-1] == []


def test_tfds_train_per_class_refuses_small_class(mock_imagenet):
    config = mock_imagenet  # 20 examples over 1000 classes
    config.data.train_per_class = 1
    with pytest.raises(ValueError, match=r"config.data.train_per_class=1: class 'n\d+' has only 0 examples"):
        ip.dataset_info(config)
    config.data.train_per_class, config.data.train_fraction = 0, 0.5  # every present class keeps >= 1
    hits = data_sources._tfds_labels.cache_info().hits
    assert 1 <= ip.dataset_info(config).num_train <= 20
    assert data_sources._tfds_labels.cache_info().hits == hits + 1  # the labels are read once per process


# ---------------------------------------------------------------- image folders: progress and empty classes
def test_directory_scan_logs_progress_and_summary(image_dir, caplog, monkeypatch):
    config, _ = image_dir
    config.data.bad_images = "skip"
    monkeypatch.setattr(data_sources, "PROGRESS_SECONDS", 0.0)  # log after every image
    with caplog.at_level(logging.INFO, logger=data_sources.log.name):
        ip.dataset_info(config)
    train, val = (os.path.join(config.data.data_dir, s) for s in ("train", "val"))
    for done in range(1, 8):  # 8 train images: progress after 1..7, then the summary
        pattern = rf"Verifying the images of {re.escape(train)}: {done} / 8 images \({round(100 * done / 8)}%\), "
        assert re.search(pattern + r"\d+ images/s, ETA \dm\d\ds", caplog.text)
    assert f"{train}: 6 readable images in 2 classes, 2 unreadable; verified in" in caplog.text
    assert f"{val}: 4 readable images in 2 classes, 0 unreadable; verified in" in caplog.text
    assert (data_sources._duration(75.4), data_sources._duration(3725)) == ("1m15s", "1h02m05s")


@pytest.mark.parametrize("split", ["train", "val"])
def test_directory_empty_class_folder_is_refused(image_dir, split):
    config, _ = image_dir
    empty = os.path.join(config.data.data_dir, split, "bird")
    os.makedirs(empty)
    with open(os.path.join(empty, "readme.txt"), "w") as f:
        f.write("not an image")
    before = sorted(os.walk(config.data.data_dir))
    with pytest.raises(ValueError, match=re.escape(f"class folder {empty} holds no images")):
        ip.validate_data_config(config)
    with pytest.raises(ValueError, match="remove the folder or add images to it"):
        ip.dataset_info(config)
    assert sorted(os.walk(config.data.data_dir)) == before  # nothing written


def test_directory_train_split_without_images(tmp_path):
    config = make_config("directory", **{"data.data_dir": str(tmp_path), "data.eval_split": "val"})
    os.makedirs(tmp_path / "val")
    os.makedirs(tmp_path / "train")
    with pytest.raises(ValueError, match=r"config.data.train_split='train': folder .* has no class sub-folders"):
        ip.dataset_info(config)
    for name in ("a", "b"):
        os.makedirs(tmp_path / "train" / name)
    with pytest.raises(ValueError, match=re.escape(f"class folder {tmp_path / 'train' / 'a'} holds no images")):
        ip.dataset_info(config)
    (tmp_path / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "train" / "b" / "ok.png")
    config.data.bad_images = "skip"
    with pytest.raises(ValueError, match=re.escape(f"class folder {tmp_path / 'train' / 'a'} has no readable images")):
        ip.dataset_info(config)


# ---------------------------------------------------------------- build(): the source opened, and checked, once
class Calls:
    """Wraps `module.name` (monkeypatched) and counts its calls, from any thread."""

    def __init__(self, monkeypatch, module, name):
        self.calls, wrapped = [], getattr(module, name)

        def counted(*args, **kwargs):
            self.calls.append(args)  # list.append is atomic: the image checks run in a thread pool
            return wrapped(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    @property
    def n(self) -> int:
        return len(self.calls)


def test_build_makes_one_tfds_builder_and_eval_passes_reuse_it(mock_imagenet, monkeypatch):
    config = mock_imagenet
    builders, sources = Calls(monkeypatch, tfds, "builder"), Calls(monkeypatch, data_sources, "source")
    checks = Calls(monkeypatch, ip, "_validate")
    data = ip.build(config)
    assert (builders.n, sources.n, checks.n) == (1, 1, 1)
    assert (data.info.num_train, data.info.num_eval, data.eval_batches) == (20, 20, 3)
    counts = Calls(monkeypatch, data_sources, "count_records")
    first, second = list(data.eval_iterator()), list(data.eval_iterator())  # the trainer's params and EMA passes
    assert len(first) == 3 and first[-1]["mask"].tolist() == [1.0] * 4 + [0.0] * 4
    assert_batches_equal(first, second)
    next(data.train_iterator(start_step=2))
    assert (builders.n, sources.n, checks.n, counts.n) == (1, 1, 1, 0)  # the shares were counted by build()


def test_build_subset_of_tfds_split_uses_its_one_builder(tiny_tfds, monkeypatch):
    _, root = tiny_tfds
    config = make_config(
        "s2mlp_test_tiny", **{**NO_AUGMENT, "data.data_dir": root, "data.train_fraction": 0.5, "batch_size": 4}
    )
    data_sources._tfds_labels.cache_clear()  # make build() read the labels
    builders = Calls(monkeypatch, tfds, "builder")
    data = ip.build(config)
    assert builders.n == 1 and data_sources._tfds_labels.cache_info().misses == 1
    assert data.info.num_train == 25 and len(data.source.train_keep) == 25


def test_build_scans_an_image_folder_once(image_dir, monkeypatch):
    config, _ = image_dir
    config.data.bad_images = "skip"
    data_sources._scan_split.cache_clear()  # make build() scan
    verified, sources = Calls(monkeypatch, data_sources, "_verify_image"), Calls(monkeypatch, data_sources, "source")
    data = ip.build(config)
    assert (verified.n, sources.n) == (12, 1)  # 8 train files (2 unreadable) and 4 eval images, each read once
    counts = Calls(monkeypatch, data_sources, "count_records")
    first, second = list(data.eval_iterator()), list(data.eval_iterator())
    assert_batches_equal(first, second)
    assert [b["mask"].sum() for b in first] == [4.0] and sorted(first[0]["label"].tolist()) == [0, 0, 1, 1]
    take(data.train_iterator(), 2)
    assert (verified.n, sources.n, counts.n) == (12, 1, 0)


def test_build_copies_the_config_and_equals_the_one_call_iterators():
    config = make_config(**AUGMENT_ALL, **{"data.train_fraction": 0.5})
    data = ip.build(config, process_index=1, process_count=2)
    train, evals = take(data.train_iterator(start_step=3), 2), list(data.eval_iterator())
    assert_batches_equal(
        train, take(ip.create_train_iterator(config, start_step=3, process_index=1, process_count=2), 2)
    )
    assert_batches_equal(evals, list(ip.create_eval_iterator(config, process_index=1, process_count=2)))
    assert train[0]["image"].shape == (16, 16, 16, 3) and evals[0]["image"].shape == (16, 16, 16, 3)
    config.seed, config.batch_size, config.image_size, config.data.train_fraction = 9, 64, 8, 1.0
    assert_batches_equal(take(data.train_iterator(start_step=3), 2), train)  # later edits don't reach a Data
    assert_batches_equal(list(data.eval_iterator()), evals)
    assert data.info.num_train == 753 and ip.dataset_info(config).num_train == 1497  # stratified half


def test_build_checks_the_process_split_of_the_batch_once():
    data = ip.build(make_config(), process_index=3, process_count=4)  # batch_size = eval_batch_size = 32
    assert (data.recipe.batch, data.recipe.eval_batch) == (8, 8)
    assert next(data.train_iterator())["image"].shape[0] == 8 and next(data.eval_iterator())["mask"].shape == (8,)
    for field in ("batch_size", "eval_batch_size"):
        message = f"config.{field}=30: must be a positive multiple of the process count (4)."
        with pytest.raises(ValueError, match=re.escape(message)):
            ip.build(make_config(**{field: 30}), process_count=4)
    assert ip._get(make_config(), "data.name") == "digits"  # 'a.b' paths, as train_lib's _get


@pytest.mark.parametrize("num_threads", [0, 3])
def test_num_threads_reaches_the_tf_data_options(num_threads, tiny_tfds):
    _, root = tiny_tfds
    for name, extra in (("digits", {}), ("s2mlp_test_tiny", {"data.data_dir": root})):
        data = ip.build(make_config(name, **{"data.num_threads": num_threads, "batch_size": 4}, **extra))
        datasets = [data.train_dataset(), data.eval_dataset()]
        if name != "digits":  # tfds reads its files with the same options
            datasets.append(data.source.train_shard(0, 1))
        for ds in datasets:
            threading = ds.options().threading
            assert ds.options().deterministic is True
            assert threading.private_threadpool_size == (num_threads or None)
            assert threading.max_intra_op_parallelism == (1 if num_threads else None)


def test_verify_image_reads_the_format_from_the_content(tmp_path):
    pixels = np.zeros((8, 8, 3), np.uint8)
    for fmt in ("JPEG", "PNG", "GIF", "BMP", "WEBP"):
        Image.fromarray(pixels).save(tmp_path / f"{fmt}.png", fmt)
    for fmt in ("JPEG", "PNG", "GIF", "BMP"):  # whatever the extension says
        assert data_sources._verify_image(str(tmp_path / f"{fmt}.png")) is None, fmt
    assert "format WEBP is not decodable" in data_sources._verify_image(str(tmp_path / "WEBP.png"))
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(grey).save(tmp_path / "grey.bmp")  # PIL writes 8-bit grey; TF reads it right
    assert data_sources._verify_image(str(tmp_path / "grey.bmp")) is None
    Image.fromarray(pixels).convert("1").save(tmp_path / "bits.bmp")  # TF cannot decode 1-bit BMPs
    Image.fromarray(pixels).convert("P").save(tmp_path / "palette.bmp")  # TF reads the palette indices as grey
    for name in ("bits", "palette"):
        assert "(1-bit or palette) is misread by tf.io.decode_image" in data_sources._verify_image(
            str(tmp_path / f"{name}.bmp")
        )

    def bmp(name, bits, pixels, palette=b"", compression=0):  # written by hand: PIL writes neither kind
        info = struct.pack(
            "<IiiHHIIiiII", 40, 4, 2, 1, bits, compression, len(pixels), 2835, 2835, len(palette) // 4, 0
        )
        offset = 14 + 40 + len(palette)
        header = b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
        (tmp_path / name).write_bytes(header + info + palette + pixels)

    bmp("rgb555.bmp", 16, np.array([[0x7C00, 0x03E0, 0x001F, 0x7FFF]] * 2, "<u2").tobytes())  # TF fails
    grey = b"".join(bytes([i, i, i, 0]) for i in range(256))
    bmp("rle8.bmp", 8, bytes([4, 200, 0, 0, 4, 50, 0, 1]), grey, compression=1)  # TF reads the codes as pixels
    assert "of 16 bits per pixel, compression 0" in data_sources._verify_image(str(tmp_path / "rgb555.bmp"))
    assert "of 8 bits per pixel, compression 1" in data_sources._verify_image(str(tmp_path / "rle8.bmp"))


def test_random_erase_erases_nothing_when_no_try_fits():
    x = tf.random.stateless_normal([1, 60, 3], SEED)  # 1 pixel high: no rectangle of >= 2% of the area fits
    for s in range(20):
        np.testing.assert_array_equal(image_ops.random_erase(x, 1.0, tf.constant([s, 1], tf.int64)).numpy(), x.numpy())


def test_posterize_keeps_the_top_bits_of_every_value():
    """The bit mask equals PIL's/timm's definition, f - f mod 2^(8 - bits), for every uint8 value and bit count."""
    values = tf.reshape(tf.range(256, dtype=tf.int32), [16, 16, 1]) * tf.ones([1, 1, 3], tf.int32)
    f = tf.cast(values, tf.float32)
    for bits in range(9):
        want = (f - tf.math.floormod(f, 2.0 ** (8 - bits))).numpy().astype(np.uint8)
        np.testing.assert_array_equal(image_ops._posterize(f, tf.constant(float(bits))).numpy(), want)


@pytest.mark.parametrize("shape", [(24, 20), (16, 16)])
def test_geometric_ops_fill_exactly_as_a_transformed_ones_channel(shape):
    """`_affine` weights the fill by the closed-form share of the sample that fell inside the image; that is the
    4th channel of ones TF's ImageProjectiveTransformV3 would interpolate, value for value."""
    f = tf.constant(np.random.default_rng(2).integers(0, 256, (*shape, 3)), tf.float32)
    fill = tf.constant([124.0, 116.0, 104.0])
    h, w = shape
    c, s = math.cos(0.4), math.sin(0.4)
    matrices = [
        [1.0, 0.27, 0.0, 0.0, 1.0, 0.0],  # ShearX
        [1.0, 0.0, 0.0, -0.3, 1.0, 0.0],  # ShearY
        [1.0, 0.0, 0.43 * w, 0.0, 1.0, 0.0],  # TranslateXRel
        [1.0, 0.0, 0.0, 0.0, 1.0, -0.37 * h],  # TranslateYRel
        [c, s, (w - 1) / 2 * (1 - c) - s * (h - 1) / 2, -s, c, (h - 1) / 2 * (1 - c) + s * (w - 1) / 2],  # Rotate
    ]
    for matrix in matrices:
        matrix = [tf.constant(v, tf.float32) for v in matrix]
        with_ones = tf.concat([f, tf.ones_like(f[..., :1])], -1)[None]
        out = tf.raw_ops.ImageProjectiveTransformV3(
            images=with_ones,
            transforms=tf.concat([tf.stack(matrix), [0.0, 0.0]], 0)[None],
            output_shape=tf.shape(f)[:2],
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="CONSTANT",
        )[0]
        want = image_ops._u8(out[..., :3] + (1.0 - out[..., 3:]) * fill)
        np.testing.assert_array_equal(image_ops._affine(f, matrix, fill).numpy(), want.numpy())


def test_an_eval_split_without_images_is_refused_before_training(tmp_path):
    """An empty eval folder passed the checks and failed at the first evaluation, mid-run."""
    for cls in ("cat", "dog"):
        os.makedirs(tmp_path / "train" / cls)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / cls / "0.png")
    os.makedirs(tmp_path / "val")
    config = make_config("directory", **{"data.data_dir": str(tmp_path), "data.train_split": "train",
                                         "data.eval_split": "val"})  # fmt: skip
    with pytest.raises(ValueError, match=r"config.data.eval_split='val' has no examples \(of the kept classes\)"):
        ip.build(config)
