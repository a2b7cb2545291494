"""The public blocks on the Triton backend in eval: exact against torchvision, and fused as promised.

Eval forward of a BasicBlock is 2 kernel launches and of a Bottleneck 3, downsample included; a whole
ResNet adds one launch for the stem. CPU runs use the Triton interpreter (TRITON_INTERPRET=1, set by
conftest.py), so shapes stay tiny.
"""

import copy

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tv

import resnet_fused
from resnet_fused import backends
from tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_triton = backends.load("triton")
_reason = _triton if isinstance(_triton, str) else _triton.unsupported(torch.empty(1, 1, 1, 1, device=DEVICE))
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"triton backend unavailable: {_reason}")


def _pair(kind, inplanes, planes, stride, downsample, groups=1, base_width=64):
    cls_ref, cls_fused = (tv.BasicBlock, resnet_fused.BasicBlock) if kind == "basic" else \
        (tv.Bottleneck, resnet_fused.Bottleneck)
    out = planes * cls_ref.expansion
    ds = nn.Sequential(tv.conv1x1(inplanes, out, stride), nn.BatchNorm2d(out)) if downsample else None
    ref = cls_ref(inplanes, planes, stride, ds, groups, base_width)
    with torch.no_grad():
        for bn in [m for m in ref.modules() if isinstance(m, nn.BatchNorm2d)]:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    fused = cls_fused(inplanes, planes, stride, copy.deepcopy(ds), groups, base_width, backend="triton")
    fused.load_state_dict(ref.state_dict())
    return ref.to(DEVICE).eval(), fused.to(DEVICE).eval()


CASES = [
    # kind, inplanes, planes, stride, downsample, launches
    ("basic", 8, 8, 1, False, 2),
    ("basic", 5, 8, 2, True, 2),
    ("bottleneck", 16, 4, 1, False, 3),
    ("bottleneck", 8, 4, 2, True, 3),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-s{c[3]}-ds{int(c[4])}")
def test_eval_block_matches_torchvision_in_fused_launches(case, channels_last):
    kind, inplanes, planes, stride, downsample, launches = case
    ref, fused = _pair(kind, inplanes, planes, stride, downsample)
    x = torch.randn(3, inplanes, 7, 7, device=DEVICE)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = ref(x)
        _triton.reset_launch_count()
        out = fused(x)
        assert _triton.launch_count() == launches
    assert_close(out, expected, torch.float32)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


def test_eval_gradients_through_triton_blocks():
    ref, fused = _pair("bottleneck", 8, 4, 2, True)
    x = torch.randn(2, 8, 7, 7, device=DEVICE)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(xr).square().sum().backward()
    fused(xf).square().sum().backward()
    assert_close(xf.grad, xr.grad, torch.float32, scale=10)
    for (name, a), b in zip(ref.named_parameters(), fused.parameters()):
        assert_close(b.grad, a.grad, torch.float32, scale=10, msg=name)


def _resnet_pair():
    """ResNet-18 with one BasicBlock per stage (the real widths; each block kind: identity and downsample), eval."""
    torch.manual_seed(0)
    ref = tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=4).to(DEVICE).eval()
    return ref, resnet_fused.fuse(copy.deepcopy(ref), backend="triton"), torch.randn(1, 3, 20, 20, device=DEVICE)


def test_resnet_eval_stem_and_blocks_on_triton():
    ref, fused, x = _resnet_pair()
    with torch.no_grad():
        expected = ref(x)
        _triton.reset_launch_count()
        out = fused(x)
    assert _triton.launch_count() == 1 + 4 * 2  # stem + four BasicBlocks of two launches
    assert_close(out, expected, torch.float32, scale=10)


def test_triton_fold_follows_weight_updates():
    ref, fused = _pair("basic", 5, 8, 2, True)
    for p in fused.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 5, 7, 7, device=DEVICE)
    with torch.no_grad():
        fused(x)
        fused.conv1.weight.mul_(-1.0)
        fused.downsample[1].running_mean.add_(0.3)
        ref.load_state_dict(fused.state_dict())
        assert_close(fused(x), ref(x), torch.float32)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_nan_input_propagates_like_torchvision(training):
    """A NaN must surface in the output as it does in torchvision, never be clipped away by a fused ReLU."""
    ref, fused = _pair("basic", 5, 8, 2, True)
    ref.train(training)
    fused.train(training)
    x = torch.randn(2, 5, 7, 7, device=DEVICE)
    x[0, 1, 3, 3] = float("nan")
    with torch.no_grad():
        expected, out = ref(x), fused(x)
    assert torch.equal(out.isnan(), expected.isnan())
    assert out.isnan().any()


def test_compile_fullgraph_over_triton_eval_model():
    """torch.compile traces the fused eval model (stem, blocks, head) with no graph break."""
    ref, fused, x = _resnet_pair()
    with torch.no_grad():
        assert_close(torch.compile(fused, fullgraph=True)(x), ref(x), torch.float32, scale=10)
