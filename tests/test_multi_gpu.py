"""Two GPUs: every op on device 1 gives device 0's results (kernels compiled per device,
launched on the arrays' device and its current stream), and a PyTorch DDP step over two
processes gives the gradients of one process on the whole batch. Skipped with fewer than two
CUDA devices."""

import datetime

import numpy as np
import pytest

from gpu_cases import CASES, assert_same_results, run_behind_busy_stream
from helpers import rel_err, to_numpy

pytestmark = pytest.mark.gpu


@pytest.fixture
def cupy():
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA devices")
    return cupy


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("name", CASES)
def test_device_1_matches_device_0(cupy, name, deterministic):
    """Called while device 0 is current: the op must switch to its arrays' device itself."""
    case = CASES[name]
    expected = [to_numpy(r) for r in case.run(*case.on(cupy), deterministic)]
    with cupy.cuda.Device(1):
        inputs = case.on(cupy)
    assert cupy.cuda.runtime.getDevice() == 0
    got = case.run(*inputs, deterministic)
    assert all(r is None or r.device.id == 1 for r in got)
    assert_same_results(got, expected, exact=deterministic, what=name)


@pytest.mark.parametrize("name", CASES)
def test_device_1_current_stream(cupy, name):
    """On device 1, every launch goes to device 1's current stream and nothing synchronises
    (see run_behind_busy_stream)."""
    case = CASES[name]
    expected = [to_numpy(r) for r in case.run(*case.on(cupy), False)]
    with cupy.cuda.Device(1):
        inputs = case.on(cupy)
        got = run_behind_busy_stream(lambda: case.run(*inputs, False), cupy.cuda.Stream(non_blocking=True))
    assert_same_results(got, expected, exact=False, what=name)


def _model():
    """The same float64 model in every process, with offset branches that move the samples
    (they start at zero)."""
    import torch

    from cudeform.torch import DeformConv2dPack, DeformKernelConv2d, ModulatedDeformConv2dPack

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        ModulatedDeformConv2dPack(3, 8, 3, padding=1), torch.nn.ReLU(),
        DeformConv2dPack(8, 8, 3, padding=1, deform_groups=2), torch.nn.ReLU(),
        DeformKernelConv2d(8, 4, 3, padding=1, scope_size=4, mode="local"),
    ).double()
    with torch.no_grad():
        for layer in model:
            if hasattr(layer, "conv_offset"):
                layer.conv_offset.weight.normal_(0.0, 0.1)
    return model


def _loss(model, batch):
    return (model(batch) ** 2).mean()


def _ddp_step(rank, world, init_file, batch, out_dir):
    """One DDP forward and backward on this rank's equal share of ``batch``; saves the
    all-reduced gradients."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        model = DistributedDataParallel(_model().cuda(rank), device_ids=[rank])
        _loss(model, batch.chunk(world)[rank].cuda(rank)).backward()
        torch.save({name: p.grad.cpu() for name, p in model.module.named_parameters()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_equal_one_process_on_the_whole_batch(cupy, tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.distributed.is_available() or not torch.distributed.is_nccl_available():
        pytest.skip("PyTorch has no NCCL")
    world = 2
    batch = torch.from_numpy(np.random.default_rng(60).standard_normal((4 * world, 3, 12, 10)))
    torch.multiprocessing.spawn(_ddp_step, args=(world, tmp_path / "init", batch, tmp_path), nprocs=world)

    model = _model().cuda(0)
    _loss(model, batch.cuda(0)).backward()  # the mean over the batch: DDP averages the ranks' means
    expected = {name: p.grad.cpu().numpy() for name, p in model.named_parameters()}
    for rank in range(world):
        grads = torch.load(tmp_path / f"rank{rank}.pt")
        assert grads.keys() == expected.keys()
        for name, want in expected.items():
            assert np.abs(want).max() > 0, name
            assert rel_err(grads[name].numpy(), want) < 1e-10, (rank, name)
