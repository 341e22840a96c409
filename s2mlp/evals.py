"""Several evaluations in one run (``config.evals``) and the per-class results of the main one.

The **main eval** is ``config.data.eval_split`` of ``config.data.name``. It is always evaluated, first, and keeps
the metric names of a run without ``config.evals``: ``eval_top1``, ``eval_top5``, ``eval_loss``,
``eval_num_examples`` and ``eval_ema_*`` in metrics.jsonl, TensorBoard tags ``<eval_split>/top1``, ... Its name
(for ``config.best_eval``) is the split, e.g. ``'validation'`` or ``'test'``.

``config.evals`` adds named evals, each a preset (`PRESETS`) or ``'name=NAME,data=DATASET,split=SPLIT'`` (plus
``,labels=FEATURE`` for a tfds feature holding several labels per image), or a dict with those keys in a config
file. Eval NAME writes ``eval_NAME_top1``, ``eval_NAME_ema_top1``, ... and TensorBoard tags ``NAME/top1``, ...
An eval with ``labels`` (ImageNet ReaL) scores "the top prediction is one of the image's labels" (top-5: one of
the top 5 is) and leaves images without any label out, as Beyer et al. (2020) do; it has no loss.

``config.best_eval`` names the eval whose top-1 (the EMA's when the EMA is on) ranks the best checkpoint;
'' is the main eval. Importing this module needs numpy only (matplotlib for the PNG, imported when drawn).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

# metrics.jsonl's keys of one eval are `prefix + metric` (and `prefix + 'ema_' + metric` for the EMA).
METRICS = ("top1", "top5", "loss", "num_examples")
# ImageNet's evals (tfds): the validation split, its ReaL labels ('real_label': a set of labels per image; tfds
# `imagenet2012_real` needs ILSVRC2012_img_val.tar, as imagenet2012 does) and ImageNet-V2 (matched frequency).
PRESETS: dict[str, dict[str, str]] = {
    "validation": {"data": "imagenet2012", "split": "validation"},
    "real": {"data": "imagenet2012_real", "split": "validation", "labels": "real_label"},
    "v2": {"data": "imagenet_v2/matched-frequency", "split": "test"},
}
SPEC_KEYS = ("name", "data", "split", "labels")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*\Z")
MOST_CONFUSED = 20  # pairs listed in per_class.json
PNG_MAX_CLASSES = 100  # the confusion PNG is drawn up to this many classes (the top pairs are listed always)
PER_CLASS_FILE, CONFUSION_PNG = "per_class.json", "confusion.png"


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """One evaluation: split `split` of dataset `data` (config.data.name's kinds), scored with its single label or,
    with `labels`, against the set of labels that tfds feature holds."""

    name: str
    data: str
    split: str
    labels: str = ""
    main: bool = False

    @property
    def prefix(self) -> str:
        """The start of this eval's keys in metrics.jsonl: 'eval_' (main) or 'eval_<name>_'."""
        return "eval_" if self.main else f"eval_{self.name}_"

    def describe(self) -> str:
        return f"{self.data}:{self.split}" + (f" (labels {self.labels!r})" if self.labels else "")


def from_config(config) -> list[EvalSpec]:
    """The main eval, then those of ``config.evals``; ValueError naming ``config.evals[i]`` or ``config.best_eval``
    (and the fix) for an unknown preset, a malformed entry, a clashing name or a best_eval naming no eval."""
    main = EvalSpec(config.data.eval_split, config.data.name, config.data.eval_split, main=True)
    specs = [main]
    entries = config.get("evals") or ()
    if isinstance(entries, str) or hasattr(entries, "items"):
        raise ValueError(f'config.evals={entries!r} must be a tuple of evals, e.g. --config.evals=\'("real", "v2")\'.')
    for i, entry in enumerate(entries):
        field = f"config.evals[{i}]={_show(entry)}"
        spec = _parse(entry, field, config.data.name)
        if (spec.data, spec.split, spec.labels) == (main.data, main.split, main.labels):
            continue  # the main eval itself (e.g. 'validation' in an ImageNet run): evaluated once
        if spec.name == main.name:
            raise ValueError(
                f"{field}: the name {spec.name!r} is the main eval's (config.data.eval_split={main.split!r}); "
                f"rename it (name=...)."
            )
        if spec.name in [s.name for s in specs]:
            raise ValueError(f"{field}: another eval is already named {spec.name!r}; give each eval its own name.")
        specs.append(spec)
    best = config.get("best_eval") or ""
    if best and best not in [s.name for s in specs]:
        raise ValueError(
            f"config.best_eval={best!r} names no eval; choose one of {[s.name for s in specs]} (the main eval, "
            "config.data.eval_split, then config.evals), or '' for the main eval."
        )
    return specs


def _show(entry) -> str:
    return repr(dict(entry) if isinstance(entry, Mapping) or hasattr(entry, "to_dict") else entry)


def _parse(entry, field: str, default_data: str) -> EvalSpec:
    if hasattr(entry, "to_dict"):  # a ConfigDict
        entry = entry.to_dict()
    if isinstance(entry, str) and "=" not in entry:
        if entry not in PRESETS:
            several = ' (several evals: --config.evals=\'("real", "v2")\')' if "," in entry else ""
            raise ValueError(
                f"{field} is not a preset; choose one of {sorted(PRESETS)} or write "
                f"'name=NAME,data=DATASET,split=SPLIT[,labels=FEATURE]'{several}."
            )
        return EvalSpec(name=entry, **PRESETS[entry])
    if isinstance(entry, str):
        fields = {}
        for part in entry.split(","):
            key, _, value = part.partition("=")
            if key.strip() not in SPEC_KEYS or not value.strip():
                raise ValueError(
                    f"{field}: {part!r} is not KEY=VALUE with KEY one of {list(SPEC_KEYS)}; write "
                    "'name=NAME,data=DATASET,split=SPLIT[,labels=FEATURE]' (data defaults to config.data.name)."
                )
            fields[key.strip()] = value.strip()
    elif isinstance(entry, Mapping):
        fields = dict(entry)
        unknown = sorted(set(fields) - set(SPEC_KEYS))
        if unknown or not all(isinstance(v, str) for v in fields.values()):
            raise ValueError(
                f"{field}: an eval is a dict of strings with keys {list(SPEC_KEYS)}; got {unknown or fields}."
            )
    else:
        raise ValueError(f"{field} must be a preset name, 'name=...,split=...' or a dict; got {type(entry).__name__}.")
    for key in ("name", "split"):
        if not fields.get(key):
            raise ValueError(f"{field} gives no {key}; write 'name=NAME,data=DATASET,split=SPLIT'.")
    name = fields["name"]
    if not _NAME.match(name) or name in ("ema", "train") or name.endswith("_ema"):
        raise ValueError(
            f"{field}: the name {name!r} must be letters, digits, '_' or '-', start with a letter, not be 'train' "
            "(TensorBoard's group of the training curves) and not be or end in 'ema' (metrics.jsonl's keys are "
            "eval_<name>_top1, eval_<name>_ema_top1, ...)."
        )
    return EvalSpec(
        name=name, data=fields.get("data") or default_data, split=fields["split"], labels=fields.get("labels", "")
    )


def best_spec(specs: Sequence[EvalSpec], best_eval: str) -> EvalSpec:
    """The eval that ranks the best checkpoint: the one named `best_eval`, '' the main one."""
    return next(s for s in specs if s.name == best_eval) if best_eval else specs[0]


def split_key(key: str, names: Sequence[str]) -> tuple[str | None, str]:
    """(eval name or None for the main eval, metric) of a metrics.jsonl key ``eval_...``; `names`: the other evals."""
    rest = key.removeprefix("eval_")
    for name in sorted(names, key=len, reverse=True):
        metric = rest.removeprefix(f"{name}_")
        if metric != rest and metric.removeprefix("ema_") in METRICS:
            return name, metric
    return None, rest


# ---------------------------------------------------------------- per-class results of the main eval
def per_class(confusion: np.ndarray, class_names: Sequence[str], top: int = MOST_CONFUSED) -> dict[str, Any]:
    """Per-class counts and top-1 and the most confused pairs of a confusion matrix (rows: true class, columns:
    the top-1 prediction); a class without examples has top-1 None."""
    confusion = np.asarray(confusion, np.int64)
    count, correct = confusion.sum(axis=1), np.diag(confusion)
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:top]
    pairs = [np.unravel_index(i, off.shape) for i in order if off.flat[i] > 0]
    names = list(class_names) if len(class_names) == len(count) else [str(i) for i in range(len(count))]
    return {
        "num_examples": int(count.sum()),
        "top1": float(correct.sum() / max(count.sum(), 1)),
        "class_names": names,
        "per_class": {
            "count": count.tolist(),
            "correct": correct.tolist(),
            "top1": [float(c / n) if n else None for c, n in zip(correct, count)],
        },
        "most_confused": [
            {
                "true": int(t),
                "predicted": int(p),
                "true_name": names[t],
                "predicted_name": names[p],
                "count": int(off[t, p]),
                "fraction_of_true": float(off[t, p] / count[t]),
            }
            for t, p in pairs
        ],  # fmt: skip
        "confusion": confusion.tolist(),
    }


def write_per_class(out_dir, confusion: np.ndarray, class_names: Sequence[str], *, spec: EvalSpec, step: int,
                    item: str) -> dict[str, Any]:  # fmt: skip
    """Writes ``out_dir/per_class.json`` (which eval, step and parameters `item`, then `per_class`'s fields) and, for
    at most PNG_MAX_CLASSES classes, ``out_dir/confusion.png`` (the row-normalised matrix and the most confused
    pairs); logs the worst classes and most confused pairs; returns the record."""
    from etils import epath

    out_dir = epath.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    about = dict(step=step, eval=spec.name, data=spec.data, split=spec.split, params=item)
    record = {**about, **per_class(confusion, class_names)}
    # One item a line, the matrix one row a line: ~3 MB for 1000 classes (10 with json's indent).
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in record.items() if k != "confusion"]
    rows = ",\n  ".join(json.dumps(row, separators=(",", ":")) for row in record["confusion"])
    lines.append(f' "confusion": [\n  {rows}\n ]')
    (out_dir / PER_CLASS_FILE).write_text("{\n" + ",\n".join(lines) + "\n}\n")
    png = out_dir / CONFUSION_PNG
    if len(record["class_names"]) <= PNG_MAX_CLASSES:
        try:
            fig = confusion_figure(record)
        except ImportError:  # matplotlib is part of the train extra; without it the JSON says it all
            pass
        else:
            with png.open("wb") as f:
                fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    elif png.exists():
        png.unlink()
    per = record["per_class"]
    worst = sorted((t, n) for t, n in zip(per["top1"], record["class_names"]) if t is not None)[:3]
    pairs = [f"{p['true_name']}->{p['predicted_name']} ({p['count']})" for p in record["most_confused"][:5]]
    logging.info(
        "Per-class top-1 of %r at step %d (%s): lowest %s; most confused: %s. Written to %s",
        spec.name, step, item, ", ".join(f"{n}: {100 * t:.1f}%" for t, n in worst), ", ".join(pairs) or "none",
        out_dir / PER_CLASS_FILE,
    )  # fmt: skip
    return record


def confusion_figure(record: Mapping[str, Any], max_pairs: int = 12):
    """A matplotlib Figure of a `per_class` record: the confusion matrix normalised per true class, and the most
    confused pairs as bars. Needs no display (``matplotlib.figure.Figure``, not pyplot)."""
    from matplotlib.figure import Figure

    confusion = np.asarray(record["confusion"], np.float64)
    names, k = record["class_names"], len(record["class_names"])
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    pairs = record["most_confused"][:max_pairs]
    fig = Figure(figsize=(11, 4.8))
    ax_m, ax_p = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.1]})
    im = ax_m.imshow(rates, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax_m, fraction=0.046, pad=0.04, label="fraction of the true class")
    ticks = np.arange(k) if k <= 30 else np.arange(0, k, max(1, k // 10))
    ax_m.set_xticks(ticks, [names[i] for i in ticks], rotation=90, fontsize=7)
    ax_m.set_yticks(ticks, [names[i] for i in ticks], fontsize=7)
    about = [repr(record["eval"])] if record.get("eval") else []
    about += [f"step {record['step']}"] if record.get("step") is not None else []
    title = "confusion" + (f" of {' at '.join(about)}" if about else "") + f": top-1 {100 * record['top1']:.1f}%"
    ax_m.set(xlabel="predicted (top-1)", ylabel="true class", title=title)
    if pairs:
        labels = [f"{p['true_name']} \u2192 {p['predicted_name']}" for p in pairs][::-1]
        ax_p.barh(range(len(pairs)), [p["count"] for p in pairs][::-1], color="tab:red")
        ax_p.set_yticks(range(len(pairs)), labels, fontsize=8)
        ax_p.set(xlabel="images", title="most confused pairs (true \u2192 predicted)")
    else:
        ax_p.text(0.5, 0.5, "no confusions", ha="center", va="center")
        ax_p.set_axis_off()
    fig.tight_layout()
    return fig


# ---- eval steps (jitted by train_lib.Trainer) and their results -------------------------------------------
def eval_step(params, batch, *, model):
    """Sums over the masked-in examples of {'image', 'label', 'mask'}: correct top-1/top-5, loss, count, and the
    (K, K) int32 confusion matrix (rows: label, columns: top-1 prediction)."""
    logits = model.apply({"params": params}, batch["image"], train=False)
    labels, mask = batch["label"], batch["mask"]
    top = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    k = logits.shape[-1]
    return {
        "correct_top1": jnp.sum((top[:, 0] == labels) * mask),
        "correct_top5": jnp.sum(jnp.any(top == labels[:, None], axis=-1) * mask),
        "loss": jnp.sum(loss * mask),
        "count": jnp.sum(mask),
        "confusion": jnp.zeros((k, k), jnp.int32).at[labels, top[:, 0]].add(mask.astype(jnp.int32)),
    }


def multi_label_eval_step(params, batch, *, model):
    """`eval_step` for images with a set of labels, {'image', 'labels': int32 (B, K) multi-hot, 'mask'} (ImageNet
    ReaL): top-1 is correct when the top prediction is one of the image's labels, top-5 when one of the top 5 is.
    Images without a label are left out (of `count` too), as in ReaL (Beyer et al. 2020). No loss."""
    logits = model.apply({"params": params}, batch["image"], train=False)
    labels = batch["labels"]
    mask = batch["mask"] * (jnp.max(labels, axis=-1) > 0)
    top = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    hits = jnp.take_along_axis(labels, top, axis=-1) > 0  # (B, 5): is the i-th prediction one of the labels
    return {
        "correct_top1": jnp.sum(hits[:, 0] * mask),
        "correct_top5": jnp.sum(jnp.any(hits, axis=-1) * mask),
        "count": jnp.sum(mask),
    }


def eval_metrics(sums: dict[str, np.ndarray]) -> dict[str, float]:
    """`eval_step`'s (or `multi_label_eval_step`'s) sums over an eval set -> top1, top5, loss (not multi-label) and
    num_examples. A multi-label set without any labelled image gives 0 and num_examples 0."""
    count = float(sums["count"])
    if not count and "loss" not in sums:  # a multi-label eval set without any labelled image
        return {"top1": 0.0, "top5": 0.0, "num_examples": 0.0}
    out = {"top1": float(sums["correct_top1"]) / count, "top5": float(sums["correct_top5"]) / count}
    if "loss" in sums:
        out["loss"] = float(sums["loss"]) / count
    return out | {"num_examples": count}


def evaluate_sets(eval_sums: Callable, eval_sets: Sequence[tuple[EvalSpec, Any]], items: Sequence[tuple[str, Any]]):
    """Each (spec, data) of `eval_sets` (`input_pipeline.build_evals`'s) with each (key infix, params) of `items`
    ('' the parameters, 'ema_' their EMA), summed by `eval_sums(params, batches, multi_label=...)` (the
    `train_lib.Trainer`'s): (metrics.jsonl's keys -> values, the main eval's confusion matrix of the last item, the
    EMA's when on)."""
    out, confusion = {}, None
    for spec, data in eval_sets:
        for infix, params in items:
            sums = eval_sums(params, data.eval_iterator(), multi_label=bool(spec.labels))
            out |= {f"{spec.prefix}{infix}{k}": v for k, v in eval_metrics(sums).items()}
            if spec.main:
                confusion = sums["confusion"]
    return out, confusion


def out_dir(eval_dir, split: str, step: int):
    """Where the results of the main eval at `step` go: ``<eval_dir>/<split>_step<N>/``."""
    return eval_dir / f"{split.replace('/', '_')}_step{step}"
