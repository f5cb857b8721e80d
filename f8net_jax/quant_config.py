"""How a model quantizes: ``QuantConfig``, the one object that picks the arithmetic of a
model definition (float or the F8Net fixed-point simulation, and every choice within it).
Its fields, with their defaults and comments, are the quant block of the config
(``config_defaults()``, in f8net_jax/defaults.py)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

from f8net_jax import fixed_point as fp
from f8net_jax import folding, ops

MODES = ("float", "fixed")
GRANULARITIES = ("layer", "channel")
LOOP_FIELDS = ("batch_axis_name",)  # QuantConfig fields the training loop sets, not configs


def _choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How a model quantizes. One model definition; this object picks the arithmetic."""

    # Every field but the LOOP_FIELDS is a field of the config's quant block, with this
    # default and this comment (f8net_jax/defaults.py builds the block from them).
    mode: str = "fixed"            # "float" (full precision) or "fixed" (F8Net simulation)
    format_rule: str = "std"       # formats from "std", "mae", "rms" statistics, or "grid" search
    granularity: str = "layer"     # weight formats per "layer" or per output "channel"
    clipping: bool = True          # PACT alpha; off: no clipping, s = 1 (tiny fine-tuning)
    format_momentum: float = 0.1   # running input format: buf <- (1-m) buf + m fl_batch
    weight_format: tuple = (8, 7)  # (bits, initial fraclen) of weights; re-chosen every step
    input_format: tuple = (8, 6)   # (bits, initial running fraclen) of every layer input
    consistent_clip: bool = False  # METHOD.md 8.6: train with the running format's scale
    alpha_init: float = 8.0        # initial PACT clipping level
    bn_momentum: float = 0.1       # PyTorch convention: running <- 0.9 running + 0.1 batch
    bn_eps: float = 1e-5           # BatchNorm epsilon
    rescale_classifier: bool = True   # classifier weight rescaling of the official configs
    share_classifier_alpha: bool = False  # METHOD.md 8.7: classifier reads the chain's alpha
    normalized_input: bool = False  # feed mean/std-normalized images (signed), not pixels
    batch_axis_name: Optional[str] = None  # pmap axis: batch statistics over all devices
    precision: str = "float32"     # operands of the float products and the backward:
                                   # "float32", or "bfloat16" on GPU/TPU (f8net_jax.ops)
    conv_backend: str = "auto"     # "auto" (oneDNN on CPU if found), "xla", "onednn"
    exact_dtype: str = "auto"      # operands of the exact (8-bit grid) pass under XLA:
                                   # "auto" (bfloat16 on GPU/TPU), "bfloat16", "float32"
    share_alpha: bool = True       # METHOD.md 5: the readers of one stream share its alpha;
                                   # False: every layer its own (an ablation)
    wide_fraclen: bool = False     # weight fraclens may pass the word length (up to 15):
                                   # more of the int8 codes for small weights (fp.max_fraclen)

    def __post_init__(self):
        _choice("mode", self.mode, MODES)
        _choice("format_rule", self.format_rule, folding.FORMAT_RULES)
        _choice("granularity", self.granularity, GRANULARITIES)
        for name in ("weight_format", "input_format"):
            value = getattr(self, name)
            if (not isinstance(value, (tuple, list)) or len(value) != 2
                    or not all(isinstance(v, (int, float)) for v in value)):
                raise ValueError(f"{name} must be a pair (bits, fraclen), got {value!r}")
            object.__setattr__(self, name, tuple(value))
        bits = self.weight_format[0]
        if bits != self.input_format[0]:
            raise ValueError(f"weight_format and input_format must have the same bits, got "
                             f"{self.weight_format} and {self.input_format}")
        if bits != 8 and self.format_rule != "grid":
            raise ValueError(
                f"weight_format and input_format must have 8 bits with format_rule "
                f"{self.format_rule!r} (its constants are fitted for 8 bits); got "
                f"{self.weight_format} and {self.input_format}")
        fp.FixedPointFormat(int(bits), int(self.weight_format[1]), True)
        hi = fp.max_fraclen(signed=False, bits=int(self.input_format[0]))
        if not 0 <= self.input_format[1] <= hi:
            raise ValueError(f"input_format fraclen must be in [0, {hi}], got {self.input_format}")
        if not 0.0 < self.format_momentum <= 1.0:
            raise ValueError(f"format_momentum must be in (0, 1], got {self.format_momentum}")
        if not 0.0 < self.bn_momentum <= 1.0:
            raise ValueError(f"bn_momentum must be in (0, 1], got {self.bn_momentum}")
        if not self.alpha_init > 0:
            raise ValueError(f"alpha_init must be positive, got {self.alpha_init}")
        self.compute  # checks the three fields

    @property
    def compute(self) -> ops.ComputePolicy:
        """How this model's products are computed: operand precision and backend
        (f8net_jax.ops)."""
        return ops.ComputePolicy(self.precision, self.conv_backend, self.exact_dtype)

    @property
    def fixed(self) -> bool:
        return self.mode == "fixed"

    @property
    def bits(self) -> int:
        return int(self.weight_format[0])

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "QuantConfig":
        """From an ml_collections.ConfigDict (or any mapping) with a subset of the fields."""
        items = dict(config.items() if hasattr(config, "items") else config)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(items) - known)
        if unknown:
            raise ValueError(f"unknown quant field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**items)


def config_defaults() -> dict:
    """The quant block of the default config: {field: default} of every QuantConfig field
    but the LOOP_FIELDS."""
    return {f.name: f.default for f in dataclasses.fields(QuantConfig)
            if f.name not in LOOP_FIELDS}
