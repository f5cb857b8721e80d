"""Models written in plain Flax, as a user brings them (f8net_jax.quantize quantizes them;
the launcher takes them as --config.model=plain_models:FACTORY with tests/ on the path)."""

import functools

import flax.linen as nn
import jax.numpy as jnp

from f8net_jax.models.mobilenet import make_divisible  # channel rounding, as torchvision


class PlainBlock(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                               epsilon=1e-5)
        conv = functools.partial(nn.Conv, use_bias=False)
        y = conv(self.features, (3, 3), self.strides, padding=1, name="conv1")(x)
        y = nn.relu(bn(name="bn1")(y))
        y = bn(name="bn2")(conv(self.features, (3, 3), padding=1, name="conv2")(y))
        if self.strides != 1 or x.shape[-1] != self.features:
            x = conv(self.features, (1, 1), self.strides, padding=0, name="shortcut")(x)
            x = bn(name="shortcut_bn")(x)
        return nn.relu(y + x)


class PlainResNet20(nn.Module):
    """CIFAR ResNet-20 as a Flax user writes it: no F8Net in sight."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(16, (3, 3), padding=1, use_bias=False, name="stem")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                 name="stem_bn")(x))
        for i, width in enumerate((16, 32, 64)):
            for j in range(3):
                x = PlainBlock(width, 2 if i > 0 and j == 0 else 1,
                               name=f"stage{i + 1}_block{j + 1}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


class TinyPlainNet(nn.Module):
    """A stem, one residual block with a projection, a max pool, the mean, a classifier."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        x = nn.Conv(8, (3, 3), padding=1, use_bias=False, name="stem")(x)
        x = nn.relu(bn(name="stem_bn")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        x = PlainBlock(16, 2, name="block")(x, train)
        return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


def tiny(num_classes: int = 10):
    return TinyPlainNet(num_classes=num_classes)


MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


class NormalizingNet(nn.Module):
    """Takes uint8 pixels and normalizes them itself, then TinyPlainNet's layers."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        three = x.shape[-1] == 3
        mean, std = (jnp.asarray(MEAN), jnp.asarray(STD)) if three else (0.47, 0.25)
        x = (x.astype(jnp.float32) / 255.0 - mean) / std
        return TinyPlainNet(self.num_classes, name="body")(x, train)


def normalizing(num_classes: int = 10):
    return NormalizingNet(num_classes=num_classes)


class PlainInvertedResidual(nn.Module):
    """Expand 1x1 (if expand_ratio > 1), depthwise 3x3, linear 1x1 projection, the input
    added when the shape is unchanged; ReLU where torchvision has ReLU6."""

    in_features: int
    features: int
    strides: int
    expand_ratio: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                               epsilon=1e-5)
        hidden = int(round(self.in_features * self.expand_ratio))
        y, i = x, 0
        if self.expand_ratio != 1:
            y = nn.Conv(hidden, (1, 1), use_bias=False, name=f"conv{i}")(y)
            y = nn.relu(bn(name=f"bn{i}")(y))
            i += 1
        y = nn.Conv(hidden, (3, 3), self.strides, padding=1, feature_group_count=hidden,
                    use_bias=False, name=f"conv{i}")(y)
        y = nn.relu(bn(name=f"bn{i}")(y))
        y = nn.Conv(self.features, (1, 1), use_bias=False, name=f"conv{i + 1}")(y)
        y = bn(name=f"bn{i + 1}")(y)
        if self.strides == 1 and self.in_features == self.features:
            y = y + x
        return y


class PlainMobileNetV2(nn.Module):
    """MobileNet V2 as a Flax user writes it (torchvision's layout, ReLU for ReLU6)."""

    num_classes: int = 10
    width: float = 1.0
    SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
               (6, 160, 3, 2), (6, 320, 1, 1))

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                               epsilon=1e-5)
        channels = make_divisible(32 * self.width)
        x = nn.Conv(channels, (3, 3), 2, padding=1, use_bias=False, name="stem")(x)
        x = nn.relu(bn(name="stem_bn")(x))
        index = 0
        for t, c, n, s in self.SETTING:
            for j in range(n):
                index += 1
                out = make_divisible(c * self.width)
                x = PlainInvertedResidual(channels, out, s if j == 0 else 1, t,
                                          name=f"block{index}")(x, train)
                channels = out
        last = make_divisible(1280 * max(1.0, self.width))
        x = nn.Conv(last, (1, 1), use_bias=False, name="tail")(x)
        x = nn.relu(bn(name="tail_bn")(x))
        return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))
