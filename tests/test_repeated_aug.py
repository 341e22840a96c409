"""Repeated augmentation (config.data.aug_repeats; DeiT's RASampler, S²-MLP paper §4 "Training details"): each
chosen image `aug_repeats` times an epoch, each copy augmented on its own; the copies spread over processes; the
stream a pure function of (seed, step, process) that resumes bit for bit; epochs as long as without repeats.

The digits' 300 test images (all distinct) serve as a short train split; a real tfds dataset built offline
(tests/test_input_pipeline.py's s2mlp_test_tiny, 8×8 images whose pixels hold the example's id) the tfds path.
"""

import collections

import numpy as np
import pytest

import data_sources
import input_pipeline as ip
from configs.common import get_config
from s2mlp.preprocessing import mean_std
from s2mlp.recipe import stream_positions
from tests.test_input_pipeline import (
    AUGMENT_ALL,
    NO_AUGMENT,
    assert_batches_equal,
    make_config,
    take,
    tfds_ids,
    tiny_tfds,
)

__all__ = ["tiny_tfds"]  # the fixture, shared with tests/test_input_pipeline.py

CROP_ONLY = {**NO_AUGMENT, "augment.ops": "inception_crop(0.08)|normalize", "image_size": 16}


def digits(**overrides):
    """The 300 digits of the 'test' split as the train split, 3 repeats, batch 30: an epoch is 10 batches."""
    return make_config(**{"data.train_split": "test", "data.aug_repeats": 3, "batch_size": 30, **overrides})


def stream(config, steps, start_step=0, process_index=0, process_count=1):
    data = ip.build(config, process_index=process_index, process_count=process_count)
    return take(data.train_iterator(start_step), steps)


def keys(batches):
    """(image bytes, label) of every example of `batches`, in stream order."""
    return [(x.tobytes(), int(y)) for b in batches for x, y in zip(b["image"], b["label"], strict=True)]


def test_each_chosen_image_appears_repeats_times_an_epoch_with_its_own_augmentation():
    config = digits(**NO_AUGMENT)
    assert ip.dataset_info(config).num_train == 300 == ip.dataset_info(digits(**{"data.aug_repeats": 0})).num_train
    plain = keys(stream(config, 20))  # two epochs of 300 positions (steps per epoch: 300 // 30, as without repeats)
    split = collections.Counter(keys(stream(digits(**NO_AUGMENT, **{"data.aug_repeats": 1}), 10)))
    assert len(split) == 300 and set(split.values()) == {1}  # repeats 1: off, an epoch is the whole split
    for epoch in (plain[:300], plain[300:]):
        counts = collections.Counter(epoch)
        assert len(counts) == 100 and set(counts.values()) == {3} and set(counts) <= set(split)
        assert all(epoch[3 * i] == epoch[3 * i + 1] == epoch[3 * i + 2] for i in range(100))  # copies in a row
    assert set(plain[:300]) != set(plain[300:])  # each epoch chooses its own third
    # The same positions with an inception crop: the same images, each copy cropped differently.
    cropped = stream(digits(**CROP_ONLY), 10)
    labels = [y for b in cropped for y in b["label"].tolist()]
    assert labels == [y for _, y in plain[:300]]
    images = np.concatenate([b["image"] for b in cropped])
    distinct = collections.Counter(len({x.tobytes() for x in images[3 * i : 3 * i + 3]}) for i in range(100))
    assert distinct[1] == 0 and distinct[3] >= 90, distinct  # a few crops of a digit's blank border coincide
    # Repeats 2: 150 images twice.
    counts = collections.Counter(keys(stream(digits(**NO_AUGMENT, **{"data.aug_repeats": 2}), 10)))
    assert len(counts) == 150 and set(counts.values()) == {2}


@pytest.mark.parametrize("process_index, process_count", [(0, 1), (1, 2)])
def test_resuming_mid_epoch_gives_the_uninterrupted_stream(process_index, process_count):
    config = digits(**AUGMENT_ALL, **{"image_size": 16})
    k = 8  # batches 8..11 cross the end of epoch 0 (global position 300)
    reference = stream(config, k + 4, 0, process_index, process_count)
    assert_batches_equal(stream(config, 4, k, process_index, process_count), reference[k:])


def test_two_processes_split_each_batch_and_the_copies():
    config = digits(**CROP_ONLY)
    one = stream(config, 12)  # past the end of epoch 0
    shares = [stream(config, 12, 0, p, 2) for p in (0, 1)]
    assert all(b["image"].shape[0] == 15 for share in shares for b in share)
    positions = np.asarray(stream_positions(30, 2))  # what the train step keys each row's device ops by
    for t in range(12):  # the two halves of batch t are the 1-process batch t, bit for bit (augmentation included)
        union = collections.Counter(keys([shares[0][t]]) + keys([shares[1][t]]))
        assert union == collections.Counter(keys([one[t]])), t
        # Row p·15 + k of the global batch (the shares concatenated) is position p + 2k of the 1-process batch.
        assert keys([{k: np.concatenate([shares[0][t][k], shares[1][t][k]]) for k in ("image", "label")}]) == [
            keys([one[t]])[i] for i in positions
        ], t
    # Copies land on both processes: positions alternate, so of each image's 3 copies one process has 2, the other 1.
    plain = [keys(stream(digits(**NO_AUGMENT), 10, 0, p, 2)) for p in (0, 1)]
    first, second = (collections.Counter(share) for share in plain)
    assert set(first) == set(second) and len(first) == 100
    assert sorted(zip(first.values(), (second[k] for k in first), strict=True)) == [(1, 2)] * 50 + [(2, 1)] * 50
    assert first + second == collections.Counter(keys(stream(digits(**NO_AUGMENT), 10)))


def batch_ids(batches, config):
    mean, std = mean_std(config.data.normalization)
    return [int(round(float(x[0, 0, 0] * std[0] + mean[0]))) for b in batches for x in b["image"]]


def test_tfds_blocks_processes_and_resumption(tiny_tfds):
    _, root = tiny_tfds  # 50 records; blocks of 16: 16, 16, 16 and 2 records
    config = make_config(
        "s2mlp_test_tiny",
        **{**NO_AUGMENT, "data.data_dir": root, "data.aug_repeats": 3, "data.shuffle_buffer": 16, "batch_size": 10},
    )
    assert ip.dataset_info(config).num_train == 50
    order = tfds_ids(data_sources.source(config).train_shard(0, 1))  # the split's fixed record order
    ids = batch_ids(stream(config, 10), config)  # two epochs of 50
    for epoch in (ids[:50], ids[50:]):
        for lo in (0, 16, 32, 48):  # each block: its own records, the first ceil(size / 3) of a permutation 3 times
            block = epoch[lo : lo + 16]
            counts = collections.Counter(block)
            assert sorted(counts.values()) == ([1, 3, 3, 3, 3, 3] if len(block) == 16 else [2]), block
            assert set(block) <= set(order[lo : lo + 16])
        assert len(set(epoch)) == 6 * 3 + 1
    assert ids[:50] != ids[50:]
    shares = [stream(config, 10, 0, p, 2) for p in (0, 1)]
    for t in range(10):
        assert collections.Counter(batch_ids([shares[0][t], shares[1][t]], config)) == collections.Counter(
            ids[10 * t : 10 * t + 10]
        )
    for p in (0, 1):
        assert_batches_equal(stream(config, 4, 6, p, 2), shares[p][6:])


def test_aug_repeats_config():
    assert get_config("deit").data.aug_repeats == 3 and get_config("v2").data.aug_repeats == 0
    with pytest.raises(ValueError, match=r"config.data.aug_repeats=-1: must be an int >= 0 \(0 or 1: off"):
        ip.validate_data_config(make_config(**{"data.aug_repeats": -1}))


def test_device_ops_key_an_example_by_its_stream_position_whatever_the_process_count():
    """With repeated augmentation on 2 processes the global batch holds the 1-process batch's rows permuted; the
    train step's device ops, keyed by `stream_positions`, augment each example as on 1 process."""
    import jax

    from s2mlp import augment, augment_chain

    ops = augment_chain.parse("resize|to_device|flip|randaugment(2, 9, 0.5)|normalize|erase(0.5)").device
    images = np.random.default_rng(0).integers(0, 256, (30, 16, 16, 3), dtype=np.uint8)
    rng = jax.random.key(7)
    one = np.asarray(augment.apply(ops, images, rng, "imagenet", stream_positions(30, 1)))
    positions = np.asarray(stream_positions(30, 2))
    assert positions.tolist() == [2 * k for k in range(15)] + [2 * k + 1 for k in range(15)]
    two = np.asarray(augment.apply(ops, images[positions], rng, "imagenet", stream_positions(30, 2)))
    np.testing.assert_array_equal(two, one[positions])
