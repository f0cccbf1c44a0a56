"""CUDA code paths: the same checks as on CPU, on GPU (skipped when CUDA is absent), and NCCL with 2+ GPUs.

The CPU + gloo suite covers the maths; these tests pin down what differs on CUDA: device placement of the packed
vector, fp16 autocast, channels_last kernels, and the NCCL backend with the same single-collective path.
"""

from __future__ import annotations

import pytest
import torch

import syncnorm
from tests.oracle import compare, grad_weights, make_batches, reference_bn

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="CUDA is not available")
C = 8


@pytest.mark.parametrize("spatial", [(), (5,), (4, 6), (2, 3, 4)], ids=["1d", "1d-seq", "2d", "3d"])
def test_cuda_matches_float64_batchnorm(spatial):
    (x,) = make_batches([6], C, spatial, 0)
    (g,) = grad_weights([6], C, spatial, 0)
    layer = syncnorm.SyncBatchNorm(C).double().cuda()
    xc = x.cuda().requires_grad_(True)
    y = layer(xc)
    (y * g.cuda()).sum().backward()
    ref = reference_bn(x, g, layer.weight.cpu(), layer.bias.cpu())
    for name, a, b in [("y", y, ref["y"]), ("dx", xc.grad, ref["dx"]), ("dw", layer.weight.grad, ref["dw"]),
                       ("rv", layer.running_var, ref["running_var"])]:
        msg = compare(name, a, b, 1e-9, 1e-10)
        assert msg is None, msg


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_and_channels_last(dtype):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, C, 3, padding=1), syncnorm.SyncBatchNorm(C)).cuda()
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 16, 16, device="cuda").to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=dtype):
        y = net(x)
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.float().square().mean().backward()
    assert net[1].running_mean.dtype == torch.float32
    assert torch.isfinite(net[0].weight.grad).all()


@pytest.mark.parametrize("target", ["sync", "renorm", "cross_iteration", "cross_minibatch", "frozen"])
def test_cuda_convert_train_step(target):
    import torchvision

    model = syncnorm.convert(torchvision.models.resnet18(num_classes=4), target).cuda()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    for _ in range(2):
        model(x).sum().backward()
    reverted = syncnorm.revert(model).eval()
    assert torch.isfinite(reverted(x)).all()


def _nccl_worker(rank: int, world: int) -> dict:
    sizes = [3, 0, 5, 2][:world]
    xs = make_batches(sizes, C, (4, 4), 1)
    gs = grad_weights(sizes, C, (4, 4), 1)
    layer = syncnorm.SyncBatchNorm(C).double().cuda()
    x = xs[rank].cuda().requires_grad_(True)
    y = layer(x)
    (y * gs[rank].cuda()).sum().backward()
    ref = reference_bn(torch.cat(xs), torch.cat(gs), layer.weight.cpu(), layer.bias.cpu())
    off = sum(sizes[:rank])
    sl = slice(off, off + sizes[rank])
    return {"y": compare("y", y, ref["y"][sl], 1e-9, 1e-10), "dx": compare("dx", x.grad, ref["dx"][sl], 1e-9, 1e-10),
            "rv": compare("rv", layer.running_var, ref["running_var"], 1e-9, 1e-10)}


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_nccl_oracle_uneven_and_empty():
    from tests.dist.harness import run_distributed

    world = min(torch.cuda.device_count(), 4)
    results = run_distributed(_nccl_worker, world, timeout=180, backend="nccl")
    for rank, r in enumerate(results):
        assert all(v is None for v in r.values()), (rank, r)


@pytest.mark.parametrize("to", ["sync", "cross_iteration"])
def test_cuda_lightning_fit_with_norm_conversion(to, tmp_path):
    import pytorch_lightning as pl

    from syncnorm.callbacks import NormConversion
    from tests.lightning_helpers import TinyNet, dataset, loader

    model = TinyNet()
    cb = NormConversion(to)
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=tmp_path, callbacks=[cb])
    trainer.fit(model, loader(dataset(12), 4))
    layer_type = {"sync": syncnorm.SyncBatchNorm, "cross_iteration": syncnorm.CrossIterationBatchNorm}[to]
    assert isinstance(model.bn1, layer_type)
    assert model.bn1.running_mean.is_cuda
    assert int(model.bn1.num_batches_tracked) == 3
