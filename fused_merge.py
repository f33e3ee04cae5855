"""The memory-saving merge of the experts (annex): smat.py's θ_i as one autograd op, for GPU memory.

Plumbing: you do not need this file to read SMAT. The method's merge is smat.merge_masks + smat.interpolate,
θ_i = θ_pre + (Σ_m w_m z_m) ⊙ δ, which the CPU profile trains with. Autograd through that chain keeps
about three M×P tensors for backward (the sigmoid, the clamp's input, z): 2.1 GB for ViT-S with 8
experts. `Config.fused_merge` (on in the paper profile only) swaps in `MergeExperts`, the same value
with a hand-derived backward that keeps at most z (on CPU), or nothing of size M×P (on CUDA, where
the backward draws z again, replaying the generator). tests/test_fast_path.py holds it equal to the
readable chain in value and gradient; docs/performance.md measures what it saves.

It imports nothing of the project: smat.py passes the gate's draw, its temperature and the stretch
(γ, ζ) in, so the method never depends on this file's internals.
"""

from collections.abc import Callable

import torch
from torch import Tensor

GateDraw = Callable[[Tensor, torch.Generator | None], Tensor]  # (log α, generator) -> z, n_experts × n_params


class MergeExperts(torch.autograd.Function):
    """θ_i = θ_pre + (w @ z) ⊙ δ with z = draw(log α, generator), as one op that keeps little for backward.

    `MergeExperts.apply(θ_pre, δ, w, log α, draw, t, (γ, ζ), generator)` returns (θ_i, z), z without a
    gradient. z = clamp(s·(ζ-γ) + γ, 0, 1) with s = σ(·/t), so the chain rule, with g = ∂L/∂θ_i, is
    ∂L/∂δ = g ⊙ (w @ z),  ∂L/∂w = z @ (g ⊙ δ),  ∂L/∂log α = w ⊗ (g ⊙ δ) ⊙ ∂z/∂log α, where
    ∂z/∂log α = (ζ-γ)·s(1-s)/t = (z-γ)(ζ-z) / ((ζ-γ)·t) for 0 < z < 1, else 0.
    On `recompute_on` devices the backward redraws z from log α (from the generator's state saved
    before the draw) instead of keeping it: memory is scarce there and redrawing is cheap; on CPU
    drawing the noise again costs more time than keeping z costs memory.
    """

    recompute_on = {"cuda"}  # device types whose backward recomputes z instead of keeping it

    @staticmethod
    def forward(ctx, theta_pre, delta, weights, log_alpha, draw: GateDraw, temperature: float,
                stretch: tuple[float, float], generator):
        ctx.draw, ctx.temperature, ctx.stretch = draw, temperature, stretch
        ctx.recompute = log_alpha.device.type in MergeExperts.recompute_on
        replay = ctx.recompute and generator is not None
        ctx.replay = (generator.device, generator.get_state()) if replay else None  # before the draw
        gates = draw(log_alpha, generator)
        with torch.autocast(gates.device.type, enabled=False):  # as smat.merge_masks: the mask in float32
            mask = weights.to(gates.dtype) @ gates
        ctx.save_for_backward(delta, weights, mask, log_alpha if ctx.recompute else gates)
        ctx.mark_non_differentiable(gates)
        return theta_pre + mask * delta, gates  # as smat.interpolate

    @staticmethod
    def backward(ctx, grad_theta, _):
        delta, weights, mask, gates = ctx.saved_tensors
        low, high = ctx.stretch  # γ, ζ
        if ctx.recompute:  # `gates` holds log α: draw the same z again
            replay = None if ctx.replay is None else torch.Generator(ctx.replay[0]).set_state(ctx.replay[1])
            gates = ctx.draw(gates, replay)
        grad_mask = grad_theta * delta  # ∂L/∂(w @ z), P
        grad_weights = gates @ grad_mask
        # ∂z/∂log α from z itself, in place so that at most two M×P float tensors are alive
        slope = torch.sub(high + low, gates).mul_(gates).sub_(low * high)  # (z-γ)(ζ-z)
        slope.masked_fill_((gates <= 0) | (gates >= 1), 0.0)
        del gates
        grad_log_alpha = slope.mul_(weights[:, None] / ((high - low) * ctx.temperature)).mul_(grad_mask)
        return None, grad_theta * mask, grad_weights, grad_log_alpha, None, None, None, None
