"""KV-cache sampling as a pure, jitted function of the model's state: `jaxtune generate` and GRPO's rollouts.

    out = sample(model, prompt_ids, prompt_segments, key, settings, max_new_tokens=64, num_generations=8,
                 eos_ids=(2,), pad_id=0)

One compiled function runs the prefill and a `lax.while_loop` over new tokens: no recompilation per
token, and the loop exits as soon as every row has ended. Prompts are left-padded (padding has segment
id 0 and is never attended). The prefill fills a cache of the prompts' width; the completions get a
preallocated cache of max_new_tokens slots per row, and every decode step attends both
(`KVCache.prefix`). With `num_generations` G > 1 the G completions of a prompt share its prefill, and
each decode step reads the prompt's keys and values once for the G of them (not G copies); rows come
out prompt-major, [prompt 0 x G, prompt 1 x G, ...].

It is a function of the model's state, not an object that keeps one: GRPO calls it with the training
state of the moment (the train step donates and replaces those buffers), on the training mesh
(prompts sharded over the data axes, the cache constrained by the same logical-axis rules as the
weights). `Sampler` and `generate` are thin users that hold a model for `jaxtune generate`.

Sampling as transformers defines it, in its order: repetition penalty (on every token of the prompt and
of the completion so far), temperature (0: greedy), top-k, top-p, min-p. All settings are traced, so
changing them does not recompile; a filter that is off costs nothing (`lax.cond`), and none sorts the
vocabulary: a draw inverts the CDF at one uniform number per row (`draw`), and top-k / top-p find
their exact cut-off value by bisection over the logits' float32 bit patterns (32 vectorized
counting passes).
Each sampled token's log-prob is returned under the sampling policy as TRL defines it for GRPO:
log softmax(logits / temperature), before any filter or penalty.
"""

from __future__ import annotations

import dataclasses
import functools
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
    min_p: float = 0.0
    repetition_penalty: float = 1.0
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
        if not 0 <= self.min_p <= 1:
            raise JaxtuneError(f"min_p must be in [0, 1] (got {self.min_p})")
        if self.repetition_penalty <= 0:
            raise JaxtuneError(f"repetition_penalty must be > 0 (1 disables it; got {self.repetition_penalty})")

    def traced(self) -> dict[str, jax.Array]:
        """The settings as arrays: passed to the jitted sampler as values, so they never recompile it."""
        return {"temperature": jnp.float32(self.temperature), "top_k": jnp.int32(self.top_k),
                "top_p": jnp.float32(self.top_p), "min_p": jnp.float32(self.min_p),
                "repetition_penalty": jnp.float32(self.repetition_penalty)}


@dataclasses.dataclass
class SampleOutput:
    tokens: Any  # [rows, max_new_tokens] int32, pad after the end
    lengths: Any  # [rows] generated tokens per row, EOS included
    finished: Any  # [rows] True where the row ended with EOS (else it ran out of max_new_tokens)
    logps: Any  # [rows, max_new_tokens] float32: each sampled token's log-prob (0 after the end)


jax.tree_util.register_dataclass(SampleOutput, data_fields=["tokens", "lengths", "finished", "logps"], meta_fields=[])


# ------------------------------------------------------------------------------------ the filters


def _sortable(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (so bisection can find an exact float value)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _largest_at_least(keys: jax.Array, enough) -> jax.Array:
    """Per row, the largest threshold m (in `keys`' uint32 order) for which `enough(keys >= m)` holds,
    by bisection (32 passes; `enough` must be monotone: true for small m)."""
    rows = keys.shape[0]
    lo = jnp.zeros((rows,), jnp.uint32)
    hi = jnp.full((rows,), jnp.iinfo(jnp.uint32).max, jnp.uint32)

    def body(_, bounds):
        lo, hi = bounds
        span = hi - lo
        mid = lo + (span >> 1) + (span & 1)
        ok = enough(keys >= mid[:, None]) & (hi > lo)
        return jnp.where(ok, mid, lo), jnp.where(ok | (hi <= lo), hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return lo


def _top_k(scores: jax.Array, k: jax.Array) -> jax.Array:
    """transformers' TopKLogitsWarper: keep the scores >= the k-th largest (ties kept)."""
    keys = _sortable(scores)
    kth = _largest_at_least(keys, lambda kept: jnp.sum(kept, axis=-1) >= k)
    return jnp.where(keys >= kth[:, None], scores, -jnp.inf)


def _top_p(scores: jax.Array, p: jax.Array) -> jax.Array:
    """transformers' TopPLogitsWarper: keep the fewest largest tokens whose probability reaches p
    (a token stays while the mass strictly above it is below p; at least one stays)."""
    probs = jax.nn.softmax(scores, axis=-1)
    keys = _sortable(scores)
    # the largest threshold whose kept set (>= it) already holds >= p of the mass, ...
    cut = _largest_at_least(keys, lambda kept: jnp.sum(jnp.where(kept, probs, 0.0), axis=-1) >= p)
    return jnp.where(keys >= cut[:, None], scores, -jnp.inf)


def _min_p(scores: jax.Array, min_p: jax.Array) -> jax.Array:
    """transformers' MinPLogitsWarper: drop tokens below min_p x the top token's probability."""
    probs = jax.nn.softmax(scores, axis=-1)
    keep = probs >= min_p * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(keep, scores, -jnp.inf)


def _filters_on(settings: dict, vocab: int) -> dict:
    """Which of top-k, top-p and min-p are on (traced booleans): the others leave the scores as they are."""
    k = settings["top_k"]
    return {"top_k": (k > 0) & (k < vocab), "top_p": settings["top_p"] < 1.0, "min_p": settings["min_p"] > 0.0}


def process_logits(logits: jax.Array, settings: dict, seen: jax.Array | None = None) -> jax.Array:
    """The scores sampling draws from [B, V] (float32), in transformers' order: repetition penalty on
    the `seen` tokens, temperature, top-k, top-p, min-p. Filters that are off are skipped."""
    scores = logits.astype(jnp.float32)
    if seen is not None:
        penalty = settings["repetition_penalty"]
        penalized = jnp.where(scores < 0, scores * penalty, scores / penalty)
        scores = jnp.where(seen, penalized, scores)
    scores = scores / jnp.maximum(settings["temperature"], 1e-6)
    on = _filters_on(settings, scores.shape[-1])
    scores = jax.lax.cond(on["top_k"], lambda s: _top_k(s, settings["top_k"]), lambda s: s, scores)
    scores = jax.lax.cond(on["top_p"], lambda s: _top_p(s, settings["top_p"]), lambda s: s, scores)
    return jax.lax.cond(on["min_p"], lambda s: _min_p(s, settings["min_p"]), lambda s: s, scores)


def sample_logits(logits: jax.Array, key: jax.Array, temperature, top_k=0, top_p=1.0, min_p=0.0,
                  repetition_penalty=1.0, seen: jax.Array | None = None) -> jax.Array:
    """Next tokens [B] from logits [B, V]: greedy if temperature == 0, else drawn from the processed
    scores (`draw`; no sort)."""
    settings = {"temperature": jnp.float32(temperature), "top_k": jnp.int32(top_k), "top_p": jnp.float32(top_p),
                "min_p": jnp.float32(min_p), "repetition_penalty": jnp.float32(repetition_penalty)}
    return _next_token(logits, key, settings, seen)[0]


_BLOCK = 256  # vocabulary block of the two-level inverse-CDF draw


def draw(key: jax.Array, scores: jax.Array, rows: jax.Array | None = None, *, with_logp: bool = False):
    """One token per row [B] drawn from softmax(scores [B, V]) (-inf: never drawn) by inverting the
    CDF at one uniform per row, in two levels (which block of 256 tokens, then which token in it):
    two passes over the vocabulary and B random numbers, where a Gumbel-max draw needs B x V of
    them (60 ms against 2 ms per step for 64 rows x 49k tokens on a CPU). With `rows` [B] (each
    row's identity) a row's uniform comes from `key` folded with it, whatever rows share the batch.
    `with_logp`: (tokens, log softmax(scores)[token] [B]) from the pass's own maximum and total."""
    b, v = scores.shape
    pad = -v % _BLOCK
    peak = jnp.max(scores, axis=-1, keepdims=True)
    probs = jnp.exp(scores - peak)
    probs = jnp.pad(probs, ((0, 0), (0, pad))).reshape(b, -1, _BLOCK)
    blocks = jnp.cumsum(jnp.sum(probs, axis=-1), axis=-1)  # [B, V / 256]
    if rows is None:
        uniform = jax.random.uniform(key, (b, 1))
    else:
        uniform = jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(key, r), (1,)))(rows)
    u = (1.0 - uniform) * blocks[:, -1:]  # in (0, total]
    block = jnp.minimum(jnp.sum(blocks < u, axis=-1), blocks.shape[1] - 1)
    before = jnp.where(block > 0, jnp.take_along_axis(blocks, jnp.maximum(block - 1, 0)[:, None], 1)[:, 0], 0.0)
    inner = jnp.take_along_axis(probs, block[:, None, None], 1)[:, 0]  # [B, 256]
    within = jnp.sum(jnp.cumsum(inner, axis=-1) < (u - before[:, None]), axis=-1)
    # rounding between the two levels may overshoot the block: stay on its last token with mass
    # (a token of probability 0 is never returned)
    last = jnp.max(jnp.where(inner > 0, jnp.arange(_BLOCK), -1), axis=-1)
    token = (block * _BLOCK + jnp.minimum(within, last)).astype(jnp.int32)
    # a row whose drawn block holds no mass (its scores are not finite) takes the argmax: a vocabulary
    # pass that only such a step pays
    token = jax.lax.cond(jnp.all(last >= 0), lambda: token,
                         lambda: jnp.where(last >= 0, token, jnp.argmax(scores, axis=-1)).astype(jnp.int32))
    if not with_logp:
        return token
    # log softmax(scores)[token] from the draw's own maximum and total: no second pass over the vocabulary
    drawn = jnp.take_along_axis(scores, token[:, None], axis=-1)[:, 0]
    return token, drawn - peak[:, 0] - jnp.log(blocks[:, -1])


def _next_token(logits, key, settings, seen, rows=None):
    """(the next tokens [B], each one's log-prob under softmax(logits / temperature) [B], `token_logps`)."""
    temperature = settings["temperature"]

    def sampled(logits):
        scores = process_logits(logits, settings, seen)
        token, logp = draw(key, scores, rows, with_logp=True)
        # the draw's log-probs are the policy's where no penalty or filter changed the scores
        on = _filters_on(settings, logits.shape[-1])
        filtered = on["top_k"] | on["top_p"] | on["min_p"]
        if seen is not None:
            filtered = filtered | (settings["repetition_penalty"] != 1.0)
        return token, jax.lax.cond(filtered, lambda: token_logps(logits, token, temperature), lambda: logp)

    def greedy(logits):
        scores = logits.astype(jnp.float32)
        if seen is not None:
            penalty = settings["repetition_penalty"]
            scores = jnp.where(seen, jnp.where(scores < 0, scores * penalty, scores / penalty), scores)
        token = jnp.argmax(scores, axis=-1).astype(jnp.int32)
        return token, token_logps(logits, token, temperature)

    return jax.lax.cond(temperature > 0, sampled, greedy, logits)


def token_logps(logits: jax.Array, tokens: jax.Array, temperature) -> jax.Array:
    """log softmax(logits / temperature)[token] (temperature 0 counts as 1): [B] float32."""
    t = jnp.where(temperature > 0, temperature, 1.0)
    scaled = logits.astype(jnp.float32) / t
    return jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(scaled, axis=-1)


# ------------------------------------------------------------------------------------ the sampler


def _constrain(x: jax.Array, axes: tuple) -> jax.Array:
    """Shard by logical axes when a mesh is in context (the training mesh), else unchanged."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    from jaxtune.parallel.mesh import spec

    return jax.lax.with_sharding_constraint(x, spec(axes, x.shape, mesh))


def compaction_sizes(rows: int, unit: int = 8) -> list[int]:
    """The batch sizes a decode loop of `rows` rows steps through as rows end: each the largest multiple
    of `unit` at most 3/4 of the last, down to `unit` ([64, 48, 32, 24, 16, 8]). A size is compiled
    once per rollout shape, so the ratio keeps the phases few while a row that has ended costs at most
    a third more than the live ones."""
    sizes = [rows]
    while (nxt := sizes[-1] * 3 // 4 // unit * unit) >= unit:
        sizes.append(nxt)
    return sizes


def _compacts(rows: int) -> bool:
    """Whether the decode loop drops ended rows: on a CPU (a decode step costs what its rows cost; on an
    accelerator reading the weights dominates and a smaller batch saves nothing), with the rows not
    split over devices (the live rows are gathered across the batch)."""
    if jax.default_backend() != "cpu" or rows < 16:
        return False
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return True
    from jaxtune.parallel.mesh import spec

    return spec(("batch",), (rows,), mesh)[0] is None


def sample(model, prompt_ids: jax.Array, prompt_segments: jax.Array, key: jax.Array, settings: dict, *,
           max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int, num_generations: int = 1,
           cache_dtype: Any = None, compact: bool | None = None) -> SampleOutput:
    """Complete left-padded prompts [B, W] (segments 1 on tokens, 0 on padding): `num_generations`
    completions each, rows prompt-major. Trace it inside a jit (see `make_rollout`).

    With `compact` (default: on a CPU with the rows on one device, `_compacts`) the loop runs in phases
    of decreasing batch size (`compaction_sizes`): when the live rows fit the next size, they are
    gathered (cache included) and the ended ones dropped, so a batch whose completions end early does
    not pay full-batch steps for the longest one. Each row draws from its own key (the step's key
    folded with the row's index), so the tokens are the same with or without compaction."""
    batch, width = prompt_ids.shape
    g = num_generations
    rows = batch * g
    dtype = cache_dtype or model.dtype

    def constrained(cache):
        return dataclasses.replace(cache, k=_constrain(cache.k, KVCache.AXES), v=_constrain(cache.v, KVCache.AXES))

    positions = jnp.maximum(jnp.cumsum(prompt_segments, axis=1) - 1, 0)
    # the prompts' keys and values, once: the shared prefix of their rows' completions, which get slots of their own
    hidden, prompts = model.decode(prompt_ids, prompt_segments, positions, constrained(
        KVCache.create(model.cfg, batch, width, dtype)))
    cache = dataclasses.replace(constrained(KVCache.create(model.cfg, rows, max_new_tokens, dtype)), prefix=prompts)
    logits = model.logits(hidden[:, -1])
    if g > 1:  # one prefill, shared G ways
        repeat = functools.partial(jnp.repeat, repeats=g, axis=0)
        logits, positions, prompt_ids, prompt_segments = map(repeat, (logits, positions, prompt_ids, prompt_segments))
    vocab = logits.shape[-1]
    seen = jnp.zeros((rows, vocab), jnp.int32).at[jnp.arange(rows)[:, None], prompt_ids].add(prompt_segments) > 0
    eos = jnp.asarray(sorted(set(eos_ids)), jnp.int32)
    # per live slot: (logits, cache, position, seen tokens, ended, the row it holds)
    live = (logits, cache, positions[:, -1], seen, jnp.zeros((rows,), bool), jnp.arange(rows, dtype=jnp.int32))
    # per row: tokens, log-probs, lengths
    out = (jnp.full((rows, max_new_tokens), pad_id, jnp.int32), jnp.zeros((rows, max_new_tokens), jnp.float32),
           jnp.zeros((rows,), jnp.int32))

    def body(carry, identity: bool):
        """One token for every slot. `identity`: slot i holds row i (before any compaction), so the
        per-row outputs are written in place, with no scatter over rows that may be sharded."""
        step, key, (logits, cache, pos, seen, done, row), (tokens, logps, lengths) = carry
        key, step_key = jax.random.split(key)
        token, logp = _next_token(logits, step_key, settings, seen, row)
        logp = jnp.where(done, 0.0, logp)
        token = jnp.where(done, pad_id, token)
        if identity:
            tokens, logps = tokens.at[:, step].set(token), logps.at[:, step].set(logp)
            lengths = lengths + (~done).astype(jnp.int32)
        else:  # a slot whose row has ended writes the padding (and 0) it already holds
            tokens, logps = tokens.at[row, step].set(token), logps.at[row, step].set(logp)
            lengths = lengths.at[row].add((~done).astype(jnp.int32))
        size = row.shape[0]
        seen = seen.at[jnp.arange(size), token].set(True)
        done = done | jnp.isin(token, eos)
        pos = pos + 1
        hidden, cache = model.decode(token[:, None], jnp.ones((size, 1), jnp.int32), pos[:, None], cache)
        return step + 1, key, (model.logits(hidden[:, 0]), cache, pos, seen, done, row), (tokens, logps, lengths)

    sizes = compaction_sizes(rows) if (_compacts(rows) if compact is None else compact) else [rows]

    def phases(carry, phase: int):
        """The decode loop from phase `phase` on: its rows (the live ones gathered into `sizes[phase]`
        slots after the first phase) until they fit the next phase's, which runs only if rows are
        left to decode (a gather of the cache costs what a few decode steps do)."""
        if phase:
            carry = carry[:2] + (_keep_live(carry[2], sizes[phase]),) + carry[3:]
        after = sizes[phase + 1] if phase + 1 < len(sizes) else 0  # leave once the live rows fit the next size

        def cond(carry):
            step, _, live, _ = carry
            return (step < max_new_tokens) & (jnp.sum(~live[4]) > after)

        carry = jax.lax.while_loop(cond, functools.partial(body, identity=phase == 0), carry)
        if not after:
            return carry[3]
        step, _, live, _ = carry
        return jax.lax.cond((step < max_new_tokens) & jnp.any(~live[4]), functools.partial(phases, phase=phase + 1),
                            lambda carry: carry[3], carry)

    tokens, logps, lengths = phases((jnp.int32(0), key, live, out), 0)
    finished = jnp.isin(jnp.take_along_axis(tokens, lengths[:, None] - 1, axis=1)[:, 0], eos)
    return SampleOutput(tokens, lengths, finished, logps)


def _keep_live(live: tuple, size: int) -> tuple:
    """The decode state's first `size` slots after a stable sort that puts the live ones first (all of
    them, when at most `size` are live)."""
    logits, cache, pos, seen, done, row = live
    keep = jnp.argsort(done, stable=True)[:size]
    take = functools.partial(jnp.take, indices=keep, axis=0)
    return take(logits), cache.take_rows(keep), take(pos), take(seen), take(done), take(row)


def make_rollout(graphdef, *, max_new_tokens: int, eos_ids: Sequence[int], pad_id: int, num_generations: int = 1,
                 cache_dtype: Any = None, merge_adapters: bool = False):
    """A jitted (trainable, frozen, prompt_ids, prompt_segments, key, settings) -> SampleOutput for a
    model split as (graphdef, trainable, frozen): one compile per prompt width. `merge_adapters`: the
    rollout samples from its own copy of the weights with the LoRA adapters folded in
    (`jaxtune.peft.lora.merge_for_sampling`, once per rollout), not with them live."""
    eos = tuple(sorted(set(int(e) for e in eos_ids)))

    def rollout(trainable, frozen, prompt_ids, prompt_segments, key, settings):
        model = nnx.merge(graphdef, trainable, frozen)
        if merge_adapters:
            from jaxtune.peft.lora import merge_for_sampling

            merge_for_sampling(model)
        return sample(model, prompt_ids, prompt_segments, key, settings, max_new_tokens=max_new_tokens, eos_ids=eos,
                      pad_id=pad_id, num_generations=num_generations, cache_dtype=cache_dtype)

    return jax.jit(rollout)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts as left-padded [B, W] ids and segments (W: a multiple of `bucket`, so similar batches
    share one compiled sampler)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise JaxtuneError("every prompt needs at least one token")
    width = -(-max(len(p) for p in prompts) // bucket) * bucket
    ids = np.full((len(prompts), width), pad_id, np.int32)
    segments = np.zeros((len(prompts), width), np.int32)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        segments[row, width - len(p):] = 1
    return ids, segments


class Sampler:
    """Generates continuations of token-id prompts with a model (any jaxtune CausalLM)."""

    def __init__(self, model, *, eos_token_ids: Sequence[int], pad_token_id: int, prompt_bucket: int = 32,
                 cache_dtype: Any = None):
        if not eos_token_ids:
            raise JaxtuneError("the sampler needs at least one end-of-sequence token id")
        self.graphdef, self.state = nnx.split(model)
        self.eos = tuple(sorted(set(int(e) for e in eos_token_ids)))
        self.pad = int(pad_token_id)
        self.bucket = prompt_bucket
        self.cache_dtype = cache_dtype or model.dtype
        self._compiled = jax.jit(self._generate, static_argnames=("max_new_tokens",))

    def __call__(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> SampleOutput:
        ids, segments = left_pad(prompts, self.pad, self.bucket)
        out = self._compiled(self.state, jnp.asarray(ids), jnp.asarray(segments), jax.random.key(sampling.seed),
                             sampling.traced(), max_new_tokens=sampling.max_new_tokens)
        return jax.tree.map(np.asarray, out)

    def _generate(self, state, prompt_ids, prompt_segments, key, settings, *, max_new_tokens):
        return sample(nnx.merge(self.graphdef, state), prompt_ids, prompt_segments, key, settings,
                      max_new_tokens=max_new_tokens, eos_ids=self.eos, pad_id=self.pad, cache_dtype=self.cache_dtype)


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
