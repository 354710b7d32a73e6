"""The reference losses: denoising (three noise paths) + token cosine + batch Gram ("manifold").

This file is the definition the Triton kernels are tested against. Everything is computed in fp32
(or in float64 when given float64).

    L_token    = mean_{b,n} (1 - <x_bn/|x_bn|, y_bn/|y_bn|>)          (zero rows: cosine 0)
    p_b        = normalize(mean_n normalize(x_bn)),  q_b likewise from y
    L_manifold = mean over kept (b, c) of (p_b.p_c - q_b.q_c)^2      (upper_only: b <= c; mask_diag: b != c)
                 or, in its token form (token_gram_loss), mean_{b,i,j} (u_bi.u_bj - v_bi.v_bj)^2
    loss       = L_diff + align_coeff * (L_token + manifold_coeff * L_manifold)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from repa_fast.config import use_triton

NORM_EPS = 1e-12  # F.normalize's eps: a zero row stays zero instead of becoming NaN


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (float64 stays float64, so tests can run the reference in double)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean over b, n of 1 - cos(x_bn, y_bn); x, y: [B, N, D]."""
    x = F.normalize(_fp32(x), dim=-1, eps=NORM_EPS)
    y = F.normalize(_fp32(y), dim=-1, eps=NORM_EPS)
    return (1.0 - (x * y).sum(-1)).mean()


def _gram_mask(B: int, upper_only: bool, mask_diag: bool, device) -> torch.Tensor:
    keep = torch.ones(B, B, dtype=torch.bool, device=device)
    if upper_only:
        keep = torch.triu(keep)
    if mask_diag:
        keep &= ~torch.eye(B, dtype=torch.bool, device=device)
    return keep


def manifold_gram_loss(x_tokens: torch.Tensor, y_tokens: torch.Tensor, upper_only: bool = False,
                       mask_diag: bool = False) -> torch.Tensor:
    """Squared difference of the sample-sample Gram matrices of mean-pooled unit tokens ([B, N, D] each).

    Returns an fp32 scalar; with no kept entries (B = 1 and mask_diag) it is 0, not NaN.
    """
    if x_tokens.shape != y_tokens.shape or x_tokens.ndim != 3:
        raise ValueError(f"manifold_gram_loss: x and y must both be [B,N,D], got {list(x_tokens.shape)} "
                         f"and {list(y_tokens.shape)}")
    p = F.normalize(F.normalize(_fp32(x_tokens), dim=-1, eps=NORM_EPS).mean(1), dim=-1, eps=NORM_EPS)
    q = F.normalize(F.normalize(_fp32(y_tokens), dim=-1, eps=NORM_EPS).mean(1), dim=-1, eps=NORM_EPS)
    diff = p @ p.T - q @ q.T
    B = p.shape[0]
    keep = _gram_mask(B, upper_only, mask_diag, p.device)
    kept = (B * (B + 1) // 2 if upper_only else B * B) - (B if mask_diag else 0)  # no host sync
    if kept == 0:
        return diff.sum() * 0.0  # keeps the graph (zero gradient) and the dtype
    return (diff.square() * keep).sum() / kept


class _TokenGramDistance(torch.autograd.Function):
    """sum_b |U_b U_b^T - V_b V_b^T|_F^2 for unit tokens U, V [B, N, D], over row blocks of ``chunk`` tokens.

    With E_b = U_b U_b^T - V_b V_b^T (symmetric): d/dU_b = 4 E_b U_b and d/dV_b = -4 E_b V_b. Forward and
    backward build E one [B, chunk, N] block at a time and keep none of it: only U and V are saved.
    """

    @staticmethod
    def forward(ctx, u: torch.Tensor, v: torch.Tensor, chunk: int) -> torch.Tensor:
        ctx.save_for_backward(u, v)
        ctx.chunk = chunk
        total = u.new_zeros(())
        for start in range(0, u.shape[1], chunk):
            rows = slice(start, start + chunk)
            total = total + (u[:, rows] @ u.mT - v[:, rows] @ v.mT).square().sum()
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        u, v = ctx.saved_tensors
        du = torch.empty_like(u) if ctx.needs_input_grad[0] else None
        dv = torch.empty_like(v) if ctx.needs_input_grad[1] else None
        for start in range(0, u.shape[1], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            e = (u[:, rows] @ u.mT - v[:, rows] @ v.mT) * (4.0 * grad)  # [B, chunk, N]
            if du is not None:
                du[:, rows] = e @ u
            if dv is not None:
                dv[:, rows] = -(e @ v)
        return du, dv, None


def token_gram_loss(x_tokens: torch.Tensor, y_tokens: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """The token form of the manifold loss: per sample, the token-token Gram matrices of the unit tokens,
    compared entry by entry, averaged over the batch and all N x N entries ([B, N, D] each):

        U_b = normalize(x_b) per token,  V_b likewise from y
        L   = mean_{b,i,j} ((U_b U_b^T)_ij - (V_b V_b^T)_ij)^2

    As SimpleTuner's U-REPA (bghira/SimpleTuner, simpletuner/helpers/training/crepa.py,
    ``UrepaRegularizer._compute_manifold_loss``: F.normalize'd tokens, ``bmm`` Grams, ``(diff ** 2).mean()``;
    it interpolates the two token grids to one size first, here they must already match). No [B, N, N]
    tensor is ever whole in memory, forward or backward: the Grams are built ``chunk`` rows at a time.
    Returns an fp32 scalar (float64 for float64 input).
    """
    if x_tokens.shape != y_tokens.shape or x_tokens.ndim != 3:
        raise ValueError(f"token_gram_loss: x and y must both be [B,N,D], got {list(x_tokens.shape)} "
                         f"and {list(y_tokens.shape)}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"token_gram_loss: chunk must be a positive int (tokens per block), got {chunk!r}")
    u = F.normalize(_fp32(x_tokens), dim=-1, eps=NORM_EPS)
    v = F.normalize(_fp32(y_tokens), dim=-1, eps=NORM_EPS)
    B, N, _ = u.shape
    return _TokenGramDistance.apply(u, v.to(u.dtype), chunk) / (B * N * N)


def alignment_losses(x: torch.Tensor, y: torch.Tensor, upper_only: bool = False, mask_diag: bool = False,
                     kernels: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """(L_token, L_manifold) for one layer, by the reference or the fused kernel (``kernels`` switch)."""
    if x.shape != y.shape:
        raise ValueError(f"alignment loss: predicted tokens {list(x.shape)} and DINO tokens {list(y.shape)} differ")
    if use_triton(kernels, x.device) and not y.requires_grad:
        from repa_fast.kernels.align_loss import align_loss

        return align_loss(x, y, upper_only, mask_diag)
    return token_loss(x, y), manifold_gram_loss(x, y, upper_only, mask_diag)


# --- noise paths -------------------------------------------------------------------------------------

DDPM_STEPS = 1000


def sd15_alphas_cumprod(device=None) -> torch.Tensor:
    """SD-1.5's scaled-linear schedule (beta 0.00085 -> 0.012 over 1000 steps), fp64."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, DDPM_STEPS, dtype=torch.float64, device=device) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class SD15Loss:
    """Denoising loss on one of three noise paths plus the alignment loss over the align layers.

    path_type:
      linear  x_t = (1-t) x0 + t eps            (REPA's interpolant; t in (0,1), U-Net timestep 999 t)
      cosine  x_t = cos(pi t/2) x0 + sin(pi t/2) eps
      ddpm    x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps   (integer t in [0, 999], SD-1.5's schedule)
    prediction:
      v        linear/cosine: d x_t / dt (linear: eps - x0); ddpm: sqrt(abar) eps - sqrt(1-abar) x0
      epsilon  eps
    weighting: ``uniform`` t ~ U(0,1); ``lognormal`` sigma = exp(N(0,1)) mapped to t as in REPA
      (linear: sigma/(1+sigma); cosine: 2/pi atan(sigma); ddpm: floor(1000 sigma/(1+sigma))).
    """

    def __init__(self, prediction: str = "v", path_type: str = "linear", weighting: str = "uniform",
                 align_coeff: float = 0.8, manifold_coeff: float = 3.0, manifold_upper_only: bool = False,
                 manifold_mask_diag: bool = False, kernels: str = "torch"):
        for name, value, choices in (("prediction", prediction, ("v", "epsilon")),
                                     ("path_type", path_type, ("linear", "cosine", "ddpm")),
                                     ("weighting", weighting, ("uniform", "lognormal"))):
            if value not in choices:
                raise ValueError(f"SD15Loss: option {name!r} = {value!r} is not one of {list(choices)}")
        self.prediction, self.path_type, self.weighting = prediction, path_type, weighting
        self.align_coeff, self.manifold_coeff = align_coeff, manifold_coeff
        self.upper_only, self.mask_diag = manifold_upper_only, manifold_mask_diag
        self.kernels = kernels

    @classmethod
    def from_config(cls, config) -> SD15Loss:
        return cls(config.prediction, config.path_type, config.weighting, config.align_coeff,
                   config.manifold_coeff, config.manifold_upper_only, config.manifold_mask_diag, config.kernels)

    def sample_time(self, batch: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """t in (0, 1) for linear/cosine, integer t in [0, 999] for ddpm; shape [batch]."""
        if self.weighting == "uniform":
            u = torch.rand(batch, generator=generator, dtype=torch.float64, device=device)
        else:
            sigma = torch.randn(batch, generator=generator, dtype=torch.float64, device=device).exp()
            u = 2 / math.pi * torch.atan(sigma) if self.path_type == "cosine" else sigma / (1 + sigma)
        if self.path_type == "ddpm":
            return (u * DDPM_STEPS).long().clamp_(0, DDPM_STEPS - 1)
        return u.clamp(1e-5, 1 - 1e-5).float()

    def interpolate(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        """(x_t, target, unet_timestep) for clean latents x0, noise and times t (see the class doc)."""
        shape = (-1,) + (1,) * (x0.ndim - 1)
        if self.path_type == "ddpm":
            abar = sd15_alphas_cumprod(x0.device)[t.long()]
            alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
            d_alpha, d_sigma = -sigma, alpha  # v = alpha eps - sigma x0 (diffusers' v_prediction)
            timestep = t.long()
        else:
            t64 = t.double()
            if self.path_type == "linear":
                alpha, sigma = 1 - t64, t64
                d_alpha, d_sigma = -torch.ones_like(t64), torch.ones_like(t64)
            else:
                half_pi = math.pi / 2
                alpha, sigma = torch.cos(half_pi * t64), torch.sin(half_pi * t64)
                d_alpha, d_sigma = -half_pi * torch.sin(half_pi * t64), half_pi * torch.cos(half_pi * t64)
            timestep = 999.0 * t64
        alpha, sigma, d_alpha, d_sigma = (c.float().view(shape) for c in (alpha, sigma, d_alpha, d_sigma))
        x0, noise = x0.float(), noise.float()
        x_t = alpha * x0 + sigma * noise
        target = noise if self.prediction == "epsilon" else d_alpha * x0 + d_sigma * noise
        return x_t, target, timestep.to(x0.dtype) if timestep.is_floating_point() else timestep

    def __call__(self, unet, clean_latents: torch.Tensor, dino_tokens: dict[str, torch.Tensor],
                 encoder_hidden_states: torch.Tensor, timesteps: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The loss dict of one step. ``timesteps`` are path times (floats in (0,1), or integers for ddpm)."""
        B = clean_latents.shape[0]
        if timesteps is None:
            timesteps = self.sample_time(B, clean_latents.device, generator)
        if noise is None:
            noise = torch.randn(clean_latents.shape, generator=generator, device=clean_latents.device,
                                dtype=torch.float32)
        x_t, target, unet_t = self.interpolate(clean_latents, noise, timesteps)
        dtype = encoder_hidden_states.dtype
        output = unet(x_t.to(dtype), unet_t, encoder_hidden_states)
        loss_diff = F.mse_loss(output.float(), target)

        tokens = unet.get_aligned_tokens()
        missing = [name for name in tokens if name not in dino_tokens]
        if missing:
            raise KeyError(f"SD15Loss: no DINO tokens for align layer(s) {missing} (batch has {list(dino_tokens)})")
        token_terms, manifold_terms = [], []
        for name, pred in tokens.items():
            lt, lm = alignment_losses(pred, dino_tokens[name], self.upper_only, self.mask_diag, self.kernels)
            token_terms.append(lt)
            manifold_terms.append(lm)
        loss_token = torch.stack(token_terms).mean()
        loss_manifold = torch.stack(manifold_terms).mean()
        loss_align = loss_token + self.manifold_coeff * loss_manifold
        return {
            "loss": loss_diff + self.align_coeff * loss_align,
            "loss_diff": loss_diff,
            "loss_token": loss_token,
            "loss_manifold": loss_manifold,
            "loss_align": loss_align,
        }
