"""The experiment configs, one get_config() per file (the checkout's configs/ is this
folder). ``--config`` takes a file path; an installed package's configs are under
``python -m f8net_jax.configs`` (which prints this folder), e.g.

    python -m f8net_jax.main --config=$(python -m f8net_jax.configs)/smoke.py --workdir=W
"""

import os

DIRECTORY = os.path.dirname(os.path.abspath(__file__))


def path(name: str) -> str:
    """The file of the config ``name`` (``smoke`` or ``smoke.py``) shipped with the package."""
    file = os.path.join(DIRECTORY, name if name.endswith(".py") else name + ".py")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no config {name!r} in {DIRECTORY}")
    return file
