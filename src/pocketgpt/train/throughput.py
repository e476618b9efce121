"""How fast training runs against how fast this machine multiplies matrices: MFU.

MFU, model FLOPs utilisation (PaLM, appendix B), is the FLOPs a step needs over the FLOPs the hardware
could have done in its time: FLOPs/token x tokens/s / peak FLOP/s. The peak is not a datasheet's: it
is measured on this machine, as the best rate of matmuls in the training's dtype (bf16 where the hardware
has it, else fp32) of the model's own shapes (a micro-batch of tokens times each weight matrix) in about
a second, when a stage starts (once per process) and again when it ends, the higher kept. On a CPU
shared with other work it is measured under the load the run sees, so the ratio stays meaningful when the
absolute figures are not.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from ..common import DistInfo

PEAK_ROWS = 4096  # more rows than this add nothing to a matmul's rate but time


def matmul_shapes(model: nn.Module, rows: int) -> tuple[tuple[int, int, int], ...]:
    """(rows, in, out) of every distinct weight matrix of the model's linear layers (nn.Linear, and LoRA's
    layers, which are not: without them a LoRA model's peak was its LM head's matmul alone)."""
    shapes = {(m.in_features, m.out_features) for m in model.modules()
              if isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int)}
    return tuple(sorted((min(rows, PEAK_ROWS), i, o) for i, o in shapes))


def matmul_peak(shapes: tuple[tuple[int, int, int], ...], device: str, threads: int, dtype: str,
                seconds: float = 1.0, repeats: int = 20) -> float:
    """FLOP/s: the best rate of `dtype` matmuls of `shapes` on `device`, `repeats` of each or about `seconds`
    in all, whichever comes first."""
    device_ = torch.device(device)

    def sync():
        if device_.type != "cpu":
            torch.accelerator.synchronize(device_)

    best = 0.0
    for rows, n_in, n_out in shapes:
        a = torch.randn(rows, n_in, dtype=getattr(torch, dtype), device=device_)
        b = torch.randn(n_in, n_out, dtype=getattr(torch, dtype), device=device_)
        a @ b  # warm-up: the first call picks and prepares a kernel
        deadline = time.perf_counter() + seconds / len(shapes)
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            a @ b
            sync()
            t1 = time.perf_counter()
            best = max(best, 2 * rows * n_in * n_out / (t1 - t0))
            if t1 > deadline:
                break
    return best


# (shapes, device, threads, dtype) -> the best peak this process measured (threads: the peak depends on them)
_best_peaks: dict[tuple, float] = {}


def measured_peak(model: nn.Module, rows: int, device: torch.device, dtype: str, again: bool = False) -> float:
    """This process's `dtype` matmul peak for `model`'s shapes with `rows` tokens a micro-step. `again`
    measures once more and keeps the higher: a shared CPU's speed drifts (several-fold here from one
    second to the next), and one slow second at the start put a stage's MFU above 100%."""
    key = (matmul_shapes(model, rows), str(device), torch.get_num_threads(), dtype)
    if again or key not in _best_peaks:
        _best_peaks[key] = max(_best_peaks.get(key, 0.0), matmul_peak(*key))
    return _best_peaks[key]


def mfu(flops_per_token: float, tokens_per_s: float, peak: float, dist: DistInfo = DistInfo()) -> float:
    """The fraction of the peak that training used; tokens/s counts every process, each with its own peak."""
    return flops_per_token * tokens_per_s / (peak * dist.world_size)
