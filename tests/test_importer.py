"""Importing Hugging Face folders: random small Llama and Qwen2 models built and saved in the test
import with the logits transformers computes; bad sources are refused, leaving RUN untouched."""

import json

import pytest
import torch

from pocketgpt.checkpoint import load_model
from pocketgpt.common import PocketError
from pocketgpt.interop.importer import default_system_prompt, import_model

transformers = pytest.importorskip("transformers")

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def save_hf_model(folder, hf_tokenizer, family: str, **overrides):
    """A random model of `family` with our small Hugging Face tokenizer, saved as transformers saves models."""
    common = dict(vocab_size=hf_tokenizer.vocab_size + 8, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
    if family == "llama":  # head_dim independent of hidden/heads, and Llama 3's long-context RoPE
        cfg = transformers.LlamaConfig(**common, head_dim=32, tie_word_embeddings=False, rope_theta=50000.0,
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 32}, **overrides)
        model = transformers.LlamaForCausalLM(cfg)
    else:  # q/k/v biases, tied embeddings
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1e6, **overrides)
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)  # random init leaves them 0: make them matter
    model.eval().save_pretrained(folder, max_shard_size="200KB")  # sharded, with an index
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=hf_tokenizer.hf, bos_token="<|im_start|>",
                                               eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML)
    tok.save_pretrained(folder)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_random_hf_models_import_with_equal_logits(tmp_path, hf_tokenizer, family):
    torch.manual_seed(0)
    hf = save_hf_model(tmp_path / "src", hf_tokenizer, family)
    assert (tmp_path / "src" / "model.safetensors.index.json").exists()
    summary = import_model(tmp_path / "src", tmp_path / "run")
    assert summary["family"] == family
    model, chat, cfg = load_model(tmp_path / "run")
    assert cfg["meta"]["stage"] == "imported" and chat.name == "chatml"
    assert chat.default_system == "You are a tiny test model."
    ids = torch.tensor([hf_tokenizer.encode("The return statement exits a function. 你好 🙂 " * 3)])
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ids.shape[1] > 40  # long enough for the llama3 RoPE scaling (original context 32) to matter
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_default_system_prompt_is_read_from_the_template():
    assert default_system_prompt(CHATML, None, None) == "You are a tiny test model."
    plain = CHATML.replace("{% if loop.first and messages[0]['role'] != 'system' %}", "{% if false %}")
    assert default_system_prompt(plain, None, None) is None


def test_bad_sources_are_refused_and_nothing_is_written(tmp_path, hf_tokenizer):
    src, run = tmp_path / "src", tmp_path / "run"
    torch.manual_seed(0)
    save_hf_model(src, hf_tokenizer, "llama")

    def refused(match):
        with pytest.raises(PocketError, match=match):
            import_model(src, run)
        assert not (run / "base").exists()

    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))  # shapes disagree with weights
    refused(r"config expects")
    (src / "config.json").write_text(json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    refused(r"architecture 'GPT2LMHeadModel' is not supported")
    (src / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    refused(r"hidden_act='gelu' is not supported")
    (src / "config.json").write_text(json.dumps({**config, "model_type": "mistral", "sliding_window": 64}))
    refused(r"sliding_window=64 is not supported")
    (src / "config.json").write_text("[1]")  # an AttributeError traceback
    refused(r"config.json: expected a JSON object, found list")
    # KeyError tracebacks before
    (src / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "num_attention_heads"}))
    refused(r"\(config\): no num_attention_heads \(the model's shape\)")
    (src / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "llama3"}, "rope_parameters": None}))
    refused(r"\(config\): rope_scaling of type 'llama3' needs factor \(a number > 0\), not None")
    (src / "config.json").write_text(json.dumps(config))
    (tmp_path / "afile").write_text("mine")  # a FileExistsError once the whole source had been read
    with pytest.raises(PocketError, match="afile is a file: import into a new run directory"):
        import_model(src, tmp_path / "afile")
    (src / "config.json").write_text(json.dumps(config))
    shard = sorted(src.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated
    refused(rf"{shard.name}: not a valid safetensors file")
    (src / "tokenizer.json").unlink()
    refused(r"has no tokenizer.json")
    with pytest.raises(PocketError, match="neither a Hugging Face folder nor a GGUF file"):
        import_model(config_path := src / "config.json", run)
    assert config_path.exists()


def test_import_refuses_an_existing_run(tmp_path, hf_tokenizer):
    torch.manual_seed(0)
    save_hf_model(tmp_path / "src", hf_tokenizer, "qwen2")
    import_model(tmp_path / "src", tmp_path / "run")
    with pytest.raises(PocketError, match="already exists"):
        import_model(tmp_path / "src", tmp_path / "run")
    with pytest.raises(PocketError, match="is already a pocketgpt model directory"):  # "architecture None" before
        import_model(tmp_path / "run" / "base", tmp_path / "other")
    with pytest.raises(PocketError, match="is a pocketgpt run \\(its base\\)"):  # "has no tokenizer.json" before
        import_model(tmp_path / "run", tmp_path / "other")
    (tmp_path / "ours" / "tokenizer").mkdir(parents=True)  # a run that trained a tokenizer of its own
    with pytest.raises(PocketError, match="holds a tokenizer of its own .* which the imported model would not use"):
        import_model(tmp_path / "src", tmp_path / "ours")
    assert not (tmp_path / "ours" / "base").exists()


# ----------------------------------------------------------------------------- the real model: SmolLM2


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory, smollm2_gguf):
    run = tmp_path_factory.mktemp("smollm2") / "run"
    import_model(smollm2_gguf, run)
    return run


@pytest.fixture(scope="module")
def smollm2(smollm2_run, smollm2_gguf):
    """SmolLM2-135M-Instruct imported by us, and the same file loaded by transformers (the oracle)."""
    ours, chat, _ = load_model(smollm2_run)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return ours, chat, theirs.eval(), tok


TEXT_MIX = ["The quick brown fox jumps over the lazy dog.", "小明有3个苹果，妈妈又给了他2个。", "def f(x):\n    return x ** 2  # 🙂",
            "1234567 + 89 = 1234656; 9.11 < 9.9", "a  \n\n   b\t\tc      d", "emoji: 👨‍👩‍👧 🇫🇷 ✨", "<|im_start|>user"]


def test_smollm2_logits_equal_transformers(smollm2):
    ours, chat, theirs, _ = smollm2
    for text in TEXT_MIX[:4]:
        ids = torch.tensor([chat.tokenizer.encode(text)])
        with torch.no_grad():
            a, b = ours(ids), theirs(ids).logits
        # Same dequantised weights, same fp32 arithmetic up to operation order: agreement to ~1e-4 of
        # logits whose spread is ~10-30.
        torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-4)
        assert (a[0, -1].argmax() == b[0, -1].argmax()).item()


def test_smollm2_token_ids_equal_transformers(smollm2):
    _, chat, _, tok = smollm2
    for text in TEXT_MIX[:-1]:
        assert chat.tokenizer.encode(text) == tok(text, add_special_tokens=False).input_ids, text
    # The one deliberate difference: transformers turns a special token's string in user text into
    # the special token; our encode keeps it text.
    assert tok(TEXT_MIX[-1], add_special_tokens=False).input_ids[0] == chat.tokenizer.special("<|im_start|>")
    assert chat.tokenizer.special("<|im_start|>") not in chat.tokenizer.encode(TEXT_MIX[-1])


def hf_chat_ids(tok, messages, **kwargs) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("system", [None, "You answer in one word."])
def test_smollm2_chatml_equals_apply_chat_template(smollm2, system):
    _, chat, _, tok = smollm2
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3 + 3?\n\nThink  twice."}, {"role": "assistant", "content": " 6 "}]
    if system:
        messages = [{"role": "system", "content": system}, *messages]
    assert chat.render(messages)[0] == hf_chat_ids(tok, messages)
    assert chat.prompt(messages[:-1]) == hf_chat_ids(tok, messages[:-1], add_generation_prompt=True)


def test_smollm2_answers_a_chat_question(smollm2):
    from pocketgpt.engine import Engine, SamplingParams

    ours, chat, _, _ = smollm2
    prompt = chat.prompt([{"role": "user", "content": "What is the capital of France?"}])
    out = Engine(ours, chat.tokenizer).generate([prompt], SamplingParams(max_tokens=30, temperature=0,
                                                                         stop_tokens=chat.stop_ids))[0]
    assert "Paris" in out.text and out.finish_reason == "stop"


def test_smollm2_decodes_from_its_4_and_8_bit_blocks_as_from_its_dense_weights(smollm2_run):
    """The compiled decode step reads the file's Q4_1 layers and Q8_0 head as stored (blocks.py): the
    same greedy reply as the dense weights."""
    from pocketgpt.blocks import fp32_norm_weight, has_blocks
    from pocketgpt.engine import Engine, SamplingParams

    dense, chat, cfg = load_model(smollm2_run)
    assert not any(has_blocks(m) for m in dense.modules())  # only for whoever asks: training must not see them
    model, _, _ = load_model(smollm2_run, blocks=True)
    layers = [m for m in model.modules() if has_blocks(m)]
    assert len(layers) == 7 * model.cfg.n_layer + 1  # every projection, and the head tied to the embedding
    assert sum(m.offset is None for m in layers) == 1 and has_blocks(model.lm_head)
    assert cfg["meta"]["summary"]["block_weights"] == {"4-bit": 7 * model.cfg.n_layer, "8-bit": 1}
    prompt = chat.prompt([{"role": "user", "content": "Name three colours."}])
    params = SamplingParams(max_tokens=24, temperature=0, stop_tokens=chat.stop_ids)
    expected = Engine(dense, chat.tokenizer).generate([prompt], params)[0].tokens
    assert Engine(model, chat.tokenizer, compile=True).generate([prompt], params)[0].tokens == expected
    # bf16: the cache and the prefill round to bf16, the products do not (its rows decode in fp32)
    bf16, _, _ = load_model(smollm2_run, dtype=torch.bfloat16, blocks=True)
    assert has_blocks(bf16.lm_head) and bf16.lm_head.weight.dtype == torch.bfloat16
    assert bf16.model.norm.weight_bits.dtype == torch.int32  # its fp32 rows' norm weight, kept through casts
    assert torch.equal(fp32_norm_weight(bf16.model.norm), bf16.model.norm.weight.float())
    assert Engine(bf16, chat.tokenizer, compile=True).generate([prompt], params)[0].tokens[:8] == expected[:8]


def test_info_says_which_weights_are_kept_for_decoding(smollm2_run, capsys, monkeypatch):
    from pocketgpt import cli

    monkeypatch.setattr(cli.console, "width", 200)  # one table row per line
    assert cli.main(["info", str(smollm2_run)]) == 0
    assert "its 4-bit (210) and 8-bit (1) weights kept as stored for decoding" in capsys.readouterr().out


def test_a_corrupt_or_missing_blocks_file_is_named(tmp_path, smollm2_run):
    import os
    import shutil

    broken = tmp_path / "base"
    broken.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        os.link(smollm2_run / "base" / name, broken / name)
    with pytest.raises(PocketError, match="blocks.safetensors, which is missing"):
        load_model(broken, blocks=True)
    shutil.copy(smollm2_run / "base" / "blocks.safetensors", broken / "blocks.safetensors")
    with open(broken / "blocks.safetensors", "r+b") as f:
        f.seek(-10, os.SEEK_END)
        f.write(b"\x00" * 10)
    with pytest.raises(PocketError, match="blocks.safetensors: weights do not match the hash"):
        load_model(broken, blocks=True)


def test_an_imported_model_goes_through_the_stages(tmp_path, hf_tokenizer):
    """An imported run is an ordinary run: LoRA SFT (on q/k/v with biases), eval, the reward model and GRPO."""
    from pocketgpt.data.tasks import get_task
    from pocketgpt.evaluate.harness import evaluate_task
    from pocketgpt.train.grpo import GRPOConfig, grpo
    from pocketgpt.train.loop import TrainConfig
    from pocketgpt.train.lora import LoRAConfig
    from pocketgpt.train.reward import RewardConfig, reward_model
    from pocketgpt.train.sft import SFTConfig, sft

    def train(steps):
        return TrainConfig(steps=steps, batch_size=2, seq_len=128, warmup_steps=0, lr=1e-3, log_every=1,
                           save_every=100, sample_every=10**9, eval_every=100, threads=1)

    torch.manual_seed(0)
    save_hf_model(tmp_path / "src", hf_tokenizer, "qwen2")
    import_model(tmp_path / "src", tmp_path)
    sft(SFTConfig(train=train(2), tasks={"compare_decimals": {"style": "cot", "n": 6}, "factqa": {"n": 2}},
                  probe_samples=1, lora=LoRAConfig(r=2)), tmp_path)
    model, chat, meta = load_model(tmp_path)
    assert meta["meta"]["stage"] == "sft" and chat.name == "chatml" and model.cfg.attention_bias
    result = evaluate_task(model, chat, get_task("compare_decimals"), n=4, shots=0, mode="chat", style="cot",
                           max_tokens=8, show_progress=False)
    assert result.n == 4
    prefs = tmp_path / "prefs.jsonl"  # a random model's samples all tie: rank given answers instead
    prefs.write_text("".join(json.dumps({"prompt": f"{i} + 1?", "chosen": str(i + 1), "rejected": str(i)}) + "\n"
                             for i in range(6)))
    reward_model(RewardConfig(train=train(2), data=[str(prefs)]), tmp_path)
    grpo(GRPOConfig(train=train(1), tasks=["compare_decimals"], prompts_per_task=4, prompts_per_step=2, group_size=2,
                    max_tokens=8, eval_n=2), tmp_path)
    assert load_model(tmp_path)[2]["meta"]["stage"] == "grpo"


def test_the_speedrun_of_an_imported_run_post_trains_the_imported_model(tmp_path, hf_tokenizer, capsys):
    """It trained a tokenizer of its own into the run, then stopped at pretraining ("delete RUN/base")."""
    from pocketgpt.cli import main

    torch.manual_seed(0)
    save_hf_model(tmp_path / "src", hf_tokenizer, "qwen2")
    run = tmp_path / "run"
    import_model(tmp_path / "src", run)
    imported = (run / "base" / "model.safetensors").read_bytes()
    shrink = ["sft_ablation=false", "sft.train.steps=2", "sft.train.batch_size=2", "sft.train.seq_len=128",
              "sft.probe_samples=1", "rm.train.steps=1", "rm.train.batch_size=2", "rm.prompts_per_task=1",
              "rm.val_prompts_per_task=1", "rm.k=2", "rm.max_tokens=4", "ppo.train.steps=1", "ppo.rollout_size=2",
              "ppo.train.batch_size=2", "ppo.max_tokens=4", "ppo.eval_prompts_per_task=1", "ppo.ptx_batch_size=1",
              "ppo.ptx_seq_len=32", "grpo.train.steps=1", "grpo.prompts_per_step=1", "grpo.group_size=2",
              "grpo.max_tokens=4", "grpo.eval_n=1", "eval.n=1"]
    shrink += [f"sft.tasks.{task}.n=2" for task in ("factqa", "arithmetic", "compare_decimals", "count_letter",
                                                     "spell", "game24", "multihop", "structured", "names")]
    assert main(["speedrun", "--quick", str(run), *(a for s in shrink for a in ("--set", s))]) == 0
    out = capsys.readouterr().err
    assert "the imported model's own, skipped" in out and "base: imported, skipped" in out
    assert not (run / "tokenizer").exists() and (run / "base" / "model.safetensors").read_bytes() == imported
    for stage in ("sft", "rm", "ppo", "grpo"):
        assert load_model(run / stage)[1].name == "chatml", stage  # the imported template all the way
    report = (run / "report.md").read_text()
    assert "| arithmetic |" in report and "Model: imported qwen2 (`src`)" in report
    assert "| base |  |  |  |  | imported from src |" in report  # it said 0s and 0 tokens of training
    assert main(["tokenizer", "train", str(run)]) == 2  # a tokenizer of its own would not be the model's
    assert "was imported (from" in capsys.readouterr().err and not (run / "tokenizer").exists()
