"""Generation: one jitted prefill, then one jitted decode step per token, over the paged cache.

Per step the host (1) reads the sampled tokens, stops sequences that produced a stop token and
returns their pages to the allocator, (2) gives the others a page when they cross a page
boundary, and (3) launches the jitted decode step, which computes the split-KV schedule once
(``get_mla_metadata``) and runs every layer's ``mla_decode`` with it, then samples on the device.
The page arrays are donated to each step, so XLA updates them in place.

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

from .cache import KV_FORMATS, PageAllocator, init_pages
from .checkpoint import _progress
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
    custom_calls: tuple[str, ...] = ()

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


# The parameters travel as a flat list of arrays (their treedef static): flattening NNX Variables
# on every call would cost host time per decoding step.
@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("implementation", "greedy"),
                   donate_argnames=("pages",))
def _prefill_step(graphdef, treedef, params, pages, ids, lengths, block_table, key, temperature, top_p, *,
                  implementation, greedy):
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, params))
    with jax.named_scope("prefill"):
        logits, pages = model.prefill(ids, lengths, pages, block_table, implementation=implementation)
    return sample(logits, key, temperature, top_p, greedy=greedy), pages


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("implementation", "greedy"),
                   donate_argnames=("pages",))
def _decode_step(graphdef, treedef, params, pages, tokens, block_table, seqlens, active, key, temperature,
                 top_p, *, implementation, greedy):
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, params))
    with jax.named_scope("decode"):
        logits, pages = model.decode(tokens[:, None], pages, block_table, seqlens, active,
                                     implementation=implementation)
    return sample(logits[:, -1], key, temperature, top_p, greedy=greedy), pages


_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')


def _flashmla_calls(hlo_text: str) -> tuple[str, ...]:
    return tuple(sorted({t for t in _CUSTOM_CALL.findall(hlo_text) if "flashmla" in t.lower()}))


# --------------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------------
class Generator:
    """Paged-cache generation for one model; keeps its compiled steps for reuse across calls."""

    def __init__(self, model: DeepseekForCausalLM, *, block_size: int = 64, kv_format: str = "bf16",
                 implementation: str | None = None):
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
                 progress: bool = True) -> GenerationOutput:
        """Generates up to ``max_new_tokens`` tokens after each prompt.

        input_ids: ``[b, s]`` token ids (all prompts of length s unless ``prompt_lengths [b]`` says
        otherwise, right padding), or a list of b token-id lists of any lengths.
        temperature 0: greedy. Otherwise softmax(logits / temperature) restricted to the smallest
        set of tokens whose probability reaches top_p. stop_tokens default to the config's
        eos_token_id; a sequence ends after producing one (it is included in the output).
        num_blocks: size of the page pool (default: enough for every sequence at full length).
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

        graphdef, state = nnx.split(self.model)
        params, treedef = jax.tree.flatten(state)
        static_args = (graphdef, treedef)
        key = jax.random.PRNGKey(seed)
        temp = jnp.float32(temperature)
        tp = jnp.float32(top_p)
        statics = dict(implementation=self.implementation, greedy=greedy)

        # ---- prefill ----
        key, sub = jax.random.split(key)
        args = (params, pages, jnp.asarray(ids), jnp.asarray(lengths), jnp.asarray(block_table), sub, temp, tp)
        prefill, compile_s = self._compile(_prefill_step, "prefill", static_args, args, statics)
        t0 = time.perf_counter()
        with jax.profiler.TraceAnnotation("deepseek_prefill"):
            tok, pages = prefill(*args)
            tok_host = np.asarray(tok)
        prefill_s = time.perf_counter() - t0

        # ---- decode ----
        seqlens = lengths.astype(np.int32).copy()
        out = np.full((b, max_new_tokens), pad_token_id, np.int32)
        n_out = np.zeros((b,), np.int32)
        finished = np.zeros((b,), bool)
        decode_s, steps = 0.0, 0
        step_keys = list(jax.random.split(key, max_new_tokens))
        # Every decode step has the same shapes: compile (or fetch) it once, before the loop.
        step_args = (params, pages, tok, jnp.asarray(block_table), jnp.asarray(seqlens), jnp.ones((b,), bool),
                     key, temp, tp)
        decode, c_s = self._compile(_decode_step, "decode", static_args, step_args, statics)
        compile_s += c_s
        if c_s or self.last_decode_hlo is None:
            self.last_decode_hlo = decode.as_text()
        decode_calls = _flashmla_calls(self.last_decode_hlo)
        bar = _bar(max_new_tokens, progress)
        for step in range(max_new_tokens):
            for i in np.flatnonzero(~finished):
                out[i, step] = tok_host[i]
                n_out[i] += 1
                if int(tok_host[i]) in stop:
                    finished[i] = True
                    alloc.free(i)  # its pages go back to the pool at once
            bar.update(1)
            if finished.all() or step == max_new_tokens - 1:
                break
            active = ~finished
            for i in np.flatnonzero(active):
                alloc.ensure(i, int(seqlens[i]) + 1)
            block_table = alloc.block_table([i if active[i] else None for i in range(b)])
            t0 = time.perf_counter()
            with jax.profiler.TraceAnnotation("deepseek_decode_step"):
                tok, pages = decode(params, pages, tok, jnp.asarray(block_table),
                                    jnp.asarray(np.where(active, seqlens, 0)), jnp.asarray(active),
                                    step_keys[step], temp, tp)
                tok_host = np.asarray(tok)  # the host needs the tokens for stop checks anyway
            decode_s += time.perf_counter() - t0
            steps += 1
            seqlens[active] += 1
        bar.close()
        for i in range(b):
            alloc.free(i)

        attention, detail = self._attention_report(decode_calls)
        return GenerationOutput(tokens=out, lengths=n_out, prompt_tokens=int(lengths.sum()),
                                prefill_seconds=prefill_s, decode_seconds=decode_s, decode_steps=steps,
                                compile_seconds=compile_s, attention=attention, attention_detail=detail,
                                custom_calls=decode_calls)

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
             return_output: bool = False):
    """Generates new tokens after each prompt of ``input_ids`` (see ``Generator.generate``).

    Returns the new tokens ``[b, max_new_tokens]`` int32 (positions after a sequence's stop token
    hold ``pad_token_id``), or the full ``GenerationOutput`` (timings, attention backend) with
    ``return_output=True``. Compiled steps are cached per model.
    """
    per_model = _GENERATORS.setdefault(model, {})
    settings = (block_size, kv_format, implementation)
    if settings not in per_model:
        per_model[settings] = Generator(model, block_size=block_size, kv_format=kv_format,
                                        implementation=implementation)
    out = per_model[settings].generate(input_ids, max_new_tokens, prompt_lengths=prompt_lengths,
                                       temperature=temperature, top_p=top_p, seed=seed, stop_tokens=stop_tokens,
                                       pad_token_id=pad_token_id, progress=progress)
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
