"""``python -m benchmarks.run``: compile time, throughput, memory and MFU of the real train step.

For each model (and each ``--image_sizes`` × ``--batches`` point) one process measures:

* compile time of the train step (``lower`` + ``compile``) and of the eval step;
* images/s of the eval step (``s2mlp.evals.eval_step``) and of the train step
  (``train_lib.train_step``: label smoothing 0.1, Mixup 0.8 / CutMix 1.0, DropPath 0.1,
  AdamW, EMA 0.99996, i.e. the S²-MLPv2 recipe of the S²-MLPv2 paper §5), median and [min–max] over
  ``--repeats`` timed calls after ``--warmup`` untimed ones, each timed to
  ``jax.block_until_ready``;
* peak memory: on CPU the host RSS high-water mark (``VmHWM``, reset before the
  model's warm-up steps), on GPU/TPU the device's ``peak_bytes_in_use`` (process-wide
  and monotone: run one model per process for per-model figures); beside it XLA's own
  estimate for the compiled train step (arguments + outputs − donated + temporaries);
* achieved FLOP/s and MFU: train FLOPs/image = 6 × forward MACs (forward 2 flops/MAC,
  backward twice the forward; MACs of every matmul and conv from
  `s2mlp.flops.count_macs`, the papers' "FLOPs"), divided by the dense-matmul rate
  measured in the same run with the same dtype (a square N³ matmul per device,
  best of ``--matmul_repeats``, measured before and after the models; the better is kept).

``--blocks`` times block-stack variants of each S² model in one process, interleaved like
``--shift_identity``: a comma-separated list of ``unrolled`` / ``scan``, each optionally with
``+remat=full`` or ``+remat=dots`` (the models' `scan` and `remat` fields), e.g.
``--blocks=unrolled,scan,scan+remat=dots``, shown after the model's name (``s2mlp_wide (scan)``);
Mixer keeps its unrolled blocks. Remat's memory
effect shows in "XLA train mem" (per compiled program); "peak mem" is process-wide.

``--shift_identity`` adds, for every S² model, the same model with the shift replaced
by the identity (same shapes and parameters) and times both in one process, alternating
shift / identity calls (ABBA order), and reports the shift's overhead from the medians.

``--device_augment`` adds, for every model, the same train step with the v2 recipe's RandAugment,
normalisation and random erasing inside it (``DEVICE_AUGMENT``: the ops after ``to_device`` in
``config.augment.ops``, on a uint8 batch), timed interleaved with the plain step: what moving the
augmentation to the device costs there (``model + device aug`` rows).

Examples::

    python -m benchmarks.run --models=s2mlp_wide,mixer_b16 --batch=8 --dtype=float32 --image_size=224 --repeats=5
    python -m benchmarks.run --models=s2mlp_wide --shift_identity --repeats=7
    python -m benchmarks.run --models=s2mlpv2_small --device_augment --batch=4 --repeats=5
    python -m benchmarks.run --models=s2mlp_deep --blocks=unrolled,scan,scan+remat=full --batch=2 --image_size=112
    python -m benchmarks.run --models=s2mlp_wide,s2mlpv2_small --image_sizes=160,224,288 --batches=4,8,16
    python -m benchmarks.run --input_pipeline          # see benchmarks/input_throughput.py

Needs neither TensorFlow nor ml_collections (except ``--input_pipeline``). Runs unchanged
on CPU, GPU and TPU: the batch is sharded over all devices of `train_lib.make_mesh`.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import gc
import math
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import train_lib
from benchmarks.common import fmt, header, markdown_table, now, spread
from s2mlp import augment_chain, models
from s2mlp.flops import cost_flops, count_macs
from s2mlp.models.s2mlp import S2MLP
from s2mlp.models.s2mlpv2 import S2MLPv2

DEFAULT_MODELS = ("s2mlp_wide", "s2mlp_deep", "s2mlpv2_small", "s2mlpv2_medium", "mixer_b16")

COLUMNS = (
    "model",
    "shift",
    "image",
    "batch",
    "dtype",
    "params (M)",
    "fwd GMAC/img",
    "compile train (s)",
    "compile eval (s)",
    "eval img/s",
    "train img/s",
    "train step (s)",
    "train CPU s/img",
    "peak mem (GiB)",
    "XLA train mem (GiB)",
    "XLA train GFLOP/img",
    "train TFLOP/s",
    "train MFU (%)",
)

SHIFT_COLUMNS = (
    "model",
    "image",
    "batch",
    "train step, shift (s)",
    "train step, identity (s)",
    "train overhead (%)",
    "paired train overhead (%)",
    "eval overhead (%)",
    "train overhead, CPU time (%)",
)


# =============================================================================
# The recipe the train step runs with (no ml_collections needed).
# =============================================================================
def recipe(batch_size: int) -> tuple[train_lib.OptimizerOptions, train_lib.StepOptions]:
    """The optimizer and train-step fields of S²-MLPv2's recipe (S²-MLPv2 paper §5; configs/common.py's "v2")."""
    optimizer = train_lib.OptimizerOptions(
        batch_size=batch_size, base_lr=2e-3, min_lr=1e-5, warmup_epochs=10, weight_decay=0.05, grad_clip_norm=0.0
    )
    options = train_lib.StepOptions(
        label_smoothing=0.1, mixup=0.8, cutmix=1.0, mix_switch_prob=0.5, grad_accum_steps=1, ema_decay=0.99996
    )
    return optimizer, options


# the v2 chain, split
DEVICE_AUGMENT = "random_resized_crop|flip|to_device|randaugment(2, 9, 0.5, increasing=True)|normalize|erase(0.25)"
DROP_PATH_RATE = 0.1
NUM_CLASSES = 1000
STEPS_PER_EPOCH = 1_281_167 // 1024  # ImageNet-1K at batch 1024: only shapes the lr schedule
NUM_EPOCHS = 300


def identity_overrides(model) -> dict | None:
    """Overrides that replace `model`'s shift by the identity; None for models without a shift."""
    if isinstance(model, S2MLP):
        return {"shift_pattern": "none"}
    if isinstance(model, S2MLPv2):
        return {"shift_patterns": ("none", "none")}
    return None


def shift_name(model) -> str:
    if isinstance(model, S2MLP):
        return model.shift_pattern
    if isinstance(model, S2MLPv2):
        return "+".join(model.shift_patterns)
    return "n/a"


def block_variant(text: str) -> dict:
    """``'scan+remat=dots'`` -> ``{'scan': True, 'remat': 'dots'}`` (the models' `scan` / `remat` fields)."""
    layout, *rest = text.strip().split("+")
    if layout not in ("unrolled", "scan") or any(not r.startswith("remat=") for r in rest) or len(rest) > 1:
        raise ValueError(f"--blocks: {text!r} is not unrolled|scan[+remat=none|full|dots]")
    out = {"scan": layout == "scan"}
    if rest:
        out["remat"] = rest[0].removeprefix("remat=")
    return out


def blocks_name(model) -> str:
    if not isinstance(model, S2MLP | S2MLPv2):
        return "unrolled"
    return ("scan" if model.scan else "unrolled") + (f"+remat={model.remat}" if model.remat != "none" else "")


def fit_image_size(name: str, size: int) -> int:
    """`size`, or the nearest positive multiple of the model's input divisor (14 for S²-MLPv2)."""
    divisor = models.get_model(name).input_divisor
    return size if size % divisor == 0 else max(divisor, round(size / divisor) * divisor)


# =============================================================================
# Machine: description, dense-matmul rate, peak memory.
# =============================================================================
def matmul_flops_per_s(mesh, n: int, dtype, repeats: int) -> float:
    """Best-of-`repeats` FLOP/s of one square n×n @ n×n matmul on every device at once."""
    devices = mesh.shape["data"]
    sharding = NamedSharding(mesh, P("data"))
    make = jax.jit(
        lambda key: jax.random.normal(key, (devices, n, n), jnp.float32).astype(dtype), out_shardings=sharding
    )
    a, b = make(jax.random.key(1)), make(jax.random.key(2))
    matmul = jax.jit(lambda a, b: jnp.einsum("dij,djk->dik", a, b), out_shardings=sharding)
    jax.block_until_ready(matmul(a, b))
    best = min(_timed(lambda: matmul(a, b)) for _ in range(repeats))
    return devices * 2 * n**3 / best


class PeakMemory:
    """Peak memory: host RSS high-water mark on CPU, device ``peak_bytes_in_use`` elsewhere."""

    def __init__(self):
        stats = jax.local_devices()[0].memory_stats()
        self.device = bool(stats and "peak_bytes_in_use" in stats)
        self.kind = "device peak_bytes_in_use (process-wide)" if self.device else "host RSS high-water mark"

    def reset(self) -> None:
        """Starts a new high-water mark (host RSS on Linux; device peaks cannot be reset).

        On the host, first hands freed heap back to the OS (glibc ``malloc_trim``): XLA's compiler
        frees gigabytes that would otherwise stay resident and count towards every later mark.
        """
        if not self.device:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except (OSError, AttributeError):
                pass
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass  # the mark then covers the whole process

    def read(self) -> float:
        """Bytes: the largest device peak over local devices, or the host RSS high-water mark."""
        if self.device:
            return float(max(d.memory_stats()["peak_bytes_in_use"] for d in jax.local_devices()))
        try:
            with open("/proc/self/status") as f:
                return float(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
        except (OSError, AttributeError):
            import resource

            scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, kB on Linux
            return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def _timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


# =============================================================================
# One model at one (image size, batch): build, compile, time.
# =============================================================================
class ModelBench:
    """The real train step and eval step of one model on a fixed random batch."""

    def __init__(
        self,
        name: str,
        *,
        image_size: int,
        batch: int,
        dtype: str,
        mesh,
        overrides: dict | None = None,
        blocks: dict | None = None,
        device_augment: bool = False,
    ):
        self.name, self.image_size, self.batch, self.dtype = name, image_size, batch, dtype
        self.identity, self.blocks_variant, self.device_augment = bool(overrides), bool(blocks), device_augment
        self.model = models.get_model(
            name,
            image_size=image_size,
            num_classes=NUM_CLASSES,
            dtype=dtype,
            drop_path_rate=DROP_PATH_RATE,
            **(overrides or {}),
            **(blocks or {}),
        )
        optimizer, options = recipe(batch)
        if device_augment:
            options = dataclasses.replace(options, device_ops=augment_chain.parse(DEVICE_AUGMENT).device)
        self.trainer = train_lib.setup(
            self.model,
            image_size=image_size,
            optimizer=optimizer,
            options=options,
            steps_per_epoch=STEPS_PER_EPOCH,
            total_steps=NUM_EPOCHS * STEPS_PER_EPOCH,
            mesh=mesh,
        )
        self.params_count = sum(x.size for x in jax.tree.leaves(self.trainer.abstract.params))
        self.macs = count_macs(self.model, image_size=image_size, batch=1)
        self.state = self.trainer.init(jax.random.key(0))
        rng = np.random.default_rng(0)
        self.rows = rows = batch // jax.process_count()  # this process's share: to_global joins every process's
        images = rng.standard_normal((rows, image_size, image_size, 3), dtype=np.float32)
        labels = rng.integers(0, NUM_CLASSES, rows).astype(np.int32)
        pixels = rng.integers(0, 256, images.shape, dtype=np.uint8)  # what the host sends with device augmentation
        self.train_batch = self.trainer.to_global({"image": pixels if device_augment else images, "label": labels})
        self.eval_batch = self.trainer.to_global({"image": images, "label": labels, "mask": np.ones(rows, np.float32)})
        self.rng = jax.device_put(jax.random.key(1), self.trainer.replicated)
        self.train_cpu_s: list[float] = []

    def compile(self) -> None:
        start = time.perf_counter()
        self.train_compiled = self.trainer.train_step.lower(self.state, self.train_batch, self.rng).compile()
        self.train_compile_s = time.perf_counter() - start
        start = time.perf_counter()
        self.eval_compiled = self.trainer.eval_step.lower(self.state.params, self.eval_batch).compile()
        self.eval_compile_s = time.perf_counter() - start
        # XLA costs one device's partition of the SPMD program: every device runs it.
        self.xla_train_flops = cost_flops(self.train_compiled.cost_analysis()) * self.trainer.mesh.size
        mem = self.train_compiled.memory_analysis()
        self.xla_train_bytes = (
            mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
            if mem is not None
            else math.nan
        )

    def train_once(self) -> float:
        """Wall seconds of one train step; its process CPU seconds are appended to `train_cpu_s`."""
        cpu, start = time.process_time(), time.perf_counter()
        self.state, self.metrics = self.train_compiled(self.state, self.train_batch, self.rng)
        jax.block_until_ready((self.state, self.metrics))
        self.train_cpu_s.append(time.process_time() - cpu)
        return time.perf_counter() - start

    def eval_once(self) -> float:
        return _timed(lambda: self.eval_compiled(self.state.params, self.eval_batch))

    def check_finite(self) -> None:
        loss, bad = float(self.metrics["loss"]), int(self.state.bad_step)
        if not math.isfinite(loss) or bad >= 0:
            raise FloatingPointError(f"{self.name}: the train step produced a non-finite loss ({loss}, step {bad}).")


def measure(benches: list[ModelBench], *, repeats: int, warmup: int, peak: PeakMemory) -> None:
    """Compiles and warms up each bench, then times them interleaved (ABBA...) `repeats` times each."""
    for bench in benches:
        bench.compile()
        peak.reset()
        for _ in range(warmup):
            bench.train_once()
            bench.eval_once()
        bench.peak_bytes = peak.read()
        bench.train_s, bench.eval_s, bench.train_cpu_s = [], [], []
    for i in range(repeats):
        for bench in benches if i % 2 == 0 else benches[::-1]:
            bench.train_s.append(bench.train_once())
    for i in range(repeats):
        for bench in benches if i % 2 == 0 else benches[::-1]:
            bench.eval_s.append(bench.eval_once())
    for bench in benches:
        bench.check_finite()


# =============================================================================
# Mixup/CutMix: mixing across the sharded batch vs within each device's shard.
# =============================================================================
def mixup_exchange(mesh, *, batch: int, image_size: int, repeats: int) -> str:
    """Times `s2mlp.mixup.mix_batch` on a batch sharded over `mesh`: as the train step runs it (the partner of
    example i is example B-1-i of the whole batch, so every device needs another device's shard) against
    mixing within each device's shard (`jax.shard_map`, partner B/n-1-i of the same shard, same λ and box).
    Both jitted, timed alternately (ABAB...), `repeats` calls each; returns a markdown table."""
    from s2mlp.mixup import mix_batch

    sharding = NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.standard_normal((batch, image_size, image_size, 3), dtype=np.float32), sharding)
    targets = jax.device_put(np.eye(NUM_CLASSES, dtype=np.float32)[rng.integers(0, NUM_CLASSES, batch)], sharding)
    mix = functools.partial(mix_batch, mixup=0.8, cutmix=1.0, switch_prob=0.5)
    local = jax.shard_map(
        lambda key, x, y: mix(key, x, y), mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P("data")
    )
    fns = {
        "whole batch (x[::-1] across devices)": jax.jit(mix, out_shardings=sharding),
        "per device (shard_map, x[::-1] within each shard)": jax.jit(local, out_shardings=sharding),
    }
    compiled = {k: f.lower(jax.random.key(0), images, targets).compile() for k, f in fns.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats + 1):
        for name in list(compiled) if i % 2 == 0 else list(compiled)[::-1]:
            t = _timed(lambda name=name, i=i: compiled[name](jax.random.key(i), images, targets))
            if i:  # the first round warms up
                times[name].append(t * 1e3)
    lines = ["| mixing | best (ms) | median [min–max] (ms) |", "|---|---|---|"]
    lines += [f"| {k} | {fmt(min(v))} | {spread(v)} |" for k, v in times.items()]
    return "\n".join(lines)


# =============================================================================
# Rows and the markdown tables.
# =============================================================================
def bench_row(bench: ModelBench, matmul_flops: float) -> dict:
    """The figures of one bench; ``cells`` holds the table's strings in COLUMNS order."""
    train_med, eval_med = statistics.median(bench.train_s), statistics.median(bench.eval_s)
    train_flops = 6 * bench.macs * bench.batch / train_med
    row = {
        "model": bench.name,
        "shift": "none" if bench.identity else shift_name(bench.model),
        "image": bench.image_size,
        "batch": bench.batch,
        "dtype": bench.dtype,
        "params": bench.params_count,
        "fwd_macs_per_image": bench.macs,
        "compile_train_s": bench.train_compile_s,
        "compile_eval_s": bench.eval_compile_s,
        "eval_images_per_s": [bench.batch / t for t in bench.eval_s],
        "train_images_per_s": [bench.batch / t for t in bench.train_s],
        "train_step_s": bench.train_s,
        "eval_step_s": bench.eval_s,
        "train_cpu_s_per_image": statistics.median(bench.train_cpu_s) / bench.rows,  # this process's, its rows
        "peak_bytes": bench.peak_bytes,
        "xla_train_bytes": bench.xla_train_bytes,
        "xla_train_flops_per_image": bench.xla_train_flops / bench.batch,
        "train_flops_per_s": train_flops,
        "train_mfu": train_flops / matmul_flops,
        "eval_flops_per_s": 2 * bench.macs * bench.batch / eval_med,
        "blocks": blocks_name(bench.model),
    }
    row["cells"] = [
        f"{row['model']} ({row['blocks']})"
        if bench.blocks_variant
        else row["model"] + (" + device aug" if bench.device_augment else ""),
        row["shift"],
        str(row["image"]),
        str(row["batch"]),
        row["dtype"],
        fmt(row["params"] / 1e6),
        fmt(row["fwd_macs_per_image"] / 1e9),
        fmt(row["compile_train_s"]),
        fmt(row["compile_eval_s"]),
        spread(row["eval_images_per_s"]),
        spread(row["train_images_per_s"]),
        spread(row["train_step_s"]),
        fmt(row["train_cpu_s_per_image"]),
        fmt(row["peak_bytes"] / 2**30),
        fmt(row["xla_train_bytes"] / 2**30),
        fmt(row["xla_train_flops_per_image"] / 1e9),
        fmt(row["train_flops_per_s"] / 1e12),
        fmt(100 * row["train_mfu"]),
    ]
    return row


def shift_row(shifted: ModelBench, identity: ModelBench) -> dict:
    """The shift's overhead: medians of the interleaved timings, and the spread of the paired ratios."""
    t_shift, t_id = statistics.median(shifted.train_s), statistics.median(identity.train_s)
    paired = [100 * (a / b - 1) for a, b in zip(shifted.train_s, identity.train_s, strict=True)]
    eval_overhead = 100 * (statistics.median(shifted.eval_s) / statistics.median(identity.eval_s) - 1)
    cpu_overhead = 100 * (statistics.median(shifted.train_cpu_s) / statistics.median(identity.train_cpu_s) - 1)
    row = {
        "model": shifted.name,
        "image": shifted.image_size,
        "batch": shifted.batch,
        "train_step_shift_s": t_shift,
        "train_step_identity_s": t_id,
        "train_overhead_pct": 100 * (t_shift / t_id - 1),
        "paired_train_overhead_pct": paired,
        "eval_overhead_pct": eval_overhead,
        "train_cpu_overhead_pct": cpu_overhead,
    }
    row["cells"] = [
        row["model"],
        str(row["image"]),
        str(row["batch"]),
        fmt(t_shift),
        fmt(t_id),
        f"{row['train_overhead_pct']:+.1f}",
        f"{statistics.median(paired):+.1f} [{min(paired):+.1f} – {max(paired):+.1f}]",
        f"{eval_overhead:+.1f}",
        f"{cpu_overhead:+.1f}",
    ]
    return row


# =============================================================================
# Command line.
# =============================================================================
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def argv_has(argv: list[str] | None, flag: str) -> bool:
    """Whether `--flag` (or `--flag=...`) was given on the command line."""
    return any(a == f"--{flag}" or a.startswith(f"--{flag}=") for a in (sys.argv[1:] if argv is None else argv))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated registry names")
    p.add_argument("--batch", type=int, default=8, help="global batch (a multiple of the device count)")
    p.add_argument("--batches", default="", help="comma-separated batches: a sweep (overrides --batch)")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument(
        "--image_sizes",
        default="",
        help="comma-separated sides: a sweep (overrides --image_size); a side the model cannot take is replaced "
        "by the nearest multiple of its input divisor (S²-MLPv2: 14, e.g. 160 -> 154, 288 -> 294)",
    )
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per step and model")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after compiling")
    p.add_argument(
        "--blocks", default="", help="S² block-stack variants timed interleaved, e.g. unrolled,scan,scan+remat=dots"
    )
    p.add_argument("--shift_identity", action="store_true", help="also time each S² model with an identity shift")
    p.add_argument(
        "--device_augment", action="store_true", help="also time each train step with RandAugment etc. inside it"
    )
    p.add_argument("--matmul_size", type=int, default=0, help="N of the N³ matmul (default 2048 on CPU, else 8192)")
    p.add_argument("--matmul_repeats", type=int, default=10)
    p.add_argument("--output", default="", help="append the markdown tables to this file")
    p.add_argument(
        "--mixup_exchange",
        action="store_true",
        help="time Mixup/CutMix over the whole sharded batch vs within each device's shard instead "
        "(--batch, --image_size, --repeats); run with XLA_FLAGS=--xla_force_host_platform_device_count=8 on a CPU",
    )
    p.add_argument("--input_pipeline", action="store_true", help="benchmark the input pipeline instead (needs TF)")
    p.add_argument("--num_images", type=int, default=256, help="--input_pipeline: JPEGs to write and decode")
    p.add_argument("--jpeg_size", default="500,375", help="--input_pipeline: width,height of the JPEGs")
    p.add_argument("--input_cores", default="1,all", help="--input_pipeline: core counts to pin to ('all': every core)")
    args = p.parse_args(argv)
    for name in args.models.split(","):
        if name not in models.model_names():
            p.error(f"--models: {name!r} is unknown; choose from {models.model_names()}")
    try:
        args.block_variants = [block_variant(v) for v in args.blocks.split(",") if v.strip()]
        for variant in args.block_variants:
            models.get_model("s2mlp_tiny", **variant)  # remat's choices
    except ValueError as e:
        p.error(str(e))
    if sum(map(bool, (args.block_variants, args.shift_identity, args.device_augment))) > 1:
        p.error("--blocks, --shift_identity and --device_augment: time one comparison per run")
    if args.repeats < 1 or args.warmup < 1:
        p.error("--repeats and --warmup must be >= 1 (the peak memory is read after the warm-up calls)")
    mode = "--input_pipeline" if args.input_pipeline else "--mixup_exchange" if args.mixup_exchange else ""
    ignored = [f"--{f}" for f in ("batches", "image_sizes", "dtype", "warmup", "blocks") if mode and argv_has(argv, f)]
    ignored += ["--shift_identity"] * bool(mode and args.shift_identity)
    ignored += ["--device_augment"] * bool(mode and args.device_augment)
    if ignored:
        p.error(f"{mode} times one --batch and --image_size; {', '.join(ignored)} would be ignored: leave it out")
    devices = 1 if args.input_pipeline else jax.device_count()
    for batch in _ints(args.batches) or [args.batch]:
        if batch < 1 or batch % devices:
            p.error(f"batch {batch} must be a positive multiple of the device count ({devices})")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmarks of `argv` (default: sys.argv[1:]); prints and returns the tables and rows."""
    argv = sys.argv[1:] if argv is None else list(argv)
    started = now()
    args = parse_args(argv)
    if args.input_pipeline:
        from benchmarks import input_throughput

        return input_throughput.main(args, argv, started)

    mesh = train_lib.make_mesh()
    if args.mixup_exchange:
        with jax.set_mesh(mesh):
            table = mixup_exchange(mesh, batch=args.batch, image_size=args.image_size, repeats=args.repeats)
        text = header(argv, [f"{jax.device_count()} devices, global batch {args.batch}"], started) + "\n\n" + table
        print(text)
        if args.output:
            with open(args.output, "a") as f:
                f.write(text + "\n\n")
        return {"markdown": text}
    dtype = jnp.dtype(args.dtype)
    n = args.matmul_size or (2048 if jax.default_backend() == "cpu" else 8192)
    peak = PeakMemory()
    rows, shift_rows, notes = [], [], []
    with jax.set_mesh(mesh):
        matmul_before = matmul_flops_per_s(mesh, n, dtype, args.matmul_repeats)
        results = []
        for name in args.models.split(","):
            for requested in _ints(args.image_sizes) or [args.image_size]:
                size = fit_image_size(name, requested)
                if size != requested:
                    notes.append(f"{name}: image side {requested} -> {size} (a multiple of its input divisor)")
                for batch in _ints(args.batches) or [args.batch]:
                    make = functools.partial(
                        ModelBench, name, image_size=size, batch=batch, dtype=args.dtype, mesh=mesh
                    )
                    benches = [make()]
                    if args.block_variants and isinstance(benches[0].model, S2MLP | S2MLPv2):
                        benches = [make(blocks=variant) for variant in args.block_variants]
                    swap = identity_overrides(benches[0].model) if args.shift_identity else None
                    if swap:
                        benches.append(make(overrides=swap))
                    if args.device_augment:
                        benches.append(make(device_augment=True))
                    measure(benches, repeats=args.repeats, warmup=args.warmup, peak=peak)
                    results.append(benches)
                    print(f"[benchmarks] {name} {size}px batch {batch}: " + ", ".join(
                        f"{'identity' if b.identity else blocks_name(b.model)} "
                        f"train {statistics.median(b.train_s):.3f} s"
                        for b in benches), file=sys.stderr, flush=True)  # fmt: skip
                    for bench in benches:  # free the device buffers; keep the timings
                        bench.state = bench.train_batch = bench.eval_batch = None
                        bench.train_compiled = bench.eval_compiled = bench.metrics = None
                    gc.collect()
        matmul_after = matmul_flops_per_s(mesh, n, dtype, args.matmul_repeats)
    matmul = max(matmul_before, matmul_after)
    for benches in results:
        rows += [bench_row(b, matmul) for b in benches]
        if len(benches) == 2 and benches[1].identity:
            shift_rows.append(shift_row(*benches))

    extra = [
        f"dense matmul: {n}³ {args.dtype} per device, best of {args.matmul_repeats}: "
        f"{matmul / 1e12:.3f} TFLOP/s (before the models {matmul_before / 1e12:.3f}, after {matmul_after / 1e12:.3f})",
        f"train step: train_lib.train_step (AdamW, EMA {recipe(1)[1].ema_decay}, Mixup 0.8 / CutMix 1.0, "
        f"label smoothing 0.1, DropPath {DROP_PATH_RATE}); eval step: s2mlp.evals.eval_step; random inputs",
        f"timings: median [min–max] of {args.repeats} calls after {args.warmup} warm-up call(s), to block_until_ready",
        "train TFLOP/s = 6 × fwd MACs × batch / median step (matmul and conv MACs from s2mlp.flops.count_macs, "
        "2 flops/MAC, backward = 2 × forward); MFU = that / the dense-matmul rate above",
        "train CPU s/img: process CPU seconds (all threads) per image, median; on a shared CPU host it barely "
        "depends on other processes' load, unlike wall time (on GPU/TPU it is host overhead only)",
        f"peak mem: {peak.kind}, over the warm-up calls (in one process, later models also count memory the "
        "allocator kept from earlier ones: run one model per process for exact peaks); XLA train mem: arguments + "
        "outputs − donated + temporaries of the compiled train step, per model",
    ]
    if args.device_augment:
        extra.append(
            f"+ device aug: the same train step with the ops after to_device of config.augment.ops "
            f"{DEVICE_AUGMENT!r} inside it, on a uint8 batch, timed alternately with the plain one"
        )
    if args.shift_identity:
        extra.append(
            "shift = none: the same model with the shift replaced by the identity (same shapes and parameters), "
            "timed alternately with the shifted one in this process; its peak mem includes the shifted model's "
            "live state"
        )
    extra += notes
    text = header(argv, extra, started) + "\n\n" + markdown_table(COLUMNS, rows) + "\n"
    if shift_rows:
        text += "\nShift overhead (train and eval steps; paired: each shifted call vs its neighbouring identity call, "
        text += "median [min – max]; CPU time: process CPU seconds per train step, which other processes' load "
        text += (
            "barely changes, meaningful on the CPU backend only):\n\n"
            + markdown_table(SHIFT_COLUMNS, shift_rows)
            + "\n"
        )
    print(text)
    if args.output:
        with open(args.output, "a") as f:
            f.write(text + "\n")
    return {"rows": rows, "shift_rows": shift_rows, "matmul_flops_per_s": matmul, "markdown": text}


if __name__ == "__main__":
    main()
