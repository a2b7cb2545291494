"""``auto``'s measured choice between the triton and cuda backends (resnet_fused.backends.autoselect)."""

import json

import pytest
import torch

from resnet_fused import backends
from resnet_fused.backends import autoselect, reference

DEVICE = torch.device("cuda", 0)


class FakeBackend:
    """A backend module whose probe calls cost a fixed time per call (or raise)."""

    def __init__(self, name, ms=None, error=None):
        self.NAME, self.ms, self.error = name, ms, error

    def conv_bn_act(self, *args, **kwargs):
        if self.error:
            raise RuntimeError(self.error)
        return self.ms

    def conv_stats(self, *args, **kwargs):
        return self.conv_bn_act(), None, None

    def scale_bias_add_relu(self, c, *args):
        return c


def fake_timer(call):
    return call()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Empty disk and memory caches, a fixed cache key, tiny probes on the CPU."""
    monkeypatch.setenv(autoselect.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(autoselect.ENV_FORCE, raising=False)
    monkeypatch.setattr(autoselect, "cache_key", lambda device, dtype: f"gpu|{dtype}")
    monkeypatch.setattr(autoselect, "probe_calls", lambda mod, device, dtype: [mod.conv_bn_act] * 3)
    autoselect.clear_memory()
    yield tmp_path / autoselect.CACHE_FILE
    autoselect.clear_memory()


def counting_measure(log):
    def measure_fn(runnable, device, dtype):
        log.append((tuple(runnable), dtype))
        return autoselect.measure(runnable, device, dtype, timer=fake_timer)
    return measure_fn


def test_measure_picks_the_faster_and_records_failures(cache):
    mods = {"triton": FakeBackend("triton", 2.0), "cuda": FakeBackend("cuda", 1.5)}
    entry = autoselect.measure(mods, DEVICE, torch.bfloat16, timer=fake_timer)
    assert entry == {"backend": "cuda", "ms": {"triton": 6.0, "cuda": 4.5}, "errors": {}}
    mods["cuda"] = FakeBackend("cuda", error="no kernel for this shape")
    entry = autoselect.measure(mods, DEVICE, torch.bfloat16, timer=fake_timer)
    assert entry["backend"] == "triton"
    assert entry["errors"] == {"cuda": "RuntimeError: no kernel for this shape"}


def test_choice_is_measured_once_then_read_from_disk(cache):
    log = []
    mods = {"triton": FakeBackend("triton", 1.0), "cuda": FakeBackend("cuda", 3.0)}
    first = autoselect.choice(DEVICE, torch.bfloat16, mods, measure_fn=counting_measure(log))
    assert first["backend"] == "triton" and len(log) == 1
    assert json.loads(cache.read_text())["gpu|torch.bfloat16"]["backend"] == "triton"
    # same process: memory; a new process (memory cleared): disk; neither measures again
    assert autoselect.choice(DEVICE, torch.bfloat16, mods, measure_fn=counting_measure(log)) == first
    autoselect.clear_memory()
    assert autoselect.choice(DEVICE, torch.bfloat16, mods, measure_fn=counting_measure(log)) == first
    assert len(log) == 1
    # another dtype is another measurement, stored beside the first
    autoselect.choice(DEVICE, torch.float16, mods, measure_fn=counting_measure(log))
    assert len(log) == 2 and len(json.loads(cache.read_text())) == 2


def test_order_follows_the_stored_measurement(cache):
    mods = {"triton": FakeBackend("triton", 5.0), "cuda": FakeBackend("cuda", 1.0)}
    autoselect._write_disk("gpu|torch.bfloat16", {"backend": "cuda", "ms": {"cuda": 1.0, "triton": 5.0},
                                                  "errors": {}})
    assert autoselect.order(DEVICE, torch.bfloat16, mods) == ("cuda", "triton", "reference")


def test_nothing_to_race_uses_the_default_order(cache):
    log = []
    only = {"cuda": FakeBackend("cuda", 1.0)}
    assert autoselect.choice(DEVICE, torch.bfloat16, only, measure_fn=counting_measure(log)) is None
    assert autoselect.order(DEVICE, torch.bfloat16, only) == autoselect.DEFAULT_ORDER
    assert log == [] and not cache.exists()


def test_no_measurement_while_compiling_or_capturing(cache, monkeypatch):
    log = []
    mods = {"triton": FakeBackend("triton", 1.0), "cuda": FakeBackend("cuda", 3.0)}
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert autoselect.choice(DEVICE, torch.bfloat16, mods, measure_fn=counting_measure(log)) is None
    assert log == [] and not cache.exists()


def test_all_failing_backends_are_not_stored(cache):
    log = []
    mods = {"triton": FakeBackend("triton", error="boom"), "cuda": FakeBackend("cuda", error="bang")}
    entry = autoselect.choice(DEVICE, torch.bfloat16, mods, measure_fn=counting_measure(log))
    assert entry["backend"] is None and set(entry["errors"]) == {"triton", "cuda"}
    assert not cache.exists()
    assert autoselect.order(DEVICE, torch.bfloat16, mods) == autoselect.DEFAULT_ORDER


def test_env_forces_the_first_backend(cache, monkeypatch):
    mods = {"triton": FakeBackend("triton", 1.0), "cuda": FakeBackend("cuda", 3.0)}
    monkeypatch.setenv(autoselect.ENV_FORCE, "cuda")
    assert autoselect.order(DEVICE, torch.float16, mods) == ("cuda", "triton", "reference")
    assert not cache.exists()
    monkeypatch.setenv(autoselect.ENV_FORCE, "cudnn")
    with pytest.raises(ValueError, match="RESNET_FUSED_AUTO_BACKEND='cudnn'"):
        autoselect.order(DEVICE, torch.float16, mods)


def test_unwritable_cache_warns_and_keeps_the_choice(cache, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(autoselect.ENV_CACHE_DIR, str(blocker / "sub"))  # a directory under a file
    mods = {"triton": FakeBackend("triton", 4.0), "cuda": FakeBackend("cuda", 3.0)}
    with pytest.warns(RuntimeWarning, match="could not store"):
        entry = autoselect.choice(DEVICE, torch.bfloat16, mods, measure_fn=counting_measure([]))
    assert entry["backend"] == "cuda"
    assert autoselect.choice(DEVICE, torch.bfloat16, mods)["backend"] == "cuda"  # from memory, no warning


def test_probe_calls_run_on_the_reference_backend(monkeypatch):
    """The real probe calls, at toy sizes: every op gets arguments it accepts."""
    monkeypatch.setattr(autoselect, "PROBES", ((2, 8, 6, 6, 8, 3, 1), (2, 8, 6, 6, 4, 1, 2)))
    calls = autoselect.probe_calls(reference, torch.device("cpu"), torch.float32)
    outs = [call() for call in calls]
    assert [tuple(o.shape) for o in outs] == [(2, 8, 6, 6)] * 2 + [(2, 4, 3, 3)] * 2
    assert all(torch.isfinite(o).all() and (o >= 0).all() for o in outs)


def test_cpu_inputs_never_measure(monkeypatch):
    monkeypatch.setattr(autoselect, "choice", lambda *a, **k: pytest.fail("measured for a CPU tensor"))
    assert backends.resolve("auto", torch.randn(1, 2, 3, 3)) is reference


@pytest.mark.gpu
def test_auto_on_gpu_measures_both_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv(autoselect.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(autoselect.ENV_FORCE, raising=False)
    autoselect.clear_memory()
    x = torch.randn(2, 8, 8, 8, device="cuda", dtype=torch.bfloat16)
    runnable = [b for b in autoselect.CANDIDATES if backends._why_not(backends.load(b), x, 1, 1) is None]
    chosen = backends.resolve("auto", x)
    assert chosen.NAME in runnable
    if len(runnable) == 2:
        (entry,) = json.loads((tmp_path / autoselect.CACHE_FILE).read_text()).values()
        assert entry["errors"] == {} and set(entry["ms"]) == set(runnable)
        assert entry["backend"] == chosen.NAME == min(entry["ms"], key=entry["ms"].get)
    autoselect.clear_memory()
