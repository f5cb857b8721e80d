"""Executes the notebooks top to bottom (the tests do), optionally saving their figures.

    python notebooks/run_notebooks.py [--figures docs/figures] [NOTEBOOK ...]
"""

import argparse
import os
import pathlib

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).resolve().parent
NOTEBOOKS = ("quantizer_explorer.ipynb", "formats_inspector.ipynb")


def execute(name: str, figure_dir: str = "", timeout: int = 900) -> nbformat.NotebookNode:
    """Runs one notebook in a fresh kernel; figures go to ``figure_dir`` when given."""
    notebook = nbformat.read(HERE / name, as_version=4)
    previous = os.environ.get("F8NET_FIGURE_DIR")
    os.environ["F8NET_FIGURE_DIR"] = os.path.abspath(figure_dir) if figure_dir else ""
    try:
        NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(HERE.parent)}}).execute()
    finally:
        if previous is None:
            os.environ.pop("F8NET_FIGURE_DIR")
        else:
            os.environ["F8NET_FIGURE_DIR"] = previous
    return notebook


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figures", default="", help="folder for the figures' PNG files")
    parser.add_argument("notebooks", nargs="*", default=NOTEBOOKS)
    args = parser.parse_args()
    if args.figures:
        os.makedirs(args.figures, exist_ok=True)
    for name in args.notebooks:
        execute(name, args.figures)
        print(f"ran {name}")


if __name__ == "__main__":
    main()
