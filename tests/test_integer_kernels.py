"""The executor's oneDNN path uses only exact implementations: per layer and batch size the
first AMX or VNNI one oneDNN offers, never its reference loops or an int8 kernel that adds
products in int16; a layer without one runs on XLA, exactly; a oneDNN capped below VNNI
(ONEDNN_MAX_CPU_ISA) is declined with its reason, and the executor stays exact on inputs
that break a 16-bit pair sum."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from f8net_jax import integer, models
from f8net_jax.integer import onednn
from f8net_jax.layers import QuantConfig

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
import capped_isa  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONEDNN = onednn.available()
needs_onednn = pytest.mark.skipif(not ONEDNN[0], reason=f"no oneDNN int8 path: {ONEDNN[1]}")
ARCHITECTURES = ["resnet18", "resnet34", "resnet50", "resnet20", "resnet56", "mobilenet_v1",
                 "mobilenet_v2"]
BATCHES = [1, 2, 3, 8, 16, 64, 500]


def exact(impl: str) -> bool:
    return ("amx" in impl or "vnni" in impl) and "ref" not in impl


def on_xla(description: str) -> bool:
    """A layer oneDNN has no exact implementation for runs XLA's int8 product (exact), and
    the plan names what oneDNN offered."""
    return description.startswith("xla int8 ") and "oneDNN offers no exact one" in description


@needs_onednn
@pytest.mark.parametrize("name", [n if n in ("resnet18", "resnet20")
                                  else pytest.param(n, marks=pytest.mark.slow)
                                  for n in ARCHITECTURES])
def test_every_layer_runs_an_exact_onednn_kernel_at_every_batch(name):
    """The plan is queried, nothing is run: every layer of every architecture, at 224 and at
    32x32, at every batch size, on an AMX or VNNI implementation of oneDNN, or, where
    oneDNN offers none (seen with AMX at some batch sizes), on XLA's exact int8 product,
    saying so; never on a reference or int16-pair implementation."""
    quant = QuantConfig(mode="fixed")
    model = models.create(name, num_classes=10, quant=quant)
    x = np.zeros((1, 32, 32, 3), np.uint8)
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(x)
    for size in (224, 32):
        program = integer.export(variables, name, {"quant": quant}, image_shape=(size, size, 3))
        executor = integer.Executor(program, backend="onednn")
        for batch in BATCHES:
            impls = executor.implementations(batch)
            assert len(impls) == sum(op["op"] in ("conv", "dense") for op in program.ops)
            bad = {k: v for k, v in impls.items() if not (exact(v) or on_xla(v))}
            assert not bad, f"{name} {size}x{size} batch {batch}: {bad}"
            # oneDNN computes most layers (every one on the AVX-512 VNNI CPUs seen so far).
            assert sum(exact(v) for v in impls.values()) > len(impls) / 2, impls


@needs_onednn
@pytest.mark.parametrize("name, size", [("resnet20", 16), pytest.param(
    "resnet18", 32, marks=pytest.mark.slow)])
def test_adversarial_inputs_are_exact_on_every_cpu_backend(name, size):
    """Pixels 255 against weights +127 (pairs past int16), at batch 2: every tensor of
    'onednn' and 'vnni' equals XLA's."""
    program, images = capped_isa.adversarial_program(name, size)
    for backend in ("onednn", "vnni"):
        assert capped_isa.max_difference(program, images, backend) == 0, (name, backend)


@needs_onednn
def test_a_layer_without_an_exact_onednn_kernel_runs_on_xla_and_says_so(monkeypatch):
    """Where oneDNN offers only inexact implementations for a layer at some batch, that layer
    runs XLA's int8 product on the same codes, the plan names it, and the result is exact."""
    program, images = capped_isa.adversarial_program("resnet20", 16)
    real = onednn.choice
    refused = {}

    def choice(geometry):
        impl, ok, layout = real(geometry)
        g = tuple(int(v) for v in geometry)
        if g[1] == 2 and (g[0] == 1 or g[4] == 32):  # the dense layer and stage-3 convs
            refused[g] = impl
            return "jit_int8:avx512_core, ref:any", False, -1
        return impl, ok, layout

    monkeypatch.setattr(onednn, "choice", choice)
    executor = integer.Executor(program, backend="onednn")
    impls = executor.implementations(2)
    fallback = [k for k, v in impls.items() if "oneDNN offers no exact one" in v]
    assert "classifier" in fallback and len(fallback) > 2, impls
    assert all(exact(v) for k, v in impls.items() if k not in fallback)
    assert all(exact(v) for v in executor.implementations(1).values())
    _, got = executor.collect(images)
    _, want = integer.Executor(program, backend="xla").collect(images)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
    # batch 1 (not refused) runs oneDNN for every layer, exactly too
    _, got1 = executor.collect(images[:1])
    np.testing.assert_array_equal(np.asarray(got1[program.output]),
                                  np.asarray(want[program.output])[:1])


@needs_onednn
@pytest.mark.parametrize("isa, cases", [
    ("AVX2", ["resnet20:16"]),
    pytest.param("AVX2", ["resnet20:16", "resnet18:32"], marks=pytest.mark.slow),
    pytest.param("AVX512_CORE", ["resnet20:16", "resnet18:32"], marks=pytest.mark.slow)])
def test_a_onednn_capped_below_vnni_is_declined_and_the_executor_stays_exact(isa, cases):
    """In a process whose oneDNN is capped below VNNI (its int8 kernels then add u8 x s8
    pairs in int16, saturating), 'onednn' is declined saying why, and the backend chosen
    instead is exact in every tensor on ResNet-20 and ResNet-18."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=isa, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "scripts", "capped_isa.py"), *cases],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert not out["onednn_available"]
    assert f"ONEDNN_MAX_CPU_ISA={isa}" in out["onednn_why"] and "int16" in out["onednn_why"]
    assert out["backend"] != "onednn" and "not onednn" in out["reason"]
    assert [out[case] for case in cases] == [0] * len(cases)
