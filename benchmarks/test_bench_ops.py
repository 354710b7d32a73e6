"""The reference ops on CPU at small sizes: AlignHead (conv 1x1 + GroupNorm + GELU + bilinear + L2) and
the alignment losses (token cosine + batch Gram), forward and forward+backward.

These are the baselines the fused kernels replace; their GPU figures (and the kernels') come from
gpu_report.py. Each benchmark also checks what it ran computes the right kind of thing.
"""

import pytest
import torch

from repa_fast.losses import manifold_gram_loss, token_gram_loss, token_loss
from repa_fast.models import AlignHead

# B, C, map, D, tokens, groups: the real head's structure (8x8 map -> 16x16 grid) at 1/16 of the width.
HEAD = dict(batch=4, in_ch=80, map_hw=(8, 8), D=64, tokens=256, groups=32)
LOSS = dict(batch=4, tokens=64, D=64)


@pytest.fixture(scope="module")
def head_case():
    torch.manual_seed(0)
    head = AlignHead(HEAD["in_ch"], HEAD["D"], HEAD["tokens"], HEAD["groups"])
    feat = torch.randn(HEAD["batch"], HEAD["in_ch"], *HEAD["map_hw"])
    grad = torch.randn(HEAD["batch"], HEAD["tokens"], HEAD["D"])
    return head, feat, grad


@pytest.mark.parametrize("passes", ["forward", "full"])
def test_align_head_reference(benchmark, head_case, passes):
    head, feat0, grad = head_case
    feat = feat0.clone().requires_grad_(passes == "full")

    def run():
        head.zero_grad(set_to_none=True)
        feat.grad = None
        tokens = head.reference(feat)
        if passes == "full":
            tokens.backward(grad)
        return tokens

    tokens = benchmark(run)
    assert tokens.shape == (HEAD["batch"], HEAD["tokens"], HEAD["D"])
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(HEAD["batch"], HEAD["tokens"]))
    if passes == "full":
        grads = [feat.grad, *(p.grad for p in head.parameters())]
        assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("passes", ["forward", "full"])
def test_alignment_losses_reference(benchmark, passes):
    g = torch.Generator().manual_seed(1)
    shape = (LOSS["batch"], LOSS["tokens"], LOSS["D"])
    x = torch.randn(shape, generator=g).requires_grad_(passes == "full")
    y = torch.randn(shape, generator=g)

    def run():
        x.grad = None
        lt, lm = token_loss(x, y), manifold_gram_loss(x, y)
        if passes == "full":
            (lt + 3.0 * lm).backward()
        return lt.detach(), lm.detach()

    lt, lm = benchmark(run)
    # independent random tokens: cosines near 0, so L_token near 1; the Gram difference is positive
    assert 0.9 < lt.item() < 1.1 and lm.item() > 0
    if passes == "full":
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # and both vanish when the tokens are the targets
    assert token_loss(y, y).abs().item() < 1e-6 and manifold_gram_loss(y, y).item() < 1e-12


@pytest.mark.parametrize("passes", ["forward", "full"])
def test_token_gram_loss_reference(benchmark, passes):
    g = torch.Generator().manual_seed(2)
    shape = (LOSS["batch"], LOSS["tokens"], LOSS["D"])
    x = torch.randn(shape, generator=g).requires_grad_(passes == "full")
    y = torch.randn(shape, generator=g)

    def run():
        x.grad = None
        loss = token_gram_loss(x, y)
        if passes == "full":
            loss.backward()
        return loss.detach()

    loss = benchmark(run)
    # independent random unit tokens of width D: off-diagonal Gram entries ~ N(0, 1/D) on each side
    assert 0.5 / LOSS["D"] < loss.item() < 4.0 / LOSS["D"]
    if passes == "full":
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert token_gram_loss(y, y).item() == 0.0
