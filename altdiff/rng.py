"""Random draws. Two layouts: diffusers' `randn_tensor` (the diffusers family: same generator, same image) and
the AUTOMATIC1111 webui's (modules/rng.py, rng_philox.py): one generator per image seeded from its seed, from
one of three sources, variation seeds slerped in, ENSD re-seeding, and the SDE samplers' Brownian noise as
k-diffusion's BrownianTreeNoiseSampler gives it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Generator = torch.Generator | list[torch.Generator] | None
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# The webui's "Random number generator source" option: GPU (its default), CPU, NV (CUDA's randn anywhere).
SOURCES = ("GPU", "CPU", "NV")


def randn_tensor(shape: tuple[int, ...], generator: Generator = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal noise of `shape`. A CPU generator draws on the CPU and the result moves to `device`
    (reproducible across devices); a list of generators draws one batch item from each."""
    device = torch.device(device or "cpu")
    rand_device = device
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, list) else generator).device.type
        if gen_type != device.type:
            if gen_type != "cpu":
                raise ValueError(f"generator: cannot draw a {device.type} tensor from a {gen_type} generator; "
                                 "use a CPU generator or one on the target device")
            rand_device = torch.device("cpu")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        one = (1,) + tuple(shape[1:])
        draws = [torch.randn(one, generator=generator[i], device=rand_device, dtype=dtype) for i in range(shape[0])]
        return torch.cat(draws, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


# --- NV: Philox4x32-10 and the webui's Box-Muller -----------------------------------------------------------

_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
# rng_philox.py's constants are float32 values; its uint32 * float32 products promote to float64.
_TWO_POW32_INV = float(torch.tensor(2.3283064e-10, dtype=torch.float32))
_TWO_POW32_INV_2PI = float(torch.tensor(2.3283064e-10 * 6.2831855, dtype=torch.float32))


def _mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * m (uint32 values in int64), split in 16-bit halves so nothing overflows."""
    q = a * (m >> 16)  # < 2**48
    r = a * (m & 0xFFFF) + ((q & 0xFFFF) << 16)  # < 2**49
    return (q >> 16) + (r >> 32), r & _MASK32


def philox4x32_10(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32 with 10 rounds (Salmon et al. 2011, Random123's layout) over int64 tensors of uint32 values:
    counter (4, N), key (2, N) -> (4, N)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for i in range(10):
        if i:
            k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M[0])
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack([c0, c1, c2, c3])


class PhiloxGenerator:
    """The webui's NV source (rng_philox.Generator): element j of draw number `offset` is Box-Muller over
    Philox4x32-10 with counter (offset, 0, j, 0) and key = the seed's two 32-bit halves; only the first
    Box-Muller output is kept. Drawn on the CPU in float64 as the webui's numpy code does, then float32."""

    def __init__(self, seed: int):
        self.seed = int(seed) % 2**64
        self.offset = 0

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        n = 1
        for size in shape:
            n *= int(size)
        counter = torch.zeros(4, n, dtype=torch.int64)
        counter[0] = self.offset % 2**32
        counter[2] = torch.arange(n, dtype=torch.int64)
        self.offset += 1
        key = torch.tensor([[self.seed & _MASK32], [self.seed >> 32]], dtype=torch.int64).expand(2, n)
        bits = philox4x32_10(counter, key).to(torch.float64)
        u = bits[0] * _TWO_POW32_INV + _TWO_POW32_INV / 2
        v = bits[1] * _TWO_POW32_INV_2PI + _TWO_POW32_INV_2PI / 2
        return (torch.sqrt(-2.0 * torch.log(u)) * torch.sin(v)).to(torch.float32).reshape(tuple(shape))


# --- the webui's per-image noise ----------------------------------------------------------------------------

WebuiGenerator = torch.Generator | PhiloxGenerator


def _check_source(source: str) -> str:
    if source not in SOURCES:
        raise ValueError(f"rng: expected one of {', '.join(SOURCES)}, got {source!r}")
    return source


def _draw_device(source: str, device: torch.device) -> torch.device:
    # The webui draws "GPU" noise on its device except on MPS, where it falls back to the CPU.
    return device if source == "GPU" and device.type != "mps" else torch.device("cpu")


def create_generator(seed: int, source: str = "GPU", device: torch.device | str = "cpu") -> WebuiGenerator:
    """modules/rng.py create_generator: a generator seeded with `seed` for the source on `device`."""
    if _check_source(source) == "NV":
        return PhiloxGenerator(seed)
    return torch.Generator(_draw_device(source, torch.device(device))).manual_seed(int(seed))


def draw(generator: WebuiGenerator, shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """The generator's next standard normal float32 tensor of `shape`, on `device`."""
    if isinstance(generator, PhiloxGenerator):
        return generator.randn(shape).to(device)
    return torch.randn(tuple(shape), device=generator.device, generator=generator).to(device)


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """modules/rng.py's slerp, as the webui runs it on one image's (C, H, W) noise: normalised over dim 1,
    falling back to its (reversed) lerp when the noises are nearly parallel."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return ((torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low
            + (torch.sin(val * omega) / so).unsqueeze(1) * high)


class ImageRNG:
    """modules/rng.py ImageRNG: one generator per image. `first()` is the starting noise (B, *shape): each
    image's seed noise, slerped toward its subseed's noise by `subseed_strength`, and with
    seed_resize_from_h/w the noise of that size pasted centred into this one; after it every generator is
    re-seeded with seed + eta_noise_seed_delta when that is not 0. `next()` is the noise later steps draw
    (ancestral, SDE, DDIM eta): `first()` on the first call, then one draw per image from its generator."""

    def __init__(self, shape: Sequence[int], seeds: Sequence[int], subseeds: Sequence[int] | None = None,
                 subseed_strength: float = 0.0, source: str = "GPU", device: torch.device | str = "cpu",
                 eta_noise_seed_delta: int = 0, seed_resize_from_h: int = 0, seed_resize_from_w: int = 0):
        if len(shape) != 3:
            raise ValueError(f"shape: expected one image's (channels, height, width), got {tuple(shape)}")
        if not seeds:
            raise ValueError("seeds: expected one seed per image, got none")
        self.shape = tuple(int(s) for s in shape)
        self.seeds = [int(s) for s in seeds]
        self.subseeds = None if subseeds is None else [int(s) for s in subseeds]
        self.subseed_strength = float(subseed_strength)
        self.source = _check_source(source)
        self.device = torch.device(device)
        self.eta_noise_seed_delta = int(eta_noise_seed_delta or 0)
        self.seed_resize_from_h = int(seed_resize_from_h or 0)
        self.seed_resize_from_w = int(seed_resize_from_w or 0)
        self.generators = [self._generator(s) for s in self.seeds]
        self.is_first = True

    def _generator(self, seed: int) -> WebuiGenerator:
        return create_generator(seed, self.source, self.device)

    def _fresh(self, seed: int, shape: Sequence[int]) -> torch.Tensor:
        return draw(self._generator(seed), shape, self.device)

    def first(self) -> torch.Tensor:
        resized = self.seed_resize_from_h > 0 and self.seed_resize_from_w > 0
        noise_shape = (self.shape[0], self.seed_resize_from_h // 8, self.seed_resize_from_w // 8) if resized \
            else self.shape
        xs = []
        for i, (seed, generator) in enumerate(zip(self.seeds, self.generators)):
            subnoise = None
            if self.subseeds is not None and self.subseed_strength != 0:
                subseed = self.subseeds[i] if i < len(self.subseeds) else 0
                subnoise = self._fresh(subseed, noise_shape)
            noise = self._fresh(seed, noise_shape) if noise_shape != self.shape \
                else draw(generator, self.shape, self.device)
            if subnoise is not None:
                noise = slerp(self.subseed_strength, noise, subnoise)
            if noise_shape != self.shape:
                noise = _paste_centred(noise, draw(generator, self.shape, self.device))
            xs.append(noise)
        if self.eta_noise_seed_delta:
            self.generators = [self._generator(s + self.eta_noise_seed_delta) for s in self.seeds]
        return torch.stack(xs)

    def next(self) -> torch.Tensor:
        if self.is_first:
            self.is_first = False
            return self.first()
        return torch.stack([draw(g, self.shape, self.device) for g in self.generators])


def _paste_centred(noise: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`noise` (C, h, w) centred on `x` (C, H, W), cropped where larger (ImageRNG.first's seed resize)."""
    dx, dy = (x.shape[2] - noise.shape[2]) // 2, (x.shape[1] - noise.shape[1]) // 2
    w = noise.shape[2] if dx >= 0 else noise.shape[2] + 2 * dx
    h = noise.shape[1] if dy >= 0 else noise.shape[1] + 2 * dy
    tx, ty, sx, sy = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
    x[:, ty:ty + h, tx:tx + w] = noise[:, sy:sy + h, sx:sx + w]
    return x


def rng_noise_sampler(rng: ImageRNG) -> NoiseSampler:
    """A k-diffusion noise sampler drawing from `rng.next()`: the webui's TorchHijack, which routes its
    samplers' torch.randn_like to the ImageRNG."""
    return lambda sigma, sigma_next: rng.next()


# --- Brownian noise for the SDE samplers --------------------------------------------------------------------

def _torchsde():
    try:
        import torchsde
    except ImportError as e:
        raise ImportError("the webui's SDE samplers need torchsde: pip install 'altdiff[webui]'") from e
    return torchsde


class BrownianTreeNoise:
    """k-diffusion's BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=seeds), as the webui makes it for
    DPM++ SDE and the 2M/3M SDE samplers: one torchsde Brownian tree per image with its seed as entropy, so an
    image's noise does not depend on its batch. Called with (sigma, sigma_next) it returns the Brownian
    increment over that interval divided by its standard deviation."""

    def __init__(self, x: torch.Tensor, sigma_min: float | torch.Tensor, sigma_max: float | torch.Tensor,
                 seeds: Sequence[int]):
        if len(seeds) != x.shape[0]:
            raise ValueError(f"seeds: expected one per image ({x.shape[0]}), got {len(seeds)}")
        torchsde = _torchsde()
        t0, t1, self.sign = _sorted(torch.as_tensor(sigma_min), torch.as_tensor(sigma_max))
        w0 = torch.zeros_like(x[0])
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=int(s)) for s in seeds]

    def __call__(self, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float) -> torch.Tensor:
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        a, b, sign = _sorted(t0, t1)
        w = torch.stack([tree(a, b) for tree in self.trees]) * (self.sign * sign)
        return w / (t1 - t0).abs().sqrt()


def _sorted(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    return (a, b, 1) if a < b else (b, a, -1)
