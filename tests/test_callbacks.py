"""Lightning callbacks in one process (single device, CPU, float64): errors, resume, windows, PreciseBN timing,
state dicts and pickling. The multi-process checks are in tests/test_callbacks_dist.py."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

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
    # later evaluation runs evaluate the exported model (they used to convert it again, for good); a new fit
    # converts again
    t = trainer(max_steps=2, callbacks=[conv, Spy()])
    t.validate(model, loader(dataset(4), 2), verbose=False)
    assert type(model.bn1) is nn.BatchNorm2d and type(model.bn2) is nn.BatchNorm2d
    trainer(max_steps=1, callbacks=[conv, Spy()]).fit(model, loader(dataset(4), 2))
    assert seen["types"]["bn1"] == "SyncBatchNorm" and type(model.bn1) is nn.BatchNorm2d


def test_revert_at_fit_end_keeps_user_layers_and_sharing():
    model = TinyNet()
    user = model.bn3 = syncnorm.SyncBatchNorm(4).double()  # built by the user, after a linear layer
    model.alias = model.bn2  # one layer under two names
    conv = NormConversion("sync", revert_on_fit_end=True)
    trainer(max_steps=1, callbacks=[conv]).fit(model, loader(dataset(4), 2))
    assert conv.state_dict()["converted"] == {}
    assert model.bn3 is user  # left alone (reverting it alone could not tell 1d from 2d)
    assert type(model.bn1) is nn.BatchNorm2d and type(model.bn2) is nn.BatchNorm2d and model.alias is model.bn2


# ---------------------------------------------------------------------------------------------------------------
# resume: RenormScheduler + CBN, 6 steps vs 3 + 3 with ckpt_path
# ---------------------------------------------------------------------------------------------------------------
def _resume_callbacks():
    return [NormConversion("cross_iteration", include="bn1", window=3, burn_in=2),
            NormConversion("renorm", include=["bn2", "bn3"]),
            RenormScheduler(syncnorm.schedules.paper_renorm_schedule(1, 5, 4, r_max=2.0, d_max=1.0))]


class _ClipSpy(Callback):
    """Channel-weighted clip fraction of the BatchRenorm layers at each optimizer step, computed here."""

    def __init__(self):
        self.values = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        layers = [m for m in pl_module.modules() if isinstance(m, syncnorm.BatchRenorm)]
        self.values.append(sum(m.clip_fraction() * m.num_features for m in layers)
                           / sum(m.num_features for m in layers))


def test_resume_mid_schedule_is_exact(tmp_path):
    # 3 optimizer steps per epoch, stopped by max_epochs: an end-of-epoch checkpoint (Lightning replays a phantom
    # batch when max_steps stops exactly at an epoch end, and restarts the data when resuming mid-epoch)
    data = loader(dataset(6), 2)
    logger = RecordingLogger()
    full = TinyNet()
    cbs_full = _resume_callbacks()
    clips = _ClipSpy()
    trainer(max_epochs=2, callbacks=[*cbs_full, clips], logger=logger, log_every_n_steps=1).fit(full, data)

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
    assert len(clips.values) == 6
    for (step, metrics), expected in zip(logged, clips.values):
        assert (metrics["renorm/r_max"], metrics["renorm/d_max"]) == sched(step)
        # channel-weighted over bn2 and bn3 (4 channels each), from the layers at that optimizer step
        assert metrics["renorm/clip_fraction"] == expected
    assert logged[0][1]["renorm/clip_fraction"] == 1.0  # r_max=1, d_max=0: r and d sit on their bounds
    assert any(m["renorm/clip_fraction"] < 1.0 for _, m in logged)  # the bounds open up later in the ramp


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


def test_cross_minibatch_accumulation_steps_is_refused():
    # the callbacks make every window one optimizer step of the Trainer: a value here used to be silently dropped
    for cls in (NormConversion, SyncNormPlugin):
        with pytest.raises(ValueError, match=r"accumulation_steps=5 would be ignored: .*accumulate_grad_batches"):
            cls("cross_minibatch", accumulation_steps=5)


@pytest.mark.parametrize("to, kwargs, error, message", [
    ("renorm", {"r_max": 0.5}, ValueError, "r_max must be >= 1, got 0.5"),
    ("renorm", {"d_max": -1.0}, ValueError, "d_max must be >= 0"),
    ("cross_iteration", {"window": 0}, ValueError, "window must be an int >= 1, got 0"),
    ("cross_iteration", {"burn_in": -1}, ValueError, "burn_in must be an int >= 0, got -1"),
    ("sync", {"eps": "x"}, TypeError, "eps must be a real number > 0"),
    ("cross_minibatch", {"momentum": 2.0}, ValueError, "momentum must be in [0, 1] or None, got 2.0"),
    ("frozen", {"eps": -1.0}, ValueError, "eps must be a finite number > 0, got -1.0"),
    ("group", {"num_groups": 0}, ValueError, "num_groups must be an int >= 1"),
    ("group", {"num_groups": "a"}, TypeError, "num_groups must be an int >= 1"),
    ("group", {"eps": float("nan")}, ValueError, "eps must be a finite number > 0, got nan"),
    ("batch", {"dim": 7}, ValueError, "dim must be 1, 2, 3 or None, got 7"),
    ("batch", {"eps": 0.0}, ValueError, "eps must be a finite number > 0, got 0.0"),
    ("batch", {"momentum": 3}, ValueError, "momentum must be in [0, 1] or None, got 3"),
])
def test_bad_layer_argument_values_are_refused_at_construction(to, kwargs, error, message):
    # before, these passed the constructor and failed in setup, after the Trainer had started
    for cls in (NormConversion, SyncNormPlugin):
        with pytest.raises(error) as info:
            cls(to, **kwargs)
        assert str(info.value).startswith(cls.__name__) and message in str(info.value), str(info.value)


@pytest.mark.parametrize("to, kwargs", [("sync", {}), ("renorm", {"r_max": 3.0, "d_max": 5.0}),
                                        ("cross_iteration", {"window": 4, "burn_in": 2}),
                                        ("cross_minibatch", {}), ("frozen", {"eps": 1e-3}),
                                        ("group", {"num_groups": 4}), ("batch", {"dim": 2, "momentum": None})])
def test_good_layer_arguments_are_accepted_at_construction(to, kwargs):
    for cls in (NormConversion, SyncNormPlugin):
        cls(to, **kwargs)


@pytest.mark.parametrize("explicit_scheduler", [False, True])
def test_accumulation_windows_and_burn_in(explicit_scheduler):
    spy = _WindowSpy()
    cbs = [NormConversion("cross_minibatch", include="bn1"),
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
class _FrozenBn2Net(TinyNet):
    """TinyNet whose bn2 stays in eval mode while training (a frozen BatchNorm, as detection backbones do)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.bn2.running_mean.uniform_(-1.0, 1.0)
            self.bn2.running_var.uniform_(0.5, 2.0)
        self.bn2.eval()  # Lightning keeps each module's mode (fit does not call train())


def _population_reference(model, batches):
    """float64 population mean / unbiased variance of the inputs of bn1 and bn3 with TinyNet's forward written out:
    bn1 and bn3 normalise with batch statistics, the frozen bn2 with its running statistics."""
    def batch_stats(x, bn):
        return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)

    inputs = {"bn1": [], "bn3": []}
    with torch.no_grad():
        for x, _ in batches:
            h = model.conv1(x)
            inputs["bn1"].append(h)
            h = model.conv2(torch.relu(batch_stats(h, model.bn1)))
            h = F.batch_norm(h, model.bn2.running_mean, model.bn2.running_var, model.bn2.weight, model.bn2.bias,
                             False, 0.0, model.bn2.eps).mean(dim=(2, 3))
            inputs["bn3"].append(model.fc(h))
    out = {}
    for name, xs in inputs.items():
        x = torch.cat(xs).transpose(0, 1).reshape(xs[0].shape[1], -1)
        out[name] = (x.mean(1), x.var(1, unbiased=True))
    return out


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

    model = _FrozenBn2Net()
    frozen = (model.bn2.running_mean.clone(), model.bn2.running_var.clone())
    data = loader(dataset(8), 2)
    logger = RecordingLogger()
    monitor = BatchNormMonitor("epoch", prefix="m")  # its capture hooks are installed during the pass
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=False, every_n_epochs=1)
    t = trainer(max_epochs=2, callbacks=[NormConversion("sync"), monitor, precise, Spy(), ckpt],
                enable_checkpointing=True, num_sanity_val_steps=1, limit_val_batches=1, logger=logger,
                log_every_n_steps=1)
    t.fit(model, data, loader(dataset(4, seed=1), 2))
    assert [e for e in events] == [("val", 0, 1), ("epoch_end", 0, 1), ("ckpt", 0, 1),
                                   ("val", 1, 2), ("epoch_end", 1, 2), ("ckpt", 1, 2)]
    assert t.global_step == 8 and precise.state_dict()["runs"] == 2
    # the last recomputation (after the last training step) is what the model holds: exact population moments
    # of the first 2 training batches, recomputed independently in float64
    ref = _population_reference(model, list(data)[:2])
    for name, (mean, var) in ref.items():
        torch.testing.assert_close(getattr(model, name).running_mean, mean, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(getattr(model, name).running_var, var, rtol=1e-12, atol=1e-13)
    # the frozen layer was left alone, and kept in eval mode through training and the pass
    assert not model.bn2.training and model.bn1.training
    torch.testing.assert_close(model.bn2.running_mean, frozen[0], rtol=0, atol=0)
    torch.testing.assert_close(model.bn2.running_var, frozen[1], rtol=0, atol=0)
    assert int(model.bn1.num_batches_tracked) == 8 and model.bn1.momentum == 0.1
    # the monitor's epoch metrics come from the last training batch, not from a batch of the pass: one
    # process, so the local statistics equal the global ones
    logged = [m for _, m in logger.records if any(k.startswith("m/") for k in m)]
    assert len(logged) == 2
    for metrics in logged:
        for layer in ("bn1", "bn3"):
            assert metrics[f"m/{layer}/mean_gap"] == pytest.approx(0.0, abs=1e-12)
            assert metrics[f"m/{layer}/std_gap"] == pytest.approx(0.0, abs=1e-12)


def test_precise_bn_function_single_process_matches_concatenation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3),
                          nn.BatchNorm1d(3)).double()
    ds = dataset(8, seed=2)  # batches of 3, 3, 2
    model(ds.tensors[0][:2])  # materialise the lazy layer
    data = loader(ds, 3)
    # reference: batch-stat normalisation per batch, moments of all inputs
    ref_model = copy.deepcopy(model).train()
    for m in ref_model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum, m.running_mean, m.running_var = 0.0, None, None
            m.track_running_stats = False
    ref_inputs = {1: [], 5: []}
    for i in ref_inputs:
        ref_model[i].register_forward_hook(lambda m, a, o, i=i: ref_inputs[i].append(a[0].detach()))
    with torch.no_grad():
        for x, _ in data:
            ref_model(x)

    # all in eval mode: every layer counts as frozen, nothing runs
    before = copy.deepcopy(model.state_dict())
    model.eval()
    with pytest.warns(UserWarning, match="eval mode"):
        assert syncnorm.precise_bn(model, data, num_batches=10) == 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])

    model.train()
    seen = []
    model[1].register_forward_pre_hook(lambda m, a: seen.append(1))  # hooks of recomputed layers stay silent
    with pytest.warns(UserWarning, match="fewer than num_batches"):
        assert syncnorm.precise_bn(model, data, num_batches=10) == 3
    assert model.training and seen == []
    for i, xs in ref_inputs.items():
        x = torch.cat(xs).transpose(0, 1).reshape(xs[0].shape[1], -1)
        torch.testing.assert_close(model[i].running_mean, x.mean(1), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(model[i].running_var, x.var(1), rtol=1e-12, atol=1e-13)


def test_precise_bn_applies_the_activation_of_norm_act_layers():
    # a converted timm-style BatchNormAct2d: normalisation, then its drop and act children
    from syncnorm.convert import _with_activation

    torch.manual_seed(1)
    act_layer = _with_activation(syncnorm.SyncBatchNorm)(3, dtype=torch.float64)
    act_layer.drop, act_layer.act = nn.Identity(), nn.ReLU()
    model = nn.Sequential(act_layer, nn.BatchNorm2d(3, dtype=torch.float64)).train()
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    syncnorm.precise_bn(model, [x], num_batches=1)
    expected = torch.relu(F.batch_norm(x, None, None, act_layer.weight, act_layer.bias, True, 0.0, 1e-5))
    torch.testing.assert_close(model[1].running_mean, expected.mean(dim=(0, 2, 3)), rtol=1e-12, atol=1e-13)


def test_precise_bn_invalid_input_of_a_plain_layer_raises():
    model = nn.Sequential(nn.BatchNorm1d(3, dtype=torch.float64)).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        syncnorm.precise_bn(model, [torch.randn(1, 3, dtype=torch.float64)], num_batches=1)
    assert model.training and "forward" not in model[0].__dict__


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


def test_plugin_leaves_a_user_built_layer_of_its_target_alone():
    # a SyncBatchNorm the user built after a linear layer: its dimension cannot be told from the layer alone
    model = TinyNet()
    user = model.bn3 = syncnorm.SyncBatchNorm(4).double()
    user_cbn = syncnorm.CrossIterationBatchNorm(4, window=2).double()
    model.extra = nn.Sequential(nn.Conv2d(4, 4, 1), user_cbn)
    keys = set(model.state_dict())
    plugin = SyncNormPlugin("sync", exclude="extra")
    plugin.apply(model)
    assert plugin.converted.keys() == {"bn1", "bn2", "bn3"} and model.bn3 is user
    plugin.revert(model)  # used to raise "cannot tell whether SyncBatchNorm(4) ... should become BatchNorm1d..."
    assert model.bn3 is user and type(model.bn1) is nn.BatchNorm2d and type(model.bn2) is nn.BatchNorm2d

    cbn_plugin = SyncNormPlugin("cross_iteration", include="bn1")
    cbn_plugin.apply(model)
    # the user's CBN keeps its history in the state dict (it exists before a checkpoint restore too); only the
    # layer the plugin made has non-persistent history
    assert set(model.state_dict()) == keys and any(k.startswith("extra.1.history") for k in keys)
    cbn_plugin.revert(model)
    assert model.extra[1] is user_cbn and type(model.bn1) is nn.BatchNorm2d


def test_plugin_reverts_a_shared_layer_under_every_name():
    model = TinyNet()
    model.alias = model.bn1  # one layer, two names
    weight = model.bn1.weight
    plugin = SyncNormPlugin("sync")
    plugin.apply(model)
    assert type(model.alias) is syncnorm.SyncBatchNorm and model.alias is model.bn1
    plugin.revert(model)
    assert type(model.bn1) is nn.BatchNorm2d and model.alias is model.bn1 and model.bn1.weight is weight


def _keep_bn1(name, module):
    return name == "bn1"


def test_conversion_state_key_is_stable_text():
    a = NormConversion("sync", include=_keep_bn1)
    key = a.state_key
    assert "0x" not in key and "_keep_bn1" in key
    assert pickle.loads(pickle.dumps(a)).state_key == key
    assert NormConversion("sync", include=[_keep_bn1, "bn2"]).state_key != key
    assert "0x" not in NormConversion("sync", exclude=lambda n, m: False).state_key


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


def test_monitor_ignores_should_stop():
    # Lightning also logs on a step where trainer.should_stop is set (one rank may set it before the others learn
    # of it): the monitor's collective must not depend on it
    class StopAtSecondBatch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 1:
                trainer.should_stop = True

    logger = RecordingLogger()
    monitor = BatchNormMonitor(prefix="m")
    trainer(max_epochs=1, logger=logger, log_every_n_steps=50,
            callbacks=[NormConversion("sync"), StopAtSecondBatch(), monitor]).fit(TinyNet(), loader(dataset(8), 2))
    assert monitor.last_metrics == {}
    assert not any(k.startswith("m/") for _, m in logger.records for k in m)
