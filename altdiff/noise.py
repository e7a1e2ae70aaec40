"""Random draws laid out exactly as diffusers' `randn_tensor`, so the same generator gives the same image."""

from __future__ import annotations

import torch

Generator = torch.Generator | list[torch.Generator] | None


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
