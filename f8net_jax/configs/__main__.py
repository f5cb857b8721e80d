"""Prints the folder of the shipped configs: ``--config=$(python -m f8net_jax.configs)/X.py``."""

from f8net_jax.configs import DIRECTORY

print(DIRECTORY)
