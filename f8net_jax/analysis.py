"""Analysis of fixed-point quantization, for the notebooks and for reports.

* ``relative_error``: RMS error of Q(.; fl) divided by sigma, for a zero-mean Gaussian of
  std sigma (signed formats) or a rectified one (unsigned), over a grid of sigmas and fls;
* ``optimal_fraclen``, ``rule_constant``, ``low_error_range``: the staircase of best
  formats, the constant c of the rule fl = floor(log2(c / sigma)) fitted to it, and the
  sigmas for which the best format stays under an error level;
* ``layer_formats``: what a trained model chose, per layer (``checkpoints.load_workdir``
  loads one).
"""

import functools
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from f8net_jax import fixed_point as fp
from f8net_jax import format_rules


def relative_error(sigmas: Sequence[float], *, signed: bool, bits: int = 8,
                   num_samples: int = 10_000, seed: int = 0,
                   fresh_draws: bool = False) -> np.ndarray:
    """[len(sigmas), bits - signed + 1]: sqrt(mean((x - Q(x; fl))^2)) / sigma for
    x = sigma * z (signed) or relu(sigma * z) (unsigned), z ~ N(0, 1), every fl.

    By default one draw of z serves every sigma (common random numbers: smooth curves);
    ``fresh_draws`` draws z anew for each sigma, as the official analysis does.
    """
    fraclens = jnp.arange(fp.max_fraclen(signed=signed, bits=bits) + 1, dtype=jnp.float32)

    @jax.jit
    def errors(sigma, key):
        z = jax.random.normal(key, (num_samples,), jnp.float32)
        x = sigma * z if signed else jax.nn.relu(sigma * z)
        return jax.vmap(lambda fl: format_rules.quantization_rms_error(
            x, fl, signed=signed, bits=bits))(fraclens) / sigma

    base = jax.random.PRNGKey(seed)
    keys = jax.random.split(base, len(sigmas)) if fresh_draws else [base] * len(sigmas)
    return np.stack([np.asarray(errors(jnp.float32(s), k)) for s, k in zip(sigmas, keys)])


def optimal_fraclen(errors: np.ndarray) -> np.ndarray:
    """The fl of lowest error for each sigma (row); among equal errors the largest fl, so
    that for tiny sigmas, where every format rounds everything to 0, the staircase stays at
    the top format (the official analysis patches its argmin the same way)."""
    errors = np.asarray(errors)
    reversed_best = np.argmin(errors[:, ::-1], axis=1)
    return errors.shape[1] - 1 - reversed_best


def rule_constant(sigmas: Sequence[float], optimal: np.ndarray):
    """Fits c in fl* = floor(log2(c / sigma)): for each fl >= 1, the threshold sigma_fl at
    which the best format first drops to fl - 1 satisfies sigma_fl * 2^fl ~ c; c is their
    geometric mean. Returns (c, {fl: sigma_fl})."""
    sigmas, optimal = np.asarray(sigmas), np.asarray(optimal)
    thresholds = {}
    for fl in range(1, int(optimal.max()) + 1):
        below = np.nonzero(optimal == fl - 1)[0]
        if below.size:
            thresholds[fl] = float(sigmas[below[0]])
    if not thresholds:
        raise ValueError("the optimal formats never step down: widen the sigma grid")
    logs = [fl + np.log2(s) for fl, s in thresholds.items()]
    return float(2.0 ** np.mean(logs)), thresholds


def low_error_range(sigmas: Sequence[float], errors: np.ndarray, level: float = 0.01):
    """(smallest, largest) sigma whose best relative error is below ``level``."""
    best = np.min(np.asarray(errors), axis=1)
    inside = np.nonzero(best < level)[0]
    if inside.size == 0:
        return None
    return float(np.asarray(sigmas)[inside[0]]), float(np.asarray(sigmas)[inside[-1]])


@functools.lru_cache(maxsize=32)
def _sown_fn(model, image_shape: tuple, collections: tuple):
    """The jitted eval forward that reports ``collections``, one per (model, shape), so that
    repeated calls (every evaluation of a run) compile once."""
    return jax.jit(lambda v: model.apply(
        v, jnp.zeros((1,) + image_shape, jnp.uint8), train=False,
        mutable=list(collections))[1])


def layer_formats(model, variables, image_shape, collections=("formats",)) -> dict:
    """Per layer of a fixed-point model, the formats its eval forward uses: input fraclen,
    weight fraclen, alpha (formats depend on the variables, not on the images). With
    ``collections=("formats", "folded")`` also the folded float weight W_f of each conv."""
    variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats",
                                                             "quant_stats")}
    sown = _sown_fn(model, tuple(image_shape), tuple(collections))(variables)
    table: dict = {}
    for collection in collections:
        flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(sown.get(collection, {})))
        for path, values in flat.items():
            value = np.asarray(values[0])
            table.setdefault("/".join(path[:-1]), {})[path[-1]] = (
                value if value.ndim else float(value))
    return table
