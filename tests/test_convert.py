"""Converting torchvision and official F8Net state dicts: random state dicts with the real
key names and shapes (tests/data/state_dict_keys), checked against forwards written here
in numpy from the source's own key names, and every kind of mismatch refused."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from f8net_jax import checkpoints, convert, integer
from f8net_jax.integer.verification import verify

ROOT = pathlib.Path(__file__).resolve().parents[1]
KEYS = ROOT / "tests" / "data" / "state_dict_keys"
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def key_list(name):
    out = []
    for line in open(KEYS / f"{name}.txt"):
        key, shape, dtype = line.split()
        out.append((key, tuple(int(v) for v in shape.strip("[]").split(",") if v), dtype))
    return out


def random_state(name, seed=0):
    """A state dict of the listed keys and shapes with trained-looking values."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape, dtype in key_list(name):
        if dtype == "int64":
            value = np.zeros(shape, np.int64)
        elif key.endswith("running_var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif key.endswith("running_mean"):
            value = rng.normal(0, 0.2, shape)
        elif key.endswith("alpha"):
            value = rng.uniform(2.0, 10.0, shape)
        elif key.endswith("input_fraclen"):
            value = rng.uniform(3.6, 7.4, shape)
        elif len(shape) == 1 and ("bn" in key or key.split(".")[-2].isdigit()):
            value = (rng.uniform(0.5, 1.5, shape) if key.endswith("weight")
                     else rng.normal(0, 0.1, shape))
        elif len(shape) == 4:
            value = rng.normal(0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
        elif len(shape) == 2:
            value = rng.normal(0, 1 / np.sqrt(shape[1]), shape)
        else:
            value = rng.normal(0, 0.1, shape)
        state[key] = value if dtype == "int64" else value.astype(np.float32)
    return state


# --------------------------------------------------------------------------------------
# numpy forwards, from the source's key names.


def conv(x, w, stride=1, groups=1):
    """x NHWC, w OIHW (torch), padding k // 2; float64."""
    x = np.asarray(x, np.float64)
    out_c, in_g, k, _ = w.shape
    pad = k // 2
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    n, h, wd, c = x.shape
    oh, ow = (h - k) // stride + 1, (wd - k) // stride + 1
    w = np.asarray(w, np.float64)
    out = np.zeros((n, oh, ow, out_c))
    for i in range(k):
        for j in range(k):
            patch = x[:, i:i + stride * oh:stride, j:j + stride * ow:stride, :]
            if groups == 1:
                out += patch @ w[:, :, i, j].T
            else:  # depthwise
                out += patch * w[:, 0, i, j]
    return out


def bn(x, s, p):
    return ((x - s[f"{p}.running_mean"]) / np.sqrt(s[f"{p}.running_var"].astype(np.float64) + 1e-5)
            * s[f"{p}.weight"] + s[f"{p}.bias"])


def max_pool(x):
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    n, h, w, c = x.shape
    oh, ow = (h - 3) // 2 + 1, (w - 3) // 2 + 1
    return np.max([x[:, i:i + 2 * oh:2, j:j + 2 * ow:2] for i in range(3) for j in range(3)],
                  axis=0)


def relu(x):
    return np.maximum(x, 0)


def normalized(pixels):
    return (pixels / 255.0 - MEAN) / STD


def torchvision_resnet(s, pixels, bottleneck):
    x = relu(bn(conv(normalized(pixels), s["conv1.weight"], 2), s, "bn1"))
    x = max_pool(x)
    for stage in range(1, 5):
        b = 0
        while f"layer{stage}.{b}.conv1.weight" in s:
            p, y = f"layer{stage}.{b}", x
            convs = 3 if bottleneck else 2
            for j in range(1, convs + 1):
                stride = 2 if stage > 1 and b == 0 and j == (2 if bottleneck else 1) else 1
                y = bn(conv(y, s[f"{p}.conv{j}.weight"], stride), s, f"{p}.bn{j}")
                if j < convs:
                    y = relu(y)
            if f"{p}.downsample.0.weight" in s:
                x = bn(conv(x, s[f"{p}.downsample.0.weight"], 2 if stage > 1 else 1), s,
                       f"{p}.downsample.1")
            x = relu(y + x)
            b += 1
    return x.mean(axis=(1, 2)) @ s["fc.weight"].T + s["fc.bias"]


def torchvision_mobilenet_v2(s, pixels):
    relu6 = lambda v: np.clip(v, 0, 6)
    x = relu6(bn(conv(normalized(pixels), s["features.0.0.weight"], 2), s, "features.0.1"))
    strides = {2: 2, 4: 2, 7: 2, 14: 2}
    for k in range(1, 18):
        f, y = f"features.{k}.conv", x
        if k == 1:
            y = relu6(bn(conv(y, s[f"{f}.0.0.weight"], 1, groups=32), s, f"{f}.0.1"))
            y = bn(conv(y, s[f"{f}.1.weight"]), s, f"{f}.2")
        else:
            y = relu6(bn(conv(y, s[f"{f}.0.0.weight"]), s, f"{f}.0.1"))
            dw = s[f"{f}.1.0.weight"]
            y = relu6(bn(conv(y, dw, strides.get(k, 1), groups=dw.shape[0]), s, f"{f}.1.1"))
            y = bn(conv(y, s[f"{f}.2.weight"]), s, f"{f}.3")
        x = y + x if y.shape == x.shape else y
    x = relu6(bn(conv(x, s["features.18.0.weight"]), s, "features.18.1"))
    return x.mean(axis=(1, 2)) @ s["classifier.1.weight"].T + s["classifier.1.bias"]


def official_float_mobilenet_v1(s, pixels):
    """The official float MobileNet V1 as our float mode computes it: PACT clip at each
    layer's alpha (the stem reads pixels / 256 unclipped), ReLU after each pointwise
    layer, classifier weight rescaled by 1 / sqrt(classes) / std(w)."""
    clip = lambda v, p: np.clip(v, 0, abs(float(s[f"{p}.alpha"])))
    x = relu(bn(conv(pixels / 256.0, s["head.0.conv.weight"], 2), s, "head.0.bn"))
    for st, (n, first_stride) in enumerate(zip((1, 2, 2, 6, 2), (1, 2, 2, 2, 2))):
        for i in range(n):
            p = f"stage_{st}_layer_{i}.body"
            dw = s[f"{p}.0.conv.weight"]
            x = bn(conv(clip(x, f"{p}.0"), dw, first_stride if i == 0 else 1,
                        groups=dw.shape[0]), s, f"{p}.0.bn")
            x = relu(bn(conv(clip(x, f"{p}.1"), s[f"{p}.1.conv.weight"]), s, f"{p}.1.bn"))
    w = s["classifier.0.weight"]
    ws = 1 / np.sqrt(w.shape[0]) / np.std(w.astype(np.float64), ddof=1)
    return clip(x.mean(axis=(1, 2)), "classifier.0") @ (ws * w).T + s["classifier.0.bias"]


def converted(tmp_path, source, model, state_name, seed=0):
    state = random_state(state_name, seed)
    np.savez(tmp_path / "sd.npz", **state)
    out = subprocess.run([sys.executable, "-m", "f8net_jax.convert", f"--from={source}",
                          f"--model={model}", f"--input={tmp_path / 'sd.npz'}",
                          f"--output={tmp_path / 'run'}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    model_, variables, config, _ = checkpoints.load_workdir(str(tmp_path / "run"))
    return state, model_, variables, config, out


PIXELS = np.random.default_rng(7).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("source, model, keys, forward", [
    ("torchvision", "resnet18", "torchvision_resnet18",
     lambda s, p: torchvision_resnet(s, p, False)),
    pytest.param("torchvision", "resnet50", "torchvision_resnet50",
                 lambda s, p: torchvision_resnet(s, p, True), marks=pytest.mark.slow),
    ("torchvision", "mobilenet_v2", "torchvision_mobilenet_v2", torchvision_mobilenet_v2),
    ("torchvision", "mobilenet_v1", "official_mobilenet_v1_float", official_float_mobilenet_v1),
])
def test_converted_float_model_equals_the_numpy_forward(tmp_path, source, model, keys, forward):
    state, model_, variables, config, _ = converted(tmp_path, source, model, keys)
    assert config.quant.mode == "float"
    ours = np.asarray(jax.jit(lambda v, x: model_.apply(v, x, train=False))(variables, PIXELS),
                      np.float64)
    expected = forward({k: np.asarray(v) for k, v in state.items()}, PIXELS.astype(np.float64))
    assert ours.shape == expected.shape == (2, 1000)
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-5 * scale)
    assert np.argmax(ours, 1).tolist() == np.argmax(expected, 1).tolist()


# --------------------------------------------------------------------------------------
# The official fixed-point eval forward (docs/METHOD.md 4, bias rounded), in float32.

F32 = np.float32


def q8(x, fl, signed):
    lo, hi = (-127, 127) if signed else (0, 255)
    scale = F32(2.0 ** fl)
    return (np.clip(np.round(x.astype(F32) * scale), lo, hi) / scale).astype(F32)


def input_fraclen(s, p, signed):
    return int(np.clip(np.round(s[f"{p}.input_fraclen"][0]), 0, 8 - signed))


def fix_scaling(s, p, alpha_of, signed):
    """F = 2^fl * |alpha| / (2^(8 - signed) - 1) of layer p (alpha_of: the layer whose
    alpha p reads); the stem's is 1."""
    if p == "head.0":
        return F32(1.0)
    fl = input_fraclen(s, p, signed[p])
    return F32(F32(2.0 ** fl) * np.abs(s[f"{alpha_of[p]}.alpha"])) / F32(255 if not signed[p] else 127)


def weight_fraclen(w):
    std = np.std(w.astype(np.float64), ddof=1)
    return int(np.clip(np.floor(np.log2(40.0 / std)), 0, 7))


def fixed_conv(s, x, p, following, alpha_of, signed, stride=1):
    """One ReLUClipFXQConvBN in eval: input quantized at its running format, BN and the
    scales folded in the official order, weight format by the std rule, bias rounded at
    the accumulator's format; output in the following layer's units."""
    if p == "head.0":
        x_q, fl_in = x.astype(F32), 8
    else:
        fl_in = input_fraclen(s, p, signed[p])
        x_q = q8(x, fl_in, signed[p])
    inv = s[f"{p}.bn.weight"] / np.sqrt(s[f"{p}.bn.running_var"] + F32(1e-5))
    f_self = fix_scaling(s, p, alpha_of, signed)
    f_next = fix_scaling(s, following[p], alpha_of, signed)
    w = inv[:, None, None, None] * s[f"{p}.conv.weight"] * f_self / f_next
    fl_w = weight_fraclen(w)
    w_q = q8(w, fl_w, True)
    b = (s[f"{p}.bn.bias"] - inv * s[f"{p}.bn.running_mean"]) / f_next
    acc = F32(2.0 ** (fl_in + fl_w))
    b = (np.round(b * acc) / acc).astype(F32)
    y = conv(x_q, w_q, stride, groups=w.shape[0] if w.shape[1] == 1 else 1).astype(F32)
    return y + b


def fixed_classifier(s, x, alpha_of, signed):
    p = "classifier.0"
    fl_in = input_fraclen(s, p, False)
    x_q = q8(x, fl_in, False)
    w = s[f"{p}.weight"]
    fl_w = weight_fraclen(w)
    w_q = q8(w, fl_w, True)
    ws = F32(F32(1 / np.sqrt(np.float32(w.shape[0]))) / F32(np.std(w_q.astype(np.float64), ddof=1)))
    scale = F32(fix_scaling(s, p, alpha_of, signed) * ws)
    acc = F32(2.0 ** (fl_in + fl_w))
    b = (np.round((s[f"{p}.bias"] / scale) * acc) / acc).astype(F32)
    return (x_q.astype(np.float64) @ w_q.T.astype(np.float64)).astype(F32) + b


def official_resnet18_wiring():
    """(blocks, following, alpha_of, signed) of the official ResNet-18: a block's first
    conv and shortcut read the alpha of the first identity block of their stream
    (models/fix_resnet.py master layers); a projection block starts a new stream."""
    blocks, following, alpha_of, signed = [], {}, {}, {}
    master = None
    for st in range(4):
        for i in range(2):
            p = f"stage_{st}_layer_{i}"
            projection = st > 0 and i == 0
            blocks.append((p, projection, 2 if projection else 1))
            alpha_of[f"{p}.body.0"] = master or f"{p}.body.0"
            alpha_of[f"{p}.body.1"] = f"{p}.body.1"
            if projection:
                alpha_of[f"{p}.shortcut.0"] = master or f"{p}.shortcut.0"
            master = None if projection else alpha_of[f"{p}.body.0"]
    alpha_of["classifier.0"] = "classifier.0"
    order = ["head.0"] + [f"{p}.body.0" for p, _, _ in blocks] + ["classifier.0"]
    following["head.0"] = order[1]
    for k, (p, projection, _) in enumerate(blocks):
        following[f"{p}.body.0"] = f"{p}.body.1"
        following[f"{p}.body.1"] = order[k + 2]
        if projection:
            following[f"{p}.shortcut.0"] = order[k + 2]
    signed.update({p: False for p in list(alpha_of) + ["head.0"]})
    return blocks, following, alpha_of, signed


def official_fixed_resnet18(s, pixels):
    blocks, following, alpha_of, signed = official_resnet18_wiring()
    x = relu(fixed_conv(s, pixels.astype(F32) / F32(256), "head.0", following, alpha_of,
                        signed, 2))
    x = max_pool(x).astype(F32)
    for p, projection, stride in blocks:
        y = fixed_conv(s, x, f"{p}.body.0", following, alpha_of, signed, stride)
        y = fixed_conv(s, y, f"{p}.body.1", following, alpha_of, signed)
        skip = (fixed_conv(s, x, f"{p}.shortcut.0", following, alpha_of, signed, stride)
                if projection else x)
        x = relu(y + skip)
    return fixed_classifier(s, x.mean(axis=(1, 2)).astype(F32), alpha_of, signed)


def official_fixed_mobilenet_v2(s, pixels):
    """models/fix_mobilenet_v2.py: an identity block lends its first conv's alpha to the
    first conv of the blocks that read its stream; the first conv of every block after the
    first, and the tail, read signed inputs."""
    blocks, alpha_of, signed, master = [], {}, {}, None
    channels, settings = 32, ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                              (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
    for st, (t, c, n, first) in enumerate(settings):
        for i in range(n):
            p = f"stage_{st}_layer_{i}"
            stride = first if i == 0 else 1
            identity = stride == 1 and channels == c
            layers = [f"{p}.body.{j}" for j in range(2 if st == 0 else 3)]
            for j, layer in enumerate(layers):
                alpha_of[layer] = (master or layer) if j == 0 else layer
                signed[layer] = j == 0 and st > 0
            blocks.append((layers, stride, identity))
            master = alpha_of[layers[0]] if identity else None
            channels = c
    alpha_of.update({"tail.0": "tail.0", "classifier.0": "classifier.0"})
    signed.update({"tail.0": True, "classifier.0": False, "head.0": False})
    order = ["head.0"] + [layer for layers, _, _ in blocks for layer in layers] + [
        "tail.0", "classifier.0"]
    following = {a: b for a, b in zip(order, order[1:])}
    x = relu(fixed_conv(s, pixels.astype(F32) / F32(256), "head.0", following, alpha_of,
                        signed, 2))
    for layers, stride, identity in blocks:
        y = x
        for layer in layers:
            depthwise = s[f"{layer}.conv.weight"].shape[1] == 1
            y = fixed_conv(s, y, layer, following, alpha_of, signed, stride if depthwise else 1)
        x = y + x if identity else y
    x = relu(fixed_conv(s, x, "tail.0", following, alpha_of, signed))
    return fixed_classifier(s, x.mean(axis=(1, 2)).astype(F32), alpha_of, signed)


@pytest.mark.parametrize("model, forward", [
    ("resnet18", official_fixed_resnet18),
    pytest.param("mobilenet_v2", official_fixed_mobilenet_v2, marks=pytest.mark.slow)])
def test_converted_official_fixed_point_model_equals_the_official_eval_forward(
        tmp_path, model, forward):
    state, model_, variables, config, out = converted(tmp_path, "official", model,
                                                      f"official_{model}_fixed")
    assert config.quant.mode == "fixed" and "warning" not in out.stderr
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jax.jit(lambda v, x: model_.apply(v, x, train=False))(
            variables, PIXELS))
    expected = forward({k: np.asarray(v) for k, v in state.items()}, PIXELS)
    assert np.array_equal(ours, expected), np.max(np.abs(ours - expected))
    if model == "resnet18":  # and the integer program of the converted model is exact
        program = integer.export(variables, model, config, image_shape=PIXELS.shape[1:])
        report = verify(program, model_, variables, PIXELS)
        assert report.exact, report.last_line()


# --------------------------------------------------------------------------------------
# Refusals: named keys, nothing written.


def run_convert(tmp_path, state, *args):
    np.savez(tmp_path / "sd.npz", **state)
    return subprocess.run([sys.executable, "-m", "f8net_jax.convert",
                           f"--input={tmp_path / 'sd.npz'}", f"--output={tmp_path / 'out'}",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def edited(name, edit):
    state = random_state(name)
    edit(state)
    return state


@pytest.mark.parametrize("source, model, keys, edit, match", [
    ("torchvision", "resnet18", "torchvision_resnet18",
     lambda s: s.pop("layer2.0.downsample.1.running_var"),
     "key 'layer2.0.downsample.1.running_var' is missing"),
    ("torchvision", "resnet18", "torchvision_resnet18",
     lambda s: s.update({"layer5.0.conv1.weight": np.zeros((1, 1, 1, 1), np.float32)}),
     "key 'layer5.0.conv1.weight' of the state dict has no place in our model"),
    ("torchvision", "resnet18", "torchvision_resnet18",
     lambda s: s.update({"layer1.0.conv2.weight": np.zeros((64, 64, 1, 1), np.float32)}),
     "key 'layer1.0.conv2.weight' has shape \\(64, 64, 1, 1\\)"),
    ("torchvision", "resnet50", "torchvision_resnet18", lambda s: None,
     "key 'layer1.0.bn3.bias' is missing .*; 164 more keys are missing"),
    ("official", "resnet18", "official_resnet18_float", lambda s: None,
     "key 'classifier.0.input_fraclen' is missing"),
    ("official", "mobilenet_v2", "official_mobilenet_v2_fixed",
     lambda s: s.pop("stage_3_layer_1.body.0.alpha"),
     "key 'stage_3_layer_1.body.0.alpha' is missing"),
    ("official", "mobilenet_v1", "official_mobilenet_v1_fixed",
     lambda s: s.update({"stage_0_layer_0.body.1.input_fraclen": np.zeros(2, np.float32)}),
     "key 'stage_0_layer_0.body.1.input_fraclen' has shape \\(2,\\)"),
    ("torchvision", "mobilenet_v1", "official_mobilenet_v1_fixed", lambda s: None,
     "key 'classifier.0.input_fraclen' marks a fixed-point state dict, but the config is float"),
    ("official", "resnet34", "official_resnet18_fixed", lambda s: None,
     "--model 'resnet34' cannot come from official"),
])
def test_mismatched_state_dicts_fail_naming_the_key_and_write_nothing(
        tmp_path, source, model, keys, edit, match):
    out = run_convert(tmp_path, edited(keys, edit), f"--from={source}", f"--model={model}")
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert __import__("re").search(match, out.stderr), out.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_wrong_class_count_and_an_occupied_output_are_refused(tmp_path):
    state = random_state("torchvision_resnet18")
    out = run_convert(tmp_path, state, "--from=torchvision", "--model=resnet18",
                      "--num_classes=10")
    assert out.returncode != 0 and "key 'fc.weight' has 1000 classes; --num_classes says 10" \
        in out.stderr
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    out = run_convert(tmp_path, state, "--from=torchvision", "--model=resnet18")
    assert out.returncode != 0 and "exists and is not an empty folder" in out.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["keep.txt"]


def test_a_pth_without_torch_says_how_to_read_it(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"not a real checkpoint")
    out = subprocess.run([sys.executable, "-c",
                          "import sys; sys.modules['torch'] = None\n"
                          "from f8net_jax import convert\n"
                          f"convert.main(['--from=torchvision', '--model=resnet18', "
                          f"'--input={path}', '--output={tmp_path / 'out'}'])"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "needs torch" in out.stderr and ".npz" in out.stderr


def test_official_resnet50_keeps_used_alphas_drops_the_rest_and_warns_about_its_shortcut():
    state = random_state("official_resnet50_fixed")
    config = convert.default_config("official", "resnet50")
    config.quant.clipping = True  # an official ResNet-50 trained with PACT
    config.quant.format_rule = "std"
    _, values, _, warnings = convert.convert("official", "resnet50", state, config)
    alphas = {path for col, path in values if path.endswith("alpha")}
    # 54 official alphas: 15 never read by the official code, one read there but shared
    # here (the first projection shortcut), 38 carried over; with normalized input the
    # stem reads a signed input and clips too (head.0.alpha), 39.
    assert len(alphas) == 39 and "stem/input/alpha" in alphas
    assert len(warnings) == 1 and "stage_0_layer_0.shortcut.0.alpha" in warnings[0]
    state["stage_0_layer_0.shortcut.0.alpha"] = state["stage_0_layer_0.body.0.alpha"]
    assert convert.convert("official", "resnet50", state, config)[3] == []
    # The official recipe (no clipping, grid formats, normalized input): no alpha at all,
    # every running input format including the stem's.
    _, values, _, warnings = convert.convert("official", "resnet50", state,
                                             convert.default_config("official", "resnet50"))
    assert not any(path.endswith("alpha") for _, path in values) and warnings == []
    assert sum(path.endswith("fraclen") for _, path in values) == 54


def test_a_pth_checkpoint_reads_with_torch_like_its_npz(tmp_path):
    torch = pytest.importorskip("torch")
    state = random_state("official_resnet18_fixed")
    # As the official code saves it: {'model': DataParallel state dict}.
    torch.save({"model": {f"module.{k}": torch.from_numpy(v) for k, v in state.items()},
                "last_epoch": 3}, tmp_path / "checkpoint.pt")
    read = convert.read_state_dict(str(tmp_path / "checkpoint.pt"))
    assert read.keys() == state.keys()
    assert all(np.array_equal(read[k], state[k]) for k in state)


@pytest.mark.parametrize("model", ["resnet18", "resnet50", "mobilenet_v1", "mobilenet_v2"])
@pytest.mark.parametrize("mode", ["fixed", "float"])
def test_every_official_state_dict_converts_into_every_variable(model, mode):
    state = random_state(f"official_{model}_{mode}")
    if mode == "fixed":
        config = convert.default_config("official", model)
    else:  # its 'floating' configs: PACT clipping, pixels in
        from f8net_jax.run_config import load_config_file
        config = load_config_file(str(ROOT / "configs" / f"imagenet_{model}_fp.py"))
    model_, values, _, _ = convert.convert("official", model, state, config)
    _, shapes, _ = convert.our_shapes(config, 1000)
    assert values.keys() == shapes.keys()
    # Every kernel is the official conv weight, moved to HWIO.
    assert np.array_equal(values[("params", "stem/kernel")],
                          np.transpose(state["head.0.conv.weight"], (2, 3, 1, 0)))
    used = {k for k in state if not k.endswith("num_batches_tracked")}
    alphas = sum(k.endswith(".alpha") for k in used)
    assert len(values) <= len(used) and alphas >= sum(p.endswith("alpha") for _, p in values)
