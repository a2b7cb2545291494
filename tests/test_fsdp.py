"""FSDP2 (``fully_shard``) with fused blocks, in both orders, against the unfused model: 2 gloo ranks on the CPU.

Each rank builds the same small torchvision ResNet three times — unfused, ``fuse()`` then ``fully_shard``, and
``fully_shard`` then ``fuse()`` (fuse() recognises FSDP2's generated classes, ``FSDPBasicBlock``) — shards each
block and the root, trains 3 SGD steps in float64 on its own data, and compares the full parameters and its
BatchNorm buffers with the unfused run's. The fused path (reference backend) must have run in both orders.
"""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
STEPS = 3

pytestmark = [pytest.mark.slow,  # two spawned processes: about a minute on a loaded 2-core machine
              pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")]


def _build(order: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torchvision.models import resnet as tv

    import resnet_fused

    torch.manual_seed(0)
    model = tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=5).double()
    mesh = init_device_mesh("cpu", (WORLD,))
    if order == "fuse-first":
        resnet_fused.fuse(model, backend="reference")
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if order == "fuse-after":
        resnet_fused.fuse(model, backend="reference")
    return model


def _train(model, rank: int):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        x = torch.randn(2, 3, 64, 64, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        out = model(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        opt.step()
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    return params, buffers


def _worker(rank: int, init_file: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from torch.distributed.fsdp import FSDPModule

    import resnet_fused
    from resnet_fused import backends
    from resnet_fused.fused import _FusedBlock
    from tolerances import assert_close

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        ref_params, ref_buffers = _train(_build("unfused"), rank)
        resolve, calls = backends.resolve, []
        backends.resolve = lambda *a, **k: (calls.append(1), resolve(*a, **k))[1]
        for order in ("fuse-first", "fuse-after"):
            model = _build(order)
            blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
            assert all(isinstance(b, _FusedBlock) and isinstance(b, FSDPModule) for b in blocks), order
            assert isinstance(model, resnet_fused.ResNet) and isinstance(model, FSDPModule), order
            calls.clear()
            params, buffers = _train(model, rank)
            assert len(calls) == 5 * STEPS, (order, len(calls))  # the stem and 4 blocks ran fused every step
            for name, want in ref_params.items():
                assert_close(params[name], want, msg=f"{order}: {name}")
            for name, want in ref_buffers.items():
                if want.is_floating_point():
                    assert_close(buffers[name], want, msg=f"{order}: {name}")
                else:
                    assert torch.equal(buffers[name], want), f"{order}: {name}"
    finally:
        dist.destroy_process_group()


def test_fsdp2_both_orders_train_as_unfused(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed.fsdp.fully_shard")
    mp.spawn(_worker, args=(str(tmp_path / "init"),), nprocs=WORLD, join=True)
