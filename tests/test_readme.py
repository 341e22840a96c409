"""Every shell command in README.md's fenced code blocks is run here, or listed in SKIP with the reason.

Which lines are commands: fenced blocks tagged ``bash``, ``sh``, ``shell`` or ``console``, or untagged (those
also hold folder layouts, whose lines start with ``<`` or a path, so they are not commands); ``python`` blocks
and inline code are not shell commands. A line continued with ``\\`` is joined to the next, a ``$ `` prompt and a
trailing ``# comment`` are dropped, whitespace is collapsed, and a line joined with ``&&`` is several commands.

Each command must be a key of RUN or of SKIP, exactly as `readme_commands` prints it; one that is in neither,
and an entry that is no longer in the README, fail `test_every_readme_command_is_covered`, so a new README
command must be added to one of them:

- RUN: executed in README order by `test_readme_commands_run`, from the repository root, in one scratch world.
  The rules, applied to every command (nothing is downloaded, nothing outside the scratch folder is written):
  * ``python``/``python3`` is this interpreter and ``ruff`` is ``python -m ruff``; the environment is the
    test's minus ``XLA_FLAGS`` (the fake devices of tests/conftest.py), as on a one-CPU machine;
  * ``pip install ...`` gets ``--dry-run --no-index --no-build-isolation``: pip resolves the requested extras
    against the installed packages and reports what it would install, without downloading or installing;
  * the paths in `SCRATCH` (``/tmp/s2mlp_demo``, the example images ``digit.png``, ``photo.jpg``, the folder
    ``photos/``, output files) are replaced by files under the test's scratch folder, whole or as a
    ``--flag=PATH`` value; ``> FILE`` redirects stdout there too;
  * a RUN entry's ``append`` is added to the command: training commands get ``--config.total_steps=2`` (two
    steps instead of minutes; the last step still evaluates and writes a checkpoint).
  Each command must exit 0; ``expect`` (a regex over stdout + stderr) and ``creates`` (a path in the scratch
  folder that must then exist and be non-empty) check what it did.
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
    "python3 main.py --config=configs/demo.py --workdir=/tmp/s2mlp_demo": Run(
        append=SHORT_TRAINING, creates="s2mlp_demo/checkpoints/2/params"
    ),
    'python3 -m pip install -e ".[test]"': Run(expect=r"Would install s2mlp-"),
    "ruff check .": Run(expect=r"All checks passed"),
    "ruff format --check .": Run(expect=r"files? already formatted"),
    "python3 -m pip install -e .": Run(expect=r"Would install s2mlp-"),
    "python3 -m s2mlp.predict --checkpoint=/tmp/s2mlp_demo digit.png photo.jpg": Run(
        expect=r"digit\.png\n\s+1\. .*\n(.*\n){4}.*photo\.jpg\n\s+1\. "
    ),
    "python3 -m s2mlp.predict --checkpoint=/tmp/s2mlp_demo --output=csv --top_k=3 photos/ > top3.csv": Run(
        creates="top3.csv",
        content=r"^path,label_1,index_1,probability_1,.*probability_3\n.*more/two\.jpg,.*\n.*one\.png,",
    ),
    # --dry_run checks and lists the study's runs without training or writing anything.
    "python study.py --study=configs/studies/shift_ablation.py --workdir=runs/shift_ablation --dry_run": Run(
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
    "tfds build imagenet2012 --data_dir=<data_dir>": "needs the ImageNet tars (~145 GB) from image-net.org",
    "python study.py --study=configs/studies/shift_ablation.py --workdir=runs/shift_ablation": (
        "trains every run of the study (tens of runs of hundreds of steps); tests/test_study.py runs tiny studies"
    ),
    "python -m s2mlp.report runs/shift_ablation --out=/tmp/shift_ablation_report": (
        "needs the finished study of the command above"
    ),
    "python study.py --study=configs/studies/shift_ablation.py:fashion_mnist --workdir=runs/shift_fmnist": (
        "trains the 33 runs of the study (about 2 h on a 2-core CPU) on Debian's Fashion-MNIST files; "
        "tests/test_study.py expands it on IDX files it writes"
    ),
    "python study.py --study=configs/studies/mixer_vs_s2mlp.py:fashion_mnist --workdir=runs/mvs_fmnist": (
        "trains the 27 runs of the study (about 2 h on a 2-core CPU) on Debian's Fashion-MNIST files; "
        "tests/test_study.py expands it on IDX files it writes"
    ),
}

# README path -> (kind, name under the scratch folder). 'digit'/'photo': an image written there; 'photos': a
# folder of images; 'dir': a fresh folder name; 'file': an output file name.
SCRATCH = {
    "/tmp/s2mlp_demo": ("dir", "s2mlp_demo"),
    "digit.png": ("digit", "digit.png"),
    "photo.jpg": ("photo", "photo.jpg"),
    "photos/": ("photos", "photos"),
    "top3.csv": ("file", "top3.csv"),
    "runs/shift_ablation": ("dir", "runs/shift_ablation"),
}

_FENCE = re.compile(r"^\s*```\s*([\w+-]*)\s*$")
_PROGRAM = re.compile(r"^(\./)?[A-Za-z_][\w.+-]*$")


def readme_commands(text: str) -> list[str]:
    """The shell commands of `text`'s fenced code blocks, normalised as the module docstring says, in order."""
    commands, block, tag = [], None, ""
    for line in text.splitlines():
        fence = _FENCE.match(line)
        if fence and block is None:
            block, tag = [], fence.group(1).lower()
            continue
        if fence:
            if tag in SHELL_TAGS:
                commands.extend(_block_commands(block))
            block = None
            continue
        if block is not None:
            block.append(line)
    return commands


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


def _make_scratch(root) -> dict[str, str]:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    digit = np.round(digits.images[-1] * 255 / 16).astype(np.uint8)
    photo = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    paths = {}
    for readme_path, (kind, name) in SCRATCH.items():
        path = os.path.join(root, name)
        paths[readme_path] = path
        if kind == "digit":
            Image.fromarray(digit).save(path)
        elif kind == "photo":
            Image.fromarray(photo).save(path)
        elif kind == "photos":
            os.makedirs(os.path.join(path, "more"))
            Image.fromarray(digit).save(os.path.join(path, "one.png"))
            Image.fromarray(photo).save(os.path.join(path, "more", "two.jpg"))
    return paths


def _argv(command: str, run: Run, paths: dict[str, str]) -> tuple[list[str], str | None]:
    """The argv to execute for `command` by the module docstring's rules, and the file stdout goes to (or None)."""
    tokens = shlex.split(command)
    stdout = None
    if ">" in tokens:
        i = tokens.index(">")
        tokens, stdout = tokens[:i] + tokens[i + 2 :], tokens[i + 1]

    def swap(token: str) -> str:
        if token in paths:
            return paths[token]
        flag, eq, value = token.partition("=")
        return f"{flag}={paths[value]}" if eq and value in paths else token

    tokens = [swap(t) for t in tokens] + list(run.append)
    stdout = swap(stdout) if stdout else None
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
    paths = _make_scratch(tmp_path)
    # As a user runs them: without the 8 fake CPU devices tests/conftest.py gives the test processes.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    failures = []
    for command in commands:
        run = RUN[command]
        argv, stdout_file = _argv(command, run, paths)
        start = time.time()
        with open(stdout_file, "w") if stdout_file else open(os.devnull, "w") as sink:
            out = subprocess.run(
                argv,
                cwd=REPO,
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
        elif run.creates and not _created(tmp_path / run.creates, run.content):
            failures.append(f"{command}\n  -> {run.creates} missing, empty or not matching {run.content!r}")
    assert not failures, "\n\n".join(failures)
