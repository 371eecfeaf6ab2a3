"""colab/explore.ipynb runs top to bottom on the CPU (a small step count, a few eval examples)."""

import pathlib

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXLM_NOTEBOOK_STEPS", "12")
    monkeypatch.setenv("PREFIXLM_NOTEBOOK_LIMIT", "4")
    nb = nbformat.read(ROOT / "colab" / "explore.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "colab")}}).execute()
    outputs = "".join(
        o.get("text", "") + "".join(o.get("data", {}).get("text/plain", ""))
        for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
    )
    assert "vocab: 128256" in outputs
    assert "b' person', b' persona', b' personal'" in outputs
    assert "prefix_norm      sum(q) = 1.000000" in outputs
    assert "loss " in outputs and "->" in outputs
    assert "charbench" in outputs
    images = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # two target plots, the histogram, the loss curve
