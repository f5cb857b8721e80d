"""Shared test set-up: reference data location, hypothesis profiles, a trained smoke run."""

import os
import pathlib

import hypothesis
import pytest

REFERENCE_DIR = pathlib.Path(__file__).parent / "data" / "reference"

hypothesis.settings.register_profile("default", max_examples=25, deadline=None)
hypothesis.settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
hypothesis.settings.load_profile("ci" if os.environ.get("CI") else "default")


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory):
    """A trained smoke run (configs/smoke.py): tests that read it share the xdist group
    'smoke_workdir', so a worker trains it once."""
    from f8net_jax.configs import smoke
    from f8net_jax import train
    workdir = str(tmp_path_factory.mktemp("integer") / "smoke")
    train.train_and_evaluate(smoke.get_config(), workdir)
    return workdir
