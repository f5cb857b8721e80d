"""Single convolutions of ResNet-18 at 224 (batch 8): XLA's int8 convolution and the VNNI
kernel against XLA's float32 one, measured in one run; and whether XLA's int8 dot_general
is exact for small contractions on this device.

    python benchmarks/int8_conv.py [--batch 8] [--repeats 10]

Per layer prints ms of float32 (XLA), int8 -> int32 (XLA) and, on a CPU with AVX-512 VNNI,
the kernel of f8net_jax/integer/kernels (checked equal to XLA's int8 result), with the
ratios to float32. Then, for contractions K in 9, 12, 27, 147, whether an int8 x int8 ->
int32 dot_general equals the exact int64 product. Last line:
`vnni/float conv speed ratio (geometric mean): R` (or the xla int8 one without the kernel).
"""

import argparse
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from f8net_jax.integer import vnni

# (input size, in channels, out channels, kernel, stride): the stem and one conv per stage
LAYERS = [(224, 3, 64, 7, 2), (56, 64, 64, 3, 1), (56, 64, 128, 3, 2), (28, 128, 128, 3, 1),
          (14, 256, 256, 3, 1), (7, 512, 512, 3, 1), (56, 64, 128, 1, 2)]


def _ms(fn, *args, repeats):
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _conv(x, w, s, p, **kw):
    return jax.lax.conv_general_dilated(x, w, (s, s), [(p, p)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), **kw)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    has_kernel = vnni.available()[0]
    on_cpu = jax.default_backend() == "cpu"
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, VNNI kernel: "
          f"{'yes' if has_kernel else 'no (' + vnni.available()[1] + ')'}")
    rng = np.random.default_rng(0)
    ratios = []
    for size, cin, cout, k, s in LAYERS:
        p = k // 2
        x = rng.integers(0, 256, (args.batch, size, size, cin), dtype=np.uint8)
        w = rng.integers(-127, 128, (k, k, cin, cout), dtype=np.int8)
        f32 = _ms(jax.jit(lambda x, w: _conv(x, w, s, p)), x.astype(np.float32),
                  w.astype(np.float32), repeats=args.repeats)
        line = f"{size}x{size}x{cin} -> {cout}, {k}x{k}/{s}: float32 {f32:.2f} ms"
        if on_cpu:  # XLA has no int8 convolution with int32 results on GPUs
            x8 = (x.astype(np.int16) - 128).astype(np.int8)  # any int8 operand times the same
            int8_fn = jax.jit(lambda x, w: _conv(x, w, s, p, preferred_element_type=jnp.int32))
            i8 = _ms(int8_fn, x8, w, repeats=args.repeats)
            line += f", xla int8 {i8:.2f} ms ({f32 / i8:.2f}x)"
            ratio = f32 / i8
        if has_kernel:
            packed, cp, cop = vnni.pack_weight(w)

            def kernel(x, packed):
                x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, cp - cin)))
                return vnni.conv(x, packed, jnp.zeros((cop,), jnp.int32), kernel_size=k,
                                 strides=s, out_channels=cout)
            kernel = jax.jit(kernel)
            reference = _conv(x.astype(np.int32), w.astype(np.int32), s, p)
            if not np.array_equal(np.asarray(kernel(x, packed)), np.asarray(reference)):
                raise SystemExit(f"the VNNI kernel differs from the exact result on {line}")
            kv = _ms(kernel, x, packed, repeats=args.repeats)
            line += f", vnni {kv:.2f} ms ({f32 / kv:.2f}x)"
            ratio = f32 / kv
        print(line)
        if on_cpu:
            ratios.append(ratio)
    for depth in (9, 12, 27, 147):
        a = rng.integers(-128, 128, (2048, depth)).astype(np.int8)
        b = rng.integers(-127, 128, (depth, 16)).astype(np.int8)
        got = jax.jit(lambda a, b: jax.lax.dot_general(
            a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32))(a, b)
        diff = np.abs(np.asarray(got, np.int64) - a.astype(np.int64) @ b.astype(np.int64)).max()
        print(f"int8 dot_general, contraction {depth}: "
              + ("exact" if diff == 0 else f"WRONG (max difference {diff})"))
    if ratios:
        mean = math.exp(sum(map(math.log, ratios)) / len(ratios))
        print(f"{'vnni' if has_kernel else 'xla int8'}/float conv speed ratio "
              f"(geometric mean): {mean:.2f}")


if __name__ == "__main__":
    main()
