"""AGD(..., direction="orthogonal"): Newton–Schulz against U Vᵀ by SVD, and the step against the
literal reference_orthogonal_step (the reference given the same orthogonaliser, for an exact
comparison, and SVD's for a comparison within Newton–Schulz's band), on every path and kind."""
import copy
import io
import math

import pytest
import torch
from torch import nn

from test_rules import CASES
from test_rules_zoo import Experts
from torch_agd import AGD, UsageError, agd
from torch_agd.models.charlm import CharLM
from torch_agd.optim.orthogonalize import newton_schulz
from torch_agd.optim.reference import (norm_blocks, polar_by_svd, reference_orthogonal_step, stacked_blocks,
                                       weight_blocks)
from torch_agd.optim.rules import module_param_groups

FOREACH = [pytest.param(True, id="foreach"), pytest.param(False, id="loop")]
# Five quintic steps from a normalised singular value >= 3e-3 end in [0.6818, 1.2024] (the scalar
# map, scanned); below, small singular values are not yet lifted.
BAND = (0.68, 1.21)
MATRIX_KINDS = {"weight": "matrix", "attention": "matrix", "stacked": "matrix", "weight_t": "matrix_t",
                "stacked_t": "matrix_t"}


# ---------------------------------------------------------------- Newton–Schulz against U Vᵀ


def well_conditioned(shape, lo=0.1, generator=None):
    """A random (batch of) matrix with singular values spread over [lo, 1]."""
    *batch, m, n = shape
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(*batch, m, r, dtype=torch.float64, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(*batch, n, r, dtype=torch.float64, generator=generator))
    s = torch.linspace(lo, 1, r, dtype=torch.float64)
    return u @ torch.diag_embed(s.expand(*batch, r)) @ v.mT


@pytest.mark.parametrize("shape", [(8, 8), (16, 5), (5, 16), (3, 12, 7), (2, 4, 6, 9), (1, 1), (40, 3)])
def test_newton_schulz_keeps_the_singular_vectors_and_lands_the_values_in_its_band(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, generator=g)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    n = newton_schulz(x)
    assert n.shape == x.shape and n.dtype == torch.float64
    d = u.mT @ n @ vh.mT  # diagonal exactly when n = U f(S) Vᵀ
    diag = torch.diagonal(d, dim1=-2, dim2=-1)
    assert (d - torch.diag_embed(diag)).abs().max() < 1e-10
    kept = s / torch.linalg.vector_norm(s, dim=-1, keepdim=True) >= 3e-3
    assert kept.any()
    assert diag[kept].min() >= BAND[0] and diag[kept].max() <= BAND[1]
    # so within the band of U Vᵀ itself, in the spectral norm
    err = torch.linalg.matrix_norm(n - polar_by_svd(x), ord=2)
    assert (err[kept.all(-1)] <= 0.33).all()


def test_newton_schulz_of_well_conditioned_matrices_is_near_u_v_transposed():
    x = well_conditioned((4, 24, 10), generator=torch.Generator().manual_seed(1))
    sv = torch.linalg.svdvals(newton_schulz(x))
    assert sv.min() >= BAND[0] and sv.max() <= BAND[1]


def test_newton_schulz_zero_stays_zero_and_half_precision_runs_in_float32():
    assert torch.equal(newton_schulz(torch.zeros(3, 4, 5)), torch.zeros(3, 4, 5))
    x = torch.randn(6, 4)
    assert newton_schulz(x.bfloat16()).dtype == torch.float32
    assert newton_schulz(x).dtype == torch.float32
    torch.testing.assert_close(newton_schulz(x.bfloat16()), newton_schulz(x.bfloat16().float()))
    # scale-free: the input's size does not matter
    torch.testing.assert_close(newton_schulz(1e-6 * x.double()), newton_schulz(x.double()), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- the step against the reference


def marked(model, blocks):
    """The literal blocks of test_rules' CASES marked for reference_orthogonal_step: a block whose
    first piece is a matrix kind's tensor is a matrix block (its bias a column)."""
    kinds = {name: g["kind"] for g in module_param_groups(model) for name, _ in g["params"]}
    names = [n for n, _ in model.named_parameters()]
    out = []
    for pieces, s in blocks:
        kind = MATRIX_KINDS.get(kinds[names[pieces[0][0]]])
        out.append((pieces, s, kind) if kind else (pieces, s))
    return out


def with_gradients(case, seed=0):
    """A CASES module in float64 with random gradients, its parameters and its marked blocks."""
    build, blocks_of = CASES[case]
    torch.manual_seed(seed)
    model = build().double()
    params = [p for _, p in model.named_parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    at = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return model, params, marked(model, blocks_of(model, at))


def orthogonal_case(case, foreach, orthogonalise, seed=0, direction="orthogonal", **reference):
    """One step of AGD(model, direction=...) on a CASES module, the reference's (its options
    ``reference``), and the marked blocks."""
    model, params, blocks = with_gradients(case, seed)
    expected, eta = reference_orthogonal_step(params, [p.grad for p in params], blocks, 3, mults=[2.5] * len(params),
                                              orthogonalise=orthogonalise, **reference)
    opt = AGD(model, lr=0.5, gain=5.0, depth=3, foreach=foreach, direction=direction)
    opt.step()
    return model, expected, eta, opt, blocks


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("case", list(CASES))
def test_each_rule_takes_the_literal_orthogonal_step(case, foreach):
    model, expected, eta, opt, _ = orthogonal_case(case, foreach, newton_schulz)
    assert opt.eta.item() == pytest.approx(eta, rel=1e-12)
    for (name, p), e in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("case", ["linear+bias", "conv transpose", "attention separate qkv"])
def test_the_step_is_within_newton_schulz_band_of_the_exact_polar_step(case):
    # Against U Vᵀ by SVD: every matrix block moves by f(S) with f within the band, so each
    # tensor's move is within 0.33 of the exact one's (Frobenius, relative), and the Frobenius kinds
    # exactly. Gradients of these small shapes are well enough conditioned (seed fixed).
    build, _ = CASES[case]
    torch.manual_seed(0)
    before = [p.detach().clone() for p in build().double().parameters()]
    model, expected, _, _, _ = orthogonal_case(case, True, polar_by_svd)
    for b, (name, p), e in zip(before, model.named_parameters(), expected, strict=True):
        moved, exact = b - p.detach(), b - e
        assert torch.linalg.vector_norm(moved - exact) <= 0.33 * torch.linalg.vector_norm(exact), name


def experts_case(transposed, bias, foreach, orthogonalise=newton_schulz):
    torch.manual_seed(0)
    model = Experts(transposed=transposed, bias=bias).double()
    i = {name: j for j, (name, _) in enumerate(model.named_parameters())}
    blocks = stacked_blocks(i["gate_up_proj"], model.gate_up_proj.shape, transposed, i.get("gate_up_proj_bias")) + \
        stacked_blocks(i["down_proj"], model.down_proj.shape, transposed, i.get("down_proj_bias"))
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    expected, eta = reference_orthogonal_step(params, [p.grad for p in params], marked(model, blocks), 2,
                                              orthogonalise=orthogonalise)
    opt = AGD(model, depth=2, foreach=foreach, direction="orthogonal")
    opt.step()
    return params, expected, eta, opt


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("transposed", [False, True], ids=["(E,out,in)", "(E,in,out)"])
@pytest.mark.parametrize("bias", [False, True], ids=["", "+bias"])
def test_stacked_experts_orthogonalise_each_expert(transposed, bias, foreach):
    params, expected, eta, opt = experts_case(transposed, bias, foreach)
    assert opt.eta.item() == pytest.approx(eta, rel=1e-12)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)


class ConvNet(nn.Module):
    """Every conv form at once: a conv with a joined bias (in each kernel position's block), a
    grouped conv, a transposed conv with its bias, a norm and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.gconv = nn.Conv2d(8, 8, 3, groups=2)
        self.tconv = nn.ConvTranspose2d(8, 4, 2)
        self.norm = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(64, 5)

    def forward(self, x):
        x = torch.relu(self.gconv(torch.relu(self.conv(x))))
        return self.fc(self.norm(self.tconv(x)).flatten(1))

    def blocks(self):
        at = {name: i for i, (name, _) in enumerate(self.named_parameters())}
        b = weight_blocks(at["conv.weight"], self.conv.weight.shape, bias=at["conv.bias"])
        b += weight_blocks(at["gconv.weight"], self.gconv.weight.shape, groups=2, bias=at["gconv.bias"])
        b += weight_blocks(at["tconv.weight"], self.tconv.weight.shape, bias=at["tconv.bias"], transposed=True)
        b += norm_blocks(at["norm.weight"], 4, at["norm.bias"])
        return marked(self, b + weight_blocks(at["fc.weight"], self.fc.weight.shape, bias=at["fc.bias"]))


def filter_banks(blocks):
    """The flattened filter banks of direction="orthogonal-flattened", written from the literal
    blocks: the indices of the matrix blocks of one weight tensor and one conv group (its kernel
    positions), in order; a linear layer's one block is a bank of one."""
    banks = {}
    for number, (pieces, _, *kind) in enumerate(blocks):
        if kind:
            i, idx = pieces[0]
            banks.setdefault((i, idx[0].start), []).append(number)
    return list(banks.values())


def conv_steps(foreach, momentum=0.0, steps=3, dtype=torch.float64, maximize=False, direction="orthogonal"):
    """(net after ``steps`` steps of the orthogonal direction, the reference's weights, eta)."""
    torch.manual_seed(0)
    net = ConvNet().to(dtype)
    ref = [p.detach().double().clone() for p in net.parameters()]
    bufs = [torch.zeros_like(p) for p in ref]
    opt = AGD(net, foreach=foreach, momentum=momentum, direction=direction, maximize=maximize)
    banks = filter_banks(net.blocks()) if direction == "orthogonal-flattened" else ()
    assert not banks or max(map(len, banks)) == 9 and min(map(len, banks)) == 1  # 3 x 3 filters, a linear head
    x, y = torch.randn(4, 3, 7, 7, dtype=dtype), torch.randn(4, 5, dtype=dtype)
    for _ in range(steps):
        opt.zero_grad()
        (net(x) - y).square().mean().backward()
        grads = [p.grad.double() for p in net.parameters()]
        bufs = [momentum * m + g for m, g in zip(bufs, grads, strict=True)]
        dirs = [g + momentum * m for g, m in zip(grads, bufs, strict=True)]
        mults = [-1.0 if maximize else 1.0] * len(ref)
        ref, eta = reference_orthogonal_step(ref, grads, net.blocks(), opt.depth, mults=mults, directions=dirs,
                                             orthogonalise=newton_schulz, filters=banks)
        opt.step()
        with torch.no_grad():  # follow the reference from the optimizer's own weights
            for p, r in zip(net.parameters(), ref, strict=True):
                torch.testing.assert_close(p.double(), r, rtol=1e-5 if dtype == torch.float32 else 1e-10,
                                           atol=1e-6 if dtype == torch.float32 else 1e-12)
        assert opt.eta.item() == pytest.approx(eta, rel=1e-5 if dtype == torch.float32 else 1e-12)
        ref = [p.detach().double().clone() for p in net.parameters()]
    return net, opt


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["plain", "nesterov"])
def test_a_conv_net_takes_the_literal_orthogonal_steps(foreach, momentum):
    conv_steps(foreach, momentum)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["plain", "nesterov"])
def test_flattened_filters_take_the_literal_steps_of_whole_filter_banks(foreach, momentum):
    # Each conv group's 3 x 3 positions orthogonalised side by side (joined, grouped, transposed
    # convs), scaled by sqrt(9); the head, one block, moves as under "orthogonal".
    flat, _ = conv_steps(foreach, momentum, direction="orthogonal-flattened")
    per_position, _ = conv_steps(foreach, momentum, steps=3)
    moved = {n: (p - q).abs().max().item() for (n, p), (_, q) in
             zip(flat.named_parameters(), per_position.named_parameters(), strict=True)}
    assert moved["conv.weight"] > 1e-3 and moved["gconv.weight"] > 1e-3  # not the per-position step


def test_flattened_filters_of_a_linear_layer_are_the_orthogonal_step():
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(5, 6, dtype=torch.float64)
    for net, direction in zip(nets, ["orthogonal", "orthogonal-flattened"], strict=True):
        opt = AGD(net, direction=direction)
        net(x).square().sum().backward()
        opt.step()
    for p, q in zip(*(net.parameters() for net in nets), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loop_and_foreach_agree_on_a_charlm(dtype):
    torch.manual_seed(0)
    a = CharLM(32, dim=16, layers=2, heads=2, context=8).to(dtype)
    b = copy.deepcopy(a)
    oa = AGD(a, foreach=True, momentum=0.9, direction="orthogonal")
    ob = AGD(b, foreach=False, momentum=0.9, direction="orthogonal")
    idx = torch.randint(0, 32, (3, 8))
    for _ in range(3):
        for net, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            nn.functional.cross_entropy(net(idx).flatten(0, 1), idx.flatten()).backward()
            opt.step()
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, **tol, msg=name)


def test_maximize_moves_the_other_way():
    conv_steps(True, maximize=True, steps=1)


# ---------------------------------------------------------------- edge cases and state


@pytest.mark.parametrize("foreach", FOREACH)
def test_zero_gradient_blocks_stay_and_a_zero_tensor_stays(foreach):
    torch.manual_seed(0)
    conv, lin = torch.randn(6, 4, 3, 3, requires_grad=True), torch.randn(5, 7, requires_grad=True)
    conv.grad, lin.grad = torch.randn(conv.shape), torch.zeros(lin.shape)
    conv.grad[:, :, 1, 2] = 0
    before = conv.detach().clone(), lin.detach().clone()
    AGD([conv, lin], foreach=foreach, direction="orthogonal").step()
    assert torch.equal(conv.detach()[:, :, 1, 2], before[0][:, :, 1, 2])
    assert not torch.equal(conv.detach()[:, :, 0, 0], before[0][:, :, 0, 0])
    assert torch.equal(lin.detach(), before[1])


@pytest.mark.parametrize("masked", [False, True], ids=["cpu-branch", "masked"])
@pytest.mark.parametrize("foreach", FOREACH)
def test_a_non_finite_gradient_skips_the_step(foreach, masked, monkeypatch):
    if masked:  # the branch-free path that CUDA and torch.compile take
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.manual_seed(0)
    ws = [torch.randn(4, 3, requires_grad=True), torch.randn(2, 4, 3, 3, requires_grad=True)]
    for w in ws:
        w.grad = torch.randn(w.shape)
    opt = AGD(ws, foreach=foreach, momentum=0.9, direction="orthogonal")
    opt.step()
    good = [w.detach().clone() for w in ws]
    ws[1].grad[0, 1, 2, 2] = math.nan
    opt.step()
    for w, g in zip(ws, good, strict=True):
        assert torch.equal(w.detach(), g)
    assert opt.skipped_steps.item() == 1
    assert all(torch.equal(opt.state[w]["momentum_buffer"], torch.zeros_like(w)) for w in ws)


def test_the_default_is_orthogonal_with_momentum_and_frobenius_alone_is_the_papers_rule_bit_for_bit():
    torch.manual_seed(0)
    a = CharLM(32, dim=16, layers=1, heads=2, context=8)
    b, c, d = copy.deepcopy(a), copy.deepcopy(a), copy.deepcopy(a)
    idx = torch.randint(0, 32, (3, 8))
    opts = (AGD(a), AGD(b, direction="orthogonal", momentum=0.9), AGD(c, direction="frobenius"),
            AGD(d, direction="frobenius", momentum=0.0))
    assert [{g["momentum"] for g in o.param_groups} for o in opts] == [{0.9}, {0.9}, {0.0}, {0.0}]
    assert {g["direction"] for g in opts[0].param_groups} == {"orthogonal"}
    for _ in range(2):  # the second step moves along the momentum buffers too
        for net, opt in zip((a, b, c, d), opts, strict=True):
            opt.zero_grad()
            nn.functional.cross_entropy(net(idx).flatten(0, 1), idx.flatten()).backward()
            opt.step()
    for p, q, r, t in zip(a.parameters(), b.parameters(), c.parameters(), d.parameters(), strict=True):
        assert torch.equal(p, q) and torch.equal(r, t)
    assert "momentum_buffer" in opts[0].state[next(a.parameters())]  # the default keeps a buffer
    assert "momentum_buffer" not in opts[2].state[next(c.parameters())]  # the paper's rule keeps none
    # the orthogonal direction moves the matrices only: the embedding, slots and norms as under
    # the Frobenius rule with the same momentum
    torch.manual_seed(0)
    f = CharLM(32, dim=16, layers=1, heads=2, context=8)
    g = copy.deepcopy(f)
    for net, opt in ((f, AGD(f)), (g, AGD(g, direction="frobenius", momentum=0.9))):
        nn.functional.cross_entropy(net(idx).flatten(0, 1), idx.flatten()).backward()
        opt.step()
    names = [n for n, _ in f.named_parameters()]
    same = {n for n, p, r in zip(names, f.parameters(), g.parameters(), strict=True) if torch.equal(p, r)}
    assert same == {"embed.weight", "pos"} | {n for n in names if "norm" in n or n.startswith("ln.")}


def test_a_groups_momentum_not_given_follows_its_own_direction():
    net = nn.Sequential(nn.Linear(4, 6, bias=False), nn.ReLU(), nn.Linear(6, 3, bias=False), nn.Linear(3, 2, bias=False))
    def groups():  # fresh dicts: torch.optim fills in the ones it is given
        return [{"params": list(net[0].parameters())},
                {"params": list(net[2].parameters()), "direction": "frobenius"},
                {"params": list(net[3].parameters()), "direction": "frobenius", "momentum": 0.5}]
    opt = AGD(groups())
    assert [(g["direction"], g["momentum"]) for g in opt.param_groups] == [
        ("orthogonal", 0.9), ("frobenius", 0.0), ("frobenius", 0.5)]
    assert opt.defaults["momentum"] is None  # so a group added later resolves it by its own direction
    extra = nn.Linear(2, 2)
    opt.add_param_group({"params": [extra.weight], "direction": "frobenius"})
    opt.add_param_group({"params": [extra.bias], "kind": "bias"})
    assert [g["momentum"] for g in opt.param_groups[3:]] == [0.0, 0.9]
    plain = AGD(net.parameters(), direction="frobenius", momentum=0.3)
    assert {g["momentum"] for g in plain.param_groups} == {0.3}  # given: kept
    assert {g["momentum"] for g in AGD(net.parameters()).param_groups} == {0.9}
    state = AGD(groups()).state_dict()
    assert [g["momentum"] for g in state["param_groups"]] == [0.9, 0.0, 0.5]
    with pytest.raises(UsageError, match=r"^AGD momentum must be in \[0, 1\), got 1.5$"):
        AGD(net, momentum=1.5)


def test_functional_agd_takes_the_same_orthogonal_step():
    torch.manual_seed(0)
    ws = [torch.randn(6, 4, 3), torch.randn(5, 6), torch.randn(9, 5)]
    gs = [torch.randn_like(w) for w in ws]
    a = [w.clone().requires_grad_() for w in ws]
    for w, g in zip(a, gs, strict=True):
        w.grad = g.clone()
    AGD([{"params": a[:2]}, {"params": a[2:], "kind": "embedding"}], direction="orthogonal", depth=3, momentum=0.0).step()
    b = [w.clone() for w in ws]
    agd(b, gs, rules=["weight", "weight", "embedding"], depth=3, direction="orthogonal")
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=1e-6, atol=1e-7)
    with pytest.raises(UsageError, match="direction must be one of 'frobenius', 'orthogonal', 'orthogonal-normalised', 'orthogonal-nuclear', 'orthogonal-flattened', got 'muon'"):
        agd(b, gs, direction="muon")


def test_direction_is_per_group_checked_and_survives_state_dict():
    with pytest.raises(UsageError, match=r"^AGD direction must be one of 'frobenius', 'orthogonal', 'orthogonal-normalised', 'orthogonal-nuclear', 'orthogonal-flattened', got 'svd'$"):
        AGD([torch.randn(3, 3, requires_grad=True)], direction="svd")
    with pytest.raises(UsageError, match="direction of param group 1"):
        AGD([{"params": [torch.randn(3, 3, requires_grad=True)]},
             {"params": [torch.randn(3, 3, requires_grad=True)], "direction": 1}])
    net, opt = conv_steps(True, momentum=0.9, steps=1)
    assert "direction: orthogonal" in repr(opt)
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    net2 = ConvNet().double()
    net2.load_state_dict(saved["model"])
    opt2 = AGD(net2, momentum=0.9)  # the saved groups' direction wins over this default
    opt2.load_state_dict(saved["opt"])
    assert {g["direction"] for g in opt2.param_groups} == {"orthogonal"}
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    for n, o in ((net, opt), (net2, opt2)):
        o.zero_grad()
        n(x).square().mean().backward()
        o.step()
    for p, q in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(p, q)
    # a state saved before the flag existed runs as the paper's rule
    old = opt.state_dict()
    for g in old["param_groups"]:
        del g["direction"]
    opt3 = AGD(ConvNet().double(), momentum=0.9)
    opt3.load_state_dict(old)
    assert {g["direction"] for g in opt3.param_groups} == {"frobenius"}


def test_a_joined_bias_moves_with_its_layers_direction_whatever_its_group_says():
    torch.manual_seed(0)
    lin = nn.Linear(4, 6).double()
    lin.weight.grad, lin.bias.grad = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    before = lin.bias.detach().clone()
    groups = [{"params": [("weight", lin.weight)], "direction": "orthogonal"},
              {"params": [("bias", lin.bias)], "kind": "bias", "direction": "frobenius"}]
    opt = AGD(groups, depth=1, momentum=0.0)
    opt.step()
    aug = torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1)
    s = math.sqrt(6 / 5)
    torch.testing.assert_close(before - lin.bias.detach(), opt.eta.item() * s * newton_schulz(aug)[:, 4],
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("foreach", FOREACH)
def test_half_precision_weights_take_the_float32_step(foreach):
    torch.manual_seed(0)
    shapes = [(16, 8), (8, 4, 3, 3)]
    half = [torch.zeros(s, dtype=torch.bfloat16, requires_grad=True) for s in shapes]
    full = [torch.zeros(s, requires_grad=True) for s in shapes]
    for h, f in zip(half, full, strict=True):
        f.grad = torch.randn(f.shape).bfloat16().float()
        h.grad = f.grad.bfloat16()
    AGD(half, foreach=foreach, direction="orthogonal").step()
    AGD(full, foreach=foreach, direction="orthogonal").step()
    for h, f in zip(half, full, strict=True):
        torch.testing.assert_close(h.detach().float(), f.detach(), rtol=2e-2, atol=1e-3)


def test_row_and_slot_kinds_alone_are_untouched_by_the_flag():
    torch.manual_seed(0)
    t = torch.randn(5, 4)
    g = torch.randn(5, 4)
    a, b = t.clone().requires_grad_(), t.clone().requires_grad_()
    a.grad, b.grad = g.clone(), g.clone()
    AGD([{"params": [a], "kind": "embedding"}], direction="orthogonal").step()
    AGD([{"params": [b], "kind": "embedding"}]).step()
    assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("foreach", FOREACH)
def test_cuda_orthogonal_step_never_syncs_and_matches_the_cpu(foreach):
    torch.manual_seed(0)
    cpu = CharLM(64, dim=32, layers=2, heads=2, context=8)
    gpu = copy.deepcopy(cpu).cuda()
    opts = [AGD(m, momentum=0.9, direction="orthogonal", foreach=foreach) for m in (cpu, gpu)]
    idx = torch.randint(0, 64, (4, 8))

    def backward(m):
        m.zero_grad()
        i = idx.to(next(m.parameters()).device)
        nn.functional.cross_entropy(m(i).flatten(0, 1), i.flatten()).backward()

    for m, o in zip((cpu, gpu), opts):
        backward(m)
        o.step()  # the first step allocates buffers, eta and the counters
    backward(cpu)
    opts[0].step()
    backward(gpu)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opts[1].step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for (name, a), b in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-4, atol=1e-5, msg=name)


def test_the_orthogonal_step_compiles_fullgraph_and_matches_eager():
    torch.manual_seed(0)
    eager_net = ConvNet()
    comp_net = copy.deepcopy(eager_net)
    eager = AGD(eager_net, momentum=0.9, direction="orthogonal")
    comp = AGD(comp_net, momentum=0.9, direction="orthogonal")
    compiled_step = torch.compile(comp.step, fullgraph=True)
    x, y = torch.randn(4, 3, 7, 7), torch.randn(4, 5)
    for i in range(3):
        for net in (eager_net, comp_net):
            net.zero_grad()
            (net(x) - y).square().mean().backward()
        if i == 1:  # a non-finite step is skipped inside the graph too
            eager_net.conv.weight.grad[0, 0, 0, 0] = math.nan
            comp_net.conv.weight.grad[0, 0, 0, 0] = math.nan
        eager.step()
        compiled_step()
    for p, q in zip(eager_net.parameters(), comp_net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert comp.steps.item() == 3 and comp.skipped_steps.item() == 1


def unit_newton_schulz(x):
    """The control's block move, written independently: Newton–Schulz's O(X) over its own
    Frobenius norm (per matrix of a batch)."""
    o = newton_schulz(x)
    return o / torch.linalg.vector_norm(o, dim=(-2, -1), keepdim=True)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("case", ["linear+bias", "conv2d+bias", "attention packed", "hf conv1d"])
def test_the_normalised_control_takes_the_orthogonal_direction_at_the_frobenius_size(case, foreach):
    # direction="orthogonal-normalised": each matrix block moves along O(D(B)) / ||O(D(B))||_F
    # (the literal reference with that orthogonaliser), so its Frobenius size is the paper's.
    model, expected, eta, opt, blocks = orthogonal_case(case, foreach, unit_newton_schulz,
                                                        direction="orthogonal-normalised")
    assert any(len(b) == 3 for b in blocks)  # the case has matrix blocks to normalise
    assert opt.eta.item() == pytest.approx(eta, rel=1e-12)
    for (name, p), e in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12, msg=name)


def test_agd_head_frobenius_keeps_the_output_head_on_the_papers_rule():
    # build_optimizer(..., agd_head="frobenius"): the head (found by running the model) moves as
    # under direction="frobenius", every other tensor as under "orthogonal"; eta and L as AGD(model).
    from torch_agd.train.optimizers import build_optimizer

    torch.manual_seed(0)
    model = CharLM(256, dim=16, layers=2, heads=2, context=8).double()
    x = torch.randint(0, 256, (4, 8))
    grads = [torch.randn_like(p) for p in model.parameters()]
    moved = {}
    for label, kwargs in {"mixed": dict(direction="orthogonal", agd_head="frobenius", example=x[:1]),
                          "frobenius": dict(direction="frobenius"), "orthogonal": dict(direction="orthogonal")}.items():
        net = copy.deepcopy(model)
        opt = build_optimizer("agd", net, agd_depth="auto", momentum=0.9, init=False, **kwargs)
        for p, g in zip(net.parameters(), grads, strict=True):
            p.grad = g.clone()
        opt.step()
        moved[label] = ({n: p.detach() for n, p in net.named_parameters()}, opt.eta.item(), opt.depth)
    mixed, eta, depth = moved["mixed"]
    assert (eta, depth) == moved["orthogonal"][1:] == moved["frobenius"][1:]
    assert "head.weight" in mixed
    for name, value in mixed.items():
        want = moved["frobenius" if name == "head.weight" else "orthogonal"][0][name]
        torch.testing.assert_close(value, want, rtol=1e-12, atol=1e-14, msg=name)
    assert not torch.allclose(moved["frobenius"][0]["head.weight"], moved["orthogonal"][0]["head.weight"])
    with pytest.raises(UsageError, match="needs one example input"):
        build_optimizer("agd", copy.deepcopy(model), direction="orthogonal", agd_head="frobenius", init=False)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("case", ["linear+bias", "conv2d+bias", "attention separate qkv", "hf conv1d", "layernorm"])
def test_the_nuclear_eta_takes_G_from_each_matrix_blocks_inner_product_with_its_move(case, foreach):
    # direction="orthogonal-nuclear": the orthogonal move, and G from s(B) <g(B), O(D(B))> of the
    # matrix blocks (their gradients' nuclear norms here, D = g), the Frobenius norms elsewhere.
    model, expected, eta, opt, blocks = orthogonal_case(case, foreach, newton_schulz,
                                                        direction="orthogonal-nuclear", nuclear=True)
    _, params, _ = with_gradients(case)  # the same model and gradients, before the step
    _, eta_frobenius = reference_orthogonal_step(params, [p.grad for p in params], blocks, 3,
                                                 orthogonalise=newton_schulz)
    assert opt.eta.item() == pytest.approx(eta, rel=1e-12)
    has_matrix = any(len(b) == 3 for b in blocks)
    assert (eta > eta_frobenius * (1 + 1e-6)) == has_matrix  # ||g||_nuc > ||g||_F on every matrix of rank > 1
    for (name, p), e in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12, msg=name)


def test_the_nuclear_eta_with_momentum_uses_the_gradient_against_the_moved_direction():
    build, blocks_of = CASES["linear+bias"]
    torch.manual_seed(1)
    model = build().double()
    opt = AGD(model, depth=2, momentum=0.9, direction="orthogonal-nuclear")
    params = [p for _, p in model.named_parameters()]
    g1 = [torch.randn_like(p) for p in params]
    for p, g in zip(params, g1):
        p.grad = g.clone()
    opt.step()
    g2 = [torch.randn_like(p) for p in params]
    for p, g in zip(params, g2):
        p.grad = g.clone()
    d2 = [b + 0.9 * (0.9 * a + b) for a, b in zip(g1, g2)]  # Nesterov: g + beta * (beta * m + g)
    at = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    blocks = marked(model, blocks_of(model, at))
    expected, eta = reference_orthogonal_step(params, g2, blocks, 2, directions=d2, orthogonalise=newton_schulz,
                                              nuclear=True)
    opt.step()
    assert opt.eta.item() == pytest.approx(eta, rel=1e-12)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)
