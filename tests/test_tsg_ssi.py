"""Texture/shape generalisation (TSG + SSI + boundary loss): the modules against hand computations,
the boundary ground truth and its class-balanced BCE, placements, the interval connection, the
method's step, the unchanged plain segmenters and the source-only protocol."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import source_only as so_config
from configs import tsg_ssi as tsg_config
from synseg_jax import inputs, methods, optim
from synseg_jax.methods import base
from synseg_jax.methods import tsg_ssi as method_lib
from synseg_jax.models import segmenters
from synseg_jax.models import tsg_ssi as tsg_lib
from synseg_jax.models.resnet import ResNet
from synseg_jax.recipe import load_config_file
from synseg_jax.state import RoleState, new_state
from tests.model_init import abstract_init, host_init
from tests.tiny import TINY_DATA_AND_MODEL

TINY_NET = dict(stage_sizes=(1, 1, 1, 1), width=0.125)
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "tsg_ssi.py")


@pytest.fixture(autouse=True, scope="module")
def fast_compiles():
    """Less XLA optimisation: the tiny nets compile in half the time (numbers agree to the
    tolerances below); restored after this file."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def tiny_config(*extra):
    return tsg_config.get_config(",".join(["demo", *TINY_DATA_AND_MODEL, "train.batch_size=2",
                                           *extra]))


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


# ---------------------------------------------------------------------------------------------
# Modules


def test_tsg_is_eq1_with_affine_free_in_and_se_attention():
    """F_out = CA(F - IN(F)) + IN(F), CA = SE with reduction 16, IN without parameters."""
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (2, 5, 6, 32)).astype(np.float32)
    tsg = tsg_lib.TSG()
    params = tsg.init(jax.random.key(0), jnp.asarray(x))["params"]
    # Only the attention has parameters: IN is affine-free; fc1 maps 32 -> 32 / 16 = 2.
    assert jax.tree.map(np.shape, params) == {"attention": {
        "fc1": {"kernel": (32, 2), "bias": (2,)}, "fc2": {"kernel": (2, 32), "bias": (32,)}}}
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["attention"])
    xd = x.astype(np.float64)
    mean = xd.mean(axis=(1, 2), keepdims=True)
    var = xd.var(axis=(1, 2), keepdims=True)
    normed = (xd - mean) / np.sqrt(var + 1e-5)
    residual = xd - normed
    squeeze = residual.mean(axis=(1, 2))
    hidden = np.maximum(squeeze @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
    gate = sigmoid(hidden @ p["fc2"]["kernel"] + p["fc2"]["bias"])
    want = residual * gate[:, None, None, :] + normed
    got = tsg.apply({"params": params}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    # The IN part really normalises: the output's per-channel statistics are not the input's.
    assert not np.allclose(np.asarray(got).mean(axis=(1, 2)), mean[:, 0, 0], atol=0.1)


def test_spatial_attention_is_cbams():
    """x * sigmoid(conv7x7([mean over channels, max over channels])) with zero padding 3."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 6, 7, 4)).astype(np.float32)
    module = tsg_lib.SpatialAttention()
    params = module.init(jax.random.key(0), jnp.asarray(x))["params"]
    k = np.asarray(params["conv"]["kernel"], np.float64)
    assert k.shape == (7, 7, 2, 1)
    pooled = np.concatenate([x.mean(-1, keepdims=True), x.max(-1, keepdims=True)], -1)
    padded = np.pad(pooled[0].astype(np.float64), ((3, 3), (3, 3), (0, 0)))
    logit = np.array([[np.sum(padded[i:i + 7, j:j + 7] * k[..., 0]) for j in range(7)]
                      for i in range(6)]) + float(params["conv"]["bias"][0])
    want = x[0] * sigmoid(logit)[..., None]
    got = module.apply({"params": params}, jnp.asarray(x))[0]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("field,layers,message", [
    ("tsg", (5,), r"model.tsg: the backbone has no layer 5"),
    ("tsg", (0, 1), r"model.tsg: the backbone has no layer 0"),
    ("ssi", (4,), r"model.ssi: an SSI after layer 4 has no later layer"),
    ("ssi", (2, 2), r"model.ssi: a layer is listed twice"),
])
def test_a_placement_on_a_layer_the_backbone_lacks_is_a_config_error_naming_it(
        field, layers, message):
    config = tiny_config(f"model.{field}={layers}".replace(" ", ""))
    with pytest.raises(ValueError, match=message):
        methods.build(config)
    with pytest.raises(ValueError, match=message):  # any ResNet segmenter, any method
        segmenters.build_segmenter("pspnet_r101", 3, **{field: layers})


def test_tsg_ssi_on_a_segmenter_without_a_resnet_is_refused():
    with pytest.raises(ValueError, match=r"model.tsg, model.ssi set, but segmenter "
                                         r"'deeplab_largefov_vgg16' has no TSG / SSI"):
        methods.build(tiny_config("model.name=deeplab_largefov_vgg16"))
    with pytest.raises(ValueError, match=r"model.tsg is set, but segmenter "
                                         r"'deeplab_largefov_vgg16' has no such setting"):
        so_config.get_config("demo,model.name=deeplab_largefov_vgg16,model.tsg=(1,)")


def _strip(tree):
    return jax.tree.map(np.shape, tree)


@pytest.mark.parametrize("name", ["deeplabv2", "pspnet_r101"])
def test_without_tsg_and_ssi_the_segmenter_is_the_plain_one(name):
    """tsg=() and ssi=(): exactly the parameter tree of before (backbone = a bare ResNet, heads
    only beside it), no edge output; and the supervised loss never reads edge maps."""
    model = segmenters.build_segmenter(name, 7, multi_level=True, **TINY_NET)
    out, variables = abstract_init(model)
    plain = segmenters.SEGMENTERS[name].__dataclass_fields__
    style = plain["style"].default
    _, resnet_vars = abstract_init(ResNet(stage_sizes=(1, 1, 1, 1), width=0.125, style=style))
    assert set(out) == {"logits", "aux_logits", "features"}
    for col in ("params", "batch_stats"):
        assert _strip(variables[col]["backbone"]) == _strip(resnet_vars[col])
    assert all("head" in k for k in variables["params"] if k != "backbone")

    with_edges = segmenters.build_segmenter(name, 7, multi_level=True, ssi=(1,), **TINY_NET)
    out_e, _ = abstract_init(with_edges)
    assert "edge_logits" in out_e
    labels = jnp.zeros((1, 65, 65), jnp.int32)
    logits = {k: jnp.zeros(v.shape) for k, v in out_e.items() if k in ("logits", "aux_logits")}
    edges = tuple(jnp.full(e.shape, 5.0) for e in out_e["edge_logits"])
    _, terms = base.supervised_loss({**logits, "edge_logits": edges}, labels, 0.1)
    assert set(terms) == {"loss/seg", "loss/seg_aux"}


def test_full_placement_outputs_param_tree_and_learning_rates():
    model = segmenters.build_segmenter("deeplabv2", 7, tsg=(1, 2, 3, 4), ssi=(1, 2, 3),
                                       **TINY_NET)
    out, variables = abstract_init(model)
    params = variables["params"]
    assert set(params) == {"backbone", "head", "tsg1", "tsg2", "tsg3", "tsg4", "ssi1", "ssi2",
                           "ssi3", "ssi_fuse"}
    # Three side maps and the fused one, each at the input (= label) size.
    assert [e.shape for e in out["edge_logits"]] == [(1, 65, 65, 1)] * 4
    # Each projection matches its later layer's channels (bottleneck outputs 4 x 8, 16, 32, 64).
    assert [params[f"ssi{s}"]["proj"]["kernel"].shape for s in (1, 2, 3)] == [
        (1, 1, 32, 64), (1, 1, 64, 128), (1, 1, 128, 256)]
    # The backbone keeps the bare ResNet's tree, so pretrained backbones load unchanged.
    _, resnet_vars = abstract_init(ResNet(stage_sizes=(1, 1, 1, 1), width=0.125))
    assert _strip(params["backbone"]) == _strip(resnet_vars["params"])
    # TSG / SSI learn at the body rate, the ASPP is the only head.
    labels = optim.label_params(params)
    for key in params:
        want = "head" if key == "head" else "body"
        assert set(jax.tree.leaves(labels[key])) == {want}, key


def test_the_ssi_projection_is_added_to_the_next_layer_on_its_grid():
    """Zeroing ssi1's projection changes layer2 (and the logits) but not layer1; the difference
    is exactly a stride-2 1x1 conv of the spatially attended layer1 (9x9 -> 5x5)."""
    model = segmenters.build_segmenter("deeplabv2", 5, ssi=(1,), **TINY_NET)
    x = jax.random.normal(jax.random.key(0), (1, 33, 33, 3)) * 30
    variables = host_init(model, x, bias_std=0.1)
    zeroed = jax.tree.map(lambda a: a, variables)
    zeroed["params"]["ssi1"]["proj"] = jax.tree.map(jnp.zeros_like,
                                                    variables["params"]["ssi1"]["proj"])
    apply = jax.jit(lambda v: model.apply(v, x, train=False))
    on, off = apply(variables), apply(zeroed)
    np.testing.assert_array_equal(on["features"]["layer1"], off["features"]["layer1"])
    assert not np.allclose(on["logits"], off["logits"])
    layer1 = on["features"]["layer1"]
    assert layer1.shape[1:3] == (9, 9) and on["features"]["layer2"].shape[1:3] == (5, 5)
    p = variables["params"]["ssi1"]
    attended = tsg_lib.SpatialAttention().apply({"params": p["attention"]}, layer1)
    want = (np.asarray(attended)[:, ::2, ::2] @ np.asarray(p["proj"]["kernel"][0, 0])
            + np.asarray(p["proj"]["bias"]))
    np.testing.assert_allclose(on["features"]["layer2"] - off["features"]["layer2"], want,
                               rtol=1e-3, atol=1e-3)

    # With a TSG after layer 2, the projection enters before it: layer2 = TSG2(layer2 + proj).
    with_tsg = segmenters.build_segmenter("deeplabv2", 5, tsg=(2,), ssi=(1,), **TINY_NET)
    v2 = host_init(with_tsg, x, seed=1, bias_std=0.1)
    v2["params"] = {**v2["params"], **variables["params"]}
    normalised = jax.jit(lambda v: with_tsg.apply(v, x, train=False))(v2)["features"]["layer2"]
    want = tsg_lib.TSG().apply({"params": v2["params"]["tsg2"]}, on["features"]["layer2"])
    np.testing.assert_allclose(normalised, want, rtol=1e-3, atol=1e-3)


def test_a_pretrained_plain_backbone_loads_into_a_tsg_ssi_segmenter():
    """init.seg.scope="backbone" (ImageNet or the demo pretraining) composes with TSG / SSI."""
    x = jnp.zeros((1, 33, 33, 3))
    plain = host_init(ResNet(stage_sizes=(1, 1, 1, 1), width=0.125), x, seed=3)
    model = segmenters.build_segmenter("deeplabv2", 5, tsg=(1, 2, 3, 4), ssi=(1, 2, 3),
                                       **TINY_NET)
    v = host_init(model, x)
    role = RoleState(v["params"], {"batch_stats": v["batch_stats"]}, None)
    loaded = base.with_pretrained(role, plain, "backbone", None)
    np.testing.assert_array_equal(loaded.params["backbone"]["stem"]["conv"]["kernel"],
                                  plain["params"]["stem"]["conv"]["kernel"])
    assert loaded.params["tsg1"] is role.params["tsg1"]


# ---------------------------------------------------------------------------------------------
# Boundary ground truth and loss

X = 255
LABELS = np.array([[0, 0, 1, 1, 1],
                   [0, 0, 1, 1, 1],
                   [2, 2, X, 1, 1],
                   [2, 2, 2, 1, 1]], np.uint8)
# A pixel with another class among its 8 neighbours; the void pixel is neither, and a void
# neighbour alone makes nothing an edge ((1, 3) and (3, 1) touch only it and their own class).
EDGES = np.array([[0, 1, 1, 0, 0],
                  [1, 1, 1, 0, 0],
                  [1, 1, 0, 1, 0],
                  [0, 0, 1, 1, 0]], bool)


def test_boundary_ground_truth_by_hand():
    edges, valid = method_lib.boundary_map(jnp.asarray(LABELS[None]))
    np.testing.assert_array_equal(edges[0], EDGES)
    np.testing.assert_array_equal(valid[0], LABELS != X)
    # Radius 2 reaches further: (0, 3) sees class 0 two pixels away.
    wide, _ = method_lib.boundary_map(jnp.asarray(LABELS[None]), radius=2)
    assert bool(wide[0, 0, 3]) and not bool(EDGES[0, 3])
    # Ids outside the classes are ignore too.
    edges_c, valid_c = method_lib.boundary_map(jnp.asarray(LABELS[None]), num_classes=2)
    assert not bool(valid_c[0, 3, 0]) and not bool(edges_c[0, 1, 0])


def reference_bce(x, edges, valid):
    total, count = 0.0, 0
    for xi, ei, vi in zip(x.astype(np.float64), edges, valid):
        pos, neg = ei & vi, vi & ~ei
        n = pos.sum() + neg.sum()
        beta = neg.sum() / n if n else 0.0
        total -= beta * np.log(sigmoid(xi[pos])).sum()
        total -= (1 - beta) * np.log(1 - sigmoid(xi[neg])).sum()
        count += n
    return total / max(count, 1)


def test_class_balanced_bce_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 2, (3, 6, 7)).astype(np.float32)
    edges = rng.random((3, 6, 7)) < 0.2
    valid = rng.random((3, 6, 7)) < 0.8
    valid[2] = False  # an all-ignore image adds nothing
    got = method_lib.class_balanced_bce(jnp.asarray(x)[..., None], jnp.asarray(edges),
                                        jnp.asarray(valid))
    np.testing.assert_allclose(float(got), reference_bce(x, edges, valid), rtol=1e-5)
    # beta = |Y-| / |Y|: at logit 0 both classes weigh the same in total (each log 2 / 2 per
    # counted pixel's share), whatever their sizes.
    zero = method_lib.class_balanced_bce(jnp.zeros((1, 6, 7)), jnp.asarray(edges[:1]),
                                         jnp.ones((1, 6, 7), bool))
    n_pos = edges[0].sum()
    n = 42
    np.testing.assert_allclose(float(zero), 2 * (n - n_pos) * n_pos / n * np.log(2) / n,
                               rtol=1e-5)


def test_all_ignore_labels_give_zero_boundary_loss_and_finite_gradients():
    labels = jnp.full((2, 8, 8), 255, jnp.uint8)
    maps = tuple(jnp.full((2, 8, 8, 1), v) for v in (-3.0, 0.0, 40.0, 1.0))
    names = ("ssi1", "ssi2", "ssi3", "fused")

    def loss(maps):
        return method_lib.boundary_loss(maps, labels, names)[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(maps)
    assert float(value) == 0.0
    assert all(bool(jnp.all(g == 0)) for g in grads)


def test_boundary_loss_is_the_sum_over_the_maps_resized_to_the_labels():
    labels = jnp.asarray(np.tile(LABELS, (2, 2))[None])  # 8x10
    rng = np.random.default_rng(2)
    maps = (jnp.asarray(rng.normal(size=(1, 8, 10, 1)), jnp.float32),
            jnp.asarray(rng.normal(size=(1, 4, 5, 1)), jnp.float32))  # half size: upsampled
    total, terms = method_lib.boundary_loss(maps, labels, ("ssi1", "fused"))
    edges, valid = method_lib.boundary_map(labels)
    up = jax.image.resize(maps[1], (1, 8, 10, 1), "bilinear", antialias=False)
    want = (reference_bce(np.asarray(maps[0])[..., 0], np.asarray(edges), np.asarray(valid))
            + reference_bce(np.asarray(up)[..., 0], np.asarray(edges), np.asarray(valid)))
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    assert set(terms) == {"loss/boundary_ssi1", "loss/boundary_fused", "train/boundary_fraction"}


# ---------------------------------------------------------------------------------------------
# The method


def _state(method, batch):
    """Step 0 from numpy variables (compiling ``init`` is the slow part of a tiny test)."""
    v = host_init(method.model, batch["source"]["image"], bias_std=0.01)
    params = v.pop("params")
    return new_state(jax.random.PRNGKey(0),
                     {"seg": RoleState(params, v, jax.jit(method.seg.opt.tx.init)(params))})


def test_train_step_learns_edges_and_classes_and_shows_the_edge_maps():
    config = tiny_config("optim.seg.lr=1e-2", "optim.seg.schedule=constant")
    method = methods.build(config)
    assert method.roles == ("seg",) and method.edge_names == ("ssi1", "ssi2", "ssi3", "fused")
    labels = np.tile(LABELS, (8, 7))[:32, :32].copy()
    labels[:, :4] = X
    rng = np.random.default_rng(0)
    image = np.stack([labels * 40.0 - 60] * 3, -1) + rng.normal(0, 5, (32, 32, 3))
    batch = {"source": {"image": jnp.asarray(np.stack([image, image[:, ::-1]]), jnp.float32),
                        "label": jnp.asarray(np.stack([labels, labels[:, ::-1]]), jnp.uint8)}}
    state = _state(method, batch)
    step = jax.jit(method.train_step)
    history = []
    for _ in range(8):
        state, metrics = step(state, batch)
        history.append({k: float(v) for k, v in metrics.items()})
    first, last = history[0], history[-1]
    assert all(np.isfinite(v) for v in first.values())
    np.testing.assert_allclose(first["loss/total"],
                               first["loss/seg"] + 1.5 * first["loss/boundary"], rtol=1e-5)
    np.testing.assert_allclose(first["loss/boundary"], sum(
        first[f"loss/boundary_{n}"] for n in method.edge_names), rtol=1e-5)
    assert last["loss/total"] < 0.6 * first["loss/total"]
    assert last["loss/boundary"] < first["loss/boundary"]
    assert last["loss/seg"] < first["loss/seg"]

    pictures = jax.jit(method.summaries)(state, batch)
    panels = pictures["train/edges"]
    # Ground truth, then ssi1..3 and the fused map, side by side.
    assert panels.shape == (2, 32, 5 * 32, 3) and panels.dtype == jnp.uint8
    edges, valid = method_lib.boundary_map(batch["source"]["label"])
    gt = np.where(np.asarray(valid), np.asarray(edges) * 255, 128)
    np.testing.assert_array_equal(panels[:, :, :32, 0], gt)
    assert len(np.unique(np.asarray(panels[:, :, 128:, 0]))) > 2  # a graded fused map


def test_training_never_opens_a_target_split(monkeypatch):
    """The training input of a tsg_ssi run is the source split alone; evaluation may read any."""
    config = tsg_config.get_config("demo")
    assert config.data.target == "" and "target" not in inputs.abstract_batch(config)
    opened = []

    class Opened:
        dataset = label_table = decode = None
        task = "segmentation"
        description = "stub"

    def open_split(data, name, split, with_names=False, decode=True):
        opened.append((name, split))
        return Opened()

    class Stream:
        def map(self, fn):
            return self

    monkeypatch.setattr(inputs, "open_split", open_split)
    monkeypatch.setattr(inputs.pipeline, "train_stream", lambda *a, **k: Stream())
    monkeypatch.setattr(inputs.pipeline, "paired_stream",
                        lambda *a, **k: pytest.fail("a target stream was built"))
    monkeypatch.setattr(inputs.pipeline, "HostIterator", lambda ds, **k: ds)
    inputs.train_batches(config, mesh=None, seed=0)
    assert opened == [("minicity", "sim[:90%]")]
    # A config that names a target is refused rather than silently read.
    with pytest.raises(ValueError, match="training reads the source only.*data.target"):
        methods.build(tiny_config("data.target=minicity", "data.target_split=real_train"))


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("arg", ["demo", "gta5", "synthia", "demo,init.seg.path=demo"])
def test_every_preset_loads_and_builds(arg):
    config = load_config_file(CONFIG, arg)
    method = methods.build(config)
    assert isinstance(method, method_lib.TsgSsi)
    assert config.data.target == "" and config.model.tsg == (1, 2, 3, 4)
    assert config.model.ssi == (1, 2, 3) and config.method.lambda_boundary == 1.5
    assert config.model.bn_mode == "train"


def test_paper_presets_hold_the_papers_protocol():
    g = load_config_file(CONFIG, "gta5")
    assert (g.model.name, g.model.depth, g.model.stage_sizes, g.model.output_stride) == (
        "deeplabv2", 50, (), 8)
    assert g.init.seg.path == ""  # from scratch
    o = g.optim.seg
    assert (o.kind, o.lr, o.momentum, o.weight_decay) == ("sgd", 2.5e-4, 0.9, 5e-4)
    assert (g.train.batch_size, g.data.crop, g.data.flip) == (1, (640, 640), True)
    assert g.train.steps == g.optim.seg.schedule_steps == 20 * 24_966
    assert g.data.eval_size == (512, 1024) and g.data.eval_split == "validation"
    assert load_config_file(CONFIG, "synthia").train.steps == 20 * 9_400
    d = load_config_file(CONFIG, "demo")
    assert d.init.seg.path == ""
    assert d.data.extra_eval_splits == ("minicity/sim[90%:]", "minicity/sim_topdown[:25%]")
