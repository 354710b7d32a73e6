import itertools
import json
import math

import numpy as np
import pytest
import torch

from repa_fast.config import Config, ConfigError
from repa_fast.losses import (
    SD15Loss,
    align_lambda,
    manifold_gram_loss,
    noise_schedule,
    prediction_type_warning,
    token_loss,
)
from repa_fast.models import SD15UNetAligned, build_aligned_unet, build_unet


def np_unit(v):
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, 1e-12)


def np_token_loss(x, y):
    B, N, _ = x.shape
    total = 0.0
    for b in range(B):
        for n in range(N):
            total += 1.0 - float(np_unit(x[b, n]) @ np_unit(y[b, n]))
    return total / (B * N)


def np_gram_loss(x, y, upper_only, mask_diag):
    p = np_unit(np_unit(x).mean(axis=1))
    q = np_unit(np_unit(y).mean(axis=1))
    B = x.shape[0]
    terms = []
    for b in range(B):
        for c in range(B):
            if (upper_only and c < b) or (mask_diag and b == c):
                continue
            terms.append((float(p[b] @ p[c]) - float(q[b] @ q[c])) ** 2)
    return sum(terms) / len(terms) if terms else 0.0


@pytest.mark.parametrize("upper_only,mask_diag", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("B", [1, 3, 6])
def test_losses_equal_float64_computation(B, upper_only, mask_diag):
    rng = np.random.default_rng(B)
    x = rng.standard_normal((B, 7, 12))
    y = rng.standard_normal((B, 7, 12)) + 0.3 * x
    x[0, 2] = 0.0  # a zero-norm token row: cosine 0, no NaN
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    lt = token_loss(xt, yt)
    lm = manifold_gram_loss(xt, yt, upper_only, mask_diag)
    assert lt.dtype == lm.dtype == torch.float64 and lm.ndim == 0
    assert token_loss(xt.half(), yt.half()).dtype == torch.float32
    assert math.isclose(lt.item(), np_token_loss(x, y), rel_tol=1e-12)
    assert math.isclose(lm.item(), np_gram_loss(x, y, upper_only, mask_diag), rel_tol=1e-10, abs_tol=1e-15)


def test_source_manifold_test_and_b1_is_zero_not_nan():
    loss = manifold_gram_loss(torch.randn(4, 256, 1024), torch.randn(4, 256, 1024))
    assert loss.ndim == 0 and loss.item() >= 0
    for mask_diag in (False, True):
        x = torch.randn(1, 5, 8, requires_grad=True)
        loss = manifold_gram_loss(x, torch.randn(1, 5, 8), mask_diag=mask_diag)
        loss.backward()
        # one sample: both Grams are [[1]] (up to fp32 rounding); masked, no entry is kept at all
        assert loss.item() == (0.0 if mask_diag else pytest.approx(0.0, abs=1e-12))
        assert torch.isfinite(x.grad).all()


def test_zero_rows_give_finite_gradients():
    x = torch.zeros(2, 3, 4, requires_grad=True)
    y = torch.randn(2, 3, 4)
    (token_loss(x, y) + manifold_gram_loss(x, y)).backward()
    assert torch.isfinite(x.grad).all()


def test_identical_tokens_give_zero_alignment_loss():
    x = torch.randn(4, 9, 16)
    assert token_loss(x, 2 * x).item() == pytest.approx(0.0, abs=1e-6)
    assert manifold_gram_loss(x, x * 3).item() == pytest.approx(0.0, abs=1e-10)


def setup_path(path_type, prediction, B=5):
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 4, 8, 8, generator=g)
    loss = SD15Loss(prediction=prediction, path_type=path_type)
    t = loss.sample_time(B, generator=g)
    return loss, x0, eps, t


@pytest.mark.parametrize("prediction", ["v", "epsilon"])
def test_linear_path(prediction):
    loss, x0, eps, t = setup_path("linear", prediction)
    assert t.dtype == torch.float32 and ((t > 0) & (t < 1)).all()
    x_t, target, unet_t = loss.interpolate(x0, eps, t)
    tt = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - tt) * x0 + tt * eps)
    torch.testing.assert_close(target, eps - x0 if prediction == "v" else eps)
    torch.testing.assert_close(unet_t, 999 * t)


@pytest.mark.parametrize("prediction", ["v", "epsilon"])
def test_cosine_path_v_is_the_time_derivative(prediction):
    loss, x0, eps, t = setup_path("cosine", prediction)
    x_t, target, _ = loss.interpolate(x0, eps, t)
    tt = t.double().view(-1, 1, 1, 1)
    expected = torch.cos(math.pi / 2 * tt) * x0.double() + torch.sin(math.pi / 2 * tt) * eps.double()
    torch.testing.assert_close(x_t, expected.float())
    if prediction == "v":
        h = 1e-6

        def path(s):
            return torch.cos(math.pi / 2 * s) * x0.double() + torch.sin(math.pi / 2 * s) * eps.double()

        derivative = (path(tt + h) - path(tt - h)) / (2 * h)
        torch.testing.assert_close(target, derivative.float(), atol=1e-4, rtol=1e-4)
    else:
        torch.testing.assert_close(target, eps)


def abar64(betas: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.cumprod(1.0 - betas))


SD15_BETAS = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2  # scaled_linear, as published


def check_ddpm_formula(loss, x0, eps, t, abar, prediction):
    """x_t and the target against sqrt(abar) x0 + sqrt(1-abar) eps (and v) computed in float64."""
    x_t, target, unet_t = loss.interpolate(x0, eps, t)
    a = abar[t].view(-1, 1, 1, 1)
    x0, eps = x0.double(), eps.double()
    torch.testing.assert_close(x_t.double(), a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-5, rtol=1e-5)
    expected = a.sqrt() * eps - (1 - a).sqrt() * x0 if prediction == "v" else eps
    torch.testing.assert_close(target.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(unet_t, t)


@pytest.mark.parametrize("prediction", ["v", "epsilon"])
def test_ddpm_path_is_diffusers_scheduler_and_the_float64_formula(prediction):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000)
    loss, x0, eps, t = setup_path("ddpm", prediction)
    assert loss.scheduler.config.prediction_type == "epsilon"  # SD-1.5's own (sd15, tiny)
    torch.testing.assert_close(loss.scheduler.alphas_cumprod.double(), abar64(SD15_BETAS), atol=0, rtol=1e-6)
    assert t.dtype == torch.int64 and ((t >= 0) & (t <= 999)).all()
    x_t, target, unet_t = loss.interpolate(x0, eps, t)
    torch.testing.assert_close(x_t, sched.add_noise(x0, eps, t))
    torch.testing.assert_close(target, sched.get_velocity(x0, eps, t) if prediction == "v" else eps)
    check_ddpm_formula(loss, x0, eps, t, abar64(SD15_BETAS), prediction)
    # float64 latents stay float64 through diffusers' add_noise
    x_t64, _, _ = loss.interpolate(x0.double(), eps.double(), t)
    assert x_t64.dtype == torch.float64


# a schedule unlike SD-1.5's in every key the loss reads: linear betas, 500 steps, v-prediction
OTHER_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                   "num_train_timesteps": 500, "prediction_type": "v_prediction", "steps_offset": 1,
                   "skip_prk_steps": True, "set_alpha_to_one": False}
OTHER_BETAS = np.linspace(0.0001, 0.02, 500)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A local diffusers folder: a tiny U-Net in unet/ and OTHER_SCHEDULER in scheduler/."""
    root = tmp_path_factory.mktemp("model") / "sd"
    torch.manual_seed(0)
    build_unet("tiny").save_pretrained(root / "unet")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(OTHER_SCHEDULER))
    return root


@pytest.mark.parametrize("prediction", ["v", "epsilon"])
def test_local_folder_schedule_is_honoured(model_folder, prediction):
    config = Config(model=str(model_folder), path_type="ddpm", prediction=prediction)
    sched = noise_schedule(config)
    assert sched.config.num_train_timesteps == 500 and sched.config.prediction_type == "v_prediction"
    loss = SD15Loss.from_config(config)
    torch.testing.assert_close(loss.scheduler.alphas_cumprod.double(), abar64(OTHER_BETAS), atol=0, rtol=1e-6)
    g = torch.Generator().manual_seed(0)
    t = loss.sample_time(4000, generator=g)  # timesteps over the model's 500, not 1000
    assert t.min() == 0 and t.max() == 499
    loss.weighting = "lognormal"
    t = loss.sample_time(4000, generator=g)
    assert t.min() >= 0 and t.max() <= 499 and abs(t.float().median().item() - 250) < 15
    loss.weighting = "uniform"
    x0, eps = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    check_ddpm_formula(loss, x0, eps, torch.tensor([0, 1, 100, 250, 498, 499]), abar64(OTHER_BETAS), prediction)
    # the flow-matching paths map t in (0, 1) onto the model's timesteps too
    linear = SD15Loss.from_config(Config(model=str(model_folder), path_type="linear"))
    t = torch.tensor([0.25, 0.5])
    torch.testing.assert_close(linear.interpolate(x0[:2], eps[:2], t)[2], 499 * t)


def test_scheduler_config_locations_and_errors(model_folder, tmp_path):
    def steps(model):
        return noise_schedule(Config(model=str(model))).config.num_train_timesteps

    assert steps(model_folder) == 500  # scheduler/ beside unet/
    assert steps(model_folder / "unet") == 500  # a bare U-Net folder: its sibling scheduler/
    own = tmp_path / "own"
    own.mkdir()
    (own / "scheduler_config.json").write_text(json.dumps(dict(OTHER_SCHEDULER, num_train_timesteps=300)))
    assert steps(own) == 300  # the folder's own scheduler_config.json
    assert steps("tiny") == steps("sd15") == 1000
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    with pytest.raises(FileNotFoundError, match=r"'model'.*no scheduler config.*scheduler_config\.json"):
        steps(lonely)
    with pytest.raises(FileNotFoundError, match="'model'"):
        steps(tmp_path / "missing")
    (lonely / "scheduler_config.json").write_text("{beta_schedule: ")
    with pytest.raises(ConfigError, match=r"scheduler_config\.json: not valid JSON"):
        steps(lonely)
    (lonely / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "exponential"}))
    with pytest.raises(ConfigError, match=r"scheduler_config\.json: diffusers' DDPMScheduler cannot"):
        steps(lonely)


@pytest.mark.parametrize("targets", ["attn+conv", "attention-only"])
def test_prediction_warning_exactly_when_types_differ(model_folder, targets):
    for prediction, use_lora in itertools.product(["v", "epsilon"], [True, False]):
        config = Config(model=str(model_folder), prediction=prediction, lora_rank=4, lora_targets=targets,
                        use_lora=use_lora, path_type="ddpm", align_layers=["mid"], dino_D=64, dino_N=64)
        model = build_aligned_unet(config)
        message = prediction_type_warning(config, noise_schedule(config), model)
        if prediction == "v":  # the folder's model predicts v: nothing to warn about
            assert message is None
            continue
        assert "prediction='epsilon' trains epsilon" in message and "'v_prediction'" in message
        assert "set prediction=v" in message
        if not use_lora:
            assert "use_lora=false fine-tunes every block" in message
            continue
        # names what the LoRA wraps, block by block, and what stays frozen
        if targets == "attn+conv":
            assert "adapts only 25 modules" in message
            assert all(b in message for b in ("mid_block (", "down_blocks.3 (", "up_blocks.0 ("))
        else:  # only mid_block holds attention among the whitelisted prefixes
            assert "adapts only 8 modules: mid_block (8);" in message
        frozen = message.split("frozen: ")[1].split(". It cannot")[0]
        assert "conv_in" in frozen and "conv_out" in frozen and "down_blocks.0" in frozen
        assert "mid_block" not in frozen
    # random-init models (sd15, tiny) have no trained parameterisation: never a warning
    tiny = Config(model="tiny", prediction="v")
    assert prediction_type_warning(tiny, noise_schedule(tiny), build_unet("tiny")) is None


@pytest.mark.parametrize("path_type", ["linear", "cosine", "ddpm"])
def test_lognormal_times(path_type):
    loss = SD15Loss(path_type=path_type, weighting="lognormal")
    t = loss.sample_time(20000, generator=torch.Generator().manual_seed(0))
    if path_type == "ddpm":
        assert t.min() >= 0 and t.max() <= 999
        assert abs(t.float().median().item() - 500) < 25  # sigmoid of N(0,1) has median 1/2
    else:
        assert ((t > 0) & (t < 1)).all()
        assert abs(t.median().item() - 0.5) < 0.02


def test_bad_option_names_it():
    with pytest.raises(ValueError, match="path_type"):
        SD15Loss(path_type="edm")


def test_sd15_loss_dict_composes_the_terms():
    torch.manual_seed(0)
    model = SD15UNetAligned(build_unet("tiny"), ["mid", "dec_first"], D=64, num_tokens=16)
    B = 3
    x0, ehs = torch.randn(B, 4, 16, 16), torch.randn(B, 77, 32)
    dino = {"mid": torch.randn(B, 16, 64).half(), "dec_first": torch.randn(B, 16, 64).half()}
    noise, t = torch.randn(B, 4, 16, 16), torch.tensor([0.1, 0.5, 0.9])
    crit = SD15Loss(align_coeff=0.8, manifold_coeff=3.0)
    out = crit(model, x0, dino, ehs, timesteps=t, noise=noise)
    assert set(out) == {"loss", "loss_diff", "loss_token", "loss_manifold", "loss_align", "lambda"}
    assert out["lambda"] == 0.8 and not model.hook_manager.features  # one forward, nothing kept
    with torch.no_grad():
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        pred = model(x_t, 999 * t, ehs)
        tokens = model.get_aligned_tokens()
    torch.testing.assert_close(out["loss_diff"], ((pred - (noise - x0)) ** 2).mean())
    lt = (token_loss(tokens["mid"], dino["mid"]) + token_loss(tokens["dec_first"], dino["dec_first"])) / 2
    lm = (manifold_gram_loss(tokens["mid"], dino["mid"])
          + manifold_gram_loss(tokens["dec_first"], dino["dec_first"])) / 2
    torch.testing.assert_close(out["loss_token"], lt)
    torch.testing.assert_close(out["loss_manifold"], lm)
    torch.testing.assert_close(out["loss_align"], lt + 3.0 * lm)
    torch.testing.assert_close(out["loss"], out["loss_diff"] + 0.8 * (lt + 3.0 * lm))
    with pytest.raises(KeyError, match="dec_first"):
        crit(model, x0, {"mid": dino["mid"]}, ehs)


def _lambda64(step, coeff, warmup, schedule, stop, max_steps):
    """The alignment weight written out from its definition (README), in float64."""
    if stop is not None and step > stop:
        return 0.0
    w = coeff * (min(1.0, step / warmup) if warmup else 1.0)
    if schedule == "cosine":
        end = stop if stop is not None else max_steps
        p = min(1.0, max(0.0, (step - warmup) / (end - warmup)))
        w *= (1 + np.cos(np.pi * p)) / 2
    return w


@pytest.mark.parametrize("schedule,warmup,stop", [("constant", 0, None), ("constant", 30, None),
                                                  ("cosine", 0, None), ("cosine", 30, 80), ("stop", 30, 60)])
def test_align_lambda_schedules(schedule, warmup, stop):
    for step in range(1, 101):
        got = align_lambda(step, 0.8, warmup, schedule, stop, 100)
        assert got == pytest.approx(_lambda64(step, 0.8, warmup, schedule, stop, 100), abs=1e-12), step
    if warmup:  # the fork's linear warm-up: half the weight halfway through it
        assert align_lambda(warmup // 2, 0.8, warmup, schedule, stop, 100) == pytest.approx(0.4)
    if stop is not None:
        assert align_lambda(stop + 1, 0.8, warmup, schedule, stop, 100) == 0.0
    if schedule == "cosine":
        assert align_lambda(stop or 100, 0.8, warmup, schedule, stop, 100) == pytest.approx(0.0, abs=1e-12)


def test_align_schedule_config_is_checked():
    from repa_fast.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="'stop' needs align_stop_step"):
        load_config(None, ["align_schedule=stop"])
    with pytest.raises(ConfigError, match="constant schedule never stops"):
        load_config(None, ["align_stop_step=10"])
    with pytest.raises(ConfigError, match="align_schedule.*'linear'"):
        load_config(None, ["align_schedule=linear"])
    with pytest.raises(ConfigError, match="align_warmup_steps"):
        load_config(None, ["align_warmup_steps=-1"])
    cfg = load_config(None, ["align_schedule=stop", "align_stop_step=7", "align_warmup_steps=3"])
    crit = SD15Loss.from_config(cfg)
    assert [round(crit.align_weight(s), 6) for s in (1, 3, 7, 8)] == [round(0.8 / 3, 6), 0.8, 0.8, 0.0]


def test_alignment_off_runs_the_unet_alone():
    torch.manual_seed(0)
    model = SD15UNetAligned(build_unet("tiny"), ["mid"], D=64, num_tokens=16)
    B = 2
    x0, ehs = torch.randn(B, 4, 16, 16), torch.randn(B, 77, 32)
    dino = {"mid": torch.randn(B, 16, 64).half()}
    crit = SD15Loss(align_schedule="stop", align_stop_step=5)
    on = crit(model, x0, dino, ehs, step=5, generator=torch.Generator().manual_seed(1))
    off = crit(model, x0, dino, ehs, step=6, generator=torch.Generator().manual_seed(1))
    assert on["lambda"] == 0.8 and off["lambda"] == 0.0
    assert on["loss_token"] > 0 and off["loss_token"] == 0 and off["loss_manifold"] == 0
    torch.testing.assert_close(off["loss_diff"], on["loss_diff"])  # same noise, same prediction
    torch.testing.assert_close(off["loss"], off["loss_diff"])
    off["loss"].backward()
    assert all(p.grad is None for p in model.align_heads.parameters())  # the heads did not run
    assert not model.hook_manager.features


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_manifold_form_selects_the_gram(kernels):
    from repa_fast.config import ConfigError, load_config
    from repa_fast.losses import AlignmentLoss, token_gram_loss

    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(3, 16, 32, generator=g), torch.randn(3, 16, 32, generator=g).half()
    lt, lm = AlignmentLoss(kernels=kernels, form="token")(x, y)
    torch.testing.assert_close(lt, token_loss(x, y))
    torch.testing.assert_close(lm, token_gram_loss(x, y), rtol=1e-4, atol=1e-7)
    lt, lm = AlignmentLoss(upper_only=True, kernels=kernels, form="sample")(x, y)
    torch.testing.assert_close(lm, manifold_gram_loss(x, y, upper_only=True), rtol=1e-4, atol=1e-7)
    assert AlignmentLoss.from_config(load_config(None, ["manifold_form=token"])).form == "token"
    with pytest.raises(ConfigError, match="manifold_form"):
        load_config(None, ["manifold_form=tokens"])
