"""The public API against torchvision itself: constructors, blocks, fuse(), state dicts, bad input.

Everything here runs the reference backend on the CPU; the Triton and CUDA backends have their own tests, and
tests/test_device_blocks.py runs blocks, models and torch.compile on each backend of a GPU. The ten constructors
are checked structurally on the meta device (no memory, no init cost); their numerics on depth-reduced models
(one block per stage) with each constructor's block type, groups and width. Results are held to the project's
rule (tolerances.py): error against torchvision in float64 at most twice torchvision's own float32 error.
"""

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv

import resnet_fused
from resnet_fused import backends
from tolerances import assert_close, assert_close_at_scale, assert_close_to_oracle
from torchvision_oracle import check_against_torchvision

CONSTRUCTORS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]
FUSED_CLASSES = {tv.BasicBlock: resnet_fused.BasicBlock, tv.Bottleneck: resnet_fused.Bottleneck,
                 tv.ResNet: resnet_fused.ResNet}


def _step(model, x, opt):
    opt.zero_grad(set_to_none=True)
    out = model(x)
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    opt.step()
    return out


def _assert_models_match(ref, fused, dtype, factor=1.0):
    """Parameters, their gradients and buffers agree, element by element with the table's tolerance (atol in units
    of each tensor's largest entry: gradients of deep models reach 1e3 and more)."""
    def close(b, a, msg):
        assert_close_at_scale(b, a, dtype, factor, msg=msg)

    for (name, a), b in zip(ref.named_parameters(), fused.parameters()):
        close(b, a, name)
        if a.grad is not None:
            close(b.grad, a.grad, f"grad of {name}")
    for (name, a), b in zip(ref.named_buffers(), fused.buffers()):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(a, b), name
        else:
            close(b, a, name)


def _config(m: nn.Module) -> tuple:
    """What defines a module's computation, beyond its parameters' shapes."""
    if isinstance(m, nn.Conv2d):
        return (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                m.bias is None, m.padding_mode)
    if isinstance(m, nn.BatchNorm2d):
        return m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats
    if isinstance(m, (tv.BasicBlock, tv.Bottleneck, resnet_fused.BasicBlock, resnet_fused.Bottleneck)):
        return (m.stride,)
    if isinstance(m, (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Linear, nn.ReLU)):
        return tuple(sorted((k, str(v)) for k, v in vars(m).items() if not k.startswith("_") and k != "training"))
    return ()


@pytest.mark.parametrize("name", CONSTRUCTORS)
def test_constructor_structure_matches_torchvision(name):
    """On the meta device: the same module tree (torchvision's block and model classes replaced by the fused
    ones, every other module the same class), every convolution, BatchNorm, pooling and fc configured the same,
    and the same state_dict keys, shapes and dtypes."""
    with torch.device("meta"):
        ref = getattr(torchvision.models, name)(num_classes=10)
        fused = getattr(resnet_fused, name)(num_classes=10, backend="reference")
    ref_modules, fused_modules = dict(ref.named_modules()), dict(fused.named_modules())
    assert list(ref_modules) == list(fused_modules)
    for path, m in ref_modules.items():
        f = fused_modules[path]
        assert type(f) is FUSED_CLASSES.get(type(m), type(m)), path
        assert _config(f) == _config(m), path
        if isinstance(f, resnet_fused.models._Fused):
            assert f.backend == "reference", path
    ref_state, fused_state = ref.state_dict(), fused.state_dict()
    assert list(ref_state) == list(fused_state)
    for key, value in ref_state.items():
        assert (fused_state[key].shape, fused_state[key].dtype) == (value.shape, value.dtype), key


# One depth-reduced model per (block, groups, width per group) of the ten constructors.
REDUCED = {
    "resnet18-34": (tv.BasicBlock, 1, 64),
    "resnet50-101-152": (tv.Bottleneck, 1, 64),
    "resnext50_32x4d": (tv.Bottleneck, 32, 4),
    "resnext101_32x8d": (tv.Bottleneck, 32, 8),
    "resnext101_64x4d": (tv.Bottleneck, 64, 4),
    "wide_resnet50-101_2": (tv.Bottleneck, 1, 128),
}


@pytest.mark.parametrize("config", list(REDUCED))
def test_reduced_model_matches_torchvision(config):
    """``resnet_fused.ResNet`` with one block per stage and the constructors' block, groups and width: the same
    initial weights as torchvision's from the same seed, then one training step (output, every parameter gradient,
    running statistics) and an eval forward against torchvision in float64. layer4's BatchNorms see 8
    values per channel (over 2, x̂ = ±1 and the gradient through the variance is ill-conditioned, in torchvision
    as much as here)."""
    block, groups, width = REDUCED[config]
    kwargs = dict(num_classes=10, groups=groups, width_per_group=width)
    torch.manual_seed(0)
    ref = tv.ResNet(block, [1, 1, 1, 1], **kwargs)
    torch.manual_seed(0)
    fused = resnet_fused.ResNet(FUSED_CLASSES[block], [1, 1, 1, 1], backend="reference", **kwargs)
    state = ref.state_dict()
    assert list(state) == list(fused.state_dict())
    for key, value in state.items():
        assert torch.equal(value, fused.state_dict()[key]), key
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    check_against_torchvision(ref.train(), copy.deepcopy(fused).train(), x, "fp32", "cpu", input_grad=False)
    check_against_torchvision(ref.eval(), fused.eval(), x, "fp32", "cpu", backward=False)


def _block_pair(kind, inplanes, planes, stride, downsample, dtype, groups=1, base_width=64, dilation=1,
                momentum=0.1):
    def norm(c):
        return nn.BatchNorm2d(c, momentum=momentum)

    cls_ref, cls_fused = (tv.BasicBlock, resnet_fused.BasicBlock) if kind == "basic" else \
        (tv.Bottleneck, resnet_fused.Bottleneck)
    out = planes * cls_ref.expansion
    ds = nn.Sequential(tv.conv1x1(inplanes, out, stride), norm(out)) if downsample else None
    ref = cls_ref(inplanes, planes, stride, ds, groups, base_width, dilation, norm)
    fused = cls_fused(inplanes, planes, stride, copy.deepcopy(ds), groups, base_width, dilation, norm,
                      backend="reference")
    fused.load_state_dict(ref.state_dict())
    with torch.no_grad():  # non-trivial BN parameters and running statistics
        for bn in [m for m in ref.modules() if isinstance(m, nn.BatchNorm2d)]:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    fused.load_state_dict(ref.state_dict())
    return ref.to(dtype), fused.to(dtype)


BLOCK_CASES = [
    # kind, inplanes, planes, stride, downsample, extra kwargs
    ("basic", 8, 8, 1, False, {}),
    ("basic", 8, 16, 2, True, {}),
    ("basic", 24, 24, 1, False, {}),
    ("bottleneck", 16, 4, 1, False, {}),
    ("bottleneck", 8, 4, 2, True, {}),
    ("bottleneck", 24, 6, 1, True, {"groups": 2, "base_width": 32}),
    ("bottleneck", 16, 4, 1, False, {"dilation": 2}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-s{c[3]}-ds{int(c[4])}-{c[5]}")
@pytest.mark.parametrize("momentum", [0.1, None])
def test_block_train_and_eval_match_torchvision(case, dtype, memory_format, momentum):
    """Outputs, input and parameter gradients and running statistics over 3 SGD steps, then eval.

    Each result is compared with torchvision run in float64 (the oracle): the fused block's error may be at
    most twice torchvision's own error in ``dtype``, plus the dtype's tolerance.
    """
    kind, inplanes, planes, stride, downsample, extra = case
    oracle, fused64 = _block_pair(kind, inplanes, planes, stride, downsample, torch.float64, momentum=momentum,
                                  **extra)
    ref, fused = copy.deepcopy(oracle).to(dtype), copy.deepcopy(fused64).to(dtype)
    models = (oracle, ref, fused)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    x = torch.randn(3, inplanes, 11, 11, dtype=torch.float64).to(memory_format=memory_format)

    def run(step):
        xs = [x.to(m.conv1.weight.dtype, copy=True).requires_grad_() for m in models]
        if step:
            outs = [_step(m, xi, o) for m, xi, o in zip(models, xs, opts)]
        else:
            outs = [m(xi) for m, xi in zip(models, xs)]
            for out in outs:
                out.sum().backward()
        assert outs[2].is_contiguous(memory_format=memory_format)
        _assert_within_twice_torchvision_error(outs, dtype, "output")
        _assert_within_twice_torchvision_error([xi.grad for xi in xs], dtype, "input grad")
        for name, *params in zip(*[[n for n, _ in oracle.named_parameters()]] + [list(m.parameters()) for m in models]):
            _assert_within_twice_torchvision_error([p.grad for p in params], dtype, f"grad of {name}")
        for name, *bufs in zip(*[[n for n, _ in oracle.named_buffers()]] + [list(m.buffers()) for m in models]):
            _assert_within_twice_torchvision_error(bufs, dtype, name)

    for _ in range(3):
        run(step=True)
    for m in models:
        m.eval()
    run(step=False)


def _assert_within_twice_torchvision_error(triple, dtype, what):
    oracle, ref, fused = triple
    assert_close_to_oracle(fused, ref, oracle, dtype, what)


def test_mixed_bn_modes_use_running_stats_where_frozen():
    ref, fused = _block_pair("bottleneck", 8, 4, 2, True, torch.float64)
    for m in (ref, fused):
        m.train()
        m.bn2.eval()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    out_ref, out_fused = ref(x), fused(x)
    assert_close(out_fused, out_ref)
    out_ref.sum().backward()
    out_fused.sum().backward()
    _assert_models_match(ref, fused, torch.float64, factor=10.0)


def test_custom_norm_layer_and_downsample_follow_torchvision():
    torch.manual_seed(0)
    ds = nn.Sequential(nn.AvgPool2d(2), tv.conv1x1(8, 16), nn.BatchNorm2d(16))
    ref = tv.BasicBlock(8, 16, 2, ds)
    fused = resnet_fused.BasicBlock(8, 16, 2, copy.deepcopy(ds), backend="reference")
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 10, 10)
    assert_close(fused(x), ref(x))
    gn_ref = tv.BasicBlock(8, 8, norm_layer=lambda c: nn.GroupNorm(2, c))
    gn_fused = resnet_fused.BasicBlock(8, 8, norm_layer=lambda c: nn.GroupNorm(2, c), backend="reference")
    gn_fused.load_state_dict(gn_ref.state_dict())
    assert_close(gn_fused(x), gn_ref(x))


@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d"])
def test_fuse_torchvision_model_in_place(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    ref = copy.deepcopy(model)
    params_before = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    assert resnet_fused.fuse(model, backend="reference") is model
    assert type(model) is resnet_fused.ResNet
    assert all(type(m) is resnet_fused.Bottleneck for m in model.layer1)
    assert all(a is b for a, b in zip(model.parameters(), params_before))
    x = torch.randn(2, 3, 64, 64)
    ref.eval()
    model.eval()
    with torch.no_grad():
        assert_close(model(x), ref(x))
    model.train()
    first = model.layer1[0].conv1.weight
    before = first.detach().clone()
    opt.zero_grad()
    model(x).mean().backward()
    opt.step()
    assert not torch.equal(before, first)  # the optimizer built before fuse() trained the fused model
    # state_dict round trips both ways
    fresh_tv = getattr(torchvision.models, name)(num_classes=10)
    fresh_tv.load_state_dict(model.state_dict())
    fresh_fused = getattr(resnet_fused, name)(num_classes=10, backend="reference")
    fresh_fused.load_state_dict(fresh_tv.state_dict())
    for m in (model, fresh_tv, fresh_fused):
        m.eval()
    with torch.no_grad():
        out = model(x)
        assert_close(fresh_tv(x), out)
        assert_close(fresh_fused(x), out)


def test_fuse_single_block_and_rejects_unknown_backend():
    block = tv.BasicBlock(4, 4)
    assert resnet_fused.fuse(block, backend="reference") is block
    assert type(block) is resnet_fused.BasicBlock and block.backend == "reference"
    with pytest.raises(ValueError, match="unknown backend"):
        resnet_fused.fuse(block, backend="fastest")
    with pytest.raises(ValueError, match="unknown backend"):
        resnet_fused.resnet18(backend="nope")


def test_weights_enum_loads_its_state_dict(monkeypatch):
    torch.manual_seed(1)
    source = torchvision.models.resnet18()
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    monkeypatch.setattr(type(weights), "get_state_dict", lambda self, *a, **k: source.state_dict())
    for w in (weights, "IMAGENET1K_V1", "DEFAULT"):
        model = resnet_fused.resnet18(weights=w, backend="reference")
        assert model.fc.out_features == 1000
        for key, value in source.state_dict().items():
            assert torch.equal(model.state_dict()[key], value)
    with pytest.raises(ValueError, match="num_classes"):
        resnet_fused.resnet18(weights=weights, num_classes=10)
    with pytest.raises(TypeError, match="weights must be"):
        resnet_fused.resnet18(weights=123)


def test_eval_sees_every_weight_update():
    _, block = _block_pair("bottleneck", 8, 4, 2, True, torch.float32)
    block.eval()
    for p in block.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 8, 9, 9)

    def expected():
        ref = tv.Bottleneck(8, 4, 2, nn.Sequential(tv.conv1x1(8, 16, 2), nn.BatchNorm2d(16))).eval()
        ref.load_state_dict(block.state_dict())
        return ref.to(x.dtype)(x)

    with torch.no_grad():
        out0 = block(x)
        assert_close(block(x), out0)
        block.conv2.weight.mul_(1.5)  # an in-place update, as an optimizer step makes
        assert_close(block(x), expected())
        block.bn3.running_var.add_(0.5)
        assert_close(block(x), expected())
        state = {k: v.clone() for k, v in block.state_dict().items()}
        state["downsample.1.bias"].add_(1.0)
        block.load_state_dict(state)
        assert_close(block(x), expected())
        block.double()
        x = x.double()
        assert_close(block(x), expected())


def test_eval_under_inference_mode_then_with_autograd():
    ref, fused = _block_pair("basic", 8, 16, 2, True, torch.float32)
    for m in (ref, fused):
        m.eval().requires_grad_(False)
    x = torch.randn(2, 8, 9, 9)
    with torch.inference_mode():
        fused(x)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(xr).sum().backward()
    fused(xf).sum().backward()  # input gradients with frozen weights, as adversarial attacks take them
    assert_close(xf.grad, xr.grad)


def test_eval_gradients_reach_every_weight():
    ref, fused = _block_pair("basic", 8, 16, 2, True, torch.float64)
    ref.eval()
    fused.eval()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    ref(x).square().sum().backward()
    fused(x).square().sum().backward()
    _assert_models_match(ref, fused, torch.float64, factor=10.0)


# ---------------------------------------------------------------------------------------------------------
# Bad input: the error class PyTorch raises, never a crash or a silent wrong answer
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def block():
    torch.manual_seed(0)
    return resnet_fused.BasicBlock(4, 4, backend="reference")


def test_wrong_rank(block):
    with pytest.raises(ValueError, match="expected 4D input"):
        block(torch.randn(4, 5, 5))


def test_wrong_channel_count(block):
    with pytest.raises(RuntimeError, match="to have 4 channels, but got 3"):
        block(torch.randn(2, 3, 5, 5))


def test_dtype_mismatch_and_integer_input(block):
    with pytest.raises(RuntimeError, match="should be the same"):
        block(torch.randn(2, 4, 5, 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="floating-point"):
        block(torch.ones(2, 4, 5, 5, dtype=torch.int64))


def test_mixed_devices(block):
    with pytest.raises(RuntimeError, match="same device"):
        block(torch.randn(2, 4, 5, 5, device="meta"))


@pytest.mark.parametrize("training", [False, True])
def test_empty_batch_matches_torchvision(block, training):
    ref = tv.BasicBlock(4, 4)
    ref.load_state_dict(block.state_dict())
    ref.train(training)
    block.train(training)
    x = torch.randn(0, 4, 5, 5)
    assert block(x).shape == ref(x).shape == (0, 4, 5, 5)
    for a, b in zip(ref.buffers(), block.buffers()):
        assert torch.equal(a, b)


def test_single_value_per_channel_in_training(block):
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        block(torch.randn(1, 4, 1, 1))
    out = block(torch.randn(1, 4, 3, 3))  # N=1 is fine when the spatial size gives more values
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------------------
# Backend registry
# ---------------------------------------------------------------------------------------------------------

def test_available_backends_and_forced_errors(monkeypatch):
    names = resnet_fused.available_backends()
    assert "reference" in names
    x = torch.randn(1, 4, 3, 3)
    assert backends.resolve("auto", x) is backends.reference
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
            backends.resolve("cuda", x)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            backends.resolve("triton", x)
