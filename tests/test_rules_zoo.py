"""Rules for what timm and Hugging Face transformers models hold, each against the literal
transcription (torch_agd.optim.reference): mixture-of-experts stacks and their biases, routers,
gains outside torch's norm layers, the extra parameters of conv subclasses, tied tables. The
modules here rebuild the libraries' layouts in a few lines, so the rules are tested without
either library; the last tests run the real models where the libraries are installed."""
import math

import pytest
import torch
from torch import nn

from torch_agd import AGD, UsageError, init_weights_
from torch_agd.optim.reference import reference_blocks_step, row_blocks, stacked_blocks, weight_blocks
from torch_agd.optim.rules import module_param_groups

FOREACH = [pytest.param(True, id="foreach"), pytest.param(False, id="loop")]


class Experts(nn.Module):
    """transformers' stacked experts (MixtralExperts, GptOssExperts): num_experts and
    is_transposed are what its use_experts_implementation decorator sets."""

    def __init__(self, experts=3, d=4, hidden=6, transposed=False, bias=False):
        super().__init__()
        self.num_experts, self.is_transposed = experts, transposed
        up, down = ((experts, d, 2 * hidden), (experts, hidden, d)) if transposed else \
            ((experts, 2 * hidden, d), (experts, d, hidden))
        self.gate_up_proj = nn.Parameter(torch.randn(up))
        self.down_proj = nn.Parameter(torch.randn(down))
        if bias:
            self.gate_up_proj_bias = nn.Parameter(torch.randn(experts, 2 * hidden))
            self.down_proj_bias = nn.Parameter(torch.randn(experts, d))


class MixtralTopKRouter(nn.Module):
    def __init__(self, experts=3, d=4):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, d))


class LlamaRMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))  # a Gemma-style 1 + weight gain starts at 0


class LayerScale(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((d,), 1e-5))


class ScaledStdConv2d(nn.Conv2d):
    """timm's weight-standardised conv: a gain per output channel beside weight and bias."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))


def at(model):
    return {name: i for i, (name, _) in enumerate(model.named_parameters())}


def literal_step(model, blocks, depth, foreach):
    torch.manual_seed(1)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    expected, eta = reference_blocks_step(params, [p.grad for p in params], blocks, depth)
    opt = AGD(model, depth=depth, foreach=foreach, direction="frobenius")
    opt.step()
    assert opt.eta.item() == pytest.approx(eta, rel=1e-5)
    assert len(params) == len(expected) >= 1
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), e.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("transposed", [False, True], ids=["(E,out,in)", "(E,in,out)"])
@pytest.mark.parametrize("bias", [False, True], ids=["", "+bias"])
def test_stacked_experts_are_one_block_per_expert(transposed, bias, foreach):
    model = Experts(transposed=transposed, bias=bias)
    i = at(model)
    blocks = stacked_blocks(i["gate_up_proj"], model.gate_up_proj.shape, transposed, i.get("gate_up_proj_bias")) + \
        stacked_blocks(i["down_proj"], model.down_proj.shape, transposed, i.get("down_proj_bias"))
    assert len(blocks) == 6
    kinds = {g["kind"] for g in module_param_groups(model)}
    assert kinds == {"stacked_t" if transposed else "stacked"} | ({"stacked_bias"} if bias else set())
    literal_step(model, blocks, depth=2, foreach=foreach)


@pytest.mark.parametrize("transposed", [False, True])
def test_stacked_experts_start_orthogonal_each_at_its_scale(transposed):
    model = Experts(experts=2, d=4, hidden=6, transposed=transposed, bias=True)
    init_weights_(model)
    for w, d_out, d_in in ((model.gate_up_proj, 12, 4), (model.down_proj, 4, 6)):
        assert len(w) == 2
        for e in range(2):
            s = math.sqrt(d_out / (d_in + 1))  # each bias joins its expert's matrix
            sv = torch.linalg.svdvals(w[e].detach().double())
            torch.testing.assert_close(sv, torch.full_like(sv, s))
    assert torch.equal(model.down_proj_bias.detach(), torch.zeros(2, 4))


@pytest.mark.parametrize("foreach", FOREACH)
def test_a_router_is_a_linear_map(foreach):
    model = MixtralTopKRouter()
    assert [g["kind"] for g in module_param_groups(model)] == ["weight"]
    literal_step(model, weight_blocks(0, model.weight.shape), depth=1, foreach=foreach)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("build", [lambda: LlamaRMSNorm(5), lambda: LayerScale(5)], ids=["rmsnorm", "layerscale"])
def test_gains_outside_torchs_norms_are_one_block_and_keep_their_init(build, foreach):
    model = build()
    assert [g["kind"] for g in module_param_groups(model)] == ["gain"]
    p = next(model.parameters())
    before = p.detach().clone()
    init_weights_(model)
    assert torch.equal(p.detach(), before)  # Gemma's 1 + weight starts at 0; a layer scale near 0
    literal = [([(0, ("flat", c)) for c in range(5)], 1.0)]
    net = nn.Sequential(nn.Linear(3, 5, bias=False), model)  # the gain does not count toward L
    assert AGD(net, direction="frobenius").depth == 1
    literal_step(model, literal, depth=1, foreach=foreach)


@pytest.mark.parametrize("foreach", FOREACH)
def test_a_weight_standardised_convs_gain_is_a_gain_and_its_bias_joins_the_weight(foreach):
    model = ScaledStdConv2d(3, 4, 2)
    kinds = {g["kind"]: [n for n, _ in g["params"]] for g in module_param_groups(model)}
    assert kinds == {"weight": ["weight"], "bias": ["bias"], "gain": ["gain"]}
    i = at(model)
    blocks = weight_blocks(i["weight"], model.weight.shape, bias=i["bias"]) + \
        [([(i["gain"], ("flat", c)) for c in range(4)], 1.0)]
    literal_step(model, blocks, depth=1, foreach=foreach)


class Affine(nn.Module):
    """timm's ResMLP affine: alpha * x + beta, both stored (1, 1, d)."""

    def __init__(self, d):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, 1, d))
        self.beta = nn.Parameter(torch.zeros(1, 1, d))


class ResBlock(nn.Module):
    """A residual block with layer scales named as timm's ResMLP and CaiT name them."""

    def __init__(self, d):
        super().__init__()
        self.norm1, self.fc = Affine(d), nn.Linear(d, d)
        self.ls1 = nn.Parameter(torch.full((d,), 1e-4))
        self.gamma_1 = nn.Parameter(torch.full((d,), 1e-4))
        self.offset = nn.Parameter(torch.zeros(1, 1, d))  # no role that a name or class tells: raw


def test_layer_scales_and_affines_by_their_names_are_gains():
    kinds = {g["kind"]: [n for n, _ in g["params"]] for g in module_param_groups(ResBlock(4))}
    assert kinds == {"weight": ["fc.weight"], "bias": ["fc.bias"], "raw": ["offset"],
                     "gain": ["ls1", "gamma_1", "norm1.alpha", "norm1.beta"]}


def test_timms_resmlp_trains():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resmlp_12_224", pretrained=False, num_classes=5, img_size=32)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    losses = train(model, (x, y), lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), steps=10)
    assert max(losses) == losses[0] and losses[-1] < 0.8 * losses[0]  # diverged to 1e23 as raw slots


def test_any_other_extra_parameter_of_a_conv_is_refused_by_name():
    class Odd(nn.Conv2d):
        def __init__(self):
            super().__init__(3, 4, 2)
            self.mix = nn.Parameter(torch.ones(3, 3))

    with pytest.raises(UsageError, match=r"AGD has no rule for 1\.mix \(Odd\): it is neither") as err:
        AGD(nn.Sequential(nn.ReLU(), Odd()), direction="frobenius")
    assert "\n" not in str(err.value) and "register_rule" in str(err.value)


def test_a_bias_whose_layer_is_a_tied_table_is_a_slot_of_its_own():
    """BERT's decoder: a Linear head tied to the word embeddings, whose bias is also its parent
    module's parameter under another name."""
    class Head(nn.Module):
        def __init__(self, emb):
            super().__init__()
            self.decoder = nn.Linear(4, 9)
            self.decoder.weight = emb.weight
            self.bias = self.decoder.bias

    emb = nn.Embedding(9, 4)
    model = nn.ModuleDict(dict(emb=emb, head=Head(emb)))
    kinds = {g["kind"]: [n for n, _ in g["params"]] for g in module_param_groups(model)}
    assert kinds == {"tied": ["emb.weight"], "bias": ["head.bias"]}
    init_weights_(model)  # used to fail with an IndexError
    assert torch.equal(model.head.bias.detach(), torch.zeros(9))
    i = at(model)
    literal_step(model, row_blocks(i["emb.weight"], (9, 4))[:0] + [
        ([(i["emb.weight"], (r, slice(None)))], 1.0) for r in range(9)] + row_blocks(i["head.bias"], (9,)),
        depth=1, foreach=True)


# ---------------------------------------------------------------- the real libraries


def train(model, batch, loss_of, steps=8):
    init_weights_(model)
    opt = AGD(model, direction="frobenius")
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    return losses


def test_timms_nfnet_trains():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_nfnet", pretrained=False, num_classes=5)
    assert any(g["kind"] == "gain" for g in module_param_groups(model))
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 5, (4,))
    losses = train(model, (x, y), lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))
    assert losses[-1] < losses[0]


def _tiny_lm(name):
    transformers = pytest.importorskip("transformers")
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=128)
    config, cls = {
        "gpt2": (lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=32),
                 "GPT2LMHeadModel"),
        "bert": (lambda: transformers.BertConfig(**small), "BertForMaskedLM"),
        "mixtral": (lambda: transformers.MixtralConfig(**small, num_key_value_heads=2, num_local_experts=4,
                                                       num_experts_per_tok=2), "MixtralForCausalLM"),
        "gemma": (lambda: transformers.GemmaConfig(**small, num_key_value_heads=2, head_dim=8), "GemmaForCausalLM"),
    }[name]
    torch.manual_seed(0)
    return getattr(transformers, cls)(config())


@pytest.mark.parametrize("name, kinds", [
    ("gpt2", {"tied", "embedding", "norm", "weight_t", "bias"}),
    ("bert", {"tied", "embedding", "norm", "weight", "bias"}),
    ("mixtral", {"embedding", "weight", "stacked", "gain"}),
    ("gemma", {"tied", "weight", "gain"}),
])
def test_hugging_face_models_train_with_a_sound_start(name, kinds):
    model = _tiny_lm(name)
    assert {g["kind"] for g in module_param_groups(model)} == kinds
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = train(model, ids, lambda m, b: m(input_ids=b, labels=b).loss)
    # a tied table at the embedding's scale started GPT-2 near 37 nats and Gemma near 64 (ln 128 = 4.9)
    assert losses[0] < 2 * math.log(128) and losses[-1] < losses[0]
