"""The integer program: an op graph over named tensors, int8 weights, int32 biases and the
formats, saved as a readable JSON file next to a .npz of its arrays (no pickle).

Tensors have a kind: 'unsigned' (8-bit activations in [0, 255]), 'signed' (8-bit in
[-127, 127]) or 'int32' (accumulators, residual streams, logits), and a fraclen per
channel: tensor value = integer * 2^-fraclen. How an executor stores 8-bit tensors (uint8,
or int8 offset by -128) is its own choice; the program holds true values.

Ops (each a JSON object with 'op', 'in', 'out'):
  image       uint8 pixels p -> 'unsigned' p at fl 8
  lookup      uint8 pixels -> 'signed' int8 through a per-channel table (normalized input)
  conv        8-bit input, int8 HWIO weight, int32 bias -> int32; zero padding of
              kernel_size // 2, groups for depthwise
  dense       8-bit input, int8 weight, int32 bias -> int32 (the logits)
  requantize  int32 -> 8-bit: rounding right shift (half to even) or saturating left shift
              per channel (shift = fl_in - fl_out), then saturation to the 8-bit range
              (the ReLU of unsigned ones)
  relu        int32 max(x, 0)
  add         int32 + int32, each shifted left to the finer format first (alignment)
  max_pool    int32 window max
  avg_pool    int32 global sum; the value is the mean's sum * 2^-shift, so the format gains
              'shift' fractional bits and no rounding happens here

Shifts and formats follow from the fraclens of the tensors: a layer's accumulator has
fraclen input + weight, a requantize shifts by fl_in - fl_out, an add's output has its
finer operand's fraclen and each operand is shifted left by the difference, an avg_pool's
output gains its shift, relu and max_pool keep their input's; ``validate`` refuses a
program where they do not (``FORMAT_RULES``, one rule per op kind).

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
from typing import Any, Optional

import numpy as np

from f8net_jax import folding

FORMAT = "f8net_jax.integer_program"
VERSION = 2  # 2: the op graph carries its own checksum (graph_sha256)
KINDS = ("unsigned", "signed", "int32")
OPS = ("image", "lookup", "conv", "dense", "requantize", "relu", "add", "max_pool", "avg_pool")
ACCUMULATING = ("conv", "dense")  # the layers: int8 x int8 products into int32, a bias
ARRAY_DTYPES = {"weight": np.int8, "bias": np.int32, "table": np.int8}
# Per op: how many tensors it reads, and the fields it needs with their types.
OP_FIELDS = {
    "image": (0, {}),
    "lookup": (0, {"table": str}),
    "conv": (1, {"name": str, "weight": str, "bias": str, "strides": int, "padding": int,
                 "groups": int, "saturate": bool, "input_fraclen": int, "weight_fraclen": list}),
    "dense": (1, {"name": str, "weight": str, "bias": str, "saturate": bool,
                  "input_fraclen": int, "weight_fraclen": list}),
    "requantize": (1, {"signed": bool, "shift": list}),
    "relu": (1, {}),
    "add": (2, {"name": str, "shift": list, "relu": bool, "saturate": bool}),
    "max_pool": (1, {"window": int, "strides": int, "padding": int}),
    "avg_pool": (1, {"shift": int, "window": int, "saturate": bool}),
}


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
            if not _is(channels, int) or channels < 1:
                fail(f"tensor {name!r}: 'channels' must be a positive integer, got {channels!r}")
            if not _is(tensor.get("fraclen"), list) or len(tensor["fraclen"]) != channels:
                fail(f"tensor {name!r} needs one fraclen per channel")
            if not all(_is(v, int) for v in tensor["fraclen"]):
                fail(f"tensor {name!r}: 'fraclen' must hold integers, got {tensor['fraclen']!r}")
        known = set()
        for i, op in enumerate(self.ops):
            if not isinstance(op, dict):
                fail(f"op {i} must be an object, got {op!r}")
            self._validate_op(i, op, known, fail)
            known.add(op["out"])
        if self.output not in known:
            fail(f"output {self.output!r} is not written by any op")
        last = self.ops[-1] if self.ops else {}
        if last.get("out") != self.output or last.get("op") != "dense":
            fail(f"output {self.output!r} must be the logits: the tensor the last op, the "
                 f"classifier's dense, writes (the last op writes {last.get('out')!r})")
        if self.tensors[self.output].get("channels") != self.num_classes:
            fail(f"the logits {self.output!r} have {self.tensors[self.output].get('channels')} "
                 f"channels but num_classes is {self.num_classes}")

    def _validate_op(self, i: int, op: dict, known: set, fail) -> None:
        """One op's fields, and the shapes of its arrays against the tensors it reads."""
        kind = op.get("op")
        if kind not in OPS:
            fail(f"op {i} has unknown type {kind!r}; allowed {list(OPS)}")
        name = op.get("name", op.get("out"))
        label = f"op {i} ({kind}{' ' + name if isinstance(name, str) else ''})"
        arity, fields = OP_FIELDS[kind]
        inputs = op.get("in")
        if not isinstance(inputs, list) or len(inputs) != arity:
            fail(f"{label}: 'in' must list {arity} tensor(s), got {inputs!r}")
        for name in inputs:
            if name not in known:
                fail(f"{label} reads tensor {name!r} before it is written")
        for field, kind_of in fields.items():
            value = op.get(field)
            if field not in op:
                fail(f"{label} lacks the field {field!r}")
            if not _is(value, kind_of):
                fail(f"{label}: {field!r} must be {kind_of.__name__}, got {value!r}")
        out = op.get("out")
        if not isinstance(out, str) or out not in self.tensors:
            fail(f"{label} writes tensor {out!r}, which has no entry in 'tensors'")
        for field, dtype in ARRAY_DTYPES.items():
            if field in op:
                array = self.arrays.get(op[field])
                if array is None:
                    fail(f"{label} needs array {op[field]!r}, which is missing")
                if array.dtype != dtype:
                    fail(f"array {op[field]!r} must be {np.dtype(dtype).name}, got {array.dtype}")
        for field in ("strides", "window"):
            if field in fields and op[field] < 1:
                fail(f"{label}: {field!r} must be >= 1, got {op[field]}")
        if "padding" in fields and op["padding"] < 0:
            fail(f"{label}: 'padding' must be >= 0, got {op['padding']}")
        src = self.tensors[inputs[0]] if inputs else None
        dst = self.tensors[out]

        def expect(what, got, wanted):
            if tuple(got) != tuple(wanted):
                fail(f"{label}: {what} is {tuple(got)}, expected {tuple(wanted)}")

        def expect_kind(tensor_name, tensor, kinds):
            if tensor["kind"] not in kinds:
                fail(f"{label}: tensor {tensor_name!r} is {tensor['kind']}, expected "
                     f"{' or '.join(kinds)}")

        channels_in = self.image_shape[2]
        if kind == "image":
            expect_kind(out, dst, ("unsigned",))
            expect(f"the channels of {out!r}", (dst["channels"],), (channels_in,))
        elif kind == "lookup":
            expect_kind(out, dst, ("signed",))
            expect(f"the shape of {op['table']!r}", self.arrays[op["table"]].shape,
                   (channels_in, 256))
            expect(f"the channels of {out!r}", (dst["channels"],), (channels_in,))
        elif kind in ACCUMULATING:
            expect_kind(inputs[0], src, ("unsigned", "signed"))
            expect_kind(out, dst, ("int32",))
            weight, bias = self.arrays[op["weight"]], self.arrays[op["bias"]]
            cout = dst["channels"]
            if kind == "conv":
                groups = op["groups"]
                if groups < 1 or src["channels"] % groups:
                    fail(f"{label}: 'groups' {groups} does not divide the "
                         f"{src['channels']} input channels")
                if weight.ndim != 4 or weight.shape[0] != weight.shape[1]:
                    fail(f"{label}: weight {op['weight']!r} must be square HWIO, got shape "
                         f"{weight.shape}")
                expect(f"the shape of {op['weight']!r}", weight.shape,
                       (weight.shape[0], weight.shape[0], src["channels"] // groups, cout))
            else:
                expect(f"the shape of {op['weight']!r}", weight.shape, (src["channels"], cout))
            expect(f"the shape of {op['bias']!r}", bias.shape, (cout,))
        elif kind == "requantize":
            expect_kind(inputs[0], src, ("int32",))
            expect_kind(out, dst, ("signed",) if op["signed"] else ("unsigned",))
            expect("the length of 'shift'", (len(op["shift"]),), (src["channels"],))
            expect(f"the channels of {out!r}", (dst["channels"],), (src["channels"],))
        elif kind == "add":
            a, b = (self.tensors[n] for n in inputs)
            for name, tensor in zip(inputs, (a, b)):
                expect_kind(name, tensor, ("int32",))
            shift = op["shift"]
            if len(shift) != 2 or not all(_is(s, list) for s in shift):
                fail(f"{label}: 'shift' must hold one list per input")
            expect("the channels of its inputs", (a["channels"], b["channels"]),
                   (dst["channels"],) * 2)
            expect("the lengths of 'shift'", tuple(map(len, shift)), (dst["channels"],) * 2)
        else:  # relu, max_pool, avg_pool
            expect_kind(inputs[0], src, ("int32",))
            expect(f"the channels of {out!r}", (dst["channels"],), (src["channels"],))
        problem = FORMAT_RULES[kind](op, self.tensors)
        if problem:
            fail(f"{label}: {problem}")


# --------------------------------------------------------------------------------------
# The formats an op's inputs imply: each rule returns what does not follow, or None.


def _brief(values) -> str:
    """Per-channel integers, one if they agree, else the first few."""
    values = list(values)
    if not all(_is(v, int) for v in values):
        return repr(values)
    values = [int(v) for v in values]
    if len(set(values)) == 1:
        return str(values[0])
    return str(values) if len(values) <= 8 else f"[{str(values[:8])[1:-1]}, ...]"


def _follows(what, got, wanted, sources) -> Optional[str]:
    """None if ``got`` (per channel) equals ``wanted``, else the message naming
    ``sources`` ({tensor name: its fraclens}) it should have followed from."""
    if list(got) == [int(v) for v in wanted]:
        return None
    names = " and ".join(f"{n!r} ({_brief(fl)})" for n, fl in sources.items())
    return f"{what} is {_brief(got)}, which does not follow from the fraclens of {names}: " \
           f"expected {_brief(wanted)}"


def _fraclens(op, tensors) -> tuple:
    """(the fraclens of the op's inputs as arrays, those of its output)."""
    ins = [np.asarray(tensors[n]["fraclen"], np.int64) for n in op["in"]]
    return ins, np.asarray(tensors[op["out"]]["fraclen"], np.int64)


def _image_rule(op, tensors) -> Optional[str]:
    """Pixels p are the value p / 256."""
    _, out = _fraclens(op, tensors)
    if set(out.tolist()) != {8}:
        return f"the fraclen of {op['out']!r} is {_brief(out)}: pixels have fraclen 8"
    return None


def _accumulating_rule(op, tensors) -> Optional[str]:
    """One input format; the accumulator's fraclen is the input's plus the weight's."""
    (fl_in,), out = _fraclens(op, tensors)
    src, w_fl = op["in"][0], op["weight_fraclen"]
    if set(fl_in.tolist()) != {op["input_fraclen"]}:
        return f"'input_fraclen' {op['input_fraclen']} is not the fraclen of {src!r} " \
               f"({_brief(fl_in)})"
    if len(w_fl) != out.size or not all(_is(v, int) for v in w_fl):
        return f"'weight_fraclen' must hold one integer per output channel, got {w_fl!r}"
    return _follows(f"the fraclen of {op['out']!r}", out, fl_in[0] + np.asarray(w_fl),
                    {src: fl_in})


def _requantize_rule(op, tensors) -> Optional[str]:
    """A right shift by the input's fraclen minus the output's (left where negative)."""
    (fl_in,), out = _fraclens(op, tensors)
    return _follows("'shift'", op["shift"], fl_in - out, {op["in"][0]: fl_in, op["out"]: out})


def _add_rule(op, tensors) -> Optional[str]:
    """The sum is in the finer operand's format, each operand shifted left to it."""
    (fa, fb), out = _fraclens(op, tensors)
    sources = dict(zip(op["in"], (fa, fb)))
    return (_follows(f"the fraclen of {op['out']!r}", out, np.maximum(fa, fb), sources)
            or _follows(f"the shift of {op['in'][0]!r}", op["shift"][0], out - fa, sources)
            or _follows(f"the shift of {op['in'][1]!r}", op["shift"][1], out - fb, sources))


def _avg_pool_rule(op, tensors) -> Optional[str]:
    """The window's sum gains round(log2(window)) fractional bits (folding.pool_shift)."""
    (fl_in,), out = _fraclens(op, tensors)
    wanted = folding.pool_shift(op["window"])
    if op["shift"] != wanted:
        return f"'shift' is {op['shift']}, which does not follow from the window " \
               f"{op['window']}: expected {wanted}"
    return _follows(f"the fraclen of {op['out']!r}", out, fl_in + op["shift"],
                    {op["in"][0]: fl_in})


def _same_rule(op, tensors) -> Optional[str]:
    """The output keeps the input's format."""
    (fl_in,), out = _fraclens(op, tensors)
    return _follows(f"the fraclen of {op['out']!r}", out, fl_in, {op["in"][0]: fl_in})


FORMAT_RULES = {"image": _image_rule, "lookup": lambda op, tensors: None,
                "conv": _accumulating_rule, "dense": _accumulating_rule,
                "requantize": _requantize_rule, "relu": _same_rule, "add": _add_rule,
                "max_pool": _same_rule, "avg_pool": _avg_pool_rule}


def _is(value, kind) -> bool:
    """isinstance for JSON types, taking numpy scalars and arrays as JSON would."""
    if kind is bool:
        return isinstance(value, (bool, np.bool_))
    if kind is int:
        return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if kind is list:
        return isinstance(value, (list, tuple, np.ndarray))
    return isinstance(value, kind)


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
