"""fuse() on timm's ResNets: torchvision-shaped blocks run fused and exact, every other block runs timm's forward.

timm's ``resnet*``, ``resnext*`` and ``wide_resnet*`` models (``d`` variants: deep stem, avg-pool downsample; a
dilated model: ``first_dilation``) are built depth- and width-reduced through ``timm.create_model``'s keyword
arguments and compared with the unfused timm model in float64 on the reference backend: one SGD step's output,
input and parameter gradients, parameters and running statistics, then eval. The fused blocks' fallback is made
to fail, so the fused path is what ran. Blocks with SE, anti-aliasing, another activation, or DropPath while
training are left to timm's forward; other timm families are not touched. The package imports without timm.
"""

import copy
import io
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import resnet_fused
from tolerances import assert_close
from torchvision_oracle import fused_copy

timm = pytest.importorskip("timm")
from timm.models import resnet as timm_resnet  # noqa: E402  (after the importorskip)

DTYPE = torch.float64
SMALL = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8, num_classes=10)

FUSED_CASES = {
    # name: create_model keyword arguments (depth- and width-reduced)
    "resnet18": SMALL,
    "resnet18-os8": dict(SMALL, output_stride=8),  # dilated layer3/4: conv1 of a transition block has its own
    "resnet50d": SMALL,                            # deep stem, AvgPool2d + conv1x1 + BN downsample
    "resnext50_32x4d": dict(SMALL, channels=(16, 32, 64, 128)),  # 32 groups: planes*4/64 channels per group
    "wide_resnet50_2": SMALL,
}


def _create(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name.split("-")[0], pretrained=False, **kwargs)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # timm zero-initializes each block's last BN: make every BN non-trivial
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t, (lo, hi) in ((m.weight, (0.5, 1.5)), (m.bias, (-0.3, 0.3)), (m.running_mean, (-0.2, 0.2)),
                                    (m.running_var, (0.5, 2.0))):
                    t.copy_(torch.empty(t.shape).uniform_(lo, hi, generator=gen))
    return model.to(DTYPE)


def _fuse_strict(model: nn.Module) -> nn.Module:
    return fused_copy(model, "reference")

def _step(model: nn.Module, x: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = x.clone().requires_grad_()
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    opt.step()
    return out, x.grad


def _close(actual, expected, msg):
    assert_close(actual, expected, DTYPE, max(1.0, expected.abs().max().item()), msg=msg)


@pytest.mark.parametrize("name", list(FUSED_CASES))
def test_timm_resnet_fused_matches_timm(name):
    ref = _create(name, **FUSED_CASES[name])
    fused = _fuse_strict(ref)
    blocks = [m for m in fused.modules() if isinstance(m, (timm_resnet.BasicBlock, timm_resnet.Bottleneck))]
    assert len(blocks) == 4 and all(isinstance(b, resnet_fused.models._FusedBlock) for b in blocks)
    rows = resnet_fused.explain(fused, show=False)
    assert len(rows) == 4 and all(r.fused for r in rows), rows
    # timm's state_dict, key for key and value for value
    assert list(fused.state_dict()) == list(ref.state_dict())
    for key, value in ref.state_dict().items():
        assert torch.equal(fused.state_dict()[key], value), key

    x = torch.randn(2, 3, 64, 64, dtype=DTYPE)
    out_ref, gx_ref = _step(ref.train(), x)
    out, gx = _step(fused.train(), x)
    _close(out, out_ref, "output")
    _close(gx, gx_ref, "input gradient")
    for (pname, p_ref), p in zip(ref.named_parameters(), fused.parameters()):
        _close(p.grad, p_ref.grad, f"gradient of {pname}")
        _close(p, p_ref, pname)
    for (bname, b_ref), b in zip(ref.named_buffers(), fused.buffers()):
        _close(b.to(DTYPE), b_ref.to(DTYPE), bname)
    with torch.no_grad():
        _close(fused.eval()(x), ref.eval()(x), "eval output")


@pytest.mark.parametrize("name,size", [("resnet26d", 64), ("resnet50d", 50)])  # 50: odd sizes at the pools
def test_d_variant_avg_pool_shortcut_is_fused(name, size, monkeypatch):
    """timm's d-variant downsample AvgPool2d(2, s, ceil_mode=True, count_include_pad=False) -> conv1x1 -> BN is
    the fused tail's shortcut: no BatchNorm forward runs inside a block, in training and in eval, and outputs,
    gradients and running statistics are timm's."""
    ref = _create(name, **SMALL)
    fused = _fuse_strict(ref)
    pools = [m for m in fused.modules() if type(m) is nn.AvgPool2d and m.ceil_mode]
    assert len(pools) == 3  # layers 2-4 (layer1's stride-1 downsample has an Identity pool)
    inside = {id(bn) for b in fused.modules() if isinstance(b, resnet_fused.models._FusedBlock)
              for bn in b.modules() if isinstance(bn, nn.BatchNorm2d)}
    ran = []
    forward = nn.BatchNorm2d.forward
    monkeypatch.setattr(nn.BatchNorm2d, "forward", lambda bn, x: (ran.append(id(bn)), forward(bn, x))[1])
    x = torch.randn(2, 3, size, size, dtype=DTYPE)
    out_ref, gx_ref = _step(ref.train(), x)
    ran.clear()
    out, gx = _step(fused.train(), x)
    assert ran and not inside & set(ran)  # the deep stem's BNs run as modules, none inside a block
    _close(out, out_ref, "output")
    _close(gx, gx_ref, "input gradient")
    for (pname, p_ref), p in zip(ref.named_parameters(), fused.parameters()):
        _close(p.grad, p_ref.grad, f"gradient of {pname}")
    for (bname, b_ref), b in zip(ref.named_buffers(), fused.buffers()):
        _close(b.to(DTYPE), b_ref.to(DTYPE), bname)
    ran.clear()
    with torch.no_grad():
        _close(fused.eval()(x), ref.eval()(x), "eval output")
    assert not inside & set(ran)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_d_variant_shortcut_on_triton(mode):
    """The avg-pool shortcut through the Triton kernels (the interpreter on a CPU): a resnet26d first block at an
    odd size, fp32, within twice timm's own fp32 error against timm in float64 (output, input and weight
    gradients, running statistics)."""
    from resnet_fused import backends
    from tolerances import assert_close_to_oracle

    device = "cuda" if torch.cuda.is_available() else "cpu"
    triton = backends.load("triton")
    reason = triton if isinstance(triton, str) else triton.unsupported(torch.empty(1, 1, 1, 1, device=device))
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")
    block = _create("resnet26d", **SMALL).layer2[0].train(mode == "train")
    x = torch.randn(2, block.conv1.in_channels, 7, 7, dtype=DTYPE)
    g = torch.randn(2, block.conv3.out_channels, 4, 4, dtype=DTYPE)
    results = []
    for dtype, fused in ((DTYPE, False), (torch.float32, False), (torch.float32, True)):
        m = copy.deepcopy(block).to(device, dtype)
        if fused:
            m = fused_copy(m, "triton")
        xi = x.detach().to(device, dtype).requires_grad_()
        y = m(xi)
        y.backward(g.to(device, dtype))
        out = {"output": y, "input grad": xi.grad, **{f"grad of {n}": p.grad for n, p in m.named_parameters()},
               **{n: b for n, b in m.named_buffers() if b.is_floating_point()}}
        results.append({k: v.detach().double().cpu() for k, v in out.items()})
    oracle, eager, actual = results
    for name, want in oracle.items():
        assert_close_to_oracle(actual[name], eager[name], want, torch.float32, what=name)


def test_timm_block_hooks_and_fx_as_timm():
    """A hook inside a fused timm block fires with timm's tensors (the block runs timm's forward while it is
    there), and fx feature extraction traces timm's computation."""
    from torchvision.models.feature_extraction import create_feature_extractor

    ref = _create("resnet50d", **SMALL).eval()
    fused = resnet_fused.fuse(copy.deepcopy(ref), backend="reference")
    x = torch.randn(2, 3, 32, 32, dtype=DTYPE)
    seen = {}
    for key, model in (("ref", ref), ("fused", fused)):
        handle = model.layer2[0].act2.register_forward_hook(lambda m, a, out, k=key: seen.setdefault(k, out.clone()))
        with torch.no_grad():
            model(x)
        handle.remove()
    _close(seen["fused"], seen["ref"], "hooked act2 output")
    nodes = {"layer2": "mid", "fc": "out"}
    feats_ref, feats = (create_feature_extractor(m, nodes)(x) for m in (ref, fused))
    for k in nodes.values():
        _close(feats[k], feats_ref[k], k)


UNFUSED_CASES = {
    # name: (create_model keyword arguments, the reason explain() gives, which of the 4 blocks run fused)
    "seresnet18": (SMALL, "se is a SEModule", [False] * 4),
    "resnetblur18": (SMALL, "aa is a BlurPool2d", [True, False, False, False]),  # anti-aliasing where stride 2
    "resnet18-silu": (dict(SMALL, act_layer=nn.SiLU), "activation act1 is a SiLU", [False] * 4),
    "resnet18-gn": (dict(SMALL, norm_layer=lambda c, **kw: nn.GroupNorm(4, c, **kw)), "norm layer is a GroupNorm",
                    [False] * 4),
}


@pytest.mark.parametrize("name", list(UNFUSED_CASES))
def test_other_timm_blocks_run_timms_forward(name):
    kwargs, reason, pattern = UNFUSED_CASES[name]
    ref = _create(name, **kwargs).eval()
    if any(pattern):
        fused = resnet_fused.fuse(copy.deepcopy(ref), backend="reference")
    else:
        with pytest.warns(UserWarning, match="can run fused"):
            fused = resnet_fused.fuse(copy.deepcopy(ref), backend="reference")
    rows = resnet_fused.explain(fused, show=False)
    assert [r.fused for r in rows] == pattern, rows
    assert all(reason in r.reason for r in rows if not r.fused), rows
    x = torch.randn(2, 3, 32, 32, dtype=DTYPE)
    with torch.no_grad():
        expected = ref(x)
        if any(pattern):
            _close(fused(x), expected, "output")
        else:
            assert torch.equal(fused(x), expected)  # timm's own forward, bit for bit


def test_drop_path_blocks_fuse_in_eval_only():
    """DropPath (stochastic depth) is random in training, the identity in eval: fused only in eval."""
    ref = _create("resnet18", **dict(SMALL, drop_path_rate=0.2))
    fused = resnet_fused.fuse(copy.deepcopy(ref).train(), backend="reference")
    rows = resnet_fused.explain(fused, show=False)
    assert [r.fused for r in rows] == [True, False, False, False]  # the first block's rate is 0: no DropPath
    assert all("drop_path is a DropPath in training mode" in r.reason for r in rows[1:])
    fused.eval()
    assert all(r.fused for r in resnet_fused.explain(fused, show=False))
    x = torch.randn(2, 3, 32, 32, dtype=DTYPE)
    with torch.no_grad():
        _close(fused(x), ref.eval()(x), "eval output")


def test_other_timm_families_are_left_alone():
    model = timm.create_model("regnetx_002", pretrained=False, num_classes=10).eval()
    classes = [type(m) for m in model.modules()]
    with pytest.warns(UserWarning, match="none of the .* ResNet blocks"):
        resnet_fused.fuse(model)
    assert [type(m) for m in model.modules()] == classes
    rows = resnet_fused.explain(model, show=False)
    assert rows and all(r.reason.startswith("not a torchvision or timm ResNet block") for r in rows)


def test_fused_timm_model_pickles():
    model = _fuse_strict(_create("resnet50d", **SMALL)).eval()
    buf = io.BytesIO()
    for m in model.modules():
        m.__dict__.pop("_eager_forward", None)
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded.layer1[0]).__name__ == "TimmBottleneck"
    x = torch.randn(1, 3, 32, 32, dtype=DTYPE)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_package_imports_and_fuses_without_timm():
    code = textwrap.dedent("""
        import sys
        sys.modules["timm"] = None  # any import of timm fails, as if it were not installed
        import torchvision
        import resnet_fused
        model = resnet_fused.fuse(torchvision.models.resnet18(), backend="reference")
        assert type(model.layer1[0]) is resnet_fused.BasicBlock
        assert "resnet_fused.timm_blocks" not in sys.modules
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
