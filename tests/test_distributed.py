"""DistributedDataParallel (gloo, 2 local processes): gradients equal a single-process run.

Every registered mechanism takes one training step under DDP, each process holding half of the same
global batch. DDP averages the gradients of the two local losses, so:

- for a mechanism without batch statistics, they must equal the gradient of the loss over the whole
  global batch in one process;
- for a mechanism with BatchNorm, each process normalises with its own half's statistics (plain
  BatchNorm is not synchronised), so they must equal the mean of the two halves' gradients computed
  one after the other in one process. To normalise with whole-batch statistics, convert the model
  with ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (CUDA only in PyTorch; tested here for the
  conversion itself: same keys, same eval output).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import attnzoo
from attnzoo.cli.matrix import applies

SPECS = attnzoo.list_modules()
GLOBAL_BATCH = 4


def _inputs(spec):
    gen = torch.Generator().manual_seed(7)
    return [
        torch.randn(GLOBAL_BATCH, *s[1:], generator=gen, dtype=torch.float64) for s in spec.example.inputs
    ]


def _model(spec):
    torch.manual_seed(11)
    return attnzoo.create(spec.name, **spec.example.kwargs).double().train()


def _loss(module, xs):
    return module(*xs).square().mean()


def _has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        for spec in attnzoo.list_modules():
            if not applies(spec, "ddp"):
                continue
            xs = [x.chunk(world)[rank] for x in _inputs(spec)]
            model = nn.parallel.DistributedDataParallel(_model(spec))
            _loss(model, xs).backward()
            if rank == 0:
                grads = {n: p.grad for n, p in model.module.named_parameters() if p.grad is not None}
                torch.save(grads, os.path.join(out_dir, f"{spec.name}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_grads(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    out_dir = tmp_path_factory.mktemp("ddp")
    store = out_dir / "store"
    sys.path.insert(0, str(Path(__file__).parent))  # the spawned workers import this file by name
    mp.spawn(_worker, args=(2, str(store), str(out_dir)), nprocs=2, join=True)
    return out_dir


DDP_SPECS = [s for s in SPECS if applies(s, "ddp")]


@pytest.mark.parametrize("spec", DDP_SPECS, ids=[s.name for s in DDP_SPECS])
def test_ddp_gradients_equal_single_process(spec, ddp_grads):
    got = torch.load(ddp_grads / f"{spec.name}.pt", weights_only=True)
    model = _model(spec)
    xs = _inputs(spec)
    if _has_batch_norm(model):
        halves = list(zip(*[x.chunk(2) for x in xs], strict=True))
        replicas = [copy.deepcopy(model) for _ in halves]
        for replica, half in zip(replicas, halves, strict=True):
            _loss(replica, list(half)).backward()
        want = {n: sum(dict(r.named_parameters())[n].grad for r in replicas) / 2 for n in got}
    else:
        _loss(model, xs).backward()
        want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-10, rtol=1e-8, msg=f"{spec.name}: {name}")


@pytest.mark.parametrize("spec", [s for s in SPECS if _has_batch_norm(_model(s))], ids=lambda s: s.name)
def test_sync_batchnorm_conversion(spec):
    model = _model(spec).eval()
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    assert list(converted.state_dict()) == list(model.state_dict())
    xs = _inputs(spec)
    with torch.no_grad():
        torch.testing.assert_close(converted(*xs), model(*xs), atol=1e-12, rtol=1e-12)
