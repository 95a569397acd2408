"""Inverted dropout (spec §2.4) with masks that are cheap to draw on a CPU.

ATen's CPU `bernoulli_` draws one Mersenne-Twister number per element on one thread, a visible share
of a small model's CPU step. On the CPU the mask here comes from a counter-based generator instead: element i of a mask is kept when
the top 24 bits of splitmix64(seed + i) fall below (1 - p) 2^24, where `seed` is one draw from
torch's global generator. So masks follow `torch.manual_seed` and the RNG state a checkpoint
carries (resume is exact), and they are the same on any number of threads. On CUDA it is
`F.dropout` as before. The model's training forward and the CPU step use the same function, so the
two steps draw the same masks for a seed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def mask(like: Tensor, p: float) -> Tensor | None:
    """A mask shaped like `like`: 0 with probability p, else 1 / (1 - p); None when p = 0."""
    if p <= 0.0:
        return None
    if like.device.type != "cpu":
        return torch.empty_like(like).bernoulli_(1.0 - p).div_(1.0 - p)
    from gru4rec.jit import fill_mask, use_torch_threads

    use_torch_threads()
    seed = np.uint64(int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64)))
    out = torch.empty_like(like, memory_format=torch.contiguous_format)
    flat = out.numpy().reshape(-1)
    fill_mask(flat, seed, np.uint64(round((1.0 - p) * 2**24)), flat.dtype.type(1.0 / (1.0 - p)))
    return out


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """F.dropout(x, p, training), with the CPU's masks drawn by `mask`."""
    if not training or p <= 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    return x * mask(x, p)
