"""The models of the zoo (benchmarks/zoo.py): each entry builds a randomly initialised model, a
fixed batch for it and its loss, from code alone (no weights are ever downloaded).

An entry is Entry(name, library, build) where build() returns (model, batch, loss_fn) and
loss_fn(model, batch) is a scalar tensor. Kept apart from zoo.py so that tests/test_zoo.py can
build the same models without the runner. timm and transformers are imported only inside the
builders: `import zoo_models` needs torch alone.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # configs are built in code; never reach the hub

BATCH = 8
CLASSES = 10
IMAGE = 64     # small enough for one CPU core, large enough for every hierarchical model below
VOCAB = 256    # bytes: the same vocabulary the stdlib text uses (torch_agd/data/text.py)
SEQ = 32


@dataclass(frozen=True)
class Entry:
    name: str
    library: str  # "timm" or "transformers"
    build: Callable[[], tuple]
    # what --real trains it on, if anything: "fashion-mnist" (images) or "stdlib" (bytes, causal LM)
    real: str | None = None
    # for a model AGD refuses: (what the user does, a function that does it and returns an undo)
    override: tuple[str, Callable[[], Callable[[], None]]] | None = None


# ---------------------------------------------------------------- batches and losses

def image_batch(size: int = IMAGE, channels: int = 3) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(BATCH, channels, size, size, generator=g),
            "y": torch.randint(0, CLASSES, (BATCH,), generator=g)}


def classify(model, batch):
    out = model(batch["x"])
    return F.cross_entropy(out, batch["y"])


def token_batch(vocab: int = VOCAB, seq: int = SEQ) -> dict:
    g = torch.Generator().manual_seed(2)
    return {"input_ids": torch.randint(0, vocab, (BATCH, seq), generator=g)}


def own_loss(model, batch):
    """A Hugging Face model's own loss (the batch carries labels)."""
    return model(**batch).loss


def causal_lm_loss(model, batch):
    # labels = inputs: the model shifts them itself
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


# ---------------------------------------------------------------- overrides for refused models

def _lstm_as_linear_maps():
    """AGD refuses nn.LSTM (no rule describes its stacked gates yet); a user can register one:
    each weight_ih / weight_hh as one (4h, in) linear map, each bias a slot of its own."""
    from torch import nn

    from torch_agd import register_rule
    from torch_agd.optim import rules

    saved = dict(rules._BY_TYPE)  # the registry is global: the zoo puts it back after this model
    register_rule(nn.LSTM, lambda module, attr: rules.Weight() if attr.startswith("weight") else rules.Bias())
    return lambda: (rules._BY_TYPE.clear(), rules._BY_TYPE.update(saved))


LSTM_OVERRIDE = ("register_rule(nn.LSTM, lambda m, a: Weight() if a.startswith('weight') else Bias())",
                 _lstm_as_linear_maps)


# ---------------------------------------------------------------- timm

def timm_entry(name: str, size: int = IMAGE, real: bool = False, override=None, **kwargs) -> Entry:
    def build():
        import timm

        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs)
        return model, image_batch(size), classify
    return Entry(name, "timm", build, "fashion-mnist" if real else None, override)


def timm_test_models() -> list[str]:
    try:
        import timm
    except ImportError:
        return []
    return timm.list_models("test_*")


def timm_entries() -> list[Entry]:
    # timm's own tiny test models, each at its default input size (a few are fixed-size)
    entries = [timm_entry(n, **_test_kwargs(n)) for n in timm_test_models()]
    fixed = dict(img_size=IMAGE)  # ViT-like models sized for 224 take img_size= and resize their tables
    entries += [
        timm_entry("resnet18", real=True),
        timm_entry("resnet10t"),
        timm_entry("convnext_atto", real=True),
        timm_entry("efficientnet_b0"),
        timm_entry("mobilenetv2_050", real=True),
        timm_entry("mobilenetv3_small_050"),
        timm_entry("mobilenetv4_conv_small_035"),
        timm_entry("regnetx_002"),
        timm_entry("regnety_002"),
        timm_entry("deit_tiny_patch16_224", **fixed),
        timm_entry("vit_tiny_patch16_224", real=True, **fixed),
        timm_entry("swin_tiny_patch4_window7_224", img_size=IMAGE, window_size=4),
        timm_entry("nf_regnet_b0"),
        timm_entry("nf_resnet26"),
        timm_entry("densenet121"),
        timm_entry("mobilevit_xxs"),
        timm_entry("levit_128s", **fixed),
        timm_entry("ghostnet_050"),
        timm_entry("mnasnet_050"),
        timm_entry("dla46_c"),
        timm_entry("poolformerv2_s12"),
        timm_entry("cait_xxs24_224", **fixed),
        timm_entry("pit_ti_224", **fixed),
        timm_entry("xcit_nano_12_p16_224", **fixed),
        timm_entry("edgenext_xx_small"),
        timm_entry("repvgg_a0"),
        timm_entry("hrnet_w18_small"),
        timm_entry("mixer_s16_224", **fixed),
        timm_entry("resmlp_12_224", **fixed),
        timm_entry("efficientvit_m0", **fixed),
        timm_entry("fastvit_t8"),
        timm_entry("lcnet_050"),
        timm_entry("rexnet_100"),
        timm_entry("hgnetv2_b0"),
        timm_entry("mambaout_femto"),
        timm_entry("res2net50_14w_8s"),
        timm_entry("selecsls42b"),
        timm_entry("sequencer2d_s", override=LSTM_OVERRIDE),  # LSTMs along rows and columns
        timm_entry("convit_tiny", **fixed),
        timm_entry("inception_next_atto"),
        timm_entry("starnet_s1"),
        timm_entry("pvt_v2_b0"),
        timm_entry("tiny_vit_5m_224"),
        timm_entry("efficientformerv2_s0", **fixed),
        timm_entry("eva02_tiny_patch14_224", size=56, img_size=56),  # patch 14: 4 x 4 patches
        timm_entry("skresnet18"),
        timm_entry("resnest14d"),
        timm_entry("cs3darknet_s"),
    ]
    return entries


def _test_kwargs(name: str) -> dict:
    """timm's test models are meant for 160 x 160; at 64 x 64 they cost a sixth as much, and
    those fixed to one input size (ViTs, CoAtNet, MaxViT) take img_size= for it."""
    import timm

    return dict(img_size=IMAGE) if timm.get_pretrained_cfg(name).fixed_input_size else {}


# ---------------------------------------------------------------- transformers

# One small size for every config: 2 layers, width 64, 4 heads, a byte vocabulary.
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
NO_DROPOUT = ("attention_dropout", "hidden_dropout", "dropout", "attention_probs_dropout_prob",
              "hidden_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout_rate",
              "classifier_dropout", "activation_dropout", "summary_first_dropout")


def _config(cls_name: str, **kwargs):
    import transformers

    config = getattr(transformers, cls_name)(**kwargs)
    # a fixed batch has a fixed loss: no dropout anywhere
    for key in NO_DROPOUT:
        if hasattr(config, key) and isinstance(getattr(config, key), float):
            setattr(config, key, 0.0)
    return config


def hf_entry(name: str, model_cls: str, config_cls: str, batch: Callable[[], dict] = token_batch,
             loss: Callable = causal_lm_loss, real: str | None = None, override=None, **config) -> Entry:
    def build():
        import transformers

        torch.manual_seed(0)
        # what AutoModel*.from_config calls, for the concrete class (no hub, no weights)
        model = getattr(transformers, model_cls)._from_config(_config(config_cls, **config),
                                                               attn_implementation="eager")
        return model, batch(), loss
    return Entry(name, "transformers", build, real, override)


def _mlm_batch() -> dict:
    b = token_batch()
    return {"input_ids": b["input_ids"], "labels": b["input_ids"]}


def _seq2seq_batch() -> dict:
    g = torch.Generator().manual_seed(3)
    return {"input_ids": torch.randint(0, VOCAB, (BATCH, SEQ), generator=g),
            "labels": torch.randint(0, VOCAB, (BATCH, SEQ // 2), generator=g)}


def _pixel_batch(size: int = 32) -> dict:
    b = image_batch(size)
    return {"pixel_values": b["x"], "labels": b["y"]}


def _seq_class_batch() -> dict:
    b = token_batch()
    g = torch.Generator().manual_seed(4)
    return {"input_ids": b["input_ids"], "labels": torch.randint(0, 2, (BATCH,), generator=g)}


def transformers_entries() -> list[Entry]:
    llama_like = dict(SMALL, num_key_value_heads=2)
    gpt2 = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128, bos_token_id=0, eos_token_id=0)
    moe = dict(llama_like, num_local_experts=4, num_experts_per_tok=2)
    return [
        hf_entry("gpt2 (tied)", "GPT2LMHeadModel", "GPT2Config", real="stdlib", **gpt2),
        hf_entry("gpt2 (untied)", "GPT2LMHeadModel", "GPT2Config", real="stdlib",
                 tie_word_embeddings=False, **gpt2),
        hf_entry("llama", "LlamaForCausalLM", "LlamaConfig", real="stdlib", **llama_like),
        hf_entry("mistral", "MistralForCausalLM", "MistralConfig", **llama_like),
        hf_entry("qwen2", "Qwen2ForCausalLM", "Qwen2Config", **llama_like),
        hf_entry("qwen3", "Qwen3ForCausalLM", "Qwen3Config", head_dim=16, **llama_like),
        hf_entry("gemma", "GemmaForCausalLM", "GemmaConfig", head_dim=16, **llama_like),
        hf_entry("gemma2", "Gemma2ForCausalLM", "Gemma2Config", head_dim=16, **llama_like),
        hf_entry("phi3", "Phi3ForCausalLM", "Phi3Config", pad_token_id=0, **llama_like),
        hf_entry("phi", "PhiForCausalLM", "PhiConfig", **SMALL),
        hf_entry("mixtral", "MixtralForCausalLM", "MixtralConfig", **moe),
        hf_entry("qwen3-moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", head_dim=16, num_experts=4,
                 num_experts_per_tok=2, moe_intermediate_size=64, **llama_like),
        hf_entry("olmo2", "Olmo2ForCausalLM", "Olmo2Config", **llama_like),
        hf_entry("gpt-neox", "GPTNeoXForCausalLM", "GPTNeoXConfig", **SMALL),
        hf_entry("opt", "OPTForCausalLM", "OPTConfig", hidden_size=64, num_hidden_layers=2,
                 num_attention_heads=4, ffn_dim=128, vocab_size=VOCAB, max_position_embeddings=128,
                 word_embed_proj_dim=64),
        hf_entry("bloom", "BloomForCausalLM", "BloomConfig", hidden_size=64, n_layer=2, n_head=4,
                 vocab_size=VOCAB),
        hf_entry("mamba", "MambaForCausalLM", "MambaConfig", hidden_size=64, num_hidden_layers=2,
                 vocab_size=VOCAB, state_size=8),
        hf_entry("bert (masked LM)", "BertForMaskedLM", "BertConfig", batch=_mlm_batch, loss=own_loss, **SMALL),
        hf_entry("roberta (masked LM)", "RobertaForMaskedLM", "RobertaConfig", batch=_mlm_batch,
                 loss=own_loss, pad_token_id=1, **dict(SMALL, max_position_embeddings=130)),
        hf_entry("distilbert (classifier)", "DistilBertForSequenceClassification", "DistilBertConfig",
                 batch=_seq_class_batch, loss=own_loss, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                 vocab_size=VOCAB, max_position_embeddings=128),
        hf_entry("albert (masked LM)", "AlbertForMaskedLM", "AlbertConfig", batch=_mlm_batch,
                 loss=own_loss, embedding_size=32, **SMALL),
        hf_entry("t5", "T5ForConditionalGeneration", "T5Config", batch=_seq2seq_batch, loss=own_loss,
                 d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=VOCAB,
                 decoder_start_token_id=0),
        hf_entry("bart", "BartForConditionalGeneration", "BartConfig", batch=_seq2seq_batch, loss=own_loss,
                 d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=VOCAB,
                 max_position_embeddings=128),
        hf_entry("vit", "ViTForImageClassification", "ViTConfig", batch=_pixel_batch, loss=own_loss,
                 image_size=32, patch_size=8, num_labels=CLASSES, hidden_size=64, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=128),
        hf_entry("convnext", "ConvNextForImageClassification", "ConvNextConfig", batch=_pixel_batch,
                 loss=own_loss, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=CLASSES),
    ]


def all_entries() -> list[Entry]:
    return timm_entries() + transformers_entries()
