"""AGD's momentum: both forms against a literal reference, skipped steps, schedulers driving it,
compilation, and state that survives a round trip."""
import copy
import io
import math

import pytest
import torch
from torch import nn

from torch_agd.optim.reference import reference_momentum_steps, s_of, submatrices
from torch_agd import AGD, init_weights_

FOREACH = [pytest.param(True, id="foreach"), pytest.param(False, id="loop")]
SHAPES = [(8, 5), (6, 8, 3, 3), (4, 6)]


def _grads(steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] for _ in range(steps)]


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "heavy-ball"])
def test_momentum_takes_the_literal_steps(nesterov, foreach):
    torch.manual_seed(0)
    start = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    steps = _grads(4)
    expected = reference_momentum_steps(start, steps, 0.9, nesterov=nesterov)
    ws = [w.clone().requires_grad_() for w in start]
    opt = AGD(ws, momentum=0.9, nesterov=nesterov, foreach=foreach, direction="frobenius")
    for grads in steps:
        for w, g in zip(ws, grads, strict=True):
            w.grad = g.clone()
        opt.step()
    for w, e in zip(ws, expected, strict=True):
        torch.testing.assert_close(w.detach(), e, rtol=1e-12, atol=1e-12)
    # and it is not the plain rule: the reference without momentum lands elsewhere
    plain = reference_momentum_steps(start, steps, 0.0)
    assert not torch.allclose(ws[0].detach(), plain[0])


def test_momentum_zero_keeps_no_state():
    ws = [torch.randn(s, requires_grad=True) for s in SHAPES]
    opt = AGD(ws, direction="frobenius")
    for w in ws:
        w.grad = torch.randn(w.shape)
    opt.step()
    assert all("momentum_buffer" not in opt.state[w] for w in ws)


@pytest.mark.parametrize("masked", [False, True], ids=["cpu-branch", "masked"])
@pytest.mark.parametrize("foreach", FOREACH)
def test_a_skipped_step_leaves_the_weights_and_clears_the_buffers(foreach, masked, monkeypatch):
    if masked:  # the branch-free path of CUDA and torch.compile
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.manual_seed(0)
    start = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    steps = _grads(4)
    steps[1][2][0, 0] = math.inf
    expected = reference_momentum_steps(start, steps, 0.5)
    ws = [w.clone().requires_grad_() for w in start]
    opt = AGD(ws, momentum=0.5, foreach=foreach, direction="frobenius")
    for i, grads in enumerate(steps):
        for w, g in zip(ws, grads, strict=True):
            w.grad = g.clone()
        opt.step()
        if i == 1:
            assert all(torch.equal(opt.state[w]["momentum_buffer"], torch.zeros_like(w)) for w in ws)
    assert opt.skipped_steps.item() == 1
    for w, e in zip(ws, expected, strict=True):
        torch.testing.assert_close(w.detach(), e, rtol=1e-12, atol=1e-12)


def test_one_cycle_drives_the_momentum():
    torch.manual_seed(0)
    start = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    steps = _grads(3)
    ws = [w.clone().requires_grad_() for w in start]
    opt = AGD(ws, momentum=0.9, direction="frobenius")
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10, base_momentum=0.5,
                                                    max_momentum=0.9)
    # replayed by hand beside it: each step with the lr and momentum the scheduler set for it
    w_ref, bufs, betas = [w.clone() for w in start], [torch.zeros_like(w) for w in start], []
    for grads in steps:
        lr, beta = opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]
        betas.append(beta)
        G = sum(s_of(w.shape) * torch.linalg.norm(g[idx]).item() for w, g in zip(w_ref, grads, strict=True)
                for idx in submatrices(g)) / len(SHAPES)
        eta = math.log((1 + math.sqrt(1 + 4 * G)) / 2)
        bufs = [beta * m + g for m, g in zip(bufs, grads, strict=True)]
        for w, g, m in zip(w_ref, grads, bufs, strict=True):
            d = g + beta * m
            for idx in submatrices(d):
                w[idx] -= lr * eta / len(SHAPES) * s_of(w.shape) * d[idx] / torch.linalg.norm(d[idx])
        for w, g in zip(ws, grads, strict=True):
            w.grad = g.clone()
        opt.step()
        scheduler.step()
    assert len(set(betas)) == 3  # it did change the momentum
    for w, e in zip(ws, w_ref, strict=True):
        torch.testing.assert_close(w.detach(), e, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_momentum_step_compiles_fullgraph_and_matches_eager():
    torch.manual_seed(0)
    net = init_weights_(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.Flatten(), nn.Linear(8 * 9 * 9, 5, bias=False)))
    twin = copy.deepcopy(net)
    eager, comp = AGD(net, momentum=0.9, direction="frobenius"), AGD(twin, momentum=0.9, direction="frobenius")
    step = torch.compile(comp.step, fullgraph=True)
    x = torch.randn(4, 3, 11, 11)
    for i in range(3):
        for n, o in ((net, eager), (twin, comp)):
            o.zero_grad()
            n(x).square().mean().backward()
        if i == 1:
            net[0].weight.grad[0, 0, 0, 0] = twin[0].weight.grad[0, 0, 0, 0] = math.nan
        eager.step()
        step()
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert comp.skipped_steps.item() == 1


def test_buffers_survive_a_state_dict_round_trip():
    torch.manual_seed(0)
    a = [torch.randn(s, requires_grad=True) for s in SHAPES]
    b = [w.detach().clone().requires_grad_() for w in a]
    opt_a = AGD(a, momentum=0.9, direction="frobenius")
    steps = _grads(3)
    for grads in steps[:2]:
        for w, g in zip(a, grads, strict=True):
            w.grad = g.float()
        opt_a.step()
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    with torch.no_grad():
        for x, y in zip(b, a, strict=True):
            x.copy_(y)
    opt_b = AGD(b, direction="frobenius")
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    assert opt_b.param_groups[0]["momentum"] == 0.9
    for ws, o in ((a, opt_a), (b, opt_b)):
        for w, g in zip(ws, steps[2], strict=True):
            w.grad = g.float()
        o.step()
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
