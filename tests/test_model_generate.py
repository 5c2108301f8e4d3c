"""Generation: greedy decoding equals an argmax rollout of full forward passes, is deterministic,
honours stop tokens; sampling is seeded; the page allocator hands out and takes back pages."""
import jax.numpy as jnp
import numpy as np
import pytest

from jax_flashmla.models import deepseek as ds


def tiny_config(**kw):
    base = dict(vocab_size=89, hidden_size=48, intermediate_size=64, moe_intermediate_size=16,
                num_hidden_layers=2, num_attention_heads=4, n_routed_experts=8, n_group=2, topk_group=1,
                num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=24,
                qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, eos_token_id=None)
    base.update(kw)
    return ds.DeepseekConfig(**base)


@pytest.fixture(scope="module")
def model():
    return ds.DeepseekForCausalLM(tiny_config(), dtype=jnp.float32, init_std=0.3, seed=11)


PROMPTS = [[5, 17, 3, 44, 8], [60, 2], [7, 7, 21, 9, 30, 1, 12, 50, 3]]


def rollout(model, prompt, n, width=24):
    """Greedy continuation by full forward passes (right-padded to one width: causal, so the
    padding never reaches the real tokens, and one compile serves every step)."""
    ids = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, width), np.int32)
        padded[0, :len(ids)] = ids
        ids.append(int(np.argmax(np.asarray(model(padded))[0, len(ids) - 1])))
    return ids[len(prompt):]


def test_greedy_equals_forward_rollout(model):
    n = 6
    out = ds.generate(model, PROMPTS, n, kv_format="float32", block_size=4, return_output=True)
    assert out.tokens.shape == (3, n) and out.tokens.dtype == np.int32
    for i, p in enumerate(PROMPTS):
        assert out.tokens[i].tolist() == rollout(model, p, n), f"sequence {i}"
    assert out.decode_steps == n - 1 and (out.lengths == n).all()
    assert out.attention in ("kernel", "reference") and out.attention_detail
    assert out.tokens_per_second > 0 and out.prompt_tokens == sum(map(len, PROMPTS))


def test_greedy_is_deterministic_bf16(model):
    a = ds.generate(model, PROMPTS, 8, block_size=4)
    b = ds.generate(model, PROMPTS, 8, block_size=4)
    np.testing.assert_array_equal(a, b)
    # A [b, s] array with prompt_lengths is the same request as the list of lists.
    arr = np.zeros((3, 9), np.int32)
    for i, p in enumerate(PROMPTS):
        arr[i, :len(p)] = p
    c = ds.generate(model, arr, 8, block_size=4, prompt_lengths=[len(p) for p in PROMPTS])
    np.testing.assert_array_equal(a, c)


def test_stop_tokens(model):
    free_run = ds.generate(model, PROMPTS, 7, block_size=4)
    stop = int(free_run[0, 2])
    out = ds.generate(model, PROMPTS, 7, block_size=4, stop_tokens=[stop], pad_token_id=-1, return_output=True)
    for i in range(3):
        row = free_run[i].tolist()
        n = row.index(stop) + 1 if stop in row else 7
        assert out.lengths[i] == n
        assert out.tokens[i, :n].tolist() == row[:n]  # a stopped neighbour changes nothing
        assert (out.tokens[i, n:] == -1).all()


def test_sampling_seeded_and_top_p(model):
    a = ds.generate(model, PROMPTS, 6, temperature=1.5, seed=1, block_size=4)
    b = ds.generate(model, PROMPTS, 6, temperature=1.5, seed=1, block_size=4)
    c = ds.generate(model, PROMPTS, 6, temperature=1.5, seed=2, block_size=4)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    greedy = ds.generate(model, PROMPTS, 6, block_size=4)
    nucleus = ds.generate(model, PROMPTS, 6, temperature=1.0, top_p=1e-6, seed=3, block_size=4)
    np.testing.assert_array_equal(greedy, nucleus)  # top_p -> 0 keeps only the best token


def test_page_allocator():
    alloc = ds.PageAllocator(num_blocks=6, block_size=4, max_blocks_per_seq=3)
    assert alloc.ensure("a", 5) and alloc.pages("a") == [0, 1]
    assert not alloc.ensure("a", 8)
    assert alloc.ensure("b", 9) and alloc.pages("b") == [2, 3, 4]
    with pytest.raises(ds.OutOfPagesError, match="max_blocks_per_seq"):
        alloc.ensure("a", 13)
    with pytest.raises(ds.OutOfPagesError, match="only 1 of 6 free"):
        alloc.ensure("c", 12)
    table = alloc.block_table(["b", None, "a"])
    np.testing.assert_array_equal(table, [[2, 3, 4], [0, 0, 0], [0, 1, 0]])
    alloc.free("b")
    assert alloc.num_free == 4
    assert alloc.ensure("c", 12) and sorted(alloc.pages("c")) == [2, 3, 4]


def test_generation_out_of_pages(model):
    gen = ds.Generator(model, block_size=4)
    with pytest.raises(ds.OutOfPagesError, match="free"):
        gen.generate(PROMPTS, 8, num_blocks=5, progress=False)


def test_generate_bad_input(model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        ds.generate(model, PROMPTS, 0)
    with pytest.raises(ValueError, match="input_ids"):
        ds.generate(model, np.zeros((3,), np.int32), 4)
    with pytest.raises(ValueError, match="prompt_lengths"):
        ds.generate(model, np.zeros((2, 3), np.int32), 4, prompt_lengths=[3, 4])
    with pytest.raises(ValueError, match="kv_format"):
        ds.generate(model, PROMPTS, 4, kv_format="int4")
    with pytest.raises(ValueError, match="vocab"):
        ds.generate(model, [[1, 2, 500]], 4)
