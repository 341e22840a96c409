"""Classify image files or folders with a trained checkpoint and print the top-k of each.

    python -m s2mlp.predict --checkpoint=/tmp/s2mlp_demo digit.png cat.jpg
    python -m s2mlp.predict --checkpoint=/tmp/s2mlp_demo --output=csv photos/ > top5.csv
    python -m s2mlp.predict --checkpoint=imagenet1k_Mixer-B_16.npz --mixer_model=mixer_b16 cat.jpg

`--checkpoint` is a training workdir, its ``checkpoints/`` folder or a step folder (local or ``gs://``), or a
vision_transformer Mixer ``.npz``. Each input is an image file (whatever its extension) or a folder
(`find_images`); images are decoded with `read_image`. A 1000-class model without class names gets ImageNet's
WordNet IDs from tensorflow_datasets' bundled metadata (offline), or plain indices without tensorflow_datasets.

``--output=text`` (default) prints, per image, its path and then `Prediction.format`'s lines
(``  1.  87.31%  n02123045 (281)``); ``--output=json`` one JSON object per line and image: ``{"path": ...,
"labels": [...], "indices": [...], "probabilities": [...]}`` (best first); ``--output=csv`` a header and one
row per image: ``path``, then ``label_r``, ``index_r``, ``probability_r`` for r = 1..k.

**Unreadable images** (not an image, truncated, unsupported format) are reported on stderr by path
(``error: cannot read PATH: reason``) and left out; the others are still classified, and the exit status is 1.
Exit status 2: bad arguments, an input path that does not exist, a folder with no matching file, or a checkpoint
that cannot be loaded (nothing is classified).
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import os
import sys
from collections.abc import Iterator, Sequence

import numpy as np

DEFAULT_GLOB = "*.jpg,*.jpeg,*.png,*.bmp,*.gif,*.webp,*.tif,*.tiff"
OUTPUTS = ("text", "json", "csv")


def imagenet_class_names() -> list[str] | None:
    """ImageNet-1k's 1000 WordNet IDs in label order, from tfds metadata shipped with the package (no download)."""
    try:
        import tensorflow_datasets as tfds

        names = list(tfds.builder("imagenet2012").info.features["label"].names)
    except Exception:  # noqa: BLE001 - tfds missing or its metadata unavailable: fall back to indices
        return None
    return names if len(names) == 1000 else None


def read_image(path: str, exif_transpose: bool = False) -> np.ndarray:
    """An image file -> uint8 (H, W, 3) RGB. Raises OSError (or ValueError) when PIL cannot decode it fully.

    The pixels as stored, as the train and eval pipeline (tf.io.decode_*), timm's and torchvision's folder
    datasets read them; `exif_transpose` first turns the image by its EXIF orientation (phone photos)."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        if exif_transpose:
            image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I"):  # 16-bit grey: the high byte, as tf.io.decode_image reads it (convert clips)
            grey = (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=-1)
        return np.asarray(image.convert("RGB"))


def find_images(inputs: Sequence[str], glob: str = DEFAULT_GLOB) -> list[str]:
    """Files named in `inputs` as given, plus the files under each folder whose name matches `glob`.

    `glob`: comma-separated ``fnmatch`` patterns, matched case-insensitively against the file name.
    Folders are walked recursively (symlinked folders are not followed), each in sorted path order.
    Raises FileNotFoundError for a path that does not exist and ValueError for a folder with no match.
    """
    patterns = [p.strip().lower() for p in glob.split(",") if p.strip()]
    if not patterns:
        raise ValueError(f"--glob={glob!r} holds no pattern; e.g. --glob='*.png,*.jpg'.")
    found = []
    for item in inputs:
        if os.path.isfile(item):
            found.append(item)
        elif os.path.isdir(item):
            matches = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(item)
                for name in names
                if any(fnmatch.fnmatchcase(name.lower(), p) for p in patterns)
            )
            if not matches:
                raise ValueError(f"folder {item} holds no file matching --glob={glob!r}.")
            found.extend(matches)
        else:
            raise FileNotFoundError(f"{item} does not exist.")
    return found


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m s2mlp.predict", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...) or folders (searched recursively)")
    parser.add_argument("--checkpoint", required=True, help="workdir, checkpoints/ or step folder, or a Mixer .npz")
    parser.add_argument("--top_k", type=int, default=5, help="classes to print per image (default 5)")
    parser.add_argument("--output", choices=OUTPUTS, default="text", help="text (default), json (one object per "
                        "line and image) or csv (a header, then one row per image)")  # fmt: skip
    parser.add_argument("--glob", default=DEFAULT_GLOB, help="comma-separated name patterns for files inside "
                        f"folders, case-insensitive (default {DEFAULT_GLOB})")  # fmt: skip
    parser.add_argument("--batch_size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--no_ema", action="store_true", help="use the raw parameters even if the run kept an EMA")
    parser.add_argument("--mixer_model", help="registered Mixer of a .npz (default mixer_b16)")
    parser.add_argument("--class_names", help="text file with one class name per line, in label order")
    parser.add_argument("--exif_transpose", action="store_true", help="turn each image by its EXIF orientation "
                        "first (phone photos); off by default, as training and eval ignore EXIF")  # fmt: skip
    return parser


def _batches(
    paths: Sequence[str], batch_size: int, exif_transpose: bool = False
) -> Iterator[tuple[list[str], list[np.ndarray]]]:
    """(paths, images) of up to `batch_size` readable images at a time; unreadable ones reported on stderr."""
    batch_paths, images = [], []
    for path in paths:
        try:
            image = read_image(path, exif_transpose)
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            print(f"error: cannot read {path}: {e}", file=sys.stderr)
            yield [path], []  # marks a failure
            continue
        batch_paths.append(path)
        images.append(image)
        if len(images) == batch_size:
            yield batch_paths, images
            batch_paths, images = [], []
    if images:
        yield batch_paths, images


class _Writer:
    """Writes predictions to stdout in the chosen format."""

    def __init__(self, output: str, k: int):
        self.output = output
        self.csv = None
        if output == "csv":
            self.csv = csv.writer(sys.stdout, lineterminator="\n")
            columns = [f"{field}_{r}" for r in range(1, k + 1) for field in ("label", "index", "probability")]
            self.csv.writerow(["path", *columns])

    def write(self, path: str, result, i: int) -> None:
        labels = [str(name) for name in result.labels[i]]
        indices = [int(x) for x in result.indices[i]]
        probabilities = [round(float(p), 6) for p in result.probabilities[i]]
        if self.output == "text":
            print(path)
            print(result.format(i))
        elif self.output == "json":
            record = {"path": path, "labels": labels, "indices": indices, "probabilities": probabilities}
            print(json.dumps(record, ensure_ascii=False))
        else:
            self.csv.writerow([path, *(x for row in zip(labels, indices, probabilities) for x in row)])
        sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for flag, value in (("top_k", args.top_k), ("batch_size", args.batch_size)):
        if value < 1:
            print(f"error: --{flag}={value} must be at least 1.", file=sys.stderr)
            return 2
    npz = args.checkpoint.lower().endswith(".npz")
    if npz and args.no_ema or not npz and args.mixer_model:
        flag, applies = ("--no_ema", "a training run's checkpoint") if npz else ("--mixer_model", "a Mixer .npz")
        print(f"error: {flag} applies to {applies} only; --checkpoint={args.checkpoint} is not one.", file=sys.stderr)
        return 2
    try:
        paths = find_images(args.images, args.glob)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    given_names = None
    if args.class_names:
        try:
            with open(args.class_names) as f:
                given_names = [line.strip() for line in f if line.strip()]
        except OSError as e:
            print(f"error: --class_names={args.class_names}: {e.strerror or e}.", file=sys.stderr)
            return 2
    try:
        if npz:
            from s2mlp import mixer_npz

            clf = mixer_npz.classifier_from_npz(args.checkpoint, args.mixer_model or "mixer_b16")
        else:
            from s2mlp import inference

            clf = inference.load(args.checkpoint, ema=not args.no_ema)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if clf.step is not None:  # a training run's checkpoint (not a Mixer .npz)
        which = "EMA" if clf.params_item == "ema_params" else "raw"
        why = " (--no_ema)" if args.no_ema else "" if which == "EMA" else " (the run kept no EMA)"
        print(f"note: {clf.checkpoint_dir} step {clf.step}, {which} parameters{why}.", file=sys.stderr)
    if given_names is not None:
        if len(given_names) != clf.num_classes:
            print(f"error: {args.class_names} has {len(given_names)} names; the model has {clf.num_classes} classes.",
                  file=sys.stderr)  # fmt: skip
            return 2
        clf.class_names = given_names
    elif clf.num_classes == 1000 and clf.class_names == [str(i) for i in range(1000)]:
        imagenet = imagenet_class_names()
        if imagenet is None:
            print("note: the checkpoint has no class names and tensorflow_datasets is unavailable; printing indices.",
                  file=sys.stderr)  # fmt: skip
        else:
            print("note: class names are ImageNet WordNet IDs from tensorflow_datasets' imagenet2012 metadata.",
                  file=sys.stderr)  # fmt: skip
            clf.class_names = imagenet

    writer = _Writer(args.output, min(args.top_k, clf.num_classes))
    failed = 0
    for batch_paths, images in _batches(paths, args.batch_size, args.exif_transpose):
        if not images:
            failed += 1
            continue
        result = clf.predict(images, k=args.top_k, batch_size=args.batch_size)
        for i, path in enumerate(batch_paths):
            writer.write(path, result, i)
    if failed:
        print(f"error: {failed} of {len(paths)} images could not be read (listed above).", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
