"""The training augmentation as a chain of registered ops, `config.augment.ops`, in the manner of big_vision's
preprocessing strings:

    random_resized_crop(0.08)|flip|randaugment(2, 9, 0.5, increasing=True)|normalize|erase(0.25)

Each op is registered once, in `OPS`: its arguments (a Python signature; the chain gives literals, positional or
by keyword), the kind of image it takes and gives ('record': the dataset's stored image, 'uint8': pixels at
config.image_size, 'float': normalised), the slot of the example's random key it draws from, and where it can
run. Its host implementation (TensorFlow, in tf.data) is ``image_ops.HOST_OPS[name]``, its device one (JAX,
inside the jitted train step) ``s2mlp.augment.DEVICE_OPS[name]``.

``to_device`` splits the chain: the ops before it run on the host, the ops after it on the device, e.g.

    random_resized_crop(0.08)|flip|to_device|randaugment(2, 9, 0.5, increasing=True)|normalize|erase(0.25)

sends uint8 batches to the device (a quarter of the bytes of float32) and runs RandAugment, the normalisation and
random erasing in the train step, where they cost little next to the model. Host and device draw their random
numbers differently (TensorFlow's and JAX's stateless generators), so moving an op changes which augmentation an
example gets, not its distribution.

Free of TensorFlow and JAX: the config checks and the train step import it.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
from collections.abc import Callable

SEPARATOR = "|"
TO_DEVICE = "to_device"
RANDAUGMENT_OPS = (  # timm's rand_augment_ops, in its order (the host and the device draw by index)
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
    """timm's RandAugment: `num_ops` ops drawn with replacement, each applied with probability `prob`, at a
    magnitude ~ N(magnitude, magnitude_std) clipped to [0, magnitude_max] (uniform(0, magnitude) when the std is
    inf); `increasing`: timm's '_increasing' level maps (its 'inc1')."""

    num_ops: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.0
    magnitude_max: float = 10.0
    increasing: bool = False
    prob: float = 0.5  # timm applies each chosen op with probability 0.5


def _number(value, name: str, low: float, high: float, *, low_open: bool = False, integer: bool = False):
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        kind = "an int" if integer else "a number"
        raise ValueError(f"{name}={value!r} must be {kind} in {'(' if low_open else '['}{low}, {high}].")
    return value


# ---------------------------------------------------------------- the ops' signatures (arguments and their checks)
def _method(method: str) -> str:
    if method not in ("bicubic", "bilinear"):
        raise ValueError(f"method={method!r} must be 'bicubic' (antialiased, DeiT's) or 'bilinear' (no antialiasing).")
    return method


def _inception_crop(area_min=0.08, method="bicubic"):
    """Decodes a random window of area_min..1 of the image area, aspect 3/4..4/3 (Inception's crop; for JPEGs only
    the window is decoded), resized to image_size: 'bicubic' antialiased like PIL's (timm/DeiT's), or 'bilinear'
    without antialiasing (tf.image.resize's default, as big_vision; faster, aliases when it shrinks)."""
    return {"area_min": float(_number(area_min, "area_min", 0.0, 1.0, low_open=True)), "method": _method(method)}


def _random_resized_crop(area_min=0.08, method="bicubic"):
    """timm's RandomResizedCrop window (DeiT's, torchvision's): area uniform in area_min..1 of the image, aspect
    log-uniform in 3/4..4/3, 10 attempts, else a centre crop; JPEGs decode only the window; resized to image_size as
    `inception_crop` resizes. `inception_crop` draws its window as TF's sampler does (big_vision's)."""
    return _inception_crop(area_min, method)


def _resize(method="bicubic"):
    """Decodes the whole image, resized to image_size ('bicubic' antialiased or 'bilinear'): no crop."""
    return {"method": _method(method)}


def _pad_crop(padding=4):
    """Pads `padding` pixels of 0 on every side and crops image_size x image_size at a uniform offset: a shift of
    up to ±padding pixels (torchvision's RandomCrop(size, padding), the CIFAR and Fashion-MNIST recipe)."""
    return {"padding": _number(padding, "padding", 1, 64, integer=True)}


def _flip():
    """Mirrors left-right with probability 1/2."""
    return {}


def _randaugment(num_ops=2, magnitude=9.0, magnitude_std=0.0, magnitude_max=10.0, increasing=False, prob=0.5):
    """timm's RandAugment (rand-m{magnitude}-n{num_ops}-mstd{magnitude_std}-mmax{magnitude_max}-inc{increasing}):
    15 ops (AutoContrast ... TranslateYRel) with timm's level maps; geometric ops fill with the mean colour."""
    std = magnitude_std
    if not (isinstance(std, (int, float)) and not isinstance(std, bool) and (std >= 0 or math.isinf(std))):
        raise ValueError(f"magnitude_std={std!r} must be a number >= 0 (inf: uniform magnitudes).")
    if not isinstance(increasing, bool):
        raise ValueError(f"increasing={increasing!r} must be True or False.")
    spec = RandAugmentSpec(
        num_ops=_number(num_ops, "num_ops", 0, 16, integer=True),
        magnitude=float(_number(magnitude, "magnitude", 0.0, 30.0)),
        magnitude_std=float(std),
        # Above 10 timm clamps some ops' arguments (Solarize's threshold, the enhance factors), which the ops here
        # do not: magnitudes are clipped to at most 10.
        magnitude_max=float(_number(magnitude_max, "magnitude_max", 0.0, 10.0)),
        increasing=increasing,
        prob=float(_number(prob, "prob", 0.0, 1.0)),
    )
    return {"spec": spec}


def _normalize():
    """uint8 -> float32 (x - mean) / std, with config.data.normalization's statistics (the eval images' too)."""
    return {}


def _erase(prob=0.25):
    """timm's RandomErasing, 'pixel' mode: with probability `prob` one rectangle of 2%..1/3 of the area, aspect
    0.3..3.3, is filled with N(0, 1) noise (on normalised images)."""
    return {"prob": float(_number(prob, "prob", 0.0, 1.0))}


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """A registered op: `signature` takes the chain's arguments and returns them checked, by name."""

    signature: Callable[..., dict]
    takes: str  # 'record', 'uint8' or 'float'
    gives: str
    slot: int  # the example's random key this op draws from (image_ops.apply / augment.apply)
    device: bool = True  # every op runs on the host; this one on the device too


OPS: dict[str, OpSpec] = {
    "inception_crop": OpSpec(_inception_crop, "record", "uint8", slot=0, device=False),
    "random_resized_crop": OpSpec(_random_resized_crop, "record", "uint8", slot=0, device=False),
    "resize": OpSpec(_resize, "record", "uint8", slot=0, device=False),
    "flip": OpSpec(_flip, "uint8", "uint8", slot=1),
    "randaugment": OpSpec(_randaugment, "uint8", "uint8", slot=2),
    "normalize": OpSpec(_normalize, "uint8", "float", slot=-1),
    "erase": OpSpec(_erase, "float", "float", slot=3),
    "pad_crop": OpSpec(_pad_crop, "uint8", "uint8", slot=4),
}


@dataclasses.dataclass(frozen=True)
class Op:
    """One op of a chain, its arguments checked (`OPS[name].signature`'s result)."""

    name: str
    args: tuple[tuple[str, object], ...]  # sorted (name, value) pairs: hashable, for a static jit argument
    text: str  # as written in the chain

    @property
    def kwargs(self) -> dict:
        return dict(self.args)

    @property
    def spec(self) -> OpSpec:
        return OPS[self.name]


@dataclasses.dataclass(frozen=True)
class Chain:
    """A checked chain: the ops for the host (tf.data) and for the device (the train step)."""

    host: tuple[Op, ...]
    device: tuple[Op, ...]


def parse(text: str, field: str = "config.augment.ops") -> Chain:
    """The chain `text` -> Chain; ValueError naming `field`, the op and the fix when it is not a valid recipe."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{field}={text!r}: give a chain of ops like {EXAMPLE!r} (ops: {', '.join(OPS)}).")
    parts = [p.strip() for p in text.split(SEPARATOR)]
    if parts.count(TO_DEVICE) > 1:
        raise ValueError(f"{field}={text!r}: {TO_DEVICE!r} may appear once (ops after it run on the device).")
    host, device, placement = [], [], "host"
    kind = "record"
    for position, part in enumerate(parts, 1):
        if part == TO_DEVICE:
            placement = "device"
            continue
        op = _parse_op(part, f"{field}={text!r}: op {position} {part!r}")
        if any(o.name == op.name for o in (device if placement == "device" else host)):
            raise ValueError(
                f"{field}={text!r}: op {position} {part!r}: {op.name} is already on the {placement}; an op appears "
                "once there (its random draws are the op's own, so a second copy would repeat the first's)."
            )
        spec = op.spec
        if spec.takes != kind:
            fix = {
                "record": "the chain must start with a decoding op (random_resized_crop, inception_crop or resize)",
                "uint8": "a chain decodes once, first",
                "float": "pixel ops (flip, pad_crop, randaugment) come before normalize, once",
            }[kind]
            if spec.takes == "float":
                fix = "erase comes after normalize"
            raise ValueError(f"{field}={text!r}: op {position} {part!r} takes a {spec.takes} image, not {kind}; {fix}.")
        if placement == "device" and not spec.device:
            raise ValueError(
                f"{field}={text!r}: op {position} {part!r} runs on the host only; move {TO_DEVICE!r} after it."
            )
        (device if placement == "device" else host).append(op)
        kind = spec.gives
    if kind != "float":
        raise ValueError(f"{field}={text!r}: the chain must end with normalized images; add 'normalize'.")
    if placement == "device" and not device:
        raise ValueError(f"{field}={text!r}: no op follows {TO_DEVICE!r}; drop it or move ops after it.")
    if device and host[-1].spec.gives == "float":
        raise ValueError(
            f"{field}={text!r}: {TO_DEVICE!r} comes after normalize; move it before normalize (the host sends uint8 "
            "images to the device)."
        )
    return Chain(tuple(host), tuple(device))


def _parse_op(part: str, where: str) -> Op:
    try:
        node = ast.parse(part, mode="eval").body
    except SyntaxError:
        node = None
    if isinstance(node, ast.Name):
        name, args, kwargs = node.id, [], {}
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name = node.func.id
        try:
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
        except ValueError:
            raise ValueError(f"{where}: arguments must be literals (numbers, strings, True/False).") from None
        if len(kwargs) != len(node.keywords):
            raise ValueError(f"{where}: arguments must be literals (numbers, strings, True/False).")
    else:
        raise ValueError(f"{where}: write an op as name or name(arguments), e.g. 'erase(0.25)'.")
    if name not in OPS:
        close = difflib.get_close_matches(name, list(OPS) + [TO_DEVICE], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{where}: unknown op {name!r}{hint}; the ops are {', '.join(OPS)} and {TO_DEVICE!r}.")
    signature = OPS[name].signature
    try:
        bound = inspect.signature(signature).bind(*args, **kwargs)
    except TypeError as e:
        raise ValueError(f"{where}: {e}; {name}{inspect.signature(signature)}.") from None
    try:
        checked = signature(*bound.args, **bound.kwargs)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return Op(name, tuple(sorted(checked.items())), part)


EXAMPLE = "random_resized_crop(0.08)|flip|randaugment(2, 9, 0.5, increasing=True)|normalize|erase(0.25)"  # common.py's
