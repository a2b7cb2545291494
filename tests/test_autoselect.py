"""``auto``: every candidate raced and checked per block (resnet_fused.dispatch), on the CPU.

The candidates here are ``reference``, ``eager`` and a test backend standing in for a GPU one: the reference ops
with a wrong output, gradient or running statistics, or a slow one. Timing uses a fake clock that each candidate
advances by its cost, so the race is decided by the code under test, not by this machine's load.
"""

import copy
import json
import subprocess
import sys
import types

import pytest
import torch
import torchvision.models.resnet as tv
from torch import nn

import resnet_fused
from resnet_fused import backends, dispatch, models
from resnet_fused.backends import autoselect, reference

from tolerances import assert_close


class FakeClock:
    """``time.perf_counter`` for dispatch: advances by what the candidates report, plus a tick per call."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 1e-6
        return self.now


class _Scale(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient (a wrong backward)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def make_backend(clock, cost=0.0, output=1.0, grad=1.0, stats=1.0):
    """A backend module that runs the reference ops, costs ``cost`` fake seconds per op, and scales its output,
    its input gradient or its running-variance update by the given factors (1.0: correct)."""

    def spend():
        clock.now += cost

    def conv_bn_act(*args, **kwargs):
        spend()
        return reference.conv_bn_act(*args, **kwargs) * output

    def conv_stats(*args, **kwargs):
        spend()
        c, mean, var = reference.conv_stats(*args, **kwargs)
        return c * output, mean, var

    def scale_bias_add_relu(*args):
        spend()
        return _Scale.apply(reference.scale_bias_add_relu(*args), grad)

    def bn_relu(*args):
        spend()
        return reference.bn_relu(*args)

    def finalize(mean, var, gamma, beta, running_mean, running_var, count, factor, eps):
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - factor).add_(mean * factor)
                running_var.mul_(1 - factor).add_(var * (count / (count - 1)) * factor * stats)
        scale = torch.rsqrt(var + eps) * (1 if gamma is None else gamma)
        shift = -mean * scale
        return scale, shift if beta is None else shift + beta

    return types.SimpleNamespace(NAME="triton", unsupported=lambda x, g=1, d=1: None, conv_bn_act=conv_bn_act,
                                 conv_stats=conv_stats, scale_bias_add_relu=scale_bias_add_relu, bn_relu=bn_relu,
                                 finalize=finalize)


@pytest.fixture
def race(tmp_path, monkeypatch):
    """An empty cache folder, a fake clock, and ``install(backend)``: that backend becomes candidate "triton"."""
    monkeypatch.setenv(dispatch.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(dispatch.ENV_FORCE, raising=False)
    monkeypatch.delenv(dispatch.ENV_ENGINE, raising=False)
    monkeypatch.delenv(dispatch.ENV_DETERMINISTIC, raising=False)
    clock = FakeClock()
    monkeypatch.setattr(dispatch, "time", clock)
    dispatch.clear_memory()
    dispatch._candidate_memo.clear()

    def install(backend):
        monkeypatch.setitem(backends._modules, "triton", backend)
        monkeypatch.setattr(dispatch, "_candidates", lambda device, dtype, groups, dilation: (
            ("reference", ""), ("triton", ""), ("eager", "")))

    # eager costs 0.5 fake seconds a call: a correct candidate of cost 0 beats it, the reference ops of cost 1 lose
    eager_forward = models.BasicBlock._eager_forward

    def costly_eager(self, x):
        clock.now += 0.5
        return eager_forward(self, x)

    monkeypatch.setattr(models.BasicBlock, "_eager_forward", costly_eager)
    race.clock, race.install, race.file = clock, install, tmp_path / dispatch.CACHE_FILE
    yield race
    dispatch.clear_memory()
    dispatch._candidate_memo.clear()


def _block(downsample=True, seed=0):
    """A torchvision BasicBlock (with a conv1x1+BN downsample) with random BN parameters and statistics, fused."""
    torch.manual_seed(seed)
    ds = nn.Sequential(tv.conv1x1(4, 8, 2), nn.BatchNorm2d(8)) if downsample else None
    block = tv.BasicBlock(4 if downsample else 8, 8, 2 if downsample else 1, ds)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    twin = copy.deepcopy(block)
    return resnet_fused.fuse(block), twin


def _input(block, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, block.conv1.in_channels, 8, 8, generator=g).relu()


def _entry(block):
    (sig, entry), = dispatch.chosen(block).values()
    return entry


@pytest.mark.parametrize("mode,wrong", [("eval", dict(output=1.01)), ("train", dict(output=1.01)),
                                        ("train", dict(grad=1.05)), ("train", dict(stats=1.2))])
def test_a_fast_candidate_with_wrong_numbers_is_never_chosen(race, mode, wrong):
    """The wrong candidate costs nothing, so it would win the race: the check against the float64 reference
    excludes it (output, gradient or running statistics), records why, and a correct candidate runs."""
    race.install(make_backend(race.clock, cost=0.0, **wrong))
    # the reference ops made slow: the wrong candidate is the fastest of the three
    backends._modules["reference"], saved = make_backend(race.clock, cost=1.0), backends._modules["reference"]
    try:
        block, twin = _block()
        block.train(mode == "train")
        twin.train(mode == "train")
        x = _input(block)
        out = block(x.clone().requires_grad_(mode == "train"))
    finally:
        backends._modules["reference"] = saved
    entry = _entry(block)
    assert entry["choice"] != "triton" and "triton" not in entry["ms"]
    what = "output" if "output" in wrong else "gradient of " if "grad" in wrong else "block.bn"
    assert entry["errors"]["triton"].startswith(what) and "allowed" in entry["errors"]["triton"]
    if "stats" in wrong:
        assert "running_var" in entry["errors"]["triton"] and "running_mean" not in entry["errors"]["triton"]
    assert set(entry["ms"]) == {"reference", "eager"}
    assert_close(out, twin(x))


def test_a_correct_fast_candidate_wins_and_a_slow_one_loses(race):
    race.install(make_backend(race.clock, cost=0.0))
    backends._modules["reference"], saved = make_backend(race.clock, cost=1.0), backends._modules["reference"]
    try:
        block, twin = _block()
        x = _input(block)
        with torch.no_grad():
            out = block.eval()(x)
    finally:
        backends._modules["reference"] = saved
    entry = _entry(block)
    assert entry["errors"] == {} and set(entry["ms"]) == {"reference", "triton", "eager"}
    assert entry["choice"] == "triton" and entry["ms"]["reference"] >= 1000 > 500 > entry["ms"]["triton"]
    assert entry["ms"]["eager"] >= 500
    assert_close(out, twin.eval()(x))
    # stored on disk under the environment key, read back by a new process (memory cleared) without measuring
    (table,) = json.loads(race.file.read_text()).values()
    assert [e["choice"] for e in table.values()] == ["triton"]
    dispatch.clear_memory()
    calls = []
    original = dispatch.measure
    dispatch.measure = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with torch.no_grad():
            block(x)
    finally:
        dispatch.measure = original
    assert calls == []


def test_a_tie_within_the_margin_keeps_eager(race):
    """2% faster than eager (two ops of 0.245 s against 0.5 s) is within EAGER_MARGIN of eager's fastest sample:
    eager keeps the block."""
    race.install(make_backend(race.clock, cost=0.245))
    backends._modules["reference"], saved = make_backend(race.clock, cost=1.0), backends._modules["reference"]
    try:
        block, _ = _block()
        with torch.no_grad():
            block.eval()(_input(block))
    finally:
        backends._modules["reference"] = saved
    entry = _entry(block)
    assert entry["ms"]["triton"] < entry["ms"]["eager"] < entry["ms"]["triton"] / (1 - dispatch.EAGER_MARGIN)
    assert entry["choice"] == "eager"


def test_every_candidate_erroring_runs_eager(race):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel")

    bad = types.SimpleNamespace(NAME="triton", unsupported=lambda x, g=1, d=1: None, conv_bn_act=broken,
                                conv_stats=broken, scale_bias_add_relu=broken, bn_relu=broken)
    race.install(bad)
    block, twin = _block()
    x = _input(block)
    with torch.no_grad():
        out = block.eval()(x)
    assert _entry(block)["errors"]["triton"] == "RuntimeError: no kernel"
    assert_close(out, twin.eval()(x))


def test_running_statistics_are_updated_once_per_training_step(race):
    """The first training call measures three candidates (each run several times, forward and backward) and is
    still one step: running statistics, num_batches_tracked, output and gradients as torchvision's after one."""
    race.install(make_backend(race.clock, cost=0.0))
    block, twin = _block()
    block.train(), twin.train()
    x = _input(block)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = block(xa)
    ref = twin(xb)
    assert dispatch.chosen(block)  # it was measured
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    assert_close(out, ref)
    assert_close(xa.grad, xb.grad)
    for (name, p), q in zip(block.named_parameters(), twin.parameters()):
        assert_close(p.grad, q.grad, msg=name)
    for (name, b), c in zip(block.named_buffers(), twin.buffers()):
        if b.is_floating_point():
            assert_close(b, c, msg=name)
        else:
            assert b.item() == c.item() == 1, name


def test_a_block_eager_won_runs_its_own_forward_at_once(race, monkeypatch):
    """Once eager won a block's race, a call like that one runs the block's own forward without the fused path's
    checks or the dispatcher (the CPU hot path), and hooks still fire; another batch size, training or a forced
    candidate is decided anew."""
    monkeypatch.setitem(backends._modules, "reference", make_backend(race.clock, cost=1.0))  # eager (0.5) wins
    block, twin = _block()
    block.eval(), twin.eval()
    x = _input(block)
    with torch.no_grad():
        block(x)
    assert _entry(block)["choice"] == "eager"
    decided = []
    choose = dispatch.choose
    monkeypatch.setattr(dispatch, "choose", lambda *a, **k: decided.append(1) or choose(*a, **k))
    seen = []
    with monkeypatch.context() as mp, torch.no_grad():
        mp.setattr(models.BasicBlock, "_fusion_issue", lambda self: pytest.fail("checked fusability"))
        mp.setattr(models.BasicBlock, "_hook_issue", lambda self: pytest.fail("checked hooks"))
        assert_close(block(x), twin(x))
        handle = block.conv2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        assert_close(block(x), twin(x))
        handle.remove()
    assert len(seen) == 1 and decided == []
    with torch.no_grad():
        assert_close(block(x[:2]), twin(x[:2]))
    assert decided == [1]
    block.train(), twin.train()
    assert_close(block(x.clone().requires_grad_()), twin(x))
    assert decided == [1, 1]
    block.eval(), twin.eval()
    calls = []
    monkeypatch.setitem(backends._modules, "reference", reference)
    original = reference.conv_bn_act
    monkeypatch.setattr(reference, "conv_bn_act", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setenv(dispatch.ENV_FORCE, "reference")
    with torch.no_grad():
        assert_close(block(x), twin(x))
    assert calls and decided == [1, 1, 1]  # forced: the eager choice stored for this call does not apply


def test_two_processes_storing_at_once_leave_a_valid_merged_cache(tmp_path):
    """Two processes each store 150 choices into one file, starting at the same moment: every one of the 300 is
    there (read, merge and replace under the lock; without it, one process overwrites the other's entries)."""
    code = ("import sys, time; from pathlib import Path; from resnet_fused import dispatch\n"
            "path, tag = Path(sys.argv[1]), sys.argv[2]\n"
            "(path.parent / f'ready.{tag}').touch()\n"
            "while len(list(path.parent.glob('ready.*'))) < 2: time.sleep(0.001)\n"  # both imported: go
            "for i in range(150):\n"
            "    dispatch.store(path, 'env', f'{tag}{i}', {'choice': 'eager', 'i': i})\n")
    path = tmp_path / dispatch.CACHE_FILE
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), tag]) for tag in ("a", "b")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    table = json.loads(path.read_text())
    assert sorted(table["env"]) == sorted(f"{t}{i}" for t in "ab" for i in range(150))
    assert not list(tmp_path.glob("*.tmp"))


def test_traced_calls_never_measure(race, monkeypatch):
    """Under torch.compile nothing is measured: the stored choice runs, else the static order (reference on a
    CPU) — fullgraph, no graph break."""
    monkeypatch.setattr(dispatch, "measure", lambda *a, **k: pytest.fail("measured while tracing"))
    calls = []
    original = reference.conv_bn_act
    monkeypatch.setattr(reference, "conv_bn_act", lambda *a, **k: calls.append(1) or original(*a, **k))
    block, twin = _block()
    block.eval(), twin.eval()
    x = _input(block)
    with torch.no_grad():
        torch._dynamo.reset()
        out = torch.compile(block, backend="eager", fullgraph=True)(x)
    assert calls and dispatch.chosen(block) == {}
    assert_close(out, twin(x))
    # a stored choice is what the traced graph runs
    with torch.no_grad():  # the signature of a call under no_grad: eval
        sig = dispatch.signature("block", {"block": block}, x)
        dispatch.store(dispatch.cache_path(), dispatch.env_key(x.device), sig, {"choice": "eager"})
    calls.clear()
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(block, backend="eager", fullgraph=True)(x)
    assert calls == []
    assert_close(out, twin(x))
    torch._dynamo.reset()


def test_forced_candidate_and_deterministic_mode_do_not_measure(race, monkeypatch):
    monkeypatch.setattr(dispatch, "measure", lambda *a, **k: pytest.fail("measured"))
    block, twin = _block()
    x = _input(block)
    monkeypatch.setenv(dispatch.ENV_FORCE, "eager")
    calls = []
    original = reference.conv_bn_act
    monkeypatch.setattr(reference, "conv_bn_act", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        assert_close(block.eval()(x), twin.eval()(x))
    assert calls == []
    monkeypatch.setenv(dispatch.ENV_FORCE, "cudnn")
    with pytest.raises(ValueError, match="RESNET_FUSED_AUTO_BACKEND='cudnn'"):
        block(x)
    monkeypatch.delenv(dispatch.ENV_FORCE)
    monkeypatch.setenv(dispatch.ENV_DETERMINISTIC, "1")
    with torch.no_grad():
        assert_close(block(x), twin(x))
    assert calls  # the static order: reference on a CPU


def test_tune_measures_every_block_and_leaves_the_model_as_it_was(race, capsys):
    torch.manual_seed(0)
    model = resnet_fused.fuse(tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    rows = resnet_fused.tune(model, x)
    assert {(r.path, r.mode) for r in rows} == {(p, m) for p in ("conv1", "layer1.0", "layer2.0", "layer3.0",
                                                                  "layer4.0") for m in ("eval", "train")}
    assert {r.candidate for r in rows} == {"reference", "eager"}
    assert all(r.valid and r.ms is not None and r.max_error is not None for r in rows)
    assert sum(r.chosen for r in rows) == 10
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    printed = capsys.readouterr().out
    assert "layer4.0" in printed and "candidate" in printed
    report = {r.path: r for r in resnet_fused.explain(model, show=False)}
    assert report["layer1.0"].chosen in ("reference", "eager") and report["layer1.0"].vs_eager > 0


def test_explicit_backends_and_cpu_static_order():
    """A named backend never races; ``resolve("auto")`` (one backend module, no block) keeps the fixed order."""
    assert backends.resolve("auto", torch.randn(1, 2, 3, 3)) is reference
    assert autoselect.order(torch.device("cuda", 0), torch.float16) == autoselect.DEFAULT_ORDER
    assert dispatch.STATIC_ORDER["cpu"] == ("reference", "eager")


def test_env_key_names_the_device_and_versions():
    key = dispatch.env_key(torch.device("cpu"))
    assert f"torch {torch.__version__}" in key and "resnet_fused" in key and "threads" in key


def test_signature_separates_modes_layouts_and_dtypes():
    block, _ = _block()
    x = _input(block)
    sigs = {dispatch.signature("block", {"block": block.eval()}, x)}
    with torch.no_grad():
        sigs.add(dispatch.signature("block", {"block": block.train()}, x))
    sigs.add(dispatch.signature("block", {"block": block.train()}, x))
    sigs.add(dispatch.signature("block", {"block": block}, x.contiguous(memory_format=torch.channels_last)))
    sigs.add(dispatch.signature("block", {"block": block}, x.double()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sigs.add(dispatch.signature("block", {"block": block}, x))
    assert len(sigs) == 6


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_auto_on_a_gpu_races_and_checks_every_path(tmp_path, monkeypatch, mode):
    """On a GPU, bf16 autocast: every candidate (triton, each cuda engine, reference, eager) is either declined by
    its engine or agrees with the float32 reference; the chosen one runs and matches torchvision."""
    monkeypatch.setenv(dispatch.ENV_CACHE_DIR, str(tmp_path))
    for env in (dispatch.ENV_FORCE, dispatch.ENV_ENGINE, dispatch.ENV_DETERMINISTIC):
        monkeypatch.delenv(env, raising=False)
    dispatch.clear_memory()
    block, twin = _block()
    block, twin = (m.to("cuda", memory_format=torch.channels_last).train(mode == "train") for m in (block, twin))
    x = _input(block).to("cuda", memory_format=torch.channels_last).requires_grad_(mode == "train")
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.set_grad_enabled(mode == "train"):
        out, ref = block(x), twin(x.detach())
    entry = _entry(block)
    names, _ = dispatch.candidates(x)
    assert set(entry["ms"]) | set(entry["errors"]) == set(names) and entry["choice"] in entry["ms"]
    assert all("cannot run this call" in e for e in entry["errors"].values()), entry["errors"]
    assert_close(out.float(), ref.float(), dtype=torch.bfloat16)
    (table,) = json.loads((tmp_path / dispatch.CACHE_FILE).read_text()).values()
    assert [e["choice"] for e in table.values()] == [entry["choice"]]
    dispatch.clear_memory()
