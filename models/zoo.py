"""Small, architecturally faithful PyTorch reference models for the pruner.

Widths and resolutions are cut down so export and inference take well under a
second, but every model keeps the real topology (branches, concats, splits,
shuffles, squeeze-excitation, attention) because that is what the pruner's
channel dependency analysis has to get right.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .feeds import InputSpec, image, make_feeds, mask, tokens

# ---------------------------------------------------------------- initialisation


def _init_conv_or_linear(module: nn.Module) -> None:
    # He-normal for convs (ReLU-like nets), LeCun-normal for linears, so
    # activations keep a sane scale without BN statistics that match the data.
    fan_in = module.weight[0].numel()
    gain = math.sqrt(2.0) if isinstance(module, nn.Conv2d) else 1.0
    nn.init.normal_(module.weight, 0.0, gain / math.sqrt(fan_in))
    if module.bias is not None:
        nn.init.normal_(module.bias, 0.0, 0.05)


def _init_norm(module: nn.Module) -> None:
    # Random affine and running statistics so BN / LN are never the identity.
    nn.init.uniform_(module.weight, 0.5, 1.5)
    nn.init.normal_(module.bias, 0.0, 0.1)
    if isinstance(module, nn.BatchNorm2d):
        module.running_mean.normal_(0.0, 0.1)
        module.running_var.uniform_(0.5, 1.5)


def _init_fused_attention(module: nn.MultiheadAttention) -> None:
    nn.init.normal_(module.in_proj_weight, 0.0, 1.0 / math.sqrt(module.embed_dim))
    nn.init.normal_(module.in_proj_bias, 0.0, 0.05)


def _is_layer_scale(name: str) -> bool:
    return name.endswith("gamma") or "layer_scale" in name


def init_weights(model: nn.Module) -> nn.Module:
    """Re-initialise conv, linear, norm, fused-attention and layer-scale parameters
    (uses the global torch RNG)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            _init_conv_or_linear(module)
        elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)) and module.weight is not None:
            _init_norm(module)
        elif isinstance(module, nn.MultiheadAttention):
            _init_fused_attention(module)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if _is_layer_scale(name):
                # Real layer scales start at 1e-6, which would hide the residual
                # branch from any pruning check.
                param.uniform_(0.1, 1.0)
            elif ".grn." in name:
                # ConvNeXt V2's global response norm starts as the identity (zeros), which
                # would hide its mean over channels from any pruning check.
                param.normal_(0.0, 0.5)
    return model


# ---------------------------------------------------------------- shared blocks


def divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of `divisor` (at least `divisor`)."""
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


class ConvBNAct(nn.Sequential):
    def __init__(self, cin, cout, kernel=3, stride=1, groups=1, act=nn.ReLU):
        layers = [
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """Global pool -> reduce -> act -> expand -> gate -> channel-wise Mul."""

    def __init__(self, channels, squeeze, act=nn.ReLU, gate=nn.Sigmoid):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.act = act()
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.gate = gate()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.expand(self.act(self.reduce(s))))


class ClassifierHead(nn.Sequential):
    """Global average pool -> flatten -> (dropout, a no-op in eval) -> linear."""

    def __init__(self, channels, classes=10, dropout=0.0):
        layers = [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)] + ([nn.Dropout(dropout)] if dropout else [])
        super().__init__(*layers, nn.Linear(channels, classes))


# ---------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = ConvBNAct(cin, width, 3, stride)
        self.conv2 = ConvBNAct(width, cout, 3, act=None)
        self.shortcut = _projection(cin, cout, stride)

    def forward(self, x):
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = ConvBNAct(cin, width, 1)
        self.conv2 = ConvBNAct(width, width, 3, stride)  # stride on the 3x3 (ResNet v1.5)
        self.conv3 = ConvBNAct(width, cout, 1, act=None)
        self.shortcut = _projection(cin, cout, stride)

    def forward(self, x):
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


def _projection(cin, cout, stride):
    if stride == 1 and cin == cout:
        return nn.Identity()
    return ConvBNAct(cin, cout, 1, stride, act=None)


class ResNet(nn.Module):
    def __init__(self, block, widths, depths, stem=16, classes=10):
        super().__init__()
        self.stem = nn.Sequential(ConvBNAct(3, stem, 7, 2), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], stem
        for stage, (width, depth) in enumerate(zip(widths, depths)):
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(block(cin, width, stride))
                cin = width * block.expansion
        self.layers = nn.Sequential(*layers)
        self.head = ClassifierHead(cin, classes)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)))


def resnet_basic():
    return ResNet(BasicBlock, (16, 32, 64, 128), (2, 2, 2, 2))


def resnet_bottleneck():
    return ResNet(Bottleneck, (8, 16, 32, 64), (2, 2, 2, 1))


# ---------------------------------------------------------------- MobileNet v2 / v3


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1 -> depthwise 3x3 -> linear project 1x1."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [ConvBNAct(cin, hidden, 1, act=nn.ReLU6)]
        layers += [
            ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            ConvBNAct(hidden, cout, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    # (expansion, channels, repeats, stride), scaled down from the paper's table
    SETTINGS = ((1, 8, 1, 1), (6, 16, 2, 2), (6, 24, 2, 2), (6, 32, 2, 2), (6, 48, 1, 1))

    def __init__(self, classes=10):
        super().__init__()
        layers, cin = [ConvBNAct(3, 16, 3, 2, act=nn.ReLU6)], 16
        for expand, cout, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        layers.append(ConvBNAct(cin, 128, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.head = ClassifierHead(128, classes, dropout=0.2)

    def forward(self, x):
        return self.head(self.features(x))


class MobileNetV3Block(nn.Module):
    def __init__(self, cin, kernel, hidden, cout, use_se, act, stride):
        super().__init__()
        layers = [] if hidden == cin else [ConvBNAct(cin, hidden, 1, act=act)]
        layers.append(ConvBNAct(hidden, hidden, kernel, stride, groups=hidden, act=act))
        if use_se:
            layers.append(SqueezeExcite(hidden, divisible(hidden / 4), nn.ReLU, nn.Hardsigmoid))
        layers.append(ConvBNAct(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV3(nn.Module):
    RE, HS = nn.ReLU, nn.Hardswish
    # (kernel, hidden, out, squeeze-excite, activation, stride), MobileNetV3-Small-like
    SETTINGS = (
        (3, 16, 16, True, RE, 2),
        (3, 64, 24, False, RE, 2),
        (3, 88, 24, False, RE, 1),
        (5, 96, 40, True, HS, 2),
        (5, 120, 40, True, HS, 1),
        (5, 120, 48, True, HS, 1),
    )

    def __init__(self, classes=10):
        super().__init__()
        layers, cin = [ConvBNAct(3, 16, 3, 2, act=nn.Hardswish)], 16
        for kernel, hidden, cout, use_se, act, stride in self.SETTINGS:
            layers.append(MobileNetV3Block(cin, kernel, hidden, cout, use_se, act, stride))
            cin = cout
        layers.append(ConvBNAct(cin, 128, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
            nn.Linear(128, 256), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(256, classes),
        )

    def forward(self, x):
        return self.head(self.features(x))


def mobilenetv2():
    return MobileNetV2()


def mobilenetv3():
    return MobileNetV3()


# ---------------------------------------------------------------- EfficientNet


class MBConv(nn.Module):
    """EfficientNet block; the SE squeeze width follows the block *input* width."""

    def __init__(self, cin, cout, kernel, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [ConvBNAct(cin, hidden, 1, act=nn.SiLU)]
        layers += [
            ConvBNAct(hidden, hidden, kernel, stride, groups=hidden, act=nn.SiLU),
            SqueezeExcite(hidden, divisible(cin / 4), nn.SiLU, nn.Sigmoid),
            ConvBNAct(hidden, cout, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout  # stochastic depth is off in eval

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


class EfficientNet(nn.Module):
    # (expansion, kernel, stride, channels, repeats), B0-like table scaled down
    SETTINGS = ((1, 3, 1, 8, 1), (6, 3, 2, 16, 2), (6, 5, 2, 24, 2), (6, 3, 2, 40, 2), (6, 5, 1, 48, 1))

    def __init__(self, classes=10):
        super().__init__()
        layers, cin = [ConvBNAct(3, 16, 3, 2, act=nn.SiLU)], 16
        for expand, kernel, stride, cout, repeats in self.SETTINGS:
            for i in range(repeats):
                layers.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        layers.append(ConvBNAct(cin, 128, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.head = ClassifierHead(128, classes, dropout=0.2)

    def forward(self, x):
        return self.head(self.features(x))


def efficientnet():
    return EfficientNet()


# ---------------------------------------------------------------- DenseNet


class DenseLayer(nn.Module):
    """Pre-activation BN-ReLU-Conv1x1 -> BN-ReLU-Conv3x3 on the concat of all earlier maps."""

    def __init__(self, cin, growth, bottleneck=4):
        super().__init__()
        hidden = bottleneck * growth
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, hidden, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(hidden), nn.Conv2d(hidden, growth, 3, padding=1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        x = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(x)))


class DenseBlock(nn.Module):
    def __init__(self, cin, layers, growth):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth) for i in range(layers))

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, cin, cout):
        conv = nn.Conv2d(cin, cout, 1, bias=False)
        super().__init__(nn.BatchNorm2d(cin), nn.ReLU(), conv, nn.AvgPool2d(2, 2))


class DenseNet(nn.Module):
    def __init__(self, stem=16, growth=8, blocks=(2, 4, 4), classes=10):
        super().__init__()
        layers, channels = [ConvBNAct(3, stem, 7, 2), nn.MaxPool2d(3, 2, 1)], stem
        for i, depth in enumerate(blocks):
            layers.append(DenseBlock(channels, depth, growth))
            channels += depth * growth
            if i < len(blocks) - 1:
                layers.append(Transition(channels, channels // 2))
                channels //= 2
        layers += [nn.BatchNorm2d(channels), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = ClassifierHead(channels, classes)

    def forward(self, x):
        return self.head(self.features(x))


def densenet():
    return DenseNet()


# ---------------------------------------------------------------- Inception (GoogLeNet)


class InceptionBlock(nn.Module):
    def __init__(self, cin, c1, c3_reduce, c3, c5_reduce, c5, pool_proj):
        super().__init__()
        self.branch1 = ConvBNAct(cin, c1, 1)
        self.branch3 = nn.Sequential(ConvBNAct(cin, c3_reduce, 1), ConvBNAct(c3_reduce, c3, 3))
        self.branch5 = nn.Sequential(ConvBNAct(cin, c5_reduce, 1), ConvBNAct(c5_reduce, c5, 5))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), ConvBNAct(cin, pool_proj, 1))
        self.out_channels = c1 + c3 + c5 + pool_proj

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], 1)


class Inception(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(
            ConvBNAct(3, 16, 7, 2), nn.MaxPool2d(3, 2, ceil_mode=True),
            ConvBNAct(16, 16, 1), ConvBNAct(16, 48, 3), nn.MaxPool2d(3, 2, ceil_mode=True),
        )
        a3 = InceptionBlock(48, 16, 16, 24, 8, 8, 8)
        b3 = InceptionBlock(a3.out_channels, 24, 24, 32, 8, 16, 16)
        a4 = InceptionBlock(b3.out_channels, 32, 16, 40, 8, 16, 16)
        b4 = InceptionBlock(a4.out_channels, 32, 24, 48, 8, 16, 16)
        self.blocks = nn.Sequential(a3, b3, nn.MaxPool2d(3, 2, ceil_mode=True), a4, b4)
        self.head = ClassifierHead(b4.out_channels, classes, dropout=0.4)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def inception():
    return Inception()


# ---------------------------------------------------------------- ShuffleNet v2


def channel_shuffle(x, groups=2):
    b, c, h, w = x.shape
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, c, h, w)


class ShuffleUnit(nn.Module):
    """Stride 1: split channels, transform one half. Stride 2: two downsampling branches."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        half = cout // 2
        self.stride = stride
        if stride == 2:
            self.branch1 = nn.Sequential(
                ConvBNAct(cin, cin, 3, 2, groups=cin, act=None), ConvBNAct(cin, half, 1),
            )
        branch_in = cin if stride == 2 else half
        self.branch2 = nn.Sequential(
            ConvBNAct(branch_in, half, 1),
            ConvBNAct(half, half, 3, stride, groups=half, act=None),
            ConvBNAct(half, half, 1),
        )

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out)


class ShuffleNetV2(nn.Module):
    def __init__(self, widths=(32, 64, 128), repeats=(2, 2, 2), final=128, classes=10):
        super().__init__()
        layers, cin = [ConvBNAct(3, 24, 3, 2), nn.MaxPool2d(3, 2, 1)], 24
        for width, repeat in zip(widths, repeats):
            layers += [ShuffleUnit(cin, width, 2)] + [ShuffleUnit(width, width, 1) for _ in range(repeat - 1)]
            cin = width
        layers.append(ConvBNAct(cin, final, 1))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(final, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean([2, 3]))  # global pool as ReduceMean


def shufflenetv2():
    return ShuffleNetV2()


# ---------------------------------------------------------------- RegNetY


class RegNetYBlock(nn.Module):
    def __init__(self, cin, cout, stride, group_width=8, se_ratio=0.25):
        super().__init__()
        self.a = ConvBNAct(cin, cout, 1)
        self.b = ConvBNAct(cout, cout, 3, stride, groups=cout // group_width)
        self.se = SqueezeExcite(cout, divisible(cin * se_ratio))
        self.c = ConvBNAct(cout, cout, 1, act=None)
        self.shortcut = _projection(cin, cout, stride)

    def forward(self, x):
        return F.relu(self.c(self.se(self.b(self.a(x)))) + self.shortcut(x))


class RegNetY(nn.Module):
    def __init__(self, widths=(16, 32, 64, 128), depths=(1, 2, 2, 1), classes=10):
        super().__init__()
        layers, cin = [ConvBNAct(3, 16, 3, 2)], 16
        for width, depth in zip(widths, depths):
            layers.append(RegNetYBlock(cin, width, 2))
            layers += [RegNetYBlock(width, width, 1) for _ in range(depth - 1)]
            cin = width
        self.features = nn.Sequential(*layers)
        self.head = ClassifierHead(cin, classes)

    def forward(self, x):
        return self.head(self.features(x))


def regnety():
    return RegNetY()


# ---------------------------------------------------------------- ConvNeXt


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over channels of an NCHW tensor via permute -> LN -> permute."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))  # layer scale

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), classes=10):
        super().__init__()
        layers = [nn.Conv2d(3, dims[0], 4, 4), ChannelsFirstLayerNorm(dims[0], eps=1e-6)]
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            if i > 0:
                layers += [ChannelsFirstLayerNorm(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dim, 2, 2)]
            layers += [ConvNeXtBlock(dim) for _ in range(depth)]
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.fc = nn.Linear(dims[-1], classes)

    def forward(self, x):
        return self.fc(self.norm(self.features(x).mean([-2, -1])))


def convnext():
    return ConvNeXt()


# ---------------------------------------------------------------- U-Net and FPN


class DoubleConv(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(ConvBNAct(cin, cout), ConvBNAct(cout, cout))


class UNet(nn.Module):
    """Both Resize flavours: nn.Upsample (scales) and F.interpolate to a skip's size (sizes)."""

    def __init__(self, widths=(16, 32, 64, 128), classes=3):
        super().__init__()
        self.downs = nn.ModuleList(
            DoubleConv(cin, cout) for cin, cout in zip((3,) + widths[:-1], widths)
        )
        self.ups = nn.ModuleList(
            DoubleConv(cin + cout, cout) for cin, cout in zip(widths[:0:-1], widths[-2::-1])
        )
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.out = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x):
        skips = []
        for i, down in enumerate(self.downs):
            x = down(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for i, up in enumerate(self.ups):
            skip = skips.pop()
            x = self.upsample(x) if i % 2 == 0 else F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = up(torch.cat([skip, x], 1))
        return self.out(x)


class FPN(nn.Module):
    """ResNet-ish backbone, lateral 1x1 convs, top-down Resize + Add, 3x3 output convs,
    and a RetinaNet-style head whose weights are shared across pyramid levels."""

    def __init__(self, widths=(16, 32, 64, 128), channels=32, head_out=8):
        super().__init__()
        self.stem = ConvBNAct(3, widths[0], 3, 2)
        self.stages = nn.ModuleList(
            nn.Sequential(ConvBNAct(cin, cout, 3, 2), BasicBlock(cout, cout, 1))
            for cin, cout in zip(widths[:1] + widths[:-1], widths)
        )
        self.lateral = nn.ModuleList(nn.Conv2d(w, channels, 1) for w in widths)
        self.smooth = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in widths)
        self.head = nn.Sequential(ConvBNAct(channels, channels), nn.Conv2d(channels, head_out, 1))

    def forward(self, x):
        features, x = [], self.stem(x)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        top = self.lateral[-1](features[-1])
        pyramid = [top]
        for lateral, feature in zip(self.lateral[-2::-1], features[-2::-1]):
            top = lateral(feature) + F.interpolate(top, scale_factor=2.0, mode="nearest")
            pyramid.insert(0, top)
        return tuple(self.head(smooth(p)) for smooth, p in zip(self.smooth, pyramid))


def unet():
    return UNet()


def fpn():
    return FPN()


# ---------------------------------------------------------------- YOLOv8-style


class YoloConv(ConvBNAct):
    def __init__(self, cin, cout, kernel=1, stride=1):
        super().__init__(cin, cout, kernel, stride, act=nn.SiLU)


class YoloBottleneck(nn.Module):
    def __init__(self, channels, shortcut):
        super().__init__()
        self.cv1, self.cv2 = YoloConv(channels, channels, 3), YoloConv(channels, channels, 3)
        self.add = shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """Split into halves, chain bottlenecks on the second, concat every intermediate."""

    def __init__(self, cin, cout, n=1, shortcut=True):
        super().__init__()
        self.c = cout // 2
        self.cv1 = YoloConv(cin, 2 * self.c)
        self.cv2 = YoloConv((2 + n) * self.c, cout)
        self.m = nn.ModuleList(YoloBottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, cin, cout, k=5):
        super().__init__()
        hidden = cin // 2
        self.cv1, self.cv2 = YoloConv(cin, hidden), YoloConv(hidden * 4, cout)
        self.pool = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.pool(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class DetectHead(nn.Module):
    """Per level: separate box and class branches, concatenated, flattened over anchors."""

    def __init__(self, channels, classes=8, reg=16):
        super().__init__()
        box, cls = max(16, channels[0] // 4), max(classes, channels[0])
        self.box = nn.ModuleList(self._branch(c, box, reg) for c in channels)
        self.cls = nn.ModuleList(self._branch(c, cls, classes) for c in channels)
        self.outputs = reg + classes

    @staticmethod
    def _branch(cin, hidden, cout):
        return nn.Sequential(YoloConv(cin, hidden, 3), YoloConv(hidden, hidden, 3), nn.Conv2d(hidden, cout, 1))

    def forward(self, features):
        b = features[0].shape[0]
        levels = [torch.cat((box(x), cls(x)), 1).view(b, self.outputs, -1)
                  for x, box, cls in zip(features, self.box, self.cls)]
        return torch.cat(levels, 2)


class YoloC2f(nn.Module):
    def __init__(self):
        super().__init__()
        self.p3 = nn.Sequential(YoloConv(3, 16, 3, 2), YoloConv(16, 32, 3, 2), C2f(32, 32, 1),
                                YoloConv(32, 64, 3, 2), C2f(64, 64, 2))
        self.p4 = nn.Sequential(YoloConv(64, 128, 3, 2), C2f(128, 128, 1), SPPF(128, 128))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.neck3 = C2f(128 + 64, 64, 1, shortcut=False)
        self.down = YoloConv(64, 64, 3, 2)
        self.neck4 = C2f(64 + 128, 128, 1, shortcut=False)
        self.detect = DetectHead((64, 128))

    def forward(self, x):
        p3 = self.p3(x)
        p4 = self.p4(p3)
        n3 = self.neck3(torch.cat([self.up(p4), p3], 1))
        n4 = self.neck4(torch.cat([self.down(n3), p4], 1))
        return self.detect([n3, n4])


def yolo_c2f():
    return YoloC2f()


# ---------------------------------------------------------------- Transformers


class Attention(nn.Module):
    """Fused-qkv multi-head self-attention written out op by op."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class ViTBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, image_size=32, patch=8, dim=64, depth=2, heads=4, classes=10):
        super().__init__()
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(ViTBlock(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class BertLayer(nn.Module):
    """Post-LN encoder layer with separate q/k/v projections and an additive mask."""

    def __init__(self, dim, heads, ffn):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-12)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))
        self.norm2 = nn.LayerNorm(dim, eps=1e-12)

    def _heads(self, x):
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x, additive_mask):
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + additive_mask
        context = (torch.softmax(scores, -1) @ v).transpose(1, 2).flatten(2)
        x = self.norm1(x + self.out(context))
        return self.norm2(x + self.ffn(x))


class BertEncoder(nn.Module):
    def __init__(self, vocab=1000, dim=64, depth=2, heads=4, ffn=128, max_positions=64):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.position_embeddings = nn.Embedding(max_positions, dim)
        self.register_buffer("position_ids", torch.arange(max_positions).unsqueeze(0), persistent=False)
        self.norm = nn.LayerNorm(dim, eps=1e-12)
        self.layers = nn.ModuleList(BertLayer(dim, heads, ffn) for _ in range(depth))

    def forward(self, input_ids, attention_mask):
        positions = self.position_ids[:, : input_ids.shape[1]]
        x = self.norm(self.word_embeddings(input_ids) + self.position_embeddings(positions))
        additive_mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
        for layer in self.layers:
            x = layer(x, additive_mask)
        return x


class MHABlock(nn.Module):
    """Post-LN transformer layer built on torch.nn.MultiheadAttention."""

    def __init__(self, dim=64, heads=4, ffn=128):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Linear(ffn, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
        return self.norm2(x + self.ffn(x))


class SpeechTagger(nn.Module):
    """A recurrent sequence tagger, as speech and time-series models are built: frame features ->
    Linear -> 2-layer LSTM -> bidirectional GRU -> per-frame classes."""

    def __init__(self, features=40, width=64, lstm=96, gru=48, classes=10):
        super().__init__()
        self.inp = nn.Linear(features, width)
        self.lstm = nn.LSTM(width, lstm, num_layers=2, batch_first=True)
        self.gru = nn.GRU(lstm, gru, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * gru, classes)

    def forward(self, x):
        h, _ = self.lstm(torch.relu(self.inp(x)))
        g, _ = self.gru(h)
        return self.out(g)


def vit():
    return ViT()


def bert_encoder():
    return BertEncoder()


def torch_mha():
    return nn.Sequential(MHABlock(), MHABlock())


# ---------------------------------------------------------------- registry entries


@dataclass(frozen=True)
class ZooEntry:
    name: str
    family: str  # "cnn" | "transformer" | "recurrent"
    builder: Callable[[], nn.Module]
    inputs: dict[str, InputSpec]
    output_names: tuple[str, ...] = ("output",)

    @property
    def input_names(self) -> list[str]:
        return list(self.inputs)

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: spec.shape for name, spec in self.inputs.items()}

    @property
    def seed(self) -> int:
        return zlib.crc32(self.name.encode())

    def build(self) -> nn.Module:
        """The module with deterministic random weights, in eval mode."""
        torch.manual_seed(self.seed)
        return init_weights(self.builder()).eval()

    def example_inputs(self, seed: int = 0) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(a) for a in make_feeds(self.inputs, seed).values())


TEXT_INPUTS = {"input_ids": tokens(2, 16, 1000), "attention_mask": mask(2, 16)}


def _cnn(name, builder, size=64, outputs=("output",)):
    return ZooEntry(name, "cnn", builder, {"input": image(2, 3, size, size)}, outputs)


ENTRIES: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        _cnn("resnet_basic", resnet_basic),
        _cnn("resnet_bottleneck", resnet_bottleneck),
        _cnn("mobilenetv2", mobilenetv2),
        _cnn("mobilenetv3", mobilenetv3),
        _cnn("efficientnet", efficientnet),
        _cnn("densenet", densenet),
        _cnn("inception", inception),
        _cnn("shufflenetv2", shufflenetv2),
        _cnn("regnety", regnety),
        _cnn("convnext", convnext),
        _cnn("unet", unet),
        _cnn("fpn", fpn, outputs=("p2", "p3", "p4", "p5")),
        _cnn("yolo_c2f", yolo_c2f),
        ZooEntry("vit", "transformer", vit, {"input": image(2, 3, 32, 32)}),
        ZooEntry("bert_encoder", "transformer", bert_encoder, TEXT_INPUTS, ("last_hidden_state",)),
        ZooEntry("torch_mha", "transformer", torch_mha, {"input": image(2, 16, 64)}),
        ZooEntry("speech_tagger", "recurrent", SpeechTagger, {"input": image(2, 20, 40)}),
    )
}
