"""Numerical parity of imported weights: the same network built in PyTorch (written here from the
published layer definitions: torchvision's ResNet/VGG, DeepLabV2's Caffe ResNet-101 port with its
ASPP, STDC-Seg's STDCNet813 and BiSeNet) with random weights and non-trivial BatchNorm statistics,
its state_dict converted by ``synseg_jax.models.weights``, must give the same outputs in eval mode.

Small widths and depths keep the file fast; the key layouts are the full-size ones.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synseg_jax.models import segmenters, weights
from synseg_jax.models.resnet import ResNet as FlaxResNet
from synseg_jax.models.stdc import STDCNet

torch = pytest.importorskip(
    "torch", reason="parity tests need PyTorch (optional dependency; `pip install torch`)")
tnn = torch.nn
F = torch.nn.functional

# Relative to the largest output magnitude (outputs are O(1..100) after random deep stacks).
TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def _torch_setup():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def randomize(module: tnn.Module) -> tnn.Module:
    """He-normal convs/linears, random biases, and BatchNorm with non-trivial affine parameters
    and running statistics (so that eval-mode BN is far from the identity)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (tnn.Conv2d, tnn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=gen)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.1, generator=gen)
            elif isinstance(m, (tnn.BatchNorm2d, tnn.BatchNorm1d)):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.2, generator=gen)
                m.running_mean.normal_(0.0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.num_batches_tracked.fill_(100)
    return module.eval()


def state_dict_numpy(module: tnn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def abstract_variables(model, shape):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def nchw_to_nhwc(x: torch.Tensor) -> jax.Array:
    return jnp.asarray(x.detach().numpy().transpose(0, 2, 3, 1))


def run(model, variables, x: torch.Tensor):
    """Eval-mode Flax forward on an NCHW torch input, jitted (one compilation is cheaper than
    dispatching the many small ops one by one)."""
    return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, nchw_to_nhwc(x))


def assert_close(flax_out, torch_out: torch.Tensor, what: str) -> float:
    want = torch_out.detach().numpy()
    if want.ndim == 4:
        want = want.transpose(0, 2, 3, 1)
    got = np.asarray(flax_out)
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs PyTorch {want.shape}"
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max()) / scale
    print(f"parity {what}: {err:.2e} (max |PyTorch| {scale:.3g})")  # shown with pytest -s
    assert err <= TOLERANCE, f"{what}: max |Flax - PyTorch| / max(1, max|PyTorch|) = {err:.2e}"
    return err


def all_concrete(tree) -> bool:
    return all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------------
# ResNet: torchvision's Bottleneck ResNet, and DeepLabV2's Caffe ResNet port ("MS_Deeplab").


class Bottleneck(tnn.Module):
    """1×1 → 3×3 → 1×1 (×4) with BN after each; Caffe style strides the first 1×1,
    torchvision's the 3×3; ``downsample`` = 1×1 conv (stride) + BN."""

    def __init__(self, inplanes, planes, stride, dilation, project, caffe):
        super().__init__()
        s1, s3 = (stride, 1) if caffe else (1, stride)
        self.conv1 = tnn.Conv2d(inplanes, planes, 1, stride=s1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, stride=s3, padding=dilation,
                                dilation=dilation, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = tnn.BatchNorm2d(planes * 4)
        self.downsample = tnn.Sequential(
            tnn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
            tnn.BatchNorm2d(planes * 4)) if project else None

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ClassifierModule(tnn.Module):
    """DeepLabV2's ASPP: 3×3 convs with bias, dilation = padding = rate, outputs summed."""

    def __init__(self, inplanes, rates, num_classes):
        super().__init__()
        self.conv2d_list = tnn.ModuleList(
            tnn.Conv2d(inplanes, num_classes, 3, padding=r, dilation=r, bias=True) for r in rates)

    def forward(self, x):
        return sum(conv(x) for conv in self.conv2d_list)


class ResNet(tnn.Module):
    """Output stride 8. caffe=True: DeepLab's layout (stride on the 1×1, ceil-mode pool, layer3/4
    dilated 2/4 in every block, downsample also where dilation is 2 or 4) with the ASPP as
    ``layer5``. caffe=False: torchvision's with replace_stride_with_dilation=[False, True, True]
    (the first block of a newly dilated stage keeps the previous dilation)."""

    def __init__(self, stage_sizes, stem, caffe, num_classes=None, rates=(6, 12, 18, 24)):
        super().__init__()
        self.conv1 = tnn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = tnn.BatchNorm2d(stem)
        self.maxpool = tnn.MaxPool2d(3, stride=2, padding=1, ceil_mode=caffe)
        inplanes, current = stem, 1
        for s, (blocks, stride, dilation) in enumerate(
                zip(stage_sizes, (1, 2, 1, 1), (1, 1, 2, 4)), start=1):
            planes = stem * 2 ** (s - 1)
            layer = []
            for b in range(blocks):
                if caffe:
                    d = dilation
                    project = b == 0 and (stride != 1 or inplanes != planes * 4
                                          or dilation in (2, 4))
                else:
                    d = current if b == 0 else dilation
                    project = b == 0 and (stride != 1 or inplanes != planes * 4)
                layer.append(Bottleneck(inplanes, planes, stride if b == 0 else 1, d, project,
                                        caffe))
                inplanes = planes * 4
            current = dilation
            setattr(self, f"layer{s}", tnn.Sequential(*layer))
        if num_classes is not None:
            self.layer5 = ClassifierModule(inplanes, rates, num_classes)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for s in range(1, 5):
            x = getattr(self, f"layer{s}")(x)
        return self.layer5(x) if hasattr(self, "layer5") else x


class MSDeeplab(tnn.Module):
    """The init checkpoint's wrapper: the ResNet (with its ASPP) is the attribute ``Scale``."""

    def __init__(self, stage_sizes, stem, num_classes, rates):
        super().__init__()
        self.Scale = ResNet(stage_sizes, stem, True, num_classes, rates)

    def forward(self, x):
        return self.Scale(x)


def test_torchvision_resnet_parity():
    stage_sizes = (1, 1, 2, 1)  # two blocks in layer3: the dilation change inside a stage
    net = randomize(ResNet(stage_sizes, 8, caffe=False))
    x = torch.randn(2, 3, 43, 43)
    with torch.no_grad():
        want = net(x)
    sd = state_dict_numpy(net)
    sd.update({"fc.weight": np.zeros((10, 256), np.float32), "fc.bias": np.zeros(10, np.float32)})
    model = segmenters.build_segmenter("pspnet_r101", 5, stage_sizes=stage_sizes, width=0.125,
                                       style="torchvision")
    variables = weights.import_torchvision_resnet(sd, abstract_variables(model, (1, 43, 43, 3)))
    backbone = {c: v["backbone"] for c, v in variables.items()}
    assert all_concrete(backbone)
    out = run(FlaxResNet(stage_sizes=stage_sizes, width=0.125, style="torchvision"), backbone, x)
    assert_close(out["layer4"], want, "torchvision ResNet layer4")


@pytest.mark.parametrize("two_branch", [False, True])
def test_deeplab_init_parity_with_aspp(two_branch):
    stage_sizes = (1, 1, 2, 1)
    rates = (6, 12) if two_branch else (6, 12, 18, 24)
    net = randomize(MSDeeplab(stage_sizes, 8, num_classes=5, rates=rates))
    x = torch.randn(1, 3, 97, 97)  # odd: ceil-mode pooling matters (97 → 49 → 25)
    with torch.no_grad():
        want = net(x)
    sd = state_dict_numpy(net)
    assert "Scale.layer5.conv2d_list.1.bias" in sd and "Scale.layer1.0.downsample.1.weight" in sd
    if two_branch:  # the published init has all four convs; a two-branch model uses two
        for i in (2, 3):
            sd[f"Scale.layer5.conv2d_list.{i}.weight"] = np.zeros((5, 256, 3, 3), np.float32)
            sd[f"Scale.layer5.conv2d_list.{i}.bias"] = np.zeros(5, np.float32)
    model = segmenters.build_segmenter("deeplabv2", 5, stage_sizes=stage_sizes, width=0.125,
                                       style="caffe", aspp_two_branch=two_branch)
    variables = weights.import_deeplab_resnet(sd, abstract_variables(model, (1, 97, 97, 3)),
                                              scope=())
    assert all_concrete(variables)
    out = run(model, variables, x)
    assert_close(out["logits"], want, "DeepLabV2 (Caffe ResNet + ASPP) logits")


def test_deeplab_init_backbone_only_ignores_aspp():
    stage_sizes = (1, 1, 1, 1)
    net = randomize(MSDeeplab(stage_sizes, 8, num_classes=21, rates=(6, 12, 18, 24)))
    x = torch.randn(1, 3, 43, 43)
    with torch.no_grad():
        want = net.Scale.layer4(net.Scale.layer3(net.Scale.layer2(net.Scale.layer1(
            net.Scale.maxpool(F.relu(net.Scale.bn1(net.Scale.conv1(x))))))))
    model = segmenters.build_segmenter("deeplabv2", 19, stage_sizes=stage_sizes, width=0.125,
                                       multi_level=True)
    abstract = abstract_variables(model, (1, 43, 43, 3))
    variables = weights.import_deeplab_resnet(state_dict_numpy(net), abstract)
    assert not all_concrete(variables["params"]["head"])  # 21-class ASPP ignored
    backbone = {c: v["backbone"] for c, v in variables.items()}
    out = run(FlaxResNet(stage_sizes=stage_sizes, width=0.125, style="caffe"), backbone, x)
    assert_close(out["layer4"], want, "Caffe ResNet layer4")


# ---------------------------------------------------------------------------------------------
# VGG16 (torchvision layout: features = [conv, ReLU]* + MaxPool per block; classifier = fc6,
# ReLU, Dropout, fc7, ReLU, Dropout, fc8).


class VGG16(tnn.Module):
    def __init__(self, widths, fc):
        super().__init__()
        layers, in_ch = [], 3
        for n, width in zip((2, 2, 3, 3, 3), widths):
            for _ in range(n):
                layers += [tnn.Conv2d(in_ch, width, 3, padding=1), tnn.ReLU(inplace=True)]
                in_ch = width
            layers.append(tnn.MaxPool2d(2, 2))
        self.features = tnn.Sequential(*layers)
        self.avgpool = tnn.AdaptiveAvgPool2d((7, 7))
        self.classifier = tnn.Sequential(
            tnn.Linear(in_ch * 49, fc), tnn.ReLU(True), tnn.Dropout(),
            tnn.Linear(fc, fc), tnn.ReLU(True), tnn.Dropout(), tnn.Linear(fc, 1000))

    def fc7(self, x):
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier[:5](x)


def test_torchvision_vgg16_parity():
    net = randomize(VGG16((4, 8, 16, 32, 32), fc=256))  # width 1/16 of 4096
    x = torch.randn(1, 3, 224, 224)  # pool5 is 7×7, so fc6 as a 7×7 conv = the linear layer
    with torch.no_grad():
        want_pool5, want_fc7 = net.features(x), net.fc7(x)
    sd = state_dict_numpy(net)
    model = segmenters.build_segmenter("fcn8s_vgg16", 5, width=1 / 16)
    variables = weights.import_torchvision_vgg16(sd, abstract_variables(model, (1, 224, 224, 3)),
                                                 "fcn")
    # The FCN head's scoring layers are not in the checkpoint; give them zeros to run the model.
    variables = jax.tree.map(
        lambda leaf: jnp.zeros(leaf.shape, leaf.dtype) if isinstance(leaf, jax.ShapeDtypeStruct)
        else leaf, variables)
    out = run(model, variables, x)
    assert_close(out["features"]["pool5"], want_pool5, "VGG16 pool5")
    # fc7's 7×7 map: its centre pixel's fc6 window covers pool5 exactly (padding elsewhere).
    assert_close(out["features"]["fc7"][:, 3, 3, :], want_fc7, "VGG16 fc7 (centre)")


# ---------------------------------------------------------------------------------------------
# STDC813 and BiSeNet (STDC-Seg layout: nets/stdcnet.py, models/model_stages.py).


class ConvX(tnn.Module):
    def __init__(self, in_ch, out_ch, kernel=3, stride=1):
        super().__init__()
        self.conv = tnn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2,
                               bias=False)
        self.bn = tnn.BatchNorm2d(out_ch)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class CatBottleneck(tnn.Module):
    """4 branches: 1×1 → out/2, 3×3 → out/4, out/8, out/8, concatenated; stride 2 adds a
    depthwise 3×3/2 conv + BN (``avd_layer``) after branch 0 and avg-pools branch 0's output."""

    def __init__(self, in_ch, out_ch, stride):
        super().__init__()
        self.stride = stride
        if stride == 2:
            self.avd_layer = tnn.Sequential(
                tnn.Conv2d(out_ch // 2, out_ch // 2, 3, stride=2, padding=1, groups=out_ch // 2,
                           bias=False),
                tnn.BatchNorm2d(out_ch // 2))
            self.skip = tnn.AvgPool2d(3, stride=2, padding=1)
        self.conv_list = tnn.ModuleList([
            ConvX(in_ch, out_ch // 2, kernel=1), ConvX(out_ch // 2, out_ch // 4),
            ConvX(out_ch // 4, out_ch // 8), ConvX(out_ch // 8, out_ch // 8)])

    def forward(self, x):
        first = self.conv_list[0](x)
        y = self.avd_layer(first) if self.stride == 2 else first
        outs = []
        for conv in self.conv_list[1:]:
            y = conv(y)
            outs.append(y)
        if self.stride == 2:
            first = self.skip(first)
        return torch.cat([first] + outs, dim=1)


class STDCNet813(tnn.Module):
    def __init__(self, base):
        super().__init__()
        feats = [ConvX(3, base // 2, 3, 2), ConvX(base // 2, base, 3, 2)]
        in_ch = base
        for i in range(3):
            out_ch = base * 4 * 2 ** i
            feats += [CatBottleneck(in_ch, out_ch, 2), CatBottleneck(out_ch, out_ch, 1)]
            in_ch = out_ch
        self.features = tnn.Sequential(*feats)
        # The published module registers slices of `features` again, and a classifier tail.
        self.x2 = tnn.Sequential(self.features[:1])
        self.x4 = tnn.Sequential(self.features[1:2])
        self.x8 = tnn.Sequential(self.features[2:4])
        self.x16 = tnn.Sequential(self.features[4:6])
        self.x32 = tnn.Sequential(self.features[6:])
        self.conv_last = ConvX(base * 16, max(1024, base * 16), 1, 1)
        self.fc = tnn.Linear(max(1024, base * 16), max(1024, base * 16), bias=False)
        self.bn = tnn.BatchNorm1d(max(1024, base * 16))
        self.linear = tnn.Linear(max(1024, base * 16), 1000, bias=False)

    def forward(self, x):
        f2 = self.x2(x)
        f4 = self.x4(f2)
        f8 = self.x8(f4)
        f16 = self.x16(f8)
        return f8, f16, self.x32(f16)


class ConvBNReLU(tnn.Module):
    def __init__(self, in_ch, out_ch, ks=3, padding=1):
        super().__init__()
        self.conv = tnn.Conv2d(in_ch, out_ch, ks, padding=padding, bias=False)
        self.bn = tnn.BatchNorm2d(out_ch)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class ARM(tnn.Module):
    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.conv = ConvBNReLU(in_ch, out_ch)
        self.conv_atten = tnn.Conv2d(out_ch, out_ch, 1, bias=False)
        self.bn_atten = tnn.BatchNorm2d(out_ch)

    def forward(self, x):
        f = self.conv(x)
        a = torch.sigmoid(self.bn_atten(self.conv_atten(F.adaptive_avg_pool2d(f, 1))))
        return f * a


class ContextPath(tnn.Module):
    def __init__(self, base, c):
        super().__init__()
        self.backbone = STDCNet813(base)
        self.arm16 = ARM(base * 8, c)
        self.arm32 = ARM(base * 16, c)
        self.conv_head32 = ConvBNReLU(c, c)
        self.conv_head16 = ConvBNReLU(c, c)
        self.conv_avg = ConvBNReLU(base * 16, c, ks=1, padding=0)

    def forward(self, x):
        f8, f16, f32 = self.backbone(x)
        avg = self.conv_avg(F.adaptive_avg_pool2d(f32, 1))
        s32 = self.arm32(f32) + F.interpolate(avg, f32.shape[2:], mode="nearest")
        cp16 = self.conv_head32(F.interpolate(s32, f16.shape[2:], mode="nearest"))
        s16 = self.arm16(f16) + cp16
        cp8 = self.conv_head16(F.interpolate(s16, f8.shape[2:], mode="nearest"))
        return f8, cp8, cp16


class FFM(tnn.Module):
    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.convblk = ConvBNReLU(in_ch, out_ch, ks=1, padding=0)
        self.conv1 = tnn.Conv2d(out_ch, out_ch // 4, 1, bias=False)
        self.conv2 = tnn.Conv2d(out_ch // 4, out_ch, 1, bias=False)

    def forward(self, sp, cp):
        f = self.convblk(torch.cat([sp, cp], dim=1))
        a = torch.sigmoid(self.conv2(F.relu(self.conv1(F.adaptive_avg_pool2d(f, 1)))))
        return f * a + f


class Output(tnn.Module):
    def __init__(self, in_ch, mid, n_classes):
        super().__init__()
        self.conv = ConvBNReLU(in_ch, mid)
        self.conv_out = tnn.Conv2d(mid, n_classes, 1, bias=False)

    def forward(self, x):
        return self.conv_out(self.conv(x))


class BiSeNet(tnn.Module):
    """Returns the three outputs before upsampling: main (stride 8), conv_out16 on the stride-8
    context feature, conv_out32 on the stride-16 one."""

    def __init__(self, base, n_classes, c, fused, mid):
        super().__init__()
        self.cp = ContextPath(base, c)
        self.ffm = FFM(base * 4 + c, fused)
        self.conv_out = Output(fused, fused, n_classes)
        self.conv_out16 = Output(c, mid, n_classes)
        self.conv_out32 = Output(c, mid, n_classes)

    def forward(self, x):
        f8, cp8, cp16 = self.cp(x)
        return (self.conv_out(self.ffm(f8, cp8)), self.conv_out32(cp16), self.conv_out16(cp8))


def test_stdc813_bisenet_parity():
    width = 0.25  # STDC base 64 → 16; head 128 / 256 / 64 → 32 / 64 / 16
    net = randomize(BiSeNet(16, 5, c=32, fused=64, mid=16))
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        want = net(x)
        want_f8, want_f16, want_f32 = net.cp.backbone(x)
    sd = state_dict_numpy(net)
    model = segmenters.build_segmenter("bisenet_stdc813", 5, width=width)
    abstract = abstract_variables(model, (1, 64, 96, 3))

    # The whole network (STDC-Seg BiSeNet names).
    variables = weights.import_stdcseg_bisenet(sd, abstract)
    assert all_concrete(variables)
    out = run(model, variables, x)
    assert_close(out["logits"], want[0], "BiSeNet logits")
    assert_close(out["aux_logits"], want[1], "BiSeNet aux (stride 16)")
    assert_close(out["aux_logits2"], want[2], "BiSeNet aux (stride 8)")

    # The backbone alone, from the ImageNet checkpoint's layout (features.*, aliases, classifier).
    backbone_sd = state_dict_numpy(net.cp.backbone)
    assert "x8.0.3.conv_list.3.bn.running_var" in backbone_sd and "linear.weight" in backbone_sd
    variables = weights.import_stdc(backbone_sd, abstract)
    backbone = {c: v["backbone"] for c, v in variables.items()}
    assert all_concrete(backbone)
    feats = run(STDCNet(width=width), backbone, x)
    for name, want_f in (("stride8", want_f8), ("stride16", want_f16), ("stride32", want_f32)):
        assert_close(feats[name], want_f, f"STDC813 {name}")
