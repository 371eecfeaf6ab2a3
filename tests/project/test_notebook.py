"""colab/explore.ipynb runs top to bottom on the CPU (a small step count, a few eval examples)."""

import pathlib

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[2]


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
    from prefixlm import objectives

    assert f"{len(objectives.FAMILIES)} families" in outputs and "prefix_longest" in outputs
    images = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # two target plots, the histogram, the loss curve


def _install_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("colab_install", ROOT / "colab" / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_install_cell_keeps_colabs_accelerator_jax():
    """Before: a placeholder URL, and `pip install -r requirements.txt` (the CPU jax pin) over
    the jax that Colab's GPU/TPU runtimes bring."""
    nb = nbformat.read(ROOT / "colab" / "explore.ipynb", as_version=4)
    install = nb.cells[1].source
    assert "YOUR_ORG" not in install and "-r\", \"requirements.txt" not in install
    assert "colab/install.py" in install
    install_py = _install_module()
    on_gpu = install_py.requirements(accelerator=True)
    on_cpu = install_py.requirements(accelerator=False)
    assert not [r for r in on_gpu if install_py._package(r) in ("jax", "jaxlib")], on_gpu
    assert "jax==0.10.2" in on_cpu and "jaxlib==0.10.2" in on_cpu
    assert set(on_cpu) - set(on_gpu) == {"jax==0.10.2", "jaxlib==0.10.2"}
    assert "--no-deps" in (ROOT / "colab" / "install.py").read_text()


def test_the_text_reads_the_families_from_the_registry():
    import re

    from prefixlm import objectives

    nb = nbformat.read(ROOT / "colab" / "explore.ipynb", as_version=4)
    text = " ".join(c.source for c in nb.cells if c.cell_type == "markdown")
    counted = re.findall(r"\b(two|three|four|five|six|seven|eight|\d+) (?:objective )?famil",
                         text)
    assert not counted, counted  # a number written in the text goes stale with the registry
    code = " ".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "objectives.FAMILIES" in code and len(objectives.FAMILIES) >= 6
