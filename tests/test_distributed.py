"""DDP and FSDP2 (gloo, 2 local processes): gradients equal a single-process run.

Every registered mechanism takes one training step under ``DistributedDataParallel`` and, separately,
under FSDP2 (``torch.distributed.fsdp.fully_shard`` on the mechanism as one unit: every parameter a
DTensor sharded on dim 0 over the 2 processes, all-gathered for forward and backward, its gradient
reduce-scattered), each process holding half of the same global batch. Both average the gradients
of the two local losses, so:

- for a mechanism without batch statistics, they must equal the gradient of the loss over the whole
  global batch in one process (FSDP2's sharded gradients are gathered with ``full_tensor()``);
- for a mechanism with BatchNorm, each process normalises with its own half's statistics (plain
  BatchNorm is not synchronised), so they must equal the mean of the two halves' gradients computed
  one after the other in one process. To normalise with whole-batch statistics, convert the model
  with ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (CUDA only in PyTorch; tested here for the
  conversion itself: same keys, same eval output).

One pair of spawned processes runs every mechanism under both wrappers. A failure is recorded with
torch's error, so a (mechanism, feature) pair listed in ``attnzoo.cli.matrix.LIMITATIONS`` must fail
and one that starts passing fails the suite, as in ``tests/test_compat_matrix.py``.

A worker process killed by a signal (gloo's C++ threads once aborted one with ``terminate called
without an active exception``) is not a mechanism's failure: a death after both workers passed the
last barrier, with every record written, is ignored, and a death before it reruns the pair once;
both warn. A worker that exits with an error code, and a step that fails in Python (recorded), are
never retried.
"""

from __future__ import annotations

import copy
import gc
import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import attnzoo
from attnzoo.cli.matrix import applies, limitation

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


FEATURES = ("ddp", "fsdp2")
COMPLETE = "complete"  # written by rank 0 once both workers have recorded every step


def _step(feature: str, spec, rank: int, world: int) -> dict:
    """One training step on this rank's half of the batch under `feature`; the full gradients."""
    xs = [x.chunk(world)[rank] for x in _inputs(spec)]
    model = _model(spec)
    if feature == "ddp":
        ddp = nn.parallel.DistributedDataParallel(model)  # held: its reducer must outlive backward()
        _loss(ddp, xs).backward()
        return {"grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None}}
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    fully_shard(model)
    not_sharded = [
        n for n, p in model.named_parameters() if not (isinstance(p, DTensor) and p.placements == (Shard(0),))
    ]
    _loss(model, xs).backward()
    # full_tensor() all-gathers the reduce-scattered gradient shards (a collective: every rank calls it)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    return {"grads": grads, "not_sharded": not_sharded}


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    torch.set_num_threads(1)
    # FSDP2 warns when a module returns a view (an in-place op on it would skip the backward
    # all-gather); the loss here is out of place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    try:
        for feature in FEATURES:
            for spec in attnzoo.list_modules():
                if not applies(spec, feature):
                    continue
                try:
                    record = _step(feature, spec, rank, world)
                except Exception as exc:  # recorded: the test reports it, or expects it if listed
                    record = {"error": f"{type(exc).__name__}: {exc}"}
                if rank == 0:
                    torch.save(record, os.path.join(out_dir, f"{feature}-{spec.name}.pt"))
                dist.barrier()
        gc.collect()  # no DDP reducer or FSDP state left to tear down after the process group
        dist.barrier()
        if rank == 0:
            Path(out_dir, COMPLETE).touch()
    finally:
        dist.destroy_process_group()



@pytest.fixture(scope="module")
def dist_runs(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    sys.path.insert(0, str(Path(__file__).parent))  # the spawned workers import this file by name
    for attempt in (1, 2):
        out_dir = tmp_path_factory.mktemp("dist")
        try:
            mp.spawn(_worker, args=(2, str(out_dir / "store"), str(out_dir)), nprocs=2, join=True)
        except mp.ProcessExitedException as exc:  # a Python exception is ProcessRaisedException
            done = (out_dir / COMPLETE).exists()
            if exc.signal_name is None or (attempt == 2 and not done):  # an exit code is the worker's own
                raise
            when = "in teardown, after every record" if done else "before its records were written: rerun"
            warnings.warn(f"a distributed worker died of {exc.signal_name} {when}", stacklevel=1)
            if done:
                return out_dir
        else:
            return out_dir
    raise AssertionError("unreachable")


def _reference(spec) -> dict[str, torch.Tensor]:
    """The gradients both wrappers must give, computed in this one process."""
    model = _model(spec)
    xs = _inputs(spec)
    if _has_batch_norm(model):
        halves = list(zip(*[x.chunk(2) for x in xs], strict=True))
        replicas = [copy.deepcopy(model) for _ in halves]
        for replica, half in zip(replicas, halves, strict=True):
            _loss(replica, list(half)).backward()
        params = [dict(r.named_parameters()) for r in replicas]
        return {n: sum(p[n].grad for p in params) / 2 for n, q in params[0].items() if q.grad is not None}
    _loss(model, xs).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


CASES = [(s, f) for f in FEATURES for s in SPECS if applies(s, f)]


@pytest.mark.parametrize("spec, feature", CASES, ids=[f"{s.name}-{f}" for s, f in CASES])
def test_gradients_equal_single_process(spec, feature, dist_runs):
    record = torch.load(dist_runs / f"{feature}-{spec.name}.pt", weights_only=True)
    why = limitation(spec.name, feature)
    if why is not None:
        if "error" in record:
            pytest.xfail(f"documented limitation: {why} (torch: {record['error']})")
        pytest.fail(f"{spec.name} now passes {feature}: remove the limitation from its registration "
                    "(or from attnzoo.cli.matrix.LIMITATIONS)")
    assert "error" not in record, f"{spec.name} under {feature}: {record.get('error')}"
    assert record.get("not_sharded", []) == [], "parameters FSDP2 left unsharded"
    got, want = record["grads"], _reference(spec)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(
            got[name], want[name], atol=1e-10, rtol=1e-8, msg=f"{spec.name} ({feature}): {name}"
        )


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
