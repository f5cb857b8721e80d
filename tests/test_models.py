"""The paper's models in float and fixed point: shapes, state, gradients, alpha sharing."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from f8net_jax import models
from f8net_jax.layers import QuantConfig, count_params

FLOAT = QuantConfig(mode="float", clipping=False)
FLOAT_PACT = QuantConfig(mode="float")
FIXED = QuantConfig(mode="fixed")
MUTABLE = ["batch_stats", "quant_stats"]


def images(n, size, channels=3, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, size, size, channels),
                                                            dtype=np.uint8))


def paths(tree):
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
    return {"/".join(k): v for k, v in flat.items()}


@pytest.mark.parametrize("name, size, classes", [
    ("resnet18", 32, 1000), ("resnet34", 64, 10), ("resnet50", 32, 1000),
    ("mobilenet_v1", 32, 1000), ("mobilenet_v2", 32, 1000),
    ("resnet20", 28, 10), ("resnet56", 32, 10)])
@pytest.mark.parametrize("quant", [FLOAT, FLOAT_PACT, FIXED], ids=["float", "pact", "fixed"])
def test_output_shapes_for_every_model_and_mode(name, size, classes, quant):
    model = models.create(name, num_classes=classes, quant=quant)
    x = images(2, size, channels=1 if name == "resnet20" else 3)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    for train in (False, True):
        out = jax.eval_shape(lambda v: model.apply(v, x, train=train, mutable=MUTABLE), variables)
        assert out[0].shape == (2, classes) and out[0].dtype == jnp.float32
    assert ("quant_stats" in variables) == quant.fixed


@pytest.mark.parametrize("name, target", [
    ("resnet18", 11_689_512), ("resnet50", 25_557_032), ("mobilenet_v2", 3_504_872),
    ("mobilenet_v1", 4_231_976)])
def test_float_imagenet_models_have_torchvision_parameter_counts(name, target):
    model = models.create(name, num_classes=1000, quant=FLOAT)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images(1, 224)))
    assert count_params(variables["params"]) == target


def test_float_checkpoint_has_the_fixed_point_parameter_tree():
    """A float (PACT) checkpoint initializes the fixed model as is; a plain float one lacks
    only the alpha scalars."""
    shapes = {}
    for key, quant in (("float", FLOAT), ("pact", FLOAT_PACT), ("fixed", FIXED)):
        model = models.create("resnet18", num_classes=10, quant=quant)
        v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images(1, 32)))
        shapes[key] = {k: x.shape for k, x in paths(v["params"]).items()}
        shapes[key + "_bs"] = {k: x.shape for k, x in paths(v["batch_stats"]).items()}
    assert shapes["pact"] == shapes["fixed"]
    assert shapes["float_bs"] == shapes["pact_bs"] == shapes["fixed_bs"]
    extra = set(shapes["fixed"]) - set(shapes["float"])
    assert extra and all(k.endswith("input/alpha") for k in extra)
    assert all(shapes["fixed"][k] == () for k in extra)
    assert set(shapes["float"]) <= set(shapes["fixed"])


def alphas(params):
    return sorted(k for k in paths(params) if k.endswith("alpha"))


def test_resnet_layers_reading_one_stream_share_one_alpha():
    model = models.create("resnet18", num_classes=10, quant=FIXED)
    v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images(1, 32)))
    names = alphas(v["params"])
    # Chains: stage1 (read by every block of stage 1 and stage 2's projection block), then
    # one per later stage (started by block 2); every second conv owns one; the classifier.
    chain_owners = ["stage1_block1/body_0", "stage2_block2/body_0", "stage3_block2/body_0",
                    "stage4_block2/body_0"]
    expected = sorted([f"{o}/input/alpha" for o in chain_owners]
                      + [f"stage{s}_block{b}/body_1/input/alpha" for s in range(1, 5) for b in (1, 2)]
                      + ["classifier/input/alpha"])
    assert names == expected
    # Sharing is real: the readers without an alpha use the chain's. Moving a chain's alpha
    # changes the layers that read that chain in eval.
    shared = models.create("resnet18", num_classes=10,
                           quant=QuantConfig(mode="fixed", share_classifier_alpha=True))
    v2 = jax.eval_shape(lambda: shared.init(jax.random.PRNGKey(0), images(1, 32)))
    assert "classifier/input/alpha" not in alphas(v2["params"])


def test_mobilenet_v2_alpha_chains_follow_identity_blocks():
    model = models.create("mobilenet_v2", num_classes=10, quant=FIXED, width_multiplier=0.5)
    v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images(1, 32)))
    owners = {k.split("/")[0] for k in alphas(v["params"]) if k.endswith("layers_0/input/alpha")}
    # A block starts a chain when the block before it changes the shape (1, 2, 4, 7, 11,
    # 14, 17 do); after an identity block it reads the same chain.
    assert owners == {"block1", "block2", "block3", "block5", "block8", "block12", "block15"}
    assert "tail/input/alpha" in alphas(v["params"])


@pytest.fixture(scope="module")
def resnet20_fixed():
    model = models.create("resnet20", num_classes=10, quant=FIXED)
    x = images(8, 16, channels=1)
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(x)
    return model, variables, x


def test_state_changes_only_in_training_and_eval_is_deterministic(resnet20_fixed):
    model, variables, x = resnet20_fixed
    apply = jax.jit(lambda v, train: model.apply(v, x, train=train, mutable=MUTABLE),
                    static_argnums=1)
    _, after_train = apply(variables, True)
    _, after_eval = apply(variables, False)
    for col in MUTABLE:
        before = paths(variables[col])
        trained, evaluated = paths(after_train[col]), paths(after_eval[col])
        assert all(np.array_equal(before[k], evaluated[k]) for k in before)
        changed = [not np.array_equal(before[k], trained[k]) for k in before]
        # Every BatchNorm moves; a running format stays put where fl_batch equals it.
        assert all(changed) if col == "batch_stats" else sum(changed) > len(changed) // 2, col
    y1, y2 = apply(variables, False)[0], apply(variables, False)[0]
    np.testing.assert_array_equal(y1, y2)


def loss_fn(model, params, state, x, labels):
    logits, updates = model.apply({"params": params, **state}, x, train=True, mutable=MUTABLE)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates


def test_gradients_reach_every_kernel_batchnorm_and_alpha(resnet20_fixed):
    model, variables, x = resnet20_fixed
    state = {k: v for k, v in variables.items() if k != "params"}
    labels = jnp.arange(8) % 10
    grads, _ = jax.jit(jax.grad(lambda p: loss_fn(model, p, state, x, labels), has_aux=True))(
        variables["params"])
    flat = paths(grads)
    assert any(k.endswith("alpha") for k in flat)
    dead = [k for k, g in flat.items() if not np.any(np.asarray(g) != 0)]
    assert not dead, f"no gradient reaches {dead}"


@pytest.mark.slow
def test_mobilenet_v2_gradients_reach_every_alpha():
    model = models.create("mobilenet_v2", num_classes=10, quant=FIXED, width_multiplier=0.35)
    x = images(4, 32)
    v = jax.jit(lambda x: model.init(jax.random.PRNGKey(1), x, train=False))(x)
    state = {k: val for k, val in v.items() if k != "params"}
    grads, _ = jax.jit(jax.grad(lambda p: loss_fn(model, p, state, x, jnp.arange(4)),
                                has_aux=True))(v["params"])
    flat = paths(grads)
    dead = [k for k, g in flat.items() if k.endswith("alpha") and not np.any(np.asarray(g) != 0)]
    assert not dead, f"no gradient reaches {dead}"


TINY_FINETUNE = QuantConfig(mode="fixed", format_rule="grid", clipping=False)


@pytest.mark.parametrize("quant", [FLOAT_PACT, FIXED,
                                   pytest.param(TINY_FINETUNE, marks=pytest.mark.slow)],
                         ids=["float", "fixed", "grid-noclip"])
def test_a_few_sgd_steps_on_a_fixed_batch_lower_the_loss(quant):
    model = models.create("resnet20", num_classes=10, quant=quant)
    x = images(16, 16, channels=1, seed=3)
    labels = jnp.arange(16) % 10
    v = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(x)
    params, state = v["params"], {k: val for k, val in v.items() if k != "params"}
    tx = optax.sgd(0.05, momentum=0.9)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, state, opt_state):
        (loss, updates), grads = jax.value_and_grad(
            lambda p: loss_fn(model, p, state, x, labels), has_aux=True)(params)
        upd, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, upd), updates, opt_state, loss

    losses = []
    for _ in range(8):
        params, state, opt_state, loss = step(params, state, opt_state)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="resnet101"), r"model must be one of \['resnet18', 'resnet34', 'resnet50', "
                             r"'resnet20', 'resnet56', 'mobilenet_v1', 'mobilenet_v2'\]"),
    (dict(name="resnet18", width_multiplier=0.5), "width_multiplier applies to the MobileNets"),
    (dict(name="resnet18", num_classes=0), "num_classes must be a positive int"),
    (dict(name="resnet18", quant={"mode": "fixed"}), "quant must be a QuantConfig"),
])
def test_create_rejects_bad_options(kwargs, match):
    kwargs = {"num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        models.create(kwargs.pop("name"), **kwargs)


@pytest.mark.parametrize("name, shape, match", [
    ("resnet18", (1, 100, 100, 3), r"image size 100x100 is not allowed: .* multiples of 32"),
    ("mobilenet_v2", (1, 32, 48, 3), r"image size 32x48 is not allowed: .* multiples of 32"),
    ("resnet20", (1, 30, 30, 1), r"image size 30x30 is not allowed: .* multiples of 4"),
    ("resnet20", (1, 32, 32), "images must be NHWC"),
])
def test_models_reject_image_sizes_they_cannot_take(name, shape, match):
    model = models.create(name, num_classes=10, quant=FIXED)
    with pytest.raises(ValueError, match=match):
        model.init(jax.random.PRNGKey(0), jnp.zeros(shape, jnp.uint8))


def test_layer_formats_compiles_once_per_model_and_shape():
    from f8net_jax import analysis
    model = models.create("resnet20", num_classes=10, quant=FIXED)
    x = images(2, 16, channels=1)
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), x, train=False))()
    first = analysis.layer_formats(model, variables, (16, 16, 1))
    moved = jax.tree_util.tree_map(lambda v: v * 1.5, variables)  # other values, same shapes
    second = analysis.layer_formats(model, moved, (16, 16, 1))
    assert set(first) == set(second) and "stem" in first
    fn = analysis._sown_fn(model, (16, 16, 1), ("formats",))
    assert fn._cache_size() == 1  # one compilation served both calls


def test_mobilenet_v1_pointwise_layers_read_the_depthwise_output_before_relu():
    """METHOD.md 5: no ReLU between depthwise and pointwise; the pointwise layer's unsigned
    quantizer rectifies, and its batch statistic sees the negative values."""
    import flax.linen as nn
    model = models.create("mobilenet_v1", num_classes=10, quant=FIXED, width_multiplier=0.25)
    x = images(2, 32)
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), x, train=False))()

    def minima(variables):
        seen = {}

        def record(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and context.module.name in (
                    "layer2_depthwise", "layer2_pointwise"):
                seen[context.module.name] = jnp.min(args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            model.apply(variables, x, train=True, mutable=MUTABLE)
        return seen

    seen = jax.jit(minima)(variables)
    assert seen["layer2_pointwise"] < 0      # the depthwise output, not rectified
    assert seen["layer2_depthwise"] >= 0     # after the previous pointwise layer's ReLU
