"""Drop-in fidelity after fuse(): isinstance, hooks, pruning and torch.fx feature extraction as for torchvision.

Each test builds a small torchvision ResNet, fuses a copy on the reference backend, and runs both in float64 on
the CPU: what the user's code sees (hook arguments, pruned training, traced features) must be torchvision's. How
often the fused path ran is counted at ``backends.resolve``, which the fused path calls once per block and stem.
"""

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import prune
from torchvision.models import resnet as tv
from torchvision.models.feature_extraction import create_feature_extractor

import resnet_fused
from resnet_fused import backends
from resnet_fused.fused import _Fused
from tolerances import assert_close


def _pair(block=tv.BasicBlock, seed=0):
    torch.manual_seed(seed)
    ref = tv.ResNet(block, [1, 1, 1, 1], num_classes=5).double()
    return ref, resnet_fused.fuse(copy.deepcopy(ref), backend="reference")


def _x(n=2, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g, dtype=torch.float64)


@pytest.fixture
def fused_calls(monkeypatch):
    """How many times the fused path ran (one ``backends.resolve`` per block or stem)."""
    calls = []
    resolve = backends.resolve

    def counting(*args, **kwargs):
        calls.append(1)
        return resolve(*args, **kwargs)

    monkeypatch.setattr(backends, "resolve", counting)
    return calls


def test_isinstance_as_torchvision_and_timm():
    ref, fused = _pair(tv.Bottleneck)
    built = resnet_fused.ResNet(resnet_fused.Bottleneck, [1, 1, 1, 1], num_classes=5)
    for model in (fused, built):
        assert isinstance(model, torchvision.models.ResNet)
        assert all(isinstance(b, tv.Bottleneck) for b in (model.layer1[0], model.layer4[0]))
        assert type(model.layer1[0]) is resnet_fused.Bottleneck
    assert isinstance(resnet_fused.BasicBlock(8, 8), tv.BasicBlock)
    assert fused.state_dict().keys() == ref.state_dict().keys()
    timm = pytest.importorskip("timm")
    model = resnet_fused.fuse(timm.create_model("resnet10t", pretrained=False, num_classes=5), backend="reference")
    block = model.layer1[0]
    assert isinstance(block, timm.models.resnet.BasicBlock) and isinstance(block, _Fused)


# Modules whose hooks the test registers: the stem's (maxpool runs as its module, its hooks always fired), a
# block's conv/bn/relu, and a downsample's conv and BN.
HOOKED = ["conv1", "bn1", "relu", "maxpool", "layer1.0.conv1", "layer1.0.bn2", "layer1.0.relu", "layer2.0.downsample.0",
          "layer2.0.downsample.1"]


def _hook_all(model, seen):
    handles = []
    for name in HOOKED:
        m = model.get_submodule(name)
        handles.append(m.register_forward_pre_hook(lambda mod, args, n=name: seen.append((n, "pre", args[0]))))
        handles.append(m.register_forward_hook(lambda mod, args, out, n=name: seen.append((n, "out", out))))
    for name in ("layer1.0.conv2", "conv1"):  # a BN's would meet the in-place ReLU after it (torch refuses)
        handles.append(model.get_submodule(name).register_full_backward_hook(
            lambda mod, gin, gout, n=name: seen.append((n, "grad", gout[0]))))
    return handles


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_hooks_fire_with_torchvisions_tensors(mode, fused_calls):
    ref, fused = _pair()
    ref.train(mode == "train")
    fused.train(mode == "train")
    x_ref, x = _x().requires_grad_(), _x().requires_grad_()
    seen_ref, seen_fused = [], []
    handles = _hook_all(ref, seen_ref) + _hook_all(fused, seen_fused)
    y_ref, y = ref(x_ref), fused(x)
    assert_close(y, y_ref)
    assert len(fused_calls) == 2  # layer3 and layer4 ran fused, the hooked stem and blocks did not
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y.backward(g)
    assert [s[:2] for s in seen_fused] == [s[:2] for s in seen_ref]
    assert len(seen_ref) == 2 * (len(HOOKED) + 1) + 2  # the block's ReLU runs twice
    for (name, kind, a), (_, _, b) in zip(seen_fused, seen_ref):
        assert_close(a, b, msg=f"{name} {kind}")
    assert_close(x.grad, x_ref.grad)
    for (name, a), b in zip(ref.named_parameters(), fused.parameters()):
        assert_close(b.grad, a.grad, msg=name)
    rows = {r.path: r for r in resnet_fused.explain(fused, show=False)}
    assert not rows["conv1"].fused and "has a forward pre-hook" in rows["conv1"].reason
    assert not rows["layer2.0"].fused and "downsample.0 has a forward pre-hook" in rows["layer2.0"].reason
    assert rows["layer3.0"].fused
    for h in handles:
        h.remove()
    fused_calls.clear()
    assert_close(fused(x), ref(x_ref))
    assert len(fused_calls) == 5  # hooks gone: the stem and every block run fused again
    assert all(r.fused for r in resnet_fused.explain(fused, show=False))


def test_global_module_hook_runs_eager(fused_calls):
    ref, fused = _pair()
    ref.eval()
    fused.eval()
    x = _x()
    seen_ref, seen_fused = [], []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: (seen_fused if flag[0] else seen_ref).append(out))
    flag = [False]
    try:
        ref(x)
        flag[0] = True
        fused(x)
        assert "global module hook" in resnet_fused.explain(fused, show=False)[0].reason
    finally:
        handle.remove()
    assert len(fused_calls) == 0 and len(seen_fused) == len(seen_ref)
    for a, b in zip(seen_fused, seen_ref):
        assert_close(a, b)


def _train(model, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        opt.zero_grad()
        out = model(_x(size=64, seed=10 + step))  # 2x2 at layer4: BN over 8 values (2 is ill-conditioned)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        opt.step()
    return out


def test_pruned_training_equals_torchvision(fused_calls):
    ref, fused = _pair()
    for model in (ref, fused):
        torch.manual_seed(2)  # random_structured draws its channels
        prune.l1_unstructured(model.layer1[0].conv1, "weight", amount=0.3)
        prune.random_structured(model.layer2[0].downsample[0], "weight", amount=0.25, dim=0)
    ref.train()
    fused.train()
    torch.manual_seed(3)
    out_ref = _train(ref)
    torch.manual_seed(3)
    out = _train(fused)
    assert_close(out, out_ref)
    assert len(fused_calls) == 3 * 3  # stem, layer3, layer4: the pruned blocks ran eager
    for (name, a), b in zip(ref.state_dict().items(), fused.state_dict().values()):
        assert_close(b, a, msg=name) if b.is_floating_point() else torch.testing.assert_close(b, a)
    assert "conv1 is pruned" in {r.path: r for r in resnet_fused.explain(fused, show=False)}["layer1.0"].reason
    for model in (ref, fused):
        prune.remove(model.layer1[0].conv1, "weight")
        prune.remove(model.layer2[0].downsample[0], "weight")
    fused_calls.clear()
    assert_close(_train(fused, 1), _train(ref, 1))
    assert len(fused_calls) == 5


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fx_feature_extraction_is_torchvisions(mode):
    ref, fused = _pair(tv.Bottleneck)
    nodes = {"layer1": "l1", "layer3.0.relu_2": "mid", "fc": "out"}
    extractors = [create_feature_extractor(m.train(mode == "train"), nodes) for m in (ref, fused)]
    traced = extractors[1]
    calls = [n for n in traced.graph.nodes if n.op == "call_module"]
    assert calls and not any(isinstance(traced.get_submodule(n.target), _Fused) for n in calls)
    x = _x()
    feats_ref, feats = (e(x) for e in extractors)
    assert feats.keys() == feats_ref.keys() == {"l1", "mid", "out"}
    for k in feats:
        assert_close(feats[k], feats_ref[k], msg=k)
    gm = torch.fx.symbolic_trace(fused)
    assert_close(gm(x), ref(x))
    if mode == "train":  # the traced graphs updated the running statistics as torchvision's
        for (name, a), b in zip(ref.named_buffers(), fused.buffers()):
            torch.testing.assert_close(b, a, msg=name)
