"""Defaults of every configuration field (defined, one comment each, in
f8net_jax/defaults.py); each experiment config starts from these.

    python -m f8net_jax.main --config=configs/default.py --workdir=/tmp/f8net_default

(trains the fixed-point ResNet-20 on synthetic data). Any field can be overridden on the
command line, e.g. --config.batch_size=64 or --config.quant.format_rule=grid.
"""

from f8net_jax.defaults import get_config  # noqa: F401
