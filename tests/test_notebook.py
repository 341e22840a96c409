"""notebooks/s2mlp_colab.ipynb: committed without outputs, runs top to bottom on a tiny trained run, and draws
every figure (saved to PNG through the notebook's `S2MLP_FIGURE_DIR` and checked: not empty, not blank)."""

from __future__ import annotations

import os

import nbformat
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "s2mlp_colab.ipynb")


# The figures the notebook saves for an S²-MLP digits run, and the widest each may be (pixels at 100 dpi):
# the picture grids are laid out 8 inches wide, the digits as 2 rows of 5.
FIGURES = {
    "photos": 820,
    "digits": 820,
    "curves": 1020,
    "per_class": 1020,
    "shift": 1020,
    "receptive_fields": 1200,
    "s2mlp_vs_mixer": 820,
    "first_block_fields": 620,
}


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    dirty = [i for i, cell in enumerate(code) if cell.outputs or cell.execution_count is not None]
    assert not dirty, f"code cells {dirty} keep outputs: clear them before committing"
    assert "S2MLP_CHECKPOINT" in code[0].source, "the first code cell must be the path cell"
    assert "widgets" not in nb.metadata


@pytest.mark.parametrize("scan", [False, True])
def test_notebook_runs_headless(tiny_s2mlp_run, tmp_path, monkeypatch, scan):
    """`scan`: the run trained with scanned blocks (the receptive-field cells failed: no ``block_<i>`` entries)."""
    from nbclient import NotebookClient
    from PIL import Image

    figures = tmp_path / "figures"
    run = tiny_s2mlp_run
    if scan:
        import train_lib
        from configs import tiny

        config, run = tiny.get_config("s2mlp_tiny"), str(tmp_path / "scanned")
        config.model.overrides = {"scan": True}
        train_lib.train_and_evaluate(config, run)
    monkeypatch.setenv("S2MLP_CHECKPOINT", run)
    monkeypatch.setenv("S2MLP_FIGURE_DIR", str(figures))
    monkeypatch.setenv("MPLBACKEND", "Agg")  # draws (to PNG through savefig) without a display
    monkeypatch.delenv("S2MLP_MIXER_NPZ", raising=False)  # the notebook's own untrained mixer_tiny
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": os.path.join(REPO, "notebooks")}}
    )
    client.execute()  # raises CellExecutionError naming the cell on any error
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    text = "".join(out.get("text", "") for out in outputs)
    assert "s2mlp_tiny" in text and "step 6" in text
    assert "measured receptive fields equal the shift's prediction" in text
    assert "last eval:" in text  # the curves came from the run's metrics.jsonl
    assert "per-class top-1 of the 'test' eval at step 6 (ema_params" in text  # the run's eval/test_step6/
    assert "No checkpoint in" not in text  # it loaded the run instead of training the demo
    assert ("'scan': True" in text) == scan

    assert sorted(p.name for p in figures.iterdir()) == sorted(f"{name}.png" for name in FIGURES)
    for name, max_width in FIGURES.items():
        path = figures / f"{name}.png"
        assert path.stat().st_size > 5_000, (name, path.stat().st_size)
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"), np.float32)
        assert pixels.std() > 10, (name, pixels.std())  # drawn, not a blank canvas
        assert 300 < pixels.shape[1] <= max_width, (name, pixels.shape)
    digits = np.asarray(Image.open(figures / "digits.png").convert("L"))
    assert digits.shape[0] < digits.shape[1]  # 2 rows of 5, not a 1 x 10 strip


@pytest.mark.parametrize("repo", ["s2mlp", ""])
def test_setup_cell_finds_the_checkout_outside_it(tmp_path, monkeypatch, repo):
    """Colab's layout: the notebook runs in /content, the checkout is /content/s2mlp (a folder named like the
    package), named by S2MLP_REPO or not; the setup cell puts the checkout on the path, so the app (train_lib,
    configs) imports from it."""
    from nbclient import NotebookClient

    (tmp_path / "s2mlp").symlink_to(REPO, target_is_directory=True)
    monkeypatch.setenv("S2MLP_REPO", repo)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    probe = "import configs.demo, s2mlp.checkpoint, train_lib\nprint(train_lib.__file__, s2mlp.checkpoint.__file__)"
    nb.cells = [*code[:2], nbformat.v4.new_code_cell(probe)]
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(out.get("text", "") for out in nb.cells[2].outputs).split()
    assert printed == [str(tmp_path / "s2mlp" / "train_lib.py"), str(tmp_path / "s2mlp" / "s2mlp" / "checkpoint.py")]


def test_a_path_of_the_users_that_holds_no_checkpoint_is_refused_not_trained_into(tmp_path, monkeypatch):
    """The demo trains into the notebook's own demo path only: into a mistyped path it trained there and showed it
    as the user's run; into a run of theirs not yet saved it overwrote its config.json."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    monkeypatch.setenv("S2MLP_CHECKPOINT", str(tmp_path / "my_runn"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    nb.cells = code[: next(i for i, c in enumerate(code) if "ckpt.locate(CHECKPOINT)" in c.source) + 1]
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    with pytest.raises(CellExecutionError, match="FileNotFoundError"):
        client.execute()
    assert not (tmp_path / "my_runn").exists()
