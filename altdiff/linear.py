"""`nn.Linear` whose fp32 matrix product, in code compiled for an x86 CPU (`compile=True`), runs in oneDNN.

PyTorch sends a CPU fp32 linear to MKL's sgemm, in eager mode and in inductor's frozen graphs alike. On the
AMD EPYC (AVX-512) we benchmark on, oneDNN runs the UNet's, text encoder's and safety checker's shapes
1.6-2.4x faster (e.g. (8192, 320) x (320, 2560): 219 vs 139 GFLOP/s), and linears are half of a compiled
ToMe UNet step there. Same sums in another order, so outputs move by float rounding (~1e-6 relative): eager
code keeps `F.linear` and its bits (diffusers' and the webui's); compiled code, which inductor already
reorders, takes the faster kernel. bf16 already goes to oneDNN. oneDNN has no backward for this op, so the
switch holds only with autograd off (compiled modules run under inference mode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ONEDNN = torch.backends.mkldnn.is_available() and torch.backends.cpu.get_cpu_capability().startswith("AVX")


# A custom op, so that inductor calls it as it is: its freezing passes rewrite a bare oneDNN linear as if
# they had packed its weight themselves, and fail.
@torch.library.custom_op("altdiff::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@onednn_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (ONEDNN and torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == torch.float32
                and not torch.is_grad_enabled()):
            return onednn_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
