"""Mixture of experts (Mixtral, Qwen3-MoE): logits against transformers, the grouped matmuls against a
dense every-expert product, the load-balancing loss against transformers' (with padding), full
fine-tuning steps with the aux loss against transformers + torch AdamW, LoRA on the attention against
PEFT, HF -> jaxtune -> HF bit-exact (one checkpoint tensor per expert and part), greedy decoding."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_updates_close, cpu_env, hf_logits, save_tiny
from families import check_greedy_matches_transformers, check_qlora_trains_and_adapter_loads, check_round_trip_is_bit_exact
from flax import nnx
from test_train_step import LOSS_RTOL, OPTIM, _batch, _jax_steps, _stack, _torch_steps
from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

import jaxtune
from jaxtune.checkpoint.hf import load_model
from jaxtune.models import moe

BASE = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
MIXTRAL = dict(intermediate_size=48, num_local_experts=6, num_experts_per_tok=2)
QWEN3 = dict(intermediate_size=80, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=3)
QWEN2 = dict(QWEN3, shared_expert_intermediate_size=48)  # Qwen2-MoE: plus a gated shared expert
# A Qwen3-MoE whose middle layer is dense (routed, dense, routed: both stacks sliced into runs), and one
# with decoder_sparse_step=2 (dense, routed, dense, routed: one scan over the repeated pair)
QWEN3_MIXED = dict(QWEN3, num_hidden_layers=3, mlp_only_layers=[1])
QWEN3_STEP2 = dict(QWEN3, num_hidden_layers=4, decoder_sparse_step=2)
CASES = {
    "mixtral": (MixtralConfig, MIXTRAL),
    "mixtral-window-tied-top3": (MixtralConfig, dict(MIXTRAL, sliding_window=7, tie_word_embeddings=True,
                                                      num_experts_per_tok=3)),
    "qwen3moe": (Qwen3MoeConfig, dict(QWEN3, norm_topk_prob=False)),
    "qwen3moe-normalized-top1": (Qwen3MoeConfig, dict(QWEN3, norm_topk_prob=True, num_experts_per_tok=1)),
    # dense layers (a Qwen3 MLP of intermediate_size) stacked apart: runs of routed and dense layers
    "qwen3moe-dense-layers": (Qwen3MoeConfig, dict(QWEN3, num_hidden_layers=4, mlp_only_layers=[0, 2, 3])),
    "qwen3moe-sparse-step-2": (Qwen3MoeConfig, QWEN3_STEP2),
    "qwen2moe": (Qwen2MoeConfig, QWEN2),
    "qwen2moe-dense-window-normalized": (Qwen2MoeConfig, dict(QWEN2, num_hidden_layers=4, mlp_only_layers=[2],
                                                              use_sliding_window=True, sliding_window=5,
                                                              max_window_layers=2, norm_topk_prob=True)),
}


def _config(kind, **kw):
    return kind(**{**BASE, **kw})


def _tiny_model_dir(family: str, kind, keys: dict):
    """A module-scoped fixture `<family>_dir`: a tiny random checkpoint of that config, saved once."""
    @pytest.fixture(scope="module", name=f"{family}_dir")
    def fixture(tmp_path_factory):
        return save_tiny(tmp_path_factory.mktemp(family), _config(kind, **keys), family)
    return fixture


mixtral_dir = _tiny_model_dir("mixtral", MixtralConfig, MIXTRAL)
qwen3moe_dir = _tiny_model_dir("qwen3moe", Qwen3MoeConfig, QWEN3)
qwen2moe_dir = _tiny_model_dir("qwen2moe", Qwen2MoeConfig, QWEN2)
qwen3moe_mixed_dir = _tiny_model_dir("qwen3moe_mixed", Qwen3MoeConfig, QWEN3_MIXED)
qwen3moe_step2_dir = _tiny_model_dir("qwen3moe_step2", Qwen3MoeConfig, QWEN3_STEP2)


@pytest.fixture(params=["batched", "ragged"])
def grouped(request, monkeypatch):
    """Both grouped matmuls run every model test (ragged_dot is what GPUs and TPUs use)."""
    monkeypatch.setattr(moe.SparseMoE, "GROUPED_MATMUL", request.param)
    return request.param


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case, grouped):
    kind, keys = CASES[case]
    path = save_tiny(tmp_path, _config(kind, **keys), "moe")
    ids = np.random.default_rng(0).integers(0, 96, (2, 24))
    model, _ = jaxtune.load_pretrained(path)
    got = np.asarray(jax.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))
    assert np.abs(got - hf_logits(path, ids)).max() <= 1e-4, case


@pytest.mark.parametrize("impl, capacity, tile", [("ragged", None, None), ("batched", None, 16), ("batched", 8, 8),
                                                  ("batched", 40, None)])
def test_grouped_matmul_equals_every_expert_dense(impl, capacity, tile):
    """Rows sorted by group (some groups empty, two past the batched capacity: 37 rows over two overflow
    tiles, 20 over one; capacity 40: none) against each row times its own group's matrix, forward and
    both gradients; rows past the groups come out zero."""
    rng = np.random.default_rng(0)
    sizes = np.array([5, 0, 37, 1, 0, 20], np.int32)
    m, k, n = int(sizes.sum()) + 3, 16, 24
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(len(sizes), k, n)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
    group = jnp.asarray(np.concatenate([np.repeat(np.arange(len(sizes)), sizes), [-1] * 3]))

    def dense(x, w):  # every row times every group's matrix, the own one kept
        every = jnp.einsum("mk,gkn->mgn", x, w)
        return jnp.sum(every * jax.nn.one_hot(group, len(sizes))[..., None], axis=1)

    def loss(f):
        return lambda x, w: jnp.sum(f(x, w) * cot)

    got = moe.grouped_matmul(x, w, jnp.asarray(sizes), impl, capacity, tile)
    np.testing.assert_allclose(np.asarray(got), np.asarray(dense(x, w)), atol=1e-5)
    assert not np.asarray(got[-3:]).any()
    g_got = jax.grad(loss(lambda x, w: moe.grouped_matmul(x, w, jnp.asarray(sizes), impl, capacity, tile)), (0, 1))(x, w)
    g_want = jax.grad(loss(dense), (0, 1))(x, w)
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


@pytest.mark.parametrize("impl, capacity", [("ragged", None), ("batched", None), ("batched", 8)])
def test_grouped_matmul_with_adapters_equals_every_expert_dense(impl, capacity):
    """Per-group LoRA adapters in the same pass: each row times W_g + s * A_g @ B_g, forward and the
    gradients of x, A and B (capacity 8: most rows through the overflow tiles)."""
    rng = np.random.default_rng(1)
    sizes = np.array([9, 0, 30, 2, 17], np.int32)
    m, k, n, r = int(sizes.sum()) + 2, 12, 10, 3
    x, w, a, b, cot = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in
                       [(m, k), (len(sizes), k, n), (len(sizes), k, r), (len(sizes), r, n), (m, n)])
    group = jax.nn.one_hot(jnp.asarray(np.concatenate([np.repeat(np.arange(len(sizes)), sizes), [-1] * 2])),
                           len(sizes))
    scale = 0.7

    def dense(x, a, b):
        every = jnp.einsum("mk,gkn->mgn", x, w + scale * jnp.einsum("gkr,grn->gkn", a, b))
        return jnp.sum(every * group[..., None], axis=1)

    def grouped(x, a, b):
        return moe.grouped_matmul(x, w, jnp.asarray(sizes), impl, capacity, lora=(a, b, scale))

    np.testing.assert_allclose(np.asarray(grouped(x, a, b)), np.asarray(dense(x, a, b)), atol=1e-4)
    got = jax.grad(lambda *p: jnp.sum(grouped(*p) * cot), (0, 1, 2))(x, a, b)
    want = jax.grad(lambda *p: jnp.sum(dense(*p) * cot), (0, 1, 2))(x, a, b)
    for g, h in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), atol=1e-4)


def test_aux_loss_equals_transformers_with_padding(mixtral_dir):
    """transformers' load_balancing_loss_func over both layers, padding excluded by the attention mask
    (ours: segment id 0)."""
    from transformers import AutoModelForCausalLM

    ids = np.random.default_rng(1).integers(3, 96, (2, 20))
    mask = np.ones_like(ids)
    mask[1, 14:] = 0
    hf = AutoModelForCausalLM.from_pretrained(mixtral_dir, dtype=torch.float32)
    with torch.no_grad():
        want = float(hf(torch.tensor(ids), attention_mask=torch.tensor(mask), output_router_logits=True).aux_loss)
    model = load_model(mixtral_dir)
    model.collect_router_stats = True
    model.hidden_states(jnp.asarray(ids), jnp.asarray(mask))
    aux, load = moe.router_terms(model)
    assert abs(float(aux) - want) <= 1e-6 * want, (float(aux), want)
    assert load.shape == (2, 6) and np.allclose(np.asarray(load).mean(-1), 1.0)


# Qwen3-MoE's routed layers run in both mixed models
@pytest.mark.parametrize("family", ["mixtral", "qwen3moe_mixed", "qwen3moe_step2", "qwen2moe"])
def test_full_finetuning_steps_with_aux_loss_match_transformers(tmp_path, family):
    """Two full fine-tuning steps with output_router_logits (the aux loss weighs 0.3 here, so a missing
    or wrong aux gradient moves the router and experts visibly) against transformers + torch AdamW:
    losses, and the router, experts and attention after the steps."""
    from transformers import AutoModelForCausalLM

    kind, keys = {"mixtral": (MixtralConfig, MIXTRAL), "qwen3moe": (Qwen3MoeConfig, QWEN3),
                  "qwen3moe_mixed": (Qwen3MoeConfig, QWEN3_MIXED), "qwen3moe_step2": (Qwen3MoeConfig, QWEN3_STEP2),
                  "qwen2moe": (Qwen2MoeConfig, QWEN2)}[family]
    path = save_tiny(tmp_path, _config(kind, **keys, output_router_logits=True, router_aux_loss_coef=0.3), family)
    model = load_model(path)
    assert model.cfg.router_aux_loss_coef == 0.3
    batches = [_batch(3), _batch(4)]
    ours, step = _jax_steps(model, nnx.Param, batches, OPTIM)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    params = list(ref.named_parameters())
    before = {n: p.detach().numpy().copy() for n, p in params}
    decay = {n for n, _ in params if not n.endswith("bias") and "norm" not in n}
    theirs = _torch_steps(ref, params, batches, decay)
    np.testing.assert_allclose(ours, theirs, rtol=LOSS_RTOL)
    after = {n: p.detach().numpy() for n, p in ref.named_parameters()}
    ours_now = {}
    for stack in ("layers", "dense_layers"):
        for entry, layer in enumerate(model.cfg.stack_layers(stack)):
            mod, prefix = getattr(model, stack), f"model.layers.{layer}."

            def kernel(linear, entry=entry):
                return np.swapaxes(np.asarray(linear.kernel[...][entry]), -1, -2)
            ours_now[prefix + "self_attn.q_proj.weight"] = kernel(mod.self_attn.q_proj)
            if stack == "dense_layers":
                ours_now[prefix + "mlp.down_proj.weight"] = kernel(mod.mlp.down_proj)
                continue
            ours_now[prefix + "mlp.gate.weight"] = kernel(mod.mlp.gate)
            ours_now[prefix + "mlp.experts.gate_up_proj"] = kernel(mod.mlp.experts.gate_up_proj)
            ours_now[prefix + "mlp.experts.down_proj"] = kernel(mod.mlp.experts.down_proj)
            if family == "qwen2moe":  # the shared expert and its gate
                ours_now[prefix + "mlp.shared_expert.up_proj.weight"] = kernel(mod.mlp.shared_expert.up_proj)
                ours_now[prefix + "mlp.shared_expert_gate.weight"] = kernel(mod.mlp.shared_expert_gate)
    assert len(ours_now) == {"qwen3moe_mixed": 10, "qwen3moe_step2": 12, "qwen2moe": 12}.get(family, 8)
    names = list(ours_now)
    assert_updates_close([before[n] for n in names], [ours_now[n] for n in names], [after[n] for n in names],
                         lr=OPTIM["learning_rate"], steps=2, names=names)


def test_router_loss_and_load_are_logged(mixtral_dir):
    """The step's metrics carry aux_loss and the per-layer expert load (coefficient 0 here: the
    checkpoint does not ask for output_router_logits, so nothing is added to the loss)."""
    from jaxtune.config import build_config
    from jaxtune.objectives.sft import SFT
    from jaxtune.optim import build_optimizer
    from jaxtune.step import make_train_step

    model = load_model(mixtral_dir)
    assert model.cfg.router_aux_loss_coef == 0.0
    graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
    optimizer, schedule = build_optimizer(build_config({"base_model": str(mixtral_dir), **OPTIM}), total_steps=1)
    step = make_train_step(graphdef, SFT(), optimizer, schedule, use_rng=False)
    _, _, metrics = step(trainable, frozen, optimizer.init(trainable), _stack(_batch(3), 2), jax.random.key(0),
                         jnp.int32(0))
    assert {"aux_loss", "expert_load_max", "expert_load_min", "expert_load_max/layer_0",
            "expert_load_max/layer_1"} <= set(metrics)
    assert float(metrics["aux_loss"]) > 0.9 and float(metrics["expert_load_min"]) <= 1.0 <= float(metrics["expert_load_max"])


@pytest.mark.parametrize("family", ["mixtral", "qwen3moe", "qwen3moe_mixed", "qwen2moe"])
def test_round_trip_is_bit_exact(tmp_path, family, request):
    check_round_trip_is_bit_exact(request.getfixturevalue(f"{family}_dir"), tmp_path / "out")


@pytest.mark.parametrize("family", ["mixtral", "qwen3moe_mixed", "qwen3moe_step2"])
def test_greedy_matches_transformers_generate(family, request):
    check_greedy_matches_transformers(request.getfixturevalue(f"{family}_dir"))


def test_configs_that_cannot_be_honoured_are_errors(tmp_path):
    with pytest.raises(jaxtune.errors.ModelLoadError, match=r"every layer is dense.*Qwen3ForCausalLM"):
        load_model(save_tiny(tmp_path / "a", _config(Qwen3MoeConfig, **QWEN3, mlp_only_layers=[0, 1]), "a"))
    from jaxtune.models import qwen3_moe  # an mlp_only_layers index past the layers names none (as transformers)

    assert qwen3_moe.dense_layers(_config(Qwen3MoeConfig, **QWEN3, mlp_only_layers=[0, 5]), "Qwen3") == (0,)
    with pytest.raises(jaxtune.errors.ModelLoadError, match="router_jitter_noise"):
        load_model(save_tiny(tmp_path / "b", _config(MixtralConfig, **MIXTRAL, router_jitter_noise=0.1), "b"))


def test_unfrozen_parameters_name_layers_in_either_stack(qwen3moe_mixed_dir):
    """unfrozen_parameters by HF names: layer 1 is the dense stack's only entry, layer 2 the routed
    stack's second."""
    from jaxtune.peft.unfrozen import select_unfrozen

    paths, masks = select_unfrozen(load_model(qwen3moe_mixed_dir),
                                   ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.gate.weight"])
    assert paths == {("dense_layers", "mlp", "down_proj", "kernel"), ("layers", "mlp", "gate", "kernel")}
    assert list(masks) == ["layers/mlp/gate/kernel"]  # the dense stack's one entry trains whole
    assert masks["layers/mlp/gate/kernel"].reshape(2, -1)[:, 0].tolist() == [0.0, 1.0]


LORA_CASES = {
    # the attention, every expert (PEFT's target_parameters: one adapter per expert on the stacked
    # gate_up_proj / down_proj) and the router
    "mixtral": (("q_proj", "v_proj"), ("mlp.experts.gate_up_proj", "experts.down_proj", "mlp.gate.weight")),
    # a dense middle layer (its attention adapted, the experts of the others)
    "qwen3moe_mixed": (("q_proj", "v_proj"), ("mlp.experts.gate_up_proj",)),
    # a shared expert beside the routed ones (no adapter: PEFT reads its names as the experts')
    "qwen2moe": (("k_proj", "o_proj"), ("mlp.experts.down_proj", "mlp.gate.weight")),
}


@pytest.mark.parametrize("family", sorted(LORA_CASES))
def test_lora_on_experts_and_router_matches_peft(tmp_path, family, request):
    """LoRA on the attention, the experts (and router, or a dense layer's MLP): our adapters, written as
    a PEFT adapter, load in PEFT; three training steps on both sides give the same losses and adapters;
    the trained adapter we write equals PEFT's own save, key for key."""
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from jaxtune.peft import adapter, lora

    model_dir = request.getfixturevalue(f"{family}_dir")
    model = load_model(model_dir)
    targets, parameters = LORA_CASES[family]
    spec = lora.LoraSpec(r=4, alpha=8, targets=targets, parameters=parameters)
    lora.add_lora(model, spec, jax.random.key(1))
    for i, module in enumerate(adapter.adapted_modules(model).values()):
        if hasattr(module, "lora_b"):  # B != 0: A and B both learn from the first step
            b = module.lora_b.get_value()
            module.lora_b.set_value(0.1 * jax.random.normal(jax.random.key(10 + i), b.shape))
    adapter.save_adapter(model, spec, tmp_path / "start")
    start = load_file(str(tmp_path / "start" / "adapter_model.safetensors"))
    if family == "mixtral":
        assert "base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight" in start  # gate_up_proj, inner
        assert start["base_model.model.model.layers.1.mlp.experts.lora_B.weight"].shape == (64, 4 * 6)  # down_proj
        assert start["base_model.model.model.layers.0.mlp.gate.lora_B.weight"].shape == (6, 4)
    elif family == "qwen2moe":
        assert "base_model.model.model.layers.0.mlp.gate.lora_A.weight" in start
        assert not any("shared_expert" in k for k in start)
    else:
        assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in start  # the dense layer
        assert "base_model.model.model.layers.2.mlp.experts.lora_A.weight" in start
        assert not any(".layers.1.mlp" in k for k in start)
        with pytest.raises(jaxtune.errors.JaxtuneError, match="gate_proj"):  # PEFT would adapt the experts
            lora.add_lora(load_model(model_dir), lora.LoraSpec(r=4, alpha=8, targets=("gate_proj",)), jax.random.key(1))
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "start"), is_trainable=True)
    batches = [_batch(0), _batch(1), _batch(2)]
    ours, _ = _jax_steps(model, lora.trainable_filter(model, spec), batches, OPTIM)
    theirs = _torch_steps(peft_model, [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad], batches)
    np.testing.assert_allclose(ours, theirs, rtol=LOSS_RTOL)
    adapter.save_adapter(model, spec, tmp_path / "ours")
    peft_model.save_pretrained(str(tmp_path / "peft"))
    got = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want)
    names = sorted(want)
    assert_updates_close([start[n] for n in names], [got[n] for n in names], [want[n] for n in names],
                         lr=OPTIM["learning_rate"], steps=3, names=names)


@pytest.mark.parametrize("family", [pytest.param("mixtral", marks=pytest.mark.slow), "qwen3moe_mixed"])
def test_expert_adapter_round_trips_and_merges(tmp_path, family, request):
    """A PEFT adapter on the experts (and, with a dense layer, on every layer's q_proj) read back onto a
    fresh model (lora_model_dir) gives the same logits, and folded into the weights (`jaxtune generate
    --adapter`) too; the merged export equals PEFT's merge_and_unload in transformers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jaxtune.peft import adapter, lora

    mixtral_dir = request.getfixturevalue(f"{family}_dir")
    model = load_model(mixtral_dir)
    spec = lora.LoraSpec(r=2, alpha=4, targets=("q_proj",) if family == "qwen3moe_mixed" else (),
                         parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))
    lora.add_lora(model, spec, jax.random.key(2))
    for i, module in enumerate(adapter.adapted_modules(model).values()):
        if hasattr(module, "lora_b"):
            module.lora_b.set_value(0.2 * jax.random.normal(jax.random.key(20 + i), module.lora_b.get_value().shape))
    adapter.save_adapter(model, spec, tmp_path / "a")
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 96, (1, 16)))
    want = np.asarray(model(ids))
    again = load_model(mixtral_dir)
    adapter.load_adapter(again, tmp_path / "a")
    np.testing.assert_allclose(np.asarray(again(ids)), want, atol=1e-5)
    merged = adapter.merge_peft_adapter(load_model(mixtral_dir), tmp_path / "a")
    np.testing.assert_allclose(np.asarray(merged(ids)), want, atol=1e-5)
    jaxtune.save_pretrained(model, tmp_path / "hf")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(mixtral_dir, dtype=torch.float32),
                                           str(tmp_path / "a"))
    with torch.no_grad():
        theirs = peft_model(torch.tensor(np.asarray(ids))).logits.numpy()
    np.testing.assert_allclose(hf_logits(tmp_path / "hf", np.asarray(ids)), theirs, atol=1e-4)
    np.testing.assert_allclose(want, theirs, atol=1e-4)


EP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from jaxtune.checkpoint.hf import load_model
    from jaxtune.objectives.sft import SFT
    from jaxtune.parallel import experts as EP, mesh as M
    from jaxtune.peft import lora
    from jaxtune.step import with_router_loss

    assert jax.device_count() == 8
    calls = []
    traced = EP.moe_ffn
    EP.moe.register_expert_parallel(lambda *a: calls.append(1) or traced(*a))
    path = sys.argv[1]
    model = load_model(path, attn_implementation="blockwise")
    spec = lora.LoraSpec(r=4, alpha=8, targets=("q_proj", "o_proj"),
                         parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"))
    lora.add_lora(model, spec, jax.random.key(0))
    for i, (name, module) in enumerate(lora.layer_parameters(model).items()):
        module.lora_b.set_value(0.1 * jax.random.normal(jax.random.key(i), module.lora_b.get_value().shape))
    graphdef, trainable, frozen = nnx.split(model, lora.trainable_filter(model, spec), ...)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 128, (8, 32)).astype(np.int32)
    seg = np.array([[1] * 13 + [2] * 11 + [3] * 6 + [0] * 2] * 8, np.int32)
    pos = np.array([list(range(13)) + list(range(11)) + list(range(6)) + [0, 0]] * 8, np.int32)
    batch = {"input_ids": ids, "labels": ids, "segment_ids": seg, "positions": pos}
    objective = SFT()
    batch = objective.finalize(batch)

    def loss_fn(trainable, frozen, b):
        m = nnx.merge(graphdef, trainable, frozen)
        m.collect_router_stats = True
        totals = objective.totals(jax.tree.map(lambda x: x[None], b))
        loss, sums = objective.loss(m, b, None, None, totals)
        loss, sums = with_router_loss(m, loss, sums, totals["weight"])
        return loss / totals["weight"], sums["aux_loss"] / totals["weight"]

    grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    plan = M.MeshPlan(fsdp=2, expert=4)
    mesh = plan.make()
    result = {}
    for mode in ("random", "remote"):
        if mode == "remote":  # every token's first choice is expert 7, which only the last expert device holds
            router = dict(nnx.to_flat_state(frozen))[("layers", "mlp", "gate", "kernel")]
            router.set_value(router.get_value().at[..., 7].add(50.0))
        (loss, aux), grads = grad(trainable, frozen, batch)
        placed = M.place_training_state(plan, mesh, trainable, frozen, optax.sgd(0.1))
        with jax.set_mesh(mesh):
            (loss_ep, aux_ep), grads_ep = grad(placed.trainable, placed.frozen, M.place_batch(batch, mesh))
        errors = {jax.tree_util.keystr(p): float(np.abs(np.asarray(a) - np.asarray(b)).max()
                                                 / max(1e-6, np.abs(np.asarray(a)).max()))
                  for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_ep))}
        specs = {jax.tree_util.keystr(p): list(x.sharding.spec)
                 for p, x in jax.tree_util.tree_leaves_with_path(placed.trainable)}
        result[mode] = {"loss": [float(loss), float(loss_ep)], "aux": [float(aux), float(aux_ep)],
                        "grad_errors": errors, "calls": len(calls), "specs": specs}
    print("RESULT " + json.dumps(result))
    """
)


def test_expert_parallel_equals_one_device(tmp_path):
    """expert=4 x fsdp=2 on 8 CPU devices (two experts per device, rows split over all eight) against one
    device: the loss, the load-balancing loss and every gradient (LoRA on attention, experts, router),
    with the router as trained (`random`), then sending every token's first choice to expert 7, held by
    one device only (`remote`): tokens on the other devices reach it only through the dispatch (on the
    Mixtral this test first ran, a computation without the all-to-all was 95x over the loss tolerance).
    The model is a Qwen3-MoE whose middle layer is dense: that stack is split over the same mesh."""
    path = save_tiny(tmp_path, _config(Qwen3MoeConfig, **dict(QWEN3_MIXED, vocab_size=128, num_experts=8,
                                                               num_experts_per_tok=2, max_position_embeddings=128)),
                     "qwen3moe8")
    env = cpu_env(8)
    proc = subprocess.run([sys.executable, "-c", EP_SCRIPT, str(path)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    for mode, result in results.items():
        assert result["calls"] > 0  # the expert-parallel dispatch ran
        (loss, loss_ep), (aux, aux_ep) = result["loss"], result["aux"]
        assert abs(loss - loss_ep) <= 1e-5 * loss and abs(aux - aux_ep) <= 1e-5 * aux, mode
        # fp32 sums of the same products in another order (per device, then across): ~1e-6 of each
        # gradient's scale; a token's copy lost or sent to the wrong expert moves gradients by O(1)
        bad = {k: v for k, v in result["grad_errors"].items() if v > 1e-4}
        assert not bad, (mode, bad)
        experts = [s for k, s in result["specs"].items() if "experts" in k and "lora_a" in k]
        assert experts and all(s[1] == "expert" for s in experts), result["specs"]


def test_plan_counts_experts_per_device_and_the_dispatch(mixtral_dir):
    """`jaxtune plan` of a Mixtral (6 experts; LoRA on the attention and the experts) on 8 devices: with
    expert_parallel_size=2 each device holds half of the experts (and of their adapters) where
    data parallelism holds them all; the dispatch buffers add to the activations; QLoRA leaves the
    experts and the router in float, as bitsandbytes does."""
    from jaxtune.config import build_config
    from jaxtune.plan import _abstract_state, plan_memory

    keys = {"base_model": str(mixtral_dir), "adapter": "lora", "lora_target_linear": True, "lora_r": 4,
            "lora_alpha": 8, "lora_target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
            "sequence_len": 64, "micro_batch_size": 2}
    frozen, trainable, _, _ = _abstract_state(build_config(keys))

    def expert_bytes(state):
        return sum(v.get_value().size * v.get_value().dtype.itemsize for p, v in nnx.to_flat_state(state)
                   if "experts" in [str(k) for k in p])

    data = plan_memory(build_config(keys), devices=8, platform="cpu")
    expert = plan_memory(build_config({**keys, "expert_parallel_size": 2}), devices=8, platform="cpu")
    assert data.mesh.expert == 1 and expert.mesh.expert == 2 and expert.mesh.data == 4
    saved = 1 / 2 * (expert_bytes(frozen) + expert_bytes(trainable))
    assert data.params - expert.params == pytest.approx(saved, rel=1e-6)
    assert expert.activations > data.activations
    qlora = plan_memory(build_config({**keys, "adapter": "qlora", "load_in_4bit": True}), devices=1, platform="cpu")
    lora_plan = plan_memory(build_config(keys), devices=1, platform="cpu")
    attention = sum(v.get_value().size * 4 for p, v in nnx.to_flat_state(frozen)
                    if [str(k) for k in p][1] == "self_attn" and str(p[-1]) == "kernel")
    assert lora_plan.params - qlora.params == pytest.approx(attention * (1 - (0.5 + 4 / 64) / 4), rel=1e-6)


# float experts under QLoRA run the same LoRA path as plain LoRA (test_lora_on_experts_and_router_matches_peft)
@pytest.mark.parametrize("quantize_experts, family", [pytest.param(False, "qwen3moe", marks=pytest.mark.slow),
                                                       (True, "qwen3moe_mixed"), (False, "qwen2moe")])
def test_qlora_with_expert_adapters_trains_and_loads_in_peft(tmp_path, quantize_experts, family, request):
    """QLoRA through `jaxtune.train` on Qwen3-MoE / Qwen2-MoE with adapters on the attention and the
    experts: NF4 attention (the experts in float, as bitsandbytes leaves them, or NF4 too with
    quantize_moe_experts; a dense layer's MLP and Qwen2-MoE's shared expert and its gate NF4 as every
    nn.Linear); the loss falls and the PEFT adapter on the quantized base equals the merged export."""
    model_dir = request.getfixturevalue(f"{family}_dir")
    check_qlora_trains_and_adapter_loads(
        model_dir, tmp_path, ["q_proj", "k_proj", "v_proj", "o_proj"], quantize_moe_experts=quantize_experts,
        lora_target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], lora_dropout=0.0)
    from jaxtune.checkpoint.hf import load_model_config
    from jaxtune.peft.qlora import projection_paths

    paths = projection_paths(load_model_config(model_dir).architecture, quantize_experts)
    assert (("layers", "mlp", "experts", "down_proj", "kernel") in paths) == quantize_experts
    assert ("layers", "mlp", "gate", "kernel") not in paths
    assert ("dense_layers", "mlp", "down_proj", "kernel") in paths
    assert (("layers", "mlp", "shared_expert_gate", "kernel") in paths) == (family == "qwen2moe")
