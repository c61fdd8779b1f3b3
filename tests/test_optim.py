"""AGD's step: the shared test vectors, equivalence of both paths with a literal transcription of
the spec, the paper's invariants as properties, edge cases, errors, state and compilation."""
import copy
import io
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torch_agd.optim.reference import reference_step, s_of, submatrices
from torch_agd import AGD, UsageError, init_weights_

VECTORS = json.loads((Path(__file__).parent / "data" / "agd_steps.json").read_text())["cases"]
FOREACH = [pytest.param(True, id="foreach"), pytest.param(False, id="loop")]


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("case", VECTORS, ids=[c["name"] for c in VECTORS])
def test_shared_vectors(case, foreach):
    ws = [torch.tensor(w, dtype=torch.float64, requires_grad=True) for w in case["weights"]]
    for w, g in zip(ws, case["grads"], strict=True):
        w.grad = torch.tensor(g, dtype=torch.float64)
    opt = AGD(ws, gain=case["gain"], depth=case["depth"], foreach=foreach, direction="frobenius")
    opt.step()
    assert opt.eta.item() == pytest.approx(case["eta"], rel=1e-12)
    assert len(ws) == len(case["expected"]) >= 1
    for w, e in zip(ws, case["expected"], strict=True):
        torch.testing.assert_close(w.detach(), torch.tensor(e, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def linear_net():
    return nn.Sequential(nn.Linear(12, 32, bias=False), nn.ReLU(), nn.Linear(32, 32, bias=False),
                         nn.ReLU(), nn.Linear(32, 5, bias=False))


def conv_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, bias=False),
                         nn.ReLU(), nn.Conv2d(16, 16, 1, bias=False), nn.Flatten(), nn.Linear(16 * 16, 5, bias=False))


NETS = {"linear": (linear_net, (16, 12)), "conv": (conv_net, (16, 3, 11, 11))}


def loss_of(net, x, y):
    return (net(x) - y).square().mean()


@pytest.mark.parametrize("name", NETS)
def test_fast_loop_and_literal_spec_agree_over_steps(name):
    build, in_shape = NETS[name]
    torch.manual_seed(0)
    fast = init_weights_(build())
    loop = copy.deepcopy(fast)
    opt_fast, opt_loop = AGD(fast, foreach=True, direction="frobenius"), AGD(loop, foreach=False, direction="frobenius")
    for step in range(5):
        x, y = torch.randn(in_shape), torch.randn(in_shape[0], 5)
        for net, opt in ((fast, opt_fast), (loop, opt_loop)):
            opt.zero_grad()
            loss_of(net, x, y).backward()
        before = [p.detach().clone() for p in fast.parameters()]
        grads = [p.grad.clone() for p in fast.parameters()]
        opt_fast.step()
        opt_loop.step()
        expected, eta = reference_step(before, grads)
        assert opt_fast.eta.item() == pytest.approx(eta, rel=1e-5)
        assert opt_loop.eta.item() == pytest.approx(eta, rel=1e-5)
        for p, q, e in zip(fast.parameters(), loop.parameters(), expected, strict=True):
            torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


shapes = st.lists(st.integers(1, 6), min_size=2, max_size=5).map(tuple)


@settings(max_examples=40, deadline=None)
@given(shape_list=st.lists(shapes, min_size=1, max_size=4), log_scale=st.floats(-6, 6),
       gain=st.floats(0.1, 10), foreach=st.booleans(), seed=st.integers(0, 2**16))
def test_each_submatrix_moves_by_gain_eta_over_L_times_s(shape_list, log_scale, gain, foreach, seed):
    # eta comes from the literal transcription, so a step that got eta wrong (or 0) fails here
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, dtype=torch.float64, generator=gen).requires_grad_() for s in shape_list]
    for w in ws:
        w.grad = torch.randn(w.shape, dtype=torch.float64, generator=gen) * 10.0 ** log_scale
    before = [w.detach().clone() for w in ws]
    _, eta = reference_step(before, [w.grad for w in ws], gain=gain)
    opt = AGD(ws, gain=gain, foreach=foreach, direction="frobenius")
    opt.step()
    L = len(ws)
    assert opt.eta.item() == pytest.approx(eta, rel=1e-9)
    for w, b in zip(ws, before, strict=True):
        for idx in submatrices(w):
            moved = torch.linalg.norm(w.detach()[idx] - b[idx]).item()
            assert moved == pytest.approx(gain * eta / L * s_of(w.shape), rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(shape_list=st.lists(shapes, min_size=1, max_size=3), factor=st.floats(1e-3, 1e3),
       foreach=st.booleans(), seed=st.integers(0, 2**16))
def test_update_direction_ignores_loss_scale(shape_list, factor, foreach, seed):
    # The same gradients scaled by c move the weights along the same directions, by the amounts
    # the literal transcription gives for each scale (eta grows with c, the directions do not).
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(s, dtype=torch.float64, generator=gen) for s in shape_list]
    for c in (1.0, factor):
        ws = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in shape_list]
        for w, g in zip(ws, grads, strict=True):
            w.grad = g * c
        expected, _ = reference_step([w.detach() for w in ws], [g * c for g in grads])
        opt = AGD(ws, foreach=foreach, direction="frobenius")
        opt.step()
        for w, e in zip(ws, expected, strict=True):
            torch.testing.assert_close(w.detach(), e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("foreach", FOREACH)
def test_zero_and_missing_gradients(foreach):
    ws = [torch.randn(4, 3, 3, requires_grad=True), torch.randn(5, 4, requires_grad=True),
          torch.randn(6, 5, requires_grad=True)]
    ws[0].grad = torch.randn(4, 3, 3)
    ws[0].grad[:, :, 1] = 0  # one zero kernel slice
    ws[1].grad = torch.zeros(5, 4)
    before = [w.detach().clone() for w in ws]
    opt = AGD(ws, foreach=foreach, direction="frobenius")
    opt.step()  # ws[2].grad is None: skipped
    assert torch.equal(ws[0][:, :, 1], before[0][:, :, 1])
    assert not torch.equal(ws[0][:, :, 0], before[0][:, :, 0])
    assert torch.equal(ws[1], before[1]) and torch.equal(ws[2], before[2])
    assert all(torch.isfinite(w).all() for w in ws)
    # no per-parameter state: only eta and the two counters, 0-d, in the first parameter's state
    assert opt.depth == 3 and list(opt.state) == [ws[0]]
    assert {k: v.dim() for k, v in opt.state[ws[0]].items()} == {"eta": 0, "steps": 0, "skipped_steps": 0}


def test_step_with_no_gradients_does_nothing_and_returns_closure_loss():
    w = torch.randn(3, 3, requires_grad=True)
    opt = AGD([w], direction="frobenius")
    assert opt.step(lambda: torch.tensor(7.0)).item() == 7.0
    assert opt.eta is None and opt.steps is None


def test_closure_loss_is_returned_and_used():
    torch.manual_seed(0)
    net = init_weights_(linear_net())
    opt = AGD(net, direction="frobenius")
    x, y = torch.randn(8, 12), torch.randn(8, 5)

    def closure():
        opt.zero_grad()
        loss = loss_of(net, x, y)
        loss.backward()
        return loss

    with torch.no_grad():
        initial = loss_of(net, x, y).item()
    first = opt.step(closure)
    assert first.item() == pytest.approx(initial)
    assert opt.steps.item() == 1 and loss_of(net, x, y).item() < initial


@pytest.mark.parametrize("masked", [False, True], ids=["cpu-branch", "masked"])
@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_gradient_leaves_every_weight_unchanged(bad, foreach, masked, monkeypatch):
    if masked:  # exercise the branch-free path that CUDA and torch.compile take
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    ws = [torch.randn(4, 3, requires_grad=True), torch.randn(2, 4, 3, 3, requires_grad=True)]
    for w in ws:
        w.grad = torch.randn(w.shape)
    opt = AGD(ws, foreach=foreach, direction="frobenius")
    opt.step()
    good = [w.detach().clone() for w in ws]
    ws[1].grad[0, 1, 2, 2] = bad
    opt.step()
    for w, g in zip(ws, good, strict=True):
        assert torch.equal(w.detach(), g)
    assert opt.skipped_steps.item() == 1 and opt.steps.item() == 2 and opt.eta.item() == 0.0
    ws[1].grad = torch.randn(ws[1].shape)
    opt.step()
    assert opt.skipped_steps.item() == 1 and not torch.equal(ws[0].detach(), good[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("foreach", FOREACH)
def test_half_precision_gradients_accumulate_in_float32(dtype, foreach):
    torch.manual_seed(0)
    # Weights start at zero, so each one ends at its update: the comparison's tolerance is a few
    # half-precision ulps of the update itself, not of a weight a thousand times larger. The
    # 128x64x3x3 weight is large enough for the CPU fast path's accumulator.
    shapes = [(64, 32), (16, 64, 3, 3), (128, 64, 3, 3)]
    ws = [torch.zeros(s, dtype=dtype, requires_grad=True) for s in shapes]
    for w in ws:
        w.grad = (torch.randn(w.shape) * 1e-3).to(dtype)
    expected, eta = reference_step([w.detach() for w in ws], [w.grad for w in ws])
    opt = AGD(ws, foreach=foreach, direction="frobenius")
    opt.step()
    assert opt.eta.dtype == torch.float32
    assert opt.eta.item() == pytest.approx(eta, rel=1e-5)
    info = torch.finfo(dtype)  # half an ulp of rounding either side; fp16 subnormals have a fixed spacing
    for w, e in zip(ws, expected, strict=True):
        assert (e != 0).double().mean() > 0.99  # (nearly) every entry moves: unchanged weights fail below
        torch.testing.assert_close(w.detach().double(), e, rtol=info.eps, atol=info.tiny * info.eps)


def test_param_groups_with_their_own_gain():
    torch.manual_seed(0)
    a, b = torch.randn(6, 4, requires_grad=True), torch.randn(3, 6, requires_grad=True)
    a.grad, b.grad = torch.randn(6, 4), torch.randn(3, 6)
    before = [a.detach().clone(), b.detach().clone()]
    opt = AGD([{"params": [a]}, {"params": [b], "gain": 10.0}], gain=1.0, direction="frobenius")
    opt.step()
    _, eta = reference_step(before, [a.grad, b.grad])
    for w, w0, gain in ((a, before[0], 1.0), (b, before[1], 10.0)):
        moved = torch.linalg.norm(w.detach() - w0).item()
        assert moved == pytest.approx(gain * eta / 2 * s_of(w.shape), rel=1e-5)


@pytest.mark.parametrize("foreach", FOREACH)
def test_mixed_dtypes_take_the_reference_step(foreach):
    # The fast path works per (device, dtype) bucket; buckets of identical shapes must not mix.
    torch.manual_seed(0)
    ws = [torch.randn(s, dtype=d) for d in (torch.float32, torch.float64) for s in ((8, 6), (4, 8, 3, 3))]
    gs = [torch.randn(w.shape, dtype=w.dtype) for w in ws]
    expected, eta = reference_step(ws, gs)
    params = [w.clone().requires_grad_() for w in ws]
    opt = AGD(params, foreach=foreach, direction="frobenius")
    for _ in range(2):  # the second step reuses the cached layouts
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
        assert opt.eta.item() == pytest.approx(eta, rel=1e-6)
        for p, e in zip(params, expected, strict=True):
            torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-6)
        expected, eta = reference_step([p.detach() for p in params], gs)


def test_depth_overrides_L():
    w = torch.randn(5, 5, requires_grad=True)
    w.grad = torch.randn(5, 5)
    w0 = w.detach().clone()
    opt = AGD([w], depth=4, direction="frobenius")
    opt.step()
    expected, eta = reference_step([w0], [w.grad], depth=4)
    torch.testing.assert_close(w.detach().double(), expected[0], rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_then_identical_steps():
    torch.manual_seed(0)
    net = init_weights_(conv_net())
    opt = AGD(net, gain=3.0, depth=7, direction="frobenius")
    x, y = torch.randn(4, 3, 11, 11), torch.randn(4, 5)
    for _ in range(2):
        opt.zero_grad()
        loss_of(net, x, y).backward()
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    net2 = conv_net()
    net2.load_state_dict(saved["model"])
    opt2 = AGD(net2, direction="frobenius")
    opt2.load_state_dict(saved["opt"])
    assert opt2.depth == 7 and opt2.param_groups[0]["gain"] == 3.0
    assert opt2.steps.item() == 2 and torch.equal(opt2.eta, opt.eta) and opt2.skipped_steps.item() == 0
    for n, o in ((net, opt), (net2, opt2)):
        o.zero_grad()
        loss_of(n, x, y).backward()
        o.step()
    for p, q in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_construction_rejects_scalars_bad_gain_and_depth():
    with pytest.raises(UsageError, match="0-D"):
        AGD([torch.randn((), requires_grad=True)], direction="frobenius")
    with pytest.raises(UsageError, match="param_groups\\[0\\]\\['params'\\]\\[1\\]"):
        AGD([torch.randn(2, 2, requires_grad=True), torch.randn(3, requires_grad=True)], direction="frobenius")
    for gain in (0, -1.0, math.nan):
        with pytest.raises(UsageError, match="gain"):
            AGD([torch.randn(2, 2, requires_grad=True)], gain=gain, direction="frobenius")
    with pytest.raises(UsageError, match="depth"):
        AGD([torch.randn(2, 2, requires_grad=True)], depth=0, direction="frobenius")


def test_sparse_gradient_is_a_clear_error():
    w = torch.randn(4, 3, requires_grad=True)
    w.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(UsageError, match="sparse"):
        AGD([w], direction="frobenius").step()


@pytest.mark.slow
def test_step_compiles_fullgraph_and_matches_eager():
    torch.manual_seed(0)
    eager_net = init_weights_(conv_net())
    comp_net = copy.deepcopy(eager_net)
    eager, comp = AGD(eager_net, direction="frobenius"), AGD(comp_net, direction="frobenius")
    compiled_step = torch.compile(comp.step, fullgraph=True)
    x, y = torch.randn(4, 3, 11, 11), torch.randn(4, 5)
    for i in range(3):
        for net, opt in ((eager_net, eager), (comp_net, comp)):
            opt.zero_grad()
            loss_of(net, x, y).backward()
        if i == 1:  # a non-finite step must be skipped inside the graph too
            eager_net[0].weight.grad[0, 0, 0, 0] = math.nan
            comp_net[0].weight.grad[0, 0, 0, 0] = math.nan
        eager.step()
        compiled_step()
    for p, q in zip(eager_net.parameters(), comp_net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert comp.steps.item() == 3 and comp.skipped_steps.item() == 1
    torch.testing.assert_close(comp.eta, eager.eta)


# The 64x1x65x65 weight has rows longer than the CPU accumulator holds.
LARGE = [(256, 256, 3, 3), (1024, 32, 3, 3), (96, 64, 1, 2), (40, 40, 3, 3, 3), (64, 1, 65, 65), (10, 128)]
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def large_weights(layout):
    """Conv weights big enough for the CPU fast path's row views and L2-sized accumulator (with
    a partial last block of rows), in the memory layout a model converted to it would have."""
    ws = [torch.randn(s) for s in LARGE]
    gs = [torch.randn(s) for s in LARGE]
    if layout == "channels_last":
        ws = [w.to(memory_format=CHANNELS_LAST[w.dim()]) if w.dim() in CHANNELS_LAST else w for w in ws]
        gs = [g.to(memory_format=CHANNELS_LAST[g.dim()]) if g.dim() in CHANNELS_LAST else g for g in gs]
    return ws, gs


@pytest.mark.parametrize("masked", [False, True], ids=["cpu-branch", "masked"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_conv_weights_take_the_same_step(layout, masked, monkeypatch):
    if masked:  # the path CUDA and torch.compile take: plain norms, masked gradients
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.manual_seed(0)
    ws, gs = large_weights(layout)
    expected, eta = reference_step(ws, gs, gain=2.0)
    for foreach in (True, False):
        params = [w.clone().requires_grad_() for w in ws]
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt = AGD(params, gain=2.0, foreach=foreach, direction="frobenius")
        opt.step()
        assert opt.eta.item() == pytest.approx(eta, rel=1e-6)
        for p, e in zip(params, expected, strict=True):
            torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-6)


# The large conv shapes (>= 65536 entries) of these d_out x d_in x kernel: drawn from directly, not
# filtered with assume() (most combinations are small, and filtering them out tripped Hypothesis's
# filter_too_much health check at random).
LARGE_CONV_SHAPES = [(d_out, d_in, *kernel) for d_out in (3, 17, 64, 100, 129, 256, 511)
                     for d_in in (1, 5, 32, 96, 130, 257) for kernel in ((1, 2), (3, 3), (2, 5), (3, 1, 3))
                     if d_out * d_in * math.prod(kernel) >= 65536]


@settings(max_examples=12, deadline=None)
@given(shape=st.sampled_from(LARGE_CONV_SHAPES), layout=st.sampled_from(["contiguous", "channels_last"]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_fast_path_matches_the_loop_on_large_conv_shapes(shape, layout, dtype, seed):
    # Any large conv weight, whatever its row length and layout, goes through the CPU fast path's
    # row views and workspace norms; the per-tensor loop is the check.
    d_out = shape[0]
    gen = torch.Generator().manual_seed(seed)
    w, g = (torch.randn(shape, dtype=dtype, generator=gen) for _ in range(2))
    if layout == "channels_last":
        fmt = CHANNELS_LAST[len(shape)]
        w, g = w.to(memory_format=fmt), g.to(memory_format=fmt)
    head = torch.randn(7, d_out, dtype=dtype, generator=gen)
    results = []
    for foreach in (True, False):
        p, q = w.clone().requires_grad_(), head.clone().requires_grad_()
        p.grad, q.grad = g.clone(), torch.ones_like(head)
        opt = AGD([p, q], foreach=foreach, direction="frobenius")
        opt.step()
        results.append((opt.eta.item(), p.detach()))
    (eta_fast, fast), (eta_loop, loop) = results
    assert eta_fast == pytest.approx(eta_loop, rel=1e-5)
    torch.testing.assert_close(fast, loop, rtol=1e-5, atol=1e-6)


def test_fast_path_follows_layout_changes_between_steps():
    # The fast path caches each layout's plan: a gradient that goes missing, changes memory
    # format or gets a different gain must get a fresh one, never a stale one.
    torch.manual_seed(0)
    ws, gs = large_weights("contiguous")
    params = [w.clone().requires_grad_() for w in ws]
    opt = AGD(params, direction="frobenius")
    cases = [
        list(gs),
        [None, *gs[1:]],
        [gs[0].to(memory_format=torch.channels_last), *gs[1:]],
        [*gs[:-1], gs[-1].t().contiguous().t()],  # a column-major linear gradient
        list(gs),
    ]
    for i, grads in enumerate(cases):
        if i == 4:
            opt.param_groups[0]["gain"] = 3.0
        used = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
        expected, eta = reference_step([p for p, _ in used], [g for _, g in used],
                                       gain=opt.param_groups[0]["gain"], depth=len(params))
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()
        assert opt.eta.item() == pytest.approx(eta, rel=1e-6), f"step {i}"
        for (p, _), e in zip(used, expected, strict=True):
            torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_never_syncs_and_matches_the_cpu():
    torch.manual_seed(0)
    cpu = [torch.randn(64, 32, 3, 3), torch.randn(10, 64 * 9), torch.randn(256, 128, 3, 3)]
    grads = [torch.randn(w.shape) for w in cpu]
    grads[0][:, :, 1, 1] = 0  # a zero slice on the device path too
    on_cpu = [w.clone().requires_grad_() for w in cpu]
    on_gpu = [w.cuda().requires_grad_() for w in cpu]
    for a, b, g in zip(on_cpu, on_gpu, grads, strict=True):
        a.grad, b.grad = g.clone(), g.cuda()
    opt_cpu, opt_gpu = AGD(on_cpu, direction="frobenius"), AGD(on_gpu, direction="frobenius")
    opt_cpu.step()
    opt_gpu.step()  # first step allocates eta and the counters
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt_gpu.step()
        on_gpu[1].grad[0, 0] = math.nan
        opt_gpu.step()  # skipped, without looking at G on the host
    finally:
        torch.cuda.set_sync_debug_mode("default")
    opt_cpu.step()
    assert opt_gpu.skipped_steps.item() == 1 and opt_gpu.steps.item() == 3
    for a, b in zip(on_cpu, on_gpu, strict=True):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-5, atol=1e-6)
