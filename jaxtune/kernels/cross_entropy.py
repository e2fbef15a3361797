"""Cross-entropy straight from hidden states and the LM head, in token chunks.

This is the role of Axolotl's `cut_cross_entropy` / Liger's fused linear cross-entropy: the
[tokens, vocab] logits (49k-152k wide) are never materialised for the whole batch, only for one
chunk of tokens at a time, in float32.

Two functions, each with a custom VJP:

- `linear_cross_entropy(hidden, head, targets, weights)` -> sum_t weights[t] * nll[t], the SFT loss.
  Its gradient is linear in the (scalar) output cotangent, so the forward pass of the VJP computes
  the gradients w.r.t. the hidden states and the head chunk by chunk while each chunk's logits are
  at hand (as Liger does), and the backward pass only scales them: the head matmul runs once per
  direction, as in the plain computation, and nothing of vocabulary size is kept. Without
  differentiation (eval) only the loss is computed.
- `linear_token_logprobs(hidden, head, targets)` -> log p(target_t) per token, for objectives that
  weight tokens after the fact (DPO, GRPO, KTO). With a frozen head (LoRA) the forward also computes
  each token's d log p / d hidden while the chunk's logits are at hand (the backward only scales it by
  the token's cotangent); with a trained head it keeps the per-token logsumexp and the backward
  recomputes each chunk's logits. With `with_entropy`, also each token's entropy of
  the whole distribution, from the same chunks (a metric: no gradient flows through it).
- `linear_log_sum_sq_probs(hidden, head)` -> log sum_v p_v^2 per token (DPO's WPO weights; no gradient).

The head's gradient is computed only when the head is being differentiated (full fine-tuning, or
`lora_modules_to_save` with the LM head); a frozen head (LoRA) costs no weight-gradient matmul.

Layout: `hidden` [N, D] (tokens flattened); `head` [V, D] (`vocab_axis=0`, a tied embedding table)
or [D, V] (`vocab_axis=1`, an lm_head kernel). Logits are `hidden @ head` in the hidden states'
dtype with float32 accumulation, and everything after that is float32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxtune.kernels.blockwise import tile_length

# Elements of one chunk of float32 logits (tokens x vocab). On a CPU 2**24 floats = 64 MiB: chunks
# of 256 tokens for a 49k vocabulary, 64 for 152k. A GPU or TPU gets 2**27 (512 MiB: 1024 tokens at
# Llama 3's 128k): measured on an H200 (scripts/bench_gpu.py, Llama-3.2-1B shapes, 16k tokens), 128-token
# chunks made the loss 3.4x slower than its matmuls alone, from small-M matmuls and from adding the
# float32 head gradient ([V, D], 1 GiB) into its accumulator once per chunk.
CHUNK_ELEMENTS = {"cpu": 2**24}
ACCELERATOR_CHUNK_ELEMENTS = 2**27


def chunk_elements(platform: str | None = None) -> int:
    """The float32 logits one chunk may hold on `platform` (default: JAX's default backend)."""
    return CHUNK_ELEMENTS.get(platform or jax.default_backend(), ACCELERATOR_CHUNK_ELEMENTS)


def default_chunk_size(vocab_size: int, platform: str | None = None) -> int:
    """Tokens per chunk: a power of two whose float32 logits stay within chunk_elements() (>= 16)."""
    return max(16, 2 ** int(math.log2(max(1, chunk_elements(platform) // vocab_size))))


def chunk_rows(tokens: int, vocab_size: int, chunk_size: int | None = None) -> int:
    """Tokens per chunk for `tokens` rows: `chunk_size` as given, or the fewest chunks of at most
    default_chunk_size() tokens, split evenly (rounded up to 8): 576 tokens at a 49k vocabulary run as
    3 x 192, not 3 x 256 with 192 rows of padding through the head."""
    if chunk_size:
        return min(chunk_size, tokens)
    return max(1, tile_length(tokens, default_chunk_size(vocab_size)))  # the attention tiles' even split


def _chunked(x: jax.Array, chunk: int, fill=0) -> jax.Array:
    """[N, ...] -> [ceil(N / chunk), chunk, ...], padding the tail with `fill`."""
    n = x.shape[0]
    pad = -n % chunk
    if pad:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
    return x.reshape(-1, chunk, *x.shape[1:])


def _logits(h: jax.Array, head: jax.Array, vocab_axis: int, softcap: float | None) -> jax.Array:
    """A chunk's float32 logits, soft-capped (cap * tanh(logits / cap), Gemma's final_logit_softcapping)
    when `softcap` is set."""
    dims = ((1,), (1,)) if vocab_axis == 0 else ((1,), (0,))
    logits = jax.lax.dot_general(h, head.astype(h.dtype), (dims, ((), ())), preferred_element_type=jnp.float32)
    return logits if softcap is None else jnp.float32(softcap) * jnp.tanh(logits / jnp.float32(softcap))


def _through_cap(dlogits: jax.Array, logits: jax.Array, softcap: float | None) -> jax.Array:
    """dL/d(uncapped logits) from dL/d(capped logits): times 1 - tanh^2 = 1 - (capped / cap)^2."""
    return dlogits if softcap is None else dlogits * (1.0 - jnp.square(logits / jnp.float32(softcap)))


def _hidden_grad(dlogits: jax.Array, head: jax.Array, vocab_axis: int, dtype) -> jax.Array:
    """dL/dh [C, D] from dL/dlogits [C, V]."""
    dims = ((1,), (0,)) if vocab_axis == 0 else ((1,), (1,))
    return jax.lax.dot_general(dlogits.astype(dtype), head.astype(dtype), (dims, ((), ())),
                               preferred_element_type=jnp.float32)


def _head_grad(dlogits: jax.Array, h: jax.Array, vocab_axis: int) -> jax.Array:
    """dL/dhead in the head's layout ([V, D] or [D, V]), float32."""
    d = dlogits.astype(h.dtype)
    if vocab_axis == 0:
        return jax.lax.dot_general(d, h, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return jax.lax.dot_general(h, d, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _target_logit(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]


# ---------------------------------------------------------------------------------- summed loss


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _ce_sum(hidden, head, targets, weights, chunk, vocab_axis, softcap):
    def body(total, xs):
        h, t, w = xs
        logits = _logits(h, head, vocab_axis, softcap)
        nll = jax.nn.logsumexp(logits, axis=-1) - _target_logit(logits, t)
        return total + jnp.sum(jnp.where(w != 0, w * nll, 0.0)), None

    xs = (_chunked(hidden, chunk), _chunked(targets, chunk), _chunked(weights, chunk))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total


def _ce_sum_fwd(hidden, head, targets, weights, chunk, vocab_axis, softcap):
    hidden, head, need_head = hidden.value, head.value, head.perturbed
    targets, weights = targets.value, weights.value
    vocab = head.shape[vocab_axis]

    def body(carry, xs):
        total, dhead = carry
        h, t, w = xs
        logits = _logits(h, head, vocab_axis, softcap)
        lse = jax.nn.logsumexp(logits, axis=-1)
        nll = lse - _target_logit(logits, t)
        total = total + jnp.sum(jnp.where(w != 0, w * nll, 0.0))
        # d(sum w * nll)/dlogits = w * (softmax - onehot(target))
        dlogits = jnp.exp(logits - lse[:, None]) - jax.nn.one_hot(t, vocab, dtype=jnp.float32)
        dlogits = _through_cap(dlogits * w[:, None], logits, softcap)
        dh = _hidden_grad(dlogits, head, vocab_axis, h.dtype)
        if need_head:
            dhead = dhead + _head_grad(dlogits, h, vocab_axis)
        return (total, dhead), dh

    xs = (_chunked(hidden, chunk), _chunked(targets, chunk), _chunked(weights, chunk))
    dhead0 = jnp.zeros(head.shape, jnp.float32) if need_head else None
    (total, dhead), dh = jax.lax.scan(body, (jnp.zeros((), jnp.float32), dhead0), xs)
    dh = dh.reshape(-1, hidden.shape[-1])[: hidden.shape[0]].astype(hidden.dtype)
    return total, (dh, None if dhead is None else dhead.astype(head.dtype))


def _ce_sum_bwd(chunk, vocab_axis, softcap, res, g):
    dh, dhead = res
    dhidden = (g * dh).astype(dh.dtype)
    return dhidden, None if dhead is None else (g * dhead).astype(dhead.dtype), None, None


_ce_sum.defvjp(_ce_sum_fwd, _ce_sum_bwd, symbolic_zeros=True)


def linear_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array, weights: jax.Array, *,
                         vocab_axis: int = 0, chunk_size: int | None = None,
                         softcap: float | None = None) -> jax.Array:
    """sum_t weights[t] * -log softmax(hidden[t] @ head)[targets[t]] (float32 scalar).

    hidden [N, D]; targets [N] int; weights [N] float (0 drops a token, whatever its target);
    head [V, D] (`vocab_axis=0`) or [D, V] (`vocab_axis=1`). Differentiable w.r.t. hidden and head.
    `softcap`: the logits are cap * tanh(logits / cap) (Gemma 2's final_logit_softcapping).
    """
    chunk = chunk_rows(hidden.shape[0], head.shape[vocab_axis], chunk_size)
    targets = jnp.where(weights != 0, targets, 0).astype(jnp.int32)
    return _ce_sum(hidden, head, targets, weights.astype(jnp.float32), chunk, vocab_axis, softcap)


# ------------------------------------------------------------------------------ per-token logprobs


def _logprob_chunks(hidden, head, targets, chunk, vocab_axis, softcap, *, jacobian: bool = False):
    """Per token: log p(target), the logsumexp, and the entropy of the distribution; with `jacobian`,
    also d log p(target) / d hidden [N, D] (float32)."""
    def body(_, xs):
        h, t = xs
        logits = _logits(h, head, vocab_axis, softcap)
        lse = jax.nn.logsumexp(logits, axis=-1)
        probs = jnp.exp(logits - lse[:, None])
        out = (_target_logit(logits, t) - lse, lse, lse - jnp.sum(probs * logits, axis=-1))
        if jacobian:  # d(logit[t] - lse)/dlogits = onehot(t) - softmax, through the head
            unit = _through_cap(jax.nn.one_hot(t, logits.shape[-1], dtype=jnp.float32) - probs, logits, softcap)
            out = (*out, _hidden_grad(unit, head, vocab_axis, h.dtype))
        return None, out

    _, out = jax.lax.scan(body, None, (_chunked(hidden, chunk), _chunked(targets, chunk)))
    n = hidden.shape[0]
    return tuple(x.reshape(-1, *x.shape[2:])[:n] for x in out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _token_logprobs(hidden, head, targets, chunk, vocab_axis, softcap):
    logp, _, entropy = _logprob_chunks(hidden, head, targets, chunk, vocab_axis, softcap)
    return logp, entropy


def _token_logprobs_fwd(hidden, head, targets, chunk, vocab_axis, softcap):
    need_head = head.perturbed
    hidden, head, targets = hidden.value, head.value, targets.value
    if not need_head:
        # A frozen head (LoRA): log p(target) is a function of its own token's hidden state, so its
        # gradient there is a fixed vector times the token's cotangent. Computed here while each chunk's
        # logits are at hand, it leaves the backward no head matmul: two [tokens, vocab] products in all
        # instead of three (the backward recomputing the logits, then multiplying through the head).
        logp, _, entropy, jacobian = _logprob_chunks(hidden, head, targets, chunk, vocab_axis, softcap,
                                                     jacobian=True)
        return (logp, entropy), (jacobian.astype(hidden.dtype),)
    logp, lse, entropy = _logprob_chunks(hidden, head, targets, chunk, vocab_axis, softcap)
    return (logp, entropy), (hidden, head, targets, lse)


def _token_logprobs_bwd(chunk, vocab_axis, softcap, res, cotangents):
    g, _ = cotangents  # the entropy is a metric: no gradient flows through it
    if len(res) == 1:  # d log p / d hidden, from the forward
        (jacobian,) = res
        return (g[:, None] * jacobian.astype(jnp.float32)).astype(jacobian.dtype), None, None
    hidden, head, targets, lse = res  # a head being trained (full fine-tuning): recompute the logits
    vocab = head.shape[vocab_axis]

    def body(dhead, xs):
        h, t, l, gc = xs
        logits = _logits(h, head, vocab_axis, softcap)
        # d(logit[t] - lse)/dlogits = onehot(t) - softmax
        dlogits = (jax.nn.one_hot(t, vocab, dtype=jnp.float32) - jnp.exp(logits - l[:, None])) * gc[:, None]
        dlogits = _through_cap(dlogits, logits, softcap)
        return dhead + _head_grad(dlogits, h, vocab_axis), _hidden_grad(dlogits, head, vocab_axis, h.dtype)

    xs = (_chunked(hidden, chunk), _chunked(targets, chunk), _chunked(lse, chunk), _chunked(g, chunk))
    dhead, dh = jax.lax.scan(body, jnp.zeros(head.shape, jnp.float32), xs)
    dh = dh.reshape(-1, hidden.shape[-1])[: hidden.shape[0]].astype(hidden.dtype)
    return dh, dhead.astype(head.dtype), None


_token_logprobs.defvjp(_token_logprobs_fwd, _token_logprobs_bwd, symbolic_zeros=True)


def linear_token_logprobs(hidden: jax.Array, head: jax.Array, targets: jax.Array, *, vocab_axis: int = 0,
                          chunk_size: int | None = None, with_entropy: bool = False, softcap: float | None = None):
    """log softmax(hidden[t] @ head)[targets[t]] for each token t: [N] float32 (shapes as in
    `linear_cross_entropy`). Differentiable w.r.t. hidden and head. `with_entropy`: (log-probs,
    entropies [N]), the entropies computed in the same chunks and carrying no gradient."""
    chunk = chunk_rows(hidden.shape[0], head.shape[vocab_axis], chunk_size)
    logp, entropy = _token_logprobs(hidden, head, targets.astype(jnp.int32), chunk, vocab_axis, softcap)
    return (logp, entropy) if with_entropy else logp


def linear_log_sum_sq_probs(hidden: jax.Array, head: jax.Array, *, vocab_axis: int = 0,
                            chunk_size: int | None = None, softcap: float | None = None) -> jax.Array:
    """log sum_v softmax(hidden[t] @ head)_v^2 for each token t: [N] float32, without gradient
    (DPO's WPO weights; TRL's `log_sum_sq_probs`)."""
    hidden, head = jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(head)
    chunk = chunk_rows(hidden.shape[0], head.shape[vocab_axis], chunk_size)

    def body(_, h):
        logits = _logits(h, head, vocab_axis, softcap)
        return None, jax.nn.logsumexp(2 * logits, axis=-1) - 2 * jax.nn.logsumexp(logits, axis=-1)

    _, out = jax.lax.scan(body, None, _chunked(hidden, chunk))
    return out.reshape(-1)[: hidden.shape[0]]
