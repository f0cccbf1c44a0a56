"""Lightning callbacks in one process (single device, CPU, float64): errors, resume, windows, PreciseBN timing,
state dicts and pickling. The multi-process checks are in tests/test_callbacks_dist.py."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn

pl = pytest.importorskip("pytorch_lightning")

import syncnorm  # noqa: E402
from pytorch_lightning import Callback  # noqa: E402
from pytorch_lightning.callbacks import GradientAccumulationScheduler, StochasticWeightAveraging  # noqa: E402
from pytorch_lightning.utilities.exceptions import MisconfigurationException  # noqa: E402
from syncnorm.callbacks import (  # noqa: E402
    BatchNormMonitor,
    CrossBatchScheduler,
    NormConversion,
    PreciseBN,
    RenormScheduler,
    SyncNormPlugin,
)
from tests.lightning_helpers import RecordingLogger, TinyNet, dataset, loader, params, trainer  # noqa: E402

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------------------------------------------------------
# argument validation and pickling
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, exc, needle", [
    (lambda: NormConversion("nope"), ValueError, "to must be one of"),
    (lambda: NormConversion("sync", r_max=2.0), TypeError, "r_max"),
    (lambda: NormConversion("sync", num_features=3), ValueError, "num_features"),
    (lambda: NormConversion("sync", include=3), TypeError, "include"),
    (lambda: NormConversion("sync", group_size=0), ValueError, "group_size"),
    (lambda: NormConversion("sync", revert_on_fit_end="yes"), TypeError, "revert_on_fit_end"),
    (lambda: RenormScheduler(3), TypeError, "schedule"),
    (lambda: PreciseBN(0), ValueError, "num_batches"),
    (lambda: PreciseBN(2, every_n_epochs=1.5), TypeError, "every_n_epochs"),
    (lambda: PreciseBN(2, forward_fn=1), TypeError, "forward_fn"),
    (lambda: BatchNormMonitor("batch"), ValueError, "logging_interval"),
    (lambda: SyncNormPlugin("renorm", window=3), TypeError, "window"),
])
def test_init_errors_name_the_argument(make, exc, needle):
    with pytest.raises(exc, match=needle):
        make()


def _callbacks():
    return [NormConversion("cross_iteration", window=3, include=["bn1", "bn2"]),
            RenormScheduler(syncnorm.schedules.paper_renorm_schedule(1, 4, 3)), PreciseBN(3, every_n_epochs=2),
            BatchNormMonitor("epoch"), CrossBatchScheduler()]


def test_everything_pickles_for_ddp_spawn():
    objs = [*_callbacks(), SyncNormPlugin("cross_minibatch")]
    for obj in objs:
        clone = pickle.loads(pickle.dumps(obj))
        assert type(clone) is type(obj)
        assert clone.state_dict() == obj.state_dict() if hasattr(obj, "state_dict") else True
    # and after a fit (the conversion callback holds names, not modules)
    cbs = _callbacks()
    trainer(max_steps=2, callbacks=cbs).fit(TinyNet(), loader(dataset(8), 2))
    for cb in cbs:
        clone = pickle.loads(pickle.dumps(cb))
        assert clone.state_dict() == cb.state_dict()


# ---------------------------------------------------------------------------------------------------------------
# the three on_fit_start errors that need no DDP (the LayerSync ones run on 2 ranks)
# ---------------------------------------------------------------------------------------------------------------
def test_layers_built_in_configure_model_are_reported():
    model = TinyNet(bn_in_configure_model=True)
    with pytest.raises(MisconfigurationException, match=r"bn3 \(BatchNorm1d\).*configure_model"):
        trainer(max_steps=1, callbacks=[NormConversion("sync")]).fit(model, loader(dataset(4), 2))


def test_swa_before_conversion_is_reported():
    cbs = [StochasticWeightAveraging(swa_lrs=0.01), NormConversion("sync")]
    with pytest.raises(MisconfigurationException, match="before NormConversion"):
        trainer(max_epochs=1, callbacks=cbs).fit(TinyNet(), loader(dataset(4), 2))
    # the other order is fine
    model = TinyNet()
    trainer(max_epochs=1, callbacks=[NormConversion("sync"), StochasticWeightAveraging(swa_lrs=0.01)]).fit(
        model, loader(dataset(4), 2))
    assert isinstance(model.bn1, syncnorm.SyncBatchNorm)


def test_conversion_is_idempotent_and_reverts_at_fit_end():
    model = TinyNet()
    conv = NormConversion("sync", exclude="bn3", revert_on_fit_end=True)
    seen = {}

    class Spy(Callback):
        def on_train_start(self, trainer, pl_module):
            seen["types"] = {n: type(getattr(pl_module, n)).__name__ for n in ("bn1", "bn2", "bn3")}
            seen["in_optimizer"] = any(p is pl_module.bn1.weight for g in trainer.optimizers[0].param_groups
                                       for p in g["params"])

    trainer(max_steps=2, callbacks=[conv, Spy()]).fit(model, loader(dataset(8), 2))
    assert seen["types"] == {"bn1": "SyncBatchNorm", "bn2": "SyncBatchNorm", "bn3": "BatchNorm1d"}
    assert seen["in_optimizer"]
    assert type(model.bn1) is nn.BatchNorm2d and type(model.bn2) is nn.BatchNorm2d  # reverted for export
    assert set(conv.state_dict()["converted"]) == set()  # nothing left converted


# ---------------------------------------------------------------------------------------------------------------
# resume: RenormScheduler + CBN, 6 steps vs 3 + 3 with ckpt_path
# ---------------------------------------------------------------------------------------------------------------
def _resume_callbacks():
    return [NormConversion("cross_iteration", include="bn1", window=3, burn_in=2),
            NormConversion("renorm", include=["bn2", "bn3"]),
            RenormScheduler(syncnorm.schedules.paper_renorm_schedule(1, 5, 4, r_max=2.0, d_max=1.0))]


def test_resume_mid_schedule_is_exact(tmp_path):
    # 3 optimizer steps per epoch, stopped by max_epochs: an end-of-epoch checkpoint (Lightning replays a phantom
    # batch when max_steps stops exactly at an epoch end, and restarts the data when resuming mid-epoch)
    data = loader(dataset(6), 2)
    logger = RecordingLogger()
    full = TinyNet()
    cbs_full = _resume_callbacks()
    trainer(max_epochs=2, callbacks=cbs_full, logger=logger, log_every_n_steps=1).fit(full, data)

    first = TinyNet()
    t1 = trainer(max_epochs=1, callbacks=_resume_callbacks())
    t1.fit(first, data)
    path = str(tmp_path / "half.ckpt")
    t1.save_checkpoint(path)
    second = TinyNet(seed=99)  # different init: everything must come from the checkpoint
    cbs_second = _resume_callbacks()
    trainer(max_epochs=2, callbacks=cbs_second).fit(second, data, ckpt_path=path)

    a, b = params(full), params(second)
    assert set(a) == set(b) and any(k.startswith("bn1.history") for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")
    assert (second.bn2.r_max, second.bn2.d_max) == (full.bn2.r_max, full.bn2.d_max)
    assert full.bn2.r_max > 1.0 and full.bn2.d_max > 0.0  # mid-ramp, not the defaults
    assert cbs_second[2].state_dict() == cbs_full[2].state_dict()
    assert int(full.bn1.step) == 6 == int(second.bn1.step)

    # logged through the trainer's logger: r_max/d_max follow the schedule of the optimizer step
    sched = cbs_full[2].schedule
    logged = [(step, m) for step, m in logger.records if "renorm/r_max" in m]
    assert [step for step, _ in logged] == list(range(6))
    for step, metrics in logged:
        assert (metrics["renorm/r_max"], metrics["renorm/d_max"]) == sched(step)
        assert 0.0 <= metrics["renorm/clip_fraction"] <= 1.0
    assert logged[0][1]["renorm/clip_fraction"] > 0  # r_max=1, d_max=0 clips (almost) every channel


# ---------------------------------------------------------------------------------------------------------------
# CmBN windows follow accumulate_grad_batches; CBN burn-in counts optimizer steps
# ---------------------------------------------------------------------------------------------------------------
class _WindowSpy(Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # runs after the conversion callback's wiring (callbacks run in order)
        self.rows.append((trainer.current_epoch, batch_idx, int(pl_module.bn1.window_forwards),
                          int(pl_module.bn2.step), trainer.global_step))


@pytest.mark.parametrize("explicit_scheduler", [False, True])
def test_accumulation_windows_and_burn_in(explicit_scheduler):
    spy = _WindowSpy()
    cbs = [NormConversion("cross_minibatch", include="bn1", accumulation_steps=5),
           NormConversion("cross_iteration", include="bn2", window=2, burn_in=1),
           GradientAccumulationScheduler({0: 3, 1: 2})]
    if explicit_scheduler:
        cbs.append(CrossBatchScheduler())
    model = TinyNet()
    trainer(max_epochs=2, callbacks=[*cbs, spy]).fit(model, loader(dataset(14), 2))  # 7 batches per epoch
    assert model.bn1.accumulation_steps is None  # the trainer decides the windows
    resets = [(e, i) for e, i, forwards, _, _ in spy.rows if forwards == 0]
    assert resets == [(0, 0), (0, 3), (0, 6), (1, 0), (1, 2), (1, 4), (1, 6)]
    # window sizes: forwards already in the window before each micro-batch
    assert [f for e, _, f, _, _ in spy.rows if e == 0] == [0, 1, 2, 0, 1, 2, 0]
    # CBN step == optimizer steps taken, for every micro-batch of a window
    assert all(step == global_step for *_, step, global_step in spy.rows)
    assert [g for *_, g in spy.rows] == [0, 0, 0, 1, 1, 1, 2, 3, 3, 4, 4, 5, 5, 6]


# ---------------------------------------------------------------------------------------------------------------
# PreciseBN callback: when it runs, and what it leaves alone
# ---------------------------------------------------------------------------------------------------------------
def test_precise_bn_runs_before_validation_and_checkpoint(tmp_path):
    events = []
    precise = PreciseBN(num_batches=2, every_n_epochs=1)

    class Spy(Callback):
        def on_validation_start(self, trainer, pl_module):
            if not trainer.sanity_checking:
                events.append(("val", trainer.current_epoch, precise.runs))

        def on_train_epoch_end(self, trainer, pl_module):
            events.append(("epoch_end", trainer.current_epoch, precise.runs))

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            events.append(("ckpt", trainer.current_epoch, precise.runs))
            events.append(("bn1", pl_module.bn1.running_mean.clone()))

    model = TinyNet()
    data = loader(dataset(8), 2)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=False, every_n_epochs=1)
    t = trainer(max_epochs=2, callbacks=[NormConversion("sync"), precise, Spy(), ckpt], enable_checkpointing=True,
                num_sanity_val_steps=1, limit_val_batches=1)
    t.fit(model, data, loader(dataset(4, seed=1), 2))
    order = [e for e in events if e[0] != "bn1"]
    assert order == [("val", 0, 1), ("epoch_end", 0, 1), ("ckpt", 0, 1),
                     ("val", 1, 2), ("epoch_end", 1, 2), ("ckpt", 1, 2)]
    assert t.global_step == 8 and precise.state_dict()["runs"] == 2
    # the last recomputation is what the model holds: redo it from the same state and loader
    again = copy.deepcopy(model)
    syncnorm.precise_bn(again, data, num_batches=2)
    for name in ("bn1", "bn2", "bn3"):
        torch.testing.assert_close(getattr(again, name).running_var, getattr(model, name).running_var,
                                   rtol=1e-12, atol=1e-14)
    assert int(model.bn1.num_batches_tracked) == 8 and model.bn1.momentum == 0.1


def test_precise_bn_function_single_process_matches_concatenation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3),
                          nn.BatchNorm1d(3)).double()
    ds = dataset(8, seed=2)  # batches of 3, 3, 2
    model(ds.tensors[0][:2])  # materialise the lazy layer
    data = loader(ds, 3)
    # reference: batch-stat normalisation per batch, moments of all inputs
    captured = {1: [], 5: []}
    hooks = [model[i].register_forward_hook(lambda m, a, o, i=i: captured[i].append(a[0].detach()))
             for i in captured]
    ref_model = copy.deepcopy(model).train()
    for m in ref_model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum, m.running_mean, m.running_var = 0.0, None, None
            m.track_running_stats = False
    for h in hooks:
        h.remove()
    ref_inputs = {1: [], 5: []}
    for i in ref_inputs:
        ref_model[i].register_forward_hook(lambda m, a, o, i=i: ref_inputs[i].append(a[0].detach()))
    with torch.no_grad():
        for x, _ in data:
            ref_model(x)
    model.eval()
    assert syncnorm.precise_bn(model, data, num_batches=10) == 3  # warns: fewer batches than asked
    assert not model.training
    for i, xs in ref_inputs.items():
        x = torch.cat(xs).transpose(0, 1).reshape(xs[0].shape[1], -1)
        torch.testing.assert_close(model[i].running_mean, x.mean(1), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(model[i].running_var, x.var(1), rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------------------------------------------------------
# the plugin: state dicts load across it
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("to", ["sync", "cross_iteration", "cross_minibatch"])
def test_plugin_state_dicts_load_across(to):
    plain = TinyNet()
    converted = SyncNormPlugin(to).apply(TinyNet(seed=1))
    assert isinstance(converted.bn1, syncnorm.layers.GlobalStatsBatchNorm)
    assert set(converted.state_dict()) == set(plain.state_dict())
    converted.load_state_dict(plain.state_dict(), strict=True)
    TinyNet(seed=2).load_state_dict(converted.state_dict(), strict=True)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[key], value, rtol=0, atol=0)


def test_plugin_revert_only_touches_its_layers():
    model = TinyNet()
    model.bn3 = syncnorm.BatchRenorm(4, r_max=2.0).double()  # the user's own layer
    plugin = SyncNormPlugin("sync", exclude="bn3")
    plugin.apply(model)
    assert type(model.bn1) is syncnorm.SyncBatchNorm and plugin.converted.keys() == {"bn1", "bn2"}
    plugin.revert(model)
    assert type(model.bn1) is nn.BatchNorm2d and type(model.bn3) is syncnorm.BatchRenorm


# ---------------------------------------------------------------------------------------------------------------
# the monitor on one process: per-epoch logging, BatchRenorm clip rates, no gap without peers
# ---------------------------------------------------------------------------------------------------------------
def test_monitor_epoch_interval_single_process():
    logger = RecordingLogger()
    monitor = BatchNormMonitor("epoch", prefix="m")
    model = TinyNet()
    trainer(max_epochs=2, logger=logger, log_every_n_steps=1,
            callbacks=[NormConversion("renorm", exclude="bn3"), monitor]).fit(model, loader(dataset(8), 2))
    logged = [m for _, m in logger.records if any(k.startswith("m/") for k in m)]
    assert len(logged) == 2  # once per epoch
    last = logged[-1]
    assert last == monitor.last_metrics
    assert last["m/bn1/clip_fraction"] == model.bn1.clip_fraction()
    assert "m/bn3/clip_fraction" not in last and "m/bn3/mean_gap" not in last  # plain BatchNorm: spread only
    for layer in ("bn1", "bn2", "bn3"):
        assert last[f"m/{layer}/running_mean_spread"] == 0.0
    for layer in ("bn1", "bn2"):  # one process: local statistics are the global ones
        assert last[f"m/{layer}/mean_gap"] == pytest.approx(0.0, abs=1e-12)
        assert last[f"m/{layer}/std_gap"] == pytest.approx(0.0, abs=1e-12)
    assert monitor._handles == []  # hooks removed after logging
