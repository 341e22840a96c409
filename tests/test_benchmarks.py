"""Smoke tests of `benchmarks.run`: the tables have their columns and every figure is positive and finite.

No timing thresholds. The model benchmark runs in a subprocess so it can ask XLA for a cheap
compile (optimisation level 0) on 2 CPU devices (the sharded path); the input-pipeline mode
runs in-process on a handful of tiny JPEGs.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

from benchmarks import run
from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf", re.I)


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """(header, rows) of every markdown table in `text`."""
    found, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            rows = []
            for body in lines[i + 2 :]:
                if not body.startswith("|"):
                    break
                rows.append([c.strip() for c in body.strip("|").split("|")])
            found.append(([c.strip() for c in line.strip("|").split("|")], rows))
    return found


def numbers(cell: str) -> list[float]:
    values = [float(x) for x in NUMBER.findall(cell)]
    assert values, f"no number in cell {cell!r}"
    return values


def test_model_benchmark_table():
    common = [
        "--image_size=16",
        "--batch=8",
        "--repeats=1",
        "--matmul_size=64",
        "--matmul_repeats=2",
    ]
    env = dict(os.environ, XLA_FLAGS=xla_flags(2))
    # Two processes side by side: XLA:CPU compiles mostly on one thread, and compiling is most of the time.
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.run", f"--models={models}", flag, *common],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for models, flag in (
            ("s2mlp_tiny,mixer_tiny", "--shift_identity"),
            ("s2mlpv2_tiny", "--shift_identity"),
            ("s2mlp_tiny", "--device_augment"),
        )
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    single = subprocess.Popen(  # after the others: four compiling at once outlast the timeout on a busy machine
        [sys.executable, "-m", "benchmarks.run", "--models=s2mlp_tiny", *common],
        cwd=ROOT,
        env={**env, "XLA_FLAGS": xla_flags(1)},
        stdout=subprocess.PIPE,
        text=True,
    )
    for proc, (_, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
    # --device_augment: the same model and shapes, its train step with the chain's device ops on a uint8 batch.
    (header, augmented), *others = tables(outputs[2][0])
    assert not others and [r[0] for r in augmented] == ["s2mlp_tiny", "s2mlp_tiny + device aug"]
    assert augmented[0][1:7] == augmented[1][1:7]  # shift, image, batch, dtype, parameters, MACs
    assert "+ device aug: the same train step with the ops after to_device" in outputs[2][0]
    main_rows, shift_rows = [], []
    for stdout, _ in outputs[:2]:
        assert "2 × cpu" in stdout  # the batch really was sharded over 2 devices
        (main_header, rows), (shift_header, shifts) = tables(stdout)
        main_rows += rows
        shift_rows += shifts

    assert tuple(main_header) == run.COLUMNS
    names = [(r[0], r[1]) for r in main_rows]
    assert names == [
        ("s2mlp_tiny", "ss1"),
        ("s2mlp_tiny", "none"),
        ("mixer_tiny", "n/a"),
        ("s2mlpv2_tiny", "ss1+ss2"),
        ("s2mlpv2_tiny", "none"),
    ]
    text_columns = {"model", "shift", "dtype"}
    for row in main_rows:
        assert len(row) == len(run.COLUMNS)
        for column, cell in zip(run.COLUMNS, row, strict=True):
            if column not in text_columns:
                assert all(math.isfinite(v) and v > 0 for v in numbers(cell)), (column, cell)
    # Same shapes and parameters with and without the shift.
    assert main_rows[0][5:7] == main_rows[1][5:7] and main_rows[3][5:7] == main_rows[4][5:7]
    # XLA costs one device's part of the sharded step; the column counts every device's part. One device's program
    # on the same 8 images does the same work, but for what each device repeats (the optimizer update: +14% in a
    # run here), so the two agree from below; a count of one device's part alone would read about half.
    xla = run.COLUMNS.index("XLA train GFLOP/img")
    one_device = tables(single.communicate(timeout=600)[0])[0][1][0]
    assert one_device[:2] == ["s2mlp_tiny", "ss1"]
    assert 1.0 <= numbers(main_rows[0][xla])[0] / numbers(one_device[xla])[0] <= 1.5

    assert tuple(shift_header) == run.SHIFT_COLUMNS
    assert [r[0] for r in shift_rows] == ["s2mlp_tiny", "s2mlpv2_tiny"]
    for row in shift_rows:
        for column, cell in zip(run.SHIFT_COLUMNS[1:], row[1:], strict=True):
            values = numbers(cell)
            assert all(math.isfinite(v) for v in values), (column, cell)
            if "overhead" not in column:  # overheads may be negative on a noisy machine
                assert all(v > 0 for v in values), (column, cell)


def test_flags_the_chosen_mode_would_ignore_are_refused(capsys):
    for argv in (["--input_pipeline", "--batches=2,4"], ["--mixup_exchange", "--dtype=bfloat16"], ["--warmup=0"]):
        with pytest.raises(SystemExit):
            run.parse_args(argv)
    assert "--batches would be ignored" in capsys.readouterr().err
    assert run.parse_args(["--input_pipeline", "--batch=8"]).batch == 8


def test_image_sizes_fit_the_model():
    assert run.fit_image_size("s2mlpv2_small", 160) == 154
    assert run.fit_image_size("s2mlpv2_small", 288) == 294
    assert run.fit_image_size("s2mlpv2_small", 224) == 224
    assert run.fit_image_size("s2mlp_wide", 288) == 288


def test_recipe_is_the_training_recipe():
    # The benchmark keeps a TensorFlow-free copy of the fields the train step reads: they must be the v2 recipe's.
    pytest.importorskip("ml_collections")
    import train_lib
    from configs import common

    (optimizer, options), recipe = run.recipe(8), common.get_config("v2")
    assert optimizer.batch_size == 8
    for field in ("base_lr", "min_lr", "warmup_epochs", "weight_decay", "grad_clip_norm"):
        assert getattr(optimizer, field) == recipe[field], field
    for field in ("grad_accum_steps", "ema_decay"):
        assert getattr(options, field) == recipe[field], field
    for field in ("label_smoothing", "mixup", "cutmix", "mix_switch_prob"):
        assert getattr(options, field) == recipe.augment[field], field
    assert options == train_lib.StepOptions.from_config(recipe)
    # --device_augment runs the v2 chain's ops, split after its flip.
    from s2mlp import augment_chain

    split = augment_chain.parse(run.DEVICE_AUGMENT)
    v2 = augment_chain.parse(recipe.augment.ops).host
    assert [(op.name, op.args) for op in split.host + split.device] == [(op.name, op.args) for op in v2]
    assert [op.name for op in split.host] == ["random_resized_crop", "flip"]
    assert run.DROP_PATH_RATE == recipe.model.drop_path_rate and run.NUM_EPOCHS == recipe.num_epochs


def test_input_pipeline_table(capsys):
    pytest.importorskip("tensorflow")
    pytest.importorskip("ml_collections")
    from benchmarks import input_throughput as it
    from s2mlp import augment_chain

    out = run.main(
        ["--input_pipeline", "--input_cores=1", "--num_images=4", "--jpeg_size=64,48", "--image_size=32", "--batch=4"]
        + ["--repeats=1"]
    )
    header, rows = tables(out["markdown"])[0]
    assert tuple(header) == it.COLUMNS
    assert "vs plain crop+flip" in header and "vs decode floor" in header
    assert [r[0] for r in rows] == list(it.PIPELINES)  # the two anchors, then the repo's five pipelines
    assert [r["pipeline"] for r in out["rows"]] == list(it.PIPELINES)
    for row in rows:
        for cell in row[1:]:
            if cell[0].isdigit():
                assert all(math.isfinite(v) and v > 0 for v in numbers(cell)), cell
        cells = dict(zip(header, row, strict=True))
        assert cells["vs plain crop+flip"].endswith("×") and cells["vs decode floor"].endswith("×")
    by_name = {r[0]: dict(zip(header, r, strict=True)) for r in rows}
    assert by_name[it.PLAIN_CROP_FLIP]["vs plain crop+flip"] == "1.00×"
    assert by_name[it.DECODE_FLOOR]["vs decode floor"] == "1.00×"
    for row in out["rows"]:
        assert row["vs_plain_crop_flip"] > 0 and row["vs_decode_floor"] > 0
    # The targets follow the table, each with its measured ratio and PASS or MISS; one core count: no scaling.
    assert len(out["targets"]) == len(it.TARGETS) + 1
    assert all(re.search(r"\d\.\d\d× (PASS|MISS)$", line) for line in out["targets"][:-1])
    assert "not measured" in out["targets"][-1]
    assert out["markdown"] in capsys.readouterr().out
    # The per-op cost table: every registered op once, its placement as registered, a host cost (a decoding op's
    # whole pipeline; another op's chain minus the chain without it) and a device cost where it can run there.
    header, rows = tables(out["markdown"])[1]
    assert tuple(header) == it.PER_OP_COLUMNS
    assert [r[0] for r in rows] == [it.split_last(chain)[0] for chain in it.PER_OP]
    assert {it.last_op(chain).name for chain in it.PER_OP} == set(augment_chain.OPS)
    for chain, row in zip(it.PER_OP, rows, strict=True):
        text, base = it.split_last(chain)
        cells = dict(zip(header, row, strict=True))
        spec = augment_chain.OPS[it.last_op(chain).name]
        assert it.last_op(chain).text == text
        assert cells["runs on"] == ("host, device" if spec.device else "host")
        host = numbers(cells["host ms/image (1 core)"])
        assert all(math.isfinite(v) for v in host) and (base is not None or min(host) > 0)
        assert cells["host: timed as"] == (f"added to {base.replace('|', ' + ')}" if base else "the whole pipeline")
        if spec.device:
            assert all(v > 0 for v in numbers(cells["device ms/image (jitted)"]))
        else:
            assert cells["device ms/image (jitted)"] == "—"
