"""Small Lightning models, data and a recording logger for the callback tests (CPU, float64)."""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import pytorch_lightning as pl
import torch
import torch.nn as nn
from pytorch_lightning.loggers import Logger
from torch.utils.data import DataLoader, DistributedSampler, Sampler, TensorDataset

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")
warnings.filterwarnings("ignore", ".*TPU available.*")


def dataset(n: int, seed: int = 0, size: int = 4) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g, dtype=torch.float64) * 2.0 + 0.5
    x = x + torch.tensor([-1.0, 0.0, 3.0], dtype=torch.float64).view(1, 3, 1, 1)
    y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return TensorDataset(x, y)


def loader(ds: TensorDataset, batch_size: int, rank: Optional[int] = None, world: int = 1) -> DataLoader:
    """Sequential batches; under DDP a DistributedSampler without shuffling (rank r takes r, r+W, ...)."""
    sampler = None
    if rank is not None:
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, sampler=sampler)


class RankInterleavedSampler(Sampler):
    """Rank ``r`` of ``W`` takes samples ``r, r + W, r + 2W, ...`` (a DistributedSampler without shuffling), with the
    rank and world size read when iterated, so it can be built before ``ddp_spawn`` starts the ranks (Lightning's
    own injected DistributedSampler shuffles training data). Use with ``Trainer(use_distributed_sampler=False)``."""

    def __init__(self, n: int) -> None:
        self.n = n

    @staticmethod
    def _rank_world() -> tuple[int, int]:
        from syncnorm import comm

        return comm.get_rank(), comm.get_world_size()

    def __iter__(self):
        rank, world = self._rank_world()
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        rank, world = self._rank_world()
        return len(range(rank, self.n, world))


def spawn_loader(ds: TensorDataset, batch_size: int) -> DataLoader:
    """Sequential per-rank batches for ``ddp_spawn`` (see :class:`RankInterleavedSampler`)."""
    return DataLoader(ds, batch_size=batch_size, shuffle=False, sampler=RankInterleavedSampler(len(ds)))


class TinyNet(pl.LightningModule):
    """conv -> bn1 (2d) -> relu -> conv -> bn2 (2d) -> pool -> linear -> bn3 (1d) -> linear, MSE loss, SGD."""

    def __init__(self, seed: int = 0, lr: float = 0.1, bn_in_configure_model: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 4)
        self.bn3 = None if bn_in_configure_model else nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2)
        self.lr = lr
        self.double()

    def configure_model(self) -> None:
        if self.bn3 is None:
            self.bn3 = nn.BatchNorm1d(4, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x)).mean(dim=(2, 3))
        return self.head(torch.relu(self.bn3(self.fc(x))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call in memory (on whichever rank calls it)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[Optional[int], dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self.records.append((step, dict(metrics)))


def trainer(**kwargs: Any) -> pl.Trainer:
    """A quiet CPU float64 Trainer; keyword arguments override the defaults."""
    defaults = dict(accelerator="cpu", devices=1, precision="64-true", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    deterministic=False)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def ddp_env(rank: int, world: int) -> None:
    """Environment variables that make Lightning treat this harness rank as externally launched (torchrun-like):
    LightningEnvironment sees LOCAL_RANK, and the process group the harness initialised is reused."""
    os.environ.update({"LOCAL_RANK": str(rank), "NODE_RANK": "0", "WORLD_SIZE": str(world), "RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "29555")})


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and running statistics, detached copies (for comparisons across processes)."""
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out
