"""The paged KV cache: FP8 quantize / dequantize in the exact byte layouts, token-to-row indexing,
and writing new tokens into pages (a functional update, usable inside jit).

Layouts (../shared/SEMANTICS.md):
- bf16/fp16: ``[num_blocks, block_size, h_kv, d_qk]`` of q's dtype.
- FP8, DeepSeek-V3.2 (d_qk 576): uint8 ``[num_blocks, block_size, 1, 656]``, per token:
  512 float8_e4m3fn NoPE values (4 tiles of 128) | 4 float32 tile scales | 64 bfloat16 RoPE values.
- FP8, DeepSeek-V4 (d_qk 512): uint8 ``[num_blocks, block_size, 1, 584]`` whose bytes are laid out
  per *block*: block_size records of 576 bytes (448 float8_e4m3fn NoPE | 64 bfloat16 RoPE), then
  block_size records of 8 bytes (7 float8_e8m0fnu scales, one per 64 NoPE values, | 1 zero pad).
Scales are powers of two: 2 ** ceil(log2(max(amax / 448, 1e-4))) per tile.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

FP8_MAX = 448.0
SCALE_FLOOR = 1e-4


@dataclasses.dataclass(frozen=True)
class Fp8Layout:
    name: str
    d_qk: int          # dequantized width
    d_nope: int        # FP8 channels
    tile: int          # channels per scale
    token_bytes: int   # bytes per token in the cache's last axis

    @property
    def num_tiles(self) -> int:
        return self.d_nope // self.tile


V32 = Fp8Layout("V3.2", d_qk=576, d_nope=512, tile=128, token_bytes=656)
V4 = Fp8Layout("V4", d_qk=512, d_nope=448, tile=64, token_bytes=584)
_V4_RECORD = 576   # NoPE + RoPE bytes of one token in a V4 block
_V4_SCALES = 8     # scale bytes (7 + pad) of one token in a V4 block


def fp8_layout(*, d_qk: int | None = None, token_bytes: int | None = None) -> Fp8Layout:
    """The FP8 layout for a dequantized width (576 / 512) or a cache's last axis (656 / 584)."""
    for layout in (V32, V4):
        if d_qk == layout.d_qk or token_bytes == layout.token_bytes:
            return layout
    got = f"d_qk={d_qk}" if d_qk is not None else f"last axis {token_bytes} bytes"
    raise ValueError(f"no FP8 KV-cache layout for {got}: expected d_qk 576 (V3.2, 656-byte tokens) "
                     "or 512 (V4, 584-byte tokens)")


def _pow2_scale(amax):
    """2 ** ceil(log2(max(amax / 448, 1e-4))), exactly, and its exponent."""
    v = jnp.maximum(amax / FP8_MAX, SCALE_FLOOR)
    mantissa, exponent = jnp.frexp(v)            # v = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = jnp.where(mantissa == 0.5, exponent - 1, exponent)
    return jnp.ldexp(jnp.ones_like(v), exponent), exponent


def _to_bytes(x):
    """[..., n] of a k-byte dtype -> uint8 [..., n * k] (little-endian, as on the GPU)."""
    b = jax.lax.bitcast_convert_type(x, jnp.uint8)
    return b.reshape(*x.shape[:-1], -1) if b.ndim > x.ndim else b


def _from_bytes(b, dtype):
    width = jnp.dtype(dtype).itemsize
    if width == 1:
        return jax.lax.bitcast_convert_type(b, dtype)
    return jax.lax.bitcast_convert_type(b.reshape(*b.shape[:-1], -1, width), dtype)


def _quantize_tokens(x, layout: Fp8Layout):
    """[..., d_qk] -> uint8 [..., token_bytes] in token order (NoPE | RoPE | scales for V4,
    NoPE | scales | RoPE for V3.2)."""
    x = x.astype(jnp.float32)
    nope = x[..., :layout.d_nope].reshape(*x.shape[:-1], layout.num_tiles, layout.tile)
    rope = x[..., layout.d_nope:].astype(jnp.bfloat16)
    scale, exponent = _pow2_scale(jnp.max(jnp.abs(nope), axis=-1))
    fp8 = (nope / scale[..., None]).astype(jnp.float8_e4m3fn).reshape(*x.shape[:-1], layout.d_nope)
    parts_nope = _to_bytes(fp8)
    parts_rope = _to_bytes(rope)
    if layout is V32:
        return jnp.concatenate([parts_nope, _to_bytes(scale.astype(jnp.float32)), parts_rope], -1)
    e8m0 = (exponent + 127).astype(jnp.uint8)
    pad = jnp.zeros((*e8m0.shape[:-1], _V4_SCALES - layout.num_tiles), jnp.uint8)
    return jnp.concatenate([parts_nope, parts_rope, e8m0, pad], -1)


def _dequantize_tokens(b, layout: Fp8Layout):
    """uint8 [..., token_bytes] in token order -> bfloat16 [..., d_qk]."""
    nope = _from_bytes(b[..., :layout.d_nope], jnp.float8_e4m3fn).astype(jnp.float32)
    if layout is V32:
        scale = _from_bytes(b[..., 512:528], jnp.float32)
        rope = _from_bytes(b[..., 528:656], jnp.bfloat16)
    else:
        rope = _from_bytes(b[..., 448:576], jnp.bfloat16)
        exponent = b[..., 576:576 + layout.num_tiles].astype(jnp.int32) - 127
        scale = jnp.ldexp(jnp.ones(exponent.shape, jnp.float32), exponent)
    nope = nope.reshape(*nope.shape[:-1], layout.num_tiles, layout.tile) * scale[..., None]
    nope = nope.reshape(*b.shape[:-1], layout.d_nope).astype(jnp.bfloat16)
    return jnp.concatenate([nope, rope], axis=-1)


def _v4_token_offsets(offset_in_block, block_size: int):
    """Byte offsets inside a V4 block of each byte of the tokens at ``offset_in_block``, in token
    order: [..., 584]."""
    offset_in_block = offset_in_block[..., None]
    record = _V4_RECORD * offset_in_block + jnp.arange(_V4_RECORD, dtype=jnp.int32)
    scales = (_V4_RECORD * block_size + _V4_SCALES * offset_in_block
              + jnp.arange(_V4_SCALES, dtype=jnp.int32))
    return jnp.concatenate([record, scales], axis=-1)


def _check_v4_pool(cache):
    if cache.ndim != 4 or cache.shape[2] != 1:
        raise ValueError(f"a V4-layout FP8 cache must be [num_blocks, block_size, 1, 584] (the "
                         f"layout is per block); got shape {cache.shape}")


def quantize_fp8(kv):
    """Quantize a bf16 cache (or tokens) to the FP8 byte layout chosen by its last axis.

    d_qk 576 (V3.2): any leading shape, [..., 576] -> uint8 [..., 656].
    d_qk 512 (V4): a whole paged pool, [num_blocks, block_size, 1, 512] -> uint8 [..., 584].
    """
    layout = fp8_layout(d_qk=kv.shape[-1])
    if layout is V32:
        return _quantize_tokens(kv, layout)
    _check_v4_pool(kv)
    nb, bs = kv.shape[:2]
    tokens = _quantize_tokens(kv[:, :, 0], layout)                    # [nb, bs, 584] token order
    block = jnp.concatenate([tokens[..., :_V4_RECORD].reshape(nb, -1),
                             tokens[..., _V4_RECORD:].reshape(nb, -1)], axis=-1)
    return block.reshape(nb, bs, 1, layout.token_bytes)


def as_fp8_bytes(x):
    """An FP8 cache as its uint8 bytes: FlashMLA (PyTorch) keeps these layouts as float8_e4m3fn
    views of the bytes, which are read as uint8 (same bits, no copy); anything else is returned
    as it is."""
    if x is not None and getattr(x, "dtype", None) == jnp.float8_e4m3fn:
        return jax.lax.bitcast_convert_type(x, jnp.uint8)
    return x


def dequantize_fp8(packed):
    """Inverse of ``quantize_fp8``: uint8 [..., 656] or a V4 pool [nb, bs, 1, 584] -> bfloat16
    (a float8_e4m3fn view of those bytes, as FlashMLA keeps them, is read as the bytes)."""
    packed = as_fp8_bytes(packed)
    if packed.dtype != jnp.uint8:
        raise TypeError(f"dequantize_fp8: expected a uint8 FP8 cache, got dtype {packed.dtype}")
    layout = fp8_layout(token_bytes=packed.shape[-1])
    if layout is V32:
        return _dequantize_tokens(packed, layout)
    _check_v4_pool(packed)
    nb, bs = packed.shape[:2]
    flat = packed.reshape(nb, -1)
    tokens = jnp.concatenate([flat[:, :_V4_RECORD * bs].reshape(nb, bs, _V4_RECORD),
                              flat[:, _V4_RECORD * bs:].reshape(nb, bs, _V4_SCALES)], axis=-1)
    return _dequantize_tokens(tokens, layout)[:, :, None, :]


def token_rows(block_table, positions, block_size: int):
    """Flat cache rows (block_id * block_size + offset) of logical token ``positions`` [b, n];
    -1 where a position is negative or past the block table."""
    positions = jnp.asarray(positions, jnp.int32)
    slot = positions // block_size
    inside = (positions >= 0) & (slot < block_table.shape[1])
    blocks = jnp.take_along_axis(block_table, jnp.where(inside, slot, 0), axis=1)
    return jnp.where(inside, blocks * block_size + positions % block_size, -1)


def write_tokens(kv_cache, block_table, positions, new_kv):
    """Write ``new_kv`` [b, n, h_kv, d_qk] at logical ``positions`` [b, n] of each sequence's pages
    and return the new cache (negative positions are skipped). A uint8 FP8 cache gets the tokens
    quantized in its layout (a float8_e4m3fn view of such a cache stays one). Inside jit with the
    cache donated, XLA updates it in place."""
    if kv_cache.dtype == jnp.float8_e4m3fn:
        written = write_tokens(as_fp8_bytes(kv_cache), block_table, positions, new_kv)
        return jax.lax.bitcast_convert_type(written, jnp.float8_e4m3fn)
    b, n = positions.shape
    if new_kv.shape[:2] != (b, n):
        raise ValueError(f"write_tokens: new_kv must be [b, n, h_kv, d] with (b, n) = positions' "
                         f"shape {positions.shape}; got {new_kv.shape}")
    num_blocks, block_size = kv_cache.shape[:2]
    rows = token_rows(block_table, positions, block_size)
    # Skipped tokens target block num_blocks, which mode="drop" discards.
    blocks = jnp.where(rows >= 0, rows // block_size, num_blocks)
    offsets = jnp.where(rows >= 0, rows % block_size, 0)
    if kv_cache.dtype != jnp.uint8:
        return kv_cache.at[blocks, offsets].set(new_kv.astype(kv_cache.dtype), mode="drop")
    layout = fp8_layout(token_bytes=kv_cache.shape[-1])
    if new_kv.shape[-1] != layout.d_qk or new_kv.shape[2] != 1:
        raise ValueError(f"write_tokens: a {layout.name} FP8 cache takes new_kv [b, n, 1, "
                         f"{layout.d_qk}]; got {new_kv.shape}")
    tokens = _quantize_tokens(new_kv[:, :, 0], layout)                  # [b, n, token_bytes]
    if layout is V32:
        return kv_cache.at[blocks, offsets, 0].set(tokens, mode="drop")
    _check_v4_pool(kv_cache)
    flat = kv_cache.reshape(num_blocks, -1)
    flat = flat.at[blocks[..., None], _v4_token_offsets(offsets, block_size)].set(tokens,
                                                                                  mode="drop")
    return flat.reshape(kv_cache.shape)
