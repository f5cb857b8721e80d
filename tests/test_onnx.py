"""ONNX export: the graph passes onnx.checker and holds no float weight; ONNX Runtime's CPU
provider reproduces the executor's logits (int32 * 2^-fl) and every 8-bit tensor exactly,
and so does OpenVINO when it computes its float parts in float32; the exporter names the
ops where a runtime's float32 sums could round."""

import os
import re
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from f8net_jax import integer
from f8net_jax.integer import onnx_export
from f8net_jax.layers import QuantConfig

from test_integer import _run, make


def _session(model):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _nchw(x):
    return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))


def _executor_tensors(program, images):
    logits, seen = integer.Executor(program, backend="xla").collect(images)
    return np.asarray(logits, np.float64) * 2.0 ** -program.logits_fraclen, seen


def check_onnx_runtime_is_exact(program, images):
    """ORT's logits and every exposed 8-bit tensor equal the executor's; returns the model."""
    model = onnx_export.to_onnx(program, intermediates=True, warn=False)
    session = _session(model)
    outputs = session.run(None, {"images": _nchw(images)})
    names = [o.name for o in session.get_outputs()]
    want, seen = _executor_tensors(program, images)
    assert names[0] == "logits"
    np.testing.assert_array_equal(outputs[0].astype(np.float64), want)
    by_name = {onnx_export._name(t): t for t in seen}
    exposed = onnx_export.intermediate_names(program)
    assert len(names) - 1 == len(exposed) > 0
    for name, value in zip(names[1:], outputs[1:]):
        ours = np.asarray(seen[by_name[name]])
        ours = _nchw(ours) if ours.ndim == 4 else ours
        assert value.dtype == (np.int8 if program.tensors[by_name[name]]["kind"] == "signed"
                               else np.uint8), name
        np.testing.assert_array_equal(value.astype(np.int32), ours, err_msg=name)
    return model


def check_graph(model, program):
    onnx.checker.check_model(model, full_check=True)
    graph = model.graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    weights = [i for i in graph.initializer if i.name.endswith("/w/int8")]
    biases = [i for i in graph.initializer if i.name.endswith("/b/int32")]
    layers = sum(op["op"] in ("conv", "dense") for op in program.ops)
    assert len(weights) == len(biases) == layers
    assert {w.data_type for w in weights} == {onnx.TensorProto.INT8}
    assert {b.data_type for b in biases} == {onnx.TensorProto.INT32}
    # The only float constants are the power-of-two scales (one per channel at most) and
    # the clip limits of signed tensors.
    for init in graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            value = onnx.numpy_helper.to_array(init)
            assert re.search(r"/(scale|low|pow2)$", init.name), init.name
            mantissa, _ = np.frexp(np.abs(value[value != 0]))
            assert init.name.endswith("/low") or np.all(mantissa == 0.5), init.name


FAST = [("resnet20", 16, QuantConfig(normalized_input=True, clipping=False,
                                     format_rule="grid"), 3, 1.0),
        ("mobilenet_v1", 32, QuantConfig(), 3, 0.25)]
SLOW = [("resnet18", 32, QuantConfig(granularity="channel"), 3, 1.0),
        ("mobilenet_v2", 32, QuantConfig(granularity="channel",
                                         share_classifier_alpha=True), 3, 0.25)]


@pytest.mark.parametrize(
    "name, size, quant, channels, width",
    FAST + [pytest.param(*case, marks=pytest.mark.slow) for case in SLOW],
    ids=["resnet20-normalized", "mobilenet_v1", "resnet18-channel", "mobilenet_v2-channel"])
def test_onnx_runtime_reproduces_every_integer(name, size, quant, channels, width):
    _, _, program, _ = make(name, size, quant, channels=channels, width=width)
    images = np.random.default_rng(7).integers(0, 256, (6, size, size, channels), np.uint8)
    model = check_onnx_runtime_is_exact(program, images)
    check_graph(model, program)


@pytest.mark.xdist_group("smoke_workdir")
def test_export_command_writes_an_onnx_model_of_the_trained_run(smoke_workdir, tmp_path):
    out = str(tmp_path / "smoke")
    result = _run("f8net_jax.integer.export_program", f"--workdir={smoke_workdir}",
                  f"--output={out}", "--onnx")
    assert result.returncode == 0, result.stderr
    assert "onnx: exact in a runtime's float32 sums" in result.stdout
    assert "openvino: compile with INFERENCE_PRECISION_HINT=f32" in result.stdout
    program = integer.load(out)
    model = onnx.load(out + ".onnx")
    check_graph(model, program)
    images = np.random.default_rng(0).integers(0, 256, (16,) + tuple(program.image_shape),
                                               np.uint8)
    logits = _session(model).run(None, {"images": _nchw(images)})[0]
    np.testing.assert_array_equal(logits.astype(np.float64),
                                  _executor_tensors(program, images)[0])
    check_onnx_runtime_is_exact(program, images)
    # A later export without --onnx removes the stale model.
    result = _run("f8net_jax.integer.export_program", f"--workdir={smoke_workdir}",
                  f"--output={out}")
    assert result.returncode == 0 and not os.path.exists(out + ".onnx")


def test_openvino_is_exact_with_float32_inference_precision():
    ov = pytest.importorskip("openvino")
    _, _, program, _ = make("resnet20", 16, QuantConfig(granularity="channel"), channels=1)
    images = np.random.default_rng(3).integers(0, 256, (8, 16, 16, 1), np.uint8)
    core = ov.Core()
    model = core.read_model(onnx_export.to_onnx(program, warn=False).SerializeToString(), b"")
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                 "INFERENCE_NUM_THREADS": 2})
    logits = compiled({"images": _nchw(images)})[compiled.outputs[0]]
    np.testing.assert_array_equal(logits.astype(np.float64),
                                  _executor_tensors(program, images)[0])


def test_the_exporter_names_ops_whose_float32_sums_could_round():
    _, _, program, _ = make("resnet20", 16, QuantConfig(), channels=1)
    checks = program.checks()
    layer = checks[1]["layer"]
    for op in program.ops:  # pretend the static check found a bound past 2^24 there
        if op.get("check", {}).get("layer") == layer:
            op["check"] = dict(op["check"], float32_exact=False, accumulator_bound=2 ** 25)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = onnx_export.to_onnx(program)
    messages = [str(w.message) for w in caught]
    assert any(f"{layer} (conv, bound 33,554,432)" in m for m in messages), messages
    props = {p.key: p.value for p in model.metadata_props}
    assert layer in props["inexact_ops"]
    assert props["logits_fraclen"] == str(program.logits_fraclen)
    assert "INFERENCE_PRECISION_HINT=f32" in props["openvino"]
