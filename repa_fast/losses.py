"""The reference losses: denoising (three noise paths) + token cosine + batch Gram ("manifold"), and the
noise schedule of the model (``noise_schedule``: diffusers' DDPMScheduler from the model's own config).

This file is the definition the Triton kernels are tested against. Everything is computed in fp32
(or in float64 when given float64).

    L_token    = mean_{b,n} (1 - <x_bn/|x_bn|, y_bn/|y_bn|>)          (zero rows: cosine 0)
    p_b        = normalize(mean_n normalize(x_bn)),  q_b likewise from y
    L_manifold = mean over kept (b, c) of (p_b.p_c - q_b.q_c)^2      (upper_only: b <= c; mask_diag: b != c)
                 or, in its token form (token_gram_loss), mean_{b,i,j} (u_bi.u_bj - v_bi.v_bj)^2
    loss       = L_diff + lambda(step) * (L_token + manifold_coeff * L_manifold)
    lambda     = align_coeff * warm-up * schedule (``align_lambda``)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from repa_fast.config import ConfigError, use_triton

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


MANIFOLD_FORMS = ("sample", "token")


class AlignmentLoss:
    """(L_token, L_manifold) of one layer's predicted tokens against its DINO tokens: the reference math
    above or the fused kernels (the ``kernels`` switch). ``form``: the manifold loss's ``sample`` form
    (``manifold_gram_loss``, the batch [B, B] Gram; ``upper_only`` / ``mask_diag`` apply) or its ``token``
    form (``token_gram_loss``, SimpleTuner's per-sample [N, N] token Gram; the masks do not apply).

    ``fuses_with(head, feat)`` says whether a head can score its targets itself in the fused REPA branch
    (the source design's head on the triton path, sample-form manifold loss): then the [B, N, D] tokens
    are never written; ``fused`` runs it through the head's ``__call__`` (so ZeRO-3 gathers its weights).
    """

    def __init__(self, upper_only: bool = False, mask_diag: bool = False, kernels: str = "torch",
                 form: str = "sample"):
        if form not in MANIFOLD_FORMS:
            raise ValueError(f"alignment loss: manifold_form {form!r} is not one of {list(MANIFOLD_FORMS)}")
        self.upper_only, self.mask_diag, self.kernels, self.form = upper_only, mask_diag, kernels, form

    @classmethod
    def from_config(cls, config) -> AlignmentLoss:
        return cls(config.manifold_upper_only, config.manifold_mask_diag, config.kernels, config.manifold_form)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape != y.shape:
            raise ValueError(f"alignment loss: predicted tokens {list(x.shape)} and DINO tokens {list(y.shape)} "
                             f"differ")
        fused = use_triton(self.kernels, x.device) and not y.requires_grad
        if self.form == "token":
            if fused:
                from repa_fast.kernels.token_gram import token_gram_loss as fused_token_gram_loss

                return token_loss(x, y), fused_token_gram_loss(x, y)
            return token_loss(x, y), token_gram_loss(x, y)
        if fused:
            from repa_fast.kernels.align_loss import align_loss

            return align_loss(x, y, self.upper_only, self.mask_diag)
        return token_loss(x, y), manifold_gram_loss(x, y, self.upper_only, self.mask_diag)

    def fuses_with(self, head, feat: torch.Tensor) -> bool:
        return self.form == "sample" and getattr(head, "fused_branch", False) and use_triton(self.kernels, feat.device)

    def fused(self, head, feat: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return head(feat, target=y, upper_only=self.upper_only, mask_diag=self.mask_diag)


def alignment_losses(x: torch.Tensor, y: torch.Tensor, upper_only: bool = False, mask_diag: bool = False,
                     kernels: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """(L_token, L_manifold) for one layer, by the reference or the fused kernel (``kernels`` switch)."""
    return AlignmentLoss(upper_only, mask_diag, kernels)(x, y)


# --- noise paths -------------------------------------------------------------------------------------

# SD-1.5's published scheduler config (scheduler/scheduler_config.json of the v1-5 release): the
# schedule of the `sd15` and `tiny` models, which have no folder to read one from.
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", steps_offset=1, clip_sample=False, set_alpha_to_one=False)


def sd15_noise_schedule() -> DDPMScheduler:
    """SD-1.5's schedule (the keys DDPMScheduler has no use for, e.g. set_alpha_to_one, are ignored)."""
    return DDPMScheduler.from_config(SD15_SCHEDULER)


# config `prediction` -> diffusers' prediction_type
PREDICTION_TYPES = {"v": "v_prediction", "epsilon": "epsilon"}


def scheduler_config_path(model: str) -> Path:
    """The scheduler config of a local diffusers folder: ``scheduler/scheduler_config.json`` (beside
    ``unet/``), the folder's own ``scheduler_config.json``, or, for a bare U-Net folder, its sibling
    ``../scheduler/``. A folder with none of them is an error: a guessed schedule trains the wrong noise."""
    root = Path(model)
    if not root.is_dir():
        raise FileNotFoundError(f"option 'model': {model!r} is neither 'sd15', 'tiny' nor a local folder")
    candidates = [root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json"]
    if (root / "config.json").is_file() and not (root / "unet").is_dir():
        candidates.append(root.parent / "scheduler" / "scheduler_config.json")
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"option 'model': {model!r} has no scheduler config (looked at "
                            f"{', '.join(str(c) for c in candidates)}); copy the model's scheduler_config.json "
                            f"there (SD-1.5's: scaled_linear betas 0.00085 -> 0.012, 1000 steps, epsilon)")


def noise_schedule(config) -> DDPMScheduler:
    """The noise schedule of ``config.model`` as a diffusers DDPMScheduler: SD-1.5's for ``sd15``/``tiny``,
    else the local folder's scheduler config (betas, beta_schedule, num_train_timesteps, prediction_type,
    steps_offset, rescale_betas_zero_snr ...; the keys of other scheduler classes are ignored)."""
    if config.model in ("sd15", "tiny"):
        return sd15_noise_schedule()
    path = scheduler_config_path(config.model)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a JSON object of scheduler settings")
    try:
        return DDPMScheduler.from_config(values)
    except (NotImplementedError, ValueError, TypeError) as err:
        raise ConfigError(f"{path}: diffusers' DDPMScheduler cannot use this schedule: {err}") from None


def prediction_type_warning(config, scheduler: DDPMScheduler, model: nn.Module) -> str | None:
    """The one start-up warning when ``config.prediction`` is not the pretrained model's own type.

    ``model`` is the built model (SD15UNetAligned or its U-Net): the message names the modules the
    LoRA wraps and the blocks that stay frozen. Random-init models (``sd15``, ``tiny``) have no
    trained parameterisation to contradict: None.
    """
    own = scheduler.config.prediction_type
    trained = PREDICTION_TYPES[config.prediction]
    if config.model in ("sd15", "tiny") or own == trained:
        return None
    head = (f"prediction={config.prediction!r} trains {trained} but {config.model} was trained for {own!r} "
            f"(its scheduler config). ")
    if not config.use_lora:
        return head + ("use_lora=false fine-tunes every block, but re-learning the output parameterisation "
                       f"takes a long run; set prediction={_config_prediction(own)} to keep the model's own.")
    unet = getattr(model, "unet", model)
    wrapped = sorted({n.split(".lora_A.")[0] for n, _ in unet.named_parameters() if ".lora_A." in n})
    by_block: dict[str, int] = {}
    for name in wrapped:
        block = _block_of(name)
        by_block[block] = by_block.get(block, 0) + 1
    frozen = [block for block, params in _blocks(unet) if not any(p.requires_grad for p in params)]
    return head + (f"The LoRA (lora_targets={config.lora_targets!r}, rank {config.lora_rank}) adapts only "
                   f"{len(wrapped)} modules: " + ", ".join(f"{b} ({n})" for b, n in by_block.items())
                   + f"; frozen: {', '.join(frozen)}. It cannot retrain the whole U-Net's output "
                   f"parameterisation: set prediction={_config_prediction(own)} (the model's own), or "
                   f"use_lora=false to fine-tune every block.")


def _config_prediction(prediction_type: str) -> str:
    names = {v: k for k, v in PREDICTION_TYPES.items()}
    return names.get(prediction_type, f"<none: {prediction_type!r} is not trainable here>")


def _block_of(module_name: str) -> str:
    """``up_blocks.0.attentions.0...to_q`` -> ``up_blocks.0``; ``mid_block.resnets.1.conv1`` -> ``mid_block``."""
    parts = module_name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]


def _blocks(unet: nn.Module):
    """(name, parameters) of the U-Net's top-level blocks, down_blocks/up_blocks one entry per index."""
    for name, child in unet.named_children():
        if isinstance(child, nn.ModuleList):
            for i, sub in enumerate(child):
                yield f"{name}.{i}", list(sub.parameters())
        elif any(True for _ in child.parameters()):
            yield name, list(child.parameters())


ALIGN_SCHEDULES = ("constant", "cosine", "stop")


def align_lambda(step: int, align_coeff: float, warmup_steps: int = 0, schedule: str = "constant",
                 stop_step: int | None = None, max_steps: int | None = None) -> float:
    """The alignment weight at ``step`` (1-based), a pure function of the step (so resume reproduces it).

    lambda = align_coeff * min(1, step / warmup_steps) * decay, where decay is
      constant  1
      cosine    0.5 (1 + cos(pi (step - warmup) / (end - warmup))), end = stop_step or max_steps: 0 at end
      stop      1 up to stop_step, 0 after (alignment off late in long runs)
    and lambda = 0 after ``stop_step`` whatever the schedule.
    """
    if schedule not in ALIGN_SCHEDULES:
        raise ValueError(f"align_schedule {schedule!r} is not one of {list(ALIGN_SCHEDULES)}")
    if stop_step is not None and step > stop_step:
        return 0.0
    lam = align_coeff * (min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0)
    if schedule == "cosine":
        end = stop_step if stop_step is not None else max_steps
        if end is None:
            raise ValueError("align_schedule 'cosine' needs align_stop_step or max_steps")
        progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, end - warmup_steps)))
        lam *= 0.5 * (1.0 + math.cos(math.pi * progress))
    return lam


class SD15Loss:
    """Denoising loss on one of three noise paths plus the weighted alignment loss, from ONE forward.

    path_type:
      ddpm    x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps   (integer t in [0, T-1]): the model's own schedule,
              through diffusers' DDPMScheduler (add_noise, get_velocity); use it for a pretrained SD-1.5
      linear  x_t = (1-t) x0 + t eps            (REPA's interpolant; t in (0,1), U-Net timestep (T-1) t)
      cosine  x_t = cos(pi t/2) x0 + sin(pi t/2) eps
      linear and cosine are REPA's flow-matching paths, for from-scratch runs: a pretrained SD-1.5 fed
      them sees noise levels it does not expect at the given timestep.
    prediction:
      v        linear/cosine: d x_t / dt (linear: eps - x0); ddpm: sqrt(abar) eps - sqrt(1-abar) x0
      epsilon  eps
    weighting: ``uniform`` t ~ U(0,1); ``lognormal`` sigma = exp(N(0,1)) mapped to t as in REPA
      (linear: sigma/(1+sigma); cosine: 2/pi atan(sigma); ddpm: floor(T sigma/(1+sigma))).
    T is the scheduler's num_train_timesteps (1000 for SD-1.5); ``scheduler`` defaults to SD-1.5's
    (see ``noise_schedule``).

    loss = mse(pred, target) + lambda(step) * (L_token + manifold_coeff * L_manifold), L_* averaged over
    the align layers and computed inside the model's forward (see ``SD15UNetAligned``); lambda from
    ``align_lambda``. While lambda is 0 the heads do not run.
    """

    def __init__(self, prediction: str = "v", path_type: str = "linear", weighting: str = "uniform",
                 align_coeff: float = 0.8, manifold_coeff: float = 3.0, align_warmup_steps: int = 0,
                 align_schedule: str = "constant", align_stop_step: int | None = None,
                 max_steps: int | None = None, scheduler: DDPMScheduler | None = None):
        for name, value, choices in (("prediction", prediction, ("v", "epsilon")),
                                     ("path_type", path_type, ("linear", "cosine", "ddpm")),
                                     ("weighting", weighting, ("uniform", "lognormal")),
                                     ("align_schedule", align_schedule, ALIGN_SCHEDULES)):
            if value not in choices:
                raise ValueError(f"SD15Loss: option {name!r} = {value!r} is not one of {list(choices)}")
        self.prediction, self.path_type, self.weighting = prediction, path_type, weighting
        self.align_coeff, self.manifold_coeff = align_coeff, manifold_coeff
        self.align_warmup_steps, self.align_schedule = align_warmup_steps, align_schedule
        self.align_stop_step, self.max_steps = align_stop_step, max_steps
        self.scheduler = sd15_noise_schedule() if scheduler is None else scheduler
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)

    @classmethod
    def from_config(cls, config, scheduler: DDPMScheduler | None = None) -> SD15Loss:
        """The loss of a run; ``scheduler`` defaults to ``noise_schedule(config)`` (the model's own)."""
        scheduler = noise_schedule(config) if scheduler is None else scheduler
        return cls(config.prediction, config.path_type, config.weighting, config.align_coeff,
                   config.manifold_coeff, config.align_warmup_steps, config.align_schedule,
                   config.align_stop_step, config.max_steps, scheduler=scheduler)

    def align_weight(self, step: int | None) -> float:
        """lambda at ``step``; ``None`` (outside a run): ``align_coeff``."""
        if step is None:
            return self.align_coeff
        return align_lambda(step, self.align_coeff, self.align_warmup_steps, self.align_schedule,
                            self.align_stop_step, self.max_steps)

    def sample_time(self, batch: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """t in (0, 1) for linear/cosine, integer t in [0, T-1] for ddpm; shape [batch]."""
        if self.weighting == "uniform":
            u = torch.rand(batch, generator=generator, dtype=torch.float64, device=device)
        else:
            sigma = torch.randn(batch, generator=generator, dtype=torch.float64, device=device).exp()
            u = 2 / math.pi * torch.atan(sigma) if self.path_type == "cosine" else sigma / (1 + sigma)
        if self.path_type == "ddpm":
            T = self.num_train_timesteps
            return (u * T).long().clamp_(0, T - 1)
        return u.clamp(1e-5, 1 - 1e-5).float()

    def interpolate(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        """(x_t, target, unet_timestep) for clean latents x0, noise and times t (see the class doc).

        x_t and target are at least fp32 (float64 stays float64)."""
        x0 = _fp32(x0)
        noise = noise.to(x0.dtype)
        if self.path_type == "ddpm":
            t = t.long()
            x_t = self.scheduler.add_noise(x0, noise, t)
            target = noise if self.prediction == "epsilon" else self.scheduler.get_velocity(x0, noise, t)
            return x_t, target, t
        shape = (-1,) + (1,) * (x0.ndim - 1)
        t64 = t.double()
        if self.path_type == "linear":
            alpha, sigma = 1 - t64, t64
            d_alpha, d_sigma = -torch.ones_like(t64), torch.ones_like(t64)
        else:
            half_pi = math.pi / 2
            alpha, sigma = torch.cos(half_pi * t64), torch.sin(half_pi * t64)
            d_alpha, d_sigma = -half_pi * torch.sin(half_pi * t64), half_pi * torch.cos(half_pi * t64)
        alpha, sigma, d_alpha, d_sigma = (c.to(x0.dtype).view(shape) for c in (alpha, sigma, d_alpha, d_sigma))
        x_t = alpha * x0 + sigma * noise
        target = noise if self.prediction == "epsilon" else d_alpha * x0 + d_sigma * noise
        return x_t, target, ((self.num_train_timesteps - 1) * t64).to(x0.dtype)

    def __call__(self, model, clean_latents: torch.Tensor, dino_tokens: dict[str, torch.Tensor],
                 encoder_hidden_states: torch.Tensor, step: int | None = None, timesteps: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor | float]:
        """The loss dict of one step (tensors, plus ``lambda`` as a float). ``timesteps`` are path times
        (floats in (0,1), or integers for ddpm); ``step`` (1-based) sets lambda."""
        B = clean_latents.shape[0]
        if timesteps is None:
            timesteps = self.sample_time(B, clean_latents.device, generator)
        if noise is None:
            noise = torch.randn(clean_latents.shape, generator=generator, device=clean_latents.device,
                                dtype=torch.float32)
        x_t, target, unet_t = self.interpolate(clean_latents, noise, timesteps)
        x_t = x_t.to(encoder_hidden_states.dtype)
        lam = self.align_weight(step)
        if lam > 0:  # one forward: prediction + the alignment losses of every align layer
            out = model(x_t, unet_t, encoder_hidden_states, target_tokens=dino_tokens)
            loss_token, loss_manifold = out.loss_token, out.loss_manifold
        else:  # alignment off: the U-Net alone
            out = model(x_t, unet_t, encoder_hidden_states, return_dict=True, keep_features=False)
            loss_token = loss_manifold = out.sample.new_zeros((), dtype=torch.float32)
        loss_diff = F.mse_loss(out.sample.float(), target)
        loss_align = loss_token + self.manifold_coeff * loss_manifold
        return {
            "loss": loss_diff + lam * loss_align,
            "loss_diff": loss_diff,
            "loss_token": loss_token,
            "loss_manifold": loss_manifold,
            "loss_align": loss_align,
            "lambda": lam,
        }
