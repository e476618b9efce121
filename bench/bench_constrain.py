"""The cost of constrained decoding per token, next to an unconstrained decoding step, in one run.

    python bench/bench_constrain.py [--run RUN] [--tokens 64]

A JSON-schema constraint is compiled (llguidance) and one output is generated under it at
temperature 1; then the mask computation + application (`GrammarProcessor`) is timed on every token
of that output, replayed from a fresh matcher, and compared with the time of one batch-1 decoding
step of the same model without a constraint. Also reported: building llguidance's tokenizer view
(once per model) and compiling the schema (once per schema, then cached).

Without --run, the imported SmolLM2 (its 49k vocabulary makes masks costlier than ours) is used.
Writes bench/out/constrain.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from pocketgpt.checkpoint import load_model
from pocketgpt.common import provenance
from pocketgpt.constrain import Constraints
from pocketgpt.engine import Engine, SamplingParams

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 8}},
    "required": ["name", "age", "tags"], "additionalProperties": False}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="run or model directory (default: SmolLM2 imported into a temp dir)")
    p.add_argument("--tokens", type=int, default=64, help="decode steps timed without a constraint")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/out/constrain.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    run = args.run
    if run is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from conftest import smollm2_path

        from pocketgpt.interop.importer import import_model

        run = Path(tmp.name) / "run"
        import_model(smollm2_path(), run)
    model, chat, _ = load_model(run)
    engine = Engine(model, chat.tokenizer)
    prompt = chat.prompt([{"role": "user", "content": "Describe a person as JSON."}])

    t0 = time.perf_counter()
    constraints = Constraints(chat, model.cfg.vocab_size)
    t_tokenizer = time.perf_counter() - t0
    t0 = time.perf_counter()
    constraint = constraints.json_schema(SCHEMA)
    t_compile = time.perf_counter() - t0

    params = SamplingParams(max_tokens=200, temperature=1.0, seed=0, stop_tokens=chat.stop_ids)
    seq = engine.submit(prompt, params, processor_factory=constraint.processor)[0]
    for _ in engine.run([seq]):
        pass
    output = seq.turn
    logits = torch.zeros(model.cfg.vocab_size)
    processor = constraint.processor()
    t0 = time.perf_counter()
    for i in range(len(output)):
        processor(output[:i], logits)
    per_mask = (time.perf_counter() - t0) / len(output)

    free = SamplingParams(max_tokens=args.tokens, temperature=0)
    engine.generate([prompt], free)  # warm-up
    t0 = time.perf_counter()
    n = len(engine.generate([prompt], free)[0].tokens)
    per_step = (time.perf_counter() - t0) / n

    report = {"run": str(args.run or "SmolLM2-135M-Instruct (imported)"), "vocab": model.cfg.vocab_size,
              "threads": args.threads, "tokenizer_view_s": t_tokenizer, "schema_compile_s": t_compile,
              "constrained_output": chat.tokenizer.decode(output), "output_tokens": len(output),
              "mask_ms_per_token": per_mask * 1e3, "decode_step_ms": per_step * 1e3,
              "mask_share_of_step": per_mask / per_step}
    print(json.dumps(report, indent=1, ensure_ascii=False))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    report["measured"] = provenance()
    Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    tmp.cleanup()


if __name__ == "__main__":
    main()
