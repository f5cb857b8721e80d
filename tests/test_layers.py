"""The quantized layers against a direct numpy computation of METHOD.md 4, and their state."""

import jax
import numpy as np
import pytest

from f8net_jax import layers
from f8net_jax.layers import QuantConfig, QuantConvBN, QuantDense

FIXED = QuantConfig(mode="fixed")


def numpy_conv(x, w, stride, pad, groups):
    """Direct convolution in float64: x NHWC, w HWIO (I = C / groups)."""
    x = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw, cin_g, cout = w.shape
    n, h, wd, c = x.shape
    oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
    out = np.zeros((n, oh, ow, cout))
    cout_g = cout // groups
    for g in range(groups):
        xs = x[..., g * cin_g:(g + 1) * cin_g]
        ws = w[..., g * cout_g:(g + 1) * cout_g].astype(np.float64)
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, i:i + stride * oh:stride, j:j + stride * ow:stride, :]
                out[..., g * cout_g:(g + 1) * cout_g] += patch @ ws[i, j]
    return out


def np_quantize(v, fl, signed):
    hi = 127 if signed else 255
    scale = 2.0 ** np.asarray(fl, np.float64)
    return np.clip(np.round(v.astype(np.float64) * scale), -hi if signed else 0, hi) / scale


def hand_set_variables(rng, k, cin, cout, depthwise, signed, alpha, input_fraclen):
    kernel = rng.standard_normal((k, k, 1 if depthwise else cin, cout)).astype(np.float32) * 0.2
    return {
        "params": {
            "kernel": kernel,
            "scale": rng.uniform(0.5, 1.5, cout).astype(np.float32),
            "bias": rng.uniform(-0.5, 0.5, cout).astype(np.float32),
            "input": {"alpha": np.float32(alpha)},
        },
        "batch_stats": {
            "mean": rng.uniform(-0.3, 0.3, cout).astype(np.float32),
            "var": rng.uniform(0.2, 2.0, cout).astype(np.float32),
        },
        "quant_stats": {"input": {"fraclen": np.float32(input_fraclen)}},
    }


@pytest.mark.parametrize("case", [
    dict(k=3, cin=4, cout=6, stride=1, depthwise=False, signed=False, alpha=6.0, fl=5.4),
    dict(k=3, cin=5, cout=5, stride=2, depthwise=True, signed=False, alpha=3.0, fl=6.6),
    dict(k=1, cin=4, cout=8, stride=2, depthwise=False, signed=True, alpha=2.5, fl=4.2),
    dict(k=3, cin=3, cout=4, stride=1, depthwise=False, signed=True, alpha=-4.0, fl=7.0),
    dict(k=3, cin=4, cout=6, stride=2, depthwise=False, signed=False, alpha=5.0, fl=3.0,
         channel=True),
    dict(k=3, cin=6, cout=6, stride=1, depthwise=True, signed=True, alpha=2.0, fl=5.0,
         channel=True),
])
def test_conv_eval_forward_equals_numpy_method(case):
    """Eval: y = conv(Q(x; fl_in), Q(W_f; fl_w)) + round(b_f) with W_f, b_f, the formats and
    the bias rounding computed by hand from METHOD.md 2, 3, 4 and 6."""
    rng = np.random.default_rng(7)
    signed, alpha = case["signed"], case["alpha"]
    out_scale = np.float32(0.037)
    channel = case.get("channel", False)
    quant = QuantConfig(mode="fixed", granularity="channel" if channel else "layer")
    layer = QuantConvBN(case["cin"], case["cout"], case["k"], quant, strides=case["stride"],
                        depthwise=case["depthwise"], input_kind="signed" if signed else "unsigned")
    variables = hand_set_variables(rng, case["k"], case["cin"], case["cout"], case["depthwise"],
                                   signed, alpha, case["fl"])
    x = (rng.standard_normal((2, 7, 7, case["cin"])) * 2.0).astype(np.float32)
    y = layer.apply(variables, x, alpha=variables["params"]["input"]["alpha"],
                    out_scale=out_scale, train=False)

    p, bs = variables["params"], variables["batch_stats"]
    fl_in = min(max(np.round(case["fl"]), 0), 7 if signed else 8)
    s_in = np.float32(2.0 ** fl_in * abs(alpha) / (127 if signed else 255))
    inv_sigma = p["scale"] / np.sqrt(bs["var"] + np.float32(1e-5))
    w_f = inv_sigma * p["kernel"] * s_in / out_scale
    b_f = (p["bias"] - inv_sigma * bs["mean"]) / out_scale
    # Weight format: per layer, or per output channel (the kernel's last axis).
    std = np.std(w_f.astype(np.float64), ddof=1, axis=(0, 1, 2) if channel else None)
    fl_w = np.clip(np.floor(np.log2(40.0 / std)), 0, 7)
    b_q = np.round(b_f.astype(np.float64) * 2.0 ** (fl_in + fl_w)) / 2.0 ** (fl_in + fl_w)
    groups = case["cin"] if case["depthwise"] else 1
    expected = numpy_conv(np_quantize(x, fl_in, signed), np_quantize(w_f, fl_w, True),
                          case["stride"], case["k"] // 2, groups) + b_q
    np.testing.assert_array_equal(np.asarray(y, np.float64), expected.astype(np.float32))


def test_running_input_format_follows_the_rule_by_hand():
    """Unsigned input with std 0.5: fl_batch = floor(log2(70 / 0.5)) = 7; buf 6 -> 6.1;
    then std 3: floor(log2(23.3)) = 4; buf 6.1 -> 0.9 * 6.1 + 0.1 * 4 = 5.89."""
    layer = QuantConvBN(2, 3, 1, FIXED)
    x1 = np.zeros((1, 2, 2, 2), np.float32)
    x1.flat[:] = np.array([0, 1, 0, 1, 0, 1, 0, 1]) * 1.0
    x1 *= np.float32(0.5 / np.std(x1, ddof=1))
    variables = layer.init(jax.random.PRNGKey(0), x1, train=False)
    assert float(variables["quant_stats"]["input"]["fraclen"]) == 6.0
    _, upd = layer.apply(variables, x1, train=True, mutable=["batch_stats", "quant_stats"])
    np.testing.assert_allclose(upd["quant_stats"]["input"]["fraclen"], 6.1, rtol=1e-6)
    x2 = x1 * 6.0
    variables = {**variables, **upd}
    _, upd = layer.apply(variables, x2, train=True, mutable=["batch_stats", "quant_stats"])
    np.testing.assert_allclose(upd["quant_stats"]["input"]["fraclen"], 0.9 * 6.1 + 0.4, rtol=1e-6)
    # Eval rounds the running format: 5.89 -> 6.
    fl = layers.folding.running_fraclen(upd["quant_stats"]["input"]["fraclen"], signed=False)
    assert float(fl) == 6.0


def test_training_pass_uses_batch_statistics_and_updates_running_ones():
    """Float and fixed training passes normalize with the batch statistics of the first
    pass, conv(s * Q(x), W); running statistics move by momentum 0.1 (unbiased variance)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 3, (4, 5, 5, 3)).astype(np.float32)
    for quant in (QuantConfig(mode="float"), FIXED):
        layer = QuantConvBN(3, 4, 3, quant)
        v = layer.init(jax.random.PRNGKey(1), x, train=False)
        alpha = v["params"]["input"]["alpha"]
        y, upd = layer.apply(v, x, alpha=alpha, train=True, mutable=["batch_stats", "quant_stats"])
        # Output (in consumer units, out_scale = 1) is batch-normalized: mean ~ beta = 0.
        np.testing.assert_allclose(np.mean(np.asarray(y), axis=(0, 1, 2)), 0.0, atol=0.05)
        x_in = np.clip(x, 0, float(alpha))
        if quant.fixed:
            # The scale of this step: running format after the update, 0.9 * 6 + 0.1 * fl_b.
            fl_b = np.floor(np.log2(70.0 / np.std(x, ddof=1)))
            fl_s = np.round(0.9 * 6 + 0.1 * fl_b)
            s = 2.0 ** fl_s * float(alpha) / 255
            x_in = s * np_quantize(x, fl_b, False)
        y0 = numpy_conv(x_in, np.asarray(v["params"]["kernel"]), 1, 1, 1)
        n = y0.shape[0] * y0.shape[1] * y0.shape[2]
        np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * y0.mean(axis=(0, 1, 2)),
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(upd["batch_stats"]["var"],
                                   0.9 + 0.1 * y0.var(axis=(0, 1, 2)) * n / (n - 1), rtol=1e-4)


def test_fixed_eval_output_times_consumer_scale_approximates_float_layer():
    """Units: the fixed layer's output times its consumer's scale is the real value the
    float layer computes from the same variables (up to 8-bit rounding)."""
    rng = np.random.default_rng(3)
    variables = hand_set_variables(rng, 3, 8, 16, False, False, 4.0, 5.0)
    x = rng.uniform(0, 4, (2, 6, 6, 8)).astype(np.float32)
    alpha = variables["params"]["input"]["alpha"]
    s_in = 2.0 ** 5 * 4.0 / 255
    fixed = QuantConvBN(8, 16, 3, FIXED).apply(variables, x / s_in, alpha=alpha,
                                               out_scale=0.05, train=False)
    float_vars = {k: v for k, v in variables.items() if k != "quant_stats"}
    real = QuantConvBN(8, 16, 3, QuantConfig(mode="float")).apply(float_vars, x, alpha=alpha,
                                                                  train=False)
    err = np.asarray(fixed) * 0.05 - np.asarray(real)
    assert np.sqrt(np.mean(err**2)) < 0.02 * np.std(real)


def test_training_formats_official_and_consistent_clip():
    """Official training step: quantize with the batch format fl_b, scale from the updated
    running format. consistent_clip: quantize and scale with the running format, so the
    clip is alpha exactly. Both update the running format the same way."""
    x = np.linspace(0, 50, 64, dtype=np.float32).reshape(1, 8, 8, 1)  # std ~ 14.8: fl_b = 2
    fl_b = np.floor(np.log2(70 / np.std(x, ddof=1)))
    assert fl_b == 2
    results = {}
    for consistent in (False, True):
        quantizer = layers.InputQuantizer(kind="unsigned", owns_alpha=True,
                                          quant=QuantConfig(consistent_clip=consistent))
        v = quantizer.init(jax.random.PRNGKey(0), x, alpha=8.0, train=False)
        (x_q, fl, s), upd = quantizer.apply(v, x, alpha=8.0, train=True, mutable=["quant_stats"])
        np.testing.assert_allclose(upd["quant_stats"]["fraclen"], 0.9 * 6 + 0.1 * fl_b, rtol=1e-6)
        results[consistent] = (np.asarray(x_q), float(fl), float(s))
    x_q, fl, s = results[False]
    assert fl == fl_b and s == pytest.approx(2.0**6 * 8.0 / 255)  # round(5.6) = 6
    np.testing.assert_array_equal(x_q, np_quantize(x, fl_b, False))
    x_q, fl, s = results[True]
    assert fl == 6.0 and s == pytest.approx(2.0**6 * 8.0 / 255)
    assert x_q.max() * s == pytest.approx(8.0)               # clipped at alpha exactly


def test_classifier_eval_is_train_logits_scaled_by_a_positive_constant():
    rng = np.random.default_rng(5)
    dense = QuantDense(16, 10, FIXED)
    x = rng.uniform(0, 3, (4, 16)).astype(np.float32)
    v = dense.init(jax.random.PRNGKey(0), x, train=False)
    v["params"]["bias"] = rng.standard_normal(10).astype(np.float32)
    alpha = v["params"]["input"]["alpha"]
    ev = np.asarray(dense.apply(v, x, alpha=alpha, train=False))
    # Train-mode arithmetic with the eval format: (s Q(x)) @ (ws Q(w)) + b.
    fl = 6.0
    s = 2.0**fl * 8.0 / 255
    w = np.asarray(v["params"]["kernel"])
    fl_w = np.clip(np.floor(np.log2(40 / np.std(w.astype(np.float64), ddof=1))), 0, 7)
    qw = np_quantize(w, fl_w, True)
    ws = (1 / np.sqrt(10)) / np.std(qw, ddof=1)
    train_logits = (s * np_quantize(x, fl, False)) @ (ws * qw) + v["params"]["bias"]
    # Eval adds the bias rounded to the accumulator format fl_x + fl_w.
    acc_fl = fl + fl_w
    bias_q = np.round(v["params"]["bias"] / (s * ws) * 2.0**acc_fl) / 2.0**acc_fl
    np.testing.assert_allclose(ev, np_quantize(x, fl, False) @ qw + bias_q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ev * s * ws, train_logits, atol=s * ws * 2.0**-acc_fl)


def test_bad_layer_options_raise():
    with pytest.raises(ValueError, match=r"granularity 'channel' is not available for the classifier"):
        QuantDense(4, 3, FIXED, granularity="channel").init(
            jax.random.PRNGKey(0), np.ones((1, 4), np.float32))
    with pytest.raises(ValueError, match=r"input kind must be one of \['unsigned', 'signed', 'image'\]"):
        QuantConvBN(1, 1, 1, FIXED, input_kind="relu").init(
            jax.random.PRNGKey(0), np.ones((1, 2, 2, 1), np.float32))
    with pytest.raises(ValueError, match="depthwise conv needs features == in_features"):
        QuantConvBN(2, 4, 3, FIXED, depthwise=True).init(
            jax.random.PRNGKey(0), np.ones((1, 2, 2, 2), np.float32))


@pytest.mark.parametrize("field, value, match", [
    ("mode", "int8", r"mode must be one of \['float', 'fixed'\]"),
    ("format_rule", "max", r"format_rule must be one of \['std', 'mae', 'rms', 'grid'\]"),
    ("granularity", "tensor", r"granularity must be one of \['layer', 'channel'\]"),
    ("weight_format", (4, 3), "must have the same bits"),
    ("formats", ((4, 3), (4, 3)), "must have 8 bits with format_rule 'std'"),
    ("weight_format", (8, 8), r"fraclen must be in \[0, 7\]"),
    ("input_format", (8, 9), r"input_format fraclen must be in \[0, 8\]"),
    ("format_momentum", 0.0, r"format_momentum must be in \(0, 1\]"),
])
def test_quant_config_rejects_bad_values(field, value, match):
    kwargs = ({"weight_format": value[0], "input_format": value[1]} if field == "formats"
              else {field: value})
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


def test_quant_config_from_ml_collections():
    import ml_collections
    cfg = ml_collections.ConfigDict({"mode": "float", "clipping": False, "format_rule": "grid"})
    q = QuantConfig.from_config(cfg)
    assert (q.mode, q.clipping, q.format_rule) == ("float", False, "grid")
    with pytest.raises(ValueError, match=r"unknown quant field\(s\) \['rule'\]"):
        QuantConfig.from_config({"rule": "std"})


def test_stem_passes_the_gradient_to_every_pixel_and_keeps_pixels_exact():
    """The image input (pixels p as p / 256 at fl 8) is on its grid already: the forward
    is exact, and the straight-through gradient reaches every pixel, 0 and 255 included,
    as in the official code, whose stem reads the image unquantized."""
    layer = QuantConvBN(1, 2, 1, FIXED, input_kind="image")
    pixels = np.array([0, 1, 128, 254, 255, 255, 7, 0], np.float32).reshape(1, 2, 4, 1)
    x = pixels / 256.0
    variables = layer.init(jax.random.PRNGKey(0), x, train=False)

    def out(x):
        y, _ = layer.apply(variables, x, train=True, mutable=["batch_stats", "quant_stats"])
        return y[..., 0].sum() + (y[..., 1] ** 2).sum()

    grad = np.asarray(jax.grad(out)(x))
    assert np.all(grad != 0), grad.ravel()
    quantizer = layers.InputQuantizer(kind="image", owns_alpha=False, quant=FIXED)
    x_q, fl, _ = quantizer.apply({}, x, alpha=None, train=True)
    np.testing.assert_array_equal(np.asarray(x_q), x)
    assert float(fl) == 8.0


def test_the_default_config_quant_block_holds_quant_config_defaults():
    import dataclasses

    from f8net_jax import defaults

    block = dict(defaults.get_config().quant)
    fields = {f.name: f.default for f in dataclasses.fields(QuantConfig)}
    assert set(block) == set(fields) - {"batch_axis_name"}  # set by the training loop
    for name, value in block.items():
        assert tuple(value) == fields[name] if isinstance(value, (tuple, list)) \
            else value == fields[name], name
    assert QuantConfig.from_config(defaults.get_config().quant) == QuantConfig()


def test_every_quant_config_field_has_its_comment_beside_it():
    """defaults.py builds the quant block from the fields: their comments are its docs."""
    import dataclasses
    import inspect
    import re

    source = inspect.getsource(QuantConfig)
    for field in dataclasses.fields(QuantConfig):
        assert re.search(rf"^    {field.name}: [^=]+ = [^#]+# \S", source, re.M), field.name
