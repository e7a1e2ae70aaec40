"""The webui family's timestep samplers (DDIM, DDIM CFG++, PLMS) against diffusers' DDIMScheduler and
PNDMScheduler stepped over the webui's timesteps, LCM against diffusers' LCMScheduler and Restart against
k-diffusion's Heun runs, with a small deterministic eps model."""

import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler
from kdiffusion_oracle import sampling

from altdiff import k_schedules
from altdiff import timestep_samplers as ts
from altdiff.extra_samplers import EXTRA_SAMPLERS, LCMDenoiser, restart_sampler, restart_steps, sample_lcm
from altdiff.timestep_samplers import TIMESTEP_SAMPLERS, find_timestep_sampler, get_timesteps

SHAPE = (2, 4, 8, 8)
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _alphas_cumprod() -> torch.Tensor:
    return DDIMScheduler(**BETAS).alphas_cumprod.float()


ALPHAS = _alphas_cumprod()


class EpsModel:
    """A deterministic eps model that depends on x and t (not the UNet), counting its calls."""

    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.weight = torch.randn(4, 4, generator=g) * 0.5
        self.time = torch.randn(4, generator=g)
        self.calls = []

    def __call__(self, x, t, cond=0.0):
        self.calls.append(t[0].item())
        mixed = torch.einsum("oc,bchw->bohw", self.weight, x)
        return torch.tanh(mixed + (t / 1000)[:, None, None, None] * self.time[None, :, None, None] + cond)


def _noise_stream(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda t=None, t_prev=None: torch.randn(SHAPE, generator=g)


def _x(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _max_err(a, b):
    return (a - b).abs().max().item()


def test_get_timesteps_matches_the_webui_rule():
    """range(0, 1000, 1000 // steps) + 1, clipped to 999: the webui's CompVisSampler.get_timesteps."""
    assert get_timesteps(10).tolist() == list(range(1, 1000, 100))
    assert get_timesteps(30).tolist() == [t + 1 for t in range(0, 1000, 33)]
    assert len(get_timesteps(30)) == 31
    assert get_timesteps(1000).tolist() == list(range(1, 1000)) + [999]
    assert get_timesteps(9, discard_next_to_last_sigma=True).tolist() == get_timesteps(10).tolist()
    with pytest.raises(ValueError, match="steps"):
        get_timesteps(0)


@pytest.mark.parametrize("steps,calls", [(30, 30), (50, 49), (20, 19), (7, 7)])
def test_ddim_model_calls(steps, calls):
    """The webui makes len(timesteps) - 1 UNet calls (49 at 50 steps, one fewer than diffusers' DDIM); PLMS
    one more for its improved-Euler first step. Counts from the webui's range rule, not from altdiff."""
    timesteps = get_timesteps(steps)
    assert len(range(0, 1000, 1000 // steps)) - 1 == calls
    for fn, expected in ((ts.ddim, calls), (ts.plms, calls + 1)):
        model = EpsModel()
        fn(model, _x(), timesteps, disable=True, alphas_cumprod=ALPHAS)
        assert len(model.calls) == expected
    assert model.calls[:3] == [timesteps[-1].item(), timesteps[-2].item(), timesteps[-2].item()]


def _diffusers_ddim(x, timesteps, eta, noise):
    """diffusers' DDIMScheduler.step walking the webui's timesteps: its step ratio 1000 // steps lands each
    step on the webui's previous timestep, and set_alpha_to_one=False gives the webui's final alpha-bar."""
    scheduler = DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False)
    scheduler.num_inference_steps = 1000 // (timesteps[1] - timesteps[0]).item()
    model = EpsModel()
    for t in timesteps[1:].flip(0):
        e_t = model(x, t.float().expand(x.shape[0]))
        x = scheduler.step(e_t, int(t), x, eta=eta, variance_noise=noise() if eta else None).prev_sample
    return x


@pytest.mark.parametrize("steps,eta", [(10, 0.0), (10, 1.0), (30, 0.0), (7, 0.5)])
def test_ddim_matches_diffusers(steps, eta):
    """DDIM at eta 0 and eta > 0 (the same noise on both sides) equals diffusers' DDIMScheduler."""
    timesteps = get_timesteps(steps)
    ours = ts.ddim(EpsModel(), _x(), timesteps, disable=True, eta=eta, alphas_cumprod=ALPHAS,
                   noise_sampler=_noise_stream(5) if eta else None)
    oracle = _diffusers_ddim(_x(), timesteps, eta, _noise_stream(5))
    assert _max_err(ours, oracle) < 2e-5
    # sensitivity: one step fewer, or another noise stream, moves the result
    shorter = ts.ddim(EpsModel(), _x(), timesteps[1:], disable=True, alphas_cumprod=ALPHAS)
    assert _max_err(shorter, oracle) > 1e-3
    if eta:
        other = ts.ddim(EpsModel(), _x(), timesteps, disable=True, eta=eta, alphas_cumprod=ALPHAS,
                        noise_sampler=_noise_stream(6))
        assert _max_err(other, oracle) > 1e-3


def test_ddim_draws_once_per_step_even_at_eta_0():
    """The webui calls randn_like every step (noise * 0 at eta 0): the per-image RNG must advance the same."""
    draws = []

    def sampler(t, t_prev):
        draws.append((t[0].item(), t_prev[0].item()))
        return torch.randn(SHAPE)

    timesteps = get_timesteps(10)
    ours = ts.ddim(EpsModel(), _x(), timesteps, disable=True, alphas_cumprod=ALPHAS, noise_sampler=sampler)
    assert draws == [(timesteps[i].item(), timesteps[i - 1].item()) for i in range(9, 0, -1)]
    assert torch.equal(ours, ts.ddim(EpsModel(), _x(), timesteps, disable=True, alphas_cumprod=ALPHAS))
    with pytest.raises(ValueError, match="noise_sampler"):
        ts.ddim(EpsModel(), _x(), timesteps, disable=True, eta=1.0, alphas_cumprod=ALPHAS)


def _diffusers_plms(x, timesteps):
    """diffusers' PNDMScheduler.step_plms (skip_prk_steps) fed the webui's timesteps in its own pattern
    [t_n, t_n-1, t_n-1, t_n-2, ..., t_1] (n > 2): its counter-1 step is the pseudo improved Euler, then
    Adams-Bashforth 2, 3, 4."""
    scheduler = PNDMScheduler(**BETAS, skip_prk_steps=True, set_alpha_to_one=False)
    scheduler.num_inference_steps = 1000 // (timesteps[1] - timesteps[0]).item()
    descending = timesteps[1:].flip(0).tolist()
    model = EpsModel()
    for t in descending[:2] + descending[1:]:
        x = scheduler.step_plms(model(x, torch.full((x.shape[0],), float(t))), t, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [10, 20])
def test_plms_matches_diffusers(steps):
    """PLMS equals diffusers' PNDMScheduler PLMS steps over the same timesteps (first step included)."""
    timesteps = get_timesteps(steps)
    ours = ts.plms(EpsModel(), _x(), timesteps, disable=True, alphas_cumprod=ALPHAS)
    oracle = _diffusers_plms(_x(), timesteps)
    assert _max_err(ours, oracle) < 2e-5
    ddim = ts.ddim(EpsModel(), _x(), timesteps, disable=True, alphas_cumprod=ALPHAS)
    assert _max_err(ours, ddim) > 1e-3  # sensitivity: the multistep changes the result


def test_plms_first_step_is_pseudo_improved_euler():
    """With two timesteps PLMS is one step with the mean of eps at x_t and at the DDIM step's x_prev (the
    PLMS paper's pseudo improved Euler), recomputed here with diffusers' DDIM step."""
    timesteps = get_timesteps(500)[:3]
    scheduler = DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False)
    scheduler.num_inference_steps = 500
    model, x = EpsModel(), _x()
    t, t_prev = timesteps[-1].item(), timesteps[-2].item()
    e_t = model(x, torch.full((2,), float(t)))
    x_prev = scheduler.step(e_t, t, x).prev_sample
    e_next = model(x_prev, torch.full((2,), float(t_prev)))
    expected = scheduler.step((e_t + e_next) / 2, t, x).prev_sample
    ours = ts.plms(EpsModel(), x, timesteps[1:], disable=True, alphas_cumprod=ALPHAS)
    assert _max_err(ours, expected) < 2e-5
    assert _max_err(x_prev, expected) > 1e-4


class CfgModel:
    """A CFG denoiser stand-in exposing last_noise_uncond as the module docstring asks."""

    def __init__(self):
        self.inner = EpsModel()
        self.cond_scale_multiplier = 1.0
        self.scale = 7.0

    def __call__(self, x, t):
        uncond, cond = self.inner(x, t), self.inner(x, t, cond=0.3)
        self.last_noise_uncond = uncond
        return uncond + (cond - uncond) * self.scale * self.cond_scale_multiplier


def test_ddim_cfgpp_uses_the_uncond_direction():
    """DDIM CFG++ (Chung et al. 2024, eq. for the DDIM step): x_prev = sqrt(a_prev) * x0(guided eps) +
    sqrt(1 - a_prev) * uncond eps, with diffusers' DDIMScheduler giving x0 and a_prev; scale / 12.5."""
    timesteps = get_timesteps(10)
    model = CfgModel()
    ours = ts.ddim_cfgpp(model, _x(), timesteps, disable=True, alphas_cumprod=ALPHAS)
    assert model.cond_scale_multiplier == pytest.approx(1 / 12.5) and model.need_last_noise_uncond
    scheduler = DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False)
    scheduler.num_inference_steps = 10
    oracle, x = CfgModel(), _x()
    oracle.cond_scale_multiplier = 1 / 12.5
    for t in timesteps[1:].flip(0).tolist():
        e_t = oracle(x, torch.full((2,), float(t)))
        x0 = scheduler.step(e_t, t, x).pred_original_sample
        a_prev = scheduler.alphas_cumprod[t - 100]
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * oracle.last_noise_uncond
    assert _max_err(ours, x) < 2e-5
    ddim = ts.ddim(CfgModel(), _x(), timesteps, disable=True, alphas_cumprod=ALPHAS)
    assert _max_err(ours, ddim) > 1e-3
    with pytest.raises(TypeError, match="last_noise_uncond"):
        ts.ddim_cfgpp(EpsModel(), _x(), timesteps, disable=True, alphas_cumprod=ALPHAS)


def test_img2img_steps_follow_the_webui():
    """setup_img2img_steps: t_enc = int(min(strength, 0.999) * steps), or steps - 1 over steps / strength with
    fixed steps; the start latent mixes at alphas_cumprod[timesteps[t_enc]] (the webui's sample_img2img)."""
    assert ts.setup_img2img_steps(20, 0.75) == (20, 15)
    assert ts.setup_img2img_steps(20, 1.0) == (20, 19)
    assert ts.setup_img2img_steps(20, 0.5, fix_steps=True) == (40, 19)
    timesteps = get_timesteps(20)
    sched, sqrt_a, sqrt_1ma = ts.img2img_timesteps(timesteps, 15, ALPHAS)
    assert sched.tolist() == timesteps[:15].tolist()
    assert sqrt_a.item() == pytest.approx(ALPHAS[timesteps[15]].sqrt().item())
    assert sqrt_1ma.item() == pytest.approx((1 - ALPHAS[timesteps[15]]).sqrt().item())
    with pytest.raises(ValueError, match="denoising_strength"):
        ts.setup_img2img_steps(20, 1.5)


def test_table_and_lookup():
    """The webui's samplers_timesteps labels and aliases (UniPC: altdiff/unipc.py)."""
    assert {label: row.aliases for label, row in TIMESTEP_SAMPLERS.items()} == {
        "DDIM": ("ddim",), "DDIM CFG++": ("ddim_cfgpp",), "PLMS": ("plms",), "UniPC": ("unipc",)}
    assert find_timestep_sampler("Ddim_CFGpp") == "DDIM CFG++"
    with pytest.raises(ValueError, match="sampler"):
        find_timestep_sampler("Euler")


# --- LCM and Restart (k-diffusion form) -----------------------------------------------------------------

def test_lcm_matches_diffusers_lcm_scheduler():
    """LCM over the webui's LCM denoiser equals diffusers' LCMScheduler (its boundary condition, timestep
    scaling 10 and re-noising) stepping the same timesteps 999, 859, ..., 19 with the same noise; the
    webui's skip term mixes the unscaled x, a difference below the tolerance at these timesteps."""
    from diffusers import LCMScheduler

    denoiser = LCMDenoiser(EpsModel(), ALPHAS)
    sigmas = denoiser.get_sigmas(8)
    timesteps = denoiser.sigma_to_t(sigmas[:-1])
    assert timesteps.tolist() == list(range(999, 18, -140))
    noise = _x(1)
    ours = sample_lcm(denoiser, noise * sigmas[0], sigmas, disable=True, noise_sampler=_noise_stream(5))
    scheduler = LCMScheduler(**BETAS, set_alpha_to_one=False)
    scheduler.set_timesteps(8)
    scheduler.timesteps = timesteps
    model, x = EpsModel(), noise * sigmas[0] * ALPHAS[999].sqrt()
    generator = torch.Generator().manual_seed(5)
    for t in timesteps.tolist():
        x = scheduler.step(model(x, torch.full((2,), float(t))), t, x, generator=generator).prev_sample
    assert _max_err(ours, x) < 2e-6 * x.abs().max().item()  # float32 rounding of values up to ~40
    other = sample_lcm(denoiser, noise * sigmas[0], sigmas, disable=True, noise_sampler=_noise_stream(6))
    assert _max_err(other, x) > 1e-3


def _kdiff_heun(model, x, sigmas):
    return sampling.sample_heun(model, x, sigmas, disable=True)


def test_restart_without_restarts_is_heun():
    """Under 20 steps the webui's Restart adds no restart: k-diffusion's sample_heun (Euler into 0)."""
    model = k_schedules.compvis_denoiser(EpsModel(), ALPHAS)
    sigmas = k_schedules.karras(8, 0.03, 14.6)
    x = _x() * sigmas[0]
    ours = restart_sampler(model, x, sigmas, disable=True)
    assert _max_err(ours, _kdiff_heun(model, x, sigmas)) < 1e-5
    assert _max_err(ours, _kdiff_heun(model, x, sigmas[1:])) > 1e-3


def test_restart_default_at_20_steps_composes_heun_runs():
    """At 20 steps: a Karras schedule of 11 sigmas, then after the sigma nearest 0.1 one restart: noise up to
    the sigma nearest 2 (sqrt(s_max^2 - s_min^2) scaled), 9 Heun steps back down its own 10-sigma Karras
    schedule, and the rest (Xu et al. 2023). Composed from k-diffusion's sample_heun and get_sigmas_karras."""
    model = k_schedules.compvis_denoiser(EpsModel(), ALPHAS)
    sigmas = k_schedules.karras(20, 0.03, 14.6)
    x = _x() * sigmas[0]
    ours = restart_sampler(model, x, sigmas, disable=True, noise_sampler=_noise_stream(5))
    main = sampling.get_sigmas_karras(11, sigmas[-2].item(), sigmas[0].item())
    low = int(torch.argmin(abs(main - 0.1)))
    high = int(torch.argmin(abs(main - 2)))
    restart = sampling.get_sigmas_karras(10, main[low].item(), main[high].item())[:-1]
    y = _kdiff_heun(model, x, main[:low + 1])
    y = y + _noise_stream(5)() * (main[high] ** 2 - main[low] ** 2) ** 0.5
    y = _kdiff_heun(model, y, restart)
    y = _kdiff_heun(model, y, main[low:])
    assert _max_err(ours, y) < 1e-5
    assert _max_err(ours, _kdiff_heun(model, x, main)) > 1e-3
    assert len(restart_steps(sigmas)) == 11 + 9  # the 20 steps asked: main steps plus restart steps
    with pytest.raises(ValueError, match="noise_sampler"):
        restart_sampler(model, x, sigmas, disable=True)


def test_extra_table():
    """The webui's rows: Restart (karras, second order) in samplers_k_diffusion; LCM (k_lcm) in
    samplers_lcm."""
    assert EXTRA_SAMPLERS["Restart"] == (restart_sampler, ("restart",), {"scheduler": "karras",
                                                                        "second_order": True})
    assert EXTRA_SAMPLERS["LCM"] == (sample_lcm, ("k_lcm",), {})
