"""Gradient clipping folded into fused AdamW's step (train/clipping.py) against clip_grad_norm_."""

import pytest
import torch
from torch import nn

from train.clipping import clip_gradients, folds_into_step, release


def model_with_gradients(scale: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    model(torch.randn(5, 8)).pow(2).sum().mul(scale).backward()
    return model


def adamw(model, fused):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)


@pytest.mark.parametrize("scale", [100.0, 1e-4])  # clipped, and under the threshold (no clip)
def test_folded_clip_steps_as_clip_grad_norm_then_step(scale):
    reference, folded = model_with_gradients(scale), model_with_gradients(scale)
    grads_before = [p.grad.clone() for p in folded.parameters()]
    opt_ref, opt = adamw(reference, fused=True), adamw(folded, fused=True)
    assert folds_into_step(opt)

    norm_ref = nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    opt_ref.step()
    norm = clip_gradients(opt, folded.parameters(), 1.0)
    for p, g in zip(folded.parameters(), grads_before):
        assert torch.equal(p.grad, g)  # left to the step
    opt.step()
    release(opt)

    assert norm == pytest.approx(float(norm_ref), rel=1e-6)
    assert (float(norm) > 1.0) == (scale > 1)
    for p_ref, p in zip(reference.parameters(), folded.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=1e-7)
    assert not hasattr(opt, "grad_scale")


def test_the_fold_changes_the_step_as_clipping_does():
    """Without the clip the step differs: the comparison above can fail."""
    clipped, unclipped = model_with_gradients(100.0), model_with_gradients(100.0)
    opt_c, opt_u = adamw(clipped, fused=True), adamw(unclipped, fused=True)
    clip_gradients(opt_c, clipped.parameters(), 1e-3)
    opt_c.step()
    opt_u.step()
    # AdamW's first step is sign-like, so clipping shows through eps: compare the moments.
    m_c = [opt_c.state[p]["exp_avg"] for p in clipped.parameters()]
    m_u = [opt_u.state[p]["exp_avg"] for p in unclipped.parameters()]
    assert all(not torch.allclose(a, b) for a, b in zip(m_c, m_u))


def test_unfused_optimizer_clips_the_gradients_in_place():
    model, reference = model_with_gradients(100.0), model_with_gradients(100.0)
    opt = adamw(model, fused=False)
    assert not folds_into_step(opt)
    norm = clip_gradients(opt, model.parameters(), 1.0)
    norm_ref = nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    assert norm == pytest.approx(float(norm_ref), rel=1e-6)
    for p, p_ref in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad)
    assert not hasattr(opt, "grad_scale")


def test_infinite_threshold_only_measures():
    model = model_with_gradients(100.0)
    grads = [p.grad.clone() for p in model.parameters()]
    opt = adamw(model, fused=True)
    norm = clip_gradients(opt, model.parameters(), float("inf"))
    assert float(norm) > 1.0
    assert not hasattr(opt, "grad_scale")
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_lightning_wrapper_is_unwrapped():
    """Lightning's wrapper forwards reads but keeps writes: a grad_scale set on it would not reach
    the step, so the clip goes to the optimizer inside it."""
    from lightning.pytorch.core.optimizer import LightningOptimizer

    reference, folded = model_with_gradients(100.0), model_with_gradients(100.0)
    opt_ref, opt = adamw(reference, fused=True), adamw(folded, fused=True)
    nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    opt_ref.step()
    clip_gradients(LightningOptimizer(opt), folded.parameters(), 1.0)
    assert hasattr(opt, "grad_scale")
    opt.step()
    release(LightningOptimizer(opt))
    assert not hasattr(opt, "grad_scale")
    for p_ref, p in zip(reference.parameters(), folded.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=1e-7)
