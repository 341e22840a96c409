"""Class subsets (config.data.classes: a list of names, the 'imagenet100' preset, 'random:K:SEED'): train and eval
keep only those classes, relabelled 0..K-1 in the order given; DatasetInfo, the checkpoint and inference name
them. Every source: scikit-learn's digits, IDX files, image folders, a real tfds dataset built offline
(s2mlp_test_tiny) and the mocked imagenet2012 (tests/conftest.py). Nothing is downloaded.
"""

import collections
import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import data_sources
import input_pipeline as ip
import train_lib
from configs import tiny
from s2mlp import checkpoint as ckpt
from s2mlp import inference, predict
from s2mlp.preprocessing import mean_std
from tests import test_idx
from tests.test_input_pipeline import (
    AUGMENT_ALL,
    NO_AUGMENT,
    Calls,
    assert_batches_equal,
    eval_examples,
    make_config,
    mock_imagenet,
    one_epoch,
    take,
    tfds_ids,
    tiny_tfds,
)

__all__ = ["mock_imagenet", "tiny_tfds"]  # fixtures shared with tests/test_input_pipeline.py

IMAGENET_NAMES = list(tfds.builder("imagenet2012").info.features["label"].names)  # tfds metadata, no data


def digits_records(split, mapping):
    """Counter of (8×8 grey pixels, new label) of the digits `split` records whose class is in `mapping`."""
    images, labels = data_sources._digits()[split]
    return collections.Counter(
        (np.round(im[..., 0] / 255 * 16).astype(np.uint8).tobytes(), mapping[int(t)])
        for im, t in zip(images, labels, strict=True)
        if int(t) in mapping
    )


# ---------------------------------------------------------------- digits: records, order, processes, resumption
def test_digits_keep_the_listed_classes_relabelled_in_the_given_order():
    config = make_config(**{**NO_AUGMENT, "data.classes": ("7", "3", "5"), "batch_size": 46})
    info = ip.dataset_info(config)
    assert (info.num_classes, info.class_names) == (3, ["7", "3", "5"])
    assert (info.num_train, info.num_eval) == (148 + 155 + 157, 31 + 28 + 25)  # the classes' train / test sizes
    mapping = {7: 0, 3: 1, 5: 2}
    assert one_epoch(config, 10) == digits_records("train", mapping)  # one epoch (460 = 10 batches of 46)
    shares = [one_epoch(config, 10, p, 2) for p in (0, 1)]  # 2 processes: 10 batches of 23 each
    assert shares[0] + shares[1] == digits_records("train", mapping) and not set(shares[0]) & set(shares[1])
    config.eval_batch_size = 20
    counts, evals = eval_examples(config, 2)
    assert counts == [5, 5] and evals == digits_records(
        "test", mapping
    )  # 42 a process in batches of 10  # eval: the same classes, relabelled
    assert ip.create_eval_iterator(config).__next__()["label"].max() < 3


def test_digits_resumption_and_subsets_within_the_classes():
    config = make_config(**{**AUGMENT_ALL, "data.classes": ("9", "0"), "batch_size": 32, "image_size": 16})
    k = 9  # 296 train examples: batches 9..11 cross the end of epoch 0
    reference = take(ip.create_train_iterator(config), k + 3)
    assert_batches_equal(take(ip.create_train_iterator(config, start_step=k), 3), reference[k:])
    config = make_config(**{**NO_AUGMENT, "data.classes": ("9", "0"), "data.train_fraction": 0.1})
    source = data_sources.source(config)
    labels = data_sources._digits()["train"][1]
    assert collections.Counter(labels[source.train_keep].tolist()) == {9: 15, 0: 15}  # floor(0.1 n + 0.5) each
    assert source.info.num_train == 30 and source.info.num_eval == 27 + 35
    config.data.train_fraction, config.data.train_per_class = 1.0, 146  # class '9' has 145
    with pytest.raises(ValueError, match=r"config.data.train_per_class=146: class '9' has only 145 examples"):
        ip.dataset_info(config)


def test_random_classes_are_seeded_nested_and_in_dataset_order():
    def names(spec):
        return ip.dataset_info(make_config(**{"data.classes": spec})).class_names

    three = names("random:3:0")
    assert three == names("random:3:0") == sorted(three, key=int) and len(set(three)) == 3
    assert set(three) < set(names("random:6:0"))  # with one seed, K classes are part of K' > K
    assert names("random:10:7") == [str(i) for i in range(10)]
    assert any(names(f"random:3:{seed}") != three for seed in (1, 2, 3))
    selection = data_sources.select_classes(make_config(**{"data.classes": "random:100:0"}), IMAGENET_NAMES, "x")
    assert selection.names == [IMAGENET_NAMES[i] for i in sorted(np.random.RandomState(0).permutation(1000)[:100])]


# ---------------------------------------------------------------- the imagenet100 preset
def test_imagenet100_preset_is_cmc_list_of_100_wordnet_ids():
    preset = data_sources.class_preset("imagenet100")
    assert len(preset) == len(set(preset)) == 100 and all(re.fullmatch(r"n\d{8}", n) for n in preset)
    assert preset[:3] == ["n02869837", "n01749939", "n02488291"] and preset[-1] == "n02090622"  # CMC's file order
    assert set(preset) <= set(IMAGENET_NAMES)
    selection = data_sources.select_classes(make_config(**{"data.classes": "imagenet100"}), IMAGENET_NAMES, "x")
    assert selection.names == sorted(preset)  # labels 0..99: the WordNet IDs sorted (tfds' and ImageFolder's order)
    assert selection.ids.tolist() == sorted(IMAGENET_NAMES.index(n) for n in preset)


def test_mocked_imagenet_with_the_preset_and_with_a_list(mock_imagenet):
    # tfds.testing.mock_data serves the whole split for any range of it, so only what is chosen is checked here;
    # the records (filtered ranges, relabelled) are checked on the real s2mlp_test_tiny dataset below.
    config = mock_imagenet
    builder = tfds.builder("imagenet2012", data_dir=config.data.data_dir)
    original = {s: [int(y) for _, y in data_sources._tfds_read(builder, s, 0)] for s in ("train", "validation")}
    for spec in ("imagenet100", tuple(IMAGENET_NAMES[y] for y in original["train"][5:1:-1])):
        config.data.classes = spec
        ip.validate_data_config(config)
        source = ip.build(config).source
        names = source.info.class_names
        assert names == (sorted(data_sources.class_preset("imagenet100")) if spec == "imagenet100" else list(spec))
        kept = {s: [i for i, y in enumerate(original[s]) if IMAGENET_NAMES[y] in names] for s in original}
        assert (source.info.num_classes, source.info.num_train, source.info.num_eval) == (
            len(names),
            len(kept["train"]),
            len(kept["validation"]),
        )
        assert (
            source.train_keep.tolist() == kept["train"]
            and source.class_keep("validation").tolist() == kept["validation"]
        )
        assert all(
            names[source.label_map[y]] == IMAGENET_NAMES[y] for y in original["train"] if source.label_map[y] >= 0
        )
        assert sum(source.label_map >= 0) == len(names) and len(source.label_map) == 1000


# ---------------------------------------------------------------- a real tfds dataset, image folders, IDX files
def test_tfds_dataset_classes_subset_processes_and_resumption(tiny_tfds):
    builder, root = tiny_tfds  # train ids 0..49, label (0, 0, 1, 1, 2)[id % 5] of ('a', 'b', 'c'); eval 100..105
    config = make_config(
        "s2mlp_test_tiny",
        **{**NO_AUGMENT, "data.data_dir": root, "data.classes": ("c", "a"), "data.train_per_class": 4, "batch_size": 4},
    )
    source = data_sources.source(config)
    assert (source.info.num_classes, source.info.class_names, source.info.num_train) == (2, ["c", "a"], 8)
    new = {2: 0, 0: 1}  # 'c' -> 0, 'a' -> 1

    def records(ds):
        return [(i, int(y)) for i, (_, y) in zip(tfds_ids(ds), ds.as_numpy_iterator(), strict=True)]

    whole = records(source.train_shard(0, 1))
    assert all(y == new[(0, 0, 1, 1, 2)[i % 5]] for i, y in whole)
    assert collections.Counter(y for _, y in whole) == {0: 4, 1: 4}
    assert records(source.train_shard(0, 2)) + records(source.train_shard(1, 2)) == whole
    order = tfds_ids(data_sources._tfds_read(builder, "validation", 0, in_order=True))  # the split's record order
    kept = [(i, new[(0, 0, 1, 1, 2)[i % 5]]) for i in order if i % 5 in (0, 1, 4)]  # 100, 101, 104, 105 in some order
    assert records(source.eval_shard(0, 1)) == kept and len(kept) == 4 and source.info.num_eval == 4
    assert records(source.eval_shard(0, 2)) + records(source.eval_shard(1, 2)) == kept
    reference = take(ip.create_train_iterator(config), 5)  # batches 2..4 cross the end of epoch 0
    assert_batches_equal(take(ip.create_train_iterator(config, start_step=2), 3), reference[2:])


@pytest.fixture
def four_classes(tmp_path):
    """Image folders of classes ant, bee, cat, dog: 2 train and 1 val PNG each, every pixel = 40 * class + image;
    cat's train folder also holds an unreadable file (refused with bad_images='fail' whenever cat is read)."""
    for split, n in (("train", 2), ("val", 1)):
        for c, name in enumerate(("ant", "bee", "cat", "dog")):
            os.makedirs(tmp_path / split / name)
            for i in range(n):
                Image.fromarray(np.full((6, 6, 3), 40 * c + i, np.uint8)).save(tmp_path / split / name / f"{i}.png")
    (tmp_path / "train" / "cat" / "broken.jpg").write_bytes(b"not an image")
    return make_config(
        "directory",
        **{
            **NO_AUGMENT,
            "data.data_dir": str(tmp_path),
            "data.eval_split": "val",
            "batch_size": 4,
            "eval_batch_size": 2,
        },
    )


@pytest.mark.parametrize("with_image", [False, True])
def test_an_eval_class_folder_the_train_split_lacks_is_refused_naming_it(four_classes, with_image):
    """Empty, it got 'remove the folder or add images to it' (adding images did not help); with images, a list of
    'class folders' holding a stray README.txt."""
    root = four_classes.data.data_dir
    os.makedirs(os.path.join(root, "val", "zebra"))
    open(os.path.join(root, "val", "README.txt"), "w").close()
    if with_image:
        Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(os.path.join(root, "val", "zebra", "0.png"))
    four_classes.data.classes = ("dog", "bee")
    data_sources._scan_split.cache_clear()
    with pytest.raises(ValueError) as e:
        ip.build(four_classes)
    if not with_image:  # caught by the config check, before anything is read
        assert str(e.value).endswith(
            "holds no images (*.jpg, *.jpeg, *.png); remove the folder or add images to it and a train folder of "
            "that class (the eval split adds none)."
        )
        return
    assert str(e.value) == (
        f"config.data.eval_split='val': {os.path.join(root, 'val')} has class folders the train split lacks: "
        "['zebra']; the eval split may lack classes but not add any (remove those folders, or add them to the train "
        "split)."
    )


def test_image_folders_read_only_the_kept_classes(four_classes, monkeypatch):
    config = four_classes
    with pytest.raises(ValueError, match="1 unreadable images"):
        ip.dataset_info(config)  # every class: cat's broken file stops it
    config.data.classes = ("dog", "bee")
    data_sources._scan_split.cache_clear()
    verified = Calls(monkeypatch, data_sources, "_verify_image")
    data = ip.build(config)
    assert verified.n == 6  # the 4 train and 2 val images of dog and bee; cat's folder is never read
    assert (data.info.num_classes, data.info.class_names, data.info.num_train, data.info.num_eval) == (
        2, ["dog", "bee"], 4, 2,
    )  # fmt: skip

    def pixels_and_labels(batches):
        mean, std = mean_std(config.data.normalization)
        values = np.round(np.concatenate([b["image"][:, 0, 0, 0] for b in batches]) * std[0] + mean[0])
        return sorted(zip(values.astype(int).tolist(), np.concatenate([b["label"] for b in batches]).tolist()))

    assert pixels_and_labels(take(data.train_iterator(), 1)) == [(40, 1), (41, 1), (120, 0), (121, 0)]
    assert pixels_and_labels(list(data.eval_iterator())) == [(40, 1), (120, 0)]


def test_idx_files_keep_the_listed_classes(tmp_path):
    test_idx.write_dataset(tmp_path, names=["w", "x", "y", "z"])  # labels 0, 1, 2, 3 in turn: 10 train, 5 test each
    config = test_idx.make_config(tmp_path, **{"data.classes": ("z", "x")})
    data = ip.build(config)
    assert (data.info.num_classes, data.info.class_names, data.info.num_train, data.info.num_eval) == (
        2, ["z", "x"], 20, 10,
    )  # fmt: skip
    evals = list(data.eval_iterator())
    assert np.concatenate([b["label"] for b in evals]).tolist() == [1, 0] * 5  # x, z, x, z, ... in record order


# ---------------------------------------------------------------- refusals, before anything is read or written
@pytest.mark.parametrize(
    "spec, message",
    [
        (("3", "12"), "config.data.classes=('3', '12'): '12' is not a class of digits; closest: '2', '1'."),
        (
            ("3", "cat", "dog"),
            "config.data.classes=('3', 'cat', 'dog'): 'cat' is not a class of digits (1 more unknown); its 10 "
            "classes are '0', '1', '2', '3', '4' and 5 more.",
        ),
        ((), "config.data.classes=(): selects no class; list at least one, or set '' for every class."),
        ([], "config.data.classes=[]: selects no class; list at least one, or set '' for every class."),
        (("3", "5", "3"), "config.data.classes=('3', '5', '3'): '3' is listed 2 times; list each class once."),
        ("random:11:0", "config.data.classes='random:11:0': K must be in 1..10 (digits has 10 classes)"),
        ("random:0:0", "config.data.classes='random:0:0': K must be in 1..10"),
        ("random:3", "config.data.classes='random:3': write 'random:K:SEED', e.g. 'random:100:0'"),
        (
            "imagenet10",
            "config.data.classes='imagenet10': not a preset ('imagenet100') or 'random:K:SEED' (did you "
            "mean 'imagenet100'?); give class names as a list, e.g. ('imagenet10',), or '' for every class.",
        ),
        ("3", "config.data.classes='3': not a preset"),
        (3, "config.data.classes=3: give a list of class names, a preset ('imagenet100'), 'random:K:SEED', or ''"),
        ((3, 5), "config.data.classes=(3, 5): 3 is not a class name (a string); names are ['0', '1', '2'], ..."),
    ],
)
def test_refusals_name_the_field_in_one_line(spec, message):
    with pytest.raises(ValueError) as error:
        ip.validate_data_config(make_config(**{"data.classes": spec}))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_unknown_wordnet_id_suggests_the_closest():
    config = make_config(**{"data.classes": ("n01440764", "n01443573")})  # a typo of n01443537
    with pytest.raises(ValueError) as error:
        data_sources.select_classes(config, IMAGENET_NAMES, "tfds dataset 'imagenet2012'")
    assert str(error.value) == (
        "config.data.classes=('n01440764', 'n01443573'): 'n01443573' is not a class of tfds dataset 'imagenet2012'; "
        "closest: 'n01644373', 'n01443537', 'n04443257'."  # difflib's ratio: the typo's n01443537 among them
    )
    long = tuple(IMAGENET_NAMES[:60]) + ("n0000000x",)
    config.data.classes = long
    with pytest.raises(ValueError, match=re.escape("config.data.classes=('n01440764', 'n01443537', ...; 61 names): ")):
        data_sources.select_classes(config, IMAGENET_NAMES, "x")


def test_sources_refuse_before_reading(four_classes, tmp_path, mock_imagenet):
    four_classes.data.classes = ("dog", "cow")
    before = sorted(os.walk(four_classes.data.data_dir))
    with pytest.raises(ValueError, match=rf"'cow' is not a class of folder {re.escape(str(tmp_path / 'train'))}"):
        ip.build(four_classes)
    assert sorted(os.walk(four_classes.data.data_dir)) == before
    mock_imagenet.data.classes = ("n01440764", "n01443573")
    with pytest.raises(ValueError, match="'n01443573' is not a class of tfds dataset 'imagenet2012'; closest"):
        ip.validate_data_config(mock_imagenet)
    test_idx.write_dataset(tmp_path / "idx", names=["w", "x", "y", "z"])
    with pytest.raises(
        ValueError, match="'v' is not a class of the IDX files in .*; its 4 classes are 'w', 'x', 'y', 'z'.$"
    ):
        ip.validate_data_config(test_idx.make_config(tmp_path / "idx", **{"data.classes": ("w", "v")}))


# ---------------------------------------------------------------- the trainer: head, checkpoint, inference
def test_trained_run_saves_the_class_names_and_inference_prints_them(tmp_path, capsys):
    config = tiny.get_config("s2mlp_tiny")  # digits, batch 16, 6 steps, checkpoints at 3 and 6
    config.data.classes = ("7", "3", "5")
    workdir = tmp_path / "run"
    metrics = train_lib.train_and_evaluate(config, str(workdir))
    assert metrics["eval_num_examples"] == 84  # the test split's 7s, 3s and 5s
    directory, step = ckpt.locate(workdir)
    assert ckpt.read_json(directory / str(step), "dataset") == {"num_classes": 3, "class_names": ["7", "3", "5"]}
    assert ckpt.saved_shapes(directory / str(step))["head/kernel"][-1] == 3
    clf = inference.load(str(workdir))
    assert clf.class_names == ["7", "3", "5"] and clf.num_classes == 3
    images, labels = data_sources._digits()["test"]
    path = str(tmp_path / "a_seven.png")
    Image.fromarray(images[list(labels).index(7)]).save(path)
    assert predict.main([f"--checkpoint={workdir}", "--top_k=3", path]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == path and len(rows) == 4
    printed = [re.match(r"^\s+[1-3]\.\s+\d+\.\d\d%\s+(\S+) \((\d)\)$", row).groups() for row in rows[1:]]
    assert sorted(printed) == [("3", "1"), ("5", "2"), ("7", "0")]  # each name with its label
