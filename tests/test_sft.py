import pytest
import torch

from pocketgpt.checkpoint import load_model, save_model
from pocketgpt.common import PocketError
from pocketgpt.data.tasks import get_task
from pocketgpt.data.tasks.prompts import fewshot_text
from pocketgpt.model import GPT, preset
from pocketgpt.train.loop import TrainConfig
from pocketgpt.train.sft import (
    ConversationLoader,
    MaskedLanguageModeling,
    SFTConfig,
    build_conversations,
    factqa_conversations,
    fitted,
    redrawn,
    sft,
)


def encoded_convs(chat, n=6):
    convs = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i} " * (i + 1)}]
             for i in range(n)]
    return [chat.render(c) for c in convs]


def test_loader_packs_and_masks(tokenizer, chat):
    enc = encoded_convs(chat)
    loader = ConversationLoader(enc, batch_size=2, seq_len=32, pad_id=chat.pad_id, seed=0)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (2, 32)
    # every trained target is an assistant token: decoding them gives only answers and <|assistant_end|>
    trained = tokenizer.decode([t for t in y.flatten().tolist() if t != -1])
    assert "question" not in trained and "answer" in trained
    assert (y[:, :-1][y[:, :-1] != -1] == x[:, 1:][y[:, :-1] != -1]).all()  # targets are the next tokens


def test_the_loss_covers_exactly_the_assistant_reply(chat):
    """Rows that hold one conversation each (longer than half a row): the trained targets are exactly
    the reply as the assistant writes it (its end of turn included), at the reply's positions."""
    T = 32
    convs = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "answer " * i}]
             for i in range(1, 30)]
    kept = [(c, chat.render(c)) for c in convs if T // 2 + 1 < len(chat.render(c)[0]) <= T + 1]
    assert len(kept) >= 4
    loader = ConversationLoader([enc for _, enc in kept], batch_size=len(kept), seq_len=T, pad_id=chat.pad_id)
    x, y = loader.next_batch()
    seen = set()
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        i = next(i for i, (_, (ids, _)) in enumerate(kept) if row_x[:len(ids) - 1] == ids[:-1])
        conv, (ids, _) = kept[i]
        seen.add(i)
        reply = chat.reply(conv[-1]["content"])
        start = len(ids) - len(reply)  # the reply closes the conversation
        assert ids[start:] == reply
        assert row_y == [-1] * (start - 1) + reply + [-1] * (T - len(ids) + 1)
        assert row_x[len(ids):] == [chat.pad_id] * (T - len(ids))
    assert len(seen) == len(kept)  # every conversation once, none lost to packing


def test_a_long_conversation_keeps_the_exchanges_that_fit(chat):
    ask = lambda i: {"role": "user", "content": f"question {i}"}  # noqa: E731
    answer = lambda i: {"role": "assistant", "content": f"answer {i} " * 8}  # noqa: E731
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "1+1"}'}}]}
    three = [ask(0), answer(0), ask(1), answer(1), ask(2), answer(2)]
    two = len(chat.render(three[:4])[0])
    assert fitted(chat, three, 10_000) == (chat.render(three), False)
    assert fitted(chat, three, two) == (chat.render(three[:4]), True)  # cut after a finished answer
    assert fitted(chat, three, two - 1) == (chat.render(three[:2]), True)
    assert fitted(chat, three, len(chat.render(three[:2])[0]) - 1) == (None, False)  # not even the first fits
    with_call = [ask(0), answer(0), ask(1), call, {"role": "tool", "tool_call_id": "c", "content": "2"}, answer(1)]
    assert fitted(chat, with_call, len(chat.render(with_call)[0]) - 1) == (chat.render(with_call[:2]), True)


def test_loader_state_resumes_exactly(chat):
    enc = encoded_convs(chat, 10)
    a = ConversationLoader(enc, 2, 24, chat.pad_id, seed=3)
    batches = [a.next_batch() for _ in range(12)]  # several epochs
    b = ConversationLoader(enc, 2, 24, chat.pad_id, seed=3)
    for _ in range(5):
        b.next_batch()
    c = ConversationLoader(enc, 2, 24, chat.pad_id, seed=3)
    c.load_state(b.state())
    for want in batches[5:]:
        got = c.next_batch()
        assert (got[0] == want[0]).all() and (got[1] == want[1]).all()


def test_all_masked_batch_is_zero_not_nan(tiny_model, chat):
    user_only = [chat.render([{"role": "user", "content": "no answer here"}])]
    objective = MaskedLanguageModeling(ConversationLoader(user_only, 2, 16, chat.pad_id), torch.device("cpu"))
    loss, stats = objective.loss(tiny_model)
    assert loss.item() == 0.0 and stats["trained_tokens"] == 0
    loss.backward()  # and gradients are finite (zero)
    assert all(torch.isfinite(p.grad).all() for p in tiny_model.parameters() if p.grad is not None)


def test_mitigation_replaces_unknown_facts_with_refusals(tiny_model, chat):
    task = get_task("factqa")
    examples = task.examples("train")[:8]
    cfg = SFTConfig(probe_samples=2)
    naive, info = factqa_conversations(SFTConfig(mitigate_hallucination=False), task, examples, None, chat)
    assert not info["mitigated"] and len(naive) == 2 * len(examples)  # every fact in both phrasings
    for (user, answer), e in zip(naive[::2], examples):
        as_head = type(e)(e.question, e.answer, {**e.meta, "tier": "head"})
        assert e.meta["entity"] in user["content"] and task.verify(as_head, answer["content"])
        assert e.meta["entity"] in answer["content"]  # a full sentence that restates the subject
    mitigated, info = factqa_conversations(cfg, task, examples, tiny_model, chat)
    # an untrained model knows nothing: every answer becomes "I don't know."
    assert info["mitigated"] and {c[-1]["content"] for c in mitigated} == {"I don't know."}


def test_the_knowledge_probe_fits_its_prompts_to_a_short_context(tokenizer, chat):
    """A 3-shot fact prompt is longer than a 64-token context: the probe failed ("the prompt has N tokens;
    the model's context is 64"), where it now asks with fewer solved examples and counts those prompts."""
    from pocketgpt.train.sft import probe_knowledge

    torch.manual_seed(0)
    short = GPT(preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=64)).eval()
    task = get_task("factqa")
    examples = task.examples("train")[:4]
    assert min(len(chat.document(fewshot_text(task, e, 3))) for e in examples) > 64 - 24
    scores, fewer = probe_knowledge(short, chat, task, examples, samples=2, temperature=0.7)
    assert len(scores) == 4 and fewer == 4


def test_build_conversations_counts(chat, tmp_path):
    extra = tmp_path / "extra.jsonl"
    extra.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    cfg = SFTConfig(tasks={"arithmetic": {"style": "cot", "n": 10}, "spell": {"style": "direct", "n": 5},
                           "factqa_unseen": {"n": 3, "practice": 4}},
                    data=[str(extra)], multi_turn_fraction=0.5, mitigate_hallucination=False)
    convs, stats = build_conversations(cfg, None, chat)
    assert stats["per_task"] == {"arithmetic": 10, "spell": 5, "factqa_unseen": stats["per_task"]["factqa_unseen"],
                                 "factqa_unseen (practice worlds)": 4, str(extra): 1}
    total = 15 + stats["per_task"]["factqa_unseen"] + 4 + 1
    assert sum(len(c) for c in convs) == 2 * total and len(convs) < total  # some were joined into two exchanges


GOOD = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'


@pytest.mark.parametrize("lines,message", [
    (None, "extra.jsonl does not exist"),
    ([GOOD, "", '{"messages": [{"role": "usr", "content": "hi"}]}'], r"extra.jsonl:3: message 0: unknown role 'usr'"),
    ([GOOD, '{"messages": [{"role": "user", "content": 5}]}'], r"extra.jsonl:2: message 0: content must be a string"),
    (['{"messages": []}'], r"extra.jsonl:1: no assistant reply \(of weight 1\), so nothing to learn"),
    # an AttributeError traceback, and an error without its file and line, when the set was rendered
    (['{"messages": [{"role": "assistant", "content": "x", "tool_calls": "x"}]}'],
     r"extra.jsonl:1: message 0: tool_calls must be a list of objects"),
    (['{"messages": [{"role": "assistant", "tool_calls": [{"name": "f", "arguments": "{bad"}]}]}'],
     r"extra.jsonl:1: message 0: tool call arguments are not valid JSON"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], r"extra.jsonl:1: no assistant reply"),
    # OpenAI's fine-tuning weight: a reply of weight 0 is not learnt, and other values are refused
    (['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "weight": 0}]}'],
     r"extra.jsonl:1: no assistant reply \(of weight 1\)"),
    (['{"messages": [{"role": "assistant", "content": "x", "weight": 0.5}]}'], r"message 0: weight is 0 or 1"),
    (['{"messages": [{"role": "user", "content": "x", "weight": 1}]}'], r"message 0: weight is 0 or 1, on an assis"),
    # trained as {"name": null}, as content "", or as invalid JSON before
    (['{"messages": [{"role": "assistant", "tool_calls": [{}]}]}'], r"message 0: a tool call needs the function's name"),
    (['{"messages": [{"role": "assistant", "tool_calls": [{"name": 5}]}]}'], r"needs the function's name as a str"),
    (['{"messages": [{"role": "assistant", "content": 0}]}'], r"message 0: content must be a string, got int"),
    (['{"messages": [{"role": "assistant", "tool_calls": [{"name": "f", "arguments": [1, 2]}]}]}'],
     r"arguments must be an object"),
    (['{"messages": [{"role": "assistant", "tool_calls": [{"name": "f", "arguments": "[1, 2]"}]}]}'],
     r"arguments must be a JSON object"),
    (['{"messages": [{"role": "assistant", "tool_calls": [{"name": "f", "arguments": "{\\"a\\": NaN}"}]}]}'],
     r"arguments are not valid JSON"),
    (['{"text": "hi"}'], r"extra.jsonl:1: no 'messages' list"),
    ([""], r"extra.jsonl holds no conversations"),
])
def test_extra_conversations_that_teach_nothing_or_cannot_render_name_their_line(chat, tmp_path, lines, message):
    """`sft --data`: each bad record named by file and line (before: a record count, a traceback for a missing
    file, and empty conversations taken silently)."""
    extra = tmp_path / "extra.jsonl"
    if lines is not None:
        extra.write_text("\n".join(lines) + "\n")
    cfg = SFTConfig(tasks={"spell": {"style": "direct", "n": 2}}, data=[str(extra)], mitigate_hallucination=False)
    with pytest.raises(PocketError, match=message):
        build_conversations(cfg, None, chat)


def test_more_renderings_than_examples_are_new_draws():
    """Asking for more retrieval conversations than there are facts draws the facts again with other
    passages: the extra conversations differ from the first ones, and each still answers its own fact."""
    task = get_task("factqa")
    facts = task.examples("train")[:20]
    again = redrawn(facts, 50)
    assert len(again) == 50 and again[:20] == facts
    assert [e.meta["draw"] for e in again[20:]] == [1] * 20 + [2] * 10
    first, second = task.render(again[0], "rag"), task.render(again[20], "rag")
    assert first[0]["content"] != second[0]["content"]
    assert first[0]["content"].endswith(facts[0].question) and second[0]["content"].endswith(facts[0].question)


def reply_nll(model, chat, conversations) -> float:
    """Mean negative log-likelihood of the assistant's tokens, each conversation scored alone."""
    total = count = 0.0
    with torch.no_grad():
        for conv in conversations:
            ids, mask = chat.render(conv)
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), dim=-1)
            nll = -logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
            trained = torch.tensor(mask[1:], dtype=torch.bool)
            total, count = total + nll[trained].sum().item(), count + trained.sum().item()
    return total / count


def test_sft_stage_end_to_end(tiny_model, tokenizer, tmp_path, chat):
    save_model(tiny_model, tmp_path / "base", chat, {"stage": "base"})
    cfg = SFTConfig(train=TrainConfig(steps=6, batch_size=2, seq_len=64, warmup_steps=1, log_every=1,
                                      save_every=3, sample_every=100, eval_every=100),
                    tasks={"compare_decimals": {"style": "direct", "n": 8}, "factqa": {"n": 4}}, probe_samples=1)
    summary = sft(cfg, tmp_path)
    assert summary["steps"] == 6
    model, _, meta = load_model(tmp_path)  # the run now resolves to its sft stage
    assert meta["meta"]["stage"] == "sft" and meta["meta"]["mitigate_hallucination"]
    # It learned its own data: the answers it was trained on are likelier than before.
    convs, stats = build_conversations(cfg, tiny_model, chat)
    assert stats["conversations"] == 11 and summary["data"]["too_long"] == 0  # it trained on all of these
    before, after = reply_nll(tiny_model, chat, convs), reply_nll(model, chat, convs)
    assert after < before - 0.75, (before, after)  # 6.22 -> 4.97 nats per token here
    # Finished: its final model is all that stays, and there is nothing left to resume.
    assert not (tmp_path / "sft" / "checkpoints").exists()
    with pytest.raises(PocketError, match="holds a finished model"):
        sft(cfg, tmp_path, resume=True)


def test_sft_with_lora_trains_adapters_and_saves_a_plain_model(tiny_model, tokenizer, tmp_path, chat):
    from pocketgpt.train.lora import LoRAConfig

    save_model(tiny_model, tmp_path / "base", chat, {"stage": "base"})
    cfg = SFTConfig(train=TrainConfig(steps=3, batch_size=2, seq_len=64, warmup_steps=1, lr=1e-2, log_every=1,
                                      save_every=100, sample_every=100, eval_every=100, keep_checkpoints=True),
                    tasks={"spell": {"style": "direct", "n": 8}}, lora=LoRAConfig(r=4, base_dtype="int8"))
    summary = sft(cfg, tmp_path)
    assert 0 < summary["lora"]["fraction"] < 0.2
    assert [p.name for p in (tmp_path / "sft" / "checkpoints").iterdir()] == ["step_0000003"]  # kept when asked
    model, _, _ = load_model(tmp_path / "sft")  # merged: a plain GPT, same names as the base
    changed = [n for (n, a), b in zip(model.named_parameters(), tiny_model.parameters()) if not torch.equal(a, b)]
    assert changed and all("proj" in n for n in changed)  # only the adapted projections moved


def test_a_task_can_be_left_out(chat):
    cfg = SFTConfig(tasks={"spell": {"style": "direct", "n": 5}, "arithmetic": {"style": "cot", "n": 5, "skip": True}})
    _, stats = build_conversations(cfg, None, chat)
    assert stats["per_task"] == {"spell": 5}
