"""The integer program: an op graph over named tensors, int8 weights, int32 biases and the
formats, saved as a readable JSON file next to a .npz of its arrays (no pickle).

Tensors have a kind: 'unsigned' (8-bit activations in [0, 255]), 'signed' (8-bit in
[-127, 127]) or 'int32' (accumulators, residual streams, logits), and a fraclen per
channel: tensor value = integer * 2^-fraclen. How an executor stores 8-bit tensors (uint8,
or int8 offset by -128) is its own choice; the program holds true values.

Ops are JSON objects with 'op' (the kind), 'in' (the tensors it reads) and 'out' (the
one it writes), and the fields of their kind: image, lookup, conv, dense, requantize, relu,
add, max_pool, avg_pool, each a class of ``f8net_jax.integer.ops`` (its fields, what it
computes, its validation, bounds and lowerings; ``OPS`` lists the registered kinds).

Shifts and formats follow from the fraclens of the tensors: a layer's accumulator has
fraclen input + weight, a requantize shifts by fl_in - fl_out, an add's output has its
finer operand's fraclen and each operand is shifted left by the difference, an avg_pool's
output gains its shift, relu and max_pool keep their input's; ``validate`` refuses a
program where they do not (each kind's ``format_rule``).

'saturate' on an op means the static check could not rule out leaving int32 there, so the
executor uses saturating arithmetic (see ``exporter``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
from typing import Any

import numpy as np

from f8net_jax.integer import ops
from f8net_jax.integer.ops.base import is_json, validate_op

FORMAT = "f8net_jax.integer_program"
VERSION = 2  # 2: the op graph carries its own checksum (graph_sha256)
KINDS = ("unsigned", "signed", "int32")
OPS = ops.REGISTRY.keys()  # the op kinds, as registered (a live view)


@dataclasses.dataclass
class IntegerProgram:
    """An exported model. ``ops`` run in order; ``tensors`` maps each tensor name to
    {'kind', 'channels', 'fraclen' (a list per channel), 'bound' (the static worst-case
    magnitude of its integers)}; ``arrays`` holds the weights, biases and tables;
    ``output`` names the logits; ``info`` records the model, its quant config and
    per-layer accumulator checks."""

    model: str
    num_classes: int
    image_shape: tuple
    ops: list
    tensors: dict
    arrays: dict
    output: str
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def logits_fraclen(self) -> int:
        fl = self.tensors[self.output]["fraclen"]
        if len(set(fl)) != 1:
            raise ValueError("the logits of this program do not share one format")
        return int(fl[0])

    def checks(self) -> list:
        """Per accumulating op (conv, dense, residual add, average pool): its name, op,
        worst-case magnitude in integer units, whether float32 is exact (below 2^24) and
        whether int32 cannot overflow."""
        return [op["check"] for op in self.ops if "check" in op]

    def saturating_ops(self) -> list:
        """Names of the ops whose worst case could leave int32 (saturation is used there)."""
        return [op.get("name", op["out"]) for op in self.ops if op.get("saturate")]

    def validate(self, source: str = "program") -> None:
        """Raises ValueError naming ``source`` and the field if the program is malformed."""
        def fail(msg):
            raise ValueError(f"{source}: {msg}")
        if len(self.image_shape) != 3 or not all(isinstance(d, int) and d > 0
                                                 for d in self.image_shape):
            fail(f"image_shape must be (height, width, channels), got {self.image_shape}")
        for name, tensor in self.tensors.items():
            if not isinstance(tensor, dict) or tensor.get("kind") not in KINDS:
                kind = tensor.get("kind") if isinstance(tensor, dict) else tensor
                fail(f"tensor {name!r} has kind {kind!r}; allowed {list(KINDS)}")
            channels = tensor.get("channels")
            if not is_json(channels, int) or channels < 1:
                fail(f"tensor {name!r}: 'channels' must be a positive integer, got {channels!r}")
            if not is_json(tensor.get("fraclen"), list) or len(tensor["fraclen"]) != channels:
                fail(f"tensor {name!r} needs one fraclen per channel")
            if not all(is_json(v, int) for v in tensor["fraclen"]):
                fail(f"tensor {name!r}: 'fraclen' must hold integers, got {tensor['fraclen']!r}")
        known = set()
        for i, op in enumerate(self.ops):
            if not isinstance(op, dict):
                fail(f"op {i} must be an object, got {op!r}")
            validate_op(self, i, op, known, fail)
            known.add(op["out"])
        if self.output not in known:
            fail(f"output {self.output!r} is not written by any op")
        last = self.ops[-1] if self.ops else {}
        kind = ops.REGISTRY.get(last.get("op")) if isinstance(last.get("op"), str) else None
        if last.get("out") != self.output or not getattr(kind, "gives_logits", False):
            fail(f"output {self.output!r} must be the logits: the tensor the last op, the "
                 f"classifier's dense, writes (the last op writes {last.get('out')!r})")
        if self.tensors[self.output].get("channels") != self.num_classes:
            fail(f"the logits {self.output!r} have {self.tensors[self.output].get('channels')} "
                 f"channels but num_classes is {self.num_classes}")


GRAPH_FIELDS = ("model", "num_classes", "image_shape", "output", "info", "tensors", "ops")


def graph_digest(header: dict) -> str:
    """sha256 of the program's graph (every field but the arrays), canonically encoded."""
    graph = {k: header[k] for k in GRAPH_FIELDS}
    return hashlib.sha256(json.dumps(graph, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def file_paths(path: str) -> tuple[str, str]:
    """(PATH.json, PATH.npz) of a program path, with or without either suffix."""
    base = path[:-5] if path.endswith(".json") else path[:-4] if path.endswith(".npz") else path
    return base + ".json", base + ".npz"


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: os.umask is process-wide


def save(program: IntegerProgram, path: str) -> tuple[str, str]:
    """Writes PATH.json (graph, formats, checks) and PATH.npz (arrays); a '.json' or '.npz'
    suffix on ``path`` is dropped first. Each file appears whole (written aside, then
    renamed), the .npz first; the .json records the .npz's checksum and its own graph's,
    so a pair from two exports, or an edited graph, is refused on load. Returns their
    paths."""
    program.validate()
    json_path, npz_path = file_paths(path)
    directory = os.path.dirname(os.path.abspath(json_path))
    os.makedirs(directory, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **program.arrays)
    data = buffer.getvalue()
    header = {
        "format": FORMAT, "version": VERSION,
        "model": program.model, "num_classes": program.num_classes,
        "image_shape": list(program.image_shape), "output": program.output,
        "arrays_file": os.path.basename(npz_path),
        "arrays_sha256": hashlib.sha256(data).hexdigest(),
        "info": program.info, "tensors": program.tensors, "ops": program.ops,
    }
    header = json.loads(json.dumps(header))  # as load will read it (tuples are lists)
    header["graph_sha256"] = graph_digest(header)
    text = json.dumps(header, indent=1)
    temps = []
    mode = 0o666 & ~_UMASK
    try:
        for target, payload in ((npz_path, data), (json_path, text.encode())):
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".partial")
            temps.append((tmp, target))
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
            os.chmod(tmp, mode)
        for tmp, target in temps:
            os.replace(tmp, target)
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.remove(tmp)
    return json_path, npz_path


def load(path: str) -> IntegerProgram:
    """Reads a program written by ``save`` (PATH, PATH.json or PATH.npz). Raises ValueError
    naming the file for another format or version, a corrupt or mismatched file."""
    json_path, npz_path = file_paths(path)
    if not os.path.exists(json_path):
        raise FileNotFoundError(f"no integer program at {json_path}")
    try:
        with open(json_path) as f:
            header: dict[str, Any] = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_path} is not a valid program file (corrupt JSON: {e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{json_path} is not an f8net_jax integer program "
                         f"(format {header.get('format') if isinstance(header, dict) else None!r})")
    if header.get("version") != VERSION:
        raise ValueError(f"{json_path} holds program version {header.get('version')!r}; this "
                         f"f8net_jax reads version {VERSION}: export the model again")
    name = header.get("arrays_file")
    if not isinstance(name, str) or not name or os.path.basename(name) != name:
        raise ValueError(f"{json_path}: 'arrays_file' must name a file beside it, got {name!r}")
    npz_path = os.path.join(os.path.dirname(json_path), name)
    if not os.path.isfile(npz_path):
        raise FileNotFoundError(f"{json_path} refers to {npz_path}, which does not exist")
    data = open(npz_path, "rb").read()
    if hashlib.sha256(data).hexdigest() != header.get("arrays_sha256"):
        raise ValueError(f"{npz_path} does not match {json_path} (checksum differs): the files "
                         f"are corrupt or come from different exports")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        program = IntegerProgram(
            model=header["model"], num_classes=int(header["num_classes"]),
            image_shape=tuple(int(d) for d in header["image_shape"]), ops=header["ops"],
            tensors=header["tensors"], arrays=arrays, output=header["output"],
            info=header.get("info", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{json_path} is not a valid program file ({type(e).__name__}: {e})") \
            from None
    program.validate(json_path)
    if header.get("graph_sha256") != graph_digest(header):
        raise ValueError(f"{json_path}: the op graph does not match its checksum "
                         f"(graph_sha256): the file was edited or is corrupt; export the "
                         f"model again")
    return program
