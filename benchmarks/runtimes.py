"""Shared by integer_inference.py and deploy.py: the models they time (a fixed-point model
with BatchNorm statistics and formats away from their initial values, its integer
program, its ONNX forms), ONNX Runtime and OpenVINO engines, interleaved timing, and
what the machine was doing."""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time

import jax
import numpy as np

from f8net_jax import integer, layers, models
from f8net_jax import machine as f8net_machine
from f8net_jax.integer import onnx_export


@dataclasses.dataclass
class Case:
    name: str
    program: integer.IntegerProgram
    variables: dict
    quant: layers.QuantConfig
    images: np.ndarray   # uint8 NHWC
    classes: int


def make_case(name: str, size: int, classes: int, batch: int) -> Case:
    """A fixed-point model initialized with PRNGKey(0), one training-mode forward on a
    seeded random uint8 batch (so BatchNorm statistics and running formats move), exported."""
    quant = layers.QuantConfig(mode="fixed")
    model = models.create(name, num_classes=classes, quant=quant)
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(images)
    _, updates = jax.jit(lambda v, x: model.apply(
        v, x, train=True, mutable=["batch_stats", "quant_stats"]))(variables, images)
    variables = {**variables, **updates}
    program = integer.export(variables, name, {"quant": quant}, image_shape=images.shape[1:])
    return Case(name, program, variables, quant, images, classes)


def float_eval(case: Case):
    """The same model and parameters in float mode (float32 conv + BatchNorm), jitted."""
    model = models.create(case.name, num_classes=case.classes,
                          quant=dataclasses.replace(case.quant, mode="float"))
    variables = {"params": case.variables["params"],
                 "batch_stats": case.variables["batch_stats"]}
    return jax.jit(lambda x: model.apply(variables, x, train=False))


def nchw(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


# --------------------------------------------------------------------------------------
# ONNX models and engines.


def onnx_models(case: Case) -> dict:
    """'exact': our QDQ export; 'float32': the same network in float32 (the program's
    weights, BatchNorm folded, clips for requantizations), both serialized."""
    return {"exact": onnx_export.to_onnx(case.program, warn=False).SerializeToString(),
            "float32": onnx_export.to_onnx(case.program, warn=False,
                                           quantized=False).SerializeToString()}


def ort_quantize_static(float_model: bytes, calibration: np.ndarray) -> bytes:
    """What a practitioner deploys without F8Net: onnxruntime.quantization's static
    quantization of the float32 model (QDQ, per-channel int8 weights, uint8 activations,
    MinMax calibration on ``calibration``, uint8 NCHW images)."""
    from onnxruntime import quantization as q

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": calibration[i:i + 8]}
                                 for i in range(0, len(calibration), 8)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "int8.onnx")
        with open(src, "wb") as f:
            f.write(float_model)
        q.quantize_static(src, dst, Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                          activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                          calibrate_method=q.CalibrationMethod.MinMax)
        with open(dst, "rb") as f:
            return f.read()


def ort_engine(model: bytes, threads: int):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"images": x})[0]


def openvino_engine(model: bytes, threads: int, precision: str = ""):
    """OpenVINO on the CPU; ``precision`` 'f32' sets INFERENCE_PRECISION_HINT (by default
    OpenVINO computes float parts in bf16 on CPUs that have it)."""
    import openvino as ov
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = core.compile_model(core.read_model(model, b""), "CPU", config)
    output = compiled.outputs[0]
    request = compiled.create_infer_request()
    return lambda x: request.infer({"images": x})[output]


# --------------------------------------------------------------------------------------
# Timing.


def interleaved(engines: dict, inputs: dict, rounds: int, per_round: int,
                settle: float = 0.05) -> dict:
    """Median seconds per call of each engine: after two warm-up calls each, ``rounds``
    rounds in which every engine runs ``per_round`` timed calls in turn, so that machine
    noise hits all alike. ``inputs[name]`` is what engine ``name`` is called with. Before
    each engine's calls of a round: ``settle`` seconds of sleep and one untimed call, so
    that the thread pools of the engine before (ONNX Runtime's, OpenVINO's and OpenMP's
    threads spin for a while after each call) do not take the cores from it."""
    for name, fn in engines.items():
        for _ in range(2):
            jax.block_until_ready(fn(inputs[name]))
    times = {name: [] for name in engines}
    for _ in range(rounds):
        for name, fn in engines.items():
            time.sleep(settle)
            jax.block_until_ready(fn(inputs[name]))
            for _ in range(per_round):
                start = time.perf_counter()
                jax.block_until_ready(fn(inputs[name]))
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def machine() -> str:
    """CPU model, its int8/bf16 features, and the load average (1 min)."""
    return f8net_machine.describe()
