"""--optimizer muon: which parameters Muon gets on every model of the trainer, its step against
torch.optim.Muon and AdamW built by hand, conv filters and other layouts against torch's Muon on
2-D copies, state_dict round trips, lr schedulers, and the one-line refusals."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from torch_agd import UsageError
from torch_agd.data import DATASETS
from torch_agd.models import build_model
from torch_agd.train.muon import MatrixMuon, example_input, muon_split, output_head
from torch_agd.train.optimizers import MuonWithAdamW, build_optimizer

IMAGES, TEXT = DATASETS["fashion-mnist"], DATASETS["stdlib"]


# ------------------------------------------------------------------ the split, model by model


def _layers(prefix, n, names):
    return [f"{prefix}{i}.{name}" for i in range(n) for name in names]


def _resnet_convs(prefix, shortcut):
    names = [f"{prefix}conv1.weight"]
    for layer in range(1, 5):
        for block in range(2):
            names += [f"{prefix}layer{layer}.{block}.conv1.weight", f"{prefix}layer{layer}.{block}.conv2.weight"]
            if layer > 1 and block == 0:
                names.append(f"{prefix}layer{layer}.0.{shortcut}")
    return names


# arch, dataset, build kwargs -> (head, Muon's 2-D weights, MatrixMuon's (name, kind)); every other
# parameter must be AdamW's.
MHA = ("self_attn.out_proj.weight", "linear1.weight", "linear2.weight")
SPLITS = {
    "fcn": (IMAGES, dict(depth=3, width=16), "5", ["1.weight", "3.weight"], []),
    "cnn": (IMAGES, {}, "13", [], [("0.weight", "weight"), ("4.weight", "weight"), ("8.weight", "weight")]),
    "tv-resnet18": (IMAGES, {}, "1.fc", [], [(n, "weight") for n in _resnet_convs("1.", "downsample.0.weight")]),
    "tv-vit": (IMAGES, {}, "1.heads.head",
               _layers("1.encoder.layers.encoder_layer_", 4, ("self_attention.out_proj.weight", "mlp.0.weight",
                                                                "mlp.3.weight")),
               [("1.conv_proj.weight", "weight")]
               + [(f"1.encoder.layers.encoder_layer_{i}.self_attention.in_proj_weight", "attention") for i in range(4)]),
    "charlm": (TEXT, {}, "head", _layers("blocks.layers.", 4, MHA),
               [(f"blocks.layers.{i}.self_attn.in_proj_weight", "attention") for i in range(4)]),
    "charlm-tied": (TEXT, {}, "head", _layers("blocks.layers.", 4, MHA),
                    [(f"blocks.layers.{i}.self_attn.in_proj_weight", "attention") for i in range(4)]),
    "resnet18": (IMAGES, {}, "linear", [], [(n, "weight") for n in _resnet_convs("", "shortcut.weight")]),
    "hf:llama": (TEXT, dict(depth=2, width=32), "model.lm_head",
                 _layers("model.model.layers.", 2, ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                    "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                                    "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                                    "mlp.down_proj.weight")), []),
    "timm:test_resnet": (IMAGES, {}, "fc", [],
                         [(n, "weight") for n in ("conv1.0.weight", "conv1.3.weight", "conv1.6.weight",
                                                  "layer1.0.conv1.weight", "layer1.0.conv2.weight",
                                                  "layer2.0.conv1.weight", "layer2.0.conv2.weight",
                                                  "layer2.0.downsample.1.weight", "layer3.0.conv1.weight",
                                                  "layer3.0.conv2.weight", "layer3.0.conv3.weight",
                                                  "layer3.0.downsample.1.weight", "layer4.0.conv1.weight",
                                                  "layer4.0.conv2.weight", "layer4.0.downsample.1.weight")]),
}


@pytest.mark.parametrize("arch", list(SPLITS))
def test_muon_gets_exactly_the_hidden_matrices_of_every_model(arch):
    if arch.startswith(("hf:", "timm:")):
        pytest.importorskip("transformers" if arch.startswith("hf:") else "timm")
    info, kwargs, head, muon, matrix = SPLITS[arch]
    torch.manual_seed(0)
    model = build_model(arch, info, **kwargs)
    opt = build_optimizer("muon", model, example=example_input(info))
    split = opt.split
    assert split.head == head
    assert [name for name, _ in split.muon] == muon
    assert [(name, kind) for name, _, kind, _ in split.matrix] == matrix
    # The rest is AdamW's: every parameter in exactly one part, the output head's among them.
    named = dict(model.named_parameters())
    assert [name for name, _ in split.adamw] == [n for n in named if n not in set(muon) | {m for m, _ in matrix}]
    head_params = [n for n, p in named.items() if any(p is q for q in model.get_submodule(head).parameters())]
    assert head_params and set(head_params) <= {name for name, _ in split.adamw}
    # ... and the optimizer's parts hold those very tensors.
    def held(part):
        return [id(p) for g in opt.parts[part].param_groups for p in g["params"]] if part in opt.parts else []

    assert held("muon") == [id(named[n]) for n in muon]
    assert sorted(held("matrix")) == sorted(id(named[n]) for n, _ in matrix)
    assert held("adamw") == [id(p) for _, p in split.adamw]


def test_a_tied_head_is_adamws_with_the_embedding():
    model = build_model("charlm-tied", TEXT)
    split = muon_split(model, example_input(TEXT))
    assert model.head.weight is model.embed.weight
    assert any(p is model.embed.weight for _, p in split.adamw)
    assert not any(p is model.embed.weight for _, p in split.muon)


class HeadFirst(nn.Module):
    """The head registered before the body: registration order would pick the wrong layer."""

    def __init__(self):
        super().__init__()
        self.out = nn.Linear(16, 3)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())

    def forward(self, x):
        return self.out(self.body(x))


def test_the_head_is_the_last_linear_map_to_run_not_the_last_registered():
    model = HeadFirst()
    assert output_head(model, torch.zeros(1, 8)) == "out"
    split = muon_split(model, torch.zeros(1, 8))
    assert [n for n, _ in split.muon] == ["body.0.weight", "body.2.weight"]
    assert [n for n, _ in split.adamw] == ["out.weight", "out.bias", "body.0.bias", "body.2.bias"]


def test_finding_the_head_leaves_the_model_and_the_random_state_alone():
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 3)).train()
    before, x = copy.deepcopy(model.state_dict()), torch.randn(2, 8)
    rng = torch.get_rng_state()
    assert output_head(model, x) == "3"
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm's statistics too


class Reshaped(nn.Module):
    """Its last linear map's 6 outputs are not the model's 3."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 6)

    def forward(self, x):
        return self.b(self.a(x)).reshape(-1, 3)


def test_a_model_whose_last_linear_map_is_not_its_output_is_refused_in_one_line():
    with pytest.raises(UsageError) as err:
        muon_split(Reshaped(), torch.zeros(1, 4))
    assert str(err.value) == ("--optimizer muon cannot find the output head: the last linear layer to run, b "
                              "(Linear), has 6 outputs but the model gives 3")


def test_muon_usage_errors_are_one_line():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(UsageError, match="needs one example input"):
        build_optimizer("muon", model)
    with pytest.raises(UsageError, match="no hidden weight matrix"):
        build_optimizer("muon", nn.Linear(4, 3), example=torch.zeros(1, 4))
    with pytest.raises(UsageError, match=r"^--aux-lr must be positive and finite, got -1"):
        build_optimizer("muon", model, aux_lr=-1.0, example=torch.zeros(1, 4))
    with pytest.raises(UsageError, match=r"^--lr must be positive and finite"):
        build_optimizer("muon", model, lr=0.0, example=torch.zeros(1, 4))
    with pytest.raises(UsageError, match="--muon-adjust-lr must be one of original, match_rms_adamw"):
        build_optimizer("muon", model, muon_adjust_lr="spectral", example=torch.zeros(1, 4))


# ------------------------------------------------------------------ the step


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_a_step_is_torch_muon_on_the_hidden_matrices_and_adamw_on_the_rest(adjust):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 4))
    ref, start = copy.deepcopy(model), [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer("muon", model, lr=0.05, aux_lr=3e-3, muon_adjust_lr=adjust, example=torch.zeros(1, 8))
    hidden = [ref[0].weight, ref[3].weight]
    rest = [p for p in ref.parameters() if all(p is not h for h in hidden)]
    by_hand = [torch.optim.Muon(hidden, lr=0.05, weight_decay=0.01, adjust_lr_fn=adjust),
               torch.optim.AdamW(rest, lr=3e-3, weight_decay=0.01)]
    assert [type(part) for part in opt.parts.values()] == [torch.optim.Muon, torch.optim.AdamW]
    for seed in range(3):  # the momentum buffers and Adam's moments carry over
        _grads(model.parameters(), seed)
        _grads(ref.parameters(), seed)
        opt.step()
        for o in by_hand:
            o.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert not any(torch.equal(a, b) for a, b in zip(start, model.parameters()))  # every tensor moved


def _cut_by_hand(t, kind):
    """The linear maps in ``t``, sliced without the rules' flat_matrices: the reference's layout."""
    if kind == "weight":  # a conv filter bank (8, 3, 3, 3): each filter a row
        return [t.reshape(8, 27)]
    if kind == "weight-grouped":  # (8, 2, 3, 3) in 2 groups: each group's 4 filters over its 2 channels
        return [t[:4].reshape(4, 18), t[4:].reshape(4, 18)]
    if kind == "weight_t":  # Hugging Face Conv1D (in 6, out 4): the map is its transpose
        return [t.T]
    if kind == "weight_t-conv":  # ConvTranspose2d(4, 3, 2): (in 4, out 3, 2, 2); W[o, (i, k)] = t[i, o, k]
        return [t.permute(1, 0, 2, 3).reshape(3, 16)]
    if kind == "attention":  # packed (12, 4): q, k, v
        return [t[0:4], t[4:8], t[8:12]]
    if kind == "stacked":  # 3 experts (5 out, 4 in)
        return list(t)
    return [e.T for e in t]  # stacked_t: 3 experts stored (4 in, 5 out)


LAYOUTS = {"weight": ((8, 3, 3, 3), "weight", 1), "weight-grouped": ((8, 2, 3, 3), "weight", 2),
           "weight_t": ((6, 4), "weight_t", 1), "weight_t-conv": ((4, 3, 2, 2), "weight_t", 1),
           "attention": ((12, 4), "attention", 1), "stacked": ((3, 5, 4), "stacked", 1),
           "stacked_t": ((3, 4, 5), "stacked_t", 1)}


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_linear_map_of_a_tensor_steps_as_torch_muon_on_its_own_2d_copy(layout, adjust):
    shape, kind, groups = LAYOUTS[layout]
    w = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    copies = [nn.Parameter(m.detach().clone()) for m in _cut_by_hand(w.detach(), layout)]
    ours = MatrixMuon([{"params": [w], "kind": kind, "conv_groups": groups}], lr=0.05, weight_decay=0.01,
                      adjust_lr_fn=adjust)
    theirs = torch.optim.Muon(copies, lr=0.05, weight_decay=0.01, adjust_lr_fn=adjust)
    for seed in range(3):
        w.grad = torch.randn(shape, generator=torch.Generator().manual_seed(10 + seed))
        for c, g in zip(copies, _cut_by_hand(w.grad, layout), strict=True):
            c.grad = g.clone()
        ours.step()
        theirs.step()
    for mine, copy_ in zip(_cut_by_hand(w.detach(), layout), copies, strict=True):
        assert torch.equal(mine, copy_.detach()), layout
    assert ours.state[w]["momentum_buffer"].shape == w.shape  # the state is the model tensor's own shape


def _muon_by_hand(w, grads, *, lr, decay, adjust):
    """A literal reference for torch.optim.Muon's step on one 2-D weight, its Newton-Schulz run in
    float64: momentum 0.95 (lerp), the Nesterov mix, X / |X|_F, 5 quintic steps on the short
    side's Gram matrix, the lr adjustment by shape, decoupled weight decay."""
    a, b, c = 3.4445, -4.7750, 2.0315
    w, buf = w.double().clone(), torch.zeros_like(w, dtype=torch.float64)
    rows, cols = w.shape
    scale = max(1.0, rows / cols) ** 0.5 if adjust == "original" else 0.2 * max(rows, cols) ** 0.5
    for g in grads:
        g = g.double()
        buf = buf + 0.05 * (g - buf)
        x = g + 0.95 * (buf - g)
        x = x.T if rows > cols else x
        x = x / x.norm()
        for _ in range(5):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        x = x.T if rows > cols else x
        w = w * (1 - lr * decay) - lr * scale * x
    return w


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_float32_newton_schulz_is_muons_step_in_float32_on_every_hidden_matrix(adjust):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4))
    start = [p.detach().clone() for p in model.parameters()]
    ref = copy.deepcopy(model)
    opt = build_optimizer("muon", model, lr=0.05, muon_adjust_lr=adjust, muon_ns_dtype="float32",
                          example=torch.zeros(1, 8))
    torch_muon = build_optimizer("muon", ref, lr=0.05, muon_adjust_lr=adjust, example=torch.zeros(1, 8))
    # the 2-D weights go to MatrixMuon too: torch.optim.Muon's iteration is bfloat16 only
    assert [type(part) for part in opt.parts.values()] == [MatrixMuon, torch.optim.AdamW]
    grads = {0: [], 2: []}
    for seed in range(3):
        _grads(model.parameters(), seed)
        _grads(ref.parameters(), seed)
        for i in grads:
            grads[i].append(model[i].weight.grad.clone())
        opt.step()
        torch_muon.step()
    for i in grads:
        expected = _muon_by_hand(start[i], grads[i], lr=0.05, decay=0.01, adjust=adjust)
        assert torch.allclose(model[i].weight.double(), expected, atol=1e-5, rtol=0), i
        # torch's bfloat16 iteration lands near, not on, the float32 one
        gap = (ref[i].weight - model[i].weight).abs().max().item()
        assert 0 < gap < 2e-3, (i, gap)
    assert model[4].weight.dtype == torch.float32 and torch.equal(model[4].weight, ref[4].weight)  # AdamW's head


def test_float32_newton_schulz_on_conv_filters_matches_the_reference_per_filter_bank():
    w = nn.Parameter(torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(1)))
    start = w.detach().reshape(8, 27).clone()
    opt = MatrixMuon([{"params": [w], "kind": "weight", "conv_groups": 1}], lr=0.05, weight_decay=0.01,
                     ns_dtype="float32")
    grads = []
    for seed in range(3):
        w.grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(10 + seed))
        grads.append(w.grad.reshape(8, 27).clone())
        opt.step()
    expected = _muon_by_hand(start, grads, lr=0.05, decay=0.01, adjust="original")
    assert torch.allclose(w.detach().reshape(8, 27).double(), expected, atol=1e-5, rtol=0)


def test_a_bad_newton_schulz_precision_is_a_one_line_error():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(UsageError, match=r"^--muon-ns-dtype must be one of bfloat16, float32, got 'float16'$"):
        build_optimizer("muon", model, muon_ns_dtype="float16", example=torch.zeros(1, 4))
    with pytest.raises(UsageError, match=r"^--muon-ns-dtype must be one of bfloat16, float32, got 'half'$"):
        MatrixMuon([nn.Parameter(torch.zeros(2, 3))], ns_dtype="half")
    # a param group's own value, given directly and not through the trainer, is checked too
    # (it would otherwise fall to torch's bfloat16 branch in step without a word)
    with pytest.raises(UsageError, match=r"^--muon-ns-dtype must be one of bfloat16, float32, got 'half'$"):
        MatrixMuon([{"params": [nn.Parameter(torch.zeros(2, 3))]},
                    {"params": [nn.Parameter(torch.zeros(4, 3))], "ns_dtype": "half"}])


def test_a_group_added_later_or_a_checkpoints_groups_are_checked_as_the_built_ones():
    w = nn.Parameter(torch.randn(4, 3))
    opt = MatrixMuon([w], ns_dtype="float32")
    with pytest.raises(UsageError, match=r"^--muon-ns-dtype must be one of bfloat16, float32, got 'half'$"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 3))], "ns_dtype": "half"})
    assert len(opt.param_groups) == 1  # the refused group is not kept
    saved = opt.state_dict()
    saved["param_groups"][0]["ns_dtype"] = "half"  # a hand-edited checkpoint
    with pytest.raises(UsageError, match=r"^--muon-ns-dtype must be one of bfloat16, float32, got 'half'$"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["ns_dtype"] == "float32"  # refused before anything was loaded
    saved["param_groups"][0].update(ns_dtype="float32", kind="bias")
    with pytest.raises(ValueError, match="takes the kinds of matrix rules, not 'bias'"):
        opt.load_state_dict(saved)
    del saved["param_groups"][0]["ns_dtype"]  # a checkpoint from before the flag: torch's bfloat16
    saved["param_groups"][0]["kind"] = "weight"
    opt.load_state_dict(saved)
    assert "ns_dtype" not in opt.param_groups[0]


# ------------------------------------------------------------------ state, schedulers, the trainer


def _cnn_and_opt(seed=0):
    torch.manual_seed(seed)
    model = build_model("cnn", IMAGES)
    return model, build_optimizer("muon", model, example=example_input(IMAGES))


def _train(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_state_dict_round_trip_continues_bit_for_bit():
    model, opt = _cnn_and_opt()
    _train(model, opt, 2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    assert set(opt.state_dict()) == {"matrix", "adamw"}  # convs and the head: no 2-D hidden weight here
    _train(model, opt, 2, seed=1)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # only tensors, numbers and strings
    again, opt2 = _cnn_and_opt(seed=5)  # other weights: all of them come from the checkpoint
    again.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optimizer"])
    _train(again, opt2, 2, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))
    with pytest.raises(ValueError, match="has parts matrix, adamw"):
        opt2.load_state_dict({"muon": {}, "adamw": {}})


def test_an_lr_scheduler_drives_every_part():
    model, opt = _cnn_and_opt()
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, MuonWithAdamW)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** t)
    assert [g["lr"] for g in opt.param_groups] == [0.02, 1e-3]
    _train(model, opt, 1)
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.01, 5e-4]
    assert opt.parts["matrix"].param_groups[0]["lr"] == 0.01 and opt.parts["adamw"].param_groups[0]["lr"] == 5e-4
    # Loading a state replaces the parts' group dicts: the scheduler must still reach the new ones.
    opt.load_state_dict(opt.state_dict())
    sched.step()
    assert [g["lr"] for part in opt.parts.values() for g in part.param_groups] == [0.005, 2.5e-4]
    # At a multiplier of 0 nothing moves, weight decay included: the scheduler's lr is the one used.
    model, opt = _cnn_and_opt()
    torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.0)
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# ------------------------------------------------------------------ the compare grid


def _arg_of(spec, flag):
    return spec.argv[spec.argv.index(flag) + 1]


def _budget(argv, drop=()):
    """A run's flags less the optimizer's and the seed (and ``drop``): model, data, loss, batch
    sizes, budget."""
    drop = {"--optimizer", "--lr", "--aux-lr", "--muon-adjust-lr", "--muon-ns-dtype", "--seed", "--momentum", "--momentum-form",
            "--agd-direction", "--agd-head", "--gain", "--schedule", *drop}
    out, it = [], iter(argv)
    for flag in it:
        value = next(it)
        if flag not in drop:
            out += [flag, value]
    return sorted(zip(out[::2], out[1::2]))


MODEL_TABLES = {"fcn": "momentum", "cnn": "momentum", "tv-resnet18": "models", "tv-vit": "models", "charlm": "models"}


@pytest.mark.parametrize("scale", ["small", "paper"])
def test_the_compare_grid_tunes_both_muon_adjustments_at_the_budgets_of_each_models_table(scale):
    from torch_agd.experiments import grids

    specs = grids.grid_runs("compare", scale, seeds=1)
    assert {s.argv[s.argv.index("--arch") + 1] for s in specs} == set(MODEL_TABLES)
    for model, table in MODEL_TABLES.items():
        mine = [s for s in specs if grids.compare_table(s.name) == model]
        assert all(s.argv[s.argv.index("--arch") + 1] == model for s in mine)
        runs = [s for s in mine if s.name.startswith(f"{model}-muon-") and not s.name.endswith("-linear-s0")]
        # the FCN's best Muon lrs fell on the low edge of both grids at seed 0: one more lr below each
        # (the ViT's original at its low edge too: one more lr below it)
        wider, vit = model == "fcn", model == "tv-vit"
        assert len(runs) == 9 + 3 * wider + vit
        lrs = {(s.argv[s.argv.index("--muon-adjust-lr") + 1], float(s.argv[s.argv.index("--lr") + 1])) for s in runs}
        assert lrs == {("match_rms_adamw", lr) for lr in (1e-4,) * wider + (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)} | \
            {("original", lr) for lr in (3e-4,) * wider + (1e-3,) * (wider or vit) + (3e-3, 1e-2, 3e-2, 1e-1)}
        flat = [s for s in mine if s.name == f"{model}-agd-orth-flat-s0"]  # models with convolutions only
        assert len(flat) == (model in ("cnn", "tv-vit", "tv-resnet18"))
        assert all(s.argv[s.argv.index("--agd-direction") + 1] == "orthogonal-flattened" for s in flat)
        assert {s.argv[s.argv.index("--aux-lr") + 1] for s in runs} == {f"{grids.MUON_AUX_LRS[model]:g}"}
        adamw = [s for s in mine if s.name.startswith(f"{model}-adamw-") and not s.name.endswith("-linear-s0")]
        # the CNN's best was its grid's top: one lr above; the ResNet-18's its lowest: one below
        assert len(adamw) == 4 + (model in ("cnn", "tv-resnet18"))
        # torch's bfloat16 Newton-Schulz everywhere but on the ResNet-18 (5 hours a run on this CPU)
        ns = {s.argv[s.argv.index("--muon-ns-dtype") + 1] if "--muon-ns-dtype" in s.argv else None for s in runs}
        assert ns == ({"float32"} if model == "tv-resnet18" else {None}), model
        # every configuration at the budget, data and loss of the run it is compared with in its table
        other = next(s for s in grids.grid_runs(table, scale, seeds=1)
                     if s.name.startswith(f"{model}-") and ("-adam" in s.name))
        assert len(mine) >= 23 and all(_budget(s.argv) == _budget(other.argv) for s in mine), (model, other.name)
    # the ViT and the LM again at 3x their steps, as tables of their own; the LM's tuned lrs go with it
    for table, model in grids.COMPARE_LONGER.items():
        longer = [s for s in specs if grids.compare_table(s.name) == table]
        assert longer and all(s.argv[s.argv.index("--arch") + 1] == model for s in longer)
        base = next(s for s in specs if s.name == f"{model}-agd-s0")
        assert {_arg_of(s, "--steps") for s in longer} == {str(3 * int(_arg_of(base, "--steps")))}
        assert all(_budget(s.argv, drop=("--steps",)) == _budget(base.argv, drop=("--steps",)) for s in longer)
    assert {s.name for s in specs if grids.compare_table(s.name) == "charlm-3x"} == {
        f"charlm-3x-{c}-s0" for c in (*grids.COMPARE_METHODS, "adamw-lr3e-03", "muon-rms-lr1e-02", "agd-orth-linear",
                                      "adamw-lr3e-03-linear", "muon-rms-lr1e-02-linear")}
    by_name = {spec.name: spec for spec in specs}
    assert "tv-vit-muon-rms-lr1e-03-s0" in by_name and "charlm-muon-orig-lr1e-01-s0" in by_name
    assert by_name["charlm-agd-orth-headfro-s0"].argv[-8:] == (
        "--agd-direction", "orthogonal", "--momentum", "0.9", "--agd-head", "frobenius", "--seed", "0")


def test_the_compare_grid_reruns_methods_and_tuned_lrs_at_later_seeds_model_by_model(monkeypatch):
    from torch_agd.experiments import grids

    monkeypatch.setattr(grids, "COMPARE_TUNED", {"charlm": ("adamw-lr3e-03", "muon-rms-lr1e-02")})
    specs = grids.grid_runs("compare", "small", seeds=3)
    archs = [s.argv[s.argv.index("--arch") + 1] for s in specs]
    tables = [grids.compare_table(s.name) for s in specs]
    assert tables == sorted(tables, key=grids.COMPARE_MODELS.index)  # model-major, the longer budgets last
    assert tables[-1] == "charlm-3x" and archs[-1] == "charlm"
    lm = [s.name for s in specs if tables[specs.index(s)] == "charlm"]
    later = {n[:-3] for n in lm if not n.endswith("-s0")}
    # the tuned ones with the linear schedule too: the default is judged against them at 3 seeds
    assert later == {f"charlm-{c}" for c in (*grids.COMPARE_METHODS, "adamw-lr3e-03", "muon-rms-lr1e-02",
                                             "adamw-lr3e-03-linear", "muon-rms-lr1e-02-linear")}
    assert [n for n in lm if n.endswith("-s1")] == [n[:-3] + "-s1" for n in lm if n.endswith("-s0")
                                                     and n[:-3] in later]
    assert {"charlm-adamw-lr3e-03-linear-s0", "charlm-muon-rms-lr1e-02-linear-s0", "charlm-agd-orth-linear-s0",
            "charlm-agd-orth-normalised-s0", "charlm-agd-m0.9-gain10-s0"} <= set(lm)
    later = {s.name[:-3] for s in specs if grids.compare_table(s.name) == "tv-resnet18" and s.name.endswith("-s2")}
    assert later == {f"tv-resnet18-{c}" for c in grids.COMPARE_METHODS}  # no tuned lr known: methods only
    for seed in range(3):
        linear = next(s for s in specs if s.name == f"charlm-muon-rms-lr1e-02-linear-s{seed}")
        assert linear.argv[-4:] == ("--schedule", "linear", "--seed", str(seed))
    assert {s.name for s in specs if s.name.startswith("charlm-3x-") and "-linear-" in s.name} == {
        f"charlm-3x-{c}-linear-s{seed}" for c in ("agd-orth", "adamw-lr3e-03", "muon-rms-lr1e-02") for seed in range(3)}


def test_more_seeds_run_only_the_rows_whose_spread_hid_the_ordering_and_stop_at_the_limit():
    from torch_agd.experiments import grids

    specs = grids.grid_runs("compare", "small", seeds=grids.COMPARE_MORE_SEEDS_UPTO + 1)
    beyond = [s.name for s in specs if int(s.name.rsplit("-s", 1)[1]) >= grids.COMPARE_SEEDS]
    # the CNN's AGD as shipped, AGD(model) and tuned Muon with and without the decay, and the
    # ResNet-18's AGD as shipped and tuned Muon with the decay, at seeds 3 and 4
    assert sorted(beyond) == sorted([f"cnn-{c}-s{seed}" for seed in (3, 4) for c in (
        "agd-orth", "agd-orth-linear", "muon-rms-lr3e-03", "muon-rms-lr3e-03-linear")] + [
        f"tv-resnet18-{c}-s{seed}" for seed in (3, 4) for c in ("agd-orth-linear", "muon-orig-lr3e-02-linear")])
    by_name = {s.name: s for s in specs}
    assert by_name["cnn-muon-rms-lr3e-03-linear-s4"].argv[-4:] == ("--schedule", "linear", "--seed", "4")
    assert by_name["cnn-agd-orth-s3"].argv == (*by_name["cnn-agd-orth-s0"].argv[:-1], "3")  # only the seed differs


def test_a_torch_without_muon_is_a_one_line_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.optim._muon", None)  # as if torch were older than 2.9
    with pytest.raises(UsageError, match=r"^--optimizer muon needs torch.optim.Muon \(torch >= 2.9\)"):
        MatrixMuon([{"params": [nn.Parameter(torch.zeros(2, 2, 3))], "kind": "stacked"}])
