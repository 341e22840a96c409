"""``python -m s2mlp.summary``: parameters and MACs of the papers' models beside the papers' figures.

Computed from the model code: parameters (``models.abstract_params``, i.e. ``jax.eval_shape`` of
``init``), MACs from the jaxpr of the forward (`s2mlp.flops.count_macs`), XLA's
``cost_analysis()`` flops / 2 of the compiled forward as a cross-check (it also counts elementwise
work, so it runs a few percent high), and every number of the notes (the S²-MLP paper's §3.4
formulas and S²-MLPv2's Eq. 4 multiplies are evaluated on the registered models' fields). Quoted
from the papers, typed in by hand: the three "paper" columns (`PAPER_FIGURES`, each row with the
table it comes from). Runs in well under a minute on CPU (``--no-xla``: seconds).
"""

from __future__ import annotations

import argparse
import math

import jax

from s2mlp.flops import count_macs, macs_and_xla_flops
from s2mlp.models import PAPER_MODELS, abstract_params, get_model

IMAGE_SIZE = 224
NUM_CLASSES = 1000

# name -> (paper params, paper FLOPs, ImageNet-1K top-1 at 224, source). Quoted from the papers' tables.
PAPER_FIGURES = {
    "s2mlp_wide": ("71M †", "14.0B", "80.0", "S²-MLP Tables 2-3"),
    "s2mlp_deep": ("51M † ‡", "10.5B", "80.7", "S²-MLP Tables 2-3"),
    "s2mlpv2_small": ("25M", "6.9B", "82.0", "S²-MLPv2 Table 2"),
    "s2mlpv2_medium": ("55M", "16.3B", "83.6", "S²-MLPv2 Table 2"),
    "mixer_s16": ("—", "—", "—", "not quoted in the S² papers"),
    "mixer_b16": ("59M †", "11.6B §", "76.4", "S²-MLP Table 3, S²-MLPv2 Table 2"),
    "mixer_l16": ("—", "—", "—", "not quoted in the S² papers"),
}


def param_counts(model, image_size: int = IMAGE_SIZE) -> tuple[int, int]:
    """(total parameters, parameters outside the ``head`` Dense)."""
    params = abstract_params(model, image_size)
    total = _size(params)
    return total, total - _size(params.get("head", {}))


def _size(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def s2mlp_formula(model, image_size: int = IMAGE_SIZE, num_classes: int = NUM_CLASSES) -> tuple[int, int, int]:
    """The S²-MLP paper's own counts (§3.4) for an S2MLP's fields: (params, FLOPs, FLOPs of the classifier).

    Params = (3p²+1)c + N·(c²(2r+2) + c(3+r)), without the classifier (as Table 2) and without the
    norms (which the formula leaves out). FLOPs = 3Mcp² + N·M·c²(2r+2) + M·c·k: the classifier as
    the paper writes it, on all M patches; the model pools first, so its classifier does c·k.
    """
    c, r, p, n = model.hidden_dim, model.mlp_ratio, model.patch_size, model.num_blocks
    m = (image_size // p) ** 2
    params = (3 * p * p + 1) * c + n * (c * c * (2 * r + 2) + c * (3 + r))
    classifier = m * c * num_classes
    return params, 3 * m * c * p * p + n * m * c * c * (2 * r + 2) + classifier, classifier


def split_attention_multiplies(model, image_size: int = IMAGE_SIZE) -> int:
    """Elementwise multiplies of S²-MLPv2's split-attention weighted sums (Eq. 4), not in the MAC count.

    Σ_k X_k ⊙ Ā[k] over the K = 3 branches: 3·h·w·c per block, h = w halving from stage to stage.
    """
    side = image_size // model.patch_size
    stages = enumerate(zip(model.hidden_dims, model.depths, strict=True))
    return sum(3 * (side // 2**s) ** 2 * c * depth for s, (c, depth) in stages)


def rows(with_xla: bool = True):
    """(name, params, params w/o head, MACs, XLA flops / 2 or nan) of each paper model."""
    for name in PAPER_MODELS:
        model = get_model(name)
        total, no_head = param_counts(model)
        macs, flops = macs_and_xla_flops(model) if with_xla else (count_macs(model), float("nan"))
        yield name, total, no_head, macs, flops / 2


def table(computed: list[tuple]) -> str:
    """The markdown table of `rows`' results, with the S²-MLP deep variant's formula note as a last row."""
    header = (
        "| model | params | params w/o head | GMACs @224 | MACs (exact) | XLA flops/2 (G) | XLA / MACs "
        "| paper params | paper FLOPs | paper top-1 |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, total, no_head, macs, half_flops in computed:
        paper_params, paper_flops, top1, _ = PAPER_FIGURES[name]
        lines.append(
            f"| {name} | {total:,} | {no_head:,} | {macs / 1e9:.2f} | {macs:,} | {half_flops / 1e9:.2f} "
            f"| {half_flops / macs:.3f} | {paper_params} | {paper_flops} | {top1} |"
        )
    _, total, no_head, macs, _ = next(row for row in computed if row[0] == "s2mlp_deep")
    printed, paper_flops, top1, _ = PAPER_FIGURES["s2mlp_deep"]
    formula, _, _ = s2mlp_formula(get_model("s2mlp_deep"))
    lines.append(
        f"| note: s2mlp_deep | {total:,} | {no_head:,} | {macs / 1e9:.2f} | | | "
        f"| {printed.split()[0]} printed, but the paper's own formula gives {formula / 1e6:.1f}M (‡) "
        f"| {paper_flops.split()[0]} | {top1} |"
    )
    return "\n".join(lines)


def notes(computed: list[tuple]) -> str:
    """The notes under the table; every number in them is computed here from the models."""
    macs = {name: m for name, _, _, m, _ in computed}
    _, deep_total, deep_no_head, _, _ = next(row for row in computed if row[0] == "s2mlp_deep")
    deep = get_model("s2mlp_deep")
    c, r, n, p = deep.hidden_dim, deep.mlp_ratio, deep.num_blocks, deep.patch_size
    params, flops, classifier = s2mlp_formula(deep)
    pooled = flops - classifier + c * NUM_CLASSES  # the classifier after the pooling, as the model runs it
    printed, printed_flops = PAPER_FIGURES["s2mlp_deep"][0].split()[0], PAPER_FIGURES["s2mlp_deep"][1]
    v2 = ("s2mlpv2_small", "s2mlpv2_medium")
    with_sums = " / ".join(f"{(macs[v] + split_attention_multiplies(get_model(v))) / 1e9:.2f}G" for v in v2)
    mixer_quoted = PAPER_FIGURES["mixer_b16"][1].split()[0]
    return "\n".join([
        f"Computed columns: params counted with ``jax.eval_shape`` ({NUM_CLASSES}-class head); MACs =",
        "multiply-accumulates of every dot_general / conv in the jaxpr of the batch-1 eval",
        f"forward at {IMAGE_SIZE}×{IMAGE_SIZE} (the papers' \"FLOPs\"); "
        "XLA = compiled ``cost_analysis()['flops'] / 2``,",
        "which also counts GELU, LayerNorm, softmax and other elementwise work.",
        "",
        "† S²-MLP (v1) prints parameters *without* the classifier, \"following MLP-Mixer\" (its Table 2):",
        "  compare these with \"params w/o head\". S²-MLPv2's totals include the head.",
        f"‡ Deep variant: the paper prints {printed}, but its own formula (§3.4) (3p²+1)c + N·(c²(2r+2)+c(3+r))",
        f"  (c={c}, r={r}, N={n}, p={p}) gives {params / 1e6:.1f}M ({params:,}; the formula leaves out the norms);",
        f"  our exact count is {deep_no_head:,} without the head ({deep_total:,} with). Its FLOPs formula gives",
        f"  {flops / 1e9:.2f}G with the classifier on all patches as written, {pooled / 1e9:.2f}G with the classifier",
        f"  after the pooling as the model runs it (our exact MAC count): the paper prints {printed_flops}.",
        f"  We report the model as specified rather than fudge it to {printed}.",
        "  For v1 the paper counts multiplications of the FC layers only, which is the MAC count.",
        "S²-MLPv2's split-attention weighted sum (Σ_k X_k ⊙ Ā[k], its Eq. 4) is elementwise, so it is not in",
        f"  the MAC column; adding its 3·h·w·c multiplies per block gives {with_sums}.",
        f"§ Mixer-B/16's architecture has {macs['mixer_b16'] / 1e9:.2f} GMACs; the S²-MLP paper quotes {mixer_quoted} "
        "for it (Table 3).",
        "",
    ])  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-xla", action="store_true", help="skip the compiled XLA cross-check (faster)")
    args = parser.parse_args(argv)
    computed = list(rows(with_xla=not args.no_xla))
    print(table(computed))
    print()
    print(notes(computed))
    print("Sources of the paper columns: " + "; ".join(f"{n}: {src}" for n, (*_, src) in PAPER_FIGURES.items()) + ".")


if __name__ == "__main__":
    main()
