"""The inference-only install: `pip install -e .` (pyproject's core dependencies, no extras) runs the inference path.

Nothing is installed or downloaded. `_core_site` rebuilds, in a temporary folder, the site-packages an
inference-only install would have: every file (from each distribution's RECORD) of the core dependencies and of
everything they require, transitively, with markers evaluated, symlinked into place. A `python -S` subprocess
whose only third-party path is that folder then imports the inference modules, loads the tiny run's checkpoint
and classifies images through `python -m s2mlp.predict`'s `main`. Whatever the extras add (TensorFlow,
tensorflow_datasets, clu, ml_collections, scikit-learn, matplotlib, ...) is simply not there.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import subprocess
import sys
import textwrap
import tomllib

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_ONLY = ("tensorflow", "tensorflow_datasets", "clu", "ml_collections", "sklearn", "matplotlib", "tensorboard")


def _project() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _closure(requirements: list[str]) -> set[str]:
    """Canonical names of the installed distributions that `requirements` pull in, transitively."""
    todo = [(Requirement(r), "") for r in requirements]
    seen: set[str] = set()
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        extras = set(req.extras)
        if name in seen and not extras:
            continue
        seen.add(name)
        dist = metadata.distribution(req.name)  # PackageNotFoundError: the environment lacks a requirement
        for spec in dist.requires or []:
            sub = Requirement(spec)
            for wanted in {"", *extras}:
                todo.append((sub, wanted))
    return seen


def _core_site(root) -> set[str]:
    """Symlinks every file of the core dependencies' closure under `root`; returns the distribution names."""
    names = _closure(_project()["dependencies"])
    for name in names:
        dist = metadata.distribution(name)
        base = dist.locate_file("")
        assert dist.files, f"{name} has no RECORD: cannot tell its files"
        for file in dist.files:
            if ".." in file.parts:  # console scripts outside site-packages
                continue
            source = os.path.join(base, *file.parts)
            target = os.path.join(root, *file.parts)
            if os.path.exists(source) and not os.path.lexists(target):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.symlink(source, target)
    return names


def test_core_dependencies_exclude_the_training_stack():
    """The core list is what the inference path needs; TensorFlow and friends are in the `train` extra."""
    project = _project()
    core = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    assert core == {"jax", "flax", "optax", "orbax-checkpoint", "numpy", "etils", "absl-py", "pillow"}
    extras = project["optional-dependencies"]
    train = {canonicalize_name(Requirement(r).name) for r in extras["train"]}
    assert {"tensorflow-cpu", "tensorflow-datasets", "ml-collections", "clu", "scikit-learn"} <= train
    assert "s2mlp[train,notebook]" in extras["test"]
    for group in (project["dependencies"], *extras.values()):  # the tested set: exact pins
        for spec in group:
            req = Requirement(spec)
            assert req.name == "s2mlp" or str(req.specifier).startswith("=="), spec


def test_inference_runs_with_only_the_core_dependencies(tiny_s2mlp_run, tmp_path):
    from PIL import Image

    site = tmp_path / "site-packages"
    names = _core_site(site)
    assert not {"tensorflow-cpu", "tensorflow-datasets", "clu", "ml-collections", "scikit-learn"} & names
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(images / "sub" / "b.JPG")
    code = textwrap.dedent(
        f"""
        import importlib.util, json, sys
        missing = [m for m in {TRAIN_ONLY!r} if importlib.util.find_spec(m) is None]
        from s2mlp import inference, mixer_npz, models, predict
        clf = inference.load({tiny_s2mlp_run!r})
        print(json.dumps({{"missing": missing, "step": clf.step, "model": clf.config.model.name}}))
        # The train step too (train_lib without its data), as pyproject.toml and benchmarks/run.py say.
        import jax, jax.numpy as jnp, train_lib
        t = train_lib.setup(models.get_model("s2mlp_tiny", num_classes=10), image_size=16,
                            optimizer=train_lib.OptimizerOptions(batch_size=8, base_lr=1e-3),
                            options=train_lib.StepOptions(), steps_per_epoch=1, total_steps=1)
        batch = {{"image": jnp.zeros((8, 16, 16, 3)), "label": jnp.zeros((8,), jnp.int32)}}
        state, _ = t.train_step(t.init(jax.random.key(0)), batch, jax.random.key(1))
        assert int(state.step) == 1 and "ml_collections" not in sys.modules and "tensorflow" not in sys.modules
        sys.exit(predict.main(["--checkpoint={tiny_s2mlp_run}", "--output=json", "--top_k=3", {str(images)!r}]))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONPATH"] = os.pathsep.join([REPO, str(site)])
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines[0] == {"missing": list(TRAIN_ONLY), "step": 6, "model": "s2mlp_tiny"}
    assert [r["path"] for r in lines[1:]] == [str(images / "a.png"), str(images / "sub" / "b.JPG")]
    for record in lines[1:]:
        assert len(record["labels"]) == len(record["indices"]) == len(record["probabilities"]) == 3
        assert record["labels"] == [str(i) for i in record["indices"]]


@pytest.mark.parametrize("extra", ["train", "notebook", "test"])
def test_extras_are_satisfied_by_the_tested_environment(extra):
    """Every pinned requirement of the extras (and the core) is the installed version: the set CI tests."""
    project = _project()
    specs = [*project["dependencies"], *project["optional-dependencies"][extra]]
    for spec in specs:
        req = Requirement(spec)
        if req.name == "s2mlp":
            continue
        version = metadata.version(req.name)
        assert req.specifier.contains(version, prereleases=True), f"{spec}: installed {version}"


def test_only_the_s2mlp_package_is_installed(tmp_path):
    """The wheel holds `s2mlp` alone: the app files (main.py, train_lib.py, configs/, ...) stay in the checkout,
    so no top-level `main`, `configs` or `benchmarks` lands in site-packages."""
    import shutil
    import zipfile

    source = tmp_path / "source"  # a copy, so building leaves no build/ or egg-info in the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "docs"))
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=source, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("s2mlp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"s2mlp", wheel.name.split("-py3")[0] + ".dist-info"}
    assert {"s2mlp/models/s2mlp.py", "s2mlp/inference.py", "s2mlp/checkpoint.py", "s2mlp/runs.py"} <= set(names)
