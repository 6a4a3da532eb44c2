"""The colab evaluation notebooks run top to bottom on the quickstart checkpoint (CPU)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

NOTEBOOKS = ["linear_probe.ipynb", "samples.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, trained_quickstart, monkeypatch):
  monkeypatch.setenv("IGPT_NOTEBOOK_WORKDIR", trained_quickstart)
  monkeypatch.setenv("IGPT_JAX_REPO_DIR", str(REPO))
  nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
  assert nb.cells[1].cell_type == "code" and "pip" in nb.cells[1].source  # installs first
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
  if name == "linear_probe.ipynb":
    assert "best layer" in text and "labels/class" in text
    assert len(images) == 1
    assert os.path.exists(os.path.join(trained_quickstart, "eval", "linear_probe.json"))
  else:
    assert "restored step 120" in text
    assert len(images) == 2
