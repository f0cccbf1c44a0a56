"""torch.compile(fullgraph=True) of converted conv nets on 2 gloo ranks: no graph break, forward and backward compiled,
the same training as eager, and the collectives still in the compiled graphs.

For each target ("sync", "renorm" with r_max=3, d_max=5, "cross_minibatch" with accumulation_steps=2) and backend
("aot_eager", "inductor"), a conv -> BN -> ReLU x 2 net (3 -> 8 -> 8 channels, 8x8 images) is converted, deep-copied
into an eager twin, and the original compiled with ``fullgraph=True``. Both then take the same 3 SGD steps on the
same per-rank batches (uneven: 2 and 3 samples). The checks:

- **no graph break, one graph**: ``fullgraph=True`` raises on a break; on top of that dynamo's ``graph_break`` and
  ``recompiles`` counters stay empty, exactly one graph is compiled over the 3 steps, and aot_autograd compiled it;
- **forward and backward compiled**: the compiled output's whole autograd graph is one ``CompiledFunctionBackward``
  node feeding the parameters' ``AccumulateGrad`` nodes (the eager twin's holds syncnorm's ``_NormalizeBackward``
  and the convs' nodes, so a layer run eagerly would show); with inductor, two graphs (forward and backward) went
  through inductor's FX graph compile/cache;
- **same training as eager**: after every step, outputs, parameter gradients, and every entry of the state dict
  (weights, running stats, ``num_batches_tracked``, the CmBN window buffers) to rtol = atol = 1e-4;
- **still synchronised**: at step 1, against a float64 plain ``nn.BatchNorm2d`` twin of the unconverted net on the
  concatenated batch: the first layer's running statistics (every target: they are the global batch's), and for
  "sync" / "cross_minibatch" (whose first micro-batch is plain synchronised BN) the output slice, both layers'
  running statistics and the parameter gradients summed over the ranks (the backward collective). At step 3, under
  the profiler, the compiled forward issues exactly two gloo all-reduces of 2C + 2 values and the compiled backward
  two of 2C, as the eager twin does, while the eager path (``torch.distributed.all_reduce``) is never called by the
  compiled model: the collectives run from the compiled graphs.

"cross_iteration" (window 2, burn_in 2) also checks that the compiled history equals eager's: a compiled step keeps no
host copy of the step counter, so it always sends the weight-gradient statistics and the device decides what is
recorded (the eager twin skips them in step 1, before recording starts), with the same state after every step.

Everything runs in one spawned world (spawning costs ~7 s): the worker returns per-case results and the test
functions assert on them. On 2 cores the world takes about 75 s with a warm inductor cache and about 2 min with a cold
one (inductor's C++ kernel builds dominate; more on a loaded machine).
"""

from __future__ import annotations

import copy
import gc
import time

import pytest
import torch
import torch.nn as nn

import syncnorm
from tests.dist.harness import run_distributed
from tests.oracle import compare

WORLD = 2
SIZES = [2, 3]  # per-rank batch sizes
C_IN, C = 3, 8
HW = (8, 8)
STEPS = 3
LR = 0.1
TOL = 1e-4
TARGETS = {
    "sync": {},
    "renorm": {"r_max": 3.0, "d_max": 5.0},
    "cross_minibatch": {"accumulation_steps": 2},
    # window 2, burn_in 2: step 1 records nothing, step 2 records, step 3 normalises with the compensated history
    "cross_iteration": {"window": 2, "burn_in": 2},
}
BACKENDS = ("aot_eager", "inductor")
CASES = [(t, b) for t in TARGETS for b in BACKENDS]
BN_LAYERS = (1, 4)  # indices of the norm layers in the Sequential
FWD_NUMEL, BWD_NUMEL = 2 * C + 2, 2 * C  # per-layer all-reduce sizes (fp64 values)
# CBN's forward payload: the conv's weight-gradient statistics, (groups + C) * C_in * 3 * 3 values per layer
CBN_EXTRA = [(1 + C) * c_in * 9 for c_in in (C_IN, C)]
TIMEOUT = 600


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(C_IN, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU(),
                        nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU())
    with torch.no_grad():  # non-trivial affine parameters
        for i in BN_LAYERS:
            net[i].weight.uniform_(0.5, 1.5)
            net[i].bias.uniform_(-0.5, 0.5)
    return net


def _global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole (concatenated) batch of a step and its upstream gradient, float64, the same on every rank."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn((sum(SIZES), C_IN, *HW), generator=gen, dtype=torch.float64) * 2 + 0.5
    g = torch.randn((sum(SIZES), C, *HW), generator=gen, dtype=torch.float64)
    return x, g


def _rank_slice(t: torch.Tensor, rank: int) -> torch.Tensor:
    start = sum(SIZES[:rank])
    return t[start:start + SIZES[rank]]


def _autograd_nodes(t: torch.Tensor) -> list[str]:
    """Sorted names of every node of ``t``'s autograd graph."""
    seen, stack, names = set(), [t.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return sorted(names)


class _Probe:
    """Counts calls of the eager collective ``torch.distributed.all_reduce`` (what ``syncnorm.comm`` calls outside
    compilation) and, when ``profile``, records the gloo collectives (``gloo:*`` profiler events) of a block."""

    eager_calls = 0

    @classmethod
    def install(cls) -> None:
        import torch.distributed as dist

        orig = dist.all_reduce

        def counting_all_reduce(*args, **kwargs):
            cls.eager_calls += 1
            return orig(*args, **kwargs)

        dist.all_reduce = counting_all_reduce

    def __init__(self, profile: bool) -> None:
        self.profile = profile
        self.events: list = []
        self.eager = 0

    def __enter__(self) -> "_Probe":
        self._start = _Probe.eager_calls
        if self.profile:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.profile:
            self._prof.__exit__(*exc)
            self.events = [(e.name, [list(s) for s in e.input_shapes]) for e in self._prof.events()
                           if e.name.startswith("gloo:")]
        self.eager = _Probe.eager_calls - self._start


def _reference_step1() -> dict:
    """float64 plain nn.BatchNorm2d net (the unconverted one) on the concatenated batch of step 1."""
    ref = _net().double().train()
    x, g = _global_batch(0)
    y = ref(x)
    (y * g).sum().backward()
    return {"y": y.detach(), "grads": {n: p.grad.detach().clone() for n, p in ref.named_parameters()},
            "buffers": {n: b.clone() for n, b in ref.named_buffers()}}


def _case(rank: int, target: str, backend: str, ref: dict) -> dict:
    import torch._dynamo
    import torch.distributed as dist
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    match: list[str] = []  # compiled vs eager twin
    reference: list[str] = []  # compiled vs the float64 global-batch reference

    def check(errors, name, a, b):
        msg = compare(name, a, b, rtol=TOL, atol=TOL)
        if msg is not None:
            errors.append(msg)

    model = syncnorm.convert(_net(), target, **TARGETS[target]).train()
    eager = copy.deepcopy(model)  # the eager twin
    lookups = []  # the pair registry looked up while dynamo traces: its guards would follow every pair ever made
    import syncnorm.layers.cross_iteration as cbn_module

    real_owner_of = cbn_module._owner_of

    def owner_of_spy(conv, __real=real_owner_of):
        if torch.compiler.is_compiling():
            lookups.append(1)
        return __real(conv)

    cbn_module._owner_of = owner_of_spy
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    models = {"eager": (eager, eager), "compiled": (compiled, model)}
    opts = {k: torch.optim.SGD(m.parameters(), lr=LR) for k, (_, m) in models.items()}
    out: dict = {"step_seconds": {"eager": [], "compiled": []}, "eager_calls": {"eager": [], "compiled": []}}
    for step in range(STEPS):
        where = f"{target}/{backend} step {step + 1}"
        last = step == STEPS - 1
        x_full, g_full = _global_batch(step)
        x, g = _rank_slice(x_full, rank).float(), _rank_slice(g_full, rank).float()
        if target == "cross_iteration":
            # pairs created and collected elsewhere change nothing the compiled graph depends on (no recompile)
            syncnorm.CrossIterationBatchNorm(4).attach(nn.Conv2d(2, 4, 1))
            gc.collect()
        ys, grads = {}, {}
        for which, (call, m) in models.items():
            opts[which].zero_grad()
            t0 = time.perf_counter()
            with _Probe(profile=last) as fwd:
                y = call(x)
            with _Probe(profile=last) as bwd:
                (y * g).sum().backward()
            out["step_seconds"][which].append(round(time.perf_counter() - t0, 3))
            out["eager_calls"][which].append(fwd.eager + bwd.eager)
            if last:
                out.setdefault("events", {})[which] = {"fwd": fwd.events, "bwd": bwd.events}
            if step == 0:
                out.setdefault("nodes", {})[which] = _autograd_nodes(y)
            ys[which] = y.detach()
            grads[which] = {n: p.grad.detach().clone() for n, p in m.named_parameters()}
            opts[which].step()

        check(match, f"{where}: output", ys["compiled"], ys["eager"])
        for n in grads["eager"]:
            check(match, f"{where}: grad {n}", grads["compiled"][n], grads["eager"][n])
        sd_e, sd_c = eager.state_dict(), model.state_dict()
        if sd_e.keys() != sd_c.keys():
            match.append(f"{where}: state_dict keys differ: {sorted(sd_e)} vs {sorted(sd_c)}")
        for k in sd_e.keys() & sd_c.keys():
            check(match, f"{where}: state_dict[{k!r}]", sd_c[k], sd_e[k])

        if step == 0:
            # synchronised: layer 1's running statistics are those of the global batch (every target)
            for k in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
                check(reference, f"{where}: {k} vs float64 nn.BatchNorm2d on the global batch", sd_c[k],
                      ref["buffers"][k])
            if target in ("sync", "cross_minibatch"):
                # the whole net is plain BN on the global batch: the output slice, both layers' running statistics,
                # and the parameter gradients summed over the ranks (the backward collective)
                check(reference, f"{where}: output vs float64 reference", ys["compiled"], _rank_slice(ref["y"], rank))
                for k, b in ref["buffers"].items():
                    check(reference, f"{where}: {k} vs float64 reference", sd_c[k], b)
                for n, gr in grads["compiled"].items():
                    total = gr.double()
                    dist.all_reduce(total)
                    check(reference, f"{where}: grad {n} summed over ranks vs float64 reference", total,
                          ref["grads"][n])
            if target == "renorm":
                info = model[1].last_info
                out["renorm_active"] = bool((info.r != 1).any() or (info.d != 0).any())
    cbn_module._owner_of = real_owner_of
    out["registry_lookups_while_compiling"] = len(lookups)
    out["state_keys"] = sorted(model.state_dict())
    out["num_batches_tracked"] = [int(model[i].num_batches_tracked) for i in BN_LAYERS]
    if target == "cross_iteration":
        # what the history holds after the 3 steps: step 2 recorded (count = the global batch), compensably
        out["history"] = [(model[i].history_count.tolist(), model[i].history_compensable.tolist(),
                           int(model[i].history_filled)) for i in BN_LAYERS]
    out["match_errors"], out["reference_errors"] = match, reference
    out["counters"] = {k: dict(counters[k]) for k in ("graph_break", "recompiles", "stats", "aot_autograd", "inductor")}
    return out


def _compile_worker(rank: int, world: int) -> dict:
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1  # no pool of compile workers on a 2-core runner
    _Probe.install()
    ref = _reference_step1()
    results = {}
    for target, backend in CASES:
        t0 = time.perf_counter()
        res = _case(rank, target, backend, ref)
        res["seconds"] = round(time.perf_counter() - t0, 2)
        results[(target, backend)] = res
    return results


@pytest.fixture(scope="module")
def compile_results():
    t0 = time.perf_counter()
    results = run_distributed(_compile_worker, WORLD, timeout=TIMEOUT - 60, pg_timeout=300)
    print(f"\ncompile world: {time.perf_counter() - t0:.1f} s")
    for case in CASES:
        print(f"  {case}: {[r[case]['seconds'] for r in results]} s per rank; rank 0 steps (s): "
              f"{results[0][case]['step_seconds']}")
    return results


case_params = pytest.mark.parametrize("target, backend", CASES, ids=[f"{t}-{b}" for t, b in CASES])


@pytest.mark.timeout(TIMEOUT)
@case_params
def test_no_graph_break_and_one_graph(compile_results, target, backend):
    for rank, res in enumerate(compile_results):
        c = res[(target, backend)]["counters"]
        where = f"rank {rank}, {target}/{backend}"
        assert c["graph_break"] == {}, f"{where}: graph breaks {c['graph_break']}"
        assert c["recompiles"] == {}, f"{where}: recompiles {c['recompiles']}"
        assert res[(target, backend)]["registry_lookups_while_compiling"] == 0, where
        assert c["stats"].get("unique_graphs") == 1, f"{where}: dynamo stats {c['stats']}"
        # "total" may exceed 1: dynamo restarts an analysis to tensorify float scalars (not a graph break)
        assert c["aot_autograd"].get("ok") == 1 and not c["aot_autograd"].get("not_ok"), \
            f"{where}: aot_autograd {c['aot_autograd']}"


@pytest.mark.timeout(TIMEOUT)
@case_params
def test_forward_and_backward_compiled(compile_results, target, backend):
    for rank, res in enumerate(compile_results):
        r = res[(target, backend)]
        where = f"rank {rank}, {target}/{backend}"
        n_params = 2 * 2 + 2 * 2  # (weight, bias) of 2 convs and 2 norms
        assert r["nodes"]["compiled"] == ["AccumulateGrad"] * n_params + ["CompiledFunctionBackward"], \
            f"{where}: the compiled output's autograd graph is {r['nodes']['compiled']}"
        # the same probe tells the eager twin apart: its graph holds syncnorm's own autograd Function
        assert r["nodes"]["eager"].count("_NormalizeBackward") == 2, f"{where}: eager graph {r['nodes']['eager']}"
        if backend == "inductor":
            # two graphs went through inductor (compiled or loaded from its FX graph cache): forward and backward
            fx = {k: v for k, v in r["counters"]["inductor"].items() if k.startswith("fxgraph_cache_")}
            aot = r["counters"]["aot_autograd"]
            assert sum(fx.values()) == 2 or aot.get("autograd_cache_hit"), \
                f"{where}: inductor graphs {fx}, aot_autograd {aot}: expected forward + backward"


@pytest.mark.timeout(TIMEOUT)
@case_params
def test_compiled_training_matches_eager(compile_results, target, backend):
    for rank, res in enumerate(compile_results):
        r = res[(target, backend)]
        assert r["match_errors"] == [], f"rank {rank}: " + "\n".join(r["match_errors"])
        expected = {f"{i}.{b}" for i in BN_LAYERS for b in ("running_mean", "running_var", "num_batches_tracked")}
        if target == "cross_minibatch":
            expected |= {f"{i}.{b}" for i in BN_LAYERS
                         for b in ("window_count", "window_mean", "window_m2", "window_forwards")}
        assert expected <= set(r["state_keys"]), f"rank {rank}: state_dict keys {r['state_keys']}"
        assert r["num_batches_tracked"] == [STEPS, STEPS]
        if target == "renorm":
            assert r["renorm_active"], f"rank {rank}: r = 1 and d = 0 at step 1; the renorm case tests nothing"
        if target == "cross_iteration":
            # step 1 (before burn_in - (window - 1)) recorded nothing, step 2 filled the one slot (with the global
            # count), step 3 replaced it: the compiled model's history equals the eager one (checked above)
            n = float(sum(SIZES) * HW[0] * HW[1])
            assert r["history"] == [([n], [True], 1)] * 2, f"rank {rank}: history {r['history']}"


@pytest.mark.timeout(TIMEOUT)
@case_params
def test_compiled_model_synchronises(compile_results, target, backend):
    fwd = [("gloo:all_reduce", [[FWD_NUMEL]])] * 2
    if target == "cross_iteration":
        fwd = [("gloo:all_reduce", [[FWD_NUMEL + extra]]) for extra in CBN_EXTRA]
    bwd = [("gloo:all_reduce", [[BWD_NUMEL]])] * 2
    for rank, res in enumerate(compile_results):
        r = res[(target, backend)]
        where = f"rank {rank}, {target}/{backend}"
        assert r["reference_errors"] == [], f"{where}: " + "\n".join(r["reference_errors"])
        assert r["events"]["compiled"] == r["events"]["eager"] == {"fwd": fwd, "bwd": bwd}, \
            f"{where}: gloo collectives of step {STEPS}: {r['events']}"
        # the eager twin reaches gloo through torch.distributed.all_reduce; the compiled model never does (its
        # all-reduces are the functional collectives inside the compiled graphs)
        assert r["eager_calls"] == {"eager": [4] * STEPS, "compiled": [0] * STEPS}, f"{where}: {r['eager_calls']}"

