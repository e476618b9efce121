"""Data parallelism beyond the process group: each process's share of a global batch, and the sums,
gathers and gradient averages that make N processes train like one process on the whole batch.

Under torchrun every process holds the whole model and the same list of prompts (or rows). A
global batch is cut into contiguous shares, one per process in rank order; each process samples
and computes the loss on its share; one all-reduce averages the gradients before the optimizer
step. Whatever is a statistic of the global batch (PPO's whitened advantages, a mean over all
completion tokens, a held-out accuracy) is summed over processes first, so it comes out the same
for any number of processes. Without torchrun (one process) every function is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..common import DistInfo


def share(n_items: int, info: DistInfo) -> range:
    """The global indices of this process's share of n_items: contiguous, in rank order, sizes
    differing by at most one (exactly n_items / world_size each when it divides)."""
    return range(info.rank * n_items // info.world_size, (info.rank + 1) * n_items // info.world_size)


def gather(items: list, info: DistInfo) -> list:
    """Every process's list (any picklable items), concatenated in rank order, on every process."""
    if not info.enabled:
        return list(items)
    lists: list = [None] * info.world_size
    dist.all_gather_object(lists, items)
    return [item for part in lists for item in part]


def sum_over_processes(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The element-wise sum of `values` over all processes (a new tensor; the input is untouched)."""
    total = values.clone()
    if info.enabled:
        dist.all_reduce(total)
    return total


def count_totals(counts: list[float], info: DistInfo, device) -> list[float]:
    """Sums of a few counts (right answers, examples, tokens) over all processes, in float64: on the GPU that
    nccl reduces on, else on the CPU (gloo's; MPS has no float64)."""
    where = device if torch.device(device).type == "cuda" else "cpu"
    return sum_over_processes(torch.tensor(counts, dtype=torch.float64, device=where), info).tolist()


def mean_over_processes(metrics: dict[str, float], info: DistInfo, device) -> dict[str, float]:
    """Each logged number averaged over processes (every process must log the same keys)."""
    if not info.enabled or not metrics:
        return metrics
    totals = count_totals(list(metrics.values()), info, device)
    return {k: v / info.world_size for k, v in zip(metrics, totals)}


def share_of_global_mean(local_count: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """What scales a process's mean over its items into its part of the global mean.

    A loss averaged over the valid tokens of the global batch is sum(all tokens) / n_global. A
    process holds some of the tokens; since the gradients are averaged over processes, its loss
    must be its sum / (n_global / world_size). Multiply the process's own mean (sum / n_local) by
    n_local / (n_global / world_size), the factor returned here (1 with one process)."""
    per_process = sum_over_processes(local_count.detach().float(), info) / info.world_size
    return local_count.detach().float() / per_process.clamp(min=1e-9)


def average_gradients(model: torch.nn.Module, info: DistInfo) -> None:
    """Average the gradients over processes with one all-reduce of all of them, flattened.

    Every process runs the same code on the same model, so the same parameters have gradients;
    an objective may call the model (or its parts) any number of times per step."""
    if not info.enabled:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world_size
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def barrier(info: DistInfo) -> None:
    """Wait for every process: after this, what rank 0 wrote before it is there for all to read."""
    if info.enabled:
        dist.barrier()
