"""The webui family's k-diffusion samplers and schedule types against k-diffusion 0.1.1.post1 (and, for the
webui-only schedule types, the formulas of the webui's sd_schedulers.py recomputed here with k-diffusion's
CompVisDenoiser, numpy and scipy)."""

import inspect

import numpy as np
import pytest
import torch
from kdiffusion_oracle import external, sampling
from scipy import stats

from altdiff import k_samplers, k_schedules
from altdiff.k_samplers import KDIFFUSION_SAMPLERS, find_k_sampler, webui_sampler_kwargs
from altdiff.k_schedules import SCHEDULE_TYPES, find_schedule_type, webui_sigmas

pytestmark = pytest.mark.filterwarnings("ignore:Should have:UserWarning")  # torchsde float rounding notes

SHAPE = (2, 4, 8, 8)
SEEDS = [11, 12]
WORST = {}


def _alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0).float()


ALPHAS = _alphas_cumprod()
SIGMAS = k_schedules.training_sigmas(ALPHAS)


class TinyLDM:
    """What k-diffusion's CompVis wrappers need of a LatentDiffusion: alphas_cumprod and apply_model."""

    alphas_cumprod = ALPHAS

    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.weight = torch.randn(4, 4, generator=g) * 0.5
        self.time = torch.randn(4, generator=g)

    def apply_model(self, x, t, cond):
        mixed = torch.einsum("oc,bchw->bohw", self.weight, x)
        return torch.tanh(mixed + (t / 1000)[:, None, None, None] * self.time[None, :, None, None] + cond)


LDM = TinyLDM()
COND = torch.linspace(-0.5, 0.5, 64).view(1, 1, 8, 8).expand(2, 4, 8, 8)


def _ours():
    return k_schedules.compvis_denoiser(LDM.apply_model, ALPHAS)


def _oracle():
    return external.CompVisDenoiser(LDM)


class NoiseSequence:
    """The same stream of draws for both sides: as a noise sampler and as k-diffusion's torch.randn_like."""

    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = 0

    def __call__(self, sigma=None, sigma_next=None):
        self.calls += 1
        return torch.randn(SHAPE, generator=self.generator)


class TorchWithNoise:
    """k-diffusion's module-level `torch` with randn_like from a NoiseSequence (the webui's TorchHijack)."""

    def __init__(self, noise):
        self.noise = noise

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn_like(self, x):
        return self.noise()


def _relative(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


# --- denoiser and sigma maths ---------------------------------------------------------------------------

def test_sigma_t_conversions_equal_kdiffusion():
    oracle = _oracle()
    torch.testing.assert_close(SIGMAS, oracle.sigmas, rtol=0, atol=0)
    sigma = torch.tensor([14.6, 3.3, 1.0, 0.25, 0.0292, 0.03])
    ours = k_schedules.sigma_to_t(sigma, SIGMAS)
    torch.testing.assert_close(ours, oracle.sigma_to_t(sigma), rtol=0, atol=0)
    t = torch.tensor([999.0, 512.25, 100.5, 0.75, 0.0])
    torch.testing.assert_close(k_schedules.t_to_sigma(t, SIGMAS), oracle.t_to_sigma(t), rtol=0, atol=0)
    assert k_schedules.sigma_to_t(torch.tensor([3.3]), SIGMAS).item() % 1 != 0  # fractional, not quantized


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_compvis_denoiser_equals_kdiffusion(prediction_type):
    oracle_cls = external.CompVisDenoiser if prediction_type == "epsilon" else external.CompVisVDenoiser
    oracle = oracle_cls(LDM)
    ours = k_schedules.compvis_denoiser(LDM.apply_model, ALPHAS, prediction_type)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * 5
    sigma = torch.tensor([7.5, 0.4])
    expected = oracle(x, sigma, cond=COND)
    torch.testing.assert_close(ours(x, sigma, cond=COND), expected, rtol=0, atol=0)
    assert (ours(x, sigma * 1.01, cond=COND) - expected).abs().max() > 1e-4


# --- schedules ------------------------------------------------------------------------------------------

S_MIN, S_MAX = SIGMAS[0].item(), SIGMAS[-1].item()


def _webui_formula(name, n):
    """The webui's sd_schedulers.py formulas over k-diffusion's CompVisDenoiser (and scipy for Beta)."""
    inner = _oracle()
    if name == "uniform":
        return inner.get_sigmas(n)
    if name == "karras":
        return sampling.get_sigmas_karras(n, S_MIN, S_MAX)
    if name == "exponential":
        return sampling.get_sigmas_exponential(n, S_MIN, S_MAX)
    if name == "polyexponential":
        return sampling.get_sigmas_polyexponential(n, S_MIN, S_MAX)
    if name in ("sgm_uniform", "normal"):
        start, end = inner.sigma_to_t(torch.tensor(S_MAX)), inner.sigma_to_t(torch.tensor(S_MIN))
        count = n + 1 if name == "sgm_uniform" else n
        ts = torch.linspace(start, end, count)[:n]
        return torch.FloatTensor([inner.t_to_sigma(t) for t in ts] + [0.0])
    if name == "kl_optimal":
        lo, hi = torch.arctan(torch.tensor(S_MIN)), torch.arctan(torch.tensor(S_MAX))
        steps = torch.arange(n + 1)
        return torch.tan(steps / n * lo + (1.0 - steps / n) * hi)
    if name == "align_your_steps":
        levels = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
        if n == len(levels):
            return torch.FloatTensor(levels + [0.0])
        ys = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(levels)), np.log(levels[::-1]))
        return torch.FloatTensor(np.append(np.exp(ys)[::-1].copy(), [0.0]))
    if name == "simple":
        ss = len(inner.sigmas) / n
        return torch.FloatTensor([float(inner.sigmas[-(1 + int(x * ss))]) for x in range(n)] + [0.0])
    if name == "ddim":
        ss = max(len(inner.sigmas) // n, 1)
        picked = [float(inner.sigmas[x]) for x in range(1, len(inner.sigmas), ss)]
        return torch.FloatTensor(picked[::-1] + [0.0])
    if name == "beta":
        qs = [stats.beta.ppf(q, 0.6, 0.6) for q in 1 - np.linspace(0, 1, n)]
        return torch.FloatTensor([S_MIN + q * (S_MAX - S_MIN) for q in qs] + [0.0])
    raise AssertionError(name)


@pytest.mark.parametrize("name", [s.name for s in SCHEDULE_TYPES if s.function is not None])
@pytest.mark.parametrize("n", [1, 7, 11, 30])
def test_schedule_types_equal_the_webui_formulas(name, n):
    expected = _webui_formula(name, n)
    ours = webui_sigmas(name, n, SIGMAS)
    assert ours.dtype == torch.float32 and ours.device.type == "cpu"
    torch.testing.assert_close(ours, expected.float(), rtol=0, atol=0)


def test_schedule_types_differ_from_each_other():
    """The equalities above can fail: the schedule types give distinct sigmas, but for one identity of the
    formulas (Normal spans t 999..0 evenly, as Uniform does)."""
    by_sigmas = {}
    for schedule in SCHEDULE_TYPES[1:]:
        sigmas = tuple(webui_sigmas(schedule.label, 7, SIGMAS).tolist())
        by_sigmas.setdefault(sigmas, []).append(schedule.name)
    assert [group for group in by_sigmas.values() if len(group) > 1] == [["uniform", "normal"]]
    assert len(by_sigmas) == len(SCHEDULE_TYPES) - 2


def test_automatic_discard_and_labels():
    torch.testing.assert_close(webui_sigmas("Automatic", 9, SIGMAS), _oracle().get_sigmas(9), rtol=0, atol=0)
    karras = sampling.get_sigmas_karras(10, S_MIN, S_MAX)
    ours = webui_sigmas(None, 9, SIGMAS, discard_next_to_last_sigma=True, sampler_scheduler="karras")
    torch.testing.assert_close(ours, torch.cat([karras[:-2], karras[-1:]]), rtol=0, atol=0)
    assert len(ours) == 10
    torch.testing.assert_close(webui_sigmas("SGM Uniform", 5, SIGMAS), webui_sigmas("SGMUniform", 5, SIGMAS))
    assert [s.label for s in SCHEDULE_TYPES] == [
        "Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
        "Align Your Steps", "Simple", "Normal", "DDIM", "Beta"]
    assert find_schedule_type("Karras").default_rho == 7.0 and find_schedule_type("uniform").need_inner_model


@pytest.mark.parametrize("a, b", [(0.6, 0.6), (0.5, 2.0), (3.0, 0.7), (1.0, 1.0)])
def test_beta_ppf_equals_scipy(a, b):
    qs = np.concatenate([[0.0, 1e-4], np.linspace(0, 1, 97)[1:-1], [1 - 1e-6, 1.0]])
    ours = np.array([k_schedules.beta_ppf(float(q), a, b) for q in qs])
    np.testing.assert_allclose(ours, stats.beta.ppf(qs, a, b), rtol=1e-12, atol=1e-15)


# --- samplers -------------------------------------------------------------------------------------------

STEPS = 6
SIGMA_SAMPLERS = [label for label, row in KDIFFUSION_SAMPLERS.items()
                  if "sigmas" in inspect.signature(row.function).parameters]


def _run_pair(label, sigmas=None, **options):
    """Our sampler and k-diffusion's on the same denoiser, start and noise: both results, callbacks, draws."""
    row = KDIFFUSION_SAMPLERS[label]
    oracle_fn = getattr(sampling, row.function.__name__)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)) * 14.6
    kwargs = dict(options)
    if "solver_type" in row.options:
        kwargs["solver_type"] = row.options["solver_type"]
    results, calls = [], []
    for fn, denoiser in ((row.function, _ours()), (oracle_fn, _oracle())):
        noise = NoiseSequence(7)
        run_kwargs = dict(kwargs)
        if row.options.get("brownian_noise"):
            run_kwargs["noise_sampler"] = sampling.BrownianTreeNoiseSampler(
                x, sigmas[sigmas > 0].min(), sigmas.max(), seed=SEEDS)
        elif "noise_sampler" in inspect.signature(fn).parameters:
            run_kwargs["noise_sampler"] = noise
        seen = []
        sampling.torch = TorchWithNoise(noise)
        try:
            where = {"sigmas": sigmas} if sigmas is not None else {}
            out = fn(denoiser, x.clone(), extra_args={"cond": COND}, disable=True,
                     callback=lambda d, seen=seen: seen.append((d["i"], float(d["sigma"]))),
                     **where, **run_kwargs)
        finally:
            sampling.torch = torch
        results.append(out)
        calls.append((seen, noise.calls))
    return results, calls


def _check(label, key, results, calls):
    ours, theirs = results
    error = _relative(ours, theirs)
    WORST[key] = error
    assert error <= 1e-5, f"{label}: relative error {error:.2e}"
    assert calls[0] == calls[1]


@pytest.mark.parametrize("schedule", [s.label for s in SCHEDULE_TYPES])
@pytest.mark.parametrize("label", SIGMA_SAMPLERS)
def test_sampler_equals_kdiffusion(label, schedule):
    options = KDIFFUSION_SAMPLERS[label].options
    sigmas = webui_sigmas(schedule, STEPS, SIGMAS, options.get("discard_next_to_last_sigma", False),
                          options.get("scheduler"))
    eta = {"eta": 1.0} if "eta" in inspect.signature(KDIFFUSION_SAMPLERS[label].function).parameters else {}
    results, calls = _run_pair(label, sigmas, **eta)
    _check(label, (label, schedule), results, calls)
    assert calls[0][0][0][1] == pytest.approx(sigmas[0].item())


@pytest.mark.parametrize("label", ["Euler", "Heun", "DPM2"])
def test_churn_draws_the_same_noise(label):
    sigmas = webui_sigmas("Karras", STEPS, SIGMAS)
    results, calls = _run_pair(label, sigmas, s_churn=1.0, s_tmin=0.1, s_noise=1.003)
    _check(label, (label, "churn"), results, calls)
    plain, _ = _run_pair(label, sigmas)
    assert (plain[0] - results[0]).abs().max() > 1e-3


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpm_fast_and_adaptive_equal_kdiffusion(eta):
    for label, extra in (("DPM fast", {"n": STEPS}), ("DPM adaptive", {})):
        results, calls = _run_pair(label, None, sigma_min=S_MIN, sigma_max=S_MAX, eta=eta, **extra)
        _check(label, (label, eta), results, calls)
    assert len(calls[0][0]) > 2


def test_noise_changes_ancestral_results():
    sigmas = webui_sigmas("Automatic", STEPS, SIGMAS)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)) * 14.6
    first = k_samplers.sample_euler_ancestral(_ours(), x, sigmas, {"cond": COND}, disable=True,
                                              noise_sampler=NoiseSequence(1))
    second = k_samplers.sample_euler_ancestral(_ours(), x, sigmas, {"cond": COND}, disable=True,
                                               noise_sampler=NoiseSequence(2))
    assert (first - second).abs().max() > 1e-2


def test_table_matches_the_webui_list():
    assert list(KDIFFUSION_SAMPLERS) == [
        "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE", "Euler a",
        "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive"]
    for row in KDIFFUSION_SAMPLERS.values():
        assert hasattr(sampling, row.function.__name__)
    assert find_k_sampler("k_euler_ancestral") == "Euler a"
    function, aliases, options = KDIFFUSION_SAMPLERS[find_k_sampler("dpm++ 2m sde heun")]
    assert function is k_samplers.sample_dpmpp_2m_sde and aliases == ("k_dpmpp_2m_sde_heun",)
    assert options == {
        "scheduler": "exponential", "brownian_noise": True, "solver_type": "heun"}
    assert KDIFFUSION_SAMPLERS["DPM2 a"].options["discard_next_to_last_sigma"] is True


def test_webui_sampler_kwargs_follow_kdiffusion_sampler_sample():
    sigmas = webui_sigmas("DDIM", 7, SIGMAS)
    assert len(sigmas) == 9  # the DDIM schedule type runs more steps than asked
    assert webui_sampler_kwargs("DPM fast", sigmas, SIGMAS, 7) == {
        "eta": 1.0, "sigma_min": S_MIN, "sigma_max": S_MAX, "n": 7}
    tail = sigmas[5:]
    img2img = webui_sampler_kwargs("k_dpm_fast", tail, SIGMAS, 7, img2img=True, eta=0.5)
    assert img2img == {"eta": 0.5, "sigma_min": tail[-2], "sigma_max": tail[0], "n": len(tail) - 1}
    assert "n" not in webui_sampler_kwargs("DPM adaptive", sigmas, SIGMAS, 7)
    euler = webui_sampler_kwargs("Euler", sigmas, SIGMAS, 7, s_churn=0.5)
    assert euler == {"s_churn": 0.5, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0, "sigmas": sigmas}
    assert webui_sampler_kwargs("Euler a", sigmas, SIGMAS, 7, s_churn=0.5) == {"eta": 1.0, "sigmas": sigmas}
    assert webui_sampler_kwargs("DPM++ 2M", sigmas, SIGMAS, 7) == {"sigmas": sigmas}
    assert webui_sampler_kwargs("DPM++ 2M SDE Heun", sigmas, SIGMAS, 7)["solver_type"] == "heun"
    assert "solver_type" not in webui_sampler_kwargs("DPM++ 2M SDE", sigmas, SIGMAS, 7)


def test_errors_name_the_argument_and_the_choices():
    with pytest.raises(ValueError, match=r"sampler: .*'Euler b'.*Euler a"):
        find_k_sampler("Euler b")
    with pytest.raises(ValueError, match=r"scheduler: .*'Karas'.*Karras"):
        webui_sigmas("Karas", 5, SIGMAS)
    with pytest.raises(ValueError, match="steps"):
        webui_sigmas("Karras", 0, SIGMAS)
    sigmas = webui_sigmas("Karras", 3, SIGMAS)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="noise_sampler"):
        k_samplers.sample_euler_ancestral(_ours(), x, sigmas, {"cond": COND}, disable=True)
    with pytest.raises(ValueError, match="solver_type"):
        k_samplers.sample_dpmpp_2m_sde(_ours(), x, sigmas, {"cond": COND}, solver_type="rk4")


def test_report_worst_error():
    """Prints the worst relative error over the sampler tests that ran before (pytest -s shows it)."""
    if WORST:
        key = max(WORST, key=WORST.get)
        print(f"worst relative error vs k-diffusion: {WORST[key]:.2e} at {key}")
