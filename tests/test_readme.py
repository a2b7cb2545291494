"""The README's Python examples, run as written (in order, in one namespace, as a reader pastes them) on this
machine: the CPU and the reference backend without a GPU. The one example that downloads weights is skipped; the
README gives a network-free variant of it just before, which runs here."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
DOWNLOADS = "# Downloads weights."


def _examples() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.M | re.S)


@pytest.mark.slow  # a ResNet-50 and a Faster R-CNN training step on the CPU: about a minute on 2 busy cores
def test_readme_examples_run(capsys):
    pytest.importorskip("timm")
    examples = _examples()
    skipped = [code for code in examples if code.startswith(DOWNLOADS)]
    assert len(examples) >= 6 and len(skipped) == 1, (len(examples), len(skipped))
    namespace: dict = {}
    for i, code in enumerate(examples):
        if code.startswith(DOWNLOADS):
            continue
        exec(compile(code, f"README.md python example {i + 1}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "torch.Size([1, 128, 8, 8])" in out  # the feature-extraction example's printed shape
