"""AGD(model) on ordinary models: a rule for every kind of parameter, each checked against a
literal per-block transcription (agd_reference.py), the depth L, and the initialisation."""
import math

import pytest
import torch
from torch import nn

from torch_agd.optim.reference import (attention_blocks, norm_blocks, reference_blocks_step, row_blocks,
                           weight_blocks)
from torch_agd import AGD, UsageError, init_weights_
from torch_agd.optim.rules import module_param_groups

FOREACH = [pytest.param(True, id="foreach"), pytest.param(False, id="loop")]


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 Conv1D, rebuilt here: a linear layer whose weight is stored (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight)


class Slots(nn.Module):
    """A raw positional parameter and a class token, as vision transformers hold them."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 3, 4))
        self.token = nn.Parameter(torch.randn(4))


def positions(model):
    return {name: i for i, (name, _) in enumerate(model.named_parameters())}


CASES = {
    # name: (module builder, literal blocks from the positions of its named parameters)
    "linear+bias": (lambda: nn.Linear(5, 7), lambda m, at: weight_blocks(at["weight"], m.weight.shape, bias=at["bias"])),
    "conv2d+bias": (lambda: nn.Conv2d(3, 6, 3), lambda m, at: weight_blocks(at["weight"], m.weight.shape, bias=at["bias"])),
    "grouped conv": (lambda: nn.Conv2d(4, 6, (2, 3), groups=2, bias=False),
                     lambda m, at: weight_blocks(at["weight"], m.weight.shape, groups=2)),
    "depthwise conv+bias": (lambda: nn.Conv1d(4, 4, 3, groups=4),
                            lambda m, at: weight_blocks(at["weight"], m.weight.shape, groups=4, bias=at["bias"])),
    "conv transpose": (lambda: nn.ConvTranspose2d(4, 6, 2, groups=2),
                       lambda m, at: weight_blocks(at["weight"], m.weight.shape, groups=2, bias=at["bias"], transposed=True)),
    "hf conv1d": (lambda: Conv1D(6, 4),
                  lambda m, at: weight_blocks(at["weight"], m.weight.shape, bias=at["bias"], transposed=True)),
    "embedding": (lambda: nn.Embedding(9, 4), lambda m, at: row_blocks(at["weight"], m.weight.shape)),
    "embedding bag": (lambda: nn.EmbeddingBag(9, 4), lambda m, at: row_blocks(at["weight"], m.weight.shape)),
    "layernorm": (lambda: nn.LayerNorm(5), lambda m, at: norm_blocks(at["weight"], 5, at["bias"])),
    "layernorm 2-d": (lambda: nn.LayerNorm([2, 3]), lambda m, at: norm_blocks(at["weight"], 6, at["bias"])),
    "batchnorm": (lambda: nn.BatchNorm2d(3), lambda m, at: norm_blocks(at["weight"], 3, at["bias"])),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), lambda m, at: norm_blocks(at["weight"], 4, at["bias"])),
    "rmsnorm": (lambda: nn.RMSNorm(5), lambda m, at: norm_blocks(at["weight"], 5)),
    "attention packed": (lambda: nn.MultiheadAttention(4, 2),
                         lambda m, at: attention_blocks(at["in_proj_weight"], 4, at["in_proj_bias"])
                         + weight_blocks(at["out_proj.weight"], (4, 4), bias=at["out_proj.bias"])),
    "raw slots": (Slots, lambda m, at: row_blocks(at["pos"], (1, 3, 4)) + row_blocks(at["token"], (4,))),
}


def _separate_qkv_blocks(m, at):
    """An attention with kdim/vdim != embed_dim: q, k, v weights apart, each with a third of the bias."""
    out = []
    for j, c in enumerate("qkv"):
        shape = getattr(m, f"{c}_proj_weight").shape
        s = math.sqrt(shape[0] / (shape[1] + 1))
        out.append(([(at[f"{c}_proj_weight"], (slice(None), slice(None))),
                     (at["in_proj_bias"], (slice(j * 4, (j + 1) * 4),))], s))
    return out + weight_blocks(at["out_proj.weight"], (4, 4), bias=at["out_proj.bias"])


CASES["attention separate qkv"] = (lambda: nn.MultiheadAttention(4, 2, kdim=3, vdim=5), _separate_qkv_blocks)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("case", list(CASES))
def test_each_rule_takes_the_literal_step(case, foreach):
    build, blocks_of = CASES[case]
    torch.manual_seed(0)
    model = build().double()
    params = [p for _, p in model.named_parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    blocks = blocks_of(model, positions(model))
    depth = 3
    expected, eta = reference_blocks_step(params, [p.grad for p in params], blocks, depth, mults=[2.5] * len(params))
    # every entry of every parameter is in some block: the rule covers the whole tensor
    covered = [torch.zeros_like(p, dtype=torch.bool) for p in params]
    for pieces, _ in blocks:
        for i, idx in pieces:
            if idx and idx[0] == "flat":
                covered[i].view(-1)[idx[1]] = True
            else:
                covered[i][idx] = True
    assert all(c.all() for c in covered)
    opt = AGD(model, lr=0.5, gain=5.0, depth=depth, foreach=foreach, direction="frobenius")
    opt.step()
    assert opt.eta.item() == pytest.approx(eta, rel=1e-12)
    for (name, p), e in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12, msg=name)


def test_depthwise_conv_blocks_are_per_channel_with_the_layers_scale():
    # A depthwise conv (groups = channels) holds one 1x1 block per channel and kernel position;
    # its scale is the layer's sqrt(d_out/d_in)/sqrt(K) = 1/sqrt(K), not sqrt(groups) times that.
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, groups=8, bias=False)
    conv.weight.grad = torch.randn_like(conv.weight)
    before = conv.weight.detach().clone()
    opt = AGD(conv, depth=1, direction="frobenius")
    opt.step()
    moved = (conv.weight.detach() - before).abs()
    torch.testing.assert_close(moved, torch.full_like(moved, opt.eta.item() / 3), rtol=1e-5, atol=0)


def test_tied_embedding_and_head_is_one_tied_table_with_the_heads_scale():
    emb = nn.Embedding(11, 4)
    head = nn.Linear(4, 11, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict(dict(emb=emb, head=head))
    groups = module_param_groups(model)
    assert [(g["kind"], len(g["params"])) for g in groups] == [("tied", 1)]
    assert AGD(model, direction="frobenius").depth == 1
    init_weights_(model)
    # rows of norm 1 (the head's), not sqrt(d) (an embedding's)
    torch.testing.assert_close(emb.weight.detach().norm(dim=1), torch.ones(11))
    torch.manual_seed(0)
    emb.weight.grad = torch.randn(11, 4)
    before = emb.weight.detach().clone()
    literal = [([(0, (r, slice(None)))], 1.0) for r in range(11)]
    expected, eta = reference_blocks_step([before], [emb.weight.grad], literal, depth=1)
    opt = AGD(model, direction="frobenius")
    opt.step()
    assert opt.eta.item() == pytest.approx(eta, rel=1e-6)
    torch.testing.assert_close(emb.weight.detach(), expected[0].float(), rtol=1e-5, atol=1e-6)


def test_kinds_resolved_from_a_module():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, groups=2, bias=False),
                          nn.ConvTranspose1d(4, 2, 2, bias=False), nn.Embedding(5, 4), Slots())
    kinds = {name: g["kind"] for g in module_param_groups(model) for name, _ in g["params"]}
    assert kinds == {"0.weight": "weight", "0.bias": "bias", "1.weight": "norm", "1.bias": "norm",
                     "2.weight": "weight", "3.weight": "weight_t", "4.weight": "embedding",
                     "5.pos": "raw", "5.token": "raw"}
    grouped = [g for g in module_param_groups(model) if g.get("conv_groups")]
    assert [(g["conv_groups"], [n for n, _ in g["params"]]) for g in grouped] == [(2, ["2.weight"])]


def test_tensors_without_a_module_need_a_kind_for_1d():
    w, b = torch.randn(3, 4, requires_grad=True), torch.randn(3, requires_grad=True)
    with pytest.raises(UsageError, match=r"AGD\(model\).*kind='bias'") as err:
        AGD([w, b], direction="frobenius")
    assert "\n" not in str(err.value)
    opt = AGD([{"params": [w]}, {"params": [b], "kind": "bias"}], direction="frobenius")
    w.grad, b.grad = torch.randn(3, 4), torch.randn(3)
    before = b.detach().clone()
    opt.step()
    # a bias with no layer to join is one slot of its own: it moves by eta/L * sqrt(3)
    assert torch.linalg.norm(b.detach() - before).item() == pytest.approx(opt.eta.item() / 1 * math.sqrt(3), rel=1e-6)


@pytest.mark.parametrize("bad,needle", [
    (dict(kind="attention"), "packed"),
    (dict(kind="nonsense"), "unknown AGD kind"),
    (dict(kind="weight", conv_groups=4), "conv_groups"),
    (dict(kind="norm", conv_groups=2), "conv_groups applies"),
])
def test_a_kind_that_cannot_apply_is_a_one_line_error(bad, needle):
    w = torch.randn(6, 4, requires_grad=True)
    with pytest.raises(UsageError, match=needle) as err:
        AGD([{"params": [w], **bad}], direction="frobenius")
    assert "\n" not in str(err.value)


def test_layers_without_a_rule_are_refused_by_name():
    with pytest.raises(UsageError, match=r"rnn\.weight_ih_l0 \(LSTM\)"):
        AGD(nn.ModuleDict(dict(rnn=nn.LSTM(3, 4))), direction="frobenius")


def test_add_param_group_applies_the_same_rules():
    w = torch.randn(4, 3, requires_grad=True)
    opt = AGD([w], direction="frobenius")
    with pytest.raises(UsageError, match="1-D"):
        opt.add_param_group({"params": [torch.randn(4, requires_grad=True)]})
    opt.add_param_group({"params": [torch.randn(5, 4, requires_grad=True)]})
    opt.add_param_group({"params": [torch.randn(5, requires_grad=True)], "kind": "raw"})
    assert opt.depth == 2 and all(g["depth"] == 2 for g in opt.param_groups)


# ---------------------------------------------------------------- depth


def test_depth_counts_layers_in_series():
    torchvision = pytest.importorskip("torchvision")
    from torch_agd.data import DATASETS
    from torch_agd.models import build_model

    cifar = DATASETS["cifar10"]
    assert AGD(torchvision.models.resnet18(num_classes=10), direction="frobenius").depth == 1 + 8 + 1
    assert AGD(torchvision.models.resnet18(num_classes=10), depth="weights", direction="frobenius").depth == 21
    vit = torchvision.models.VisionTransformer(image_size=28, patch_size=7, num_layers=3, num_heads=2,
                                               hidden_dim=8, mlp_dim=16, num_classes=10)
    assert AGD(vit, direction="frobenius").depth == 1 + 2 * 3 + 1  # patch embedding, attention and MLP of each block, head
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    lm = nn.ModuleDict(dict(embed=nn.Embedding(10, 8), blocks=nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                            head=nn.Linear(8, 10)))
    assert AGD(lm, direction="frobenius").depth == 1 + 2 * 2 + 1
    decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(8, 2, 16), 2)
    assert AGD(decoder, direction="frobenius").depth == 3 * 2
    # networks without residual blocks keep the paper's count
    assert AGD(build_model("fcn", DATASETS["mnist"], depth=6, width=8), direction="frobenius").depth == 6
    assert AGD(build_model("vgg", cifar), direction="frobenius").depth == 14
    assert AGD(build_model("resnet18", cifar), direction="frobenius").depth == 10
    assert AGD(build_model("resnet18", cifar), depth="weights", direction="frobenius").depth == 21
    assert AGD(build_model("resnet18", cifar), depth=7, direction="frobenius").depth == 7


def test_repeated_blocks_count_once_each():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return x + self.b(self.a(x).relu())

    model = nn.Sequential(nn.Linear(3, 4), *[Block() for _ in range(5)], nn.Linear(4, 2))
    assert AGD(model, direction="frobenius").depth == 7
    assert AGD(model, depth="weights", direction="frobenius").depth == 12
    # a ModuleDict of blocks (torchtitan keeps its layers so, by name, for pipeline stages)
    assert AGD(nn.ModuleDict({str(i): Block() for i in range(3)}), direction="frobenius").depth == 3

    class AttentionBlock(nn.Module):  # a transformer block of one's own: attention and MLP branches
        def __init__(self):
            super().__init__()
            self.attn, self.mlp = nn.MultiheadAttention(4, 2), nn.Linear(4, 4)

    model = nn.Sequential(nn.Linear(3, 4), nn.ModuleList([AttentionBlock() for _ in range(3)]), nn.Linear(4, 2))
    assert AGD(model, direction="frobenius").depth == 1 + 2 * 3 + 1


# ---------------------------------------------------------------- initialisation


def _singular_values(m):
    return torch.linalg.svdvals(m.double())


def test_init_covers_every_kind():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.LayerNorm(6), nn.ConvTranspose2d(4, 6, 2, groups=2, bias=False),
                          nn.MultiheadAttention(4, 2), nn.Embedding(7, 16), Slots())
    with torch.no_grad():
        model[1].weight.fill_(3.0)
    raw_before = model[5].pos.detach().clone()
    init_weights_(model)
    conv, ln, convt, attn, emb = model[0], model[1], model[2], model[3], model[4]
    s = math.sqrt(3 / (2 + 1)) / 3  # per group 3 x (2 + the bias' constant input), K = 9
    for a in range(2):
        for i in range(3):
            for j in range(3):
                torch.testing.assert_close(_singular_values(conv.weight[3 * a:3 * a + 3, :, i, j]),
                                           torch.full((2,), s, dtype=torch.float64))
    assert torch.equal(conv.bias, torch.zeros(6)) and torch.equal(ln.weight, torch.ones(6))
    assert torch.equal(ln.bias, torch.zeros(6))
    st = math.sqrt(3 / 2) / 2  # transposed: per group d_in 2, d_out 3, K 4
    torch.testing.assert_close(_singular_values(convt.weight[2:4, :, 1, 0]), torch.full((2,), st, dtype=torch.float64))
    for j in range(3):
        q = attn.in_proj_weight[4 * j:4 * j + 4]
        torch.testing.assert_close(_singular_values(q), torch.full((4,), math.sqrt(4 / 5), dtype=torch.float64))
    torch.testing.assert_close(emb.weight.square().mean(1), torch.ones(7))
    assert torch.equal(model[5].pos, raw_before)  # raw parameters keep their own initialisation


def test_init_of_plain_tensors_is_unchanged_from_the_paper():
    gen = torch.Generator().manual_seed(3)
    w = torch.empty(6, 4, 3, 3)
    init_weights_([w], generator=gen)
    for i in range(3):
        for j in range(3):
            torch.testing.assert_close(_singular_values(w[:, :, i, j]),
                                       torch.full((4,), math.sqrt(6 / 4) / 3, dtype=torch.float64))


# ---------------------------------------------------------------- real models, unchanged


def _vit():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.VisionTransformer(image_size=28, patch_size=7, num_layers=2, num_heads=2,
                                                hidden_dim=16, mlp_dim=32, num_classes=10)


@pytest.mark.parametrize("which", ["resnet18", "vit", "charlm"])
def test_real_models_train_with_no_other_change(which):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    if which == "resnet18":
        model, x = torchvision.models.resnet18(num_classes=10), torch.randn(4, 3, 32, 32)
    elif which == "vit":
        model, x = _vit(), torch.randn(4, 3, 28, 28)
    else:
        from torch_agd.models.charlm import CharLM

        model, x = CharLM(vocab=20, dim=16, layers=2, heads=2, context=8, tied=True), torch.randint(0, 20, (4, 8))
    init_weights_(model)
    opt = AGD(model, direction="frobenius")
    before = [p.detach().clone() for p in model.parameters()]
    out = model(x)
    out.float().square().mean().backward()
    opt.step()
    assert torch.isfinite(opt.eta) and opt.eta.item() > 0
    moved = [not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True) if p.grad is not None]
    assert len(moved) == len(before) and all(moved) and all(torch.isfinite(p).all() for p in model.parameters())
