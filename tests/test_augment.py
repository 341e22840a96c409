"""The device augmentation (`s2mlp/augment.py`) against the host one (`image_ops.py`): every RandAugment op gives TF's
pixels (Rotate within 1 on a few pixels), the level maps are TF's, RandAugment applies exactly the ops it draws,
random erasing erases one rectangle, and the per-example keys do not depend on how the batch is split."""

import functools
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

import image_ops
from s2mlp import augment

FILL = (124.0, 116.0, 104.0)  # ImageNet's mean colour, rounded: the fill the pipeline passes
IMAGE = np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)  # H != W catches a swap
FACTORS = [0.0, 1.0, 0.1, 0.19, 0.46, 1.36, 1.81, 1.9]  # 1 is the identity; the decimal ones land on ties (x.5)
ARGUMENTS = {
    "AutoContrast": [0.0],
    "Equalize": [0.0],
    "Invert": [0.0],
    "Posterize": [0.0, 1.0, 3.0, 4.0, 8.0],
    "Solarize": [0.0, 128.0, 230.0, 256.0],
    "SolarizeAdd": [0.0, 99.0, 110.0],
    "Color": FACTORS,
    "Contrast": FACTORS,
    "Brightness": FACTORS,
    "Sharpness": FACTORS,
    "Rotate": [0.0, 27.0, -13.5, 30.0],
    "ShearX": [0.0, 0.27, -0.3],
    "ShearY": [0.0, 0.27, -0.3],
    "TranslateXRel": [0.0, 0.405, -0.45, 0.1],
    "TranslateYRel": [0.0, 0.405, -0.45, 0.1],
}
# The fraction of output values equal to TF's: 1 for all but Rotate, whose cos/sin (XLA's vs TF's) may differ in the
# last bit; on 64x48 images at 40 random angles 23 of 368,640 values were off, by 1.
EXACT_FRACTION = {"Rotate": 0.995}
IDENTITY_ARGUMENT = {"Posterize": 8.0, "Solarize": 256.0, "SolarizeAdd": 0.0, "Rotate": 0.0}
IDENTITY_ARGUMENT |= {n: 1.0 for n in ("Color", "Contrast", "Brightness", "Sharpness")}
IDENTITY_ARGUMENT |= {n: 0.0 for n in ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel")}

_apply_op = jax.jit(augment.apply_op, static_argnames="name")  # the argument traced, as in the train step


@functools.partial(jax.jit, static_argnames="increasing")
def _arguments(magnitude, sign, increasing):
    """Every op's argument for a drawn magnitude and sign, computed as RandAugment does (XLA divides by 10 as a
    multiplication by 0.1)."""
    level = magnitude / 10.0
    return jnp.stack([augment.op_argument(n, level, sign, increasing) for n in augment.RANDAUGMENT_OPS])


def _draws(keys, **settings):
    """draw_ops for each key: (ops, magnitudes, signs), each (B, num_ops)."""
    return [np.asarray(a) for a in jax.jit(jax.vmap(functools.partial(augment.draw_ops, **settings)))(keys)]


def _tf_op(image, name, argument):
    return image_ops._OP_FNS[name](
        tf.cast(image, tf.float32), tf.constant(argument, tf.float32), tf.constant(FILL, tf.float32)
    ).numpy()


def test_the_ops_are_image_ops_ops():
    assert augment.RANDAUGMENT_OPS == image_ops.RANDAUGMENT_OPS
    assert set(ARGUMENTS) == set(augment.RANDAUGMENT_OPS)


@pytest.mark.parametrize("name", augment.RANDAUGMENT_OPS)
def test_apply_op_equals_tf(name):
    for argument in ARGUMENTS[name]:
        got = np.asarray(_apply_op(IMAGE, name=name, argument=np.float32(argument), fill=FILL))
        want = _tf_op(IMAGE, name, argument)
        assert got.dtype == np.uint8 and got.shape == IMAGE.shape
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.max() <= 1, (name, argument)
        assert (diff == 0).mean() >= EXACT_FRACTION.get(name, 1.0), (name, argument, (diff > 0).sum())
        if argument == IDENTITY_ARGUMENT.get(name):
            np.testing.assert_array_equal(got, IMAGE)


def test_grey_rounds_like_tf_on_every_tie():
    """Color at factor 0 is PIL's grey, round(0.299 R + 0.587 G + 0.114 B): all (R, G, B) whose exact grey is
    x.5 (2,000 of them), where the float32 order and rounding of the products decide."""
    g, b = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    r = pow(299, -1, 1000) * (500 - 587 * g - 114 * b) % 1000  # 299 r + 587 g + 114 b = 500 (mod 1000)
    ties = np.stack([r, g, b], -1)[r < 256][:2000].astype(np.uint8)[None]
    got = np.asarray(_apply_op(ties, name="Color", argument=np.float32(0.0), fill=FILL))
    np.testing.assert_array_equal(got, _tf_op(ties, "Color", 0.0))


def test_op_argument_equals_tf():
    levels = np.array([0.0, 0.1, 0.45, 0.5, 0.9, 1.0, 1.3], np.float32)  # 1.3: magnitude_max 13
    for increasing in (False, True):
        table = jax.jit(
            lambda level, sign: jnp.stack(
                [augment.op_argument(n, level, sign, increasing) for n in augment.RANDAUGMENT_OPS]
            )
        )
        for sign in (-1.0, 1.0):
            got = np.asarray(table(levels, np.full_like(levels, sign)))
            for i, name in enumerate(augment.RANDAUGMENT_OPS):
                want = image_ops._op_argument(name, tf.constant(levels), tf.constant(sign), increasing).numpy()
                np.testing.assert_array_equal(got[i], np.broadcast_to(want, levels.shape), err_msg=name)


def test_apply_drawn_equals_apply_op_for_every_index():
    """The op index traced (the shared computation RandAugment uses): the op `apply_op` gives, or the image."""
    drawn = jax.jit(augment.apply_drawn)
    for index in range(augment.IDENTITY + 1):
        name = (augment.RANDAUGMENT_OPS + ("identity",))[index]
        argument = {"Rotate": 17.0, "Posterize": 2.0, "Solarize": 200.0, "SolarizeAdd": 66.0}.get(name, 0.27)
        if name in ("Color", "Contrast", "Brightness", "Sharpness"):
            argument = 1.81
        got = np.asarray(drawn(IMAGE, index, np.float32(argument), FILL))
        want = IMAGE if name == "identity" else _apply_op(IMAGE, name=name, argument=np.float32(argument), fill=FILL)
        np.testing.assert_array_equal(got, np.asarray(want), err_msg=name)


# ---------------------------------------------------------------- RandAugment
IMAGES = np.random.default_rng(1).integers(0, 256, (6, *IMAGE.shape), dtype=np.uint8)  # _apply_op compiled once


@pytest.mark.parametrize(
    "settings, raw_keys",
    [
        (dict(num_ops=1, prob=1.0, magnitude=9.0, magnitude_std=0.0, increasing=False), False),
        (dict(num_ops=2, prob=0.5, magnitude=9.0, magnitude_std=0.5, increasing=True), True),
    ],
)
def test_randaugment_applies_the_ops_it_draws(settings, raw_keys):
    """Recomputing each example's draws (`draw_ops`, the same key) and applying them one by one with `apply_op`
    gives RandAugment's output exactly; also: uint8, deterministic, typed or raw (B, 2) uint32 keys."""
    keys = augment.example_keys(0, 3, len(IMAGES))
    keys = jax.random.key_data(keys) if raw_keys else keys
    run = jax.jit(lambda images, keys: augment.randaugment(images, keys, fill=FILL, **settings))
    out = np.asarray(run(IMAGES, keys))
    assert out.dtype == np.uint8 and out.shape == IMAGES.shape
    np.testing.assert_array_equal(np.asarray(run(IMAGES, keys)), out)
    draws = {k: v for k, v in settings.items() if k != "increasing"}
    for image, got, ops, mags, signs in zip(IMAGES, out, *_draws(keys, **draws), strict=True):
        for op, mag, sign in zip(ops, mags, signs, strict=True):
            if op != augment.IDENTITY:
                name = augment.RANDAUGMENT_OPS[op]
                argument = _arguments(mag, sign, increasing=settings["increasing"])[op]
                image = _apply_op(image, name=name, argument=argument, fill=FILL)
        np.testing.assert_array_equal(got, np.asarray(image))
    other_keys = augment.example_keys(1, 3, len(IMAGES))
    other = np.asarray(run(IMAGES, jax.random.key_data(other_keys) if raw_keys else other_keys))
    assert (other != out).any()


def test_randaugment_prob_0_is_the_identity():
    keys = augment.example_keys(0, 0, len(IMAGES))
    assert augment.randaugment(IMAGES, keys, prob=0.0) is IMAGES
    ops, _, _ = _draws(keys, prob=0.0)
    assert (ops == augment.IDENTITY).all()


def test_draw_ops_distribution():
    """4,000 examples x 2 layers: ops uniform over the 15, applied with probability prob, signs +-1 evenly,
    magnitudes N(m, mstd) clipped to [0, mmax], uniform(0, m) for mstd inf (loose bounds: > 5 sigma)."""
    keys = augment.example_keys(7, 0, 4000)
    ops, mags, signs = _draws(keys, prob=0.7, magnitude_std=2.0)
    applied = ops[ops != augment.IDENTITY]
    assert abs(applied.size / ops.size - 0.7) < 0.03
    counts = np.bincount(applied, minlength=15)
    assert counts.size == 15 and np.abs(counts - applied.size / 15).max() < 5 * np.sqrt(applied.size / 15)
    assert abs((signs == 1).mean() - 0.5) < 0.03 and set(np.unique(signs)) == {-1.0, 1.0}
    assert mags.min() >= 0.0 and mags.max() == 10.0  # N(9, 2) clipped at magnitude_max
    assert abs(np.mean(mags) - 8.60) < 0.1  # E[min(N(9, 2), 10)] = 9 - 2 (phi(0.5) - 0.5 (1 - Phi(0.5)))
    _, uniform, _ = _draws(keys, magnitude=6.0, magnitude_std=float("inf"))
    assert uniform.min() >= 0.0 and uniform.max() <= 6.0 and abs(uniform.mean() - 3.0) < 0.1


# ---------------------------------------------------------------- random erasing
def test_random_erase_erases_one_rectangle():
    x = np.zeros((8, 32, 32, 3), np.float32)
    keys = augment.example_keys(0, 5, len(x))
    run = jax.jit(lambda x, keys: augment.random_erase(x, keys, 1.0))
    out = np.asarray(run(x, keys))
    np.testing.assert_array_equal(np.asarray(run(x, keys)), out)
    assert augment.random_erase(x, keys, 0.0) is x
    boxes = set()
    for erased in out != 0:  # N(0, 1) noise is never exactly 0
        assert erased.all(-1).sum() == erased.any(-1).sum()  # every channel of a pixel
        rows, cols = np.nonzero(erased.any(-1))
        top, left, h, w = rows.min(), cols.min(), np.ptp(rows) + 1, np.ptp(cols) + 1
        assert erased[top : top + h, left : left + w].all() and erased.sum() == h * w * 3  # one filled rectangle
        slack = (h + w + 1) / 2 + 0.25  # the sides of the sampled area are rounded to integers
        assert 0.02 * 32 * 32 - slack <= h * w <= 32 * 32 / 3 + slack
        boxes.add((top, left, h, w))
    assert len(boxes) == len(x)  # each example its own rectangle
    noise = out[out != 0]
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1.0) < 0.1


def test_random_erase_without_a_fitting_try_leaves_the_image():
    """A 1-pixel-high image: no rectangle fits (image_ops.random_erase raises here; this erases nothing)."""
    x = np.ones((2, 1, 60, 3), np.float32)
    erase = jax.jit(lambda x, keys: augment.random_erase(x, keys, 1.0))
    np.testing.assert_array_equal(np.asarray(erase(x, augment.example_keys(0, 0, 2))), x)


def test_normalize():
    mean, std = (124.0, 116.0, 104.0), (58.0, 57.0, 57.5)
    got = np.asarray(augment.normalize(IMAGES, mean, std))
    np.testing.assert_allclose(got, (IMAGES.astype(np.float32) - mean) / np.float32(std), rtol=1e-6, atol=1e-6)
    assert got.dtype == np.float32


# ---------------------------------------------------------------- keys, import
def test_example_keys_are_a_function_of_seed_step_and_index():
    def data(keys):
        return np.asarray(jax.random.key_data(keys))

    whole = data(augment.example_keys(3, 10, 8))
    halves = np.concatenate([data(augment.example_keys(3, 10, 4)), data(augment.example_keys(3, 10, 4, offset=4))])
    np.testing.assert_array_equal(whole, halves)
    np.testing.assert_array_equal(whole[5], data(augment.example_keys(3, 10, 1, offset=5))[0])
    base = jax.random.fold_in(jax.random.key(3), 10)
    np.testing.assert_array_equal(whole[2], data(jax.random.fold_in(base, 2)))
    assert len({tuple(k) for k in whole}) == 8
    assert (data(augment.example_keys(3, 11, 8)) != whole).any() and (
        data(augment.example_keys(4, 10, 8)) != whole
    ).any()


def test_imports_without_tensorflow():
    code = "import sys; sys.modules['tensorflow'] = None; import s2mlp.augment"  # importing TF would raise
    root = pathlib.Path(__file__).parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr


def test_device_flip_mirrors_left_right_about_half_the_time():
    """On a 10×12 image: each output is the image or its left-right mirror (not upside down), and both occur."""
    image = jnp.arange(10 * 12 * 3, dtype=jnp.float32).reshape(1, 10, 12, 3)
    out = np.asarray(augment.flip(jnp.repeat(image, 200, 0), jax.random.split(jax.random.key(0), 200)))
    plain = (out == np.asarray(image)).all(axis=(1, 2, 3))
    mirrored = (out == np.asarray(image)[:, :, ::-1]).all(axis=(1, 2, 3))
    assert (plain | mirrored).all() and 0.4 < mirrored.mean() < 0.6


def test_device_erase_boxes_take_timm_aspect_ratios():
    """Aspect h/w log-uniform in 0.3..3.3 (timm's), not square boxes: over 400 erased 64×64 zero images the ratios
    span both sides of 1 and their log averages about 0."""
    out = np.asarray(augment.random_erase(jnp.zeros((400, 64, 64, 1)), jax.random.split(jax.random.key(0), 400), 1.0))
    rows, cols = (out != 0).any(axis=(2, 3)), (out != 0).any(axis=(1, 3))
    erased = rows.any(axis=1)
    ratio = rows.sum(axis=1)[erased] / cols.sum(axis=1)[erased]
    assert erased.mean() > 0.95 and ratio.min() < 0.5 and ratio.max() > 2 and abs(np.log(ratio).mean()) < 0.15


def test_device_randaugment_fills_with_the_mean_colour(monkeypatch):
    """The chain's device RandAugment fills uncovered pixels with the dataset mean (timm's img_mean), as the host's
    does: (124, 116, 104) for ImageNet's normalisation."""
    from s2mlp.augment_chain import RandAugmentSpec
    from s2mlp.preprocessing import mean_std

    seen = {}
    monkeypatch.setattr(augment, "randaugment", lambda images, keys, fill, **spec: seen.setdefault("fill", fill))
    augment.DEVICE_OPS["randaugment"](None, None, *mean_std("imagenet"), spec=RandAugmentSpec(2, 9.0, 0.5))
    assert tuple(seen["fill"]) == (124.0, 116.0, 104.0)
