"""A decoder-only character-level transformer language model, built from torch.nn parts.

Embedding + a learned positional parameter -> nn.TransformerEncoderLayer blocks (pre-norm, GELU,
causal mask) -> LayerNorm -> a linear head over the characters, optionally tied to the embedding.
Nothing in it is written for AGD: it is the kind of model people have.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CharLM(nn.Module):
    def __init__(self, vocab: int, *, dim: int = 128, layers: int = 4, heads: int = 4, context: int = 128,
                 tied: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(1, context, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.tied = tied
        if tied:
            self.head.weight = self.embed.weight
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    @torch.no_grad()
    def reset_constants(self) -> None:
        """Set again what the constructor sets without drawing a number and init_weights_ leaves
        alone: the positional parameter (zero) and the causal mask. `agd train --fsdp` builds the
        model on the meta device, where they hold nothing, and calls this once the shards are
        allocated (torch_agd/train/meta.py)."""
        self.pos.zero_()
        self.mask = nn.Transformer.generate_square_subsequent_mask(self.mask.shape[0], device=self.pos.device)

    def forward(self, idx: Tensor) -> Tensor:
        """(B, T) character indices -> (B, T, vocab) logits for the next character."""
        t = idx.shape[1]
        x = self.embed(idx) + self.pos[:, :t]
        x = self.blocks(x, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.ln(x))  # tied or not, the logits as GPT-2 computes them (AGD's tied rule)
