"""repa_fast.losses.token_gram_loss (the token form of the manifold loss) against its direct formula.

The direct formula builds the whole [B, N, N] Grams (fine at test sizes); the reference must give the same
value and gradients in float64 while never holding a [B, N, N] tensor, forward or backward.
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import assert_close, float64_oracle
from torch.utils._python_dispatch import TorchDispatchMode

from repa_fast.losses import token_gram_loss

CASES = {"B1": (1, 9, 5), "B3-odd-N": (3, 37, 12), "B2-N-above-D": (2, 40, 8)}


def direct(x, y):
    """SimpleTuner's U-REPA manifold term: mean of the squared difference of the unit-token Grams."""
    u, v = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    return ((u @ u.mT - v @ v.mT) ** 2).mean()


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("case", list(CASES))
def test_value_and_gradients_equal_the_direct_formula(case, chunk):
    g = torch.Generator().manual_seed(len(case) + chunk)
    x = torch.randn(CASES[case], generator=g, dtype=torch.float64)
    y = (x + torch.randn(CASES[case], generator=g, dtype=torch.float64)).to(torch.float16)  # a DINO cache's dtype
    upstream = [torch.randn((), generator=g, dtype=torch.float64)]
    (loss,), (dx, dy) = float64_oracle(lambda a, b: token_gram_loss(a, b, chunk=chunk), (x, y), [0, 1], upstream)
    (expected,), (edx, edy) = float64_oracle(direct, (x, y), [0, 1], upstream)
    assert_close({"loss": loss, "dx": dx, "dy": dy}, {"loss": expected, "dx": edx, "dy": edy}, 1e-12)
    assert loss.item() > 0


def test_fp32_input_gives_fp32_and_identical_tokens_give_zero():
    x = torch.randn(2, 10, 6)
    assert token_gram_loss(x, x.half().float()).dtype == torch.float32
    assert token_gram_loss(x, x).item() == 0.0
    assert token_gram_loss(x, 3.0 * x).item() < 1e-12  # scale-free: unit tokens


def test_zero_rows_are_finite():
    x, y = torch.randn(2, 6, 4, dtype=torch.float64), torch.randn(2, 6, 4, dtype=torch.float64)
    x[0, 1] = 0.0
    y[1] = 0.0
    (loss,), (dx,) = float64_oracle(lambda a, b: token_gram_loss(a, b, chunk=4), (x, y), [0], [torch.tensor(1.0)])
    (expected,), (edx,) = float64_oracle(direct, (x, y), [0], [torch.tensor(1.0)])
    assert_close({"loss": loss, "dx": dx}, {"loss": expected, "dx": edx}, 1e-12)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_holds_a_whole_gram():
    """Every tensor made in forward and backward is at most a [B, chunk, N] block or a [B, N, D] token tensor,
    both well under B N N here; the direct formula makes [B, N, N] ones (the check can fail)."""
    B, N, D, chunk = 2, 48, 4, 8
    x = torch.randn(B, N, D, requires_grad=True)
    y = torch.randn(B, N, D, requires_grad=True)
    bound = max(B * chunk * N, B * N * D)
    assert bound < B * N * N
    for fn, holds_whole in ((lambda: token_gram_loss(x, y, chunk=chunk), False), (lambda: direct(x, y), True)):
        with _LargestTensor() as seen:
            fn().backward()
        assert (seen.largest > bound) == holds_whole, seen.largest
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        token_gram_loss(x, y, chunk=chunk)
    assert max(saved) <= B * N * D


def test_bad_input_is_named():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"token_gram_loss: .*\[2, 3, 4\] and \[2, 3, 5\]"):
        token_gram_loss(x, torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        token_gram_loss(x, x, chunk=0)
