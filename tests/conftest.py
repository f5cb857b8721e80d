"""Shared test set-up: reference data location and hypothesis profiles."""

import os
import pathlib

import hypothesis

REFERENCE_DIR = pathlib.Path(__file__).parent / "data" / "reference"

hypothesis.settings.register_profile("default", max_examples=25, deadline=None)
hypothesis.settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
hypothesis.settings.load_profile("ci" if os.environ.get("CI") else "default")
