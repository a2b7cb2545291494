"""What :func:`resnet_fused.fuse` did to a model: which ResNet blocks run fused, on which backend, and why not.

``explain(model)`` walks the model and reports one row per residual block it recognises (and per stem of a
fused ``ResNet``): its path, its class, whether its forward takes the fused path, the backend that path would
run on for a given device and dtype, and the reason when it does not run fused:

* a block of a fused class whose modules the fused path does not cover (a norm layer other than BatchNorm2d,
  SyncBatchNorm or FrozenBatchNorm2d; an activation other than ReLU; timm's SE/attention, anti-aliasing,
  DropBlock or DropPath while training; a biased or non-square convolution), which runs its own forward;
* a block (or stem) one of whose modules carries a hook or pruning, which runs its own forward while it is there;
* torchvision's or timm's block not converted yet (call ``fuse``), or a subclass of one (``fuse`` leaves it,
  its forward may differ);
* another library's block (a class named ``*BasicBlock*``/``*Bottleneck*`` that ``fuse`` does not know).

Whether a block runs fused can depend on its mode (timm's DropPath is the identity in eval only): the report
describes the model as it is. The data comes back as a list of :class:`BlockReport`; the table is printed with
rich when it is installed (plain text otherwise).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from . import backends, dispatch
from .fused import _Fused, _FusedBlock, registered

__all__ = ["BlockReport", "explain", "warn_if_nothing_fused"]

# Class names of the residual blocks a model may hold (fuse() converts exactly the classes fused.registered names).
_BLOCK_NAME = re.compile(r"BasicBlock|Bottleneck")


@dataclass(frozen=True)
class BlockReport:
    """One residual block (or the stem of a fused ``ResNet``) of a model."""

    path: str             # the module's name in the model ("" for the model itself)
    cls: str              # its class, with its module ("resnet_fused.Bottleneck", "timm.models.resnet.Bottleneck")
    fused: bool           # whether its forward takes the fused path
    backend: str | None   # the backend that path runs on for the asked device/dtype (None: not fused)
    reason: str | None    # why it is not fused (None: it is)
    chosen: str | None = None    # backend "auto": the path its last call measured fastest (resnet_fused.dispatch)
    vs_eager: float | None = None  # eager's time / the chosen path's time in that measurement (1.0: eager chosen)


def _class_name(cls: type) -> str:
    module = "resnet_fused" if cls.__module__.startswith("resnet_fused.") else cls.__module__
    return f"{module}.{cls.__qualname__}"


def _known_base(cls: type) -> type | None:
    """The torchvision/timm class ``fuse`` converts that ``cls`` derives from, if any."""
    for base in cls.__mro__[1:]:
        if registered(base) is not None:
            return base
    return None


def _status(m: nn.Module) -> tuple[bool, str | None, list[tuple[nn.Module, nn.Module]]] | None:
    """(fused, reason, conv/norm stages) of module ``m``, or None when ``m`` is no block to report."""
    if isinstance(m, _Fused):  # a fused block, or a fused ResNet's stem
        issue = m._eager_reason()
        return issue is None, issue, m._stages()
    cls = type(m)
    if registered(cls) is not None:
        return False, "not converted: resnet_fused.fuse(model) converts it", []
    base = _known_base(cls)
    if base is not None:
        return False, f"a subclass of {_class_name(base)}: fuse() leaves it, its forward may differ", []
    if _BLOCK_NAME.search(cls.__name__):
        return False, "not a torchvision or timm ResNet block: fuse() does not know this class", []
    return None


def _rows(model: nn.Module):
    for name, m in model.named_modules():
        status = _status(m)
        if status is None:
            continue
        fused, reason, stages = status
        path = name
        cls = _class_name(type(m))
        if not isinstance(m, _FusedBlock) and (isinstance(m, _Fused) or type(m).__name__ == "ResNet"):
            path, cls = (f"{name}.conv1" if name else "conv1"), f"{cls} (stem conv1/bn1/relu)"
        yield path, m, cls, fused, reason, stages


def _backend(m: nn.Module, stages, device: torch.device, dtype: torch.dtype, cache: dict) -> tuple[str | None,
                                                                                                  str | None]:
    """(backend name, None) that ``m``'s fused path resolves to for an input of ``device``/``dtype``, or
    (None, why) when its backend cannot run such an input."""
    key = (m.backend, max(c.groups for c, _ in stages), max(c.dilation[0] for c, _ in stages))
    if key not in cache:
        probe = torch.empty((1, stages[0][0].in_channels, 1, 1), device=device, dtype=dtype)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # auto's fallback warning: the row says where it falls back to
                cache[key] = backends.resolve(key[0], probe, key[1], key[2]).NAME, None
        except RuntimeError as err:
            cache[key] = None, str(err)
    return cache[key]


def _auto_choice(m: nn.Module) -> tuple[str | None, float | None]:
    """(chosen path, eager's time / its time) of the last measured call of ``m`` under ``auto``, else (None, None)."""
    record = dispatch.chosen(m).get("block" if isinstance(m, _FusedBlock) else "stem")
    if record is None:
        return None, None
    ms = record[1]["ms"]
    name, eager = record[1]["choice"], ms.get(dispatch.EAGER)
    return name, (round(eager / ms[name], 3) if eager and ms.get(name) else None)


def _default_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def explain(model: nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
            show: bool = True) -> list[BlockReport]:
    """Report, per residual block of ``model``, whether it runs fused, on which backend, and why not.

    ``device``/``dtype``: the input the backend is chosen for (default: the device and dtype of the model's
    first floating-point parameter; pass the autocast dtype to ask about mixed precision). The backend column is
    ``auto``'s fixed order (:mod:`resnet_fused.backends.autoselect`); for ``auto`` blocks that have run, the
    last column is the path their measurement chose and its margin over eager (:mod:`resnet_fused.dispatch`,
    :func:`resnet_fused.tune`).
    ``show``: print the table (with rich when it is installed). Returns the rows as :class:`BlockReport`.
    """
    default_device, default_dtype = _default_device_dtype(model)
    device = torch.device(device) if device is not None else default_device
    dtype = dtype if dtype is not None else default_dtype
    cache: dict = {}
    rows = []
    for path, m, cls, fused, reason, stages in _rows(model):
        backend = None
        if fused:
            backend, error = _backend(m, stages, device, dtype, cache)
            if backend is None:
                fused, reason = False, error
        rows.append(BlockReport(path, cls, fused, backend, reason, *_auto_choice(m)))
    if show:
        _print(rows, type(model).__name__, device, dtype)
    return rows


def _print(rows: list[BlockReport], model_name: str, device: torch.device, dtype: torch.dtype) -> None:
    where = f"{device} {str(dtype).removeprefix('torch.')}"
    title = f"resnet_fused.explain({model_name}): {sum(r.fused for r in rows)} of {len(rows)} blocks fused, {where}"
    if not rows:
        title = f"resnet_fused.explain({model_name}): no ResNet block found, nothing is fused"
    cells = [(r.path or "(model)", r.cls, "yes" if r.fused else "no", r.backend or "-", r.reason or "")
             for r in rows]
    if any(r.chosen for r in rows):  # auto's measured choice per block and its margin over eager
        cells = [c + ((r.chosen + (f" ({r.vs_eager:.2f}x eager)" if r.vs_eager and r.chosen != "eager" else ""))
                      if r.chosen else "-",) for c, r in zip(cells, rows)]
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        print(title)
        for cell in cells:
            print("  " + " | ".join(cell))
        return
    console = Console()
    console.print(Text(title), soft_wrap=True)  # Text: brackets in a name or reason are not rich markup
    if not rows:
        return
    table = Table()
    for column in ("block", "class", "fused", "backend", "reason", "auto chose")[:len(cells[0])]:
        table.add_column(column, overflow="fold")
    for cell in cells:
        table.add_row(*(Text(c) for c in cell))
    console.print(table)


def warn_if_nothing_fused(model: nn.Module) -> None:
    """One ``UserWarning`` when no block of ``model`` runs fused (none found, or none the fused path covers)."""
    rows = [(path, fused, reason) for path, _, _, fused, reason, _ in _rows(model)]
    if any(fused for _, fused, _ in rows):
        return
    name = type(model).__name__
    if not rows:
        msg = f"resnet_fused.fuse: {name} has no torchvision or timm ResNet block; nothing is fused"
    else:
        path, _, reason = rows[0]
        msg = (f"resnet_fused.fuse: none of the {len(rows)} ResNet blocks of {name} can run fused (e.g. "
               f"{path or '(model)'}: {reason}); resnet_fused.explain(model) lists every block")
    warnings.warn(msg, UserWarning, stacklevel=3)
