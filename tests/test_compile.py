"""The compile switch: the tiny U-Net compiles with its feature hooks inside one graph."""

import pytest
import torch

from repa_fast.models import SD15UNetAligned, build_unet


@pytest.mark.slow
def test_unet_with_hooks_has_no_graph_breaks():
    torch.manual_seed(0)
    model = SD15UNetAligned(build_unet("tiny"), ["enc_last", "mid", "dec_first"], D=64, num_tokens=64)
    x, t, ehs = torch.randn(2, 4, 16, 16), torch.rand(2) * 999, torch.randn(2, 77, 32)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x, t, ehs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    # the hooks ran inside the traced graph: their captured features are those of eager mode
    with torch.no_grad():
        compiled = torch.compile(model, backend="aot_eager")
        out = compiled(x, t, ehs)
        feats = {k: model.hook_manager.get_feature(k).clone() for k in model.align_layers}
        model.clear_features()
        ref = model(x, t, ehs)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for k, v in feats.items():
        torch.testing.assert_close(v, model.hook_manager.get_feature(k), rtol=1e-4, atol=1e-4)
