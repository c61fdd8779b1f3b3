"""AGD keeps torch.optim's contract: lr and the schedulers, standard state, copies, distributed
checkpoints, hooks, flags, add_param_group, compilation. Each expected step comes from the literal
transcription in agd_reference.py, never from the optimizer itself."""
import copy
import inspect
import io
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

from torch_agd.optim.reference import reference_step
from torch_agd import AGD, UsageError, init_weights_


def net():
    torch.manual_seed(0)
    return init_weights_(nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), nn.Conv1d(1, 3, 3, bias=False)))


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def moved_by(opt, params, seed):
    """One step on seeded gradients; returns (how far each tensor moved, the reference's move)."""
    set_grads(params, seed)
    before = [p.detach().clone() for p in params]
    expected, _ = reference_step(before, [p.grad for p in params], depth=opt.depth)
    opt.step()
    assert params  # a step of nothing moves nothing: the callers' loops would check nothing
    return ([torch.linalg.norm(p.detach() - b).item() for p, b in zip(params, before, strict=True)],
            [torch.linalg.norm(e - b.double()).item() for e, b in zip(expected, before, strict=True)])


# ---------------------------------------------------------------- lr and the schedulers

SCHEDULERS = {
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda e: 0.5 ** e),
    "MultiplicativeLR": lambda o: lr_scheduler.MultiplicativeLR(o, lambda e: 0.5),
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    "MultiStepLR": lambda o: lr_scheduler.MultiStepLR(o, milestones=[1, 2], gamma=0.5),
    "ConstantLR": lambda o: lr_scheduler.ConstantLR(o, factor=0.5, total_iters=2),
    "LinearLR": lambda o: lr_scheduler.LinearLR(o, start_factor=0.5, total_iters=2),
    "ExponentialLR": lambda o: lr_scheduler.ExponentialLR(o, gamma=0.5),
    "SequentialLR": lambda o: lr_scheduler.SequentialLR(o, [lr_scheduler.ConstantLR(o, factor=0.5, total_iters=1),
                                                            lr_scheduler.ExponentialLR(o, gamma=0.5)], milestones=[1]),
    "PolynomialLR": lambda o: lr_scheduler.PolynomialLR(o, total_iters=4, power=1.0),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=3),
    "ChainedScheduler": lambda o: lr_scheduler.ChainedScheduler([lr_scheduler.ConstantLR(o, factor=0.5, total_iters=2),
                                                                 lr_scheduler.ExponentialLR(o, gamma=0.9)]),
    "ReduceLROnPlateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5),
    "CyclicLR": lambda o: lr_scheduler.CyclicLR(o, base_lr=0.1, max_lr=1.0, step_size_up=2),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=10),
    "CosineAnnealingWarmRestarts": lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=2),
}


def test_the_table_covers_every_scheduler_torch_ships():
    shipped = {name for name, cls in inspect.getmembers(lr_scheduler, inspect.isclass)
               if issubclass(cls, lr_scheduler.LRScheduler) and not name.startswith("_") and name != "LRScheduler"}
    assert shipped <= set(SCHEDULERS)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_drives_the_update_by_lr(name):
    model = net()
    params = list(model.parameters())
    opt = AGD(model, depth="weights", direction="frobenius")
    scheduler = SCHEDULERS[name](opt)
    seen = set()
    for step in range(4):
        lr = opt.param_groups[0]["lr"]
        seen.add(lr)
        moved, reference = moved_by(opt, params, seed=step)
        for m, r in zip(moved, reference, strict=True):  # the reference's move is for lr = 1
            assert m == pytest.approx(lr * r, rel=1e-5)
        scheduler.step(1.0) if name == "ReduceLROnPlateau" else scheduler.step()
    assert len(seen) > 1  # it did schedule something


def test_a_factor_of_one_half_halves_the_update():
    model = net()
    params = list(model.parameters())
    opt = AGD(model, depth="weights", direction="frobenius")
    lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=5)
    moved, reference = moved_by(opt, params, seed=0)
    for m, r in zip(moved, reference, strict=True):
        assert m == pytest.approx(0.5 * r, rel=1e-6)


def test_lr_and_gain_multiply_and_are_read_at_step_time():
    model = net()
    params = list(model.parameters())
    opt = AGD(model, lr=0.25, gain=3.0, depth="weights", direction="frobenius")
    for step, (lr, gain) in enumerate([(0.25, 3.0), (2.0, 1.0), (0.1, 10.0)]):
        opt.param_groups[0].update(lr=lr, gain=gain)
        moved, reference = moved_by(opt, params, seed=step)
        for m, r in zip(moved, reference, strict=True):
            assert m == pytest.approx(lr * gain * r, rel=1e-6)
    assert len(opt._cache["plans"]) == 1  # neither lr nor gain is part of a cached layout


@pytest.mark.parametrize("kind", ["tensor", "float"])
def test_a_tensor_lr_changes_without_recompiling_the_step(kind):
    from torch._dynamo.testing import CompileCounter

    model = net()
    params = list(model.parameters())
    lr = torch.tensor(1.0) if kind == "tensor" else 1.0
    opt = AGD(model, lr=lr, depth="weights", direction="frobenius")
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter, fullgraph=True)
    frames = []
    for i, value in enumerate([1.0, 1.0, 0.5, 0.125]):
        if kind == "tensor":
            lr.fill_(value)
        else:
            opt.param_groups[0]["lr"] = value
        set_grads(params, i)
        before = [p.detach().clone() for p in params]
        expected, _ = reference_step(before, [p.grad for p in params], depth=opt.depth)
        step()
        frames.append(counter.frame_count)
        for p, b, e in zip(params, before, expected, strict=True):
            torch.testing.assert_close(p.detach().double() - b.double(), value * (e - b.double()), rtol=1e-5, atol=1e-7)
    # the first step creates eta and the counters, so the second is compiled anew; after that the
    # lr is an input of the graph (a tensor; a float is not specialised either)
    assert frames[1] == frames[-1]


# ---------------------------------------------------------------- standard state


def test_state_is_torch_native():
    model = net()
    opt = AGD(model, gain=2.0, depth=5, direction="frobenius")
    set_grads(model.parameters(), 0)
    opt.step()
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert set(sd["state"]) == {0} and set(sd["state"][0]) == {"eta", "steps", "skipped_steps"}
    group = sd["param_groups"][0]
    assert {group[k] for k in ("gain", "depth", "lr")} == {2.0, 5, 1.0}
    assert "gain: 2.0" in repr(opt) and "depth: 5" in repr(opt)


def test_state_dict_round_trip_through_weights_only_load():
    a, b = net(), net()
    opt_a = AGD(a, gain=3.0, depth=7, direction="frobenius")
    set_grads(a.parameters(), 0)
    opt_a.step()
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(a.state_dict())
    opt_b = AGD(b, direction="frobenius")
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    assert opt_b.depth == 7 and opt_b.param_groups[0]["gain"] == 3.0 and opt_b.steps.item() == 1
    assert opt_b.steps.dtype == opt_b.skipped_steps.dtype == torch.int64
    for m, o in ((a, opt_a), (b, opt_b)):
        set_grads(m.parameters(), 1)
        o.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(opt_a.eta, opt_b.eta)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_step_like_the_original(how):
    model = net()
    opt = AGD(model, momentum=0.5, direction="frobenius")
    set_grads(model.parameters(), 0)
    opt.step()
    copied = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    for o in (opt, copied):
        set_grads([p for g in o.param_groups for p in g["params"]], 1)
        o.step()
    for p, q in zip((p for g in opt.param_groups for p in g["params"]),
                    (p for g in copied.param_groups for p in g["params"]), strict=True):
        assert torch.equal(p, q)
    assert copied.steps.item() == 2


def test_distributed_checkpoint_round_trip(tmp_path):
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    a = net()
    opt_a = AGD(a, momentum=0.9, gain=2.0, direction="frobenius")
    set_grads(a.parameters(), 0)
    opt_a.step()
    model_sd, optim_sd = get_state_dict(a, opt_a)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))
    b = net()
    with torch.no_grad():
        for p in b.parameters():
            p.zero_()
    opt_b = AGD(b, momentum=0.9, direction="frobenius")
    set_grads(b.parameters(), 5)
    opt_b.step()  # state to be overwritten
    model_sd, optim_sd = get_state_dict(b, opt_b)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=str(tmp_path))
    set_state_dict(b, opt_b, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    assert opt_b.param_groups[0]["gain"] == 2.0 and opt_b.steps.item() == 1
    for m, o in ((a, opt_a), (b, opt_b)):
        set_grads(m.parameters(), 1)
        o.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- flags, hooks, groups


def test_maximize_ascends_by_the_same_step():
    up, down = net(), net()
    opt_up, opt_down = AGD(up, maximize=True, direction="frobenius"), AGD(down, direction="frobenius")
    set_grads(up.parameters(), 0)
    set_grads(down.parameters(), 0)
    start = [p.detach().clone() for p in up.parameters()]
    opt_up.step()
    opt_down.step()
    for s, u, d in zip(start, up.parameters(), down.parameters(), strict=True):
        torch.testing.assert_close(u - s, -(d - s))
        assert not torch.equal(u, s)


def test_flags_are_keyword_only():
    with pytest.raises(TypeError):
        AGD(net().parameters(), 1.0, 2.0, direction="frobenius")
    params = inspect.signature(AGD).parameters
    assert [n for n, p in params.items() if p.kind is not p.KEYWORD_ONLY] == ["params", "lr"]


@pytest.mark.parametrize("bad,needle", [(dict(lr=0.0), "lr"), (dict(lr=float("nan")), "lr"), (dict(gain=-1.0), "gain"),
                                        (dict(momentum=1.0), "momentum"), (dict(depth=0), "depth"),
                                        (dict(depth="layers"), "depth"), (dict(lr=torch.ones(2)), "lr")])
def test_bad_values_are_one_line_errors_in_the_constructor_and_in_add_param_group(bad, needle):
    with pytest.raises(UsageError, match=needle) as err:
        AGD(net(), **bad, direction="frobenius")
    assert "\n" not in str(err.value)
    opt = AGD([torch.randn(3, 3, requires_grad=True)], direction="frobenius")
    if "depth" in bad:
        needle = "depth"
    with pytest.raises(UsageError, match=needle):
        opt.add_param_group({"params": [torch.randn(2, 2, requires_grad=True)], **bad})


def test_hooks_run_around_the_step():
    model = net()
    opt = AGD(model, direction="frobenius")
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", o.steps)))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", o.steps.item())))
    set_grads(model.parameters(), 0)
    opt.step()
    assert seen == [("pre", None), ("post", 1)]


_EAGER_JOB = """
import sys, torch
from torch_agd import AGD
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
opt = AGD(model)
model(torch.randn(3, 4)).square().mean().backward()
opt.step()
opt.zero_grad()
opt.load_state_dict(opt.state_dict())
{after}
print(sorted(name for name in ("torch._dynamo", "torch.distributed.tensor") if name in sys.modules))
"""


def test_an_eager_job_imports_neither_dynamo_nor_dtensor():
    """Their imports cost a short CPU job 1.2 s and 0.75 s of start-up (benchmarks/throughput.py)."""
    run = subprocess.run([sys.executable, "-c", _EAGER_JOB.format(after="")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_once_dynamo_is_loaded_the_methods_keep_torch_optims_dynamo_guard():
    # torch._disable_dynamo caches the guarded function on the plain one at its first call
    after = """import torch._dynamo
opt.zero_grad(); opt.state_dict()
plain = torch.optim.Optimizer
assert all(hasattr(getattr(plain, m).__wrapped__, "__dynamo_disable") for m in ("zero_grad", "state_dict"))"""
    run = subprocess.run([sys.executable, "-c", _EAGER_JOB.format(after=after)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr  # the assert inside the job

def test_zero_grad_and_closure():
    model = net()
    opt = AGD(model, direction="frobenius")
    x = torch.randn(4, 1, 6)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    first = opt.step(closure)
    assert first.item() > opt.step(closure).item()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
