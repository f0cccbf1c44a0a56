"""Launched by tests/test_launch.py through ``python -m syncnorm.launch``: does this rank see global statistics?

Each rank normalises its own, deliberately different, batch with syncnorm.SyncBatchNorm and compares the output
and running statistics with nn.BatchNorm2d run on the concatenation of every rank's batch (gathered through
syncnorm.comm). Writes ``rank<R>.json`` with the findings into the directory given as the first argument.
"""

import json
import os
import sys

import torch
import torch.nn as nn

import syncnorm
from syncnorm import comm
from syncnorm.launch import init_distributed


def main(out_dir: str) -> None:
    device = init_distributed(timeout=60)
    assert init_distributed() == device  # a second call is a no-op
    rank, world = comm.get_rank(), comm.get_world_size()
    torch.manual_seed(100 + rank)
    C = 3
    # uneven batches with rank-dependent means: local statistics differ from the global ones
    x = (torch.randn(2 + rank, C, 4, 4, dtype=torch.float64) + 3.0 * rank).to(device)
    layer = syncnorm.SyncBatchNorm(C).to(device=device, dtype=torch.float64).train()
    y = layer(x)

    batches = comm.all_gather_object(x.cpu())
    whole = torch.cat(batches)
    ref = nn.BatchNorm2d(C).to(torch.float64).train()
    y_ref = ref(whole)
    start = sum(b.shape[0] for b in batches[:rank])
    mine = y_ref[start:start + x.shape[0]]
    local = nn.BatchNorm2d(C).to(torch.float64).train()(x.cpu())

    result = {
        "rank": rank,
        "world": world,
        "env_world_size": int(os.environ["WORLD_SIZE"]),
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "backend": comm.get_backend(),
        "device": str(device),
        "output_matches_global": torch.allclose(y.cpu(), mine, rtol=1e-9, atol=1e-9),
        "running_mean_matches_global": torch.allclose(layer.running_mean.cpu(), ref.running_mean, rtol=1e-9, atol=1e-12),
        "running_var_matches_global": torch.allclose(layer.running_var.cpu(), ref.running_var, rtol=1e-9, atol=1e-12),
        "output_differs_from_local": not torch.allclose(y.cpu(), local, atol=1e-3),
        "argv": sys.argv[1:],
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
