"""init_weights_: every submatrix (semi-)orthogonal and scaled by s(W)."""
import math

import pytest
import torch
from torch import nn

from torch_agd.optim.reference import s_of, submatrices
from torch_agd import UsageError, init_weights_

LAYERS = [nn.Linear(7, 19, bias=False), nn.Linear(19, 7, bias=False), nn.Linear(16, 16, bias=False),
          nn.Conv1d(5, 3, 4, bias=False), nn.Conv2d(3, 8, 3, bias=False), nn.Conv2d(16, 4, (1, 2), bias=False),
          nn.Conv3d(2, 6, 2, bias=False)]


@pytest.mark.parametrize("layer", LAYERS, ids=lambda m: f"{type(m).__name__}{tuple(m.weight.shape)}")
def test_every_singular_value_of_every_submatrix_equals_s(layer):
    torch.manual_seed(0)
    init_weights_(layer)
    w = layer.weight.detach().double()
    for idx in submatrices(w):
        sv = torch.linalg.svdvals(w[idx])
        torch.testing.assert_close(sv, torch.full_like(sv, s_of(w.shape)), rtol=1e-5, atol=1e-6)


def test_submatrices_are_independent_draws_and_seeded():
    conv = nn.Conv2d(8, 8, 3, bias=False)
    init_weights_(conv, generator=torch.Generator().manual_seed(1))
    w = conv.weight.detach().clone()
    assert not torch.allclose(w[:, :, 0, 0], w[:, :, 0, 1])  # not one matrix repeated
    init_weights_(conv, generator=torch.Generator().manual_seed(1))
    assert torch.equal(conv.weight, w)
    init_weights_(conv, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(conv.weight, w)


def test_haar_law_first_moments():
    # Uniform orthogonal matrices: every entry has mean 0 and variance 1/n.
    n, draws = 6, 2000
    lin = nn.Linear(n, n, bias=False)
    gen = torch.Generator().manual_seed(0)
    samples = torch.stack([init_weights_(lin, generator=gen).weight.detach().clone() for _ in range(draws)])
    assert samples.mean(0).abs().max() < 4 / math.sqrt(n * draws)
    torch.testing.assert_close(samples.var(0), torch.full((n, n), 1 / n), rtol=0.15, atol=0.0)
    # Without the sign correction of QR the diagonal would be biased positive.
    assert samples.diagonal(dim1=1, dim2=2).mean().abs() < 4 / math.sqrt(n * draws)


def test_accepts_parameter_lists_and_needs_the_module_for_biases():
    ws = [torch.empty(4, 9, requires_grad=True)]
    init_weights_(ws)
    torch.testing.assert_close(torch.linalg.svdvals(ws[0].detach()), torch.full((4,), math.sqrt(4 / 9)))
    # given the module, a bias is known as one and joins its layer: [W | b] acts on [x; 1]
    layer = init_weights_(nn.Linear(3, 5))
    torch.testing.assert_close(torch.linalg.svdvals(layer.weight.detach()), torch.full((3,), math.sqrt(5 / 4)))
    assert torch.equal(layer.bias, torch.zeros(5))
    with pytest.raises(UsageError, match="params\\[1\\].*AGD\\(model\\)"):
        init_weights_([torch.empty(3, 3), torch.empty(3)])
