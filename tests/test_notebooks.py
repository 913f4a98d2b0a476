"""Notebooks: stored without outputs, and they execute on sample_data derivatives with figures."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from conftest import colour_count

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
# notebook -> least number of PNG figures its executed outputs must hold
EXPECTED_FIGURES = {"lesion_trajectories.ipynb": 3, "cohort_trajectories.ipynb": 3}

nbformat = pytest.importorskip("nbformat", reason="install the 'notebooks' extra")


@pytest.mark.parametrize("name", sorted(EXPECTED_FIGURES))
def test_stored_without_outputs_and_parameterised(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, \
                f"{name}: outputs stored in git (clear them before committing)"
    first = nb.cells[0]
    assert "parameters" in first.metadata.get("tags", []) and "OUTPUT_DIR = " in first.source


def test_every_notebook_is_tested():
    assert {p.name for p in NOTEBOOKS.glob("*.ipynb")} == set(EXPECTED_FIGURES)


def _execute(name: str, output_dir: Path, cwd: Path):
    nbclient = pytest.importorskip("nbclient", reason="install the 'notebooks' extra")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb.cells[0].source = f"OUTPUT_DIR = {str(output_dir)!r}\nSUBJECT = None\nDAY_BINS = None\n"
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def _pngs(nb) -> list[np.ndarray]:
    images = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" in data:
                images.append(mpimg.imread(io.BytesIO(base64.b64decode(data["image/png"]))))
    return images


@pytest.mark.parametrize("name", sorted(EXPECTED_FIGURES))
def test_notebook_executes_with_figures(name, sample_output, tmp_path):
    nb = _execute(name, sample_output, tmp_path)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    images = _pngs(nb)
    assert len(images) >= EXPECTED_FIGURES[name], f"{name}: {len(images)} figure(s)"
    for i, image in enumerate(images):
        assert colour_count(image) > 8, f"{name}: figure {i} is empty"
