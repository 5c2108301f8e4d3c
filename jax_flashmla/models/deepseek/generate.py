"""Generation: one jitted prefill, then the decode steps on the device, over the paged cache.

The decoding state (``DecodeState``: pages, last tokens, lengths, block table, a free-page stack,
the output buffer, stop flags) lives on the device, and one decode step does everything there:
a sequence whose next token starts a page pops one from the free stack, the model step runs (the
split-KV schedule ``get_mla_metadata`` once, every layer's ``mla_decode`` with it), the next
tokens are sampled and stored, and a sequence that produced a stop token ends and pushes its pages
back. So nothing per step needs the host:

- loop="device" (default): all steps in one ``lax.while_loop`` (``sync_every`` steps unrolled into
  a ``fori_loop`` per iteration, so the loop's own predicate is read once per sync_every steps);
  one dispatch and one sync for the whole generation.
- loop="host": Python dispatches ``sync_every`` steps per call, asynchronously (the state is
  donated, XLA updates it in place), and reads the done flag / the tokens so far between calls
  (``on_tokens`` streaming).

Prompts get their pages from the host ``PageAllocator``; prefill runs in groups of prompts
(``prefill_chunk_tokens``) with V3's attention on cuDNN flash attention or a blockwise form, so
its memory grows with the tokens, not their square.

Both steps are compiled ahead of time (``jit(...).lower(...).compile()``), which keeps compile
time out of the reported throughput and lets us read the compiled step: whether it contains
jax_flashmla's custom calls (attention on the CUDA kernels) or not (the pure-JAX reference).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
import warnings
import weakref
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jax_flashmla as jfm

from .cache import KV_FORMATS, KVPages, OutOfPagesError, PageAllocator, init_pages
from .checkpoint import _progress
from .layers import CAUSAL_ATTENTION_IMPLS
from .model import DeepseekForCausalLM

PROMPT_PAD = 16  # prompts are padded to a multiple of this, so nearby lengths share one compile


@dataclasses.dataclass
class GenerationOutput:
    tokens: np.ndarray            # [b, max_new_tokens] int32; after a stop token: pad_token_id
    lengths: np.ndarray           # [b] new tokens per sequence (a stop token counts)
    prompt_tokens: int
    prefill_seconds: float        # excluding compilation
    decode_seconds: float         # all decode steps, excluding compilation
    decode_steps: int
    compile_seconds: float
    attention: str                # "kernel" or "reference"
    attention_detail: str         # custom-call names, or why the reference ran
    custom_calls: tuple[str, ...] = ()          # jax_flashmla custom calls of the decode steps
    loop: str = "device"          # "device" (one while_loop) or "host" (sync_every steps per dispatch)
    prefill_custom_calls: tuple[str, ...] = ()  # ... and of the prefill (V3.2: sparse prefill)

    @property
    def decode_tokens(self) -> int:
        """Tokens produced by decode steps (the first new token of each sequence comes from prefill)."""
        return int(np.maximum(self.lengths - 1, 0).sum())

    @property
    def tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------
def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array, *, greedy: bool):
    """logits [b, vocab] -> tokens [b] int32. Greedy (argmax), or temperature + nucleus (top-p)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass ranked above each token
    keep = (before < top_p) | (top_p >= 1.0)
    # The smallest kept logit is the cut-off (the top token is always kept: before = 0).
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------------------------------------
# Device-side decoding state and steps
# --------------------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Everything a decode step reads and writes, on the device: the loop never waits on the host.

    Pages are handed out from a device free-page stack (``free_pages[:num_free]``, top last) when a
    sequence's next token starts a new page, and returned to it when the sequence stops.
    """

    pages: KVPages
    tokens: jax.Array        # [b] int32: each sequence's last token (the next step's input)
    seqlens: jax.Array       # [b] int32: tokens in the cache
    active: jax.Array        # [b] bool: still generating
    block_table: jax.Array   # [b, max_blocks] int32
    free_pages: jax.Array    # [num_blocks] int32: a stack, entries [0, num_free) free
    num_free: jax.Array      # [] int32
    out: jax.Array           # [b, max_new_tokens] int32: new tokens (pad after a stop)
    n_out: jax.Array         # [b] int32: new tokens so far
    steps: jax.Array         # [] int32: decode steps that had work
    key: jax.Array           # the sampling key (folded with the step number)
    out_of_pages: jax.Array  # [] bool: a sequence needed a page the pool did not have


def _record(st: DecodeState, tok, live, stop_ids) -> DecodeState:
    """Stores ``tok`` for the ``live`` sequences; those that produced a stop token (or their last
    allowed token) stop, and a stopped sequence's pages go back to the free stack."""
    b, max_new = st.out.shape
    rows = jnp.arange(b)
    out = st.out.at[rows, jnp.where(live, st.n_out, max_new)].set(tok, mode="drop")
    n_out = st.n_out + live
    stopped = live & jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
    active = live & ~stopped & (n_out < max_new)
    # Give back the pages of sequences that stopped (rows in table order onto the stack top).
    bs = st.pages.block_size
    mb = st.block_table.shape[1]
    held = (st.seqlens + bs - 1) // bs
    give = stopped[:, None] & (jnp.arange(mb)[None, :] < held[:, None])
    flat = give.reshape(-1)
    slot = jnp.where(flat, st.num_free + jnp.cumsum(flat) - 1, st.free_pages.shape[0])
    free_pages = st.free_pages.at[slot].set(st.block_table.reshape(-1), mode="drop")
    num_free = st.num_free + jnp.sum(flat, dtype=jnp.int32)
    block_table = jnp.where(stopped[:, None], 0, st.block_table)
    return dataclasses.replace(st, tokens=jnp.where(live, tok, st.tokens), out=out, n_out=n_out, active=active,
                               free_pages=free_pages, num_free=num_free, block_table=block_table)


def _decode_one(model, st: DecodeState, stop_ids, temperature, top_p, *, implementation, greedy) -> DecodeState:
    """One decode step on the device: page allocation, the model step, sampling, stop checks."""
    b, max_new = st.out.shape
    bs = st.pages.block_size
    live = st.active & (st.n_out < max_new) & ~st.out_of_pages
    # The new token goes to position seqlens; a sequence whose pages are full pops one from the stack.
    need = live & (st.seqlens % bs == 0)
    n_need = jnp.sum(need, dtype=jnp.int32)
    oom = n_need > st.num_free
    live = live & ~oom  # out of pages: this step does nothing, the loop ends, the host raises
    need = need & ~oom
    rank = jnp.cumsum(need) - 1
    page = st.free_pages[jnp.clip(st.num_free - 1 - rank, 0, st.free_pages.shape[0] - 1)]
    col = jnp.where(need, st.seqlens // bs, st.block_table.shape[1])
    block_table = st.block_table.at[jnp.arange(b), col].set(page, mode="drop")
    num_free = st.num_free - jnp.where(oom, 0, n_need)
    logits, pages = model.decode(st.tokens[:, None], st.pages, block_table, jnp.where(live, st.seqlens, 0), live,
                                 implementation=implementation)
    tok = sample(logits[:, -1], jax.random.fold_in(st.key, st.steps + 1), temperature, top_p, greedy=greedy)
    st = dataclasses.replace(st, pages=pages, block_table=block_table, num_free=num_free,
                             seqlens=st.seqlens + live, steps=st.steps + jnp.any(live),
                             out_of_pages=st.out_of_pages | oom)
    return _record(st, tok, live, stop_ids)


def _running(st: DecodeState):
    return jnp.any(st.active) & ~st.out_of_pages


# The parameters travel as a flat list of arrays (their treedef static): flattening NNX Variables
# on every call would cost host time per call.
@functools.partial(jax.jit, static_argnums=(0, 1),
                   static_argnames=("implementation", "greedy", "attention", "batch_chunk"),
                   donate_argnames=("state",))
def _prefill_step(graphdef, treedef, params, state, ids, lengths, stop_ids, temperature, top_p, *,
                  implementation, greedy, attention, batch_chunk):
    """Prefill, sample each prompt's first new token, and record it (stop checks included)."""
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, params))
    with jax.named_scope("prefill"):
        logits, pages = model.prefill(ids, lengths, state.pages, state.block_table, implementation=implementation,
                                      attention=attention, batch_chunk=batch_chunk)
    tok = sample(logits, jax.random.fold_in(state.key, 0), temperature, top_p, greedy=greedy)
    state = dataclasses.replace(state, pages=pages)
    return _record(state, tok, state.active, stop_ids)


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("implementation", "greedy", "unroll", "loop"),
                   donate_argnames=("state",))
def _decode_steps(graphdef, treedef, params, state, stop_ids, temperature, top_p, *, implementation, greedy,
                  unroll, loop):
    """``unroll`` decode steps back to back (a ``fori_loop`` of known trip count: no host round trip);
    loop=True wraps that in a ``while_loop`` that runs until no sequence is active, checking once per
    ``unroll`` steps (each check is one device-to-host read of a flag, inside XLA)."""
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, params))

    def chunk(st):
        def one(_, st):
            with jax.named_scope("decode"):
                return _decode_one(model, st, stop_ids, temperature, top_p, implementation=implementation,
                                   greedy=greedy)
        return jax.lax.fori_loop(0, unroll, one, st)

    if not loop:
        return chunk(state)
    return jax.lax.while_loop(_running, chunk, state)


_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')


def _flashmla_calls(hlo_text: str) -> tuple[str, ...]:
    return tuple(sorted({t for t in _CUSTOM_CALL.findall(hlo_text) if "flashmla" in t.lower()}))


# --------------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------------
class Generator:
    """Paged-cache generation for one model; keeps its compiled steps for reuse across calls."""

    def __init__(self, model: DeepseekForCausalLM, *, block_size: int = 64, kv_format: str = "bf16",
                 implementation: str | None = None, loop: str = "device", sync_every: int = 8,
                 prefill_chunk_tokens: int | None = 16384, prefill_attention: str = "auto"):
        """loop: "device" runs all decode steps in one ``lax.while_loop`` (one dispatch, no per-step
        host work); "host" dispatches ``sync_every`` steps per call from Python, asynchronously, and
        reads a done flag (and the tokens so far, for ``on_tokens``) only between calls.
        sync_every: decode steps between stop checks (both loops; up to sync_every - 1 steps may run
        past the last active sequence, doing nothing). prefill_chunk_tokens: prompts are prefilled in
        groups of about this many (padded) tokens, which bounds prefill activation memory (None: all
        at once). prefill_attention: the V3 prefill attention (``layers.causal_attention``)."""
        if not isinstance(model, DeepseekForCausalLM):
            raise TypeError(f"Generator: model must be a DeepseekForCausalLM, got {type(model).__name__}")
        if kv_format not in KV_FORMATS:
            raise ValueError(f"Generator: kv_format must be one of {KV_FORMATS}, got {kv_format!r}")
        if implementation not in (None, "kernel", "reference"):
            raise ValueError(f"Generator: implementation must be None, 'kernel' or 'reference', got "
                             f"{implementation!r}")
        self.model = model
        self.config = model.config
        self.block_size = int(block_size)
        self.kv_format = kv_format
        self.implementation = implementation
        if loop not in ("device", "host"):
            raise ValueError(f"Generator: loop must be 'device' or 'host', got {loop!r}")
        if int(sync_every) < 1:
            raise ValueError(f"Generator: sync_every must be >= 1, got {sync_every}")
        if prefill_attention not in CAUSAL_ATTENTION_IMPLS:
            raise ValueError(f"Generator: prefill_attention must be one of {CAUSAL_ATTENTION_IMPLS}, got "
                             f"{prefill_attention!r}")
        self.loop = loop
        self.sync_every = int(sync_every)
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.prefill_attention = prefill_attention
        self._compiled: dict[Any, Any] = {}
        self._fallback_reasons: list[str] = []
        self.last_decode_hlo: str | None = None

    def _compile(self, fn, kind, static_args, args, statics):
        """The AOT-compiled step for these argument shapes (cached); returns (executable, seconds)."""
        leaves, tree = jax.tree.flatten(args)
        key = (kind, static_args, tree, tuple((np.shape(x), jnp.result_type(x)) for x in leaves),
               tuple(sorted(statics.items())))
        if key not in self._compiled:
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", jfm.KernelFallbackWarning)
                compiled = fn.lower(*static_args, *args, **statics).compile()
            for w in caught:
                if issubclass(w.category, jfm.KernelFallbackWarning):
                    self._fallback_reasons.append(str(w.message))
                else:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            self._compiled[key] = (compiled, time.perf_counter() - t0)
            return compiled, self._compiled[key][1]
        return self._compiled[key][0], 0.0

    def generate(self, input_ids, max_new_tokens: int, *, prompt_lengths=None, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop_tokens: Sequence[int] | None = None,
                 pad_token_id: int | None = None, num_blocks: int | None = None,
                 progress: bool = True, on_tokens=None) -> GenerationOutput:
        """Generates up to ``max_new_tokens`` tokens after each prompt.

        input_ids: ``[b, s]`` token ids (all prompts of length s unless ``prompt_lengths [b]`` says
        otherwise, right padding), or a list of b token-id lists of any lengths.
        temperature 0: greedy. Otherwise softmax(logits / temperature) restricted to the smallest
        set of tokens whose probability reaches top_p. stop_tokens default to the config's
        eos_token_id; a sequence ends after producing one (it is included in the output).
        num_blocks: size of the page pool (default: enough for every sequence at full length).
        on_tokens: with loop="host", called as ``on_tokens(tokens [b, n], lengths [b])`` (NumPy, the
        new tokens so far) after prefill and at every stop check: streaming in steps of sync_every.
        """
        cfg = self.config
        prompts, lengths = _prompts(input_ids, prompt_lengths)
        b = len(prompts)
        lo, hi = min(int(p.min()) for p in prompts), max(int(p.max()) for p in prompts)
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"generate: input_ids must be token ids in [0, vocab_size={cfg.vocab_size}), got "
                             f"values in [{lo}, {hi}]")
        max_new_tokens = int(max_new_tokens)
        if max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"generate: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        stop = set(cfg.stop_token_ids if stop_tokens is None else (int(t) for t in stop_tokens))
        if pad_token_id is None:
            pad_token_id = min(stop) if stop else 0
        greedy = temperature == 0.0

        s_pad = -(-int(lengths.max()) // PROMPT_PAD) * PROMPT_PAD
        ids = np.zeros((b, s_pad), np.int32)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = p
        max_blocks = -(-(int(lengths.max()) + max_new_tokens) // self.block_size)
        if num_blocks is None:
            num_blocks = b * max_blocks
        alloc = PageAllocator(num_blocks, self.block_size, max_blocks)
        for i in range(b):
            alloc.ensure(i, int(lengths[i]))
        block_table = alloc.block_table(range(b))
        pages = init_pages(cfg, num_blocks, self.block_size, kv_format=self.kv_format, dtype=self.model.dtype)

        graphdef, mstate = nnx.split(self.model)
        params, treedef = jax.tree.flatten(mstate)
        static_args = (graphdef, treedef)
        stop_ids = jnp.asarray(sorted(stop) or [-1], jnp.int32)  # -1: never sampled
        temp, tp = jnp.float32(temperature), jnp.float32(top_p)
        free = np.asarray(alloc._free, np.int32)  # the pool after the prompts' pages; top last
        state = DecodeState(
            pages=pages, tokens=jnp.zeros((b,), jnp.int32), seqlens=jnp.asarray(lengths, jnp.int32),
            active=jnp.ones((b,), bool), block_table=jnp.asarray(block_table),
            free_pages=jnp.asarray(np.pad(free, (0, num_blocks - len(free)))),
            num_free=jnp.int32(len(free)), out=jnp.full((b, max_new_tokens), pad_token_id, jnp.int32),
            n_out=jnp.zeros((b,), jnp.int32), steps=jnp.int32(0), key=jax.random.PRNGKey(seed),
            out_of_pages=jnp.zeros((), bool))
        chunk = None
        if self.prefill_chunk_tokens:
            chunk = max(1, int(self.prefill_chunk_tokens) // s_pad)
            chunk = None if chunk >= b else chunk

        # ---- prefill (+ the first new token) ----
        args = (params, state, jnp.asarray(ids), jnp.asarray(lengths), stop_ids, temp, tp)
        prefill, compile_s = self._compile(_prefill_step, "prefill", static_args, args,
                                           dict(implementation=self.implementation, greedy=greedy,
                                                attention=self.prefill_attention, batch_chunk=chunk))
        prefill_calls = _flashmla_calls(prefill.as_text())
        t0 = time.perf_counter()
        with jax.profiler.TraceAnnotation("deepseek_prefill"):
            state = prefill(*args)
            running = bool(_running(state))
        prefill_s = time.perf_counter() - t0
        bar = _bar(max_new_tokens, progress)
        bar.update(1)
        if on_tokens is not None:
            on_tokens(np.asarray(state.out[:, :1]), np.asarray(state.n_out))

        # ---- decode ----
        device_loop = self.loop == "device"
        unroll = max(1, min(self.sync_every, max_new_tokens - 1))
        statics = dict(implementation=self.implementation, greedy=greedy, unroll=unroll, loop=device_loop)
        decode, c_s = self._compile(_decode_steps, "decode", static_args, (params, state, stop_ids, temp, tp),
                                    statics)
        compile_s += c_s
        if c_s or self.last_decode_hlo is None:
            self.last_decode_hlo = decode.as_text()
        decode_calls = _flashmla_calls(self.last_decode_hlo)
        decode_s, done = 0.0, 1
        if running and max_new_tokens > 1:
            t0 = time.perf_counter()
            if device_loop:
                with jax.profiler.TraceAnnotation("deepseek_decode_loop"):
                    state = decode(params, state, stop_ids, temp, tp)
                    steps = int(state.steps)  # the one sync of the whole loop
            else:
                while True:
                    with jax.profiler.TraceAnnotation("deepseek_decode_steps"):
                        state = decode(params, state, stop_ids, temp, tp)  # asynchronous
                    # The flag read waits for the steps just queued; they are sync_every steps of work.
                    steps, running = int(state.steps), bool(_running(state))
                    if on_tokens is not None:
                        on_tokens(np.asarray(state.out[:, :steps + 1]), np.asarray(state.n_out))
                    bar.update(steps + 1 - done)
                    done = steps + 1
                    if not running or steps >= max_new_tokens - 1:
                        break
            decode_s = time.perf_counter() - t0
        else:
            steps = 0
        bar.update(steps + 1 - done)
        bar.close()
        if bool(state.out_of_pages):
            raise OutOfPagesError(f"generate: the page pool ({num_blocks} pages of {self.block_size}) ran out after "
                                  f"{steps} decode steps; pass a larger num_blocks")
        out, n_out = np.asarray(state.out), np.asarray(state.n_out)

        attention, detail = self._attention_report(decode_calls)
        return GenerationOutput(tokens=out, lengths=n_out, prompt_tokens=int(lengths.sum()),
                                prefill_seconds=prefill_s, decode_seconds=decode_s, decode_steps=steps,
                                compile_seconds=compile_s, attention=attention, attention_detail=detail,
                                custom_calls=decode_calls, loop=self.loop,
                                prefill_custom_calls=prefill_calls)

    def _attention_report(self, calls: tuple[str, ...]) -> tuple[str, str]:
        # The scheduler (get_mla_metadata) is a custom call of its own; attention is the rest.
        if any("metadata" not in c for c in calls):
            return "kernel", ", ".join(calls)
        ok, why = jfm.kernels_available()
        if not ok:
            return "reference", why
        if self.implementation == "reference":
            return "reference", "implementation='reference' was requested"
        if self._fallback_reasons:
            return "reference", self._fallback_reasons[-1]
        return "reference", "the compiled decode step contains no jax_flashmla custom call"


_GENERATORS: "weakref.WeakKeyDictionary[DeepseekForCausalLM, dict]" = weakref.WeakKeyDictionary()


def generate(model: DeepseekForCausalLM, input_ids, max_new_tokens: int, temperature: float = 0.0, *,
             top_p: float = 1.0, seed: int = 0, stop_tokens: Sequence[int] | None = None,
             prompt_lengths=None, pad_token_id: int | None = None, kv_format: str = "bf16",
             block_size: int = 64, implementation: str | None = None, progress: bool = False,
             return_output: bool = False, loop: str = "device", sync_every: int = 8, on_tokens=None):
    """Generates new tokens after each prompt of ``input_ids`` (see ``Generator.generate``).

    Returns the new tokens ``[b, max_new_tokens]`` int32 (positions after a sequence's stop token
    hold ``pad_token_id``), or the full ``GenerationOutput`` (timings, attention backend) with
    ``return_output=True``. Compiled steps are cached per model.
    """
    per_model = _GENERATORS.setdefault(model, {})
    settings = (block_size, kv_format, implementation, loop, sync_every)
    if settings not in per_model:
        per_model[settings] = Generator(model, block_size=block_size, kv_format=kv_format,
                                        implementation=implementation, loop=loop, sync_every=sync_every)
    out = per_model[settings].generate(input_ids, max_new_tokens, prompt_lengths=prompt_lengths,
                                       temperature=temperature, top_p=top_p, seed=seed, stop_tokens=stop_tokens,
                                       pad_token_id=pad_token_id, progress=progress, on_tokens=on_tokens)
    return out if return_output else out.tokens


def _prompts(input_ids, prompt_lengths) -> tuple[list[np.ndarray], np.ndarray]:
    if isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], (list, tuple, np.ndarray)):
        prompts = [np.asarray(p, np.int64).reshape(-1) for p in input_ids]
        if prompt_lengths is not None:
            raise ValueError("generate: pass prompt_lengths only with a [b, s] array of input_ids")
    else:
        arr = np.asarray(input_ids)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"generate: input_ids must be an integer [batch, seq] array or a list of token "
                             f"lists, got {arr.dtype} shape {arr.shape}")
        lens = np.full((arr.shape[0],), arr.shape[1]) if prompt_lengths is None else np.asarray(prompt_lengths)
        if lens.shape != (arr.shape[0],) or (lens < 1).any() or (lens > arr.shape[1]).any():
            raise ValueError(f"generate: prompt_lengths must be [batch={arr.shape[0]}] in [1, {arr.shape[1]}], "
                             f"got {lens.tolist()}")
        prompts = [arr[i, :int(lens[i])] for i in range(arr.shape[0])]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    return prompts, np.asarray([len(p) for p in prompts], np.int32)


def _bar(total: int, enabled: bool):
    return _progress(total, enabled, "decode", unit="tok")
