"""The train step against references: one LoRA step against PEFT + torch AdamW, full fine-tuning
against transformers + torch AdamW, gradient accumulation against one big batch, the loss against
its formula, the schedules against transformers' schedulers, compile-once, micro-batches of their own
lengths against the stacked step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_updates_close, save_tiny
from flax import nnx

from jaxtune.checkpoint.hf import load_model
from jaxtune.config import build_config
from jaxtune.objectives.sft import SFT
from jaxtune.optim import build_optimizer, build_schedule
from jaxtune.peft import lora
from jaxtune.step import make_train_step

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 1e-3
OPTIM = dict(optimizer="adamw_torch", learning_rate=LR, lr_scheduler="constant", weight_decay=0.01,
             max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8)
# Losses of two correct computations (another reduction order, another kernel, torch vs XLA): each is
# a mean of N ~ 100 log-softmax terms over V ~ 100 classes, rounded in fp32 to about
# (log2 N + log2 V) * eps ~ 2e-6 relative; after steps the parameters differ only where Adam amplifies
# rounding (elements with a near-zero gradient, whose effect on the loss is near zero too). 1e-5 sits
# above that on any machine; a real error (a wrong or missing gradient term) moves the loss after one
# Adam step by lr * sum|grad| ~ 1e-3 relative, 100x more.
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=128)
    return save_tiny(tmp_path_factory.mktemp("train_step"), cfg, "tiny")


def _batch(seed: int, rows: int = 4, length: int = 24, vocab: int = 96):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (rows, length)).astype(np.int32)
    labels = ids.copy()
    for r in range(rows):  # a prompt of varying length that does not train
        labels[r, : 3 + 4 * r] = -100
    return {"input_ids": ids, "labels": labels, "segment_ids": np.ones_like(ids),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape).copy()}


def _stack(batch, micro: int):
    """[B, L] -> [micro, B/micro, L]."""
    return {k: v.reshape(micro, v.shape[0] // micro, *v.shape[1:]) for k, v in batch.items()}


def _jax_steps(model, filt, batches, cfg_keys, micro=1):
    cfg = build_config(cfg_keys)
    graphdef, trainable, frozen = nnx.split(model, filt, ...)
    optimizer, schedule = build_optimizer(cfg, total_steps=10)
    opt_state = optimizer.init(trainable)
    step = make_train_step(graphdef, SFT(), optimizer, schedule, use_rng=False)
    losses = []
    for i, b in enumerate(batches):
        trainable, opt_state, out = step(trainable, frozen, opt_state, _stack(b, micro), jax.random.key(0), jnp.int32(i))
        losses.append(float(out["loss"]))
    nnx.update(model, trainable)
    return losses, step


def _torch_steps(model, params, batches, decay_names=None):
    import torch

    groups = [{"params": [p for n, p in params if decay_names is None or n in decay_names], "weight_decay": 0.01}]
    if decay_names is not None:
        groups.append({"params": [p for n, p in params if n not in decay_names], "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    losses = []
    for b in batches:
        opt.zero_grad()
        out = model(input_ids=torch.tensor(b["input_ids"], dtype=torch.long),
                    labels=torch.tensor(b["labels"], dtype=torch.long))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        losses.append(float(out.loss))
    return losses


def test_lora_steps_match_peft(tiny_dir):
    check_lora_steps_match_peft(tiny_dir, TARGETS)


def check_lora_steps_match_peft(model_dir, targets: list[str]) -> None:
    """Three LoRA steps (rsLoRA, non-zero B so A and B both learn from step one) on `targets` (PEFT's
    module names, any family) against PEFT + torch AdamW on the same weights and batches."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = load_model(model_dir)
    spec = lora.LoraSpec(r=4, alpha=8, targets=tuple(targets), use_rslora=True)
    lora.add_lora(model, spec, jax.random.key(1))
    for i, linear in enumerate(lora.layer_linears(model).values()):
        b = linear.lora_b.get_value()
        linear.lora_b.set_value(0.1 * jax.random.normal(jax.random.key(10 + i), b.shape))
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0,
                                                 use_rslora=True))

    def peft_name(name, layer, kind):
        return f"base_model.model.{lora.module_path(model, name, layer)}.{kind}.default.weight"

    named = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, linear in lora.layer_linears(model).items():
            for layer in range(model.cfg.num_layers):
                named[peft_name(name, layer, "lora_A")].copy_(torch.tensor(np.asarray(linear.lora_a[...][layer]).T))
                named[peft_name(name, layer, "lora_B")].copy_(torch.tensor(np.asarray(linear.lora_b[...][layer]).T))
    batches = [_batch(0), _batch(1), _batch(2)]
    before = _adapters(model)
    ours, _ = _jax_steps(model, lora.trainable_filter(model, spec), batches, OPTIM)
    theirs = _torch_steps(peft_model, [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad], batches)
    np.testing.assert_allclose(ours, theirs, rtol=LOSS_RTOL)
    named = dict(peft_model.named_parameters())
    after = _adapters(model)
    reference = [named[peft_name(*key)].detach().numpy().T for key in after]
    assert_updates_close(list(before.values()), list(after.values()), reference, lr=LR, steps=len(batches),
                         names=[str(k) for k in after])


def _adapters(model) -> dict:
    """{(projection, layer, lora_A / lora_B): array} of a model's adapters."""
    out = {}
    for name, linear in lora.layer_linears(model).items():
        for layer in range(model.cfg.num_layers):
            for var, kind in ((linear.lora_a, "lora_A"), (linear.lora_b, "lora_B")):
                out[(name, layer, kind)] = np.asarray(var[...][layer]).copy()
    return out


def test_full_finetuning_steps_match_transformers(tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from jaxtune.checkpoint.hf import hf_tensors

    model = load_model(tiny_dir)
    batches = [_batch(3), _batch(4)]
    ours, _ = _jax_steps(model, nnx.Param, batches, OPTIM)
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="eager")
    params = list(ref.named_parameters())
    before = {n: p.detach().numpy().copy() for n, p in params}
    decay = {n for n, _ in params if not n.endswith("bias") and "norm" not in n}  # HF Trainer's rule
    theirs = _torch_steps(ref, params, batches, decay)
    np.testing.assert_allclose(ours, theirs, rtol=LOSS_RTOL)
    ref_state = {n: p.detach().numpy() for n, p in ref.named_parameters()}
    tensors = {t.name: t.produce() for t in hf_tensors(model)}
    assert sorted(tensors) == sorted(ref_state)
    assert_updates_close([before[n] for n in tensors], list(tensors.values()), [ref_state[n] for n in tensors],
                         lr=LR, steps=len(batches), names=list(tensors))


def test_gradient_accumulation_equals_one_big_batch(tiny_dir):
    """4 micro-batches of 1 row = 1 batch of 4 rows, although the rows train different token counts
    (a per-micro-batch mean would weight them differently)."""
    results = []
    for micro in (1, 4):
        model = load_model(tiny_dir)
        spec = lora.LoraSpec(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
        lora.add_lora(model, spec, jax.random.key(1))
        before = [np.asarray(x).copy() for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))]
        losses, _ = _jax_steps(model, lora.trainable_filter(model, spec), [_batch(5), _batch(6)], OPTIM, micro=micro)
        results.append((losses, [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))]))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=LOSS_RTOL)
    assert_updates_close(before, results[1][1], results[0][1], lr=LR, steps=2)


def test_step_compiles_once(tiny_dir):
    model = load_model(tiny_dir)
    spec = lora.LoraSpec(r=2, alpha=4, targets=("q_proj",))
    lora.add_lora(model, spec, jax.random.key(0))
    _, step = _jax_steps(model, lora.trainable_filter(model, spec), [_batch(i) for i in range(4)], OPTIM, micro=2)
    assert step.traces == 1


def test_ragged_micro_batches_equal_the_stacked_step(tiny_dir):
    """Micro-batches each padded to its own length (RaggedStep, GRPO's) give the step the stacked
    micro-batches padded to the longest give: the same loss, metrics and updated weights, over two
    steps (the second reuses each length's compiled call); one compile per length."""
    from jaxtune.step import RaggedStep

    def trimmed(b, length):  # the row's tail beyond `length` as padding, then cut off
        b = {k: v.copy() for k, v in b.items()}
        b["labels"][:, length:] = -100
        b["segment_ids"][:, length:] = 0
        b["input_ids"][:, length:] = 0
        return b

    micro_lengths = [16, 24, 8]
    steps = [[trimmed(_batch(10 * s + a, rows=2), n) for a, n in enumerate(micro_lengths)] for s in range(2)]
    results = []
    for ragged in (False, True):
        model = load_model(tiny_dir)
        spec = lora.LoraSpec(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
        lora.add_lora(model, spec, jax.random.key(1))
        before = [np.asarray(x).copy() for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))]
        graphdef, trainable, frozen = nnx.split(model, lora.trainable_filter(model, spec), ...)
        optimizer, schedule = build_optimizer(build_config(OPTIM), total_steps=10)
        opt_state = optimizer.init(trainable)
        step = (RaggedStep if ragged else make_train_step)(graphdef, SFT(), optimizer, schedule, use_rng=False)
        records = []
        for i, micros in enumerate(steps):
            if ragged:
                cut = [{k: jnp.asarray(v[None, :, :n]) for k, v in m.items()} for m, n in zip(micros, micro_lengths)]
                trainable, opt_state, out, _ = step(trainable, frozen, opt_state, cut, jax.random.key(0), jnp.int32(i))
            else:
                stacked = {k: jnp.asarray(np.stack([m[k] for m in micros])) for k in micros[0]}
                trainable, opt_state, out = step(trainable, frozen, opt_state, stacked, jax.random.key(0), jnp.int32(i))
            records.append({k: float(v) for k, v in out.items()})
        results.append((records, jax.tree.leaves(trainable), step.traces))
    (stacked_records, stacked_params, _), (ragged_records, ragged_params, traces) = results
    for a, b in zip(stacked_records, ragged_records):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=LOSS_RTOL, err_msg=k)
    assert_updates_close(before, [np.asarray(x) for x in ragged_params], [np.asarray(x) for x in stacked_params],
                         lr=LR, steps=2)
    assert traces == len(set(micro_lengths))


@pytest.mark.parametrize("chunked", [True, False])
def test_sft_loss_formula_and_segment_boundaries(tiny_dir, chunked):
    """SFT's loss is the mean next-token NLL over trained positions, never across a packed boundary,
    with the chunked and the plain cross-entropy alike."""
    model = load_model(tiny_dir)
    model.chunked_loss = chunked
    ids = np.array([[1, 2, 3, 4, 5, 6, 7, 0]], np.int32)
    labels = np.array([[-100, 2, 3, 4, 5, -100, 7, -100]], np.int32)
    segments = np.array([[1, 1, 1, 2, 2, 2, 2, 0]], np.int32)
    positions = np.array([[0, 1, 2, 0, 1, 2, 3, 0]], np.int32)
    batch = {"input_ids": ids, "labels": labels, "segment_ids": segments, "positions": positions}
    loss_sum, metrics = SFT().loss(model, jax.tree.map(jnp.asarray, batch), None)
    logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(segments), jnp.asarray(positions)), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    # trained: 0->2, 1->3 (segment 1); 2->4 crosses into segment 2; 3->5 (segment 2); 4->-100 no;
    # 5->7 (segment 2); 6->pad no.
    expected = -(logp[0, 0, 2] + logp[0, 1, 3] + logp[0, 3, 5] + logp[0, 5, 7])
    assert float(metrics["weight"]) == 4
    np.testing.assert_allclose(float(loss_sum), expected, rtol=1e-5)


@pytest.mark.parametrize("attn,remat", [("blockwise", "none"), ("blockwise", "full"), ("pallas", "none"),
                                        ("xla", "dots"), ("xla", "full"), ("xla", "offload"),
                                        ("blockwise", "offload")])
def test_attention_backends_and_remat_train_like_the_reference(tiny_dir, attn, remat, monkeypatch):
    """Three LoRA steps on packed rows with each attention backend (the Pallas kernel interpreted off
    GPU) and remat policy give the reference's (xla attention, default policy) losses and adapters."""
    import jaxtune.kernels.attention as attention_mod
    import jaxtune.kernels.blockwise as blockwise
    import jaxtune.kernels.pallas_gpu as pallas_gpu

    # Several tiles, some skipped, over 24 tokens (Triton's matrix products need 16 on a GPU).
    for module, name in ((blockwise, "Q_BLOCK"), (blockwise, "KV_BLOCK"), (pallas_gpu, "BLOCK_Q"),
                         (pallas_gpu, "BLOCK_K"), (pallas_gpu, "BWD_OUTER"), (pallas_gpu, "BWD_INNER")):
        monkeypatch.setattr(module, name, 16 if jax.default_backend() == "gpu" else 8)
    monkeypatch.setitem(attention_mod._PLATFORMS, "pallas", (jax.default_backend(),))

    def packed(seed):
        b = _batch(seed)
        b["segment_ids"] = np.repeat(np.array([[1] * 9 + [2] * 7 + [3] * 5 + [0] * 3]), 4, axis=0).astype(np.int32)
        b["positions"] = np.array([list(range(9)) + list(range(7)) + list(range(5)) + [0, 1, 2]] * 4, np.int32)
        return b

    results = []
    for impl, policy in ((attn, remat), ("xla", "none")):
        model = load_model(tiny_dir, attn_implementation=impl, remat=policy)
        spec = lora.LoraSpec(r=4, alpha=8, targets=tuple(TARGETS))
        lora.add_lora(model, spec, jax.random.key(0))
        for name in TARGETS:  # non-zero B so the adapters shape the attention inputs from step one
            mod = lora.layer_linears(model)[name]
            mod.lora_b.set_value(0.05 * jax.random.normal(jax.random.key(1), mod.lora_b.get_value().shape))
        before = [np.asarray(x).copy() for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))]
        losses, _ = _jax_steps(model, lora.trainable_filter(model, spec), [packed(i) for i in range(3)], OPTIM)
        results.append((losses, [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))]))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=LOSS_RTOL)
    assert_updates_close(before, results[0][1], results[1][1], lr=LR, steps=3)


def test_chunked_loss_gives_the_plain_step_with_a_tied_head(tmp_path):
    """Full fine-tuning of a tied-embedding model: the chunked cross-entropy's step (head gradient
    through the embedding table, vocab axis 0) equals the plain full-logits step."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128)
    path = save_tiny(tmp_path, cfg, "tied")
    results = []
    for chunked in (True, False):
        model = load_model(path)
        model.chunked_loss = chunked
        before = [np.asarray(x).copy() for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
        losses, _ = _jax_steps(model, nnx.Param, [_batch(0), _batch(1)], OPTIM)
        results.append((losses, [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=LOSS_RTOL)
    assert_updates_close(before, results[0][1], results[1][1], lr=LR, steps=2)


@pytest.mark.parametrize("kind,extra", [
    ("linear", {}), ("cosine", {}), ("cosine", {"cosine_min_lr_ratio": 0.1}), ("constant", {}),
    ("constant_with_warmup", {}), ("cosine_with_restarts", {"cosine_restarts": 3}),
])
def test_schedules_match_transformers(kind, extra):
    import torch
    from transformers import get_scheduler

    total, warmup, lr = 40, 5, 3e-4
    cfg = build_config({"learning_rate": lr, "lr_scheduler": kind, "warmup_steps": warmup, **extra})
    ours = [float(build_schedule(cfg, total)(s)) for s in range(total)]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    if kind == "cosine" and extra:
        from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

        sched = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=0.1)
    else:
        kwargs = {"scheduler_specific_kwargs": {"num_cycles": 3}} if kind == "cosine_with_restarts" else {}
        sched = get_scheduler(kind, opt, num_warmup_steps=warmup, num_training_steps=total, **kwargs)
    theirs = []
    for _ in range(total):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # The schedule runs in float32 (a few ulps of the peak learning rate), HF's in float64.
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=8 * np.finfo(np.float32).eps * lr)


@pytest.mark.parametrize("remat", ["full", "none"])
def test_blockwise_step_memory_grows_linearly_with_length(tmp_path, remat, monkeypatch):
    """Doubling the sequence at most about doubles the compiled LoRA step's temporaries with
    blockwise attention. (Masks depending only on loop-invariant segment ids once got hoisted out
    of the layer scan and stacked over every tile: quadratic, 26.7 GB at 8k tokens on SmolLM2.)"""
    import jaxtune.kernels.blockwise as blockwise

    monkeypatch.setattr(blockwise, "Q_BLOCK", 256)  # 8 x 8 and 16 x 16 tiles
    monkeypatch.setattr(blockwise, "KV_BLOCK", 256)
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=4096)
    model = load_model(save_tiny(tmp_path, cfg, "long"), attn_implementation="blockwise", remat=remat)
    spec = lora.LoraSpec(r=4, alpha=8, targets=tuple(TARGETS))
    lora.add_lora(model, spec, jax.random.key(0))
    graphdef, trainable, frozen = nnx.split(model, lora.trainable_filter(model, spec), ...)

    def temp_bytes(length):
        ids = jnp.zeros((1, length), jnp.int32)
        batch = {"input_ids": ids, "labels": ids, "segment_ids": jnp.ones_like(ids),
                 "positions": jnp.arange(length, dtype=jnp.int32)[None]}

        def loss(trainable):
            return SFT().loss(nnx.merge(graphdef, trainable, frozen), batch, None)[0]

        return jax.jit(jax.grad(loss)).lower(trainable).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(4096) <= 2.5 * temp_bytes(2048)


def test_activation_offloading_keeps_saved_activations_in_host_memory(tiny_dir, monkeypatch):
    """Axolotl's activation_offloading picks the offload remat policy where devices have pinned host memory
    (the CPU backend has it too): the backward's saved activations are put in host memory (above: it
    trains like the reference). Devices without host memory fall back to full remat, with a warning."""
    import jaxtune.build as build

    cfg = build_config({"base_model": str(tiny_dir), "datasets": [{"path": "x.jsonl", "type": "completion"}],
                        "activation_offloading": True})
    assert build.resolve_remat(cfg) == "offload"
    ids = jnp.asarray(_batch(0)["input_ids"])

    def grad_jaxpr(remat):
        model = load_model(tiny_dir, remat=remat)
        graphdef, params = nnx.split(model)
        return str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p).hidden_states(ids))))(params))

    assert "MemorySpace.Host" in grad_jaxpr("offload") and "MemorySpace.Host" not in grad_jaxpr("none")

    class NoHost:
        def addressable_memories(self):
            return [type("M", (), {"kind": "device"})()]

    said = []
    monkeypatch.setattr(build.jax, "devices", lambda: [NoHost()])
    monkeypatch.setattr(build, "warn_once", said.append)
    assert build.resolve_remat(cfg) == "full" and "no pinned host memory" in said[0]
