"""notebooks/s2mlp_colab.ipynb: committed without outputs, and runs top to bottom on a tiny trained run."""

from __future__ import annotations

import os

import nbformat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "s2mlp_colab.ipynb")


def tiny_workdir(tmp_path_factory) -> str:
    """configs.tiny's s2mlp_tiny trained by the trainer, once per session (shared with tests/test_inference.py)."""
    workdir = tmp_path_factory.getbasetemp() / "tiny_s2mlp_run"
    if not (workdir / "checkpoints").is_dir():
        import train_lib
        from configs import tiny

        train_lib.train_and_evaluate(tiny.get_config("s2mlp_tiny"), str(workdir))
    return str(workdir)


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    dirty = [i for i, cell in enumerate(code) if cell.outputs or cell.execution_count is not None]
    assert not dirty, f"code cells {dirty} keep outputs: clear them before committing"
    assert "S2MLP_CHECKPOINT" in code[0].source, "the first code cell must be the path cell"
    assert "widgets" not in nb.metadata


def test_notebook_runs_headless(tmp_path_factory, monkeypatch):
    from nbclient import NotebookClient

    workdir = tiny_workdir(tmp_path_factory)
    monkeypatch.setenv("S2MLP_CHECKPOINT", workdir)
    monkeypatch.setenv("MPLBACKEND", "Agg")
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
    assert "No checkpoint in" not in text  # it loaded the run instead of training the demo
