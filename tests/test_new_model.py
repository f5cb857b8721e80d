"""A network the package has never seen, built from its public layers, trains, exports to
an integer program with no exporter change, and runs bit-exact and audit-clean."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import jax_utils

from f8net_jax.configs import default
from f8net_jax import integer, recording, steps
from f8net_jax.integer import audit
from f8net_jax.integer.verification import verify
from f8net_jax.layers import QuantConfig, QuantConvBN, QuantDense
from f8net_jax.streams import global_average_pool, max_pool, relu, residual_add, scale_plan
from f8net_jax.models.common import prepare_image


class TinyNet(nn.Module):
    """Strided stem, depthwise and pointwise layers, two branches of different formats
    added, a max pool, the global pool and the classifier."""

    num_classes: int
    quant: QuantConfig
    total_stride = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        q = self.quant
        x = prepare_image(x, total_stride=self.total_stride, model="TinyNet")
        stem = QuantConvBN(x.shape[-1], 16, 3, q, strides=2, input_kind="image", name="stem")
        depthwise = QuantConvBN(16, 16, 3, q, depthwise=True, name="depthwise")
        pointwise = QuantConvBN(16, 24, 1, q, name="pointwise")
        wide = QuantConvBN(24, 24, 3, q, name="wide")
        narrow = QuantConvBN(24, 24, 1, q, owns_alpha=False, name="narrow")  # wide's chain
        classifier = QuantDense(24, self.num_classes, q, name="classifier")
        alphas, scales = scale_plan([stem, depthwise, pointwise, wide, classifier])
        x = relu(stem(x, alpha=alphas[0], out_scale=scales[1], train=train))
        x = depthwise(x, alpha=alphas[1], out_scale=scales[2], train=train)
        x = relu(pointwise(x, alpha=alphas[2], out_scale=scales[3], train=train))
        a = wide(x, alpha=alphas[3], out_scale=scales[4], train=train)
        b = narrow(x, alpha=alphas[3], out_scale=scales[4], train=train)
        x = max_pool(residual_add(a, b, relu=True), 3, 2, 1, compute=q.compute)
        x, factor = global_average_pool(x, q)
        return classifier(x, alpha=alphas[4], input_factor=factor, train=train)


def test_a_new_network_trains_exports_and_runs_bit_exact_with_no_exporter_change():
    config = default.get_config()
    config.quant.rescale_classifier = False
    model = TinyNet(num_classes=10, quant=steps.quant_config(config))
    lr_fn = steps.learning_rate_fn(config, steps_per_epoch=4, total_steps=4)
    state = steps.create_train_state(jax.random.PRNGKey(0), config, model, (16, 16, 3), lr_fn)
    step = jax.pmap(functools.partial(steps.train_step, model=model), axis_name="batch")
    state = jax_utils.replicate(state)
    rng = np.random.default_rng(0)
    for _ in range(4):
        batch = {"image": rng.integers(0, 256, (1, 16, 16, 16, 3), dtype=np.uint8),
                 "label": rng.integers(0, 10, (1, 16)).astype(np.int32),
                 "mask": np.ones((1, 16), bool)}
        state, _ = step(state, batch)
    state = jax.device_get(steps.unreplicate(state))
    # A larger BatchNorm scale on one branch: its folded weights take a coarser format.
    params = dict(state.params, narrow=dict(state.params["narrow"],
                                            scale=state.params["narrow"]["scale"] * 4.0))
    variables = {"params": params, "batch_stats": state.batch_stats,
                 "quant_stats": state.quant_stats}

    program = integer.export(variables, model.clone(quant=QuantConfig(rescale_classifier=False)),
                             image_shape=(16, 16, 3))
    kinds = [op["op"] for op in program.ops]
    assert program.model == "TinyNet"
    for kind in ("conv", "add", "max_pool", "avg_pool", "dense"):
        assert kind in kinds
    assert any(op.get("groups", 1) == 16 for op in program.ops)  # the depthwise layer
    add = next(op for op in program.ops if op["op"] == "add")
    assert add["shift"][0] != add["shift"][1]  # the branches arrive in different formats

    images = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    report = verify(program, model.clone(quant=QuantConfig(rescale_classifier=False)),
                    variables, images)
    assert report.exact, (report.tensors_differing, report.max_logit_diff)
    assert report.tensors_compared >= 2 * 6 * len(images) // 8
    for backend in sorted({"im2col", "xla", integer.executor.default_backend()}):
        jaxpr = integer.Executor(program, backend=backend).jaxpr(batch_size=2)
        assert audit.audit(jaxpr) == [], backend


def test_a_stream_computed_outside_the_recorded_functions_is_named():
    class Leaky(nn.Module):
        quant: QuantConfig

        @nn.compact
        def __call__(self, x, train: bool = False):
            x = prepare_image(x, total_stride=1, model="Leaky")
            stem = QuantConvBN(x.shape[-1], 8, 3, self.quant, input_kind="image", name="stem")
            classifier = QuantDense(8, 10, self.quant, name="classifier")
            alphas, scales = scale_plan([stem, classifier])
            x = stem(x, alpha=alphas[0], out_scale=scales[1], train=train)
            x = x.mean(axis=(1, 2)) * 2.0  # not one of the layers' functions
            return classifier(x, alpha=alphas[1], train=train)

    model = Leaky(QuantConfig())
    variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match="classifier reads a tensor that no recorded op wrote"):
        recording.record(model, variables, (8, 8, 1))
