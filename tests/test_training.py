"""Training with the fused blocks matches torchvision, for every backend that can run here.

torchvision's modules are the oracle: the same weights (``load_state_dict``), the same inputs, the same SGD
steps; outputs, input gradients, every parameter gradient and the BatchNorm buffers must agree. Also: gradcheck
of the reference ops in float64, steps of a ResNet-18 training run each started from the float64 oracle's state
(teacher forcing), the activation memory the NormConv scheme saves, bf16 autocast, and SyncBatchNorm over two gloo
processes (tests/test_coverage_gaps.py adds three ranks, a subgroup with unequal counts and DDP; test_cuda_train.py
reuses this one through the extension's CPU kernels).
"""

import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision.models.resnet as tvr
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import resnet_fused
from resnet_fused import backends
from resnet_fused.backends import reference
from tolerances import assert_close_at_scale, assert_close_to_oracle, assert_oracle_errors, oracle_errors
from torchvision_oracle import forbid_eager_fallback, why_backend_cannot_run

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "triton", "cuda"]
# Gradients go through BN backward (two per-channel reductions) and up to three convolutions: compared with
# the table's tolerance scaled by this factor.
GRAD_SCALE = 4.0


def _check(actual, expected, dtype, factor=1.0, msg=None):
    """The tolerance table's bound for ``dtype`` scaled by ``factor``, its atol in units of ``expected``'s largest
    entry (gradients of a BN block reach 100s, where an absolute bound on entries near zero means nothing); rtol
    is not scaled by the magnitude, so a zero or doubled result fails."""
    assert_close_at_scale(actual, expected, dtype, factor, msg=msg)


def _skip_reason(backend: str, dtype: torch.dtype = torch.float32) -> str | None:
    return why_backend_cannot_run(backend, DEVICE, dtype)


@pytest.fixture(params=BACKENDS)
def backend(request):
    reason = _skip_reason(request.param)
    if reason is not None:
        pytest.skip(reason)
    return request.param


def _downsample(inplanes, outplanes, stride):
    return nn.Sequential(tvr.conv1x1(inplanes, outplanes, stride), nn.BatchNorm2d(outplanes))


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial BN affine parameters, and momentum=None (cumulative running averages)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.momentum = None


def _block_pair(kind, inplanes, planes, stride, downsample, backend, dtype):
    """(torchvision block, fused block) with identical weights and BN buffers."""
    tv_cls = getattr(tvr, kind)
    fused_cls = getattr(resnet_fused, kind)
    out = planes * tv_cls.expansion
    tv = tv_cls(inplanes, planes, stride, _downsample(inplanes, out, stride) if downsample else None)
    _randomize_bn(tv)
    fused = fused_cls(inplanes, planes, stride, _downsample(inplanes, out, stride) if downsample else None,
                      backend=backend)
    _randomize_bn(fused)
    fused.load_state_dict(tv.state_dict())
    return tv.to(DEVICE, dtype), fused.to(DEVICE, dtype)


def _compare_params_and_buffers(tv: nn.Module, fused: nn.Module, dtype) -> None:
    fused_params = dict(fused.named_parameters())
    for name, p in tv.named_parameters():
        _check(fused_params[name].grad, p.grad, dtype, GRAD_SCALE, msg=f"grad of {name}")
    fused_buffers = dict(fused.named_buffers())
    assert fused_buffers.keys() == dict(tv.named_buffers()).keys()
    for name, b in tv.named_buffers():
        if b.dtype == torch.long:
            assert torch.equal(fused_buffers[name], b), name
        else:
            _check(fused_buffers[name], b, dtype, msg=name)


def _train_steps(tv, fused, in_shape, dtype, memory_format, steps=3):
    """Runs identical SGD steps on both modules, comparing outputs, input grads and all parameter grads."""
    opt_tv = torch.optim.SGD(tv.parameters(), lr=0.01)
    opt_fused = torch.optim.SGD(fused.parameters(), lr=0.01)
    for step in range(steps):
        x = torch.randn(in_shape, device=DEVICE, dtype=dtype).to(memory_format=memory_format)
        x_tv, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_tv, y_fused = tv(x_tv), fused(x_fused)
        assert y_fused.dtype == y_tv.dtype
        grad_y = torch.randn_like(y_tv)
        for opt in (opt_tv, opt_fused):
            opt.zero_grad()
        (y_tv * grad_y).sum().backward()
        (y_fused * grad_y).sum().backward()
        _check(y_fused, y_tv, dtype, msg=f"output, step {step}")
        _check(x_fused.grad, x_tv.grad, dtype, GRAD_SCALE, msg=f"input grad, step {step}")
        _compare_params_and_buffers(tv, fused, dtype)
        opt_tv.step()
        opt_fused.step()
    fused_params = dict(fused.named_parameters())
    for name, p in tv.named_parameters():
        _check(fused_params[name], p, dtype, GRAD_SCALE, msg=f"{name} after {steps} steps")


BLOCKS = {
    "basic": ("BasicBlock", 5, 5, 1, False),
    "basic_down_s2": ("BasicBlock", 4, 6, 2, True),
    "basic_down_s1": ("BasicBlock", 3, 5, 1, True),
    "bottleneck": ("Bottleneck", 12, 3, 1, False),
    "bottleneck_down_s2": ("Bottleneck", 5, 3, 2, True),
}


@pytest.mark.parametrize("config", list(BLOCKS))
def test_block_training_matches_torchvision(backend, config):
    torch.manual_seed(0)
    kind, inplanes, planes, stride, downsample = BLOCKS[config]
    tv, fused = _block_pair(kind, inplanes, planes, stride, downsample, backend, torch.float32)
    _train_steps(tv, fused, (3, inplanes, 7, 7), torch.float32, torch.contiguous_format)


@pytest.mark.parametrize("config", ["basic_down_s2", "bottleneck"])
def test_block_training_channels_last(backend, config):
    torch.manual_seed(1)
    kind, inplanes, planes, stride, downsample = BLOCKS[config]
    tv, fused = _block_pair(kind, inplanes, planes, stride, downsample, backend, torch.float32)
    _train_steps(tv, fused, (2, inplanes, 9, 9), torch.float32, torch.channels_last)


@pytest.mark.parametrize("config", ["basic_down_s2", "bottleneck_down_s2"])
def test_block_training_float64_reference(config):
    torch.manual_seed(2)
    kind, inplanes, planes, stride, downsample = BLOCKS[config]
    tv, fused = _block_pair(kind, inplanes, planes, stride, downsample, "reference", torch.float64)
    _train_steps(tv, fused, (3, inplanes, 7, 7), torch.float64, torch.contiguous_format)


# ------------------------------------------------------------------------------------- gradcheck (float64)


def _f64(*shape, positive=False):
    t = torch.rand(*shape, dtype=torch.float64) + 0.5 if positive else torch.randn(*shape, dtype=torch.float64)
    return t.requires_grad_()


@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "bn_relu_prologue"])
@pytest.mark.parametrize("stride", [1, 2])
def test_gradcheck_reference_conv_stats(prologue, stride):
    torch.manual_seed(3)
    x, w = _f64(2, 2, 5, 5), _f64(3, 2, 3, 3)
    extra = (_f64(2, positive=True), _f64(2)) if prologue else ()

    def fn(x, w, *affine):
        s, t = affine if affine else (None, None)
        return reference.conv_stats(x, w, stride, 1, in_scale=s, in_shift=t)

    assert torch.autograd.gradcheck(fn, (x, w, *extra))


@pytest.mark.parametrize("dual", [False, True], ids=["identity", "downsample"])
def test_gradcheck_reference_scale_bias_add_relu(dual):
    torch.manual_seed(4)
    inputs = [_f64(2, 3, 4, 4), _f64(3, positive=True), _f64(3), _f64(2, 3, 4, 4)]
    if dual:
        inputs += [_f64(3, positive=True), _f64(3)]
    assert torch.autograd.gradcheck(reference.scale_bias_add_relu, tuple(inputs))


# ------------------------------------------------------------------------------------------ a training run


def _one_step(model: nn.Module, state: dict, x: torch.Tensor, labels: torch.Tensor, lr: float) -> dict:
    """One SGD step of ``model`` from ``state`` (loaded into it, in its own dtype) on ``(x, labels)``: the loss,
    and every state-dict entry's update (after minus before, in float64; integer buffers as they are after)."""
    model.load_state_dict(state)
    dtype = next(model.parameters()).dtype
    before = {name: t.detach().double().clone() for name, t in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss = F.cross_entropy(model(x.to(dtype)), labels)
    opt.zero_grad()
    loss.backward()
    opt.step()
    out = {"loss": loss.detach().double()}
    for name, t in model.state_dict().items():
        out[name] = t.double() - before[name] if t.is_floating_point() else t.clone()
    return out


def _check_step(fused: dict, eager: dict, oracle: dict, step: int) -> None:
    """The project's rule for one step's results, each update in units of the oracle's largest entry of it (an
    update is lr x a gradient: an absolute tolerance would dwarf it); counters exactly."""
    assert fused.keys() == oracle.keys()
    for name, want in oracle.items():
        what = f"step {step}: {'loss' if name == 'loss' else 'update of ' + name}"
        if not want.is_floating_point():
            assert torch.equal(fused[name], want), what
            continue
        if name == "loss":
            assert_close_to_oracle(fused[name], eager[name], want, torch.float32, what=what)
            continue
        err, eager_err, size = oracle_errors(fused[name], eager[name], want)
        unit = size if size > 0 else 1.0
        assert_oracle_errors(err / unit, eager_err / unit, size / unit, torch.float32, what=what)


# (blocks per stage, batch, input size, steps): ResNet-18 at 4x3x64x64 costs about a second per step on a CPU;
# the Triton interpreter takes the depth-reduced model (each block kind, real widths) for one step.
TRAIN_RUN = {"reference": ([2, 2, 2, 2], 4, 64, 4),
             "triton": ([2, 2, 2, 2], 4, 64, 4) if torch.cuda.is_available() else ([1, 1, 1, 1], 4, 32, 1)}
TRAIN_LR = 0.01


def test_training_steps_teacher_forced(backend):
    """Steps of an fp32 training run against torchvision in float64 (the oracle), each started from the oracle's
    own state: at every step the oracle's parameters and buffers are loaded into fp32 torchvision (eager) and the
    fp32 fused model, each takes one SGD step on the same batch, and the fused model's loss and updates of every
    parameter and running statistic are held to twice eager's distance from the oracle's plus the tolerance.
    Started from the oracle, a step's rounding cannot be amplified by the steps after it (a free-running fp32
    trajectory of a few steps at this size parts from the oracle's by far more than one step's rounding)."""
    layers, batch, size, steps = TRAIN_RUN[backend]
    torch.manual_seed(6)
    tv = tvr.ResNet(tvr.BasicBlock, layers, num_classes=10).to(DEVICE)
    fused = resnet_fused.ResNet(resnet_fused.BasicBlock, layers, num_classes=10, backend=backend).to(DEVICE)
    forbid_eager_fallback(fused)
    oracle = copy.deepcopy(tv).double()
    gen = torch.Generator().manual_seed(5)
    data = torch.randn(2, batch, 3, size, size, generator=gen).to(DEVICE)
    labels = torch.randint(0, 10, (2, batch), generator=gen).to(DEVICE)
    losses = []
    for step in range(steps):
        x, y = data[step % 2], labels[step % 2]
        state = copy.deepcopy(oracle.state_dict())
        want = _one_step(oracle, state, x.double(), y, TRAIN_LR)  # the oracle takes its step: the next state
        _check_step(_one_step(fused, state, x, y, TRAIN_LR), _one_step(tv, state, x, y, TRAIN_LR), want, step)
        losses.append(want["loss"].item())
    if steps > 2:
        assert losses[2] < losses[0], losses  # the states are those of a run that trains


# --------------------------------------------------------------------------------------- activation memory


def _saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(bytes of 4-D activations, bytes of per-channel vectors) that autograd saves for backward in one
    forward, counting each storage once and leaving out the parameters."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, tuple[int, int]] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = (t.dim(), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    acts = sum(n for dim, n in storages.values() if dim == 4)
    vectors = sum(n for dim, n in storages.values() if dim != 4)
    return acts, vectors


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_bn_relu_matches_pytorch_and_saves_only_its_input(backend, fmt):
    """The stem's BN+ReLU op: value and the gradients of x, scale and shift against autograd through PyTorch's
    own ops; autograd keeps x (alive anyway) and the two per-channel vectors, where PyTorch's ops keep more."""
    mod = backends.load(backend)
    torch.manual_seed(5)
    x = torch.randn(2, 8, 5, 5, device=DEVICE).contiguous(memory_format=fmt).requires_grad_()
    scale = (torch.rand(8, device=DEVICE) + 0.5).requires_grad_()
    shift = (torch.randn(8, device=DEVICE) * 0.5).requires_grad_()
    grad = torch.randn(2, 8, 5, 5, device=DEVICE)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = mod.bn_relu(x, scale, shift)
    want = torch.relu(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    _check(out, want, torch.float32)
    assert out.is_contiguous(memory_format=fmt)
    for got, exp in zip(torch.autograd.grad(out, (x, scale, shift), grad),
                        torch.autograd.grad(want, (x, scale, shift), grad)):
        _check(got, exp, torch.float32)
    assert sum(t.numel() for t in saved if t.dim() == 4) == x.numel()


@pytest.mark.parametrize("kind", ["BasicBlock", "Bottleneck"])
def test_saved_activation_memory(backend, kind):
    """Per block of a resnet layer, the NormConv blocks save x (the previous block's output) and the raw conv
    outputs only: 3 block-sized tensors for a BasicBlock where eager torchvision saves 4 (c1, relu(bn1(c1)),
    c2, out), for a Bottleneck c1, c2, c3 and the output where eager also keeps both inner activations."""
    torch.manual_seed(7)
    planes, hw, n = 8, 6, 2
    inplanes = planes * getattr(tvr, kind).expansion

    def layer(fused: bool, blocks: int) -> nn.Sequential:
        cls = getattr(resnet_fused, kind) if fused else getattr(tvr, kind)
        extra = {"backend": backend} if fused else {}
        return nn.Sequential(*[cls(inplanes, planes, **extra) for _ in range(blocks)]).to(DEVICE)

    x = torch.randn(n, inplanes, hw, hw, device=DEVICE, requires_grad=True)
    per_block = {}
    for fused in (False, True):
        two, vec_two = _saved_activation_bytes(layer(fused, 2), x)
        three, vec_three = _saved_activation_bytes(layer(fused, 3), x)
        per_block[fused] = three - two
        if fused:
            assert vec_three - vec_two <= 64 * inplanes * 4  # per-channel vectors only
    width_bytes = n * planes * hw * hw * 4  # one fp32 tensor of the inner width
    if kind == "BasicBlock":
        assert per_block[False] == 4 * width_bytes
        assert per_block[True] == 3 * width_bytes
    else:
        assert per_block[False] == (4 + 2 * 4) * width_bytes
        assert per_block[True] == (2 + 2 * 4) * width_bytes
    assert per_block[True] <= 0.84 * per_block[False]


# ----------------------------------------------------------------------------------------- bf16 autocast


def _amp_results(model, x, grad_y, amp: bool) -> dict[str, torch.Tensor]:
    """Output, input grad, parameter grads and float buffers after one forward/backward (bf16 autocast when
    ``amp``), all in float64 for comparison."""
    x = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        y = model(x)
    (y.to(grad_y.dtype) * grad_y).sum().backward()
    out = {"output": y, "input grad": x.grad}
    out.update({f"grad of {n}": p.grad for n, p in model.named_parameters()})
    out.update({n: b for n, b in model.named_buffers() if b.is_floating_point()})
    return {k: v.detach().double() for k, v in out.items()}


def _check_amp(fused, tv, x, grad_y):
    """bf16 autocast: every result of the fused model is as close to a float64 run of torchvision as
    torchvision's own bf16 autocast run is (within 2x, plus a tenth of the table's bf16 tolerance)."""
    truth = _amp_results(copy.deepcopy(tv).double(), x.double(), grad_y.double(), amp=False)
    eager = _amp_results(tv, x, grad_y, amp=True)
    actual = _amp_results(fused, x, grad_y, amp=True)
    for name, t in truth.items():
        assert_close_to_oracle(actual[name], eager[name], t, torch.bfloat16, name, tol_scale=0.1)


@pytest.mark.parametrize("config", ["basic_down_s2", "bottleneck"])
def test_autocast_bf16(backend, config, interpreter_rounds_bf16_to_nearest):
    reason = _skip_reason(backend, torch.bfloat16)
    if reason is not None:
        pytest.skip(reason)
    torch.manual_seed(8)
    kind, inplanes, planes, stride, downsample = BLOCKS[config]
    tv, fused = _block_pair(kind, inplanes, planes, stride, downsample, backend, torch.float32)
    x = torch.randn(3, inplanes, 7, 7, device=DEVICE)
    x_fused = x.clone().requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = fused(x_fused)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x_fused.grad.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 for p in fused.parameters())
    assert all(b.dtype == torch.float32 for b in fused.buffers() if b.is_floating_point())
    fused.zero_grad()
    fused.load_state_dict(tv.state_dict())
    _check_amp(fused, tv, x, torch.randn(y.shape, device=DEVICE))


# ------------------------------------------------------------------------------------- SyncBN, 2 processes

WORLD = 2


def _sync_bn_worker(rank: int, init_file: str, backend: str, result_dir: str) -> None:
    """One rank: the fused, SyncBN-converted model on its half of the global batch."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(9)
        model = _sync_bn_models(backend)[1]
        x, grad_y = _sync_bn_batch()
        half = slice(rank * x.shape[0] // WORLD, (rank + 1) * x.shape[0] // WORLD)
        x_local = x[half].clone().requires_grad_()
        y = model(x_local)
        (y * grad_y[half]).sum().backward()
        grads = {}
        for name, p in model.named_parameters():
            dist.all_reduce(p.grad)  # the gradient of the global-batch loss, as DDP sums it (then averages)
            grads[name] = p.grad
        torch.save({"y": y.detach(), "x_grad": x_local.grad, "grads": grads,
                    "buffers": dict(model.named_buffers())}, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _sync_bn_models(backend: str):
    """(torchvision BasicBlock with a downsample, the same block fused and converted to SyncBatchNorm)."""
    tv = tvr.BasicBlock(4, 6, 2, _downsample(4, 6, 2))
    _randomize_bn(tv)
    fused = resnet_fused.BasicBlock(4, 6, 2, _downsample(4, 6, 2), backend=backend)
    _randomize_bn(fused)
    fused.load_state_dict(tv.state_dict())
    fused = resnet_fused.convert_sync_batchnorm(fused)
    assert all(m.momentum is None for m in fused.modules() if isinstance(m, _BatchNorm))
    return tv, fused


def _sync_bn_batch():
    gen = torch.Generator().manual_seed(10)
    return torch.randn(6, 4, 7, 7, generator=gen), torch.randn(6, 6, 4, 4, generator=gen)


def test_sync_batchnorm_two_processes(backend):
    """SyncBN over 2 gloo ranks, each with half the batch, equals plain BN on the whole batch.

    torchvision's ``nn.SyncBatchNorm`` refuses CPU tensors, so the oracle is what it computes: eager
    torchvision with BatchNorm2d over the global batch (outputs and input grads per half, parameter grads
    summed over ranks, running statistics from the global batch)."""
    reason = why_backend_cannot_run(backend, "cpu")
    if reason is not None:
        pytest.skip(f"gloo runs CPU tensors: {reason}")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_sync_bn_worker, args=(os.path.join(tmp, "init"), backend, tmp), nprocs=WORLD, join=True)
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    torch.manual_seed(9)
    tv, fused = _sync_bn_models(backend)
    assert isinstance(fused.bn1, nn.SyncBatchNorm) and isinstance(fused.downsample[1], nn.SyncBatchNorm)
    x, grad_y = _sync_bn_batch()
    x = x.requires_grad_()
    y = tv(x)
    (y * grad_y).sum().backward()
    dtype = torch.float32
    _check(torch.cat([r["y"] for r in results]), y, dtype)
    _check(torch.cat([r["x_grad"] for r in results]), x.grad, dtype, GRAD_SCALE)
    for name, p in tv.named_parameters():
        for r in results:
            _check(r["grads"][name], p.grad, dtype, GRAD_SCALE, msg=name)
    for name, b in tv.named_buffers():
        for r in results:
            if b.dtype == torch.long:
                assert torch.equal(r["buffers"][name], b), name
            else:
                _check(r["buffers"][name], b, dtype, msg=name)


# ---------------------------------------------------------------------------------------------- GPU only

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("config", [("BasicBlock", 64, 64, 1, False), ("BasicBlock", 64, 128, 2, True),
                                    ("Bottleneck", 256, 64, 1, False), ("Bottleneck", 256, 128, 2, True)],
                         ids=["basic64", "basic64to128_s2", "bottleneck256", "bottleneck256to512_s2"])
@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
@pytest.mark.gpu
@requires_cuda
def test_gpu_amp_block_real_shapes(backend_name, config):
    reason = _skip_reason(backend_name, torch.bfloat16)
    if reason is not None:
        pytest.skip(reason)
    torch.manual_seed(11)
    kind, inplanes, planes, stride, downsample = config
    tv, fused = _block_pair(kind, inplanes, planes, stride, downsample, backend_name, torch.float32)
    tv, fused = tv.to(memory_format=torch.channels_last), fused.to(memory_format=torch.channels_last)
    x = torch.randn(32, inplanes, 56, 56, device=DEVICE).to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = fused(x)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    fused.load_state_dict(tv.state_dict())  # undo this forward's running-statistics update
    _check_amp(fused, tv, x, torch.randn(y.shape, device=DEVICE))


AMP_STEPS, AMP_WINDOW = 200, 20


def _amp_loss_curve(model: nn.Module, dtype: torch.dtype | None) -> torch.Tensor:
    """Per-step losses of 200 SGD steps (momentum 0.9) on a fixed pool of 8 synthetic batches the model can fit,
    under autocast to ``dtype`` (None: no autocast, the model's own dtype)."""
    param_dtype = next(model.parameters()).dtype
    gen = torch.Generator(device="cuda").manual_seed(13)
    data = [torch.randn(64, 3, 64, 64, device="cuda", generator=gen).to(param_dtype)
            .contiguous(memory_format=torch.channels_last) for _ in range(8)]
    labels = torch.randint(0, 10, (8, 64), device="cuda", generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(AMP_STEPS):
        with torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = F.cross_entropy(model(data[step % 8]).to(param_dtype), labels[step % 8])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses).double().cpu()


@pytest.fixture(scope="module")
def resnet18_reference_curves():
    """(initial state, torchvision's fp64 loss curve — the oracle —, eager torchvision's bf16-autocast curve —
    the measure of normal bf16 drift), computed once for both backends."""
    torch.manual_seed(12)
    tv = tvr.resnet18(num_classes=10).cuda().to(memory_format=torch.channels_last)
    state = copy.deepcopy(tv.state_dict())
    oracle = _amp_loss_curve(copy.deepcopy(tv).double(), None)
    eager = _amp_loss_curve(tv, torch.bfloat16)
    return state, oracle, eager


@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
@pytest.mark.gpu
@requires_cuda
def test_gpu_resnet18_200_steps(backend_name, resnet18_reference_curves):
    """200 bf16-autocast SGD steps of ResNet-18: the fused run's loss curve against torchvision's fp64 curve.

    bf16 rounding makes any bf16 run drift away from the fp64 trajectory step by step; eager torchvision's own
    bf16 run measures how far that normal drift goes. Over 20-step windows, the fused curve's mean distance from
    the oracle may be at most twice eager's (plus a small slack), and the loss must fall as the oracle's does."""
    reason = _skip_reason(backend_name, torch.bfloat16)
    if reason is not None:
        pytest.skip(reason)
    state, oracle, eager = resnet18_reference_curves
    fused = resnet_fused.resnet18(num_classes=10, backend=backend_name).cuda().to(memory_format=torch.channels_last)
    fused.load_state_dict(state)
    curve = _amp_loss_curve(fused, torch.bfloat16)
    assert torch.isfinite(curve).all()
    assert oracle[-AMP_WINDOW:].mean() < 0.5 * oracle[:8].mean()  # a run that trains
    assert curve[-AMP_WINDOW:].mean() < 0.5 * curve[:8].mean()

    def windows(c):
        return c.unfold(0, AMP_WINDOW, AMP_WINDOW).mean(1)

    fused_drift = (windows(curve) - windows(oracle)).abs()
    eager_drift = (windows(eager) - windows(oracle)).abs()
    assert fused_drift.mean() <= 2 * eager_drift.mean() + 0.02, (fused_drift, eager_drift)
    assert fused_drift[0] <= 2 * eager_drift[0] + 0.02, (fused_drift, eager_drift)  # before chaos takes over
