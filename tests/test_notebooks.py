"""Notebooks run top to bottom (their code cells, in order, in one namespace)."""

import glob
import json
import os

import pytest

# paper_figures.ipynb draws the outputs of tlt-figures: tests/bench/test_figures.py runs it on its --quick outputs
NOTEBOOKS = sorted(p for p in glob.glob(os.path.join(os.path.dirname(__file__), "..", "notebooks", "*.ipynb"))
                   if not p.endswith("paper_figures.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, capsys):
    nb = json.load(open(path))
    ns = {"__name__": "__notebook__"}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), path, "exec"), ns)
    assert capsys.readouterr().out.strip()
