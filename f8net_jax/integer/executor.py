"""Runs an integer program with integer arithmetic only (JAX).

Activations are 8-bit (uint8 or int8: each backend's storage, integer/backends.py),
weights int8, accumulators, residual streams and logits int32. Each op runs on its
backend's kernel for its kind, or on the kind's reference semantics (integer/ops). The
only multiplications are the int8 x int8 products inside conv and dot_general (int32
accumulation); requantization is shifts, comparisons and adds; nothing is float. ``tests/test_integer.py`` audits the jaxpr of every
architecture for exactly that.

Saturation. Ops marked 'saturate' by the exporter's static check saturate at each step,
as fixed-point hardware does: the alignment shift of each operand, then the add (or the
bias add, or each partial sum of the pool, in XLA's order). Where no intermediate leaves
int32 this equals exact arithmetic; the static bounds prove that for every unmarked op.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from f8net_jax.integer import onednn, ops, vnni
from f8net_jax.integer.arithmetic import zero_point
from f8net_jax.integer.backends import (Backend, Im2colBackend, OnednnBackend, VnniBackend,
                                        XlaBackend)
from f8net_jax.integer.program import IntegerProgram


class Plan:
    """What a backend runs beyond the program: per op a copy with the backend's choices
    (each kind's ``prepare``), the storage code of every tensor ('u8', 's8' or 's32'), the
    (height, width) of every tensor (``spatial``) and the arrays (weights as the backend
    wants them, biases with the zero-point correction -z * sum(w), exact); ``cache`` holds
    what the backend prepares per batch size (``Backend.batch_arrays``)."""

    def __init__(self, backend: Backend, program: IntegerProgram):
        self.backend = backend
        self.cache: dict = {}
        self.code = {name: backend.storage(t["kind"]) if t["kind"] != "int32" else "s32"
                     for name, t in program.tensors.items()}
        self.spatial = spatial_sizes(program)
        self.ops, self.arrays = [], {}
        for op in program.ops:
            op = dict(op)
            ops.kind_of(op).prepare(op, program, self)
            self.ops.append(op)


def spatial_sizes(program: IntegerProgram) -> dict:
    """(height, width) of every tensor of the program (each kind's ``output_size``)."""
    sizes = {}
    for op in program.ops:
        sizes[op["out"]] = ops.kind_of(op).output_size(op, program, sizes)
    return sizes


EXECUTOR_BACKENDS = {b.name: b for b in (OnednnBackend(), VnniBackend(), XlaBackend(),
                                         Im2colBackend())}
KERNEL_BACKENDS = {"onednn": onednn.available, "vnni": vnni.available}


def plan(program: IntegerProgram, backend: str) -> Plan:
    if backend not in EXECUTOR_BACKENDS:
        raise ValueError(f"backend must be one of {list(EXECUTOR_BACKENDS)}, got {backend!r}")
    return Plan(EXECUTOR_BACKENDS[backend], program)


def check_images(program: IntegerProgram, images) -> None:
    """Raises ValueError unless ``images`` is a uint8 batch of the program's image shape."""
    shape = tuple(getattr(images, "shape", ()))
    dtype = getattr(images, "dtype", None)
    expected = tuple(program.image_shape)
    if len(shape) != 4 or shape[1:] != expected:
        raise ValueError(f"images must have shape (batch, {', '.join(map(str, expected))}) for "
                         f"this program, got {shape}")
    if dtype != np.uint8:
        raise ValueError(f"images must be uint8 pixels, got dtype {dtype}")


def _execute(program: IntegerProgram, plan: Plan, arrays: dict, images, collect: bool):
    check_images(program, images)
    run = _Run(images, arrays, plan.code)
    table = plan.backend.table()
    env, seen, code = {}, {}, plan.code
    for op in plan.ops:
        out = op["out"]
        y = table[op["op"]](op, [env[name] for name in op["in"]], run)
        env[out] = y
        if collect:
            z = zero_point(program.tensors[out]["kind"], code[out]) if code[out] != "s32" else 0
            seen[out] = y.astype(jnp.int32) - z
    logits = env[program.output]
    return (logits, seen) if collect else logits


@dataclasses.dataclass
class _Run:
    images: Any
    arrays: dict
    code: dict


def choose_backend() -> tuple[str, str]:
    """(backend, why): 'onednn' on a CPU where oneDNN's int8 kernels load (see
    onednn.available), else 'vnni' where the AVX-512 VNNI kernel does, 'xla' on other CPUs,
    'im2col' on GPUs and TPUs."""
    if jax.default_backend() != "cpu":
        return "im2col", f"JAX runs on {jax.default_backend()}: int8 GEMMs over patches"
    passed = []
    for name, available in KERNEL_BACKENDS.items():
        ok, why = available()
        if ok:
            return name, "; ".join(passed + [f"{name}: its kernels loaded"])
        passed.append(f"not {name}: {why}")
    return "xla", "; ".join(passed + ["XLA's int8 convolution"])


def default_backend() -> str:
    """The backend ``choose_backend`` picks on this machine."""
    return choose_backend()[0]


class Executor:
    """A compiled integer program: ``executor(images) -> int32 logits`` (at fraclen
    ``program.logits_fraclen``); ``executor.collect(images)`` also returns every tensor.
    ``backend``: 'onednn' (oneDNN's int8 convolutions and inner product: AMX or VNNI),
    'vnni' (the AVX-512 VNNI kernel for plain convolutions), 'xla' (XLA's int8
    convolution, CPU only), 'im2col' (int8 dot_general over patches, CPU and GPU) or None for
    ``default_backend()``."""

    def __init__(self, program: IntegerProgram, backend: Optional[str] = None):
        program.validate()
        self.program = program
        self.backend = backend or default_backend()
        if self.backend in KERNEL_BACKENDS:
            ok, why = KERNEL_BACKENDS[self.backend]()
            if not ok:
                raise ValueError(f"backend {self.backend!r} is not available: {why}")
        self.plan = plan(program, self.backend)
        self.arrays = {k: jnp.asarray(v) for k, v in self.plan.arrays.items()}
        self._by_batch: dict = {}
        self._run = jax.jit(functools.partial(_execute, program, self.plan, collect=False))
        self._collect = jax.jit(functools.partial(_execute, program, self.plan, collect=True))

    def arrays_for(self, batch_size: int) -> dict:
        """The arrays the program runs with at this batch size: the plan's, with weights
        packed for the kernels the backend chose for that batch."""
        if batch_size not in self._by_batch:
            extra = self.plan.backend.batch_arrays(self.plan, batch_size)
            self._by_batch[batch_size] = {**self.arrays, **extra}
        return self._by_batch[batch_size]

    def implementations(self, batch_size: int) -> dict:
        """Per layer, what computes it at this batch size (nothing is run)."""
        return self.plan.backend.implementations(self.plan, batch_size)

    def __call__(self, images) -> jax.Array:
        check_images(self.program, images)
        return self._run(self.arrays_for(images.shape[0]), images)

    def collect(self, images):
        check_images(self.program, images)
        return self._collect(self.arrays_for(images.shape[0]), images)

    def jaxpr(self, batch_size: int = 1):
        """The executor's jaxpr for a batch of uint8 images (what the audit walks)."""
        spec = jax.ShapeDtypeStruct((batch_size,) + tuple(self.program.image_shape), jnp.uint8)
        fn = functools.partial(_execute, self.program, self.plan, collect=False)
        return jax.make_jaxpr(fn)(self.arrays_for(batch_size), spec)


def serialize(program: IntegerProgram, batch_size: int, backend: str = "im2col") -> bytes:
    """The executor for a fixed batch of uint8 images, weights included, as a jax.export
    artifact (StableHLO, for CPU and CUDA); ``deserialize(data).call(images)`` returns the
    int32 logits. The default backend, 'im2col', uses no custom kernel and runs on both."""
    if backend in KERNEL_BACKENDS:
        raise ValueError(f"the {backend!r} backend calls a local kernel: serialize with "
                         "'im2col' or 'xla'")
    platforms = ("cpu", "cuda") if backend == "im2col" else ("cpu",)  # no int8 conv on CUDA
    the_plan = plan(program, backend)
    arrays = {k: jnp.asarray(v) for k, v in the_plan.arrays.items()}
    fn = jax.jit(lambda images: _execute(program, the_plan, arrays, images, False))
    spec = jax.ShapeDtypeStruct((batch_size,) + tuple(program.image_shape), jnp.uint8)
    return jax.export.export(fn, platforms=platforms)(spec).serialize()


def deserialize(data: bytes) -> "jax.export.Exported":
    """An executor serialized by ``serialize``: call it with ``.call(images)``."""
    return jax.export.deserialize(bytearray(data))
