"""explain(): per block, whether it runs fused, on which backend, and why not; fuse()'s warning when nothing can
run fused; blocks the fused path does not cover run their own forward (checked against torchvision); the
constructors reject a Weights enum of another model before anything is downloaded."""

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv

import resnet_fused
from resnet_fused import BlockReport
from tolerances import assert_close


def _tiny_resnet(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=4, **kwargs)


def test_explain_before_and_after_fuse(capsys):
    model = _tiny_resnet()
    rows = resnet_fused.explain(model)
    assert [r.path for r in rows] == ["conv1", "layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert rows[1] == BlockReport("layer1.0", "torchvision.models.resnet.BasicBlock", False, None,
                                  "not converted: resnet_fused.fuse(model) converts it")
    printed = capsys.readouterr().out
    assert "0 of 5 blocks fused" in printed and "layer4.0" in printed and "not converted" in printed

    resnet_fused.fuse(model, verbose=True)
    printed = capsys.readouterr().out
    assert "5 of 5 blocks fused" in printed
    rows = resnet_fused.explain(model, show=False)
    assert rows[0].cls == "resnet_fused.ResNet (stem conv1/bn1/relu)"
    assert all(r.fused and r.backend == "reference" and r.reason is None for r in rows)
    assert capsys.readouterr().out == ""  # show=False prints nothing


def test_explain_names_the_backend_that_cannot_run_a_dtype():
    model = resnet_fused.fuse(_tiny_resnet(), backend="triton")
    rows = resnet_fused.explain(model, dtype=torch.float64, show=False)
    assert rows and all(not r.fused and r.backend is None for r in rows)
    assert "backend 'triton' cannot run this input" in rows[1].reason and "float64" in rows[1].reason
    rows = resnet_fused.explain(resnet_fused.fuse(model, backend="auto"), dtype=torch.float64, show=False)
    assert all(r.fused and r.backend == "reference" for r in rows)


def test_fuse_warns_once_when_nothing_can_run_fused(capsys):
    with pytest.warns(UserWarning) as record:
        resnet_fused.fuse(torchvision.models.vgg11(num_classes=4))
    assert len(record) == 1 and "VGG has no torchvision or timm ResNet block" in str(record[0].message)
    assert resnet_fused.explain(torchvision.models.vgg11(num_classes=4)) == []
    assert "no ResNet block found" in capsys.readouterr().out

    model = _tiny_resnet(norm_layer=lambda c: nn.GroupNorm(2, c))
    with pytest.warns(UserWarning) as record:
        resnet_fused.fuse(model)
    assert len(record) == 1 and "none of the 5 ResNet blocks" in str(record[0].message)
    assert "norm layer is a GroupNorm" in str(record[0].message)


class _BatchNormReLU(nn.BatchNorm2d):
    """A norm layer with an activation inside, as timm's BatchNormAct2d: a BatchNorm2d subclass whose forward
    differs, so the fused path must not take it for a BatchNorm."""

    def forward(self, x):
        return torch.relu(super().forward(x))


class _OwnBlock(tv.BasicBlock):
    pass


@pytest.mark.parametrize("case", ["silu", "bn-subclass", "conv-bias", "block-subclass"])
def test_uncovered_blocks_run_their_own_forward(case):
    torch.manual_seed(0)
    if case == "bn-subclass":
        ref = tv.BasicBlock(8, 8, norm_layer=_BatchNormReLU)
        reason = "conv1/bn1: norm layer is a _BatchNormReLU"
    elif case == "block-subclass":
        ref = _OwnBlock(8, 8)
        reason = "a subclass of torchvision.models.resnet.BasicBlock: fuse() leaves it"
    else:
        ref = tv.BasicBlock(8, 8)
        if case == "silu":
            ref.relu = nn.SiLU()
            reason = "activation relu is a SiLU, not an nn.ReLU"
        else:
            ref.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=True)
            reason = "conv2/bn2: convolution has a bias"
    ref.eval()
    with pytest.warns(UserWarning, match="can run fused|no torchvision or timm ResNet block"):
        fused = resnet_fused.fuse(copy.deepcopy(ref), backend="reference")
    [row] = resnet_fused.explain(fused, show=False)
    assert not row.fused and row.reason.startswith(reason), row
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        assert_close(fused(x), ref(x))


def test_weights_of_another_model_raise_before_any_download(monkeypatch):
    def no_download(self, *args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torchvision.models.ResNet50_Weights, "get_state_dict", no_download)
    built = []
    monkeypatch.setattr(resnet_fused.models.ResNet, "__init__",
                        lambda self, *a, **k: built.append(1) or nn.Module.__init__(self))
    with pytest.raises(TypeError, match="expected ResNet18_Weights but received ResNet50_Weights"):
        resnet_fused.resnet18(weights=torchvision.models.ResNet50_Weights.IMAGENET1K_V1)
    with pytest.raises(TypeError, match="expected Wide_ResNet50_2_Weights"):
        resnet_fused.wide_resnet50_2(weights=torchvision.models.ResNet50_Weights.IMAGENET1K_V2)
    assert not built
