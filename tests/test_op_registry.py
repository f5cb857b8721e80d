"""A new op kind is one class: a toy kind defined here alone ('clamp', int32
max(min(x, c), -c) per channel), registered through the public registry, runs through
validation, the exporter's replay of a recorded event, the executor's backends,
verification and ONNX export with no change to the library."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime as ort
import pytest

from f8net_jax import integer, recording
from f8net_jax.integer import audit, ops, onnx_export
from f8net_jax.integer.verification import verify
from f8net_jax.layers import QuantConfig, QuantConvBN, QuantDense
from f8net_jax.models.common import prepare_image
from f8net_jax.streams import global_average_pool, relu, scale_plan

from test_integer import random_state

INT32_MAX = 2 ** 31 - 1


class ClampOp(ops.OpKind):
    """int32 -> int32: max(min(x, limit), -limit) per channel, in the input's format."""

    name = "clamp"
    fields = {"name": str, "limit": list}
    events = ("clamp",)

    def check(self, op, v):
        v.expect_kind(op["in"][0], ("int32",))
        v.same_channels()
        limit = op["limit"]
        if len(limit) != v.src["channels"] or not all(
                isinstance(c, int) and 0 <= c <= INT32_MAX for c in limit):
            v.fail(f"'limit' must hold one integer in [0, 2^31) per channel, got {limit!r}")

    def format_rule(self, op, tensors):
        src, out = op["in"][0], op["out"]
        if tensors[out]["fraclen"] != tensors[src]["fraclen"]:
            return f"the fraclen of {out!r} is not that of {src!r}"
        return None

    def build(self, b, name, src, limit):
        lo, hi = b.bounds[src]
        c = np.asarray(limit, np.int64)
        op = {"op": "clamp", "name": name, "in": [src], "out": name, "limit": list(limit)}
        return b.emit(op, "int32", b.fraclen(src), np.clip(lo, -c, c), np.clip(hi, -c, c))

    def replay(self, event, r):
        """The recorded limit is a value: in integers at the input's fraclen."""
        src = r.tensor(event.inputs[0], event)
        limit = event.attrs["limit"] * np.exp2(r.b.fraclen(src))
        if not np.array_equal(limit, np.round(limit)):
            raise ValueError(f"clamp limit {event.attrs['limit']} is not on the grid")
        return self.build(r.b, event.attrs["name"], src, [int(c) for c in limit])

    def run(self, op, args, run):
        limit = np.asarray(op["limit"], np.int32)
        return jnp.clip(args[0], -limit, limit)

    def pairs(self, op):  # where a module of that name recorded it, its output
        return [(op["name"], op["out"], False)]

    def lower(self, op, lo):
        src, out, name, g = op["in"][0], op["out"], lo.name(op["out"]), lo.g
        scale = np.asarray(lo.scale(lo.fraclen(out), out), np.float64)
        limit = (np.asarray(op["limit"], np.float64) * scale).astype(np.float32)
        if out not in lo.flat:
            limit = limit.reshape(-1, 1, 1)
        x = g.node("Max", [lo.float_of[src], g.const(f"{name}/low", -limit)])
        lo.float_of[out] = g.node("Min", [x, g.const(f"{name}/high", limit)], name)


@pytest.fixture
def clamp_kind():
    ops.register(ClampOp)
    yield ops.REGISTRY["clamp"]
    ops.unregister("clamp")


class Clamp(nn.Module):
    """The simulation of the toy op: a clip of the stream at +-limit (a value)."""

    limit: float

    def __call__(self, x):
        y = jnp.clip(x, -self.limit, self.limit)
        recording.emit("clamp", [x], y, name=recording.module_path(self), limit=self.limit)
        return y


class Pooled(nn.Module):
    """Stem, (a clamp with ``limit``), ReLU, global pool, the classifier."""

    quant: QuantConfig
    limit: float = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = prepare_image(x, total_stride=1, model="Pooled")
        stem = QuantConvBN(x.shape[-1], 8, 3, self.quant, input_kind="image", name="stem")
        classifier = QuantDense(8, 10, self.quant, name="classifier")
        alphas, scales = scale_plan([stem, classifier])
        x = stem(x, alpha=alphas[0], out_scale=scales[1], train=train)
        if self.limit is not None:
            x = Clamp(self.limit, name="clamp")(x)
        x, factor = global_average_pool(relu(x), self.quant)
        return classifier(x, alpha=alphas[1], input_factor=factor, train=train)


@pytest.fixture(scope="module")
def exported():
    """(model, variables, program without a clamp, images, the stem's integers)."""
    model = Pooled(QuantConfig())
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), np.uint8)
    variables = random_state(model.init(jax.random.PRNGKey(0), images[:1]), seed=3)
    program = integer.export(variables, model, image_shape=(8, 8, 3))
    _, seen = integer.Executor(program, backend="xla").collect(images)
    return model, variables, program, images, np.asarray(seen["stem"], np.int64)


def with_clamp(program, limit):
    """The program with a clamp of the stem's accumulator, read by what read the stem."""
    ops_, tensors = [dict(op) for op in program.ops], dict(program.tensors)
    i = next(i for i, op in enumerate(ops_) if op["out"] == "stem")
    readers = [op for op in ops_[i + 1:] if "stem" in op["in"]]
    assert [op["op"] for op in readers] == ["relu"]
    readers[0]["in"] = ["clamp"]
    ops_.insert(i + 1, {"op": "clamp", "name": "clamp", "in": ["stem"], "out": "clamp",
                        "limit": [int(c) for c in limit]})
    tensors["clamp"] = dict(tensors["stem"])
    return integer.IntegerProgram(**{**program.__dict__, "ops": ops_, "tensors": tensors})


def onnx_logits(program, images):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    model = onnx_export.to_onnx(program, intermediates=True, warn=False)
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"images": np.ascontiguousarray(images.transpose(0, 3, 1, 2))})[0]


def test_a_registered_kind_validates_runs_verifies_and_lowers_to_onnx(clamp_kind, exported):
    model, variables, program, images, stem = exported
    limit = np.median(np.abs(stem), axis=(0, 1, 2)).astype(np.int64)  # clamps about half
    toy = with_clamp(program, limit)
    toy.validate()
    i = next(i for i, op in enumerate(toy.ops) if op["op"] == "clamp")
    for edit, match in [(dict(limit=[int(c) for c in limit[:-1]]), "'limit' must hold one"),
                        (dict(limit=[-1] * len(limit)), rf"op {i} \(clamp clamp\): 'limit' must"),
                        (dict(limit="3"), "'limit' must be list, got '3'")]:
        bad = with_clamp(program, limit)
        bad.ops[i].update(edit)
        with pytest.raises(ValueError, match=match):
            bad.validate()
    bad = with_clamp(program, limit)
    bad.tensors["clamp"] = dict(bad.tensors["clamp"], fraclen=[0] * len(limit))
    with pytest.raises(ValueError, match="the fraclen of 'clamp' is not that of 'stem'"):
        bad.validate()

    want = np.clip(stem, -limit, limit)
    assert np.any(want < stem) and np.any(want > stem)  # clamps at both ends
    results = {}
    for backend in ("xla", "im2col"):
        executor = integer.Executor(toy, backend=backend)
        logits, seen = executor.collect(images)
        np.testing.assert_array_equal(np.asarray(seen["clamp"]), want)
        assert audit.audit(executor.jaxpr(batch_size=2)) == []
        results[backend] = np.asarray(logits)
    np.testing.assert_array_equal(results["xla"], results["im2col"])
    assert not np.array_equal(results["xla"], np.asarray(integer.Executor(program)(images)))

    # The simulation has no clamp: verification runs, and sees the difference it makes.
    report = verify(toy, model, variables, images, backend="im2col")
    assert report.images == len(images) and "classifier/input" in report.tensors_differing
    loose = with_clamp(program, np.abs(stem).max(axis=(0, 1, 2)) + 1)  # never clamps
    assert verify(loose, model, variables, images, backend="im2col").exact

    np.testing.assert_array_equal(onnx_logits(toy, images).astype(np.float64),
                                  results["xla"] * 2.0 ** -toy.logits_fraclen)


def test_a_recorded_event_of_the_new_kind_exports_and_runs_bit_exact(clamp_kind, exported):
    model, variables, plain, images, stem = exported
    fl = plain.tensors["stem"]["fraclen"][0]
    value = np.median(np.abs(stem)) * 2.0 ** -fl
    clamped = model.clone(limit=float(2.0 ** np.floor(np.log2(value))))  # on the grid
    program = integer.export(variables, clamped, image_shape=(8, 8, 3))
    op = next(op for op in program.ops if op["op"] == "clamp")
    assert op["in"] == ["stem"] and max(op["limit"]) < np.abs(stem).max()
    report = verify(program, clamped, variables, images, backend="xla")
    assert report.exact, (report.tensors_differing, report.max_logit_diff)
    assert report.tensors_compared == 5  # the stem's and classifier's inputs and outputs, clamp
    logits = np.asarray(integer.Executor(program, backend="im2col")(images))
    np.testing.assert_array_equal(onnx_logits(program, images).astype(np.float64),
                                  logits * 2.0 ** -program.logits_fraclen)


def test_registration_is_undone_and_refuses_a_second_kind_of_the_same_name():
    kinds, events = list(ops.REGISTRY), ops.event_kinds()
    ops.register(ClampOp)
    try:
        assert ops.event_kinds()["clamp"] is ops.REGISTRY["clamp"]
        with pytest.raises(ValueError, match="'clamp' is already registered"):
            ops.register(ClampOp)
    finally:
        ops.unregister("clamp")
    assert list(ops.REGISTRY) == kinds and ops.event_kinds() == events

    class Stealer(ops.OpKind):
        name = "stealer"
        events = ("conv",)

    with pytest.raises(ValueError, match="event 'conv' already becomes 'conv'"):
        ops.register(Stealer)
    assert "stealer" not in ops.REGISTRY
