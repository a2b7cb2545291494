"""benchmarks/gpu_check.sh runs every test module that has something to run on a GPU, and only modules that exist:
a GPU test outside its groups would never run anywhere (CI has no GPU)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A gpu-marked test, or a module DEVICE that switches to CUDA on a GPU (conftest marks its tests cuda_device).
GPU_MODULE = re.compile(r"@pytest\.mark\.gpu\b|pytestmark\s*=.*\bgpu\b"
                        r"|^DEVICE = \"cuda\" if torch\.cuda\.is_available\(\)", re.MULTILINE)


def _groups() -> dict[str, list[str]]:
    """{group: test files} of gpu_check.sh's ``run_tests <group> <limit> <files...>`` calls."""
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text().replace("\\\n", " ")
    groups = {}
    for line in script.splitlines():
        words = line.split()
        if words[:1] == ["run_tests"]:
            groups[words[1]] = words[3:]
    return groups


def test_gpu_check_runs_every_gpu_test_module():
    groups = _groups()
    assert set(groups) == {"cuda", "device", "triton"}, groups
    listed = [f for files in groups.values() for f in files]
    assert len(listed) == len(set(listed)), "a module listed in two groups runs twice"
    for f in listed:
        assert (ROOT / f).is_file(), f"gpu_check.sh lists {f}, which does not exist"
    gpu_modules = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py") if GPU_MODULE.search(p.read_text())}
    assert gpu_modules, "no GPU test module found: the pattern is stale"
    assert gpu_modules <= set(listed), f"GPU tests that gpu_check.sh never runs: {sorted(gpu_modules - set(listed))}"
