"""Foundation benchmarks: ours vs a peer, same machine, same run, reported as ratios.

    python bench/bench_foundation.py [--threads 2] [--preset small] [--only train,decode,sampling,tokenizer]

- training tokens/s: our GPT vs Hugging Face `LlamaForCausalLM` of the same shape, bf16 autocast,
  forward + backward + AdamW step, same batch, same threads;
- decode tokens/s at batch 1 (200 new tokens, greedy): our Engine, eager and compiled, vs HF `generate`
  on identical weights;
- batched sampling tokens/s (RL's and the reward model's: many rows at temperature 1, the weights changing
  between calls): our Engine eager, compiled with the weights folded in, and compiled reading them as inputs
  (`fold_weights=False`, what the RL stages use), vs HF `generate` of the same batch;
- tokenizer: BPE training time, rustbpe (ours) vs HF tokenizers; encode MB/s, tiktoken (ours) vs HF.

Needs `pip install -e '.[bench]'`. Run it on an idle machine: the numbers are only comparable within one run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pocketgpt.chat import PocketTemplate
from pocketgpt.common import provenance
from pocketgpt.data.sources import SourceSpec, read_documents
from pocketgpt.engine import Engine, SamplingParams
from pocketgpt.interop.hf import to_hf_config
from pocketgpt.model import GPT, preset
from pocketgpt.tokenizer import GPT4_SPLIT_PATTERN, BPETokenizer, Tokenizer


def timed(fn, repeat: int) -> float:
    """Best-of-`repeat` wall time of fn() (the minimum is the least noisy estimate)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def make_pair(name: str, vocab: int, seq_len: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    ours = GPT(preset(name, vocab_size=vocab, max_seq_len=max(seq_len, 512)))
    hf = LlamaForCausalLM(to_hf_config(ours.cfg))
    hf.load_state_dict(ours.state_dict(), strict=False)
    hf.tie_weights()
    return ours, hf


def bench_train(args) -> dict:
    ours, hf = make_pair(args.preset, args.vocab, args.seq_len)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len))
    y = torch.randint(0, args.vocab, (args.batch, args.seq_len))

    def step_fn(model, loss_fn):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            for _ in range(args.train_steps):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = loss_fn(model)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        return step

    run_ours = step_fn(ours.train(), lambda m: m(x, targets=y))
    run_hf = step_fn(hf.train(), lambda m: m(input_ids=x, labels=torch.cat([x[:, :1], y], 1)[:, :-1]).loss)
    run_ours(), run_hf()  # warm-up
    tokens = args.batch * args.seq_len * args.train_steps
    t_ours, t_hf = timed(run_ours, args.repeat), timed(run_hf, args.repeat)
    return {"params": ours.num_params(), "tokens_per_s_ours": tokens / t_ours, "tokens_per_s_hf": tokens / t_hf,
            "speedup": t_hf / t_ours}


def bench_decode(args, tok: Tokenizer) -> dict:
    """Batch-1 greedy decoding of the same weights: our engine, eager and with the compiled decode step
    (`Engine(compile=True)`, warmed up first: compiling is a one-off cost, reported apart), against
    transformers' `generate`."""
    ours, hf = make_pair(args.preset, tok.vocab_size, 512)
    ours.eval(), hf.eval()
    prompt = PocketTemplate(tok).document("def main():\n    ")
    n = args.new_tokens
    params = SamplingParams(max_tokens=n, temperature=0)
    ids = torch.tensor([prompt])
    results = {}
    for dtype in ("float32", "bfloat16"):
        o, h = ours.to(getattr(torch, dtype)), hf.to(getattr(torch, dtype))
        engines = {"eager": Engine(o, tok), "compiled": Engine(o, tok, compile=True)}

        def run_ours(engine):
            out = engine.generate([prompt], params)[0]
            assert len(out.tokens) == n
            return out.tokens

        def run_hf():
            with torch.inference_mode():
                out = h.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            assert out.shape[1] == len(prompt) + n
            return out[0, len(prompt):].tolist()

        t0 = time.perf_counter()
        run_ours(engines["compiled"])
        compile_s = time.perf_counter() - t0
        run_ours(engines["eager"]), run_hf()
        t_hf = timed(run_hf, args.repeat)
        row = {"tokens_per_s_hf": n / t_hf, "compile_seconds": compile_s}
        for name, engine in engines.items():
            t = timed(lambda e=engine: run_ours(e), args.repeat)
            row[f"tokens_per_s_{name}"] = n / t
            row[f"speedup_{name}"] = t_hf / t
        # same weights, same greedy decoding: the tokens must agree (fp32 only; bf16 rounding differs)
        if dtype == "float32":
            hf_tokens = run_hf()
            for name, engine in engines.items():
                same = sum(a == b for a, b in zip(run_ours(engine), hf_tokens))
                results[f"greedy_tokens_agree_{name}"] = f"{same}/{n}"
        results[dtype] = row
    return results


def bench_sampling(args, tok: Tokenizer) -> dict:
    """`--rows` sequences of `--new-tokens` sampled at temperature 1 from prompts of 40 tokens, all at once, the
    same weights in bf16 (where the hardware makes it faster: what RL samples with) or fp32: our engine eager at 32 rows
    (the RL stages' sampler before it compiled) and at `--rows`, compiled both ways (the compile, a one-off, is
    reported apart), and transformers' `generate` of the whole batch. Every sequence runs to its length."""
    from pocketgpt.common import bf16_is_faster

    ours, hf = make_pair(args.preset, tok.vocab_size, 512)
    ours.eval(), hf.eval()
    dtype = getattr(torch, "bfloat16" if bf16_is_faster(torch.device("cpu")) else "float32")
    ours, hf = ours.to(dtype), hf.to(dtype)
    n, rows = args.new_tokens, args.rows
    prompts = torch.randint(0, tok.vocab_size, (rows, 40), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_tokens=n, temperature=1.0, seed=0)
    engines = {"eager_32_rows": Engine(ours, tok, max_batch=32), "eager": Engine(ours, tok, max_batch=rows),
               "compiled_folded": Engine(ours, tok, max_batch=rows, compile=True),
               "compiled_weights_as_inputs": Engine(ours, tok, max_batch=rows, compile=True, fold_weights=False)}

    def run_ours(engine):
        outs = engine.generate(prompts.tolist(), params)
        assert all(len(o.tokens) == n for o in outs)

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(prompts, max_new_tokens=n, min_new_tokens=n, do_sample=True, top_k=0, pad_token_id=0)
        assert out.shape == (rows, 40 + n)

    result = {"dtype": str(dtype).removeprefix("torch."), "rows": rows, "new_tokens": n}
    for name, engine in engines.items():
        if engine.compiled:
            result[f"compile_seconds_{name}"] = engine.warmup()
    run_hf()  # warm-up
    t_hf = timed(run_hf, args.repeat)
    result["tokens_per_s_hf"] = rows * n / t_hf
    for name, engine in engines.items():
        run_ours(engine)
        t = timed(lambda e=engine: run_ours(e), args.repeat)
        result[f"tokens_per_s_{name}"] = rows * n / t
        result[f"speedup_{name}"] = t_hf / t
    return result


def bench_tokenizer(args, texts: list[str]) -> dict:
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    size = sum(len(t.encode()) for t in texts)

    def train_ours():
        return BPETokenizer.train(texts, args.vocab)

    def train_hf():
        t = HFTokenizer(models.BPE())
        t.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(GPT4_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        t.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=args.vocab, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        t.train_from_iterator(texts, trainer)
        return t

    t_train_ours, t_train_hf = timed(train_ours, 2), timed(train_hf, 2)
    ours, hf = train_ours(), train_hf()
    t_enc_ours = timed(lambda: ours.encode_batch(texts, threads=args.threads), 3)
    t_enc_hf = timed(lambda: hf.encode_batch(texts), 3)
    n_ours = sum(len(ids) for ids in ours.encode_batch(texts))
    n_hf = sum(len(e.ids) for e in hf.encode_batch(texts))
    return {"corpus_mb": size / 1e6, "train_s_ours": t_train_ours, "train_s_hf": t_train_hf,
            "train_speedup": t_train_hf / t_train_ours,
            "encode_mb_s_ours": size / 1e6 / t_enc_ours, "encode_mb_s_hf": size / 1e6 / t_enc_hf,
            "encode_speedup": t_enc_hf / t_enc_ours, "tokens_ours": n_ours, "tokens_hf": n_hf}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--preset", default="small")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--rows", type=int, default=64, help="sampling: sequences sampled at once")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--corpus-mb", type=float, default=8.0)
    p.add_argument("--only", default="train,decode,sampling,tokenizer")
    p.add_argument("--out", default="bench/out/foundation.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    texts = read_documents(SourceSpec("docs", "docs")) + read_documents(
        SourceSpec("code", "code", max_bytes=int(args.corpus_mb * 1e6)))
    report = {"threads": args.threads, "preset": args.preset, "torch": torch.__version__}
    only = set(args.only.split(","))
    if "tokenizer" in only:
        report["tokenizer"] = bench_tokenizer(args, texts)
        print("tokenizer", json.dumps(report["tokenizer"], indent=1))
    if "train" in only:
        report["train"] = bench_train(args)
        print("train", json.dumps(report["train"], indent=1))
    tok = BPETokenizer.train(texts[:200], args.vocab) if only & {"decode", "sampling"} else None
    if "decode" in only:
        report["decode"] = bench_decode(args, tok)
        print("decode", json.dumps(report["decode"], indent=1))
    if "sampling" in only:
        report["sampling"] = bench_sampling(args, tok)
        print("sampling", json.dumps(report["sampling"], indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    report["measured"] = provenance()
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
