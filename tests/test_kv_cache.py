"""FP8 byte layouts against the byte-by-byte oracle, round trips, token indexing, page writes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_flashmla import kv_cache as kvc
import oracle


def _tokens(rng, n, d):
    # Mixed magnitudes per tile so scales differ, including a tile below the 1e-4 floor.
    x = rng.standard_normal((n, d)) * rng.choice([1e-7, 0.01, 1.0, 30.0, 900.0], size=(n, 1))
    return x.astype(oracle.BF16)


def test_v32_bytes_match_oracle(rng):
    x = _tokens(rng, 9, 576)
    packed = np.asarray(kvc.quantize_fp8(jnp.asarray(x)))
    assert packed.shape == (9, 656) and packed.dtype == np.uint8
    for t in range(9):
        np.testing.assert_array_equal(packed[t], oracle.quantize_v32_token(x[t].astype(np.float64)))
    deq = np.asarray(kvc.dequantize_fp8(jnp.asarray(packed)), np.float64)
    for t in range(9):
        np.testing.assert_array_equal(deq[t], oracle.dequantize_v32_token(packed[t]))


def test_v4_block_bytes_match_oracle(rng):
    bs = 16
    x = _tokens(rng, 2 * bs, 512).reshape(2, bs, 1, 512)
    packed = np.asarray(kvc.quantize_fp8(jnp.asarray(x)))
    assert packed.shape == (2, bs, 1, 584)
    for blk in range(2):
        want = oracle.quantize_v4_block(x[blk, :, 0].astype(np.float64))
        np.testing.assert_array_equal(packed[blk].reshape(-1), want)
        deq = np.asarray(kvc.dequantize_fp8(jnp.asarray(packed)), np.float64)[blk, :, 0]
        np.testing.assert_array_equal(deq, oracle.dequantize_v4_block(want, bs))


@pytest.mark.parametrize("d", [576, 512])
def test_round_trip_error_is_fp8_sized(rng, d):
    x = rng.standard_normal((4, 64, 1, d)).astype(oracle.BF16)
    back = np.asarray(kvc.dequantize_fp8(kvc.quantize_fp8(jnp.asarray(x))), np.float64)
    x = x.astype(np.float64)
    nope = x.shape[-1] - 64
    np.testing.assert_array_equal(back[..., nope:], x[..., nope:])        # RoPE part is exact
    err = np.abs(back[..., :nope] - x[..., :nope]).max()
    # e4m3 spacing is 32 near 448 and the power-of-two scale is < 2 * amax / 448.
    assert 0 < err <= 16 * 2 * np.abs(x).max() / 448


def test_token_rows(rng):
    table = np.array([[4, 1, 9], [0, 2, 3]], np.int32)
    pos = np.array([[0, 17, 40, -1], [47, 5, 16, 48]], np.int32)
    rows = np.asarray(kvc.token_rows(jnp.asarray(table), jnp.asarray(pos), 16))
    np.testing.assert_array_equal(rows, [[64, 16 + 1, 144 + 8, -1], [48 + 15, 5, 32, -1]])


@pytest.mark.parametrize("kind", ["bf16", "fp8_v32", "fp8_v4"])
def test_write_tokens_inside_jit(rng, kind):
    d = {"bf16": 40, "fp8_v32": 576, "fp8_v4": 512}[kind]
    nb, bs = 6, 8
    cache_f = rng.standard_normal((nb, bs, 1, d)).astype(oracle.BF16)
    cache = jnp.asarray(cache_f) if kind == "bf16" else kvc.quantize_fp8(jnp.asarray(cache_f))
    table = np.array([[3, 0, 5], [1, 4, 2]], np.int32)
    pos = np.array([[0, 9, -1], [23, 7, 8]], np.int32)
    new = rng.standard_normal((2, 3, 1, d)).astype(oracle.BF16)
    out = jax.jit(kvc.write_tokens, donate_argnums=0)(cache, jnp.asarray(table), jnp.asarray(pos),
                                                      jnp.asarray(new))
    got = np.asarray(out if kind == "bf16" else kvc.dequantize_fp8(out), np.float64)
    before = np.asarray(jnp.asarray(cache_f) if kind == "bf16"
                        else kvc.dequantize_fp8(kvc.quantize_fp8(jnp.asarray(cache_f))), np.float64)
    want = before.copy()
    for i in range(2):
        for j in range(3):
            if pos[i, j] < 0:
                continue
            blk, off = table[i, pos[i, j] // bs], pos[i, j] % bs
            token = new[i, j, 0].astype(np.float64)
            if kind == "fp8_v32":
                token = oracle.dequantize_v32_token(oracle.quantize_v32_token(token))
            want[blk, off, 0] = token
    if kind == "fp8_v4":   # compare the written tokens through the oracle's block codec
        want_blocks = np.stack([oracle.dequantize_v4_block(oracle.quantize_v4_block(
            want[blk, :, 0]), bs) for blk in range(nb)])[:, :, None]
        want = want_blocks
    np.testing.assert_array_equal(got, want)


def test_errors():
    with pytest.raises(ValueError, match="576"):
        kvc.quantize_fp8(jnp.zeros((2, 100), jnp.bfloat16))
    with pytest.raises(TypeError, match="uint8"):
        kvc.dequantize_fp8(jnp.zeros((2, 656), jnp.bfloat16))
    with pytest.raises(ValueError, match="per block"):
        kvc.dequantize_fp8(jnp.zeros((2, 584), jnp.uint8))


@pytest.mark.parametrize("d_qk", [576, 512])
def test_float8_views_of_fp8_caches(rng, d_qk):
    """FlashMLA keeps FP8 caches as float8_e4m3fn views of the bytes: dequantize_fp8 reads such
    a view as the bytes, and write_tokens writes the layout into it and returns a view again,
    bit for bit the uint8 cache's result."""
    to_f8 = lambda c: jax.lax.bitcast_convert_type(c, jnp.float8_e4m3fn)  # noqa: E731
    cache = kvc.quantize_fp8(jnp.asarray(rng.standard_normal((3, 8, 1, d_qk)), jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(kvc.dequantize_fp8(to_f8(cache)), np.float32),
                                  np.asarray(kvc.dequantize_fp8(cache), np.float32))
    table = jnp.asarray([[2, 0], [1, -1]], jnp.int32)
    positions = jnp.asarray([[0, 9, -1], [3, 7, 8]], jnp.int32)
    new = jnp.asarray(rng.standard_normal((2, 3, 1, d_qk)), jnp.bfloat16)
    want = kvc.write_tokens(cache, table, positions, new)
    got = kvc.write_tokens(to_f8(cache), table, positions, new)
    assert got.dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(np.asarray(jax.lax.bitcast_convert_type(got, jnp.uint8)),
                                  np.asarray(want))
    assert not np.array_equal(np.asarray(want), np.asarray(cache))   # the write did something
