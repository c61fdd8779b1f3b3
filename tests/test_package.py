"""The optimizer package's public surface: the functional form agd(...) against the class and
the literal reference, rules registered for a user's own module type, a refused param group
that changes nothing, the shared vectors regenerated from the reference, and no dispatch on
kind names outside the rule classes."""
import copy
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from torch_agd import AGD, Rule, UsageError, agd, init_weights_, register_rule
from torch_agd.optim import rules
from torch_agd.optim.reference import reference_blocks_step, reference_momentum_steps, reference_step, row_blocks, weight_blocks

ROOT = Path(__file__).resolve().parents[1]
FOREACH = [pytest.param(True, id="foreach"), pytest.param(False, id="loop")]


def shapes_and_grads(seed=0):
    torch.manual_seed(seed)
    shapes = [(6, 4), (5, 6, 3), (3, 5, 2, 2), (2, 3)]
    ws = [torch.randn(s, dtype=torch.float64) for s in shapes]
    gs = [torch.randn(s, dtype=torch.float64) for s in shapes]
    return ws, gs


@pytest.mark.parametrize("foreach", FOREACH)
def test_functional_agd_takes_the_papers_step(foreach):
    ws, gs = shapes_and_grads()
    expected, eta_ref = reference_step(ws, gs, gain=2.0)
    eta, taken = agd(ws, gs, gain=2.0, foreach=foreach)
    assert bool(taken) and eta.item() == pytest.approx(eta_ref, rel=1e-12)
    assert len(ws) == len(expected) == 4
    for w, e in zip(ws, expected, strict=True):
        torch.testing.assert_close(w, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("nesterov", [True, False])
def test_functional_agd_with_momentum_matches_the_class_and_the_reference(foreach, nesterov):
    ws, _ = shapes_and_grads()
    steps = [shapes_and_grads(seed)[1] for seed in (1, 2, 3)]
    expected = reference_momentum_steps(ws, steps, 0.9, nesterov=nesterov)
    fn_ws = [w.clone() for w in ws]
    cls_ws = [w.clone().requires_grad_() for w in ws]
    opt = AGD(cls_ws, momentum=0.9, nesterov=nesterov, foreach=foreach, direction="frobenius")
    buffers = [None] * len(ws)
    for gs in steps:
        agd(fn_ws, gs, buffers, momentum=0.9, nesterov=nesterov, foreach=foreach)
        for w, g in zip(cls_ws, gs, strict=True):
            w.grad = g.clone()
        opt.step()
    assert all(b is not None for b in buffers) and len(expected) == 4
    for f, c, e in zip(fn_ws, cls_ws, expected, strict=True):
        torch.testing.assert_close(f, e, rtol=1e-10, atol=1e-12)
        assert torch.equal(f, c.detach())  # the class and the function share one step, bit for bit
    for b, p in zip(buffers, cls_ws, strict=True):
        assert torch.equal(b, opt.state[p]["momentum_buffer"])


def test_functional_agd_takes_rules_by_name_or_instance():
    torch.manual_seed(0)
    table, bias = torch.randn(7, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    weight = torch.randn(5, 4, dtype=torch.float64)
    gs = [torch.randn_like(t) for t in (weight, table, bias)]
    blocks = weight_blocks(0, weight.shape) + row_blocks(1, table.shape) + row_blocks(2, bias.shape)
    expected, eta_ref = reference_blocks_step([weight, table, bias], gs, blocks, depth=2)  # weight and table are layers
    ps = [weight.clone(), table.clone(), bias.clone()]
    eta, _ = agd(ps, gs, rules=[rules.Weight(), "embedding", "bias"])
    assert eta.item() == pytest.approx(eta_ref, rel=1e-12)
    for p, e in zip(ps, expected, strict=True):
        torch.testing.assert_close(p, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("call, needle", [
    (lambda w, g: agd([w], []), "one gradient per parameter"),
    (lambda w, g: agd([w], [g], rules=["nonsense"]), "unknown AGD kind 'nonsense'"),
    (lambda w, g: agd([w], [g], momentum=0.9), "needs momentum_buffers"),
    (lambda w, g: agd([w[0]], [g[0]]), "AGD kind 'weight' needs"),
    (lambda w, g: agd([w[0]], [g[0]], rules=["bias"]), "depth L >= 1"),
])
def test_functional_agd_refuses_bad_input_in_one_line(call, needle):
    w, g = torch.randn(3, 2), torch.randn(3, 2)
    before = w.clone()
    with pytest.raises(UsageError, match=re.escape(needle)):
        call(w, g)
    assert torch.equal(w, before)


class Scaled(nn.Module):
    """A layer of the user's own: a weight stored (out, in) under another name, and a per-output
    scale that is no bias."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(d_out, d_in))
        self.scale = nn.Parameter(torch.ones(d_out))

    def forward(self, x):
        return (x @ self.kernel.T) * self.scale


def test_a_registered_rule_trains_a_custom_module():
    class Mine(Scaled):
        pass

    net = nn.Sequential(Mine(4, 8), nn.ReLU(), Mine(8, 3))
    with pytest.raises(UsageError, match="no weight tensor to count as a layer"):  # unregistered: every
        AGD(net, depth="weights", direction="frobenius")                                              # parameter is raw, no layer
    register_rule(Mine, {"kernel": rules.Weight(), "scale": "norm"})
    groups = {g["kind"]: [n for n, _ in g["params"]] for g in rules.module_param_groups(net)}
    assert groups == {"weight": ["0.kernel", "2.kernel"], "norm": ["0.scale", "2.scale"]}
    torch.manual_seed(0)
    init_weights_(net)
    assert torch.allclose(torch.linalg.svdvals(net[0].kernel.detach()), torch.tensor(2 ** 0.5).expand(4))
    assert torch.equal(net[0].scale.detach(), torch.ones(8))  # the norm rule's gamma = 1
    x = torch.randn(64, 4)
    y = x[:, :3].relu()  # a target the net can fit
    opt = AGD(net, direction="frobenius")
    assert opt.depth == 2  # the two kernels are layers; the scales are not
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (net(x) - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(losses) == 30 and losses[-1] < 0.8 * losses[0]


def test_a_subclass_inherits_its_bases_rules_and_a_function_may_decide():
    class Base(Scaled):
        pass

    class Child(Base):
        pass

    register_rule(Base, lambda module, attr: rules.Weight() if attr == "kernel" else None)
    groups = {g["kind"]: [n for n, _ in g["params"]] for g in rules.module_param_groups(Child(3, 2))}
    assert groups == {"weight": ["kernel"], "raw": ["scale"]}
    with pytest.raises(UsageError, match="nn.Module subclass"):
        register_rule(int, {})


def test_a_rule_of_the_users_own_kind_is_a_param_group_kind_too():
    class Halves(Rule):
        """Each half of a 2-D tensor's rows is a block of scale 1 (a made-up rule)."""
        kind = "halves"
        layer = True

        def blocks(self, shape, joined=False):
            from torch_agd.optim.blocks import Blocks
            return Blocks(shape[0], 2, shape[1], 1, 1.0)

    assert rules.rule_for("halves").__class__ is Halves
    torch.manual_seed(0)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w.grad = torch.randn(4, 3, dtype=torch.float64)
    literal = [([(0, (slice(0, 2), slice(None)))], 1.0), ([(0, (slice(2, 4), slice(None)))], 1.0)]
    expected, eta_ref = reference_blocks_step([w], [w.grad], literal, depth=1)
    opt = AGD([{"params": [w], "kind": "halves"}], direction="frobenius")
    opt.step()
    assert opt.eta.item() == pytest.approx(eta_ref, rel=1e-12)
    torch.testing.assert_close(w.detach(), expected[0], rtol=1e-12, atol=1e-12)
    del rules.Rule.by_kind["halves"]


@pytest.mark.parametrize("bad_group", [
    lambda: {"params": [torch.zeros(3, requires_grad=True)]},                          # 1-D with no kind
    lambda: {"params": [torch.zeros(3, 2, requires_grad=True)], "kind": "attention"},  # a shape the rule refuses
    lambda: {"params": [torch.zeros(3, 2, requires_grad=True)], "momentum": 2.0},      # a flag out of range
    lambda: {"params": [torch.zeros(3, 2, requires_grad=True)], "depth": 7},           # depth is per optimizer
])
def test_a_refused_param_group_leaves_the_optimizer_as_it_was(bad_group):
    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)
    w.grad = torch.randn(4, 3)
    opt = AGD([w], momentum=0.5, direction="frobenius")
    opt.step()
    saved_state, saved_groups = copy.deepcopy(opt.state_dict()), copy.deepcopy(opt.param_groups)
    with pytest.raises(UsageError):
        opt.add_param_group(bad_group())
    assert len(opt.param_groups) == len(saved_groups) == 1
    assert opt.param_groups[0].keys() == saved_groups[0].keys()
    for key, value in saved_groups[0].items():
        if key != "params":
            assert opt.param_groups[0][key] == value, key
    assert opt.param_groups[0]["params"][0] is w
    state = opt.state_dict()
    assert state["param_groups"] == saved_state["param_groups"]
    assert state["state"].keys() == saved_state["state"].keys() == {0}
    for key, value in saved_state["state"][0].items():
        assert torch.equal(state["state"][0][key], value), key
    opt.step()  # the next step meets no trace of the refused group
    assert opt.steps.item() == 2


def _make_vectors():
    spec = importlib.util.spec_from_file_location("make_vectors", ROOT / "scripts" / "make_vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_vectors_regenerate_from_the_reference():
    make_vectors = _make_vectors()
    committed = json.loads((ROOT / "tests" / "data" / "agd_steps.json").read_text())["cases"]
    assert len(committed) >= 6
    assert make_vectors.differences(committed, make_vectors.regenerate(committed)) == []
    # and the comparison can fail: one gradient entry changed moves that case's step and eta
    changed = copy.deepcopy(committed)
    changed[2]["grads"][0] = (torch.tensor(changed[2]["grads"][0]) * 1.001).tolist()
    found = make_vectors.differences(committed, make_vectors.regenerate(changed))
    assert any(f.startswith(committed[2]["name"] + ": eta") for f in found), found


KIND_DISPATCH = re.compile(r"""kind["']?\]?\s*(==|!=|in\s*\(|not\s+in\s*\()|\(\s*["'](weight|bias|norm|raw|embedding|attention)["']\s*,""")


def test_no_code_outside_the_rule_classes_dispatches_on_a_kind_name():
    package = ROOT / "torch_agd"
    checked, found = 0, []
    for path in sorted(package.rglob("*.py")):
        if path == package / "optim" / "rules.py" or path.parent.name == "experiments":
            continue  # rules.py holds the rule classes; experiments' "kind" is a figure's kind
        checked += 1
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if KIND_DISPATCH.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert checked >= 20 and found == []
    assert KIND_DISPATCH.search('if g["kind"] in ("weight", "attention"):')  # the pattern finds what it is for
    assert KIND_DISPATCH.search("elif kind == 'embedding':")
