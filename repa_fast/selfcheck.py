"""Start-up self-checks: every fast part a run selected proves itself against its torch twin first.

    kernels  (triton, or auto on CUDA)  the fused AlignHead, alignment loss and fused REPA branch, each on
             small inputs of the run's real layout (the model's channels, feature-map size, D and N) in the
             run's dtype, forward and backward, against the float64 reference
    loader   (dali, or auto)            the DALI loader's first batch equals the torch loader's
    compile  (inductor, deepcompile)    the compiled forward's losses equal eager's on one batch

Tolerance (kernels): a fused result passes when its relative norm error against float64 is at most twice
the eager twin's in the same dtype plus ``ERROR_FLOOR[dtype]`` (the rule of the bf16 GPU tests).
Compile: each loss term within ``COMPILE_RTOL[dtype]`` of eager's (relative).

On a failure ``auto`` falls back to the twin with one warning that names the part and the error; an
explicit ``triton`` / ``dali`` / ``inductor`` stops the run with ``SelfCheckError``. The outcome is logged
and written to ``<output_dir>/selfcheck.json``.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path

import torch

from repa_fast.config import Config, ConfigError, use_triton
from repa_fast.models.align_head import AlignHead

logger = logging.getLogger("repa_fast.selfcheck")

ERROR_FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}
COMPILE_RTOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 2e-2}
CHECK_BATCH = 2  # samples in the kernel checks (an odd-free, tiny batch of the real layout)


class SelfCheckError(ConfigError):
    """A fast part the config asks for explicitly disagrees with its torch twin on this machine."""


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """|actual - expected| / |expected| in float64 (norms over all elements); 0 when both are zero. The one
    relative error of the project: the self-checks, the kernel tests (tests/kernel_testing.py) and the
    benchmarks' agreement columns use it."""
    a, e = actual.detach().double(), expected.detach().to(device=actual.device, dtype=torch.float64)
    diff, scale = (a - e).norm().item(), e.norm().item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def _compare(name: str, fused, eager, exact, dtype: torch.dtype) -> dict:
    """Errors of the fused and eager results (tuples of tensors) against the float64 ones; raises when a
    fused error is out of tolerance."""
    errors = {}
    for i, (f, e, x) in enumerate(zip(fused, eager, exact, strict=True)):
        err, eager_err = rel_err(f, x), rel_err(e, x)
        limit = 2 * eager_err + ERROR_FLOOR[dtype]
        errors[f"{name}[{i}]"] = {"error": err, "eager_error": eager_err, "limit": limit}
        if not err <= limit:  # NaN fails too
            raise AssertionError(f"{name}: output {i} has relative error {err:.3e} against float64 "
                                 f"(eager {dtype}: {eager_err:.3e}; limit {limit:.3e})")
    return errors


def _run(fn, inputs: list[torch.Tensor], params: list[torch.Tensor], grad_seed: int = 0):
    """Outputs of ``fn(*inputs)`` and the gradients of a fixed random projection of them with respect to
    the inputs that require grad and ``params``."""
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    g = torch.Generator().manual_seed(grad_seed)
    upstream = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype) for o in outputs]
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad] + list(params)
    grads = torch.autograd.grad(outputs, leaves, upstream, allow_unused=True)
    return tuple(o.detach() for o in outputs) + tuple(g for g in grads if g is not None)


def _leaf(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(dtype).requires_grad_()


def _torch_twin(alignment_loss):
    """The same alignment loss on the reference path."""
    twin = copy.copy(alignment_loss)
    twin.kernels = "torch"
    return twin


def check_head(head, map_hw: tuple[int, int], device, dtype: torch.dtype, kernels: str, alignment_loss,
               seed: int = 0) -> dict:
    """The fused AlignHead (and, where the model would use it, the fused REPA branch) against float64."""
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(CHECK_BATCH, head.in_ch, *map_hw, generator=g).to(device)
    y = torch.randn(CHECK_BATCH, head.num_tokens, head.D, generator=g).to(device)
    heads = {}  # name -> (head copy, its dtype)
    for name, dt, k in (("fused", dtype, kernels), ("eager", dtype, "torch"), ("exact", torch.float64, "torch")):
        h = copy.deepcopy(head).to(device=device, dtype=dt)
        h.kernels = k
        heads[name] = h, dt
    results = {name: _run(h, [_leaf(feat, dt)], list(h.parameters())) for name, (h, dt) in heads.items()}
    errors = _compare("align_head", results["fused"], results["eager"], results["exact"], dtype)
    if alignment_loss.fuses_with(heads["fused"][0], feat):
        twin, branch = _torch_twin(alignment_loss), {}
        for name, (h, dt) in heads.items():
            target = y.to(torch.float64 if name == "exact" else torch.float16)
            if name == "fused":
                def fn(x, h=h, target=target):
                    return alignment_loss.fused(h, x, target)
            else:
                def fn(x, h=h, target=target):
                    return twin(h(x), target)
            branch[name] = _run(fn, [_leaf(feat, dt)], list(h.parameters()))
        errors |= _compare("align_branch", branch["fused"], branch["eager"], branch["exact"], dtype)
    return errors


def check_loss(alignment_loss, num_tokens: int, D: int, device, dtype: torch.dtype, seed: int = 1) -> dict:
    """The fused alignment loss on unit-ish tokens in the run's dtype (DINO tokens fp16, as cached)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(CHECK_BATCH + 1, num_tokens, D, generator=g).to(device)
    y = (x + torch.randn(x.shape, generator=g).to(device)).half()
    twin = _torch_twin(alignment_loss)
    results = {}
    for name, loss, dt, target in (("fused", alignment_loss, dtype, y), ("eager", twin, dtype, y),
                                   ("exact", twin, torch.float64, y.double())):
        results[name] = _run(lambda x, loss=loss, target=target: loss(x, target), [_leaf(x, dt)], [])
    return _compare("align_loss", results["fused"], results["eager"], results["exact"], dtype)


class SelfChecks:
    """Runs the checks the config selects, applies ``auto`` fall-backs, records the outcome."""

    def __init__(self, config: Config, out_dir: str | Path | None = None):
        self.config, self.out_dir = config, Path(out_dir) if out_dir is not None else None
        self.results: dict[str, dict] = {}

    def _failed(self, part: str, switch: str, fallback: str, err: BaseException) -> None:
        value = getattr(self.config, switch)
        message = f"self-check of {part} ({switch}={value}) failed: {type(err).__name__}: {err}"
        self.results[part] = {"selected": value, "ok": False, "error": message}
        if value != "auto":
            self.write()
            raise SelfCheckError(f"{message}; set {switch}=auto to fall back to {fallback}, or {switch}={fallback}")
        warnings.warn(f"{message}; falling back to {switch}={fallback}", RuntimeWarning, stacklevel=3)
        self.results[part]["used"] = fallback
        setattr(self.config, switch, fallback)

    def kernels(self, model, device, dtype: torch.dtype) -> None:
        """The fused ops the model would run, at its layout; on a failure with ``auto``, the model is put
        on the torch path."""
        kernels = self.config.kernels
        if not use_triton(kernels, torch.device(device)):
            self.results["kernels"] = {"selected": kernels, "used": "torch", "checked": False}
            return
        factor = 2 ** (len(model.unet.config.block_out_channels) - 1)
        size = model.unet.config.sample_size
        map_hw = (size // factor, size // factor)
        errors = {}
        try:
            for layer, head in model.align_heads.items():
                if isinstance(head, AlignHead):  # the source design's head: the one with fused kernels
                    errors |= {f"{layer}/{k}": v for k, v in
                               check_head(head, map_hw, device, dtype, kernels, model.alignment_loss).items()}
            errors |= check_loss(model.alignment_loss, model.align_heads[model.align_layers[0]].num_tokens,
                                 model.D, device, dtype)
        except Exception as err:  # a miscompile, a driver or Triton-version problem, a wrong result
            self._failed("kernels", "kernels", "torch", err)
            model.set_kernels("torch")
            return
        self.results["kernels"] = {"selected": kernels, "used": "triton", "ok": True, "dtype": str(dtype),
                                   "errors": errors}
        logger.info("self-check: fused kernels agree with torch in %s (%d outputs)", dtype, len(errors))

    def loader(self, dataset, rank: int, world: int, device, dtype: torch.dtype | None) -> None:
        """The DALI loader's first batch against the torch loader's (same rank slice, epoch 0)."""
        from repa_fast.data.loader import build_loader, dali_available

        value = self.config.loader
        if value == "torch":
            self.results["loader"] = {"selected": "torch", "used": "torch", "checked": False}
            return
        if value == "auto" and not dali_available():
            self.results["loader"] = {"selected": "auto", "used": "torch", "checked": False,
                                      "reason": "nvidia-dali is not installed"}
            self.config.loader = "torch"
            return
        try:
            batches = {}
            for kind in ("dali", "torch"):
                loader = build_loader(self.config, dataset, rank=rank, world=world, device=device, dtype=dtype,
                                      loader=kind)
                try:
                    batches[kind] = next(iter(loader))
                finally:
                    loader.close()
            _same_batch(batches["dali"], batches["torch"])
        except Exception as err:
            self._failed("loader", "loader", "torch", err)
            return
        self.results["loader"] = {"selected": value, "used": "dali", "ok": True}
        self.config.loader = "dali"
        logger.info("self-check: the DALI loader's first batch is the torch loader's")

    def compile(self, run, compile_fn) -> None:
        """The losses of one forward before and after ``compile_fn(run.engine)``, on the same batch and noise."""
        batch = {k: v for k, v in run.eval_batch.items()}
        n = min(run.config.batch_size, batch["latent"].shape[0])
        args = (batch["latent"][:n], {k: v[:n] for k, v in batch["dino_tokens"].items()},
                batch["encoder_hidden_states"][:n])

        def losses():
            from repa_fast.train import step_generator

            gen = step_generator(run.config.seed, run.rank, 0, run.device)
            out = run.criterion(run.engine, *args, step=None, generator=gen)
            return {k: float(v.detach()) for k, v in out.items() if isinstance(v, torch.Tensor)}

        eager = losses()
        compile_fn(run.engine)
        try:
            compiled = losses()
            rtol = COMPILE_RTOL[run.dtype]
            bad = {k: (compiled[k], v) for k, v in eager.items()
                   if not abs(compiled[k] - v) <= rtol * max(abs(v), 1e-6)}
            if bad:
                raise AssertionError("compiled vs eager: " + ", ".join(f"{k} {c:.6g} vs {e:.6g}"
                                                                        for k, (c, e) in bad.items()))
        except Exception as err:
            self._failed("compile", "compile", "none", err)
            return
        self.results["compile"] = {"selected": run.config.compile, "ok": True, "eager": eager, "compiled": compiled}
        logger.info("self-check: the compiled forward's losses equal eager's (rtol %g)", COMPILE_RTOL[run.dtype])

    def write(self) -> None:
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "selfcheck.json").write_text(json.dumps(self.results, indent=2))


def _same_batch(a: dict, b: dict) -> None:
    if list(a["id"]) != list(b["id"]):
        raise AssertionError(f"sample ids differ: {list(a['id'])[:4]}... vs {list(b['id'])[:4]}...")
    for key in ("latent", "class_id"):
        if not torch.equal(a[key].cpu(), b[key].cpu()):
            raise AssertionError(f"{key} differs for ids {list(a['id'])[:4]}...")
    for layer in b["dino_tokens"]:
        if not torch.equal(a["dino_tokens"][layer].cpu(), b["dino_tokens"][layer].cpu()):
            raise AssertionError(f"DINO tokens of layer {layer!r} differ")
