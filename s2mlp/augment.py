"""RandAugment and random erasing on device, inside the jitted train step: a JAX port of `image_ops.py`.

The host pipeline (`image_ops.py`, TensorFlow) implements timm's RandAugment (15 ops with PIL semantics) and
RandomErasing ('pixel' mode) with explicit stateless seeds. This module computes the same ops with the same float32
arithmetic in JAX, so augmentation can run on the accelerator instead. ``apply_op(image, name, argument, fill)`` is
``image_ops._OP_FNS[name]``: the pixel and enhance ops give TF's pixels exactly, and so do the geometric ops (sampled
like TF's ``ImageProjectiveTransformV3``: `_affine`) except Rotate, whose cos/sin may differ from TF's in the last bit
(then an output pixel can differ by 1; tests/test_augment.py pins the tolerances). ``randaugment`` and
``random_erase`` follow the distributions of ``image_ops.randaugment`` and ``image_ops.random_erase``, not their
random streams (JAX keys, not TF seeds). ``DEVICE_OPS`` and ``apply`` run the ops of a config.augment.ops chain
after its ``to_device`` (s2mlp/augment_chain.py registers them), as the train step does.

Exactness against TF needs TF's roundings. XLA fuses ``a * b + c`` into one FMA (rounded once, where TF rounds the
product and then the sum) and turns division by a constant into multiplication by its reciprocal; both move
results that land near a rounding tie (common: factors like 1.9 times integer pixel differences hit x.5). So
products that feed a sum go through ``_rounded`` and the two divisions by constants (Contrast's mean, the
Sharpness filter) are done exactly in integers. Verified on XLA:CPU (tests/test_augment.py fails without
``_rounded``); on GPU, where LLVM contracts as well, the same barriers apply but are untested here.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from s2mlp.augment_chain import RANDAUGMENT_OPS
from s2mlp.preprocessing import fill_colour, mean_std

IDENTITY = len(RANDAUGMENT_OPS)  # the op index of "not applied" in `draw_ops`
_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_FILL = (128.0, 128.0, 128.0)


# ---------------------------------------------------------------- float32 like TF
def _rounded(x: jax.Array) -> jax.Array:
    """x, rounded to float32 before it is used: an identity (NaN -> 0) that keeps XLA from fusing a product into the
    sum that consumes it (an FMA rounds once; TF rounds the product, then the sum)."""
    return jnp.where(x == x, x, 0.0)


def _u8(x: jax.Array) -> jax.Array:
    """float -> uint8: round half to even (as tf.round), clip to 0..255."""
    return jnp.clip(jnp.round(x), 0.0, 255.0).astype(jnp.uint8)


def _grey(f: jax.Array) -> jax.Array:
    """float (H, W, 3) -> (H, W, 1): PIL 'L', round(0.299 R + 0.587 G + 0.114 B) summed in that order."""
    p = _rounded(f * jnp.array([0.299, 0.587, 0.114], jnp.float32))
    return jnp.round(p[..., 0] + p[..., 1] + p[..., 2])[..., None]


def _blend(degenerate: jax.Array, f: jax.Array, factor: jax.Array) -> jax.Array:
    """PIL ImageEnhance: degenerate + factor * (image - degenerate) -> uint8."""
    return _u8(degenerate + _rounded(factor * (f - degenerate)))


# ---------------------------------------------------------------- the pixel ops
def _autocontrast(f: jax.Array) -> jax.Array:
    """Each channel stretched to 0..255 (unchanged where it is constant)."""
    low, high = f.min((0, 1)), f.max((0, 1))
    span = high - low
    return _u8(jnp.where(span > 0, (f - low) / jnp.where(span > 0, span, 1.0) * 255.0, f))


def _equalize_channel(c: jax.Array) -> jax.Array:
    """PIL ImageOps.equalize on one uint8 (H, W) channel (integer LUT, exact)."""
    v = c.reshape(-1).astype(jnp.int32)
    hist = jnp.bincount(v, length=256)
    step = (v.size - hist[v.max()]) // 255
    lut = jnp.minimum((jnp.cumsum(hist) - hist + step // 2) // jnp.maximum(step, 1), 255)
    return jnp.where(step > 0, lut[c.astype(jnp.int32)], c.astype(jnp.int32)).astype(jnp.uint8)


def _posterize(f: jax.Array, bits: jax.Array) -> jax.Array:
    """Keeps the top `bits` (clipped to 0..8) bits of each value."""
    e = 8.0 - jnp.clip(bits, 0.0, 8.0)
    step = jnp.where(e == jnp.floor(e), jnp.ldexp(jnp.float32(1.0), e.astype(jnp.int32)), jnp.power(2.0, e))
    return _u8(f - jnp.mod(f, step))


def _contrast_degenerate(f: jax.Array) -> jax.Array:
    """PIL's int(mean grey + 0.5), in integers: TF's float32 reduce_mean gives the same whenever H * W < 2**15."""
    grey = _grey(f).astype(jnp.int32)
    n = grey.size
    return ((2 * grey.sum() + n) // (2 * n)).astype(jnp.float32)


def _sharpness_degenerate(f: jax.Array) -> jax.Array:
    """PIL's SMOOTH filter ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded) inside, the image on its 1-pixel border.
    In integers: round(n / 13) is never a tie, so TF's float convolution rounds to the same value."""
    h, w = f.shape[:2]
    x = f.astype(jnp.int32)
    padded = jnp.pad(x, ((1, 1), (1, 1), (0, 0)))
    window = sum(padded[i : i + h, j : j + w] for i in range(3) for j in range(3))
    smooth = ((2 * (window + 4 * x) + 13) // 26).astype(jnp.float32)
    rows, cols = jnp.arange(h)[:, None, None], jnp.arange(w)[None, :, None]
    interior = (rows > 0) & (rows < h - 1) & (cols > 0) & (cols < w - 1)
    return jnp.where(interior, smooth, f)


_DEGENERATE = {  # the enhance ops: the image each blends with (factor 1 = identity), broadcastable to (H, W, 3)
    "Color": _grey,
    "Contrast": _contrast_degenerate,
    "Brightness": lambda f: jnp.zeros((), jnp.float32),
    "Sharpness": _sharpness_degenerate,
}


# ---------------------------------------------------------------- the geometric ops
def _affine(f: jax.Array, matrix, fill: jax.Array) -> jax.Array:
    """Output pixel (x, y) samples the input at (a x + b y + c, d x + e y + f) bilinearly, TF's
    ImageProjectiveTransformV3: integer pixel coordinates (pixel (x, y) is the point (x, y)), neighbours outside the
    image read as 0, and a 4th channel of ones records how much of each output came from inside; the rest is `fill`.
    float (H, W, 3) -> uint8 (H, W, 3)."""
    h, w = f.shape[:2]
    a, b, c, d, e, g = (jnp.asarray(m, jnp.float32) for m in matrix)
    image = jnp.concatenate([f, jnp.ones_like(f[..., :1])], -1)
    ys, xs = jnp.arange(h, dtype=jnp.float32)[:, None], jnp.arange(w, dtype=jnp.float32)[None, :]
    x = _rounded(a * xs) + _rounded(b * ys) + c  # (H, W), in TF's order
    y = _rounded(d * xs) + _rounded(e * ys) + g
    x0, y0 = jnp.floor(x), jnp.floor(y)
    x1, y1 = x0 + 1.0, y0 + 1.0

    def read(yy, xx):  # (H, W, 4); 0 outside
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        yi, xi = jnp.clip(yy, 0, h - 1).astype(jnp.int32), jnp.clip(xx, 0, w - 1).astype(jnp.int32)
        return jnp.where(inside[..., None], image[yi, xi], 0.0)

    def lerp(w0, v0, w1, v1):
        return _rounded(w0[..., None] * v0) + _rounded(w1[..., None] * v1)

    top = lerp(x1 - x, read(y0, x0), x - x0, read(y0, x1))
    bottom = lerp(x1 - x, read(y1, x0), x - x0, read(y1, x1))
    out = lerp(y1 - y, top, y - y0, bottom)
    return _u8(out[..., :3] + _rounded((1.0 - out[..., 3:]) * fill))


def _matrix(name: str, argument: jax.Array, height: int, width: int) -> list[jax.Array]:
    """The inverse map (a, b, c, d, e, f) of a geometric op; the identity for the other ops."""
    one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
    if name == "Rotate":  # about the centre ((W - 1) / 2, (H - 1) / 2); positive degrees turn the image clockwise
        cy, cx = (height - 1) / 2, (width - 1) / 2
        rad = argument * math.pi / 180
        c, s = jnp.cos(rad), jnp.sin(rad)
        return [c, s, cx - _rounded(c * cx) - _rounded(s * cy), -s, c, cy + _rounded(s * cx) - _rounded(c * cy)]
    if name == "ShearX":
        return [one, argument, zero, zero, one, zero]
    if name == "ShearY":
        return [one, zero, zero, argument, one, zero]
    if name == "TranslateXRel":
        return [one, zero, argument * width, zero, one, zero]
    if name == "TranslateYRel":
        return [one, zero, zero, zero, one, argument * height]
    return [one, zero, zero, zero, one, zero]


# ---------------------------------------------------------------- one op
_PIXEL_OPS = {  # the non-geometric, non-enhance ops: (float (H, W, 3), argument) -> uint8 (H, W, 3)
    "AutoContrast": lambda f, _: _autocontrast(f),
    "Equalize": lambda f, _: jnp.stack([_equalize_channel(c) for c in _u8(f).transpose(2, 0, 1)], -1),
    "Invert": lambda f, _: _u8(255.0 - f),
    "Posterize": _posterize,
    "Solarize": lambda f, threshold: _u8(jnp.where(f < threshold, f, 255.0 - f)),
    "SolarizeAdd": lambda f, added: _u8(jnp.where(f < 128.0, jnp.minimum(f + added, 255.0), f)),
}


def apply_op(image: jax.Array, name: str, argument, fill=_FILL) -> jax.Array:
    """One RandAugment op with its explicit argument on uint8 (H, W, 3) -> uint8 (H, W, 3).

    `argument` is what `op_argument` gives: degrees (Rotate), bits kept (Posterize), threshold (Solarize), the
    value added (SolarizeAdd), the enhancement factor, 1 = identity (Color, Contrast, Brightness, Sharpness), the
    shear (ShearX/Y), the fraction of the width/height moved (TranslateXRel/YRel); AutoContrast, Equalize and
    Invert ignore it. `fill` (3 floats, RGB) fills what the geometric ops bring in from outside the image.
    Equal to ``image_ops._OP_FNS[name](float image, argument, fill)`` (see the module docstring)."""
    f = image.astype(jnp.float32)
    argument = jnp.asarray(argument, jnp.float32)
    if name in _GEOMETRIC:
        return _affine(f, _matrix(name, argument, *image.shape[:2]), jnp.asarray(fill, jnp.float32))
    if name in _DEGENERATE:
        return _blend(_DEGENERATE[name](f), f, argument)
    if name not in _PIXEL_OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; the ops are {RANDAUGMENT_OPS}")
    return _PIXEL_OPS[name](f, argument)


def op_argument(name: str, level, sign, increasing: bool) -> jax.Array:
    """timm's level -> argument map (image_ops._op_argument): level = magnitude / 10, sign = +-1."""
    level, sign = jnp.asarray(level, jnp.float32), jnp.asarray(sign, jnp.float32)
    if name == "Rotate":
        return 30.0 * level * sign
    if name == "Posterize":  # bits kept
        return 4.0 - jnp.floor(4.0 * level) if increasing else jnp.floor(4.0 * level)
    if name == "Solarize":  # threshold
        return 256.0 - jnp.floor(256.0 * level) if increasing else jnp.floor(256.0 * level)
    if name == "SolarizeAdd":
        return jnp.floor(110.0 * level)
    if name in _DEGENERATE:  # the enhance factor
        return 1.0 + 0.9 * level * sign if increasing else _rounded(1.8 * level) + 0.1
    if name in ("ShearX", "ShearY"):
        return 0.3 * level * sign
    if name in ("TranslateXRel", "TranslateYRel"):  # fraction of the width / height
        return 0.45 * level * sign
    return jnp.zeros_like(level * sign)  # AutoContrast, Equalize, Invert take none


# ---------------------------------------------------------------- RandAugment
# apply_drawn computes these candidates and selects one: _CASE[op index] says which.
_CASE = np.array(
    [list(_PIXEL_OPS).index(n) if n in _PIXEL_OPS else len(_PIXEL_OPS) + (n in _GEOMETRIC) for n in RANDAUGMENT_OPS]
    + [len(_PIXEL_OPS) + 2]  # IDENTITY: the image
)


def apply_drawn(image: jax.Array, index: jax.Array, argument: jax.Array, fill=_FILL) -> jax.Array:
    """RANDAUGMENT_OPS[index] (IDENTITY: none) on uint8 (H, W, 3) with a traced op index: what `apply_op` gives.

    Under vmap a `lax.switch` over the 16 branches would compute all of them for every image; here the cost is
    shared instead: the five geometric ops are one affine resampling with the drawn op's matrix, the four enhance
    ops one blend with the drawn op's degenerate image, and only the six cheap pixel ops are each computed; one of
    these candidates (or the image) is then selected."""
    h, w = image.shape[:2]
    f = image.astype(jnp.float32)
    argument = jnp.asarray(argument, jnp.float32)
    matrices = jnp.stack([jnp.stack(_matrix(n, argument, h, w)) for n in RANDAUGMENT_OPS + ("identity",)])
    geometric = _affine(f, list(matrices[index]), jnp.asarray(fill, jnp.float32))
    degenerates = [jnp.broadcast_to(degenerate(f), f.shape) for degenerate in _DEGENERATE.values()]
    enhance_index = jnp.clip(index - RANDAUGMENT_OPS.index("Color"), 0, len(_DEGENERATE) - 1)  # in the same order
    enhanced = _blend(jax.lax.select_n(enhance_index, *degenerates), f, argument)
    pixel = [op(f, argument) for op in _PIXEL_OPS.values()]
    return jax.lax.select_n(jnp.asarray(_CASE)[index], *pixel, enhanced, geometric, image)


def draw_ops(
    key: jax.Array,
    *,
    num_ops: int = 2,
    magnitude: float = 9.0,
    magnitude_std: float = 0.0,
    magnitude_max: float = 10.0,
    prob: float = 0.5,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One example's RandAugment draws, of the distribution `augment_chain.RandAugmentSpec` describes: op indices
    (num_ops,) int32 (IDENTITY where the op is not applied), magnitudes (num_ops,) in [0, magnitude_max] and signs
    (num_ops,) +-1. Layer i uses split(fold_in(key, i), 4): the op, the magnitude, whether to apply it, the sign."""

    def layer(i):
        k = jax.random.split(jax.random.fold_in(key, i), 4)
        op = jax.random.randint(k[0], (), 0, len(RANDAUGMENT_OPS))
        if math.isinf(magnitude_std):
            mag = jax.random.uniform(k[1], (), jnp.float32, 0.0, magnitude)
        else:
            mag = magnitude + magnitude_std * jax.random.normal(k[1], (), jnp.float32)
        mag = jnp.clip(mag, 0.0, magnitude_max)
        op = jnp.where(jax.random.uniform(k[2]) < prob, op, IDENTITY)
        sign = jnp.where(jax.random.uniform(k[3]) < 0.5, -1.0, 1.0)
        return op, mag, sign

    return jax.vmap(layer)(jnp.arange(num_ops))


def randaugment(
    images: jax.Array,
    keys: jax.Array,
    *,
    num_ops: int = 2,
    magnitude: float = 9.0,
    magnitude_std: float = 0.0,
    magnitude_max: float = 10.0,
    increasing: bool = False,
    prob: float = 0.5,
    fill=_FILL,
) -> jax.Array:
    """timm RandAugment on uint8 (B, H, W, 3) -> uint8 (B, H, W, 3), each example with its own key (keys: (B,) typed
    or (B, 2) raw uint32), its ops drawn by `draw_ops`; `increasing` picks timm's '*Increasing' ops. The settings
    are Python values (static under jit). Every image pays for every op (vmap turns the per-example choice into a
    select): see `apply_drawn` for how the 16 branches are shared."""
    if num_ops == 0 or prob <= 0:
        return images

    def one(image, key):
        ops, mags, signs = draw_ops(
            key,
            num_ops=num_ops,
            magnitude=magnitude,
            magnitude_std=magnitude_std,
            magnitude_max=magnitude_max,
            prob=prob,
        )

        def layer(i, image):
            # XLA: mags[i] * float32(0.1), 1 ulp off TF's division at m = 9; the same integer arguments.
            level = mags[i] / 10.0
            arguments = jnp.stack([op_argument(n, level, signs[i], increasing) for n in RANDAUGMENT_OPS] + [level])
            return apply_drawn(image, ops[i], arguments[ops[i]], fill)

        return jax.lax.fori_loop(0, num_ops, layer, image)

    return jax.vmap(one)(images, keys)


# ---------------------------------------------------------------- random erasing, normalisation, keys
def random_erase(x: jax.Array, keys: jax.Array, prob: float) -> jax.Array:
    """timm RandomErasing, 'pixel' mode, on normalised float (B, H, W, C) -> (B, H, W, C), one key per example.

    With probability `prob`, the first of 10 tries (area uniform in 2%..1/3 of the image, aspect log-uniform in
    0.3..3.3, sides rounded) whose sides are shorter than the image's is placed uniformly and filled with N(0, 1)
    noise per pixel and channel; when no try fits, nothing is erased."""
    if prob <= 0:
        return x
    h_img, w_img = x.shape[1:3]

    def one(x, key):
        k = jax.random.split(key, 6)
        area = jax.random.uniform(k[0], (10,), jnp.float32, 0.02, 1 / 3) * (h_img * w_img)
        ratio = jnp.exp(jax.random.uniform(k[1], (10,), jnp.float32, math.log(0.3), math.log(1 / 0.3)))
        hs = jnp.round(jnp.sqrt(area * ratio)).astype(jnp.int32)
        ws = jnp.round(jnp.sqrt(area / ratio)).astype(jnp.int32)
        fits = (hs < h_img) & (ws < w_img)
        first = jnp.argmax(fits)  # the first try that fits (0 when none does; then nothing is erased)
        h, w = hs[first], ws[first]
        top = jax.random.randint(k[2], (), 0, h_img - h + 1)
        left = jax.random.randint(k[3], (), 0, w_img - w + 1)
        rows, cols = jnp.arange(h_img)[:, None, None], jnp.arange(w_img)[None, :, None]
        inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
        erase = (jax.random.uniform(k[4]) < prob) & fits.any()
        return jnp.where(erase & inside, jax.random.normal(k[5], x.shape, x.dtype), x)

    return jax.vmap(one)(x, keys)


def normalize(images: jax.Array, mean, std) -> jax.Array:
    """uint8 (..., 3) -> float32 (x - mean) / std, per channel (mean and std in 0..255 units)."""
    return (images.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def example_keys(seed: int, step, batch: int, *, offset=0) -> jax.Array:
    """(batch,) typed keys: example i's is fold_in(fold_in(key(seed), step), offset + i), a pure function of the
    seed, the step and the example's index in the global batch. Computed for the global batch (or per shard with
    offset = the shard's first index), the augmentation of an example does not depend on how many devices the
    batch is split over."""
    return _fold_each(jax.random.fold_in(jax.random.key(seed), step), offset + jnp.arange(batch))


def _fold_each(key: jax.Array, data: jax.Array) -> jax.Array:
    """(n,) keys: fold_in(key, data[i])."""
    return jax.vmap(lambda d: jax.random.fold_in(key, d))(data)


# ---------------------------------------------------------------- the chain's device ops (s2mlp/augment_chain.py)
def flip(images: jax.Array, keys: jax.Array) -> jax.Array:
    """Mirrors each (B, H, W, C) image left-right with probability 1/2, one key per example."""
    mirror = jax.vmap(lambda key: jax.random.uniform(key) < 0.5)(keys)
    return jnp.where(mirror[:, None, None, None], images[:, :, ::-1], images)


def pad_crop(images: jax.Array, keys: jax.Array, padding: int) -> jax.Array:
    """Each (H, W, C) image zero-padded by `padding` on every side and cropped back at a uniform offset per example."""
    pad = ((padding, padding), (padding, padding), (0, 0))

    def one(image, key):
        top, left = jax.random.randint(key, (2,), 0, 2 * padding + 1)
        return jax.lax.dynamic_slice(jnp.pad(image, pad), (top, left, 0), image.shape)

    return jax.vmap(one)(images, keys)


DEVICE_OPS = {  # name -> (images, keys (B,), mean, std, **arguments) -> images
    "flip": lambda images, keys, mean, std: flip(images, keys),
    "pad_crop": lambda images, keys, mean, std, padding: pad_crop(images, keys, padding),
    "randaugment": lambda images, keys, mean, std, spec: randaugment(
        images, keys, **dataclasses.asdict(spec), fill=fill_colour(mean)
    ),
    "normalize": lambda images, keys, mean, std: normalize(images, mean, std),
    "erase": lambda images, keys, mean, std, prob: random_erase(images, keys, prob),
}


def apply(ops, images: jax.Array, rng: jax.Array, normalization: str, positions: jax.Array | None = None) -> jax.Array:
    """Runs a chain's device ops (`augment_chain.Chain.device`) on a uint8 (B, H, W, 3) batch inside the train step.

    Example i of the global batch gets the key fold_in(rng, positions[i]) (default: i) and op slot s draws from
    fold_in(that key, s): a function of `rng` (the step's) and the example's position in the stream, not of how
    the batch is sharded or which process read it (`recipe.stream_positions`)."""
    mean, std = mean_std(normalization)
    keys = _fold_each(rng, jnp.arange(images.shape[0]) if positions is None else positions)
    for op in ops:
        slot = op.spec.slot  # < 0: the op draws nothing
        op_keys = keys if slot < 0 else jax.vmap(lambda key, s=slot: jax.random.fold_in(key, s))(keys)
        images = DEVICE_OPS[op.name](images, op_keys, mean, std, **op.kwargs)
    return images
