"""Deployment throughput: our executor against ONNX Runtime and OpenVINO running our exact
ONNX export (``f8net_jax.integer.onnx_export``) of the same integer program.

    python benchmarks/deploy.py [--batch 8] [--threads 2] [--rounds 5] [--per_round 3]

ResNet-18 at 224x224, 1000 classes (the model of integer_inference.py: PRNGKey(0), one
training-mode forward, exported). Interleaved in one run (runtimes.interleaved):
* executor (B): our integer executor, default backend B ('onednn' where it loads) and,
  if it loads, the hand-written 'vnni' kernel;
* onnxruntime int8 (ours): ONNX Runtime's CPU provider on ``to_onnx(program)``;
* openvino int8 (ours, f32): OpenVINO on the same model with INFERENCE_PRECISION_HINT f32,
  the setting under which its results equal ours;
* openvino int8 (ours, default): the same with OpenVINO's default precision (bf16 for
  its float parts on CPUs that have bf16);
* onnxruntime float32: the exported network in float32 (``to_onnx(..., quantized=False)``).
Before timing it prints, for each ONNX engine of our export, how many logits differ from
the executor's (int32 * 2^-fl). Last lines: img/s of each, then `<engine>/executor
throughput ratio: R` for each engine.
"""

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import runtimes  # noqa: E402

from f8net_jax import integer  # noqa: E402
from f8net_jax.integer import executor as executor_lib  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per_round", type=int, default=3)
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; "
          f"{runtimes.machine()}")
    case = runtimes.make_case("resnet18", 224, 1000, args.batch)
    models = runtimes.onnx_models(case)
    default = executor_lib.default_backend()
    fns = {f"executor ({default})": integer.Executor(case.program, backend=default)}
    if default != "vnni" and executor_lib.KERNEL_BACKENDS["vnni"]()[0]:
        fns["executor (vnni)"] = integer.Executor(case.program, backend="vnni")
    fns["onnxruntime int8 (ours)"] = runtimes.ort_engine(models["exact"], args.threads)
    fns["openvino int8 (ours, f32)"] = runtimes.openvino_engine(models["exact"], args.threads,
                                                                precision="f32")
    fns["openvino int8 (ours, default)"] = runtimes.openvino_engine(models["exact"],
                                                                    args.threads)
    fns["onnxruntime float32"] = runtimes.ort_engine(models["float32"], args.threads)
    inputs = {k: jnp.asarray(case.images) if k.startswith("executor")
              else runtimes.nchw(case.images) for k in fns}
    main_name = f"executor ({default})"
    want = (np.asarray(fns[main_name](inputs[main_name]), np.float64)
            * 2.0 ** -case.program.logits_fraclen)
    for k in ("onnxruntime int8 (ours)", "openvino int8 (ours, f32)",
              "openvino int8 (ours, default)"):
        got = np.asarray(fns[k](inputs[k]), np.float64)
        print(f"{k}: {int(np.sum(got != want))} of {want.size} logits differ from the "
              f"executor's (max |diff| {np.abs(got - want).max():.3g}), "
              f"{int(np.sum(got.argmax(1) != want.argmax(1)))} of {len(want)} top-1 differ")
    seconds = runtimes.interleaved(fns, inputs, args.rounds, args.per_round)
    print(f"resnet18 224x224 batch {args.batch}, {args.threads} threads "
          f"({runtimes.machine()}):")
    for k, s in seconds.items():
        print(f"  {k:32s} {args.batch / s:8.1f} img/s")
    for k, s in seconds.items():
        if k != main_name:
            print(f"{k}/executor throughput ratio: {seconds[main_name] / s:.2f}")


if __name__ == "__main__":
    main()
