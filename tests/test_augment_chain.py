"""The augmentation chain (config.augment.ops, s2mlp/augment_chain.py): parsing and its errors, the host ops
against the recipe they replaced, and the split at 'to_device'."""

import io
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import image_ops
import input_pipeline as ip
from configs import common, demo, fashion_mnist, tiny
from s2mlp import augment_chain
from s2mlp.augment_chain import RandAugmentSpec, parse
from s2mlp.preprocessing import mean_std

V2 = "inception_crop(0.08)|flip|randaugment(2, 9, 0.5)|normalize|erase(0.25)"


def test_parse_the_v2_recipe():
    chain = parse(V2)
    assert [op.name for op in chain.host] == ["inception_crop", "flip", "randaugment", "normalize", "erase"]
    assert chain.device == () and chain.host[-1].spec.gives == "float"
    assert chain.host[0].kwargs == {"area_min": 0.08, "method": "bicubic"}
    assert chain.host[2].kwargs == {"spec": RandAugmentSpec(2, 9.0, 0.5, 10.0, False, 0.5)}
    assert chain.host[4].kwargs == {"prob": 0.25}
    keyword = parse("resize|randaugment(num_ops=3, magnitude=7, magnitude_max=8, increasing=True)|normalize")
    assert keyword.host[1].kwargs["spec"] == RandAugmentSpec(3, 7.0, 0.0, 8.0, True, 0.5)
    assert parse(" resize | normalize ").host[0].name == "resize"  # spaces around ops are fine


def test_to_device_splits_the_chain():
    chain = parse("inception_crop(0.08)|flip|to_device|randaugment(2, 9, 0.5)|normalize|erase(0.25)")
    assert [op.name for op in chain.host] == ["inception_crop", "flip"]
    assert [op.name for op in chain.device] == ["randaugment", "normalize", "erase"]
    assert chain.host[-1].spec.gives == "uint8"  # the host sends uint8 images


@pytest.mark.parametrize(
    "text, message",
    [
        ("", r"give a chain of ops like"),
        ("inception_crop|flip", r"must end with normalized images; add 'normalize'"),
        ("flip|normalize", r"op 1 'flip' takes a uint8 image, not record; the chain must start with a decoding op"),
        ("resize|normalize|flip", r"op 3 'flip' takes a uint8 image, not float"),
        ("resize|erase(0.25)|normalize", r"op 2 'erase\(0.25\)' takes a float image, not uint8; erase comes after"),
        ("resize|flipp|normalize", r"unknown op 'flipp' \(did you mean 'flip'\?\)"),
        ("resize|erase(1.5)|normalize", r"op 2 'erase\(1.5\)': prob=1.5 must be"),
        ("resize|normalize|erase(1.5)", r"op 3 'erase\(1.5\)': prob=1.5 must be a number in \[0.0, 1.0\]"),
        ("inception_crop(0)|normalize", r"area_min=0 must be a number in \(0.0, 1.0\]"),
        ("resize('nearest')|normalize", r"method='nearest' must be 'bicubic' \(antialiased, DeiT's\) or 'bilinear'"),
        ("resize|randaugment(2, 9, foo)|normalize", r"arguments must be literals"),
        ("resize|randaugment(2, 9, 0.5, 10, False, 0.5, 1)|normalize", r"too many positional arguments; randaugment\("),
        ("resize|flip(0.5)|normalize", r"too many positional arguments; flip\(\)"),
        ("resize|randaugment(mag=9)|normalize", r"unexpected keyword argument 'mag'"),
        ("resize|randaugment(magnitude_max=12)|normalize", r"magnitude_max=12 must be a number in \[0.0, 10.0\]"),
        ("resize|flip[0]|normalize", r"write an op as name or name\(arguments\)"),
        ("to_device|resize|normalize", r"op 2 'resize' runs on the host only; move 'to_device' after it"),
        ("resize|to_device|normalize|to_device", r"'to_device' may appear once"),
        ("resize|normalize|to_device", r"no op follows 'to_device'"),
        ("resize|normalize|to_device|erase(0.25)", r"'to_device' comes after normalize; move it before normalize"),
        ("resize|flip|flip|normalize", r"op 3 'flip': flip is already on the host; an op appears once there"),
        ("resize|to_device|flip|flip|normalize", r"op 4 'flip': flip is already on the device"),
    ],
)
def test_bad_chains_are_refused_naming_the_op_and_the_fix(text, message):
    with pytest.raises(ValueError, match=r"config.augment.ops=.*" + message if text else message):
        parse(text)


def test_bad_chain_fails_the_data_checks_before_anything_is_read():
    config = tiny.get_config()
    config.augment.ops = "resize|flipp|normalize"
    with pytest.raises(ValueError, match=r"^config.augment.ops='resize\|flipp\|normalize': op 2 'flipp'"):
        ip.validate_data_config(config)


def test_every_registered_op_has_its_host_implementation_and_the_shipped_configs_parse():
    assert set(image_ops.HOST_OPS) == set(augment_chain.OPS)
    for config in (common.get_config("v2"), common.get_config("deit"), demo.get_config(), tiny.get_config()):
        parse(config.augment.ops)
    assert [op.name for op in parse(fashion_mnist.get_config().augment.ops).host] == [
        "resize",
        "pad_crop",
        "flip",
        "normalize",
        "erase",
    ]


def timm_window(img_h, img_w, scale_min, area_u, ratio_u, offset_u):
    """timm's RandomResizedCropAndInterpolation.get_params (timm/data/transforms.py) with its random draws given
    (and torchvision's test that a crop is not empty):
    random.uniform(a, b) is a + (b - a)·u and random.randint(0, n) is floor(u·(n + 1))."""
    area = img_w * img_h
    for attempt in range(10):
        target_area = (scale_min + (1.0 - scale_min) * area_u[attempt]) * area
        log_ratio = (math.log(3 / 4), math.log(4 / 3))
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * ratio_u[attempt])
        target_w = int(round(math.sqrt(target_area * aspect_ratio)))
        target_h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < target_w <= img_w and 0 < target_h <= img_h:  # torchvision's test; timm's omits 0 < (empty crops)
            i = math.floor(offset_u[0] * (img_h - target_h + 1))
            j = math.floor(offset_u[1] * (img_w - target_w + 1))
            return i, j, target_h, target_w
    in_ratio = img_w / img_h
    if in_ratio < 3 / 4:
        target_w, target_h = img_w, int(round(img_w / (3 / 4)))
    elif in_ratio > 4 / 3:
        target_h, target_w = img_h, int(round(img_h * (4 / 3)))
    else:
        target_w, target_h = img_w, img_h
    return (img_h - target_h) // 2, (img_w - target_w) // 2, target_h, target_w


def test_random_resized_crop_draws_timms_window():
    rng = np.random.default_rng(0)
    shapes = [(375, 500), (500, 375), (28, 28), (8, 8), (12, 300), (300, 12), (1, 1), (224, 224)]
    for h, w in shapes:
        for area_min in (0.08, 0.6, 1.0):
            for _ in range(40):
                area_u, ratio_u, offset_u = rng.random(10), rng.random(10), rng.random(2)
                begin, size = image_ops.rrc_window_of(tf.constant([h, w, 3]), area_min, area_u, ratio_u, offset_u)
                i, j, ch, cw = timm_window(h, w, area_min, area_u, ratio_u, offset_u)
                assert (begin.numpy().tolist(), size.numpy().tolist()) == ([i, j, 0], [ch, cw, -1]), (h, w, area_min)
    # Stateless: one key, one window; the windows of 300 keys stay inside a 500×375 image and cover the range.
    shape = tf.constant([375, 500, 3])
    windows = [image_ops.rrc_window(shape, tf.constant([s, 0], tf.int64), 0.08) for s in range(300)]
    sizes = np.array([s.numpy()[:2] for _, s in windows])
    begins = np.array([b.numpy()[:2] for b, _ in windows])
    assert np.all(begins >= 0) and np.all(begins + sizes <= [375, 500])
    fraction = sizes.prod(1) / (375 * 500)
    assert fraction.min() < 0.15 and fraction.max() > 0.9 and 0.4 < fraction.mean() < 0.6  # uniform in 0.08..1
    np.testing.assert_array_equal(image_ops.rrc_window(shape, tf.constant([5, 0], tf.int64), 0.08)[1], windows[5][1])


# ---------------------------------------------------------------- the chain is the recipe it replaced
def legacy(image, key, kind, *, size, crop, area_min, flip, spec, erase, mean, std):
    """The per-example augmentation as input_pipeline wrote it before the chain (five config switches)."""
    k = tf.unstack(tf.random.experimental.stateless_split(key, 4))
    image = image_ops.decode_inception_crop(image, kind, k[0], area_min) if crop else image_ops.decode(image, kind)
    image = image_ops.resize(image, [size, size])
    if flip:
        image = tf.cond(tf.random.stateless_uniform([], k[1]) < 0.5, lambda: image[:, ::-1], lambda: image)
    if spec is not None:
        image = image_ops.randaugment(image, spec, k[2], tuple(float(round(v)) for v in mean))
    x = (tf.cast(image, tf.float32) - mean) / std
    return image_ops.random_erase(x, erase, k[3]) if erase > 0 else x


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


@pytest.mark.parametrize(
    "ops, legacy_args",
    [
        (V2, dict(crop=True, area_min=0.08, flip=True, spec=RandAugmentSpec(2, 9.0, 0.5), erase=0.25)),
        (
            "inception_crop(0.6)|flip|normalize|erase(0.5)",
            dict(crop=True, area_min=0.6, flip=True, spec=None, erase=0.5),
        ),
        ("resize|normalize", dict(crop=False, area_min=0.08, flip=False, spec=None, erase=0.0)),
        (
            "resize|flip|randaugment(3, 7, 1.0)|normalize",
            dict(crop=False, area_min=0.08, flip=True, spec=RandAugmentSpec(3, 7.0, 1.0), erase=0.0),
        ),
    ],
)
@pytest.mark.parametrize("kind", ["encoded", "raw"])
def test_host_chain_gives_the_batches_of_the_recipe_it_replaced_bit_for_bit(ops, legacy_args, kind):
    mean, std = mean_std("imagenet")
    context = image_ops.Context(kind, 24, mean, std)
    chain = parse(ops)
    for seed in range(6):
        record = tf.constant(_jpeg(seed)) if kind == "encoded" else tf.io.decode_jpeg(_jpeg(seed), channels=3)
        key = tf.constant([seed, 11], tf.int64)
        got = image_ops.apply(chain.host, record, key, context)
        want = legacy(record, key, kind, size=24, mean=mean, std=std, **legacy_args)
        np.testing.assert_array_equal(got.numpy(), want.numpy())


@pytest.mark.parametrize("size", [(30, 40), (24, 24), (12, 20)])
def test_resize_methods(size):
    """'bicubic' is tf.image.resize's antialiased bicubic, 'bilinear' its plain bilinear, both rounded to uint8; an
    image already of the size comes back as it is (which antialiased bicubic gives too)."""
    image = tf.constant(np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8))
    for method, antialias in (("bicubic", True), ("bilinear", False)):
        want = tf.image.resize(image, [24, 24], method, antialias=antialias)
        want = tf.cast(tf.clip_by_value(tf.round(want), 0, 255), tf.uint8)
        np.testing.assert_array_equal(image_ops.resize(image, [24, 24], method).numpy(), want.numpy())
    chain = parse("inception_crop(0.5, 'bilinear')|normalize")
    assert chain.host[0].kwargs == {"area_min": 0.5, "method": "bilinear"}


def test_pipeline_sends_uint8_images_when_ops_run_on_the_device():
    config = tiny.get_config()
    config.augment.ops = "resize|to_device|flip|normalize"
    batch = next(ip.create_train_iterator(config))
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (16, 16, 16, 3)
    config.augment.ops = "resize|normalize"
    host = next(ip.create_train_iterator(config))
    mean, std = mean_std(config.data.normalization)
    np.testing.assert_array_equal((batch["image"].astype(np.float32) - mean) / std, host["image"])
    assert next(ip.create_eval_iterator(config))["image"].dtype == np.float32  # eval stays normalised on the host


# ---------------------------------------------------------------- the ops after 'to_device', in the train step
def test_every_device_placeable_op_has_its_device_implementation():
    from s2mlp import augment

    assert set(augment.DEVICE_OPS) == {name for name, spec in augment_chain.OPS.items() if spec.device}


def test_device_chain_is_the_same_on_eight_devices_as_on_one_and_a_function_of_the_key():
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import train_lib
    from s2mlp import augment

    assert jax.device_count() == 8
    ops = parse("resize|to_device|flip|randaugment(2, 9, 0.5)|normalize|erase(0.5)").device
    images = np.random.default_rng(0).integers(0, 256, (16, 12, 12, 3), dtype=np.uint8)
    run = jax.jit(lambda x, key: augment.apply(ops, x, key, "imagenet"))
    one = np.asarray(run(images, jax.random.key(3)))
    mesh = train_lib.make_mesh(jax.devices())
    sharded = jax.device_put(images, NamedSharding(mesh, P("data")))
    np.testing.assert_array_equal(np.asarray(run(sharded, jax.random.key(3))), one)
    assert one.dtype == np.float32 and one.shape == images.shape
    np.testing.assert_array_equal(np.asarray(run(images, jax.random.key(3))), one)  # same key, same batch
    assert not np.array_equal(np.asarray(run(images, jax.random.key(4))), one)
    mean, std = mean_std("imagenet")
    plain = (images.astype(np.float32) - mean) / std
    changed = [not np.allclose(one[i], plain[i]) and not np.allclose(one[i], plain[i][:, ::-1]) for i in range(16)]
    assert 4 <= sum(changed) < 16  # RandAugment (2 ops at p 0.5) or erasing (p 0.5) touched most, not all


def test_train_step_runs_the_device_ops_on_uint8_batches():
    import jax

    import train_lib

    config = tiny.get_config()
    config.augment.ops = "resize|to_device|flip|randaugment(2, 9, 0.5)|normalize|erase(0.25)"
    trainer = train_lib.setup_from_config(config, 10, mesh=train_lib.make_mesh(jax.devices()[:1]))
    assert trainer.image_dtype == np.uint8
    spec = trainer.batch_spec(16, 16)
    assert spec["image"].dtype == np.uint8
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, 16).astype(np.int32),
    }
    state = trainer.init(jax.random.key(0))
    state, metrics = trainer.train_step(state, trainer.to_global(batch), jax.random.key(1))
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
    # Without device ops the step takes the float batch the host normalised: same model, other input dtype.
    config.augment.ops = "resize|normalize"
    assert train_lib.setup_from_config(config, 10, mesh=train_lib.make_mesh(jax.devices()[:1])).image_dtype == (
        np.float32
    )


def test_a_retired_augment_switch_points_to_the_chain():
    from configs import overrides

    message = overrides.unknown_field(tiny.get_config(), ["--config.augment.randaugment="])
    assert message.startswith("--config.augment.randaugment=: the config has no field 'augment.randaugment'; ")
    assert "config.augment.ops" in message


def _offset_of(out: np.ndarray, image: np.ndarray, padding: int) -> tuple[int, int]:
    """The (top, left) at which `out` was cropped from `image` zero-padded by `padding` (asserts there is one)."""
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    h, w = image.shape[:2]
    found = [
        (t, l)
        for t in range(2 * padding + 1)
        for l in range(2 * padding + 1)  # noqa: E741
        if np.array_equal(padded[t : t + h, l : l + w], out)
    ]
    assert found, "not a crop of the padded image"
    return found[0]


def test_pad_crop_on_the_host_and_on_the_device_shift_by_up_to_padding_pixels():
    import jax

    from s2mlp import augment

    image = np.random.default_rng(0).integers(1, 256, (10, 12, 3), dtype=np.uint8)  # no 0: padding is visible
    host = {
        _offset_of(image_ops.pad_crop(tf.constant(image), tf.constant([s, 5], tf.int64), 2).numpy(), image, 2)
        for s in range(200)
    }
    assert host == {(t, l) for t in range(5) for l in range(5)}  # noqa: E741 - every offset of ±2 pixels, no other
    keys = jax.random.split(jax.random.key(0), 200)
    device = np.asarray(augment.pad_crop(np.broadcast_to(image, (200, *image.shape)), keys, 2))
    assert {_offset_of(out, image, 2) for out in device} == host
    chain = parse("resize|pad_crop(2)|to_device|pad_crop|normalize")
    assert chain.host[1].kwargs == {"padding": 2} and chain.device[0].kwargs == {"padding": 4}
    with pytest.raises(ValueError, match=r"op 2 'pad_crop\(0\)': padding=0 must be an int in \[1, 64\]"):
        parse("resize|pad_crop(0)|normalize")
