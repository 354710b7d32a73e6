"""The compile switch: the training forward (U-Net, feature hooks, heads and the alignment loss) is one
graph with no breaks, and compiled it computes what eager does."""

import pytest
import torch

from repa_fast.losses import AlignmentLoss
from repa_fast.models import SD15UNetAligned, build_unet

LAYERS = ["enc_last", "mid", "dec_first"]


def tiny_case(kernels: str):
    torch.manual_seed(0)
    model = SD15UNetAligned(build_unet("tiny"), LAYERS, D=64, num_tokens=64, kernels=kernels,
                            alignment_loss=AlignmentLoss(upper_only=True, kernels=kernels))
    g = torch.Generator().manual_seed(1)
    x, t, ehs = torch.randn(2, 4, 16, 16, generator=g), torch.rand(2, generator=g) * 999, torch.randn(2, 77, 32)
    dino = {layer: torch.randn(2, 64, 64, generator=g).half() for layer in LAYERS}
    return model, (x, t, ehs), dino


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_training_forward_has_no_graph_breaks(kernels):
    """kernels=triton: the fused REPA branch (repa_fast::align_branch_loss) as one node per layer; on CPU it
    runs in Triton's interpreter. What only a GPU shows: inductor compiling around the op on CUDA tensors
    (the GPU report's fast whole step does that)."""
    model, args, dino = tiny_case(kernels)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(*args, target_tokens=dino)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    ops = {str(n.target) for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert ("repa_fast.align_branch_loss" in " ".join(ops)) == (kernels == "triton"), ops
    # compiled, the one forward gives eager's prediction, losses and gradients
    eager = model(*args, target_tokens=dino)
    (eager.loss_token + eager.loss_manifold).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(*args, target_tokens=dino)
    (out.loss_token + out.loss_manifold).backward()
    torch.testing.assert_close(out.sample, eager.sample, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss_token, eager.loss_token, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.loss_manifold, eager.loss_manifold, rtol=1e-4, atol=1e-6)
    for n, p in model.named_parameters():  # one graph: parameters the loss does not reach get zeros, not None
        got = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got, want.get(n, torch.zeros_like(p)), rtol=1e-3, atol=1e-5, msg=n)
    assert not model.hook_manager.features
