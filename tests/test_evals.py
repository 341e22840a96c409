"""Several evaluations in one run (config.evals, config.best_eval), ImageNet ReaL's multi-label top-1, and the main
eval's confusion matrix and per-class results. Digits and mocked tfds data; nothing downloads."""

import io
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import train_lib
from configs import tiny
from s2mlp import checkpoint as ckpt
from s2mlp import evals
from tests.test_robustness import _scalar_points, _tags
from tests.test_training import _rows

EXTRA = "name=trainset,split=train"  # digits' train split as a second eval
MAIN_KEYS = {"top1", "top5", "loss", "num_examples"}


def _config(**fields):
    config = tiny.get_config("s2mlp_tiny")
    for key, value in fields.items():
        config[key] = value
    return config


@pytest.fixture(scope="module")
def two_evals(tmp_path_factory):
    """s2mlp_tiny on digits (6 steps, evals at 3 and 6, EMA on) evaluated on 'test' (main) and 'trainset'."""
    workdir = tmp_path_factory.mktemp("two_evals")
    config = _config(evals=(EXTRA,))
    return config, workdir, train_lib.train_and_evaluate(config, str(workdir))


def _keys(prefix: str) -> set[str]:
    return {f"{prefix}{ema}{m}" for ema in ("", "ema_") for m in MAIN_KEYS}


def test_each_eval_has_its_metrics_and_tensorboard_group(two_evals):
    config, workdir, metrics = two_evals
    evaluated = [r for r in _rows(workdir) if "eval_top1" in r]
    assert [r["step"] for r in evaluated] == [3, 6]
    for row in evaluated:  # one row per eval step: the main eval keeps its keys, 'trainset' adds its own
        assert set(row) == {"step"} | _keys("eval_") | _keys("eval_trainset_")
        assert row["eval_num_examples"] == 300 and row["eval_trainset_num_examples"] == 1497
    assert metrics == {k: v for k, v in evaluated[-1].items() if k != "step"}
    tags = _tags(workdir)
    assert tags["scalars"] == {"train/loss", "train/grad_norm", "train/lr", "train/images_per_s"} | {
        f"{group}/{ema}{m}" for group in ("test", "trainset") for ema in ("", "ema_") for m in ("top1", "top5", "loss")
    }
    assert tags["text"] == {"config", "test/num_examples", "trainset/num_examples"}
    assert sorted(_scalar_points(workdir)).count(("trainset/top1", 6)) == 1


def test_tensorboard_keys_split_by_eval_name():
    names = ["a", "a_b", "v2"]
    assert evals.split_key("eval_top1", names) == (None, "top1")
    assert evals.split_key("eval_ema_loss", names) == (None, "ema_loss")
    assert evals.split_key("eval_a_ema_top1", names) == ("a", "ema_top1")
    assert evals.split_key("eval_a_b_top5", names) == ("a_b", "top5")
    assert evals.split_key("eval_v2_num_examples", names) == ("v2", "num_examples")


def test_imagenet_preset_specs_and_the_main_eval():
    config = _config()
    config.data.name, config.data.eval_split = "imagenet2012", "validation"
    config.evals = ("validation", "real", "v2")  # 'validation' is the main eval itself: evaluated once
    specs = evals.from_config(config)
    assert [(s.name, s.data, s.split, s.labels, s.main) for s in specs] == [
        ("validation", "imagenet2012", "validation", "", True),
        ("real", "imagenet2012_real", "validation", "real_label", False),
        ("v2", "imagenet_v2/matched-frequency", "test", "", False),
    ]
    assert [s.prefix for s in specs] == ["eval_", "eval_real_", "eval_v2_"]
    assert evals.best_spec(specs, "").name == "validation" and evals.best_spec(specs, "v2").name == "v2"
    config.evals = ({"name": "top", "data": "imagenet_v2/topimages", "split": "test"},)  # a dict in a config file
    assert evals.from_config(config)[1] == evals.EvalSpec("top", "imagenet_v2/topimages", "test")


@pytest.mark.parametrize("best_eval,kept", [("", [6]), ("trainset", [2, 6])])
def test_the_best_checkpoint_is_ranked_by_the_named_eval(best_eval, kept, tmp_path, monkeypatch):
    """Scripted top-1s that rank the steps in opposite orders: 'test' rises (best at 6), 'trainset' falls (best
    at 2). keep_checkpoints=1 keeps the latest step and the best one by config.best_eval."""
    scripted = {"eval_": [0.1, 0.2, 0.3], "eval_trainset_": [0.9, 0.5, 0.4]}
    calls = []
    real = evals.evaluate_sets

    def evaluate_sets(eval_sums, eval_sets, items):
        out, confusion = real(eval_sums, eval_sets, items)
        for prefix, values in scripted.items():
            out[f"{prefix}top1"] = out[f"{prefix}ema_top1"] = values[len(calls)]
        calls.append(out)
        return out, confusion

    monkeypatch.setattr(evals, "evaluate_sets", evaluate_sets)
    config = _config(evals=(EXTRA,), best_eval=best_eval, eval_every_steps=2, checkpoint_every_steps=2)
    config.keep_checkpoints = 1
    train_lib.train_and_evaluate(config, str(tmp_path))
    assert [r["eval_trainset_top1"] for r in _rows(tmp_path) if "eval_top1" in r] == [0.9, 0.5, 0.4]
    directory = tmp_path / ckpt.CHECKPOINTS
    assert sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) == kept


# ---- ImageNet ReaL: several labels per image -------------------------------------------------------------------
REAL_LABELS = [[3], [], [7, 3], [1], [], [0, 2], [5], [3, 9], [4], [2]]  # two images without a label


def _tfds_metadata(root: str, name: str, splits: dict[str, int]) -> None:
    """Writes `name`'s tfds metadata into `root` saying `splits` {split: examples}: the builder reads as prepared."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import naming
    from tensorflow_datasets.core import splits as tfds_splits

    builder = tfds.builder(name, data_dir=root)
    os.makedirs(builder.data_dir, exist_ok=True)
    template = naming.ShardedFileTemplate(
        data_dir=builder.data_dir, dataset_name=builder.name, filetype_suffix="tfrecord", split="train"
    )
    infos = [
        tfds_splits.SplitInfo(name=s, shard_lengths=[n], num_bytes=0, filename_template=template.replace(split=s))
        for s, n in splits.items()
    ]
    builder.info.set_splits(tfds_splits.SplitDict(infos))
    builder.info.write_to_directory(builder.data_dir)


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _mock_tfds(data_dir: str, counts: dict[str, int]):
    """tfds.testing.mock_data serving, per dataset name, `counts[name]` examples: encoded PNGs (the pipeline skips
    tfds' decoding), REAL_LABELS as imagenet2012_real's 'real_label', labels i % 1000 elsewhere."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    def as_dataset(builder, split, decoders=None, read_config=None, shuffle_files=False):
        n = counts[builder.name]
        if builder.name == "imagenet2012_real":
            examples = [{"image": _png(i), "real_label": np.array(REAL_LABELS[i], np.int64)} for i in range(n)]
            signature = {"image": tf.TensorSpec([], tf.string), "real_label": tf.TensorSpec([None], tf.int64)}
        else:
            examples = [{"image": _png(i), "label": np.int64(i % 1000)} for i in range(n)]
            signature = {"image": tf.TensorSpec([], tf.string), "label": tf.TensorSpec([], tf.int64)}
        ds = tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=signature)
        return ds.apply(tf.data.experimental.assert_cardinality(n))

    return tfds.testing.mock_data(as_dataset_fn=as_dataset, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=data_dir)


def _imagenet_config(data_dir: str, **fields):
    config = _config(**fields)
    config.data.name, config.data.eval_split, config.data.data_dir = "imagenet2012", "validation", data_dir
    config.batch_size, config.eval_batch_size = 8, 8
    return config


def test_real_top1_counts_a_prediction_in_the_label_set_and_leaves_unlabelled_images_out(tmp_path):
    import input_pipeline

    root = str(tmp_path / "tfds")
    _tfds_metadata(root, "imagenet2012_real", {"validation": len(REAL_LABELS)})
    config = _imagenet_config(root)
    with _mock_tfds(root, {"imagenet2012_real": len(REAL_LABELS)}):
        data = input_pipeline.build_eval(config, data="imagenet2012_real", split="validation", labels="real_label")
        batches = list(data.eval_iterator())
    assert isinstance(data, input_pipeline.MultiLabelData) and data.info.num_classes == 1000
    assert data.info.num_eval == 10 and len(batches) == 2  # 10 images in batches of 8, the last padded
    labels = np.concatenate([b["labels"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert labels.shape == (16, 1000) and mask.tolist() == [1.0] * 10 + [0.0] * 6
    assert [sorted(np.flatnonzero(row).tolist()) for row in labels[:10]] == [sorted(s) for s in REAL_LABELS]

    trainer = train_lib.setup_from_config(config, 1000)
    params = jax.device_get(trainer.init(jax.random.key(0)).params)
    bias = np.zeros(1000, np.float32)
    bias[[3, 7, 1, 0, 2]] = [5, 4, 3, 2, 1]  # the zero-initialised head predicts 3, then 7, 1, 0, 2 for every image
    params["head"]["bias"] = bias
    with jax.set_mesh(trainer.mesh):
        metrics = trainer.evaluate(trainer.create(params).params, batches, multi_label=True)
    # 8 labelled images; 3 is in 3 of their sets; one of {3, 7, 1, 0, 2} in 6 ([5] and [4] miss).
    assert metrics == {"top1": 3 / 8, "top5": 6 / 8, "num_examples": 8.0}


def test_imagenet_run_with_the_real_and_v2_presets(tmp_path):
    root = str(tmp_path / "tfds")
    counts = {"imagenet2012": 16, "imagenet2012_real": len(REAL_LABELS), "imagenet_v2": 12}
    _tfds_metadata(root, "imagenet2012", {"train": 16, "validation": 16})
    _tfds_metadata(root, "imagenet2012_real", {"validation": len(REAL_LABELS)})
    _tfds_metadata(root, "imagenet_v2/matched-frequency", {"test": 12})
    config = _imagenet_config(root, evals=("validation", "real", "v2"), best_eval="real", ema_decay=0.0)
    config.total_steps = config.eval_every_steps = config.checkpoint_every_steps = 1
    with _mock_tfds(root, counts):
        metrics = train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    assert set(metrics) == {f"eval_{m}" for m in MAIN_KEYS} | {"eval_real_top1", "eval_real_top5",
        "eval_real_num_examples"} | {f"eval_v2_{m}" for m in MAIN_KEYS}  # fmt: skip
    assert (metrics["eval_num_examples"], metrics["eval_real_num_examples"], metrics["eval_v2_num_examples"]) == (
        16, 8, 12,
    )  # fmt: skip
    assert {t for t in _tags(tmp_path / "run")["scalars"] if not t.startswith("train/")} == {
        "validation/top1", "validation/top5", "validation/loss", "real/top1", "real/top5",
        "v2/top1", "v2/top5", "v2/loss",
    }  # fmt: skip
    per_class = json.loads((tmp_path / "run" / "eval" / "validation_step1" / "per_class.json").read_text())
    assert np.asarray(per_class["confusion"]).shape == (1000, 1000) and per_class["num_examples"] == 16
    assert not (tmp_path / "run" / "eval" / "validation_step1" / "confusion.png").exists()  # 1000 classes: no PNG
    assert len(per_class["most_confused"]) <= evals.MOST_CONFUSED


# ---- the confusion matrix and per-class results ---------------------------------------------------------------
def test_confusion_matrix_and_per_class_top1_equal_numpy_by_hand():
    config = _config()
    trainer = train_lib.setup_from_config(config, 10)
    params = jax.device_get(trainer.init(jax.random.key(0)).params)
    rng = np.random.default_rng(0)
    params["head"]["kernel"] = rng.normal(size=params["head"]["kernel"].shape).astype(np.float32)  # varied answers
    batch = {
        "image": rng.normal(size=(48, 16, 16, 3)).astype(np.float32),
        "label": rng.integers(0, 10, size=48).astype(np.int32),
        "mask": (np.arange(48) < 41).astype(np.float32),  # the last 7 are padding
    }
    logits = jax.jit(lambda p, x: trainer.model.apply({"params": p}, x, train=False))(params, batch["image"])
    predicted = np.asarray(logits).argmax(-1)
    expected = np.zeros((10, 10), np.int64)
    for label, p, m in zip(batch["label"], predicted, batch["mask"]):
        expected[label, p] += int(m)
    assert len(set(predicted[:41])) > 3 and np.trace(expected) > 0  # not a degenerate model

    with jax.set_mesh(trainer.mesh):
        sums = trainer.eval_sums(trainer.create(params).params, [batch, batch])
    np.testing.assert_array_equal(sums["confusion"], 2 * expected)
    assert float(sums["correct_top1"]) == 2 * np.trace(expected) and float(sums["count"]) == 82

    record = evals.per_class(expected, [f"c{i}" for i in range(10)])
    real = batch["mask"] > 0
    for c in range(10):
        of_c = real & (batch["label"] == c)
        assert record["per_class"]["count"][c] == of_c.sum()
        if of_c.any():
            assert record["per_class"]["top1"][c] == pytest.approx((predicted[of_c] == c).mean())
        else:
            assert record["per_class"]["top1"][c] is None
    assert record["top1"] == pytest.approx((predicted[real] == batch["label"][real]).mean())
    off = expected - np.diag(np.diag(expected))
    top = record["most_confused"][0]
    assert top["count"] == off.max() and off[top["true"], top["predicted"]] == off.max()
    assert top["true_name"] == f"c{top['true']}"


def test_the_run_and_mode_eval_write_every_eval_and_the_per_class_results(two_evals, tmp_path):
    config, workdir, metrics = two_evals
    at_end = Path(workdir) / "eval" / "test_step6"
    trained = json.loads((at_end / evals.PER_CLASS_FILE).read_text())
    assert (trained["step"], trained["eval"], trained["split"], trained["params"]) == (6, "test", "test", "ema_params")
    assert trained["num_examples"] == 300 and trained["top1"] == pytest.approx(metrics["eval_ema_top1"])
    with Image.open(at_end / evals.CONFUSION_PNG) as image:
        assert image.width > 300 and np.asarray(image.convert("L")).std() > 10

    out = train_lib.evaluate(config, str(workdir), eval_dir=str(tmp_path / "evals"))
    folder = tmp_path / "evals" / "test_step6"
    record = json.loads((folder / "metrics.json").read_text())
    assert record["evals"] == {"test": {"data": "digits", "split": "test"},
                               "trainset": {"data": "digits", "split": "train"}}  # fmt: skip
    assert set(out) == _keys("eval_") | _keys("eval_trainset_")
    for key in out:
        assert record[key] == out[key] == pytest.approx(metrics[key], rel=1e-6), key
    assert {"test/top1", "test/ema_top1", "trainset/top1", "trainset/ema_loss"} <= _tags(folder)["scalars"]
    assert json.loads((folder / evals.PER_CLASS_FILE).read_text())["confusion"] == trained["confusion"]
    assert (folder / evals.CONFUSION_PNG).stat().st_size > 5_000


# ---- bad configs: one line naming the field, before anything is compiled or written ------------------------------
@pytest.mark.parametrize(
    "fields,message",
    [
        ({"evals": ("imagenet_real",)}, "config.evals[0]='imagenet_real' is not a preset; choose one of ['real', 'v2'"),
        ({"evals": ("real,v2",)}, '(several evals: --config.evals=\'("real", "v2")\')'),
        ({"evals": ("name=trainset",)}, "config.evals[0]='name=trainset' gives no split"),
        ({"evals": ("name=x,split=train,size=3",)}, "'size=3' is not KEY=VALUE"),
        ({"evals": ("name=ema,split=train",)}, "the name 'ema' must be"),
        ({"evals": ("name=train,split=train",)}, "not be 'train'"),
        ({"evals": ("name=test,split=train",)}, "the name 'test' is the main eval's"),
        ({"evals": (EXTRA, EXTRA)}, "config.evals[1]='name=trainset,split=train': another eval is already named"),
        ({"best_eval": "real"}, "config.best_eval='real' names no eval; choose one of ['test']"),
        ({"evals": (EXTRA,), "best_eval": "train"}, "names no eval; choose one of ['test', 'trainset']"),
        ({"evals": ("name=x,split=validation",)}, "config.evals: eval 'x' (digits:validation): split='validation'"),
        ({"evals": ("name=x,split=train,labels=real_label",)}, "labels='real_label' needs a tfds dataset"),
    ],
)
def test_a_bad_eval_config_fails_in_one_line_before_compiling(fields, message, tmp_path):
    config = _config(**fields)
    with pytest.raises(ValueError) as e:
        train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "run").exists()
