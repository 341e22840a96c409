"""Every shell command in README.md's fenced code blocks is run here, or listed in SKIP with the reason.

Which lines are commands: fenced blocks tagged ``bash``, ``sh``, ``shell`` or ``console``, or untagged (those
also hold folder layouts, whose lines start with ``<`` or a path, so they are not commands); ``python`` blocks
and inline code are not shell commands. A line continued with ``\\`` is joined to the next, a ``$ `` prompt and a
trailing ``# comment`` are dropped, whitespace is collapsed, and a line joined with ``&&`` is several commands.

Each command must be a key of RUN or of SKIP, exactly as `readme_commands` prints it; one that is in neither,
and an entry that is no longer in the README, fail `test_every_readme_command_is_covered`, so a new README
command must be added to one of them:

- RUN: executed as written, in README order, by `test_readme_commands_run`, in a scratch copy of the checkout
  (its tracked and untracked-not-ignored files) as the working directory, so relative paths (``runs/demo``,
  ``top3.csv``) land in the copy and nothing outside it is written. The rules (nothing is downloaded):
  * ``python``/``python3`` is this interpreter and ``ruff`` is ``python -m ruff``; the environment is the
    test's minus ``XLA_FLAGS`` (the fake devices of tests/conftest.py), as on a one-CPU machine;
  * ``pip install ...`` gets ``--dry-run --no-index --no-build-isolation``: pip resolves the requested extras
    against the installed packages and reports what it would install, without downloading or installing;
  * the input files a user brings (`INPUTS`: ``digit.png``, ``photo.jpg``, the folder ``photos/``) are written
    into the copy first; ``> FILE`` redirects stdout to FILE there;
  * a RUN entry's ``append`` is added to the command: training commands get ``--config.total_steps=2`` (two
    steps instead of minutes; the last step still evaluates and writes a checkpoint).
  Each command must exit 0; ``expect`` (a regex over stdout + stderr) and ``creates`` (a path in the copy that
  must then exist and be non-empty) check what it did. Then each ``python`` block runs as written, in the copy,
  unless `PYTHON_SKIP` names its first line with the reason.
- SKIP: commands that need data that is not here (ImageNet), an accelerator, the network, or that would recurse
  (the test suite itself), each with the reason.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
SHELL_TAGS = ("", "bash", "sh", "shell", "console")
SHORT_TRAINING = ("--config.total_steps=2",)


@dataclass(frozen=True)
class Run:
    append: tuple[str, ...] = ()  # added to the command's arguments
    expect: str = ""  # a regex that must match stdout + stderr
    creates: str = ""  # a path under the scratch folder that must exist (a folder, or a non-empty file) afterwards
    content: str = ""  # a regex that the file `creates` must match


# README command (as `readme_commands` prints it) -> how it is run.
RUN = {
    'python3 -m pip install -e ".[train]"': Run(expect=r"Would install s2mlp-"),
    "python3 main.py --config=configs/demo.py --workdir=runs/demo": Run(
        append=SHORT_TRAINING, expect=r"Workdir: /\S+/runs/demo\n", creates="runs/demo/checkpoints/2/params"
    ),
    "python3 main.py --config=configs/demo.py --workdir=runs/demo_device "
    "--config.augment.ops='resize|to_device|randaugment(2, 9, 0.5)|normalize|erase(0.25)'": Run(
        append=SHORT_TRAINING,
        expect=r"Workdir: /\S+/runs/demo_device\n",
        creates="runs/demo_device/checkpoints/2/params",
    ),
    'python3 -m pip install -e ".[test]"': Run(expect=r"Would install s2mlp-"),
    "ruff check .": Run(expect=r"All checks passed"),
    "ruff format --check .": Run(expect=r"files? already formatted"),
    "python3 -m pip install -e .": Run(expect=r"Would install s2mlp-"),
    "python3 -m s2mlp.predict --checkpoint=runs/demo digit.png photo.jpg": Run(
        expect=r"digit\.png\n\s+1\. .*\n(.*\n){4}.*photo\.jpg\n\s+1\. "
    ),
    "python3 -m s2mlp.predict --checkpoint=runs/demo --output=csv --top_k=3 photos/ > top3.csv": Run(
        creates="top3.csv",
        content=r"^path,label_1,index_1,probability_1,.*probability_3\n.*more/two\.jpg,.*\n.*one\.png,",
    ),
    # --dry_run checks and lists the study's runs without training or writing anything.
    "python3 study.py --study=configs/studies/shift_ablation.py --workdir=runs/shift_ablation --dry_run": Run(
        expect=r"run \d+ of \d+"
    ),
}

# README command -> why it is not run here.
SKIP = {
    "python3 -m pytest": "the whole test suite, which contains this test (.ci/run runs it)",
    "python3 main.py --config=configs/s2mlp_v2_medium.py --workdir=$WORKDIR --config.data.data_dir=$TFDS_DATA_DIR": (
        "needs ImageNet prepared by tfds and days of accelerator time"
    ),
    "python3 main.py --config=configs/s2mlp_v2_small.py --workdir=runs/s2mlpv2_small ...": "ImageNet, accelerators",
    "python3 main.py --config=configs/mixer_b16.py --workdir=runs/mixer_b16 ...": "ImageNet, accelerators",
    "python3 main.py --config=configs/s2mlp_wide.py --workdir=runs/s2mlp_wide ...": "ImageNet, accelerators",
    "python3 main.py --config=configs/mixer_b16.py:deit --workdir=runs/mixer_b16_deit ...": "ImageNet, accelerators",
    "jupyter execute notebooks/s2mlp_colab.ipynb": (
        "tests/test_notebook.py executes the notebook on a tiny run, figure by figure"
    ),
    "tfds build imagenet2012 --data_dir=<data_dir>": "needs the ImageNet tars (~145 GB) from image-net.org",
    "python3 study.py --study=configs/studies/shift_ablation.py --workdir=runs/shift_ablation": (
        "trains every run of the study (tens of runs of hundreds of steps); tests/test_study.py runs tiny studies"
    ),
    "python3 -m s2mlp.report runs/shift_ablation --out=/tmp/shift_ablation_report": (
        "needs the finished study of the command above"
    ),
    "python3 study.py --study=configs/studies/shift_ablation.py:fashion_mnist --workdir=runs/shift_fmnist": (
        "trains the 33 runs of the study (1 h 57 min on a 2-core CPU, measured) on Debian's Fashion-MNIST files; "
        "tests/test_study.py expands it on IDX files it writes"
    ),
    "python3 study.py --study=configs/studies/mixer_vs_s2mlp.py:fashion_mnist --workdir=runs/mvs_fmnist": (
        "trains the 27 runs of the study (4 h 20 min on a 2-core CPU, measured) on Debian's Fashion-MNIST files; "
        "tests/test_study.py expands it on IDX files it writes"
    ),
}

# README input file -> what is written there before the commands run: 'digit' and 'photo' an image, 'photos' a
# folder of two images.
INPUTS = {"digit.png": "digit", "photo.jpg": "photo", "photos/": "photos"}

# First line of a README ``python`` block -> why it is not run here.
PYTHON_SKIP = {
    "from s2mlp import mixer_npz": "needs a Mixer .npz downloaded from gs://mixer_models (tests/test_inference.py "
    "imports a written one)",
}

_FENCE = re.compile(r"^\s*```\s*([\w+-]*)\s*$")
_PROGRAM = re.compile(r"^(\./)?[A-Za-z_][\w.+-]*$")


def fenced_blocks(text: str) -> list[tuple[str, list[str]]]:
    """`text`'s fenced code blocks as (lower-case tag, lines), in order."""
    blocks, block, tag = [], None, ""
    for line in text.splitlines():
        fence = _FENCE.match(line)
        if fence and block is None:
            block, tag = [], fence.group(1).lower()
        elif fence:
            blocks.append((tag, block))
            block = None
        elif block is not None:
            block.append(line)
    return blocks


def readme_commands(text: str) -> list[str]:
    """The shell commands of `text`'s fenced code blocks, normalised as the module docstring says, in order."""
    return [c for tag, lines in fenced_blocks(text) if tag in SHELL_TAGS for c in _block_commands(lines)]


def readme_python_blocks(text: str) -> list[str]:
    """The code of `text`'s fenced ``python`` blocks, in order."""
    return ["\n".join(lines) + "\n" for tag, lines in fenced_blocks(text) if tag == "python"]


def _block_commands(lines: list[str]) -> list[str]:
    joined, current = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    if current:
        joined.append(current)
    commands = []
    for line in joined:
        line = re.sub(r"^\s*\$ ", "", line)
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        if not line or line.startswith("#") or not _PROGRAM.match(line.split()[0]):
            continue
        commands.extend(" ".join(part.split()) for part in line.split("&&") if part.strip())
    return commands


def _readme() -> list[str]:
    with open(README, encoding="utf-8") as f:
        return readme_commands(f.read())


def test_readme_commands_are_extracted():
    text = """
Intro `python inline.py` is not a command.
```bash
python3 -m pip install -e ".[x]" && python3 main.py --a=1 \\
    --b=2   # trailing comment
# a comment line
```
```python
print("python code is not shell")
```
```
<data_dir>/downloads/manual/file.tar
tfds build thing --data_dir=<data_dir>
```
   ```
   $ ruff check .
   ```
"""
    assert readme_commands(text) == [
        'python3 -m pip install -e ".[x]"',
        "python3 main.py --a=1 --b=2",
        "tfds build thing --data_dir=<data_dir>",
        "ruff check .",
    ]


def test_every_readme_command_is_covered():
    commands = _readme()
    assert len(commands) >= 5, commands  # the Quick start alone has five
    assert not set(RUN) & set(SKIP)
    uncovered = [c for c in commands if c not in RUN and c not in SKIP]
    assert not uncovered, (
        "README commands neither run nor skipped; add each to RUN (how to run it briefly) or to SKIP (why not) in "
        "tests/test_readme.py:\n" + "\n".join(uncovered)
    )
    assert all(len(reason) > 10 for reason in SKIP.values())
    stale = [c for c in (*RUN, *SKIP) if c not in commands]
    assert not stale, "entries of tests/test_readme.py no longer in README.md; remove them:\n" + "\n".join(stale)


def test_every_readme_python_block_runs_or_is_skipped():
    with open(README, encoding="utf-8") as f:
        first_lines = [block.splitlines()[0] for block in readme_python_blocks(f.read())]
    assert "import numpy as np" in first_lines  # the inference example
    stale = [line for line in PYTHON_SKIP if line not in first_lines]
    assert not stale, "PYTHON_SKIP entries no longer first lines of README python blocks:\n" + "\n".join(stale)


def _copy_checkout(root: str) -> None:
    """The checkout's tracked and untracked-not-ignored files (what a fresh clone plus the user's edits has)."""
    import shutil

    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode()  # fmt: skip
    for name in filter(None, listed.split("\0")):
        source = os.path.join(REPO, name)
        if os.path.isfile(source):  # a tracked file deleted in the working tree is left out
            os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
            shutil.copy2(source, os.path.join(root, name))


def _write_inputs(root: str) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    digit = np.round(load_digits().images[-1] * 255 / 16).astype(np.uint8)
    photo = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    for name, kind in INPUTS.items():
        path = os.path.join(root, name)
        if kind == "digit":
            Image.fromarray(digit).save(path)
        elif kind == "photo":
            Image.fromarray(photo).save(path)
        else:
            os.makedirs(os.path.join(path, "more"))
            Image.fromarray(digit).save(os.path.join(path, "one.png"))
            Image.fromarray(photo).save(os.path.join(path, "more", "two.jpg"))


def _argv(command: str, run: Run) -> tuple[list[str], str | None]:
    """The argv to execute for `command` by the module docstring's rules, and the file stdout goes to (or None)."""
    tokens = shlex.split(command)
    stdout = None
    if ">" in tokens:
        i = tokens.index(">")
        tokens, stdout = tokens[:i] + tokens[i + 2 :], tokens[i + 1]
    tokens += list(run.append)
    if tokens[0] in ("python", "python3"):
        tokens[0] = sys.executable
    elif tokens[0] == "ruff":
        tokens[:1] = [sys.executable, "-m", "ruff"]
    if tokens[1:4] == ["-m", "pip", "install"]:
        tokens[4:4] = ["--dry-run", "--no-index", "--no-build-isolation"]
    return tokens, stdout


def _created(path, content: str) -> bool:
    if path.is_dir():
        return True
    if not path.is_file() or path.stat().st_size == 0:
        return False
    return not content or re.search(content, path.read_text()) is not None


def test_readme_commands_run(tmp_path):
    commands = [c for c in _readme() if c in RUN]
    assert commands, "no README command is run"
    checkout = tmp_path / "checkout"
    _copy_checkout(str(checkout))
    _write_inputs(str(checkout))
    # As a user runs them: without the 8 fake CPU devices tests/conftest.py gives the test processes, and with
    # the copy's own modules (the working directory comes first on sys.path).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    failures = []
    for command in commands:
        run = RUN[command]
        argv, stdout_file = _argv(command, run)
        start = time.time()
        with open(checkout / stdout_file, "w") if stdout_file else open(os.devnull, "w") as sink:
            out = subprocess.run(
                argv,
                cwd=checkout,
                env=env,
                stdout=sink if stdout_file else subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                timeout=600,
            )
        text = (out.stdout or "") + out.stderr
        print(f"{time.time() - start:6.1f} s  exit {out.returncode}  {shlex.join(argv)}")
        if out.returncode != 0:
            failures.append(f"{command}\n  -> exit {out.returncode}:\n{text[-2000:]}")
        elif run.expect and not re.search(run.expect, text):
            failures.append(f"{command}\n  -> output does not match {run.expect!r}:\n{text[-2000:]}")
        elif run.creates and not _created(checkout / run.creates, run.content):
            failures.append(f"{command}\n  -> {run.creates} missing, empty or not matching {run.content!r}")
    with open(README, encoding="utf-8") as f:
        blocks = [b for b in readme_python_blocks(f.read()) if b.splitlines()[0] not in PYTHON_SKIP]
    for block in blocks:
        out = subprocess.run([sys.executable, "-c", block], cwd=checkout, env=env, capture_output=True, text=True,
                             timeout=600)  # fmt: skip
        if out.returncode != 0:
            failures.append(f"README python block:\n{block}\n  -> exit {out.returncode}:\n{out.stderr[-2000:]}")
    assert not failures, "\n\n".join(failures)
