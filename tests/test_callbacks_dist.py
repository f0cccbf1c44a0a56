"""Lightning integration on 2 gloo ranks: DDP parity, plugin == callback, LayerSync errors, monitor, PreciseBN.

Lightning's ``ddp`` strategy would re-run ``sys.argv`` to start its workers, which breaks under pytest, so every
Trainer runs inside one ``run_distributed`` world whose ranks look torchrun-launched to Lightning (``ddp_env``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.dist.harness import run_distributed

WORLD = 2
N_SAMPLES = 16  # 4 optimizer steps of 2 samples per rank
PER_RANK_BATCH = 2


def _fit_ddp(rank, world, callbacks=(), plugins=(), logger=False, **kwargs):
    from tests.lightning_helpers import TinyNet, dataset, ddp_env, loader, trainer

    ddp_env(rank, world)
    model = TinyNet(seed=0)
    t = trainer(devices=world, strategy="ddp", use_distributed_sampler=False, callbacks=list(callbacks),
                plugins=list(plugins), logger=logger, max_steps=N_SAMPLES // (world * PER_RANK_BATCH), **kwargs)
    t.fit(model, loader(dataset(N_SAMPLES), PER_RANK_BATCH, rank, world))
    return model


def _precise_model():
    import syncnorm

    torch.manual_seed(3)
    return nn.Sequential(syncnorm.SyncBatchNorm(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 2, 1), syncnorm.SyncBatchNorm(2), nn.Dropout(0.5)).double()


PRECISE_N = 10  # 5 samples per rank: batches of 3 and 2
PRECISE_BATCH = 3


def _worker(rank, world):
    from pytorch_lightning import Callback
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    import syncnorm
    from syncnorm.callbacks import BatchNormMonitor, NormConversion, SyncNormPlugin
    from tests.dist.harness import CollectiveLedger
    from tests.lightning_helpers import RecordingLogger, dataset, loader, params

    out = {}

    class StepLedger(Callback):
        """Collectives of syncnorm.comm issued during each optimizer step, by name."""

        def __init__(self, ledger):
            self.ledger, self.steps = ledger, []

        def on_train_batch_start(self, *args):
            self.ledger.clear()

        def on_train_batch_end(self, *args):
            self.steps.append([name for name, _, _ in self.ledger.entries])

    # 1. parity + monitor: NormConversion("sync") with per-rank batch 2; monitor logs every 2nd step
    logger = RecordingLogger()
    monitor = BatchNormMonitor()
    with CollectiveLedger() as ledger:
        spy = StepLedger(ledger)
        model = _fit_ddp(rank, world, callbacks=[NormConversion("sync"), monitor, spy], logger=logger,
                         log_every_n_steps=2)
    out["callback"] = params(model)
    out["types"] = {n: type(m).__name__ for n, m in model.named_modules() if "bn" in n}
    out["steps"] = spy.steps
    out["records"] = logger.records
    out["monitor_last"] = monitor.last_metrics

    # 2. the plugin gives the same model
    model = _fit_ddp(rank, world, plugins=[SyncNormPlugin("sync")])
    out["plugin"] = params(model)
    out["plugin_types_after_fit"] = {n: type(m).__name__ for n, m in model.named_modules() if "bn" in n}

    # 3. the errors of NormConversion with a LayerSync
    for key, kwargs in (("err_sync_batchnorm", dict(sync_batchnorm=True)),
                        ("err_layer_sync", dict(plugins=[SyncNormPlugin("renorm")]))):
        try:
            _fit_ddp(rank, world, callbacks=[NormConversion("sync")], **kwargs)
            out[key] = None
        except MisconfigurationException as e:
            out[key] = str(e)

    # 4. PreciseBN: exact population moments of a dataset sharded over the ranks
    model = _precise_model()
    model.train()
    model[2].eval()  # a module in eval mode stays so
    momenta = [m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    nbt = [int(m.num_batches_tracked) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    torch.manual_seed(123 + rank)
    rng_before = torch.get_rng_state()
    ds = dataset(PRECISE_N, seed=5)
    ds.tensors = (ds.tensors[0] * 10 + 1000.0, ds.tensors[1])  # large mean: the packed fp64 sums must hold
    with CollectiveLedger() as ledger:
        used = syncnorm.precise_bn(model, loader(ds, PRECISE_BATCH, rank, world), num_batches=50)
    out["precise"] = {
        "used": used,
        "stats": {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in model.named_modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm)},
        "collectives": [name for name, _, _ in ledger.entries],
        "momenta_kept": momenta == [m.momentum for m in model.modules()
                                    if isinstance(m, nn.modules.batchnorm._BatchNorm)],
        "nbt_kept": nbt == [int(m.num_batches_tracked) for m in model.modules()
                            if isinstance(m, nn.modules.batchnorm._BatchNorm)],
        "modes": [m.training for m in model],
        "rng_kept": torch.equal(rng_before, torch.get_rng_state()),
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, WORLD, timeout=200)


def _single_process_reference():
    from tests.lightning_helpers import TinyNet, dataset, loader, params, trainer

    model = TinyNet(seed=0)
    t = trainer(max_steps=N_SAMPLES // (WORLD * PER_RANK_BATCH))
    t.fit(model, loader(dataset(N_SAMPLES), WORLD * PER_RANK_BATCH))
    return params(model)


pytestmark = pytest.mark.timeout(240)


def test_ddp_parity_with_single_process_batch(results):
    ref = _single_process_reference()
    for rank, res in enumerate(results):
        assert set(res["types"].values()) == {"SyncBatchNorm"}
        for key, expected in ref.items():
            torch.testing.assert_close(res["callback"][key], expected, rtol=1e-9, atol=1e-11,
                                       msg=lambda m, k=key, r=rank: f"rank {r}, {k}: {m}")


def test_plugin_equals_callback_and_reverts(results):
    for res in results:
        for key, expected in res["callback"].items():
            torch.testing.assert_close(res["plugin"][key], expected, rtol=1e-12, atol=1e-13)
        # LayerSync.revert ran at the end of fit: plain BatchNorm again
        assert set(res["plugin_types_after_fit"].values()) == {"BatchNorm1d", "BatchNorm2d"}


def test_layer_sync_errors(results):
    for res in results:
        assert "sync_batchnorm=True" in res["err_sync_batchnorm"]
        msg = res["err_layer_sync"]
        assert msg is not None and "replaced before fit started" in msg and "BatchRenorm" in msg


def test_monitor_collectives_only_on_logging_steps(results):
    for res in results:
        steps = res["steps"]
        assert len(steps) == 4
        # log_every_n_steps=2: steps 1 and 3 (0-based) log
        for i, names in enumerate(steps):
            n_max = names.count("all_reduce_max")
            assert n_max == (1 if i in (1, 3) else 0), (i, names)
            # the 3 synchronised layers: one all_reduce_sum forward + one backward each
            assert names.count("all_reduce_sum") == 6, (i, names)


def test_monitor_metrics_rank_zero_only(results):
    rank0, rank1 = results
    assert rank1["records"] == []
    logged = [metrics for _, metrics in rank0["records"] if any(k.startswith("bn_monitor/") for k in metrics)]
    assert len(logged) == 2
    for metrics in logged:
        for layer in ("bn1", "bn2", "bn3"):
            assert metrics[f"bn_monitor/{layer}/running_mean_spread"] == 0.0
            assert metrics[f"bn_monitor/{layer}/running_var_spread"] == 0.0
            # batches of 2 per rank: the local statistics are far from the global ones
            assert metrics[f"bn_monitor/{layer}/mean_gap"] > 1e-3
            assert metrics[f"bn_monitor/{layer}/std_gap"] > 1e-3
    assert rank1["monitor_last"] == rank0["monitor_last"]  # max over ranks: the same everywhere


def _precise_reference():
    """float64: per step, the union of the ranks' batches goes through the model with batch statistics
    (global for SyncBatchNorm, per rank for nn.BatchNorm2d); population moments of every layer's inputs."""
    from tests.lightning_helpers import dataset

    model = _precise_model()
    ds = dataset(PRECISE_N, seed=5)
    x_all = ds.tensors[0] * 10 + 1000.0
    shards = [x_all[r::WORLD] for r in range(WORLD)]
    inputs = {0: [], 2: [], 5: []}
    for start in range(0, len(shards[0]), PRECISE_BATCH):
        parts = [s[start:start + PRECISE_BATCH] for s in shards]
        x = torch.cat(parts)
        inputs[0].append(x)
        x = F.batch_norm(x, None, None, model[0].weight, model[0].bias, True, 0.0, model[0].eps)
        x = model[1](x)
        inputs[2].append(x)
        sizes = [len(p) for p in parts]
        x = torch.cat([F.batch_norm(xi, None, None, model[2].weight, model[2].bias, True, 0.0, model[2].eps)
                       for xi in torch.split(x, sizes)])
        x = model[4](model[3](x))
        inputs[5].append(x)
    ref = {}
    for idx, xs in inputs.items():
        x = torch.cat(xs).transpose(0, 1).reshape(xs[0].shape[1], -1)
        ref[str(idx)] = (x.mean(1), x.var(1, unbiased=True))
    return ref


def test_precise_bn_exact_population_moments(results):
    ref = _precise_reference()
    for res in results:
        p = res["precise"]
        assert p["used"] == 2
        for name, (mean, var) in ref.items():
            got_mean, got_var = p["stats"][name]
            torch.testing.assert_close(got_mean, mean, rtol=1e-10, atol=1e-9)
            torch.testing.assert_close(got_var, var, rtol=1e-8, atol=1e-9)
    for key in results[0]["precise"]["state"]:
        torch.testing.assert_close(results[0]["precise"]["state"][key], results[1]["precise"]["state"][key],
                                   rtol=0, atol=0)


def test_precise_bn_collectives_and_restored_state(results):
    for res in results:
        p = res["precise"]
        # agreement on the batch count, 2 synchronised layers x 2 batches, one final packed reduction
        assert p["collectives"] == ["all_reduce_max"] + ["all_reduce_sum"] * 5
        assert p["momenta_kept"] and p["nbt_kept"] and p["rng_kept"]
        assert p["modes"] == [True, True, False, True, True, True, True]
