"""Mixture-of-experts calibration from scratch, on a small random Qwen3-MoE with Qwen3-30B-A3B's expert layout."""

import pytest
import torch

from quantlesson import LessonError
from quantlesson.scratch import moe


def random_qwen3_moe(vocab_size: int = 128, **extra):
    """Qwen3-30B-A3B routes each token to 8 of 128 experts; the same here, with tiny widths and a random router."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=128, num_experts_per_tok=8,
        max_position_embeddings=512, **extra,
    )
    model = Qwen3MoeForCausalLM(config).eval()
    for block in moe.moe_blocks(model):  # a trained router is far from zero; transformers initialises it to zeros
        block.gate.weight.data.normal_(0, 1)
    return model


@pytest.fixture(scope="module")
def tiny_moe():
    return random_qwen3_moe()


def test_route_picks_the_same_experts_and_weights_as_transformers_router(tiny_moe):
    gate = moe.moe_blocks(tiny_moe)[0].gate
    x = torch.randn(50, 64)
    _, their_weights, their_experts = gate(x)
    experts, weights = moe.route(x, gate.weight, gate.top_k, gate.norm_topk_prob)
    assert torch.equal(experts, their_experts)
    assert torch.allclose(weights, their_weights)


def test_every_token_reaches_top_k_experts_and_all_experts_sees_every_token(tiny_moe):
    ids = torch.randint(0, 128, (1, 40))
    counts = moe.expert_token_counts(moe.expert_inputs(tiny_moe, ids))
    assert counts.shape == (2, 128)
    assert torch.equal(counts.sum(1), torch.tensor([40 * 8, 40 * 8]))  # each of 40 tokens goes to 8 experts
    everyone = moe.expert_token_counts(moe.expert_inputs(tiny_moe, ids, all_experts=True))
    assert torch.all(everyone == 40)


def test_an_expert_with_fewer_tokens_than_the_hidden_size_has_a_singular_hessian(tiny_moe):
    inputs = moe.expert_inputs(tiny_moe, torch.randint(0, 128, (1, 40)))
    for x in inputs[0]:
        rank = torch.linalg.matrix_rank(moe.hessian(x)).item() if x.shape[0] else 0
        assert rank <= min(x.shape[0], 64)


def test_coverage_warns_or_raises_with_what_to_do(tiny_moe):
    counts = moe.expert_token_counts(moe.expert_inputs(tiny_moe, torch.randint(0, 128, (1, 40))))
    with pytest.warns(UserWarning, match="moe_calibrate_all_experts"):
        starved = moe.check_coverage(counts, minimum=64)
    assert starved and all(n < 64 for *_, n in starved)
    with pytest.raises(LessonError, match="more and more varied calibration text"):
        moe.check_coverage(counts, minimum=64, strict=True)
    assert moe.check_coverage(torch.full((2, 128), 100), minimum=64) == []


def test_a_dense_model_is_a_clear_error(tiny_llama):
    with pytest.raises(LessonError, match="no mixture-of-experts layers"):
        moe.moe_blocks(tiny_llama)


def test_gptq_from_tokens_is_gptq_on_that_hessian_and_beats_rtn_on_the_tokens_it_saw():
    from quantlesson.scratch import gptq, rtn

    torch.manual_seed(0)
    W, X = torch.randn(32, 64), torch.randn(500, 64) * torch.linspace(0.1, 3, 64)  # uneven input channels
    ours = moe.gptq_from_tokens(W, X, bits=4, group_size=32)
    codes, scale, zero = gptq.gptq(W, moe.hessian(X), 4, 32, symmetric=True)
    assert torch.equal(torch.round(rtn.grouped(ours, 32) / scale[..., None]).to(torch.int8).reshape(W.shape), codes)  # dequantized codes
    assert moe.output_error(W, ours, X) < moe.output_error(W, rtn.fake_quantize(W, 4, 32), X)
    assert moe.output_error(W, W, X) == 0


def test_gptq_from_no_tokens_says_what_to_do():
    with pytest.raises(LessonError, match="all_experts=True"):
        moe.gptq_from_tokens(torch.randn(8, 32), torch.zeros(0, 32))


def test_llmcompressor_calibration_feeds_each_expert_the_tokens_ours_does(tiny_moe):
    """llm-compressor linearizes the experts (one nn.Linear each) and, under moe_calibrate_all_experts, runs every
    token through every expert: each expert's GPTQ hooks see the tokens moe.expert_inputs gives, routed or
    all-experts (the same count and Hessian; the order differs, which a Hessian does not see)."""
    import copy

    from llmcompressor.modeling.moe.context import moe_calibration_context
    from llmcompressor.modeling.moe.linearize import linearize_moe

    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    library = linearize_moe(copy.deepcopy(tiny_moe))
    seen: dict[tuple[int, int], torch.Tensor] = {}
    experts = [m for m in library.modules() if type(m).__name__ == "LinearExperts2D"]
    assert len(experts) == 2
    for layer, module in enumerate(experts):
        for index in range(module.num_experts):  # the list holds the experts, then the activation
            expert = module[index]
            expert.up_proj.register_forward_pre_hook(
                lambda _, args, key=(layer, index): seen.__setitem__(key, args[0].reshape(-1, args[0].shape[-1])))

    for all_experts in (False, True):
        seen.clear()
        with torch.no_grad(), (moe_calibration_context() if all_experts else torch.enable_grad()):
            logits = library(ids).logits
        ours = moe.expert_inputs(tiny_moe, ids, all_experts=all_experts)
        for (layer, index), x in seen.items():  # the same tokens (in another order): the same count and Hessian
            assert x.shape == ours[layer][index].shape
            assert torch.allclose(moe.hessian(x.detach()), moe.hessian(ours[layer][index]), atol=1e-5)
        assert {key for key, x in seen.items() if len(x)} == {
            (layer, index) for layer in range(2) for index in range(128) if len(ours[layer][index])}
        with torch.no_grad():
            assert torch.allclose(logits, tiny_moe(ids).logits, atol=1e-5)  # the outputs never change


def test_llama_cpp_imatrix_counts_the_tokens_each_expert_saw_as_we_do(embedded, tmp_path):
    """llama-imatrix keeps, per expert tensor, a `.counts` tensor: one count per expert, one more per routed token.
    On a random Qwen3-MoE converted to GGUF (float32), over the chunks llama-imatrix reads, it equals
    moe.expert_token_counts up to near-ties: llama.cpp sums in its own order, so a token whose 8th and 9th
    expert scores almost tie can go either way (and the difference grows a little after the first layer)."""
    import gguf
    import numpy as np

    from quantlesson import data, llamacpp

    _, tokenizer = embedded
    model = random_qwen3_moe(len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    converted = llamacpp.convert(tmp_path / "hf", tmp_path / "moe.gguf", outtype="f32", pre_tokenizer="gpt-2")
    text = data.embedded_text("calibration")[:20_000]  # the text that ships with Python: no hub needed
    (tmp_path / "calibration.txt").write_text(text)
    chunks, length = 4, 256
    imatrix = llamacpp.importance_matrix(converted, tmp_path / "calibration.txt", tmp_path / "imatrix.gguf",
                                         context=length, chunks=chunks, threads=1)  # fmt: skip
    reader = gguf.GGUFReader(str(imatrix))
    theirs = torch.stack([
        torch.from_numpy(next(t for t in reader.tensors if t.name == f"blk.{layer}.ffn_up_exps.weight.counts").data.ravel().astype(np.int64))
        for layer in range(2)
    ])  # fmt: skip

    ids = torch.tensor(tokenizer(text).input_ids[: chunks * length]).view(chunks, length)  # the chunks llama-imatrix reads
    ours = moe.expert_token_counts(moe.expert_inputs(model, ids))
    assert theirs.shape == ours.shape == (2, 128)
    assert torch.equal(theirs.sum(1), ours.sum(1))  # every token counted once per expert it went to: 4 x 256 x 8
    moved = (theirs - ours).abs().sum(1) / 2  # routing decisions that went to another expert
    assert moved[0] <= 0.001 * ours[0].sum() and moved[1] <= 0.005 * ours[1].sum(), moved
