"""Lightning integration on 2 gloo ranks: DDP parity, plugin == callback, LayerSync errors, monitor, PreciseBN
(population moments, frozen layers, errors), plugin + CBN resume, and one ``ddp_spawn`` fit.

Lightning's ``ddp`` strategy would re-run ``sys.argv`` to start its workers, which breaks under pytest, so those
Trainers run inside one ``run_distributed`` world whose ranks look torchrun-launched to Lightning (``ddp_env``).
``ddp_spawn`` pickles everything into its own spawned ranks, so that one runs from the test process itself.
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


def _fit_ddp(rank, world, callbacks=(), plugins=(), logger=False, max_steps=None, ckpt_path=None, **kwargs):
    from tests.lightning_helpers import TinyNet, dataset, ddp_env, loader, trainer

    ddp_env(rank, world)
    model = TinyNet(seed=0)
    if max_steps is None:
        max_steps = N_SAMPLES // (world * PER_RANK_BATCH)
    t = trainer(devices=world, strategy="ddp", use_distributed_sampler=False, callbacks=list(callbacks),
                plugins=list(plugins), logger=logger, max_steps=max_steps, **kwargs)
    t.fit(model, loader(dataset(N_SAMPLES), PER_RANK_BATCH, rank, world), ckpt_path=ckpt_path)
    return model


def _precise_model():
    import syncnorm

    torch.manual_seed(3)
    model = nn.Sequential(syncnorm.SyncBatchNorm(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 2, 1), syncnorm.SyncBatchNorm(2), nn.BatchNorm2d(2), nn.Dropout(0.5)).double()
    with torch.no_grad():  # [2] is frozen (eval mode): it normalises with these during the pass
        model[2].running_mean.uniform_(-50.0, 50.0)
        model[2].running_var.uniform_(100.0, 400.0)
    return model


PRECISE_N = 10  # 5 samples per rank: batches of 3 and 2
PRECISE_BATCH = 3


class _HistorySpy:
    """Callback (built lazily: Lightning is imported in the ranks) recording CBN buffers at train start/end."""

    @staticmethod
    def make():
        from pytorch_lightning import Callback

        import syncnorm

        def state(module):
            return {f"{n}.{k}": b.detach().clone() for n, m in module.named_modules()
                    if isinstance(m, syncnorm.CrossIterationBatchNorm) for k, b in m._buffers.items()
                    if b is not None}

        class Spy(Callback):
            start = end = None

            def on_train_start(self, trainer, pl_module):
                self.start = state(pl_module)

            def on_train_end(self, trainer, pl_module):  # before the strategy's teardown reverts the layers
                self.end = state(pl_module)

        return Spy()


def _plugin_resume(rank, world, ckpt_dir):
    """SyncNormPlugin + CBN: 2 epochs straight vs 1 epoch, checkpoint, fit(ckpt_path=...) for the second."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from syncnorm.callbacks import SyncNormPlugin
    from tests.lightning_helpers import params

    def plugin():
        return SyncNormPlugin("cross_iteration", include=["bn1", "bn2"], window=3, burn_in=2)

    steps_per_epoch = N_SAMPLES // (world * PER_RANK_BATCH)
    full_spy, first_spy, second_spy = _HistorySpy.make(), _HistorySpy.make(), _HistorySpy.make()
    full = _fit_ddp(rank, world, plugins=[plugin()], callbacks=[full_spy], max_steps=-1, max_epochs=2)
    # the checkpoint is written during fit (at the epoch end): the plugin reverts the layers when fit ends
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, filename="plugin_cbn", save_last=False)
    _fit_ddp(rank, world, plugins=[plugin()], callbacks=[first_spy, ckpt], max_steps=-1, max_epochs=1,
             enable_checkpointing=True)
    path = f"{ckpt_dir}/plugin_cbn.ckpt"
    second = _fit_ddp(rank, world, plugins=[plugin()], callbacks=[second_spy], max_steps=-1, max_epochs=2,
                      ckpt_path=path)
    return {"full": params(full), "second": params(second), "full_end": full_spy.end,
            "first_end": first_spy.end, "second_start": second_spy.start, "second_end": second_spy.end,
            "steps_per_epoch": steps_per_epoch}


def _precise_errors(rank, world):
    """precise_bn with a bad batch on rank 1: every rank raises, none hangs."""
    import syncnorm

    torch.manual_seed(7)
    good = [torch.randn(4, 3, dtype=torch.float64) for _ in range(2)]
    cases = {
        # plain layer only: rank 1's second batch has one value per channel; only the final all-reduce is collective
        "plain": (nn.Sequential(nn.BatchNorm1d(3)), [good[0], good[1][:1]]),
        # a plain layer before a synchronising one: rank 1 finishes the pass in step, then raises
        "plain_then_sync": (nn.Sequential(nn.BatchNorm1d(3), syncnorm.SyncBatchNorm(3)), [good[0], good[1][:1]]),
        # the synchronising layer gets 2 channels instead of 3 on rank 1: flagged in its own collective
        "sync": (nn.Sequential(syncnorm.SyncBatchNorm(3)), [good[0], good[1][:, :2]]),
    }
    out = {}
    for key, (model, batches) in cases.items():
        model = model.double().train()
        try:
            syncnorm.precise_bn(model, batches if rank == 1 else good, num_batches=2)
            out[key] = None
        except Exception as e:
            out[key] = (type(e).__name__, str(e))
    return out


def _worker(rank, world, ckpt_dir):
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
    model[2].eval()  # a frozen layer: left alone, and in eval mode during the pass
    out["frozen_before"] = (model[2].running_mean.clone(), model[2].running_var.clone())
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

    # 5. errors during the pass stop every rank
    out["precise_errors"] = _precise_errors(rank, world)

    # 6. plugin + CBN: the history comes back with fit(ckpt_path=...)
    out["plugin_resume"] = _plugin_resume(rank, world, ckpt_dir)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(_worker, WORLD, str(tmp_path_factory.mktemp("ckpt")), timeout=200)


def _single_process_reference():
    from tests.lightning_helpers import TinyNet, dataset, loader, params, trainer

    model = TinyNet(seed=0)
    t = trainer(max_steps=N_SAMPLES // (WORLD * PER_RANK_BATCH))
    t.fit(model, loader(dataset(N_SAMPLES), WORLD * PER_RANK_BATCH))
    return params(model)


pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def single_process_reference():
    return _single_process_reference()


def test_ddp_parity_with_single_process_batch(results, single_process_reference):
    ref = single_process_reference
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
    inputs = {0: [], 5: [], 6: []}
    with torch.no_grad():
        for start in range(0, len(shards[0]), PRECISE_BATCH):
            parts = [s[start:start + PRECISE_BATCH] for s in shards]
            sizes = [len(p) for p in parts]
            x = torch.cat(parts)
            inputs[0].append(x)
            x = F.batch_norm(x, None, None, model[0].weight, model[0].bias, True, 0.0, model[0].eps)
            x = model[1](x)
            # frozen: its running statistics
            x = F.batch_norm(x, model[2].running_mean, model[2].running_var, model[2].weight, model[2].bias, False,
                             0.0, model[2].eps)
            x = model[4](model[3](x))
            inputs[5].append(x)
            # [6] is a plain BatchNorm in training mode: its inputs pooled over every rank
            inputs[6].append(F.batch_norm(x, None, None, model[5].weight, model[5].bias, True, 0.0, model[5].eps))
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
    for res in results:  # the frozen layer is untouched
        mean, var = res["frozen_before"]
        got_mean, got_var = res["precise"]["stats"]["2"]
        assert torch.equal(got_mean, mean) and torch.equal(got_var, var)


def test_precise_bn_collectives_and_restored_state(results):
    for res in results:
        p = res["precise"]
        # agreement on the batch count, 2 synchronised layers x 2 batches, one final packed reduction
        assert p["collectives"] == ["all_reduce_max"] + ["all_reduce_sum"] * 5
        assert p["momenta_kept"] and p["nbt_kept"] and p["rng_kept"]
        assert p["modes"] == [True, True, False, True, True, True, True, True]


def test_precise_bn_errors_stop_every_rank(results):
    rank0, rank1 = (res["precise_errors"] for res in results)
    for key in ("plain", "plain_then_sync"):
        assert rank1[key][0] == "ValueError" and "more than 1 value per channel" in rank1[key][1], rank1[key]
        assert rank0[key][0] == "PeerInputError" and "precise_bn" in rank0[key][1], rank0[key]
    assert rank1["sync"][0] == "ValueError" and "expected 3 channels" in rank1["sync"][1], rank1["sync"]
    assert rank0["sync"][0] == "PeerInputError", rank0["sync"]


def test_plugin_resume_brings_cbn_history_back(results):
    for res in results:
        r = res["plugin_resume"]
        first_end, second_start = r["first_end"], r["second_start"]
        assert any(k.endswith("history_filled") for k in first_end)
        assert int(first_end["bn1.history_filled"]) > 0  # the history is not empty after the first epoch
        assert set(second_start) == set(first_end)
        for key, value in first_end.items():  # restored from the checkpoint before the first resumed step
            assert torch.equal(second_start[key], value), key
        for key, value in r["full_end"].items():  # and the resumed run ends where the straight run ends
            torch.testing.assert_close(r["second_end"][key], value, rtol=1e-12, atol=1e-13, msg=key)
        for key, value in r["full"].items():  # parameters too (the plugin reverted the layers at teardown)
            torch.testing.assert_close(r["second"][key], value, rtol=1e-12, atol=1e-13, msg=key)


def test_ddp_spawn_fit_with_norm_conversion(single_process_reference):
    # Lightning's ddp_spawn: the Trainer, the callback and the model are pickled into 2 spawned ranks; the
    # trained weights come back to this process. Exact global statistics give the single-process batch-4 result.
    from syncnorm.callbacks import NormConversion
    from tests.lightning_helpers import TinyNet, dataset, params, spawn_loader, trainer

    model = TinyNet(seed=0)
    t = trainer(devices=WORLD, strategy="ddp_spawn", callbacks=[NormConversion("sync")], use_distributed_sampler=False,
                max_steps=N_SAMPLES // (WORLD * PER_RANK_BATCH))
    t.fit(model, spawn_loader(dataset(N_SAMPLES), PER_RANK_BATCH))  # rank r: samples r, r + 2, ...
    got = params(model)
    for key, expected in single_process_reference.items():
        torch.testing.assert_close(got[key], expected, rtol=1e-9, atol=1e-11, msg=key)
