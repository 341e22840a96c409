"""Classify image files with a trained checkpoint and print the top-5 of each.

    python -m s2mlp.predict --checkpoint=/tmp/s2mlp_demo digit.png cat.jpg
    python -m s2mlp.predict --checkpoint=imagenet1k_Mixer-B_16.npz --mixer_model=mixer_b16 cat.jpg

`--checkpoint` is a training workdir, its ``checkpoints/`` folder or a step
folder (local or ``gs://``), or a vision_transformer Mixer ``.npz``. Class
names come from the checkpoint's ``dataset`` item; a 1000-class model without
names gets ImageNet's WordNet IDs from tensorflow_datasets' bundled metadata
(offline), or plain indices when tensorflow_datasets is not installed. Images
are decoded with PIL (EXIF orientation applied; grey, palette and RGBA images
converted to RGB). Output, per image: its path, then one line per class (rank,
probability, name, and the class index when the name is not the index)::

    cat.jpg
      1.  87.31%  n02123045 (281)
      2.   6.02%  n02123159 (282)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np


def imagenet_class_names() -> list[str] | None:
    """ImageNet-1k's 1000 WordNet IDs in label order, from tfds metadata shipped with the package (no download)."""
    try:
        import tensorflow_datasets as tfds

        names = list(tfds.builder("imagenet2012").info.features["label"].names)
    except Exception:  # noqa: BLE001 - tfds missing or its metadata unavailable: fall back to indices
        return None
    return names if len(names) == 1000 else None


def read_image(path: str) -> np.ndarray:
    """An image file -> uint8 (H, W, 3) RGB."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        return np.asarray(image.convert("RGB"))


def _load(args):
    if args.checkpoint.endswith(".npz"):
        from s2mlp import mixer_npz

        return mixer_npz.classifier_from_npz(args.checkpoint, args.mixer_model)
    from s2mlp import inference

    return inference.load(args.checkpoint, ema=not args.no_ema)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m s2mlp.predict", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    parser.add_argument("--checkpoint", required=True, help="workdir, checkpoints/ or step folder, or a Mixer .npz")
    parser.add_argument("--top_k", type=int, default=5, help="classes to print per image (default 5)")
    parser.add_argument("--no_ema", action="store_true", help="use the raw parameters even if the run kept an EMA")
    parser.add_argument("--mixer_model", default="mixer_b16", help="registered Mixer of a .npz (default mixer_b16)")
    parser.add_argument("--class_names", help="text file with one class name per line, in label order")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        clf = _load(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    names = clf.class_names
    if args.class_names:
        with open(args.class_names) as f:
            names = [line.strip() for line in f if line.strip()]
        if len(names) != clf.num_classes:
            print(f"error: {args.class_names} has {len(names)} names; the model has {clf.num_classes} classes.",
                  file=sys.stderr)  # fmt: skip
            return 2
    elif clf.num_classes == 1000 and names == [str(i) for i in range(1000)]:
        names = imagenet_class_names()
        if names is None:
            print("note: the checkpoint has no class names and tensorflow_datasets is unavailable; printing indices.",
                  file=sys.stderr)  # fmt: skip
            names = clf.class_names
        else:
            print("note: class names are ImageNet WordNet IDs from tensorflow_datasets' imagenet2012 metadata.",
                  file=sys.stderr)  # fmt: skip
    clf.class_names = list(names)

    failed = 0
    for path in args.images:
        try:
            image = read_image(path)
        except (OSError, ValueError) as e:  # PIL raises UnidentifiedImageError (an OSError) for non-images
            print(f"error: cannot read {path}: {e}", file=sys.stderr)
            failed += 1
            continue
        print(path)
        print(clf.predict(image, k=args.top_k).format(0))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
