"""Schedules and samplers against diffusers 0.35.2's schedulers, driven the way the AltDiffusion pipelines
drive them (init_noise_sigma, scale_model_input, step with eta/generator where accepted, img2img
get_timesteps + set_begin_index + add_noise) with the same deterministic fake UNet."""

import inspect

import pytest
import torch
from conftest import max_abs
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)

from altdiff.config import ConfigError, SchedulerConfig
from altdiff.samplers import SAMPLERS, get_sampler, sample_ddim
from altdiff.schedules import add_noise, make_schedule, sampler_for_config, schedule_for_strength

# diffusers' own numpy-2 deprecation noise when it turns tensors into arrays.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# BAAI/AltDiffusion's scheduler_config.json (older files have no timestep_spacing / prediction_type).
ALT = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
       "num_train_timesteps": 1000, "skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False,
       "trained_betas": None}
ALT_SAVED = {**ALT, "timestep_spacing": "leading", "prediction_type": "epsilon"}
VPRED = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
         "prediction_type": "v_prediction", "timestep_spacing": "trailing", "rescale_betas_zero_snr": True,
         "clip_sample": False, "set_alpha_to_one": False}
COSINE = {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True,
          "sigma_min": 0.05, "sigma_max": 30.0, "timestep_spacing": "linspace", "prediction_type": "sample"}
TRAINED = {"trained_betas": torch.linspace(0.0002, 0.015, 1000).tolist(), "timestep_spacing": "trailing",
           "use_karras_sigmas": True}
CONFIGS = {"alt": ALT, "alt_saved": ALT_SAVED, "vpred": VPRED, "cosine": COSINE, "trained": TRAINED, "defaults": {}}

REFERENCE = {
    "pndm": (PNDMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"use_karras_sigmas": False}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
}
NAMES = list(REFERENCE)


def reference_scheduler(sampler, config, n):
    cls, overrides = REFERENCE[sampler]
    scheduler = cls.from_config(config, **overrides)
    scheduler.set_timesteps(n)
    return scheduler


def config_for(sampler, config_name):
    config = CONFIGS[config_name]
    if config.get("prediction_type") == "sample" and sampler in ("pndm", "euler_a"):
        config = {**config, "prediction_type": "epsilon"}  # they do not support sample prediction
    return config


def prk_warmup(sampler, config):
    return sampler == "pndm" and not config.get("skip_prk_steps", False)


def ours(sampler, config, n):
    return make_schedule(sampler, SchedulerConfig.from_dict(config), n)


def fake_unet(calls):
    """A fixed nonlinear function of (x, t), recording every call."""
    base = torch.linspace(-1, 1, 4 * 6 * 6).reshape(1, 4, 6, 6)

    def model(x, t):
        calls.append((x.clone(), t.clone()))
        return 0.6 * torch.tanh(x) + 0.1 * x + (t.float() / 1000) * base

    return model


def generators(batch, seed=7):
    if batch == 1:
        return torch.Generator().manual_seed(seed)
    return [torch.Generator().manual_seed(seed + i) for i in range(batch)]


def run_reference(sampler, config, n, start, *, batch=1, eta=0.0, strength=None, image=None, noise=None,
                  replace=None, begin_index=None):
    """The AltDiffusion pipelines' denoising loop around the diffusers scheduler."""
    scheduler = reference_scheduler(sampler, config, n)
    timesteps = scheduler.timesteps
    if strength is None:
        if begin_index is not None:
            scheduler.set_begin_index(begin_index)
        latents = start * scheduler.init_noise_sigma
    else:
        init_timestep = min(int(n * strength), n)
        t_start = max(n - init_timestep, 0)
        timesteps = timesteps[t_start * scheduler.order:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        latents = scheduler.add_noise(image, noise, timesteps[:1].repeat(image.shape[0]))
    params = inspect.signature(scheduler.step).parameters
    kwargs = {k: v for k, v in (("eta", eta), ("generator", generators(batch))) if k in params}
    calls, history = [], []
    model = fake_unet(calls)
    for i, t in enumerate(timesteps):
        out = model(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(out, t, latents, **kwargs, return_dict=False)[0]
        if replace is not None:
            latents = replace(i, t, latents)
        history.append(latents)
    return calls, history


def run_ours(sampler, config, n, start, *, batch=1, eta=0.0, strength=None, image=None, noise=None,
             replace=None):
    schedule = ours(sampler, config, n)
    if strength is None:
        x = start * schedule.init_noise_sigma
    else:
        schedule = schedule_for_strength(schedule, strength)
        x = add_noise(schedule, image, noise)
    calls, history = [], []

    def callback(i, t, latents):
        new = replace(i, t, latents) if replace is not None else None
        history.append(latents if new is None else new)
        return new

    result = get_sampler(sampler)(fake_unet(calls), x, schedule, generator=generators(batch), eta=eta,
                                  callback=callback)
    assert result is history[-1]
    return calls, history


def assert_same_run(got, want):
    (calls_got, hist_got), (calls_want, hist_want) = got, want
    assert len(calls_got) == len(calls_want) == len(hist_got) == len(hist_want)
    for (x_got, t_got), (x_want, t_want) in zip(calls_got, calls_want):
        assert t_got.dtype == t_want.dtype and torch.equal(t_got, t_want)
        assert max_abs(x_got, x_want) <= 1e-6 * max(1.0, x_want.abs().max().item())
    for got_latents, want_latents in zip(hist_got, hist_want):
        assert got_latents.dtype == want_latents.dtype
        assert torch.isfinite(want_latents).all()
        assert max_abs(got_latents, want_latents) <= 1e-6 * max(1.0, want_latents.abs().max().item())


def start_latents(batch=1):
    return torch.randn((batch, 4, 6, 6), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("sampler", NAMES)
def test_timesteps_and_sigmas_match_diffusers(sampler, config_name):
    config = config_for(sampler, config_name)
    for n in (1, 2, 10, 25, 50):
        if prk_warmup(sampler, config) and n < 4:
            continue
        want = reference_scheduler(sampler, config, n)
        got = ours(sampler, config, n)
        assert got.timesteps.dtype == want.timesteps.dtype
        assert torch.equal(got.timesteps, want.timesteps), (n, got.timesteps, want.timesteps)
        # DDIM and PNDM have no sigmas; every sigma sampler must have them, equal to diffusers'.
        assert (got.sigmas is None) == (getattr(want, "sigmas", None) is None), n
        if got.sigmas is not None:
            assert torch.equal(got.sigmas, want.sigmas), n
        assert got.init_noise_sigma == float(want.init_noise_sigma)
        assert got.prediction_type == want.config.prediction_type


@pytest.mark.parametrize("n", [1, 2, 10, 25])
@pytest.mark.parametrize("config_name", ["alt", "vpred"])
@pytest.mark.parametrize("sampler", NAMES)
def test_sampling_matches_diffusers(sampler, config_name, n):
    config = CONFIGS[config_name]
    if prk_warmup(sampler, config) and n < 4:
        with pytest.raises(ValueError, match="num_inference_steps"):  # diffusers fails inside numpy here
            ours(sampler, config, n)
        return
    start = start_latents()
    got = run_ours(sampler, config, n, start)
    timesteps = ours(sampler, config, n).timesteps
    if (timesteps == timesteps[0]).sum() > 1:
        # Karras DPM on the zero-SNR schedule repeats timestep 999; the pipeline, which never calls
        # set_begin_index, then starts diffusers at the second 999 and runs off the end of its sigmas.
        with pytest.raises(IndexError):
            run_reference(sampler, config, n, start)
        assert_same_run(got, run_reference(sampler, config, n, start, begin_index=0))
    else:
        assert_same_run(got, run_reference(sampler, config, n, start))


@pytest.mark.parametrize("config_name", ["alt_saved", "cosine", "trained", "defaults"])
@pytest.mark.parametrize("sampler", NAMES)
def test_sampling_matches_diffusers_other_configs(sampler, config_name):
    config = config_for(sampler, config_name)
    start = start_latents()
    assert_same_run(run_ours(sampler, config, 12, start), run_reference(sampler, config, 12, start))


@pytest.mark.parametrize("n", [4, 5, 20])
@pytest.mark.parametrize("config", [{**ALT, "skip_prk_steps": False}, VPRED], ids=["alt", "vpred"])
def test_pndm_runge_kutta_warmup(config, n):
    start = start_latents()
    got = run_ours("pndm", config, n, start)
    assert len(got[0]) == 12 + n - 3
    assert_same_run(got, run_reference("pndm", config, n, start))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("sampler,eta", [("ddim", 0.5), ("ddim", 1.0), ("euler_a", 0.0)])
def test_noisy_samplers_draw_like_diffusers(sampler, eta, batch):
    start = start_latents(batch)
    for config in (ALT, VPRED):
        got = run_ours(sampler, config, 10, start, batch=batch, eta=eta)
        assert_same_run(got, run_reference(sampler, config, 10, start, batch=batch, eta=eta))
    # The draws matter: another seed moves the result.
    other = run_ours(sampler, ALT, 10, start, batch=batch, eta=eta)
    schedule = ours(sampler, ALT, 10)
    moved = get_sampler(sampler)(fake_unet([]), start * schedule.init_noise_sigma, schedule,
                                 generator=generators(batch, seed=99), eta=eta)
    assert max_abs(moved, other[1][-1]) > 1e-3


@pytest.mark.parametrize("sampler", NAMES)
def test_img2img_timesteps_and_add_noise_match_diffusers(sampler):
    image = start_latents(2)
    noise = torch.randn((2, 4, 6, 6), generator=torch.Generator().manual_seed(5))
    for config in (ALT, VPRED):
        for n, strengths in ((10, (0.1, 0.3, 0.55, 0.6, 0.75, 0.99, 1.0)), (25, (0.06, 0.5, 0.8))):
            if prk_warmup(sampler, config):
                continue
            full = ours(sampler, config, n)
            for strength in strengths:
                want = reference_scheduler(sampler, config, n)
                t_start = n - min(int(n * strength), n)
                timesteps = want.timesteps[t_start * want.order:]
                if hasattr(want, "set_begin_index"):
                    want.set_begin_index(t_start * want.order)
                got = schedule_for_strength(full, strength)
                assert got.begin_index == t_start
                assert torch.equal(got.timesteps, timesteps), (n, strength)
                noisy = want.add_noise(image, noise, timesteps[:1].repeat(2))
                assert max_abs(add_noise(got, image, noise), noisy) <= 1e-6 * noisy.abs().max().item()


@pytest.mark.parametrize("config_name", ["alt", "vpred"])
@pytest.mark.parametrize("sampler", NAMES)
def test_img2img_sampling_matches_diffusers(sampler, config_name):
    config = CONFIGS[config_name]
    if prk_warmup(sampler, config):
        config = {**config, "skip_prk_steps": True}
    image = start_latents(2)
    noise = torch.randn((2, 4, 6, 6), generator=torch.Generator().manual_seed(5))
    kwargs = {"strength": 0.6, "image": image, "noise": noise, "batch": 2, "eta": 0.3}
    got = run_ours(sampler, config, 10, None, **kwargs)
    assert len(got[0]) == len(ours(sampler, config, 10).timesteps) - 4
    assert_same_run(got, run_reference(sampler, config, 10, None, **kwargs))


@pytest.mark.parametrize("sampler", NAMES)
def test_callback_sees_every_call_and_replaces_latents(sampler):
    start = start_latents()
    seen = []

    def replace(i, t, latents):
        seen.append((i, t))
        return latents * 0.5 if i == 1 else None

    got = run_ours(sampler, ALT, 6, start, replace=replace)
    schedule = ours(sampler, ALT, 6)
    assert [i for i, _ in seen] == list(range(len(schedule.timesteps)))
    assert all(torch.equal(t, want) for (_, t), want in zip(seen, schedule.timesteps))
    assert len(got[0]) == len(seen)
    want = run_reference(sampler, ALT, 6, start,
                         replace=lambda i, t, latents: latents * 0.5 if i == 1 else latents)
    assert_same_run(got, want)
    plain = run_reference(sampler, ALT, 6, start)
    assert max_abs(plain[1][-1], want[1][-1]) > 1e-3  # the replacement changed the result


def test_sampler_for_config():
    expected = {"PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "LMSDiscreteScheduler": "lms",
                "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a",
                "DPMSolverMultistepScheduler": "dpmpp_2m"}
    for class_name, name in expected.items():
        assert sampler_for_config(SchedulerConfig.from_dict({**ALT, "_class_name": class_name})) == name
    karras = {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}
    assert sampler_for_config(SchedulerConfig.from_dict(karras)) == "dpmpp_2m_karras"
    assert set(SAMPLERS) == set(REFERENCE)
    with pytest.raises(ConfigError, match="KDPM2DiscreteScheduler"):
        sampler_for_config(SchedulerConfig.from_dict({"_class_name": "KDPM2DiscreteScheduler"}))
    with pytest.raises(ConfigError, match="_class_name"):
        sampler_for_config(SchedulerConfig.from_dict({}))


def test_missing_fields_take_the_sampler_class_defaults():
    # DDIM from the AltDiffusion (PNDM) config clips x0, as DDIMScheduler.from_config does.
    assert DDIMScheduler.from_config(ALT).config.clip_sample is True
    assert ours("ddim", ALT, 10).clip_sample_range == 1.0
    assert ours("ddim", VPRED, 10).clip_sample_range is None
    assert ours("pndm", {**ALT, "skip_prk_steps": None}, 10).skip_prk_steps is False


@pytest.mark.parametrize("field,value,sampler", [
    ("thresholding", True, "ddim"),
    ("thresholding", True, "dpmpp_2m"),
    ("use_exponential_sigmas", True, "euler"),
    ("use_beta_sigmas", True, "lms"),
    ("use_lu_lambdas", True, "dpmpp_2m"),
    ("algorithm_type", "sde-dpmsolver++", "dpmpp_2m"),
    ("algorithm_type", "deis", "dpmpp_2m"),
    ("solver_order", 3, "dpmpp_2m_karras"),
    ("solver_type", "heun", "dpmpp_2m"),
    ("final_sigmas_type", "sigma_min", "euler"),
    ("interpolation_type", "log_linear", "euler"),
    ("timestep_type", "continuous", "euler"),
    ("beta_schedule", "cubic", "ddim"),
    ("timestep_spacing", "uniform", "lms"),
    ("prediction_type", "flow", "euler"),
    ("prediction_type", "sample", "pndm"),
    ("prediction_type", "sample", "euler_a"),
])
def test_unsupported_options_raise_naming_them(field, value, sampler):
    with pytest.raises(ConfigError, match=field):
        ours(sampler, {**ALT, field: value}, 10)


def test_invalid_arguments():
    config = SchedulerConfig.from_dict(ALT)
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_schedule("ddim", config, 0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_schedule("euler", config, 1001)
    with pytest.raises(TypeError, match="num_inference_steps"):
        make_schedule("euler", config, 10.0)
    with pytest.raises(ValueError, match="num_inference_steps.*skip_prk_steps"):
        make_schedule("pndm", SchedulerConfig.from_dict({**ALT, "skip_prk_steps": False}), 3)
    with pytest.raises(ValueError, match="sampler.*'ddim'"):
        make_schedule("heun", config, 10)
    with pytest.raises(ValueError, match="sampler.*dpmpp_2m_karras"):
        get_sampler("heun")
    with pytest.raises(ConfigError, match="trained_betas"):
        make_schedule("ddim", SchedulerConfig.from_dict({"trained_betas": [0.1, 0.2]}), 10)
    with pytest.raises(ConfigError, match="num_train_timesteps"):
        make_schedule("ddim", SchedulerConfig.from_dict({"num_train_timesteps": 0}), 1)
    schedule = make_schedule("ddim", config, 10)
    for strength in (-0.1, 1.5):
        with pytest.raises(ValueError, match="strength"):
            schedule_for_strength(schedule, strength)
    with pytest.raises(ValueError, match="strength.*no denoising step"):
        schedule_for_strength(schedule, 0.05)
    with pytest.raises(TypeError, match="strength"):
        schedule_for_strength(schedule, "0.5")
    with pytest.raises(ValueError, match="noise"):
        add_noise(schedule, torch.zeros(1, 4, 6, 6), torch.zeros(2, 4, 6, 6))
    with pytest.raises(ValueError, match="schedule.*'lms'"):
        sample_ddim(fake_unet([]), torch.zeros(1, 4, 6, 6), make_schedule("lms", config, 10))
    with pytest.raises(TypeError, match="schedule"):
        sample_ddim(fake_unet([]), torch.zeros(1, 4, 6, 6), {"timesteps": []})
    with pytest.raises(TypeError, match="x"):
        sample_ddim(fake_unet([]), torch.zeros(1, 4, 6, 6, dtype=torch.long), schedule)
