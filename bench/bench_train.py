"""Training throughput: our GPT against Hugging Face's `LlamaForCausalLM` of the same shape, in one run.

    python bench/bench_train.py [--threads 2,1] [--rounds 15] [--preset small]

For each thread count, four contestants train the same model (the `small` preset: 6 layers,
d_model 256, vocab 4096) on the same batch (16 x 256 tokens) from the same initial weights, each
step a forward, a backward and the training loop's AdamW step (fused) under the training's autocast
(`--dtype auto`, as the stages: bf16 where the CPU multiplies it in hardware, else fp32): ours
and Hugging Face's (attending with its default, PyTorch's SDPA), each eager and under
`torch.compile`. They take turns, a few steps each per round (the last one timed: the first ones
refill the caches the others emptied), so a load that comes and goes on a shared machine hits all
of them alike; the figures are medians over the rounds, and the ratios medians of the per-round
ratios. MFU is against the matmul peak in that dtype of the model's own shapes, measured in every round too
(the peak under the load that round saw). The process keeps the memory a step frees, as the training stages do
(`keep_freed_memory`; `--return-freed-memory` measures glibc's default instead), for every contestant alike.
Compilation starts from an empty cache (a fresh TORCHINDUCTOR_CACHE_DIR), as on a new machine: its time is the
first step's.

Targets (issue 14): ours >= 2x HF eager, ours compiled >= 1.2x HF compiled, MFU >= 25%.
Writes bench/out/train.json; the load average before and after each thread count is in it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from rich.table import Table

from pocketgpt.common import atomic_write_json, autocast, compute_dtype, console, keep_freed_memory, provenance
from pocketgpt.interop.hf import to_hf_config
from pocketgpt.model import GPT, preset
from pocketgpt.train.loop import TrainConfig, make_optimizer
from pocketgpt.train.throughput import matmul_peak, matmul_shapes

CONTESTANTS = ["ours", "hf", "ours compiled", "hf compiled"]


def make_step(name: str, args, x: torch.Tensor, y: torch.Tensor):
    """One contestant: a function that runs one training step and returns its loss."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = GPT(preset(args.preset, vocab_size=args.vocab, max_seq_len=args.seq_len))
    if name.startswith("hf"):
        ours = model
        model = LlamaForCausalLM(to_hf_config(ours.cfg))
        model.load_state_dict(ours.state_dict(), strict=False)
        model.tie_weights()
        labels = torch.cat([x[:, :1], y], 1)[:, :-1]  # HF shifts labels by one itself: this makes them y
        loss_fn = lambda m: m(input_ids=x, labels=labels).loss  # noqa: E731
    else:
        loss_fn = lambda m: m(x, targets=y)  # noqa: E731
    model.train()
    optimizer = make_optimizer(model, TrainConfig(lr=1e-4))  # the training loop's AdamW, for both
    wrapped = torch.compile(model) if name.endswith("compiled") else model

    def step() -> float:
        with autocast(torch.device("cpu"), args.dtype):
            loss = loss_fn(wrapped)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step


def contest(args, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch._dynamo.reset()  # compile afresh for this thread count
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g)
    y = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g)
    tokens = args.batch * args.seq_len
    reference = GPT(preset(args.preset, vocab_size=args.vocab, max_seq_len=args.seq_len))
    flops_per_token = reference.flops_per_token(args.seq_len)
    shapes = matmul_shapes(reference, tokens)
    load_before = os.getloadavg()

    steps, first = {}, {}
    for name in CONTESTANTS:
        console.print(f"[dim]{threads} thread(s): warming up {name}...[/]")
        steps[name] = make_step(name, args, x, y)
        t0 = time.perf_counter()
        loss = steps[name]()
        first[name] = {"first_step_s": time.perf_counter() - t0, "first_loss": loss}
        steps[name]()

    times: dict[str, list[float]] = {name: [] for name in CONTESTANTS}
    peaks = []
    for _ in range(args.rounds):
        peaks.append(matmul_peak(shapes, "cpu", threads, args.dtype, seconds=0.5))  # this round's
        for name in CONTESTANTS:
            for _ in range(args.steps_per_turn - 1):
                steps[name]()
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)

    def median_ratio(slow: str, fast: str) -> float:
        return statistics.median(a / b for a, b in zip(times[slow], times[fast]))

    contestants = {}
    for name in CONTESTANTS:
        step_s = statistics.median(times[name])
        contestants[name] = {
            "tokens_per_s": tokens / step_s, "step_s": step_s,
            "mfu": statistics.median(flops_per_token * tokens / t / p for t, p in zip(times[name], peaks)),
            **first[name],
            "compile_s": first[name]["first_step_s"] - step_s if name.endswith("compiled") else 0.0,
        }
    return {
        "threads": threads, "dtype": args.dtype, "rounds": args.rounds, "steps_per_turn": args.steps_per_turn, "tokens_per_step": tokens, "flops_per_token": flops_per_token,
        "peak_flops_median": statistics.median(peaks), "peak_flops_max": max(peaks),
        "load_before": load_before, "load_after": os.getloadavg(),
        "contestants": contestants,
        "ratios": {
            "ours / hf, eager": median_ratio("hf", "ours"),
            "ours / hf, compiled": median_ratio("hf compiled", "ours compiled"),
            "ours compiled / hf eager": median_ratio("hf", "ours compiled"),
            "ours compiled / ours eager": median_ratio("ours", "ours compiled"),
            "hf compiled / hf eager": median_ratio("hf", "hf compiled"),
        },
        # Same weights, same batch: the first losses agree to rounding, or the race is not fair.
        "first_loss_gap": max(abs(first[a]["first_loss"] - first["ours"]["first_loss"]) for a in CONTESTANTS),
    }


def targets(result: dict) -> dict:
    r, c = result["ratios"], result["contestants"]
    return {"ours >= 2x hf eager (eager)": r["ours / hf, eager"] >= 2,
            "ours >= 2x hf eager (compiled)": r["ours compiled / hf eager"] >= 2,
            "ours >= 1.2x hf compiled": r["ours / hf, compiled"] >= 1.2,
            "mfu >= 25% (compiled)": c["ours compiled"]["mfu"] >= 0.25}


def show(result: dict) -> None:
    load = ", ".join(f"{a:.1f}" for a in result["load_before"]) + " -> " + \
        ", ".join(f"{a:.1f}" for a in result["load_after"])
    table = Table(title=f"training, {result['threads']} thread(s): median of {result['rounds']} rounds; "
                        f"load {load}; {result['dtype']} matmul peak {result['peak_flops_median'] / 1e9:.0f} GFLOP/s")
    for col in ("contestant", "tokens/s", "step", "MFU", "first step (compile)", "first loss"):
        table.add_column(col, justify="left" if col == "contestant" else "right")
    for name, c in result["contestants"].items():
        table.add_row(name, f"{c['tokens_per_s']:,.0f}", f"{c['step_s'] * 1000:.0f} ms", f"{c['mfu']:.0%}",
                      f"{c['first_step_s']:.1f} s", f"{c['first_loss']:.4f}")
    console.print(table)
    ratios = Table(title="ratios (median of per-round ratios)")
    ratios.add_column("")
    ratios.add_column("speed-up", justify="right")
    for k, v in result["ratios"].items():
        ratios.add_row(k, f"{v:.2f}x")
    for k, ok in targets(result).items():
        ratios.add_row(f"target: {k}", "[green]met[/]" if ok else "[red]not met[/]")
    console.print(ratios)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="2,1", help="comma-separated thread counts, one contest each")
    p.add_argument("--preset", default="small")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps-per-turn", type=int, default=2, help="steps per contestant per round; the last is timed")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                   help="autocast dtype of every contestant (auto: bf16 where the CPU multiplies it in hardware)")
    p.add_argument("--return-freed-memory", action="store_true",
                   help="leave glibc's malloc at its defaults (freed blocks go back to the kernel: a page fault per page "
                        "a step writes again)")
    p.add_argument("--out", default="bench/out/train.json")
    args = p.parse_args()
    freed_memory_kept = not args.return_freed_memory and keep_freed_memory()
    args.dtype = compute_dtype(args.dtype, torch.device("cpu"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")

    import transformers

    report = {"preset": args.preset, "batch": args.batch, "seq_len": args.seq_len, "vocab": args.vocab,
              "transformers": transformers.__version__, "freed_memory_kept": freed_memory_kept, "measured": provenance(),
              "results": []}
    for threads in (int(t) for t in args.threads.split(",")):
        result = contest(args, threads)
        result["targets_met"] = targets(result)
        report["results"].append(result)
        show(result)
        atomic_write_json(args.out, report)
    console.print(f"written to {args.out}")


if __name__ == "__main__":
    main()
