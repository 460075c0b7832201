"""The FID Inception-v3 (``models/inception.py``) against a PyTorch build of the same network.

The PyTorch network is written here from the published layer definitions (torchvision's
``Inception3`` blocks with pytorch-fid's FID patches: pool branches that do not count padding,
and Mixed_7c's max-pool), with the module names of ``pt_inception-2015-12-05-6726825d.pth``
(1008-way ``fc`` included, as in the file), random weights and random BatchNorm statistics. Its
state_dict goes through the importer, or a ``.pth`` file through the command line, and the 2048-d
features must agree with PyTorch's (pytorch-fid's ``InceptionV3`` forward: resize to 299x299,
[0, 1] → [-1, 1], the blocks, global average pool) on images far smaller than 299, so the resize
is exercised too.
"""

import jax
import numpy as np
import pytest

from synseg_jax import checkpoint, import_weights
from synseg_jax.models import inception, weights
from tests.test_weight_parity import assert_close, randomize, state_dict_numpy

torch = pytest.importorskip(
    "torch", reason="parity tests need PyTorch (optional dependency; `pip install torch`)")
tnn = torch.nn
F = torch.nn.functional


class BasicConv2d(tnn.Module):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = tnn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = tnn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool_uncounted(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(tnn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg_pool_uncounted(x))], 1)


class BlockB(tnn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(tnn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        seven = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
        return torch.cat([self.branch1x1(x), seven, dbl,
                          self.branch_pool(avg_pool_uncounted(x))], 1)


class BlockD(tnn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        seven = x
        for i in range(1, 5):
            seven = getattr(self, f"branch7x7x3_{i}")(seven)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven,
                          F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(tnn.Module):
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = (F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool
                  else avg_pool_uncounted(x))
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
                          self.branch_pool(pooled)], 1)


class FIDInception(tnn.Module):
    """pytorch-fid's network with its file's names; forward = its 2048-d feature path."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = tnn.Linear(2048, 1008)  # in the published file; FID never uses it

    def forward(self, rgb01):
        x = F.interpolate(rgb01, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


@pytest.fixture(scope="module")
def torch_network():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield randomize(FIDInception())
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def imported(torch_network):
    return weights.import_fid_inception(state_dict_numpy(torch_network),
                                        inception.abstract_variables())


def all_concrete(tree) -> bool:
    return all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(tree))


def test_features_match_pytorch(torch_network, imported):
    assert all_concrete(imported)
    images = np.random.default_rng(0).integers(0, 256, size=(2, 45, 61, 3), dtype=np.uint8)
    with torch.no_grad():
        rgb01 = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
        want = torch_network(rgb01)
    got = inception.fid_inception_features(imported)(images)
    assert got.shape == (2, inception.FEATURE_DIM) and got.dtype == np.float64
    assert_close(got, want, "FID Inception-v3 pool features")


def test_command_line_writes_the_same_tree(torch_network, imported, tmp_path, capsys):
    src = tmp_path / "pt_inception.pth"
    torch.save(torch_network.state_dict(), str(src))
    dst = tmp_path / "fid_inception"
    assert import_weights.main(["--format=fid_inception_v3", f"--src={src}",
                                f"--dst={dst}"]) == 0
    assert "fid_inception_features" in capsys.readouterr().out
    loaded = checkpoint.load_variables(str(dst))
    assert jax.tree.structure(loaded) == jax.tree.structure(imported)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(imported)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_wrong_files_name_their_mismatches():
    abstract = inception.abstract_variables()
    sd = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        source = weights.fid_inception_naming(tuple(str(k.key) for k in path)[1:])
        shape = leaf.shape if leaf.ndim != 4 else tuple(np.array(leaf.shape)[[3, 2, 0, 1]])
        sd[source.key] = np.zeros(shape, np.float32)
    weights.import_fid_inception(dict(sd, **{"fc.weight": np.zeros((1008, 2048))}), abstract)

    # torchvision's ImageNet Inception has an auxiliary classifier; FID's file has none.
    wrong = dict(sd, **{"AuxLogits.conv0.conv.weight": np.zeros((128, 768, 1, 1))})
    del wrong["Mixed_7c.branch_pool.bn.running_var"]
    wrong["Conv2d_1a_3x3.conv.weight"] = np.zeros((32, 3, 5, 5), np.float32)
    with pytest.raises(ValueError, match="3 problems") as err:
        weights.import_fid_inception(wrong, abstract)
    message = str(err.value)
    assert "missing: Mixed_7c.branch_pool.bn.running_var" in message
    assert "unused: AuxLogits.conv0.conv.weight" in message
    assert "shape: Conv2d_1a_3x3.conv.weight (32, 3, 5, 5)" in message


def test_segmenter_flags_are_refused_for_the_feature_network(tmp_path):
    with pytest.raises(ValueError, match="--width"):
        import_weights.main(["--format=fid_inception_v3", "--src=x.pth",
                             f"--dst={tmp_path / 'w'}", "--width=0.5"])
    with pytest.raises(ValueError, match="feature network"):
        import_weights.convert("fid_inception_v3", "x.pth")


def test_small_inputs_without_the_resize_are_refused():
    model = inception.FIDInceptionV3(resize_input=False)
    small = np.zeros((1, 74, 80, 3), np.uint8)
    with pytest.raises(ValueError, match="at least 75x75 without the resize, got 74x80"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), small))
