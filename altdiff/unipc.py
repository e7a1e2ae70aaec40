"""UniPC (Zhao et al. 2023, unified predictor-corrector), as the webui 1.10 runs it: its timestep sampler
`unipc` (sd_samplers_timesteps_impl.py) over the UniPC module it ships (modules/models/diffusion/uni_pc),
multistep, data prediction, with the webui's default options: variant bh1 (bh2 also here), order 3, lower
order at the end, time-uniform steps.

The solver works in the continuous time of a discrete-time model: t in [1/N, 1] for the N = 1000 training
steps, log(alpha_t) linearly interpolated between the training steps, and the model called at
(t - 1/N) * 1000, a fractional timestep. `unipc` keeps the timestep samplers' contract (timestep_samplers.py):
`model(x, t, **extra_args) -> eps`, `timesteps` only counts the steps (and, for img2img, gives the start).
"""

from __future__ import annotations

import torch

from .k_samplers import Callback, Model

VARIANTS = ("bh1", "bh2")


class DiscreteSchedule:
    """NoiseScheduleVP('discrete'): log(alpha_t) = 0.5 * log(alphas_cumprod), piecewise linear in t."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.total_n = len(alphas_cumprod)
        self.t_array = torch.linspace(0.0, 1.0, self.total_n + 1)[1:].to(alphas_cumprod.device)
        self.log_alphas = 0.5 * torch.log(alphas_cumprod)

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        # the segment around t (the outermost one beyond the ends), as the webui's interpolate_fn picks it
        xp, yp = self.t_array, self.log_alphas
        i = torch.clamp(torch.searchsorted(xp, t.reshape(-1), right=True) - 1, 0, len(xp) - 2)
        x0, x1, y0, y1 = xp[i], xp[i + 1], yp[i], yp[i + 1]
        return y0 + (t.reshape(-1) - x0) * (y1 - y0) / (x1 - x0)

    def alpha_sigma_lambda(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        log_alpha = self.log_alpha(t)
        return torch.exp(log_alpha), torch.sqrt(1.0 - torch.exp(2.0 * log_alpha)), \
            log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))


def _bh_update(data_pred, schedule: DiscreteSchedule, x: torch.Tensor, model_prev: list[torch.Tensor],
               t_prev: list[torch.Tensor], t: torch.Tensor, order: int, variant: str, use_corrector: bool):
    """One UniPC step from t_prev[-1] to t (multistep_uni_pc_bh_update, data prediction): the UniP predictor
    and, with `use_corrector`, the UniC corrector from the model at the predicted point. Returns (x_t, the
    model's x0 at the predicted point or None)."""
    alpha_t, sigma_t, lambda_t = schedule.alpha_sigma_lambda(t)
    _, sigma_prev, lambda_prev = schedule.alpha_sigma_lambda(t_prev[-1])
    h = lambda_t - lambda_prev
    rks, d1s = [], []
    for i in range(1, order):
        rk = ((schedule.alpha_sigma_lambda(t_prev[-(i + 1)])[2] - lambda_prev) / h)[0]
        rks.append(rk)
        d1s.append((model_prev[-(i + 1)] - model_prev[-1]) / rk)
    rks.append(1.0)
    rks = torch.tensor(rks, device=x.device)

    hh = -h[0]
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    rows, b, factorial = [], [], 1
    for i in range(1, order + 1):
        rows.append(torch.pow(rks, i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r = torch.stack(rows)
    b = torch.tensor(b, device=x.device)

    d1 = torch.stack(d1s, dim=1) if d1s else None
    x_base = (sigma_t / sigma_prev)[:, None, None, None] * x - (alpha_t * h_phi_1)[:, None, None, None] * model_prev[-1]
    scale = (alpha_t * b_h)[:, None, None, None]
    x_t = x_base
    if d1 is not None:
        rhos_p = torch.tensor([0.5], device=x.device) if order == 2 else torch.linalg.solve(r[:-1, :-1], b[:-1])
        x_t = x_base - scale * torch.einsum("k,bkchw->bchw", rhos_p, d1)
    if not use_corrector:
        return x_t, None
    rhos_c = torch.tensor([0.5], device=x.device) if order == 1 else torch.linalg.solve(r, b)
    model_t = data_pred(x_t, t)
    correction = torch.einsum("k,bkchw->bchw", rhos_c[:-1], d1) if d1 is not None else 0
    return x_base - scale * (correction + rhos_c[-1] * (model_t - model_prev[-1])), model_t


@torch.no_grad()
def unipc(model: Model, x: torch.Tensor, timesteps: torch.Tensor, extra_args: dict | None = None,
          callback: Callback | None = None, disable: bool | None = None, *, alphas_cumprod: torch.Tensor,
          is_img2img: bool = False, variant: str = "bh1", order: int = 3,
          lower_order_final: bool = True) -> torch.Tensor:
    """The webui's UniPC: len(timesteps) steps from t = 1 (img2img: just above timesteps[-1]) down to 1/N.
    One model call per step (the corrector's call is the next step's model value), none after the last."""
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    extra_args = {} if extra_args is None else extra_args
    steps = len(timesteps)
    if steps < order:
        raise ValueError(f"num_inference_steps: UniPC of order {order} needs at least {order} steps, got {steps}")
    schedule = DiscreteSchedule(alphas_cumprod)
    t_0 = 1.0 / schedule.total_n
    t_start = timesteps[-1] / 1000 + t_0 if is_img2img else 1.0
    times = torch.linspace(float(t_start), t_0, steps + 1, device=x.device)
    s_in = x.new_ones([x.shape[0]])

    def data_pred(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = model(x, (t - t_0) * 1000.0, **extra_args)
        alpha_t, sigma_t, _ = schedule.alpha_sigma_lambda(t)
        return (x - sigma_t[:, None, None, None] * eps) / alpha_t[:, None, None, None]

    index = 0

    def after_update(x: torch.Tensor, model_x: torch.Tensor | None) -> None:
        nonlocal index
        if callback is not None:
            callback({'x': x, 'i': index, 'sigma': 0, 'sigma_hat': 0,
                      'denoised': x if model_x is None else model_x})
        index += 1

    t = times[0] * s_in
    model_prev, t_prev = [data_pred(x, t)], [t]
    for step in range(1, order):  # warm-up: orders 1, 2, ... with the corrector
        t = times[step] * s_in
        x, model_x = _bh_update(data_pred, schedule, x, model_prev, t_prev, t, step, variant, True)
        after_update(x, model_x)
        model_prev.append(model_x)
        t_prev.append(t)
    for step in range(order, steps + 1):
        t = times[step] * s_in
        step_order = min(order, steps + 1 - step) if lower_order_final else order
        x, model_x = _bh_update(data_pred, schedule, x, model_prev, t_prev, t, step_order, variant,
                                step != steps)  # no corrector (and no model call) after the last step
        after_update(x, model_x)
        model_prev, t_prev = model_prev[1:] + [model_x], t_prev[1:] + [t]
    return x

