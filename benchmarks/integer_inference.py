"""Inference throughput: the integer executor against float32 eval of the same model and
against ONNX Runtime and OpenVINO running the same network quantized to int8 by
onnxruntime.quantization.

    python benchmarks/integer_inference.py [--rounds 5] [--per_round 3] [--threads 2]
                                           [--resnet18_batch 8] [--resnet20_batch 128]

For ResNet-20 at 32x32 (10 classes) and ResNet-18 at 224x224 (1000 classes): a fixed-point
model (PRNGKey(0), one training-mode forward so BatchNorm statistics and formats move) is
exported to an integer program, and on the same uint8 batch, interleaved over ``rounds``
rounds (runtimes.interleaved), these are timed:
* integer (B): the jitted executor with each CPU kernel backend B that loads here
  ('onednn': oneDNN's int8 primitives, the default; 'vnni': the hand-written AVX-512 VNNI
  convolution);
* float eval: the same model and parameters in float mode (float32 conv + BatchNorm, JAX);
* onnxruntime float32: the exported network in float32 (``onnx_export.to_onnx(...,
  quantized=False)``: the program's weights, BatchNorm folded);
* onnxruntime int8 / openvino int8: that float32 model quantized by
  onnxruntime.quantization.quantize_static (QDQ, per-channel int8 weights, uint8
  activations, MinMax calibration on 16 other random images), run by ONNX Runtime's CPU
  provider and by OpenVINO (default precision settings).
ONNX engines get uint8 NCHW images, the executor uint8 NHWC (layout change not timed).
Every engine runs with ``threads`` threads (ONNX Runtime intra-op, OpenVINO inference
threads; JAX and oneDNN use the machine's cores). Then the same at batch 1 (latency), and
for ResNet-18 the time of each oneDNN call of the executor alone (per layer) against the
whole executor. Then, for ResNet-18, a batch sweep (``--sweep``, default 1 2 4 8 16): ms
per image of the default backend, of OpenVINO int8 and of OpenVINO running our exact
export (f32 hint), interleaved at each batch, and which implementation runs each layer at
that batch (every layer's at the benchmark's batch; at the others, the layers whose
implementation differs). Last lines (ResNet-18, the default backend):
`resnet20 integer/openvino int8 throughput ratio: R` (at its batch),
`integer/openvino int8 throughput ratio: R` (images/s at the benchmark's batch),
`integer/openvino batch-1 latency ratio: R` (ms at batch 1, ours over OpenVINO's: below 1
is faster), `integer worst per-image time over batch <B>'s: R` (the sweep's largest ms per
image over the benchmark batch's: a cliff shows here) and
`integer/float eval throughput ratio: R`.
"""

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import runtimes  # noqa: E402

from f8net_jax import integer  # noqa: E402
from f8net_jax.integer import executor as executor_lib, onednn, ops  # noqa: E402
from f8net_jax.ops import window_output_size  # noqa: E402


def engines(case: runtimes.Case, threads: int):
    fns, kinds = {}, {}
    default = executor_lib.default_backend()
    backends = [default] + [b for b, ok in executor_lib.KERNEL_BACKENDS.items()
                            if b != default and ok()[0]]
    for backend in backends:
        fns[f"integer ({backend})"] = integer.Executor(case.program, backend=backend)
        kinds[f"integer ({backend})"] = "nhwc"
    fns["float eval (jax)"], kinds["float eval (jax)"] = runtimes.float_eval(case), "nhwc"
    models = runtimes.onnx_models(case)
    size = case.images.shape[1]
    calibration = np.random.default_rng(1).integers(0, 256, (16, 3, size, size), np.uint8)
    int8 = runtimes.ort_quantize_static(models["float32"], calibration)
    fns["onnxruntime float32"] = runtimes.ort_engine(models["float32"], threads)
    fns["onnxruntime int8"] = runtimes.ort_engine(int8, threads)
    fns["openvino int8"] = runtimes.openvino_engine(int8, threads)
    for name in ("onnxruntime float32", "onnxruntime int8", "openvino int8"):
        kinds[name] = "nchw"
    return fns, kinds, f"integer ({default})"


def per_layer(case: runtimes.Case, executor) -> None:
    """ms of each oneDNN call of the executor alone, at the benchmark's batch, interleaved
    with the whole executor (no settling pause: the calls follow one another as in it)."""
    batch = len(case.images)
    names = executor.implementations(batch)
    arrays = executor.arrays_for(batch)
    rng = np.random.default_rng(0)
    fns, inputs, rows = {"executor": executor}, {"executor": jnp.asarray(case.images)}, {}
    for op in executor.plan.ops:
        if not ops.kind_of(op).accumulating:
            continue
        w = arrays[f"{op['name']}/weight"]
        geometry = executor.plan.backend._geometry(op, batch)[0]
        _, exact, layout = onednn.choice(geometry)
        if not exact:
            continue
        shape = op["weight_shape"]
        if op["op"] == "conv":
            h, wd = op["in_spatial"]
            p = op["kernel_padding"]
            extra = 2 * (op["padding"] - p)
            x = rng.integers(0, 256, (batch, h + extra, wd + extra, shape[2] * op["groups"]),
                             np.uint8)
            fn = jax.jit(lambda x, w, op=op, p=p, shape=shape, layout=layout: onednn.conv(
                x, w, kernel_size=int(shape[0]), strides=op["strides"], padding=p,
                groups=op["groups"], out_channels=int(shape[3]), layout=layout))
            oh = window_output_size(h, int(shape[0]), op["strides"], op["padding"])
            ow = window_output_size(wd, int(shape[0]), op["strides"], op["padding"])
            macs = batch * oh * ow * int(np.prod(shape))
            what = f"{h}x{wd}x{shape[2] * op['groups']} k{shape[0]} s{op['strides']} -> {shape[3]}"
        else:
            x = rng.integers(0, 256, (batch, shape[0]), np.uint8)
            fn = jax.jit(lambda x, w, shape=shape, layout=layout: onednn.dense(
                x, w, out_channels=int(shape[1]), layout=layout))
            macs = batch * int(np.prod(shape))
            what = f"{shape[0]} -> {shape[1]}"
        fns[op["name"]] = lambda x, fn=fn, w=w: fn(x, w)
        inputs[op["name"]] = jnp.asarray(x)
        rows[op["name"]] = (what, macs)
    seconds = runtimes.interleaved(fns, inputs, rounds=3, per_round=3, settle=0)
    print(f"  per layer, each oneDNN call alone at batch {batch} (interleaved with the whole "
          "executor):")
    for name, (what, macs) in rows.items():
        print(f"    {name:28s} {what:28s} {names[name]:28s} {1e3 * seconds[name]:7.2f} ms "
              f"{macs / seconds[name] / 1e9:7.1f} GMAC/s")
    layers_ms = 1e3 * sum(seconds[name] for name in rows)
    total_ms = 1e3 * seconds["executor"]
    print(f"  oneDNN calls {layers_ms:.1f} ms of the executor's {total_ms:.1f} ms; the rest "
          f"(requantization, adds, pools, padding, recoding) {total_ms - layers_ms:.1f} ms "
          f"({100 * (total_ms - layers_ms) / total_ms:.0f}%)")


def sweep(case: runtimes.Case, main: str, executor, batches, args) -> dict:
    """ms per image of ours and of OpenVINO (int8, and on our export) at each batch size;
    the implementation of every layer at each."""
    models = runtimes.onnx_models(case)
    size = case.images.shape[1]
    calibration = np.random.default_rng(1).integers(0, 256, (16, 3, size, size), np.uint8)
    fns = {main: executor,
           "openvino int8": runtimes.openvino_engine(
               runtimes.ort_quantize_static(models["float32"], calibration), args.threads),
           "openvino (our export)": runtimes.openvino_engine(models["exact"], args.threads,
                                                             "f32")}
    per_image, first = {}, None
    print(f"{case.name} {size}x{size} batch sweep, ms per image ({runtimes.machine()}):")
    print(f"  {'batch':>5s} " + " ".join(f"{k:>22s}" for k in fns))
    for b in batches:
        images = np.random.default_rng(b).integers(0, 256, (b, size, size, 3), np.uint8)
        inputs = {k: jnp.asarray(images) if k == main else runtimes.nchw(images) for k in fns}
        seconds = runtimes.interleaved(fns, inputs, args.rounds, args.per_round)
        per_image[b] = {k: 1e3 * v / b for k, v in seconds.items()}
        print(f"  {b:5d} " + " ".join(f"{per_image[b][k]:22.2f}" for k in fns))
    if hasattr(executor, "implementations"):
        for b in batches:
            impls = executor.implementations(b)
            if first is None:
                first = impls
                print(f"  implementations at batch {b}: " + ", ".join(
                    f"{k}: {v}" for k, v in impls.items()))
            else:
                changed = {k: v for k, v in impls.items() if v != first[k]}
                print(f"  at batch {b}: " + (", ".join(f"{k}: {v}" for k, v in changed.items())
                                             or "the same"))
    return per_image


def measure(name, size, classes, batch, args):
    case = runtimes.make_case(name, size, classes, batch)
    fns, kinds, main = engines(case, args.threads)
    rates = {}
    for b in (batch, 1):
        images = case.images[:b]
        inputs = {k: jnp.asarray(images) if kinds[k] == "nhwc" else runtimes.nchw(images)
                  for k in fns}
        seconds = runtimes.interleaved(fns, inputs, args.rounds, args.per_round)
        rates[b] = {k: b / s for k, s in seconds.items()}
        print(f"{name} {size}x{size} batch {b} ({runtimes.machine()}):")
        for k, s in seconds.items():
            print(f"  {k:24s} {b / s:9.1f} img/s {1e3 * s:9.2f} ms/batch")
    r = rates[batch]
    print(f"  integer/float eval {r[main] / r['float eval (jax)']:.2f}, integer/openvino int8 "
          f"{r[main] / r['openvino int8']:.2f}, integer/onnxruntime int8 "
          f"{r[main] / r['onnxruntime int8']:.2f}, integer/onnxruntime float32 "
          f"{r[main] / r['onnxruntime float32']:.2f}; batch-1 latency: "
          + ", ".join(f"{k} {1e3 / v:.2f} ms" for k, v in rates[1].items()))
    if name == "resnet18" and main == "integer (onednn)":
        per_layer(case, fns[main])
    return r, rates[1], main, case, fns[main]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per_round", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resnet18_batch", type=int, default=8)
    parser.add_argument("--resnet20_batch", type=int, default=128)
    parser.add_argument("--sweep", type=int, nargs="*", default=[1, 2, 4, 8, 16],
                        help="ResNet-18 batch sizes of the sweep (none: no sweep)")
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; "
          f"{runtimes.machine()}")
    r20, _, main20, _, _ = measure("resnet20", 32, 10, args.resnet20_batch, args)
    r, r1, main, case, executor = measure("resnet18", 224, 1000, args.resnet18_batch, args)
    per_image = sweep(case, main, executor, args.sweep, args) if args.sweep else {}
    print(f"machine after: {runtimes.machine()}")
    print(f"resnet20 integer/openvino int8 throughput ratio: "
          f"{r20[main20] / r20['openvino int8']:.2f}")
    print(f"integer/openvino int8 throughput ratio: {r[main] / r['openvino int8']:.2f}")
    print(f"integer/openvino batch-1 latency ratio: {r1['openvino int8'] / r1[main]:.2f}")
    if per_image:
        base = per_image.get(args.resnet18_batch, {}).get(main) or 1e3 / r[main]
        worst = max(per_image, key=lambda b: per_image[b][main])
        print(f"integer worst per-image time over batch {args.resnet18_batch}'s: "
              f"{per_image[worst][main] / base:.2f} (batch {worst})")
    print(f"integer/float eval throughput ratio: {r[main] / r['float eval (jax)']:.2f}")


if __name__ == "__main__":
    main()
