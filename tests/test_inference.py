"""The inference side (`s2mlp/inference.py`, `s2mlp/mixer_npz.py`, `s2mlp/predict.py`) against a real tiny run.

One run of `configs/tiny.py` (s2mlp_tiny on scikit-learn's digits, 6 steps, EMA on) made by
`train_lib.train_and_evaluate` once per session (tests/conftest.py's `tiny_s2mlp_run`, which the notebook test
shares) serves the round-trip, bad-checkpoint and CLI tests.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from s2mlp import checkpoint as ckpt
from s2mlp import inference, mixer_npz, models, predict
from s2mlp.preprocessing import mean_std

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def _eval_fn(model):
    return jax.jit(lambda params, images: model.apply({"params": params}, images, train=False))


def _jit_apply(model, params, images):
    """`model.apply` in eval mode, as train_lib.eval_step runs it (jitted once per model: eager flax is slow)."""
    return _eval_fn(model)(params, images)


@pytest.fixture(scope="module")
def workdir(tiny_s2mlp_run):
    return tiny_s2mlp_run


@pytest.fixture(scope="module")
def config():
    from configs import tiny

    return tiny.get_config("s2mlp_tiny")


# ---- import hygiene -------------------------------------------------------
def test_imports_without_tensorflow_or_ml_collections():
    """Inference must run on hosts without TensorFlow and ml_collections."""
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('tensorflow', 'ml_collections', 'tensorflow_datasets'):
                    raise ImportError('blocked ' + name)
        sys.meta_path.insert(0, Block())
        import s2mlp.inference, s2mlp.mixer_npz, s2mlp.predict
        print('ok')
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# ---- round trip against the trainer -----------------------------------------
def test_load_restores_what_the_trainer_saved(workdir, config):
    """Params equal the trainer-path restore; logits equal model.apply on the eval batches; EMA is selectable."""
    import input_pipeline

    directory, step = ckpt.locate(workdir)
    model = models.from_config(config, input_pipeline.dataset_info(config).num_classes)  # as the trainer builds it
    batch = next(input_pipeline.create_eval_iterator(config))
    loaded = {}
    for ema in (True, False):
        clf = inference.load(workdir, ema=ema)
        assert (clf.step, clf.image_size, clf.num_classes) == (step, 16, 10)
        assert clf.class_names == [str(i) for i in range(10)]
        assert clf.workdir is not None and os.path.samefile(clf.workdir, workdir)
        item = "ema_params" if ema else "params"  # read back independently, through a CheckpointManager
        restored = ocp.CheckpointManager(directory).restore(
            step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore()})
        )
        reference = restored[item]
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(clf.params), jax.device_get(reference))
        expected = _jit_apply(model, reference, batch["image"])
        np.testing.assert_allclose(clf.logits(batch["image"]), expected, rtol=1e-6, atol=1e-6)
        loaded[ema] = clf
    diff = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), loaded[True].params,
                        loaded[False].params)  # fmt: skip
    assert max(jax.tree.leaves(diff)) > 0, "EMA and raw parameters should differ after 6 steps"


def test_eval_accuracy_matches_logged_metrics(workdir, config):
    """Top-1 over the whole eval split, computed through the Classifier, equals what the trainer logged."""
    import input_pipeline

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f if "eval_top1" in line][-1]
    for ema, key in ((False, "eval_top1"), (True, "eval_ema_top1")):
        clf = inference.load(workdir, ema=ema)
        correct = count = 0.0
        for batch in input_pipeline.create_eval_iterator(config):
            top1 = clf.logits(batch["image"]).argmax(-1)
            correct += float(np.sum((top1 == batch["label"]) * batch["mask"]))
            count += float(np.sum(batch["mask"]))
        assert count == 300
        assert correct / count == pytest.approx(logged[key], abs=1e-9)


def test_load_accepts_workdir_checkpoints_dir_and_step_folder(workdir):
    steps = sorted(ckpt.locate(workdir)[0].iterdir())
    first = min(int(p.name) for p in steps if p.name.isdigit())
    assert inference.load(os.path.join(workdir, "checkpoints")).step == 6
    clf = inference.load(os.path.join(workdir, "checkpoints", str(first)))
    assert clf.step == first == 3


def test_config_view_rebuilds_models_from_json():
    """JSON turns tuples into lists; the rebuilt model must still be a valid, hashable flax module."""
    raw = {
        "model": {"name": "s2mlpv2_tiny", "drop_path_rate": 0.1, "overrides": {"hidden_dims": [16, 32]}},
        "image_size": 24,
        "compute_dtype": "bfloat16",
        "data": {"normalization": "imagenet", "eval_crop_pct": 0.875},
    }
    config = inference.ConfigView(json.loads(json.dumps(raw)))
    assert config.data.eval_crop_pct == 0.875 and config.get("absent", 3) == 3 and config.to_dict() == raw
    with pytest.raises(AttributeError, match="absent"):
        config.absent  # noqa: B018
    model = models.from_config(config, 10, dtype="float32")
    assert model.hidden_dims == (16, 32) and model.dtype == jnp.float32 and hash(model)
    shapes = ckpt.flat_shapes(models.abstract_params(model, 24))
    assert shapes["head/kernel"] == (32, 10)


# ---- preprocessing ----------------------------------------------------------
def test_preprocess_shapes_dtypes_and_inputs():
    kw = dict(image_size=16, crop_pct=0.875, normalization="imagenet")
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    out = inference.preprocess(u8, **kw)
    assert out.shape == (1, 16, 16, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(inference.preprocess(u8.astype(np.float64), **kw), out)  # float on the 0..255 scale
    grey = rng.integers(0, 256, (23, 31), dtype=np.uint8)
    grey_rgb = np.stack([grey] * 3, -1)
    np.testing.assert_array_equal(inference.preprocess(grey, **kw), inference.preprocess(grey_rgb, **kw))
    np.testing.assert_array_equal(inference.preprocess(grey[..., None], **kw), inference.preprocess(grey, **kw))
    rgba = np.concatenate([u8, np.full((37, 53, 1), 7, np.uint8)], -1)
    np.testing.assert_array_equal(inference.preprocess(rgba, **kw), out)
    assert inference.preprocess(rng.integers(0, 256, (2, 9, 11, 3), dtype=np.uint8), **kw).shape == (2, 16, 16, 3)
    mixed = inference.preprocess([u8, grey, rng.uniform(0, 255, (61, 29, 3)).astype(np.float32)], **kw)
    assert mixed.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(mixed[0], out[0])

    # Geometry and normalisation, exactly: no resize when the shorter side is already image_size / crop_pct.
    wide = rng.integers(0, 256, (16, 40, 3), dtype=np.uint8)
    mean, std = mean_std("imagenet")
    got = inference.preprocess(wide, image_size=16, crop_pct=1.0, normalization="imagenet")[0]
    np.testing.assert_allclose(got, (wide[:, 12:28].astype(np.float32) - mean) / std, rtol=1e-6)

    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        inference.preprocess(np.full((8, 8, 3), -3.0), **kw)
    with pytest.raises(ValueError, match="channels"):
        inference.preprocess(np.zeros((8, 8, 5), np.uint8), **kw)
    with pytest.raises(ValueError, match="batch"):
        inference.preprocess(np.zeros((1, 2, 8, 8, 3), np.uint8), **kw)
    with pytest.warns(UserWarning, match="multiply"):
        inference.preprocess(np.full((8, 8, 3), 0.5), **kw)
    for empty in ([], np.zeros((0, 8, 8, 3), np.uint8)):
        with pytest.raises(ValueError, match="no images given: pass one image, a batch or a non-empty list"):
            inference.preprocess(empty, **kw)


def test_resize_matches_jax_image_resize():
    rng = np.random.default_rng(2)
    for shape, size in (((37, 53, 3), (18, 25)), ((9, 13, 3), (18, 26)), ((120, 90, 3), (64, 48))):
        image = rng.uniform(0, 255, shape).astype(np.float32)
        expected = jax.image.resize(image, (*size, 3), method="bicubic", antialias=True)
        np.testing.assert_allclose(inference.resize_bicubic(image, *size), expected, atol=2e-3)


def test_resize_matches_tensorflow_bicubic_antialias():
    """The pipeline's resize, tf.image.resize(bicubic, antialias=True): 4e-3 grey levels was the largest difference
    measured on noise and noisy gradients up to 640x480; rounded to whole grey levels, at most a rounding tie."""
    import tensorflow as tf
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(4)
    digit = np.round(load_digits().images[3] * (255.0 / 16.0)).astype(np.uint8)
    yy, xx = np.mgrid[0:97, 0:131].astype(np.float32)
    gradient = np.stack([255 * xx / 130, 255 * yy / 96, 127 + 120 * np.sin(xx / 9) * np.cos(yy / 13)], -1)
    cases = (
        (np.repeat(digit[..., None], 3, -1), (18, 25)),  # upsampled
        (np.clip(gradient + rng.normal(0, 6, gradient.shape), 0, 255).astype(np.uint8), (24, 33)),  # downsampled
        (rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), (113, 161)),
        (rng.integers(0, 256, (61, 29, 3), dtype=np.uint8), (7, 5)),
    )
    for image, size in cases:
        expected = tf.image.resize(image, size, method="bicubic", antialias=True).numpy()
        ours = inference.resize_bicubic(image.astype(np.float32), *size)
        assert ours.shape == expected.shape and ours.dtype == np.float32
        np.testing.assert_allclose(ours, expected, atol=5e-3)
        assert np.abs(np.round(ours) - np.round(expected)).max() <= 1.0


def test_preprocess_matches_the_tf_eval_pipeline(tmp_path, config):
    """Same arrays as input_pipeline's eval branch on a 'directory' dataset of odd-sized PNGs (down- and upsizing)
    and JPEGs (4:2:0 and 4:4:4), the predictor reading the files with Pillow."""
    from PIL import Image

    import input_pipeline

    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:75, 0:100].astype(np.float32)
    photo = np.stack([2.5 * xx, 3.4 * yy, 127 + 100 * np.sin(xx / 7) * np.cos(yy / 5)], -1) + rng.normal(
        0, 20, (75, 100, 3)
    )
    photo = np.clip(photo, 0, 255).astype(np.uint8)
    images = {
        "a": (rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), "png", {}),
        "b": (rng.integers(0, 256, (61, 29), dtype=np.uint8), "png", {}),  # grey
        "c": (rng.integers(0, 256, (9, 13, 3), dtype=np.uint8), "png", {}),  # upsampled
        "d": (photo, "jpg", {"quality": 90}),  # chroma subsampled 4:2:0
        "e": (photo, "jpg", {"quality": 75, "subsampling": 0}),
    }
    for split in ("train", "test"):
        for name, (image, ext, options) in images.items():
            (tmp_path / split / name).mkdir(parents=True)
            Image.fromarray(image).save(tmp_path / split / name / f"x.{ext}", **options)
    config = config.copy_and_resolve_references()
    config.data.name, config.data.data_dir, config.data.eval_crop_pct = "directory", str(tmp_path), 0.875
    config.data.train_split, config.data.eval_split, config.eval_batch_size = "train", "test", 8
    batch = next(input_pipeline.create_eval_iterator(config))
    read = [predict.read_image(str(tmp_path / "test" / name / f"x.{ext}")) for name, (_, ext, _) in images.items()]
    ours = inference.preprocess(read, image_size=16, crop_pct=0.875, normalization="imagenet")
    np.testing.assert_array_equal(batch["label"][:5], [0, 1, 2, 3, 4])
    grey_levels = np.abs(ours - batch["image"][:5]) * mean_std("imagenet")[1]
    assert grey_levels.max() <= 1.0 + 1e-3, grey_levels.max()  # a rounding tie at most
    assert np.mean(grey_levels > 1e-3) < 0.01


def test_preprocess_matches_the_eval_pipeline_on_in_memory_images(config):
    """The digits (like IDX files) are held in memory: their eval resizes the whole image, whatever eval_crop_pct
    says, and a Classifier of such a run preprocesses as that eval did."""
    import data_sources
    import input_pipeline

    config = config.copy_and_resolve_references()
    config.data.eval_crop_pct, config.eval_batch_size = 0.875, 8
    batch = next(input_pipeline.create_eval_iterator(config))
    images, labels = data_sources._digits()[config.data.eval_split]
    np.testing.assert_array_equal(batch["label"], labels[:8])
    saved = json.loads(config.to_json_best_effort())  # the run's config.json
    clf = inference.Classifier(model=None, params=None, config=inference.ConfigView(saved), class_names=[])
    grey_levels = np.abs(clf.preprocess(images[:8]) - batch["image"]) * mean_std(config.data.normalization)[1]
    assert grey_levels.max() <= 1.0 + 1e-3, grey_levels.max()  # a rounding tie at most
    assert np.mean(grey_levels > 1e-3) < 0.01
    assert inference.eval_crop_pct({"name": "directory", "eval_crop_pct": 0.875}) == 0.875


def test_predict_returns_top_k_with_names(workdir):
    clf = inference.load(workdir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = clf.predict([np.zeros((20, 30), np.uint8), np.full((8, 8, 3), 255, np.uint8)], k=5)
    indices, probabilities, labels = result
    assert indices.shape == probabilities.shape == (2, 5) and len(labels) == 2
    assert np.all(np.diff(probabilities, axis=1) <= 0)
    assert labels[1] == [clf.class_names[i] for i in indices[1]]
    logits = clf.logits(clf.preprocess(np.zeros((20, 30), np.uint8)))[0]
    np.testing.assert_allclose(probabilities[0], np.asarray(jax.nn.softmax(logits))[indices[0]], rtol=1e-6)
    assert len(result.format(0).splitlines()) == 5
    assert clf.predict(np.zeros((9, 9, 3), np.uint8), k=50).indices.shape == (1, 10)


# ---- refusing bad checkpoints -----------------------------------------------
def _copy_step(workdir, dest, step=6):
    target = dest / "checkpoints" / str(step)
    shutil.copytree(os.path.join(workdir, "checkpoints", str(step)), target)
    return dest, target


def test_refuses_missing_and_empty_paths(tmp_path):
    missing = tmp_path / "nothing_here"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        inference.load(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "empty")) + ".*no complete checkpoint"):
        inference.load(tmp_path / "empty")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax's aborted async read
def test_refuses_truncated_checkpoints(workdir, tmp_path):
    # Array data files deleted: the metadata reads fine, the restore fails.
    _copy_step(workdir, tmp_path / "deleted", step=3)
    run, step_dir = _copy_step(workdir, tmp_path / "deleted")
    data = sorted((step_dir / "params").glob("**/d/*"))
    assert data
    for f in data[: max(1, len(data) // 2)]:
        f.unlink()
    with pytest.raises(ValueError, match=re.escape(str(step_dir)) + r".*incomplete or corrupt.*other steps.*\[3\]"):
        inference.load(run, ema=False)
    # Every file of the item cut in half (an interrupted copy): nothing is readable.
    run, step_dir = _copy_step(workdir, tmp_path / "truncated")
    for f in (step_dir / "params").glob("**/*"):
        if f.is_file() and f.name != "commit_success.txt":
            with open(f, "r+b") as fh:
                fh.truncate(f.stat().st_size // 2)
    with pytest.raises(ValueError, match=re.escape(str(step_dir)) + ".*incomplete or corrupt"):
        inference.load(step_dir, ema=False)
    # The EMA item is untouched, so it still loads.
    assert inference.load(step_dir, ema=True).step == 6


def test_refuses_checkpoint_that_does_not_fit_its_config(workdir, tmp_path):
    run, step_dir = _copy_step(workdir, tmp_path / "edited")
    meta = step_dir / "config" / "metadata"
    saved = json.loads(meta.read_text())
    saved["model"]["overrides"] = {"hidden_dim": 48}
    meta.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=re.escape(str(step_dir)) + r".*do not fit") as e:
        inference.load(run)
    assert "block_0/fc1/kernel: expected (48, 48), found (32, 32)" in str(e.value)
    assert "s2mlp_tiny" in str(e.value) and "hidden_dim" in str(e.value)


# ---- vision_transformer .npz -----------------------------------------------
def _mixer_tiny_params(num_classes=7):
    model = models.get_model("mixer_tiny", image_size=16, num_classes=num_classes)
    params = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(jnp.zeros((1, 16, 16, 3)))["params"]
    # The head is zero-initialised; make every leaf non-trivial so the logits test something.
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda p: np.asarray(p) + rng.normal(0, 0.2, p.shape).astype(np.float32), params)
    return model, jax.device_get(params)


def _write_vit_npz(path, params):
    """The layout vit_jax/checkpoint.py `load` reads: np.savez of the tree flattened with '/'."""
    np.savez(path, **{k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()})


def test_mixer_npz_loads_vision_transformer_layout(tmp_path):
    model, params = _mixer_tiny_params()
    path = tmp_path / "mixer_tiny.npz"
    _write_vit_npz(path, params)
    assert "MixerBlock_0/token_mixing/Dense_0/kernel" in np.load(path).files
    loaded_model, loaded = mixer_npz.load_mixer_npz(str(path), "mixer_tiny")
    assert loaded_model.num_classes == 7  # from head/bias
    x = np.random.default_rng(2).normal(size=(3, 16, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(_jit_apply(loaded_model, loaded, x), _jit_apply(model, params, x))
    with open(path, "rb") as f:  # a file object works too
        assert mixer_npz.load_mixer_npz(f, "mixer_tiny")[0].num_classes == 7

    clf = mixer_npz.classifier_from_npz(path, "mixer_tiny")
    assert (clf.image_size, clf.config.data.normalization, clf.config.data.eval_crop_pct) == (
        16, "minus_one_to_one", 0.875,
    )  # fmt: skip
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    expected = _jit_apply(model, params, clf.preprocess(image))
    np.testing.assert_allclose(clf.logits(clf.preprocess(image)), expected, rtol=1e-6, atol=1e-6)

    save_path = tmp_path / "saved.npz"
    mixer_npz.save_mixer_npz(save_path, params)
    assert sorted(np.load(save_path).files) == sorted(np.load(path).files)


def test_mixer_npz_lists_missing_unexpected_and_misshaped_keys(tmp_path):
    _, params = _mixer_tiny_params()
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    del flat["MixerBlock_1/LayerNorm_0/scale"]
    flat["stem/bias"] = np.zeros(5, np.float32)
    flat["extra/kernel"] = np.zeros(2, np.float32)
    np.savez(tmp_path / "bad.npz", **flat)
    with pytest.raises(ValueError) as e:
        mixer_npz.load_mixer_npz(tmp_path / "bad.npz", "mixer_tiny")
    message = str(e.value)
    assert "missing MixerBlock_1/LayerNorm_0/scale (32,)" in message
    assert "stem/bias: expected (32,), found (5,)" in message
    assert "unexpected extra/kernel (2,)" in message

    _write_vit_npz(tmp_path / "tiny.npz", params)
    with pytest.raises(ValueError, match="model_name='mixer_tiny'"):  # the wrong registry name: a hint
        mixer_npz.load_mixer_npz(tmp_path / "tiny.npz", "mixer_s16")
    np.savez(tmp_path / "pickled.npz", head=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError):
        mixer_npz.load_mixer_npz(tmp_path / "pickled.npz", "mixer_tiny")
    with pytest.raises(FileNotFoundError):
        mixer_npz.load_mixer_npz(tmp_path / "absent.npz")


# ---- the CLI -----------------------------------------------------------------
def test_predict_cli_prints_top5_per_image(workdir, tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i, shape in enumerate([(48, 64, 3), (30, 20, 3)]):
        paths.append(str(tmp_path / f"image{i}.jpg"))
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(paths[-1])
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")

    line = re.compile(r"^\s+([1-5])\.\s+\d+\.\d\d%\s+(\S+)(?: \((\d)\))?$")  # the index only when != name
    runs = [([], [str(i) for i in range(10)]), (["--class_names", str(tmp_path / "names.txt")], names)]
    for extra, expect_names in runs:
        assert predict.main([f"--checkpoint={workdir}", *extra, *paths]) == 0
        captured = capsys.readouterr()
        # Which step and which parameters were loaded (tiny runs keep an EMA), on stderr: stdout stays the results.
        assert f"note: {workdir}/checkpoints step 6, EMA parameters.\n" in captured.err
        out = captured.out.splitlines()
        assert len(out) == 2 * 6, out
        for k, path in enumerate(paths):
            assert out[6 * k] == path
            rows = [line.match(x) for x in out[6 * k + 1 : 6 * k + 6]]
            assert all(rows), out
            assert [int(r.group(1)) for r in rows] == [1, 2, 3, 4, 5]
            assert all(r.group(2) == expect_names[int(r.group(3) or r.group(2))] for r in rows)

    assert predict.main([f"--checkpoint={workdir}", "--no_ema", paths[0]]) == 0
    assert f"note: {workdir}/checkpoints step 6, raw parameters (--no_ema).\n" in capsys.readouterr().err
    assert predict.main([f"--checkpoint={tmp_path / 'absent'}", paths[0]]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert predict.main([f"--checkpoint={workdir}", f"--class_names={tmp_path / 'absent.txt'}", paths[0]]) == 2
    assert capsys.readouterr().err == f"error: --class_names={tmp_path / 'absent.txt'}: No such file or directory.\n"
    help_text = subprocess.run(
        [sys.executable, "-m", "s2mlp.predict", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert help_text.returncode == 0 and "--checkpoint" in help_text.stdout


def test_read_image_takes_the_high_byte_of_16_bit_grey_pngs_as_the_pipeline_does(tmp_path):
    import tensorflow as tf
    from PIL import Image

    values = np.array([[30000, 100], [65535, 256]], np.uint16)
    Image.fromarray(values).save(tmp_path / "x.png")
    ours = predict.read_image(str(tmp_path / "x.png"))
    theirs = tf.io.decode_image((tmp_path / "x.png").read_bytes(), channels=3, expand_animations=False).numpy()
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(ours[..., 0], [[117, 0], [255, 1]])


def test_read_image_keeps_the_stored_pixels_unless_asked_to_apply_exif(tmp_path):
    """As the pipeline (tf.io.decode_*) reads them; --exif_transpose turns the image upright (orientation 6: 90°)."""
    import tensorflow as tf
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "x.png", exif=exif)
    stored = tf.io.decode_image((tmp_path / "x.png").read_bytes(), channels=3).numpy()
    np.testing.assert_array_equal(predict.read_image(str(tmp_path / "x.png")), stored)
    np.testing.assert_array_equal(
        predict.read_image(str(tmp_path / "x.png"), exif_transpose=True), np.rot90(pixels, -1)
    )
    assert predict._parser().parse_args(["--checkpoint=w", "--exif_transpose", "x.png"]).exif_transpose


# ---- the CLI on folders, machine-readable output, unreadable files -----------------------------------------------
def _image_tree(root):
    """root/a.png, root/sub/b.JPG, root/sub/deeper/c.jpeg, root/notes.txt; returns the three image paths, sorted."""
    from PIL import Image

    rng = np.random.default_rng(3)
    (root / "sub" / "deeper").mkdir(parents=True)
    paths = [root / "a.png", root / "sub" / "b.JPG", root / "sub" / "deeper" / "c.jpeg"]
    for path, shape in zip(paths, [(40, 30, 3), (20, 20), (33, 50, 3)]):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path, format="PNG")
    (root / "notes.txt").write_text("not an image")
    return [str(p) for p in paths]


def test_predict_cli_folders_json_and_csv(workdir, tmp_path, capsys):
    import csv
    import io

    paths = _image_tree(tmp_path / "images")
    assert predict.find_images([str(tmp_path / "images")]) == paths  # recursive, sorted, any case, .txt left out
    assert predict.find_images([str(tmp_path / "images")], glob="*.png") == paths[:1]
    assert predict.find_images([str(tmp_path / "images" / "notes.txt")]) == [str(tmp_path / "images" / "notes.txt")]
    clf = inference.load(workdir)
    expected = clf.predict([predict.read_image(p) for p in paths], k=3)

    assert predict.main([f"--checkpoint={workdir}", "--output=json", "--top_k=3", str(tmp_path / "images")]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in records] == paths
    for i, record in enumerate(records):
        assert sorted(record) == ["indices", "labels", "path", "probabilities"]
        assert record["indices"] == expected.indices[i].tolist()
        assert record["labels"] == expected.labels[i]
        np.testing.assert_allclose(record["probabilities"], expected.probabilities[i], atol=1e-6)

    # csv: a header, then one row per image; --batch_size=2 splits the three images over two forward passes.
    argv = [f"--checkpoint={workdir}", "--output=csv", "--top_k=2", "--batch_size=2", paths[2], paths[0]]
    assert predict.main(argv) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["path", "label_1", "index_1", "probability_1", "label_2", "index_2", "probability_2"]
    assert [r[0] for r in rows[1:]] == [paths[2], paths[0]]
    for row, i in zip(rows[1:], (2, 0)):
        assert [int(row[2]), int(row[5])] == expected.indices[i, :2].tolist()
        assert [row[1], row[4]] == expected.labels[i][:2]
        np.testing.assert_allclose([float(row[3]), float(row[6])], expected.probabilities[i, :2], atol=1e-6)


def test_predict_cli_reports_unreadable_images_and_bad_inputs(workdir, tmp_path, capsys):
    paths = _image_tree(tmp_path / "images")
    truncated = tmp_path / "images" / "sub" / "truncated.png"
    data = open(paths[0], "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    fake = tmp_path / "images" / "fake.jpg"
    fake.write_text("not a jpeg")
    # Unreadable files are reported by path; the others are still classified; the exit status is 1.
    assert predict.main([f"--checkpoint={workdir}", "--output=json", str(tmp_path / "images")]) == 1
    captured = capsys.readouterr()
    assert [json.loads(line)["path"] for line in captured.out.splitlines()] == paths
    note, *errors = captured.err.splitlines()
    assert note == f"note: {workdir}/checkpoints step 6, EMA parameters."
    assert errors[0].startswith(f"error: cannot read {fake}: ")
    assert errors[1].startswith(f"error: cannot read {truncated}: ")
    assert errors[2] == "error: 2 of 5 images could not be read (listed above)."

    # Bad inputs stop before the checkpoint is read: exit status 2 and nothing on stdout.
    for argv, message in (
        ([str(tmp_path / "absent.png")], f"error: {tmp_path / 'absent.png'} does not exist."),
        ([str(tmp_path / "images"), "--glob=*.webp"], f"error: folder {tmp_path / 'images'} holds no file matching"),
        ([paths[0], "--glob=,"], "error: --glob=',' holds no pattern"),
        ([paths[0], "--top_k=0"], "error: --top_k=0 must be at least 1."),
    ):
        assert predict.main([f"--checkpoint={tmp_path / 'no_checkpoint'}", *argv]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith(message), captured.err


# ---- .npz robustness ----------------------------------------------------------------------------------------------
def test_mixer_npz_refuses_truncated_and_non_archive_files(tmp_path):
    _, params = _mixer_tiny_params()
    good = tmp_path / "good.npz"
    _write_vit_npz(good, params)
    data = good.read_bytes()
    cases = {
        "truncated.npz": (data[: len(data) // 2], "not a readable .npz file \\(BadZipFile"),
        "empty.npz": (b"", "not a readable .npz file \\(EOFError"),
        "text.npz": (b"hello, world", "not an .npz archive"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(str(tmp_path / name)) + ": " + message):
            mixer_npz.load_mixer_npz(tmp_path / name, "mixer_tiny")
    np.save(tmp_path / "single.npy", np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="single.npy: holds a single array, not an .npz archive"):
        mixer_npz.load_mixer_npz(tmp_path / "single.npy", "mixer_tiny")
    with pytest.raises(ValueError, match="truncated.npz: not a readable .npz"):  # the CLI path too
        mixer_npz.classifier_from_npz(tmp_path / "truncated.npz", "mixer_tiny")


def test_mixer_npz_refuses_non_finite_parameters_naming_the_first_key(tmp_path, capsys):
    _, params = _mixer_tiny_params()
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    flat["stem/kernel"] = flat["stem/kernel"].copy()
    flat["stem/kernel"][0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    flat["MixerBlock_1/channel_mixing/Dense_0/bias"] = np.full_like(flat["MixerBlock_1/channel_mixing/Dense_0/bias"],
                                                                    np.nan)  # fmt: skip
    np.savez(tmp_path / "nan.npz", **flat)
    assert mixer_npz.first_nonfinite(flat) == ("MixerBlock_1/channel_mixing/Dense_0/bias", 64)  # sorted key order
    message = re.escape(f"{tmp_path / 'nan.npz'}: parameter MixerBlock_1/channel_mixing/Dense_0/bias holds 64 NaN/Inf")
    with pytest.raises(ValueError, match=message):
        mixer_npz.load_mixer_npz(tmp_path / "nan.npz", "mixer_tiny")
    del flat["MixerBlock_1/channel_mixing/Dense_0/bias"]
    assert mixer_npz.first_nonfinite(flat) == ("stem/kernel", 3)
    image = _image_tree(tmp_path / "images")[0]
    assert predict.main([f"--checkpoint={tmp_path / 'nan.npz'}", "--mixer_model=mixer_tiny", image]) == 2
    assert "NaN/Inf" in capsys.readouterr().err


def test_predict_takes_an_upper_case_npz_and_refuses_flags_of_the_other_kind(workdir, tmp_path, capsys):
    _, params = _mixer_tiny_params()
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    with open(tmp_path / "mixer.NPZ", "wb") as f:  # a file object: savez would append '.npz' to the name
        np.savez(f, **flat)
    image = _image_tree(tmp_path / "images")[0]
    assert predict.main([f"--checkpoint={tmp_path / 'mixer.NPZ'}", "--mixer_model=mixer_tiny", image]) == 0
    capsys.readouterr()
    assert predict.main([f"--checkpoint={tmp_path / 'mixer.NPZ'}", "--no_ema", image]) == 2
    assert capsys.readouterr().err == (
        f"error: --no_ema applies to a training run's checkpoint only; --checkpoint={tmp_path / 'mixer.NPZ'} is "
        "not one.\n"
    )
    assert predict.main([f"--checkpoint={workdir}", "--mixer_model=mixer_tiny", image]) == 2
    assert "error: --mixer_model applies to a Mixer .npz only" in capsys.readouterr().err
