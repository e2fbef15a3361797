"""Batched KV-cache sampling, jitted end to end.

One compiled function runs the prefill and a `lax.while_loop` over new tokens with a preallocated
cache of length prompt + max_new_tokens: no recompilation per token, and the loop exits as soon as
every row has produced an end-of-sequence token. Prompts are left-padded to a bucketed length
(multiple of `prompt_bucket`) so similar batches reuse the compiled function; padding has segment
id 0 and is never attended.

Sampling follows HF's order: temperature, then top-k, then top-p; temperature 0 is greedy.
Sampling parameters are traced values, so changing them does not recompile.

The sampler works on `nnx.split` state, so a model whose parameters are sharded over a mesh
generates with the same code (GRPO's rollouts use this class).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.errors import JaxtuneError
from jaxtune.models.cache import KVCache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise JaxtuneError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise JaxtuneError(f"temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise JaxtuneError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise JaxtuneError(f"top_k must be >= 0 (0 disables it; got {self.top_k})")


@dataclasses.dataclass
class SampleOutput:
    tokens: np.ndarray  # [batch, max_new_tokens], pad after the end
    lengths: np.ndarray  # [batch] generated tokens per row, EOS included
    finished: np.ndarray  # [batch] True where the row ended with EOS


def sample_logits(logits: jax.Array, key: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Next tokens [B] from logits [B, V]: greedy if temperature == 0, else filtered sampling."""

    def sampled(logits):
        scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
        sorted_desc = -jnp.sort(-scaled, axis=-1)
        vocab = scaled.shape[-1]
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
        kth = jnp.take_along_axis(sorted_desc, jnp.full((scaled.shape[0], 1), k - 1), axis=-1)
        sorted_desc = jnp.where(sorted_desc >= kth, sorted_desc, -jnp.inf)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above each token
        keep = jnp.maximum(jnp.sum(before < top_p, axis=-1, keepdims=True), 1)
        threshold = jnp.take_along_axis(sorted_desc, keep - 1, axis=-1)
        filtered = jnp.where(scaled >= jnp.maximum(threshold, kth), scaled, -jnp.inf)
        return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

    def greedy(logits):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sampled, greedy, logits)


class Sampler:
    """Generates continuations of token-id prompts with a model (any jaxtune CausalLM)."""

    def __init__(self, model, *, eos_token_ids: Sequence[int], pad_token_id: int, prompt_bucket: int = 32,
                 cache_dtype: Any = None):
        if not eos_token_ids:
            raise JaxtuneError("the sampler needs at least one end-of-sequence token id")
        self.graphdef, self.state = nnx.split(model)
        self.cfg = model.cfg
        self.eos = jnp.asarray(sorted(set(int(e) for e in eos_token_ids)), jnp.int32)
        self.pad = int(pad_token_id)
        self.bucket = prompt_bucket
        self.cache_dtype = cache_dtype or model.dtype
        self._compiled = jax.jit(self._generate, static_argnames=("max_new_tokens",))

    def __call__(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> SampleOutput:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise JaxtuneError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        width = -(-longest // self.bucket) * self.bucket
        ids = np.full((len(prompts), width), self.pad, np.int32)
        segments = np.zeros((len(prompts), width), np.int32)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = p
            segments[row, width - len(p):] = 1
        tokens, lengths, finished = self._compiled(
            self.state, jnp.asarray(ids), jnp.asarray(segments), jax.random.key(sampling.seed),
            jnp.float32(sampling.temperature), jnp.int32(sampling.top_k), jnp.float32(sampling.top_p),
            max_new_tokens=sampling.max_new_tokens,
        )
        return SampleOutput(np.asarray(tokens), np.asarray(lengths), np.asarray(finished))

    def _generate(self, state, prompt_ids, prompt_segments, rng, temperature, top_k, top_p, *, max_new_tokens):
        model = nnx.merge(self.graphdef, state)
        batch, width = prompt_ids.shape
        cache = KVCache.create(self.cfg, batch, width + max_new_tokens, self.cache_dtype)
        positions = jnp.maximum(jnp.cumsum(prompt_segments, axis=1) - 1, 0)
        hidden, cache = model.decode(prompt_ids, prompt_segments, positions, cache)
        logits = model.logits(hidden[:, -1])
        out = jnp.full((batch, max_new_tokens), self.pad, jnp.int32)
        done = jnp.zeros((batch,), bool)
        lengths = jnp.zeros((batch,), jnp.int32)

        def cond(carry):
            step, _, _, _, done, _, _, _ = carry
            return (step < max_new_tokens) & ~jnp.all(done)

        def body(carry):
            step, logits, cache, out, done, lengths, rng, pos = carry
            rng, key = jax.random.split(rng)
            token = sample_logits(logits, key, temperature, top_k, top_p)
            token = jnp.where(done, self.pad, token)
            out = out.at[:, step].set(token)
            lengths = lengths + (~done).astype(jnp.int32)
            done = done | jnp.isin(token, self.eos)
            pos = pos + 1
            hidden, cache = model.decode(token[:, None], jnp.ones((batch, 1), jnp.int32), pos[:, None], cache)
            return step + 1, model.logits(hidden[:, 0]), cache, out, done, lengths, rng, pos

        carry = (jnp.int32(0), logits, cache, out, done, lengths, rng, positions[:, -1])
        _, _, _, out, done, lengths, _, _ = jax.lax.while_loop(cond, body, carry)
        return out, lengths, done


@dataclasses.dataclass
class Completion:
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" or "length"


def encode_prompts(tokenizer, prompts: Sequence[str], *, chat: bool | None = None, system: str | None = None):
    """Token ids per prompt; the chat template is applied when `chat` (default: if the tokenizer has one)."""
    use_chat = bool(tokenizer.chat_template) if chat is None else chat
    if use_chat and not tokenizer.chat_template:
        raise JaxtuneError("--chat was asked for but the tokenizer has no chat template")
    encoded = []
    for prompt in prompts:
        if use_chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            encoded.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            encoded.append(tokenizer(prompt)["input_ids"])
    return encoded


def eos_ids_for(model, tokenizer) -> list[int]:
    ids = set(model.cfg.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def generate(model, tokenizer, prompts: Sequence[str], sampling: SamplingConfig | None = None, *,
             chat: bool | None = None, system: str | None = None, sampler: Sampler | None = None) -> list[Completion]:
    """Complete each prompt (batched together) and decode the results."""
    sampling = sampling or SamplingConfig()
    if sampler is None:
        pad = tokenizer.pad_token_id
        eos = eos_ids_for(model, tokenizer)
        sampler = Sampler(model, eos_token_ids=eos, pad_token_id=eos[0] if pad is None else pad)
    encoded = encode_prompts(tokenizer, prompts, chat=chat, system=system)
    out = sampler(encoded, sampling)
    results = []
    for row, prompt in enumerate(prompts):
        ids = out.tokens[row, : out.lengths[row]].tolist()
        results.append(Completion(prompt=prompt, text=tokenizer.decode(ids, skip_special_tokens=True),
                                  token_ids=ids, finish_reason="eos" if out.finished[row] else "length"))
    return results
