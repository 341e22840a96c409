"""TensorFlow image ops of the input pipeline: decoding, the inception crop, resizing, the eval image, timm's
RandAugment and random erasing, and `HOST_OPS`: the host implementations of the ops a config.augment.ops chain
names (s2mlp/augment_chain.py registers them).

Pure functions of tensors and explicit arguments; every random choice is a stateless op keyed by an explicit
seed (a shape-[2] int64 tensor), so the same seed gives the same image whatever TF's global seed.
Images are uint8 (H, W, 3) unless said otherwise. `kind` says how a record holds its image: 'encoded' bytes,
'path' to a file, or 'raw' uint8 pixels.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import tensorflow as tf

from s2mlp.augment_chain import RANDAUGMENT_OPS, Op, RandAugmentSpec
from s2mlp.preprocessing import fill_colour

# ---------------------------------------------------------------- decoding, cropping, resizing
# libjpeg's accurate integer DCT, as PIL (timm's and DeiT's loader, and the predictor) decodes JPEGs: TF's default,
# the fast one, differs by up to ~6 grey levels in a quarter of the pixels at no gain in speed (measured: same ms).
JPEG_DCT = "INTEGER_ACCURATE"


def decode(image, kind):
    """Record image -> uint8 (H, W, 3)."""
    if kind == "path":
        image = tf.io.read_file(image)
    if kind == "raw":
        return image
    return tf.cond(
        tf.io.is_jpeg(image),
        lambda: tf.io.decode_jpeg(image, channels=3, dct_method=JPEG_DCT),
        lambda: tf.io.decode_image(image, channels=3, expand_animations=False),
    )


def crop_window(shape, key, area_min):
    """Inception's window, as big_vision and vision_transformer draw it: TF's sample_distorted_bounding_box."""
    return tf.image.stateless_sample_distorted_bounding_box(
        shape,
        tf.zeros([1, 0, 4]),
        seed=key,
        min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(area_min, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )[:2]  # (begin, size)


def rrc_window(shape, key, area_min):
    """timm's (and torchvision's) RandomResizedCrop window, DeiT's: `rrc_window_of` with stateless draws."""
    keys = tf.random.experimental.stateless_split(key, 2)
    area_u, ratio_u = tf.unstack(tf.random.stateless_uniform([2, RRC_ATTEMPTS], keys[0], dtype=tf.float64))
    offset_u = tf.random.stateless_uniform([2], keys[1], dtype=tf.float64)
    return rrc_window_of(shape, area_min, area_u, ratio_u, offset_u)


RRC_ATTEMPTS = 10
RRC_RATIOS = (3 / 4, 4 / 3)


def rrc_window_of(shape, area_min, area_u, ratio_u, offset_u):
    """timm's RandomResizedCropAndInterpolation.get_params on uniform [0, 1) draws: attempt k takes area
    (area_min + (1 - area_min)·area_u[k]) of the image and aspect exp(log 3/4 + log(16/9)·ratio_u[k]) (log-uniform),
    rounds width and height (halves to even); the first that fits (and is not empty, as torchvision checks) starts
    at floor(offset_u · (free pixels + 1)); if none of the 10 fits, the centre crop of the whole image clamped to
    the aspect range. (begin, size) as tf.slice takes them."""
    h, w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    low, high = RRC_RATIOS
    area = (area_min + (1.0 - area_min) * area_u) * (h * w)  # timm's order of operations, to the last bit
    ratio = tf.exp(math.log(low) + (math.log(high) - math.log(low)) * ratio_u)
    cw, ch = tf.round(tf.sqrt(area * ratio)), tf.round(tf.sqrt(area / ratio))
    fits = (cw >= 1) & (cw <= w) & (ch >= 1) & (ch <= h)  # torchvision's test (timm's lacks the >= 1: an empty crop)
    k = tf.argmax(tf.cast(fits, tf.int32))  # the first attempt that fits
    fallback_w = tf.where(w / h > high, tf.round(h * high), w)
    fallback_h = tf.where(w / h < low, tf.round(w / low), h)
    found = tf.reduce_any(fits)
    ch, cw = tf.where(found, ch[k], fallback_h), tf.where(found, cw[k], fallback_w)
    top = tf.where(found, tf.floor(offset_u[0] * (h - ch + 1)), tf.floor((h - ch) / 2))
    left = tf.where(found, tf.floor(offset_u[1] * (w - cw + 1)), tf.floor((w - cw) / 2))
    begin, size = tf.cast(tf.stack([top, left]), tf.int32), tf.cast(tf.stack([ch, cw]), tf.int32)
    return tf.concat([begin, [0]], 0), tf.concat([size, [-1]], 0)


def decode_inception_crop(image, kind, key, area_min, window=crop_window):
    """A random crop of area `area_min`..1 of the image, aspect 3/4..4/3 (`window`: `crop_window`, TF's sampler, or
    `rrc_window`, timm's); JPEGs decode only the window."""
    if kind == "path":
        image = tf.io.read_file(image)
    if kind == "raw":
        begin, size = window(tf.shape(image), key, area_min)
        return tf.slice(image, begin, size)

    def jpeg():
        begin, size = window(tf.image.extract_jpeg_shape(image), key, area_min)
        window_ = tf.stack([begin[0], begin[1], size[0], size[1]])
        return tf.image.decode_and_crop_jpeg(image, window_, channels=3, dct_method=JPEG_DCT)

    def other():
        decoded = tf.io.decode_image(image, channels=3, expand_animations=False)
        begin, size = window(tf.shape(decoded), key, area_min)
        return tf.slice(decoded, begin, size)

    return tf.cond(tf.io.is_jpeg(image), jpeg, other)


def resize(image, size, method: str = "bicubic") -> tf.Tensor:
    """uint8 (H, W, 3) -> uint8 (size[0], size[1], 3): 'bicubic' with antialiasing like timm's PIL resize, or
    'bilinear' without (tf.image.resize's default). An image already of that size is returned as it is (the same
    pixels either resize gives, without the work)."""

    def resized():
        return _u8(tf.image.resize(image, size, method=method, antialias=method == "bicubic"))

    same = tf.reduce_all(tf.equal(tf.shape(image)[:2], tf.cast(size, tf.int32)))
    out = tf.cond(same, lambda: image, resized)
    return tf.ensure_shape(out, [*size, 3]) if isinstance(size, list) else out


def centre_offset(d):
    """Where a centre crop d pixels smaller starts: torchvision's CenterCrop, int(round(d / 2)), halves to even."""
    return tf.cast(tf.round(tf.cast(d, tf.float64) / 2), d.dtype)


def eval_image(image, kind, size: int, crop_pct: float):
    """Eval: resize the shorter side to size / crop_pct, centre-crop size x size; raw records (the digits, IDX
    files: `s2mlp.preprocessing.WHOLE_IMAGE_SOURCES`) are resized whole."""
    s = size
    image = decode(image, kind)
    if kind == "raw":
        return resize(image, [s, s])
    hw = tf.shape(image)[:2]
    short = math.floor(s / crop_pct)  # torchvision Resize(short): long side truncated
    new = tf.where(hw[0] <= hw[1], tf.stack([short, hw[1] * short // hw[0]]), tf.stack([hw[0] * short // hw[1], short]))
    top_left = centre_offset(new - s)

    def crop_of_resized():
        # tf.image.resize's antialiased bicubic (ScaleAndTranslate, `resize`), computed for the centre crop only: each
        # output pixel samples the image where the whole resize puts it (1.4× the images/s of resizing it all, then
        # cropping; BENCHMARKS.md). The sample points are computed with the crop's offset in another float order:
        # about 1 value in 10,000 differs by one grey level from the whole resize's crop (BENCHMARKS.md).
        images, offset = tf.cast(image, tf.float32)[None], -tf.cast(top_left, tf.float32)
        scale = tf.cast(new, tf.float32) / tf.cast(hw, tf.float32)
        out = tf.raw_ops.ScaleAndTranslate(
            images=images, size=[s, s], scale=scale, translation=offset, kernel_type="keyscubic", antialias=True
        )
        return _u8(out[0])

    def crop():  # the shorter side is already short: no resize (the same pixels, without the work)
        return tf.slice(image, tf.concat([top_left, [0]], 0), [s, s, 3])

    return tf.ensure_shape(tf.cond(tf.reduce_all(tf.equal(hw, new)), crop, crop_of_resized), [s, s, 3])


# ---------------------------------------------------------------- RandAugment (timm semantics, stateless)
def _u8(x):
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def _grey(f):  # PIL 'L' of float (H, W, 3) -> (H, W, 1)
    return tf.round(tf.reduce_sum(f * tf.constant([0.299, 0.587, 0.114]), -1, keepdims=True))


def _blend(degenerate, f, factor):  # PIL ImageEnhance: degenerate + factor * (image - degenerate)
    return _u8(degenerate + factor * (f - degenerate))


def _sharpness(f, factor):
    kernel = tf.tile(tf.constant([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]])[:, :, None, None] / 13.0, [1, 1, 3, 1])
    smooth = tf.round(tf.nn.depthwise_conv2d(f[None], kernel, [1, 1, 1, 1], "VALID")[0])
    interior = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]]) > 0  # PIL keeps the border pixels
    return _blend(tf.where(interior, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), f), f, factor)


def _posterize(f, bits):
    """Keeps the top `bits` (0..8) bits of each pixel: f - f mod 2^(8 - bits), as a mask on the uint8 values."""
    dropped = tf.cast(8.0 - tf.clip_by_value(bits, 0.0, 8.0), tf.int32)
    mask = tf.cast(tf.bitwise.bitwise_and(tf.bitwise.left_shift(255, dropped), 255), tf.uint8)
    return tf.bitwise.bitwise_and(tf.cast(f, tf.uint8), mask)


def _equalize(image):
    def channel(c):  # PIL ImageOps.equalize on one uint8 channel
        v = tf.cast(tf.reshape(c, [-1]), tf.int32)
        hist = tf.math.bincount(v, minlength=256, maxlength=256)
        step = (tf.reduce_sum(hist) - tf.gather(hist, tf.reduce_max(v))) // 255
        lut = tf.minimum((tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1), 255)
        return tf.cast(tf.where(step > 0, tf.reshape(tf.gather(lut, v), tf.shape(c)), tf.cast(c, tf.int32)), tf.uint8)

    return tf.stack([channel(image[..., i]) for i in range(3)], -1)


def _affine(f, matrix, fill):
    """Output pixel (x, y) samples the input at (a x + b y + c, d x + e y + f), bilinearly; outside -> `fill` (RGB).

    The share of each output pixel that came from inside the image (the bilinear interpolation of an all-ones
    image with 0 outside) weights the fill. It is computed in closed form, with the float32 operations of TF's
    ImageProjectiveTransformV3 in its order, rather than as a 4th channel through the transform: the same values
    (tests pin them against the 4-channel form), ~4x faster."""
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=f[None],
        transforms=tf.concat([tf.stack(matrix), [0.0, 0.0]], 0)[None],
        output_shape=tf.shape(f)[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )[0]
    return _u8(out + (1.0 - _inside(tf.shape(f)[0], tf.shape(f)[1], matrix)) * fill)


def _inside(height, width, matrix):
    """(H, W, 1): bilinear interpolation, at each output pixel's sample point, of 1 inside the image and 0 outside."""
    a, b, c, d, e, f = (tf.cast(m, tf.float32) for m in matrix)
    oy = tf.cast(tf.range(height), tf.float32)[:, None]
    ox = tf.cast(tf.range(width), tf.float32)[None, :]
    x, y = (a * ox + b * oy) + c, (d * ox + e * oy) + f
    x0, y0 = tf.floor(x), tf.floor(y)
    x1, y1 = x0 + 1.0, y0 + 1.0

    def within(v, n):
        return tf.cast((v >= 0.0) & (v < tf.cast(n, tf.float32)), tf.float32)

    in_x0, in_x1, in_y0, in_y1 = within(x0, width), within(x1, width), within(y0, height), within(y1, height)
    top = (x1 - x) * (in_y0 * in_x0) + (x - x0) * (in_y0 * in_x1)
    bottom = (x1 - x) * (in_y1 * in_x0) + (x - x0) * (in_y1 * in_x1)
    return ((y1 - y) * top + (y - y0) * bottom)[..., None]


def _rotate(f, degrees, fill):
    h, w = tf.cast(tf.shape(f)[0], tf.float32), tf.cast(tf.shape(f)[1], tf.float32)
    cy, cx, rad = (h - 1) / 2, (w - 1) / 2, degrees * math.pi / 180
    c, s = tf.cos(rad), tf.sin(rad)
    return _affine(f, [c, s, cx - c * cx - s * cy, -s, c, cy + s * cx - c * cy], fill)


_OP_FNS = {  # (float image (H, W, 3) in 0..255, op argument, fill RGB) -> uint8 image
    "AutoContrast": lambda f, a, fill: _u8(
        tf.math.divide_no_nan(f - tf.reduce_min(f, [0, 1]), tf.reduce_max(f, [0, 1]) - tf.reduce_min(f, [0, 1])) * 255.0
        + tf.where(tf.reduce_max(f, [0, 1]) > tf.reduce_min(f, [0, 1]), 0.0, f)
    ),
    "Equalize": lambda f, a, fill: _equalize(_u8(f)),
    "Invert": lambda f, a, fill: _u8(255.0 - f),
    "Rotate": _rotate,
    "Posterize": lambda f, a, fill: _posterize(f, a),
    "Solarize": lambda f, a, fill: _u8(tf.where(f < a, f, 255.0 - f)),
    "SolarizeAdd": lambda f, a, fill: _u8(tf.where(f < 128.0, tf.minimum(f + a, 255.0), f)),
    "Color": lambda f, a, fill: _blend(_grey(f), f, a),
    "Contrast": lambda f, a, fill: _blend(tf.floor(tf.reduce_mean(_grey(f)) + 0.5), f, a),
    "Brightness": lambda f, a, fill: _blend(0.0, f, a),
    "Sharpness": lambda f, a, fill: _sharpness(f, a),
    "ShearX": lambda f, a, fill: _affine(f, [1.0, a, 0.0, 0.0, 1.0, 0.0], fill),
    "ShearY": lambda f, a, fill: _affine(f, [1.0, 0.0, 0.0, a, 1.0, 0.0], fill),
    "TranslateXRel": lambda f, a, fill: _affine(
        f, [1.0, 0.0, a * tf.cast(tf.shape(f)[1], tf.float32), 0.0, 1.0, 0.0], fill
    ),
    "TranslateYRel": lambda f, a, fill: _affine(
        f, [1.0, 0.0, 0.0, 0.0, 1.0, a * tf.cast(tf.shape(f)[0], tf.float32)], fill
    ),
}


def _op_argument(name, level, sign, increasing):
    """timm's level -> argument maps; level = magnitude / 10 and sign = +-1 at random."""
    if name == "Rotate":
        return 30.0 * level * sign
    if name == "Posterize":  # bits kept
        return 4.0 - tf.floor(4.0 * level) if increasing else tf.floor(4.0 * level)
    if name == "Solarize":  # threshold
        return 256.0 - tf.floor(256.0 * level) if increasing else tf.floor(256.0 * level)
    if name == "SolarizeAdd":
        return tf.floor(110.0 * level)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):  # enhancement factor, 1 = identity
        return 1.0 + 0.9 * level * sign if increasing else 1.8 * level + 0.1
    if name in ("ShearX", "ShearY"):
        return 0.3 * level * sign
    if name in ("TranslateXRel", "TranslateYRel"):  # fraction of the image size
        return 0.45 * level * sign
    return tf.constant(0.0)


def randaugment_op(image, name: str, magnitude, seed, *, fill=(128.0, 128.0, 128.0), increasing=False):
    """Applies one timm RandAugment op at `magnitude` (0..10) to uint8 (H, W, 3); returns uint8 (H, W, 3)."""
    level = tf.cast(magnitude, tf.float32) / 10.0
    sign = tf.where(tf.random.stateless_uniform([], seed) < 0.5, -1.0, 1.0)
    f = tf.cast(image, tf.float32)
    return _OP_FNS[name](f, _op_argument(name, level, sign, increasing), tf.constant(fill, tf.float32))


def randaugment(image, spec: RandAugmentSpec, seed, fill):
    """timm RandAugment on uint8 (H, W, 3): `num_ops` ops drawn with replacement, each applied with probability
    `spec.prob` at a magnitude ~ N(m, mstd) clipped to [0, mmax] (uniform(0, m) when mstd is inf)."""

    def layer(i, image):
        k = tf.unstack(tf.random.experimental.stateless_split(tf.random.experimental.stateless_fold_in(seed, i), 4))
        op = tf.random.stateless_uniform([], k[0], 0, len(RANDAUGMENT_OPS), dtype=tf.int32)
        if math.isinf(spec.magnitude_std):
            mag = tf.random.stateless_uniform([], k[1], 0.0, spec.magnitude)
        else:
            mag = spec.magnitude + spec.magnitude_std * tf.random.stateless_normal([], k[1])
        mag = tf.clip_by_value(mag, 0.0, spec.magnitude_max)
        branches = [
            functools.partial(randaugment_op, image, name, mag, k[3], fill=fill, increasing=spec.increasing)
            for name in RANDAUGMENT_OPS
        ] + [lambda: image]  # the last branch: op not applied
        op = tf.where(tf.random.stateless_uniform([], k[2]) < spec.prob, op, len(RANDAUGMENT_OPS))
        return i + 1, tf.ensure_shape(tf.switch_case(op, branches), image.shape)

    # A loop, not a Python for: the 15 branches are traced once whatever num_ops is.
    return tf.while_loop(lambda i, _: i < spec.num_ops, layer, (tf.constant(0), image))[1]


def random_erase(x, prob: float, seed):
    """timm RandomErasing 'pixel' mode on normalised float (H, W, 3): with probability `prob`, one rectangle
    of area 2%..1/3 and aspect 0.3..3.3 (10 tries) is filled with N(0, 1) noise per pixel and channel."""
    k = tf.unstack(tf.random.experimental.stateless_split(seed, 6))
    h_img, w_img = tf.shape(x)[0], tf.shape(x)[1]
    area = tf.random.stateless_uniform([10], k[0], 0.02, 1 / 3) * tf.cast(h_img * w_img, tf.float32)
    ratio = tf.exp(tf.random.stateless_uniform([10], k[1], math.log(0.3), math.log(1 / 0.3)))
    hs, ws = tf.cast(tf.round(tf.sqrt(area * ratio)), tf.int32), tf.cast(tf.round(tf.sqrt(area / ratio)), tf.int32)
    fits = (hs < h_img) & (ws < w_img)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    h, w = tf.where(tf.reduce_any(fits), hs[first], 0), tf.where(tf.reduce_any(fits), ws[first], 0)  # none: erase none
    top = tf.random.stateless_uniform([], k[2], 0, h_img - h + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], k[3], 0, w_img - w + 1, dtype=tf.int32)
    rows, cols = tf.range(h_img)[:, None, None], tf.range(w_img)[None, :, None]
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    erase = (tf.random.stateless_uniform([], k[4]) < prob) & tf.reduce_any(fits)
    # The noise is drawn only for an image that is erased (a quarter of them at prob 0.25): the same values.
    return tf.cond(erase, lambda: tf.where(inside, tf.random.stateless_normal(tf.shape(x), k[5]), x), lambda: x)


# ---------------------------------------------------------------- the chain's ops on the host (s2mlp/augment_chain.py)
@dataclasses.dataclass(frozen=True)
class Context:
    """What the ops of a chain read besides their arguments."""

    kind: str  # how a record holds its image: 'encoded', 'path' or 'raw'
    size: int  # config.image_size
    mean: np.ndarray  # config.data.normalization, per channel
    std: np.ndarray


def _flip(image, key):
    # tf.reverse, not image[:, ::-1]: the same pixels, ~9x faster (a negative-stride slice is a slow path in TF).
    return tf.cond(tf.random.stateless_uniform([], key) < 0.5, lambda: tf.reverse(image, [1]), lambda: image)


def normalize(image, mean: np.ndarray, std: np.ndarray):
    """uint8 (H, W, 3) of a static size -> float32 (x - mean) / std. mean and std are spread to the image's shape first:
    the same float32 arithmetic per element, ~3x faster than TF's broadcast of a (3,) vector."""
    shape = image.shape.as_list()
    if None not in shape:
        mean, std = np.broadcast_to(mean, shape), np.broadcast_to(std, shape)
    return (tf.cast(image, tf.float32) - mean) / std


def pad_crop(image, key, padding: int):
    """uint8 (H, W, C) -> (H, W, C): zero-padded by `padding` on every side, then cropped back at a uniform offset."""
    shape = tf.shape(image)
    offset = tf.random.stateless_uniform([2], key, 0, 2 * padding + 1, dtype=tf.int32)
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    return tf.slice(padded, tf.concat([offset, [0]], 0), shape)


HOST_OPS = {  # name -> (image, key, context, **arguments) -> image
    "inception_crop": lambda image, key, c, area_min, method: resize(
        decode_inception_crop(image, c.kind, key, area_min), [c.size, c.size], method
    ),
    "random_resized_crop": lambda image, key, c, area_min, method: resize(
        decode_inception_crop(image, c.kind, key, area_min, rrc_window), [c.size, c.size], method
    ),
    "resize": lambda image, key, c, method: resize(decode(image, c.kind), [c.size, c.size], method),
    "flip": lambda image, key, c: _flip(image, key),
    "pad_crop": lambda image, key, c, padding: tf.ensure_shape(pad_crop(image, key, padding), image.shape),
    "randaugment": lambda image, key, c, spec: randaugment(image, spec, key, fill_colour(c.mean)),
    "normalize": lambda image, key, c: normalize(image, c.mean, c.std),
    "erase": lambda image, key, c, prob: random_erase(image, prob, key) if prob > 0 else image,
}


def apply(ops: tuple[Op, ...], image, key, context: Context):
    """Runs the host ops of a chain on one record; op slot s < 4 draws from key `s` of split(key, 4), a slot >= 4
    from fold_in(key, s)."""
    keys = tf.unstack(tf.random.experimental.stateless_split(key, 4))
    for op in ops:
        slot = op.spec.slot
        op_key = None if slot < 0 else keys[slot] if slot < 4 else tf.random.experimental.stateless_fold_in(key, slot)
        image = HOST_OPS[op.name](image, op_key, context, **op.kwargs)
    return image
