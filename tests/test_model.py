from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch._functorch.aot_autograd import aot_module_simplified

import pocketgpt.model as model_module
from pocketgpt.common import PocketError
from pocketgpt.model import (
    GPT,
    PLAIN_ATTENTION_MAX_LEN,
    PRESETS,
    GPTConfig,
    _projections,
    causal_attention,
    decode_block,
    lm_head_cross_entropy,
    preset,
    smear,
)


def test_presets_build_and_count():
    for name in PRESETS:
        cfg = preset(name, vocab_size=512)
        assert cfg.d_ff % 64 == 0 and cfg.d_model % cfg.n_head == 0
    model = GPT(preset("tiny", vocab_size=512))
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.num_params(embeddings=False) == model.num_params() - 512 * 64
    assert model.flops_per_token(64) > 6 * model.num_params(embeddings=False)


def test_hugging_face_names():
    names = set(GPT(preset("tiny", vocab_size=512, tie_embeddings=False)).state_dict())
    for expected in ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                     "model.layers.1.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight",
                     "model.layers.0.post_attention_layernorm.weight", "model.norm.weight", "lm_head.weight"]:
        assert expected in names


def test_loss_at_init_is_near_uniform(tiny_model):
    x = torch.randint(0, 512, (2, 32))
    loss = tiny_model(x, targets=torch.randint(0, 512, (2, 32)))
    assert abs(loss.item() - torch.log(torch.tensor(512.0)).item()) < 0.5


def test_ignore_index_and_all_masked_is_not_nan(tiny_model):
    x = torch.randint(0, 512, (2, 16))
    y = x.clone()
    y[0] = -1
    assert torch.isfinite(tiny_model(x, targets=y))
    assert tiny_model(x, targets=torch.full_like(x, -1), reduction="sum").item() == 0.0


def test_causality(tiny_model):
    x = torch.randint(0, 512, (1, 20))
    y = x.clone()
    y[0, 10:] = torch.randint(0, 512, (10,))
    a, b = tiny_model(x), tiny_model(y)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_matches_hugging_face_llama(tiny_model):
    import transformers

    from pocketgpt.interop.hf import to_hf_config

    hf = transformers.LlamaForCausalLM(to_hf_config(tiny_model.cfg)).eval()
    hf.load_state_dict(tiny_model.state_dict(), strict=False)
    hf.tie_weights()
    x = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(x), hf(x).logits, atol=1e-4, rtol=1e-4)


def test_config_errors():
    with pytest.raises(PocketError, match="divisible"):
        GPTConfig(d_model=100, n_head=3)
    with pytest.raises(PocketError, match="n_kv_head"):
        GPTConfig(d_model=64, n_head=4, n_kv_head=3)
    with pytest.raises(PocketError, match="unknown model preset"):
        preset("huge")
    with pytest.raises(PocketError, match="unknown model config keys"):
        GPTConfig.from_dict({"n_layers": 3})


def test_too_long_sequence(tiny_model):
    with pytest.raises(PocketError, match="max_seq_len"):
        tiny_model(torch.zeros(1, tiny_model.cfg.max_seq_len + 1, dtype=torch.long))


def test_extending_the_context_keeps_the_first_positions_and_reads_longer_sequences(tiny_model):
    torch.manual_seed(0)
    model = GPT(replace(tiny_model.cfg))  # a copy: extending changes the config in place
    model.load_state_dict(tiny_model.state_dict())
    x = torch.randint(0, model.cfg.vocab_size, (1, 200))
    with pytest.raises(PocketError, match="exceeds max_seq_len=128"):
        model(x)
    before = model(x[:, :128])
    model.extend_context(256)
    assert model.cfg.max_seq_len == 256 and model.rope_cos.shape[0] == 256
    torch.testing.assert_close(model(x[:, :128]), before)  # the first 128 positions are unchanged
    assert model(x).shape == (1, 200, model.cfg.vocab_size)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_loss_and_gradients_equal_plain_cross_entropy(reduction):
    """The LM head's chunked cross-entropy (900 rows, vocab 4,096: chunks of 512 rows, some targets
    ignored) gives the plain cross-entropy's loss and gradients, to fp32 rounding."""
    torch.manual_seed(0)
    x = torch.randn(900, 32, requires_grad=True)
    weight = (torch.randn(4096, 32) * 0.3).requires_grad_()
    targets = torch.randint(0, 4096, (900,))
    targets[::7] = -1
    upstream = torch.randn(900) if reduction == "none" else torch.tensor(3.0)  # a non-trivial d(out)/d(loss)
    expected = F.cross_entropy(x @ weight.T, targets, ignore_index=-1, reduction=reduction)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (x, weight))
    got = lm_head_cross_entropy(x, weight, targets, reduction)
    got_grads = torch.autograd.grad((got * upstream).sum(), (x, weight))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(got_grads, expected_grads):  # elementwise, to fp32 rounding of the largest gradient
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6 * e.abs().max().item())


def test_chunked_loss_under_bf16_autocast_is_as_close_as_plain(tiny_model):
    """Under bf16 autocast both ways round; the chunked loss's gradients are no further from fp32's than
    the plain loss's are (a few tenths of a percent). 80 x 64 tokens make two chunks (of up to 4,096 rows)."""
    x = torch.randint(0, 512, (80, 65))
    params = [p for p in tiny_model.parameters()]

    def grads(loss_fn, bf16):
        tiny_model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn()
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in params])

    def plain():
        logits = tiny_model(x[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())

    exact_loss, exact = grads(plain, bf16=False)
    plain_loss, plain_grad = grads(plain, bf16=True)
    chunked_loss, chunked_grad = grads(lambda: tiny_model(x[:, :-1], targets=x[:, 1:]), bf16=True)
    torch.testing.assert_close(chunked_loss, exact_loss, rtol=2e-3, atol=0)
    plain_error, chunked_error = ((g - exact).norm() / exact.norm() for g in (plain_grad, chunked_grad))
    assert chunked_error < max(1.5 * plain_error, 1e-3)


def test_smeared_keys_mix_each_key_with_the_one_before():
    k = torch.randn(2, 3, 5, 4)
    own, previous, even = smear(k, torch.tensor([30.0, -30.0, 0.0]))[:, [0, 1, 2]].unbind(1)
    torch.testing.assert_close(own, k[:, 0])
    torch.testing.assert_close(previous[:, 1:], k[:, 1, :-1])
    assert previous[:, 0].abs().max() < 1e-10  # position 0 has nothing before it
    torch.testing.assert_close(even[:, 1:], (k[:, 2, 1:] + k[:, 2, :-1]) / 2)


def test_a_smeared_key_model_trains_its_shares_and_every_attention_path_agrees():
    """The plain attention, SDPA (a long sequence, or a mask from the lab) and the cache read the same keys."""
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=512, smear_keys=True, max_seq_len=2 * PLAIN_ATTENTION_MAX_LEN))
    x = torch.randint(0, 512, (2, 24))
    model(x[:, :-1], targets=x[:, 1:]).backward()
    shares = [block.self_attn.key_smear for block in model.model.layers]
    assert all(s.shape == (2,) and s.grad.abs().min() > 0 for s in shares)
    with torch.no_grad():
        for s in shares:
            s.normal_()
    plain = model(x)
    causal = torch.ones(24, 24, dtype=torch.bool).tril()[None, None].expand(2, 1, 24, 24)
    masked = model.lm_head(model.hidden_states(x, attn_masks={0: causal, 1: causal}))
    torch.testing.assert_close(masked, plain, rtol=1e-4, atol=1e-5)
    long = torch.randint(0, 512, (1, PLAIN_ATTENTION_MAX_LEN + 8))  # past the plain path's length: SDPA
    torch.testing.assert_close(model(long)[:, :24], model(long[:, :24]), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        for s in shares:
            s.fill_(30.0)  # every key its own: a plain Llama
    assert not torch.allclose(model(x), plain, atol=1e-3)  # so the shares do change the model


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_plain_causal_attention_equals_sdpa(n_kv_head):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 50, 16)
    k, v = torch.randn(2, n_kv_head, 50, 16), torch.randn(2, n_kv_head, 50, 16)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_kv_head != 4)
    torch.testing.assert_close(causal_attention(q, k, v), expected, rtol=1e-5, atol=1e-6)
    # the model's stored mask is larger than the sequence: its top-left corner is the one that applies
    stored = GPT(preset("tiny", vocab_size=64)).causal_bias
    assert stored.shape[0] > 50
    torch.testing.assert_close(causal_attention(q, k, v, stored), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_plain_causal_attention_has_sdpas_gradients_and_hands_dk_on_in_ks_layout(n_kv_head):
    """The backward of the scores (KeyScores) computes dk itself: the same gradients as SDPA's, with dk
    contiguous as k is (autograd's own rule hands on a transposed view, which compiled kernels read slowly)."""
    torch.manual_seed(0)
    inputs = [torch.randn(2, 4, 50, 16), torch.randn(2, n_kv_head, 50, 16), torch.randn(2, n_kv_head, 50, 16)]
    grad_out = torch.randn(2, 4, 50, 16)
    ours = [x.clone().requires_grad_() for x in inputs]
    theirs = [x.clone().requires_grad_() for x in inputs]
    dk_layout = []
    ours[1].register_hook(lambda g: dk_layout.append(g.is_contiguous()))
    causal_attention(*ours).backward(grad_out)
    F.scaled_dot_product_attention(*theirs, is_causal=True, enable_gqa=n_kv_head != 4).backward(grad_out)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    assert dk_layout == [True]


@pytest.mark.parametrize("bias", [False, True])
def test_compiled_projections_stack_their_weights_and_agree(bias):
    """In a compiled graph the projections that read one input become one matmul (one for the input's
    gradient too); outputs and gradients are those of the layers one by one, biases included."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(16, n, bias=bias) for n in (16, 8, 8)]
    x = torch.randn(3, 5, 16, requires_grad=True)

    def run(fn):
        outs = fn(x, *layers)
        sum((o * (i + 1)).sum() for i, o in enumerate(outs)).backward()
        grads = [x.grad.clone()] + [p.grad.clone() for layer in layers for p in layer.parameters()]
        x.grad = None
        for layer in layers:
            layer.zero_grad()
        return outs, grads

    eager_outs, eager_grads = run(_projections)
    graphs = []

    def count_mm(gm, inputs):
        graphs.append(sum(str(n.target) in ("aten.mm.default", "aten.addmm.default") for n in gm.graph.nodes))
        return make_boxed_func(gm)

    compiled_outs, compiled_grads = run(torch.compile(
        _projections, backend=lambda gm, inputs: aot_module_simplified(gm, inputs, fw_compiler=count_mm)))
    assert graphs == [1, 2]  # forward: one matmul for three layers; backward: one for x, one for the weights
    for a, b in zip(eager_outs + tuple(eager_grads), compiled_outs + tuple(compiled_grads), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_long_sequences_use_fused_attention_and_agree():
    """Past PLAIN_ATTENTION_MAX_LEN the model attends with SDPA; both paths give the same logits."""
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=512, max_seq_len=2 * PLAIN_ATTENTION_MAX_LEN)).eval()
    x = torch.randint(0, 512, (1, PLAIN_ATTENTION_MAX_LEN + 8))
    with torch.no_grad():
        long = model(x)
        short = model(x[:, :PLAIN_ATTENTION_MAX_LEN])
    torch.testing.assert_close(long[:, :PLAIN_ATTENTION_MAX_LEN], short, rtol=1e-4, atol=1e-4)


def test_a_folded_decode_graph_reads_many_rows_with_one_product_per_input():
    """The whole-step decode graph (weights folded in) at many rows makes one product per input the
    block reads, q/k/v stacked and gate/up stacked: 4 a block and the head, not 7 a block and the head."""
    from torch.profiler import ProfilerActivity, profile

    from pocketgpt.engine import Engine

    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=64)).eval()
    engine, rows = Engine(model, None, max_batch=8, compile=True), model_module.ROW_LINEAR_MAX_ROWS + 4
    engine.warmup()
    cache = model.make_cache(rows, 16)
    cache.lengths += 3
    ids = torch.zeros(rows, dtype=torch.long)
    with torch.inference_mode():
        engine._decode_step(ids, cache.lengths.clone(), cache.k, cache.v, 4)  # folds its constants at first run
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine._decode_step(ids, cache.lengths.clone(), cache.k, cache.v, 4)
    products = sum(e.count for e in prof.key_averages()
                   if e.key in ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise", "mkl::_mkl_linear"))
    assert products == 4 * model.cfg.n_layer + 1


@pytest.mark.parametrize("dtype", [
    torch.float32,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not model_module._ONEDNN_BF16,
                                                         reason="needs oneDNN with bf16 matmuls")),
])
def test_many_decode_rows_use_packed_weights_that_follow_the_weights(dtype):
    """A compiled decode block at many rows multiplies by weights packed once (packed_linear; gate and up
    stacked into one) when asked (a graph with its weights folded in leaves packing to inductor), and agrees
    with the eager block, also after a weight changed in place, the second of a stack (the pack is redone)."""
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=64)).to(dtype).eval()
    block, rows = model.model.layers[0], model_module.ROW_LINEAR_MAX_ROWS + 4
    positions = torch.arange(rows) + 2
    x, rope, mask = model.decode_inputs(torch.arange(rows), positions, int(positions.max()) + 1)
    compiled = torch.compile(decode_block, dynamic=True)

    def both():
        caches = [model.make_cache(rows, 16) for _ in range(2)]
        with torch.inference_mode():
            eager = decode_block(block, x, rope, mask, positions, caches[0].k[0], caches[0].v[0])
            fast = compiled(block, x, rope, mask, positions, caches[1].k[0], caches[1].v[0], packed=True)
        return eager.float(), fast.float()

    def off(a, b):  # relative distance: bf16 products in another order differ in the third digit
        return float((a - b).norm() / b.norm())

    cache = model.make_cache(rows, 16)
    with torch.inference_mode():
        compiled(block, x, rope, mask, positions, cache.k[0], cache.v[0])
    assert block.mlp.gate_proj.weight not in model_module._PACKED  # not asked for: no custom op, no second copy
    eager, fast = both()
    assert block.mlp.gate_proj.weight in model_module._PACKED
    assert off(fast, eager) < 0.02
    with torch.no_grad():
        block.mlp.up_proj.weight.mul_(-20)
    changed, fast_changed = both()
    assert off(changed, eager) > 0.2
    assert off(fast_changed, changed) < 0.02


def test_compiled_bf16_gradients_are_the_eager_ones():
    """`torch.compile` changes the kernels, not the gradients: one bf16 backward pass of a model with smeared
    keys (the speedrun trains compiled in bf16) gives every parameter the eager gradient up to bf16 rounding.
    A miscompiled kernel can break this silently; one does for a one-head model at one thread with GCC 12.2
    (DEVELOPERS.md, "Known issues"), which this model is not."""
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=512, smear_keys=True))
    ids = torch.randint(0, 512, (8, 65))

    def gradients(fn) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(ids[:, :-1], targets=ids[:, 1:])
        loss.backward()
        return {name: p.grad.float().clone() for name, p in model.named_parameters()}

    eager, compiled = gradients(model), gradients(torch.compile(model))
    for name, g in eager.items():
        assert torch.isfinite(compiled[name]).all(), name
        assert (compiled[name] - g).norm() <= 0.03 * g.norm(), name


def test_the_scalar_head_scores_in_fp32_under_bf16_autocast():
    """A reward rounded to bf16 ties pairs that fp32 tells apart: the head itself stays in fp32."""
    torch.manual_seed(0)
    rm = GPT(preset("tiny", vocab_size=512)).with_score_head()
    torch.nn.init.normal_(rm.score.weight)
    ids = torch.randint(0, 512, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = rm.scores(ids)
        hidden = rm.hidden_states(ids)
    expected = F.linear(hidden.float(), rm.score.weight, rm.score.bias).squeeze(-1)
    assert scores.dtype == torch.float32 and torch.equal(scores, expected)
    assert not torch.equal(scores, expected.bfloat16().float())
