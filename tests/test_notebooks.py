"""The notebooks run from top to bottom (so they cannot rot), and are saved without the paths of the machine
that last ran them."""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))

# An absolute path: "/a/b..." not inside a URL or a relative path ("lime/lora", "https://x/y"), or "C:\...".
ABSOLUTE_PATH = re.compile(r"(?<![\w.~/:@-])/(?:[\w.@+-]+/)+|\b[A-Za-z]:\\[\w.]")
TEXT_FIELDS = ("text/plain", "text/html", "text/markdown", "text/latex", "application/json")


def output_texts(notebook) -> list[tuple[int, str]]:
    """(cell index, text) of every saved output a reader sees as text; images are binary and skipped."""
    texts = []
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                texts.append((index, output.text))
            elif output.output_type == "error":
                texts.append((index, "\n".join([output.evalue, *output.traceback])))
            else:
                data = output.get("data", {})
                texts.extend((index, str(data[key])) for key in TEXT_FIELDS if key in data)
    return texts


def machine_paths(notebook) -> list[str]:
    return [f"cell {index}: {match.group(0)}" for index, text in output_texts(notebook)
            for match in ABSOLUTE_PATH.finditer(text)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
@pytest.mark.slow
def test_notebook_executes(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_saved_outputs_hold_no_absolute_paths(path):
    notebook = nbformat.read(path, as_version=4)
    found = machine_paths(notebook)
    assert not found, f"{path.name}: saved outputs hold absolute paths of a machine (clear or rewrite them): {found}"


@pytest.mark.parametrize(("text", "is_path"), [
    ("/work/main/.venv/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning", True),
    ("saved to /root/.cache/lime/x", True),
    ('File "/home/user/lime/layer.py", line 3', True),
    ("adapter written to /tmp/tmpab12/", True),
    (r"C:\Users\me\lime", True),
    ("See https://ipywidgets.readthedocs.io/en/stable/user_install.html", False),
    ("LiME lime/lora: 8 wrapped modules", False),
    ("outputs/2026-01-01/12-00-00 and ~/.cache/lime/mmt_mini", False),
    ("loss 4.203 -> 4.118, 3/4 experts, 12.5 samples/s", False),
])
def test_absolute_path_pattern(text, is_path):
    assert bool(ABSOLUTE_PATH.search(text)) == is_path
