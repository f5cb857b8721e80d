"""Both notebooks run top to bottom in a fresh kernel and say what they should."""

import pathlib
import re
import sys

import pytest


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "notebooks"))
import run_notebooks  # noqa: E402


def stream_text(notebook) -> str:
    return "".join(out.get("text", "") for cell in notebook.cells
                   for out in cell.get("outputs", []) if out.get("output_type") == "stream")


def test_notebooks_are_committed_without_outputs():
    import nbformat
    for name in run_notebooks.NOTEBOOKS:
        notebook = nbformat.read(run_notebooks.HERE / name, as_version=4)
        assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")


def test_quantizer_explorer_reproduces_the_rule_constants():
    text = stream_text(run_notebooks.execute("quantizer_explorer.ipynb"))
    constants = [float(c) for c in re.findall(r"c =\s+([\d.]+) \(official procedure\),\s+([\d.]+)",
                                              text)[0] + re.findall(
        r"c =\s+([\d.]+) \(official procedure\),\s+([\d.]+)", text)[1]]
    signed_official, signed_precise, unsigned_official, unsigned_precise = constants
    assert 36 < signed_official < 41 and 39 < signed_precise < 41
    assert 64 < unsigned_official < 74 and 70 < unsigned_precise < 75
    difference = float(re.search(r"largest difference: ([\d.e+-]+)", text).group(1))
    assert difference < 1e-5  # PACT and F8Net's format + scale give the same numbers


@pytest.mark.slow
def test_formats_inspector_trains_and_plots_a_smoke_run(monkeypatch):
    monkeypatch.delenv("F8NET_WORKDIR", raising=False)
    text = stream_text(run_notebooks.execute("formats_inspector.ipynb"))
    assert "resnet20 mnist5k (16, 16, 1)" in text
    assert re.search(r"stem\s+8\s+\d", text)  # pixels enter at fl 8
