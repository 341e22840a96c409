"""What both benchmarks (`benchmarks.run`, `benchmarks.input_throughput`) print: the machine, numbers, tables."""

from __future__ import annotations

import datetime
import math
import os
import platform
import re
import statistics

import jax


def machine_description() -> str:
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    text = f"jax {jax.__version__}, backend {jax.default_backend()}, {len(devices)} × {', '.join(kinds)}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import psutil

        ram = f", {psutil.virtual_memory().total / 2**30:.1f} GiB RAM"
    except ImportError:
        ram = ""
    return f"{text}; host: {cpu}, {cores} cores{ram}"


def fmt(x: float) -> str:
    """3 significant digits, no exponent for ordinary magnitudes."""
    if not math.isfinite(x):
        return str(x)
    a = abs(x)
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def spread(values: list[float]) -> str:
    return f"{fmt(statistics.median(values))} [{fmt(min(values))}–{fmt(max(values))}]"


def markdown_table(columns, rows) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row["cells"]) + " |" for row in rows]
    return "\n".join(lines)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def header(argv: list[str], extra: list[str], started: str) -> str:
    lines = [f"### benchmarks.run, {started} to {now()}", "", f"`python -m benchmarks.run {' '.join(argv)}`", ""]
    lines += [f"- {machine_description()}"] + [f"- {x}" for x in extra]
    return "\n".join(lines)
