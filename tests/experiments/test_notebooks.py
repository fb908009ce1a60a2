"""The notebooks in experiments/notebooks execute top to bottom, headless (nbclient), at tiny settings taken from
their parameters' environment variables, and are committed without outputs."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOKS = os.path.join(ROOT, "experiments", "notebooks")


def execute(name: str, tmp_path, **env: str) -> nbformat.NotebookNode:
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits the environment; the parameters cell reads it
    try:
        # run where Jupyter would: in the notebooks' directory (the notebooks find the repository root from it)
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def test_notebooks_are_committed_without_outputs():
    for name in sorted(os.listdir(NOTEBOOKS)):
        if name.endswith(".ipynb"):
            nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
            for cell in nb.cells:
                if cell.cell_type == "code":
                    assert not cell.outputs and cell.execution_count is None, f"{name} has outputs"


def images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.outputs)


@pytest.mark.slow  # ~1-2 min: a few tiny_lm steps with a low tau, then the plots
def test_muonclip_notebook(tmp_path):
    nb = execute("muonclip.ipynb", tmp_path, K25_NB_MUONCLIP_DIR=str(tmp_path / "run"), K25_NB_STEPS="6",
                 K25_NB_TAU="0.05")  # below the untrained model's logits: heads clip from the first step
    assert images(nb) == 2
    printed = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
    events = int(printed.split("clipping events: ")[1].split()[0])
    assert events > 0


@pytest.mark.slow  # ~3 min: three smoke arms (one seed), then the table and plots
def test_early_fusion_notebook(tmp_path):
    nb = execute("early_fusion.ipynb", tmp_path, K25_NB_EARLY_FUSION_DIR=str(tmp_path / "ef"), K25_NB_SEEDS="1",
                 K25_NB_VARIANT="smoke")
    assert images(nb) == 2
    assert os.path.exists(tmp_path / "ef" / "table.md")


@pytest.mark.slow  # ~3 min: four smoke phases, then the heat maps
def test_long_context_notebook(tmp_path):
    nb = execute("long_context.ipynb", tmp_path, K25_NB_LONG_CONTEXT_DIR=str(tmp_path / "lc"), K25_NB_SMOKE="1")
    assert images(nb) == 2
