"""Preference training against TRL 1.16's own trainers (+ PEFT), the reference model without a second
copy, prefix sharing against the unshared layout, precomputed reference log-probs, and the configs."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_updates_close, cpu_env, save_tiny

from jaxtune.config import ConfigError, build_config

PAIRS = [{"prompt": "Is the sky blue?", "chosen": "Yes, on a clear day.", "rejected": "No."},
         {"prompt": "What is 2+2?", "chosen": "4", "rejected": "Five, I think"},
         {"prompt": "Name a fruit", "chosen": "An apple", "rejected": "A rock, which is not a fruit at all"},
         {"prompt": "Say hi", "chosen": "Hi!", "rejected": "Go away."}]
CHATML = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
LR = 5e-3
LOSS_RTOL = 1e-5  # as tests/test_train_step.py: fp32 losses of two implementations; a real error is >1e-3


def _write_pairs(path: Path, rows=PAIRS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _records(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def start_adapter(tmp_path_factory, tiny_chat_dir):
    """A PEFT LoRA adapter on the tiny chat model with random A and B (B != 0, so both A and B get
    gradients from the first step and the policy differs from the base model)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("adapter") / "start"
    model.save_pretrained(out)
    return out


def _jaxtune_run(tmp_path, model_dir, adapter, rl, **keys):
    from jaxtune import train

    data = _write_pairs(tmp_path / "pairs.jsonl")
    cfg = build_config({
        "base_model": str(model_dir), "rl": rl, "datasets": [{"path": str(data), "type": "chatml.prompt_pairs"}],
        "adapter": "lora", "lora_model_dir": str(adapter), "sequence_len": 64, "micro_batch_size": 4,
        "num_epochs": 2, "learning_rate": LR, "optimizer": "adamw_torch", "lr_scheduler": "constant",
        "weight_decay": 0.0, "max_grad_norm": 1.0, "save_strategy": "no", "bf16": False,
        "output_dir": str(tmp_path / "out"), "dataset_prepared_path": str(tmp_path / "prep"), **keys})
    result = train.run(cfg)
    return result, _records(tmp_path / "out")


def _adapter_tensors(directory) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k.replace(".default", ""): v for k, v in load_file(str(Path(directory) / "adapter_model.safetensors")).items()}


def _trl_args(tmp_path, cls, **extra):
    return cls(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, num_train_epochs=2,
               learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
               optim="adamw_torch", use_cpu=True, bf16=False, report_to=[], logging_steps=1, save_strategy="no",
               seed=0, **extra)


def _peft_model(model_dir, adapter):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    return PeftModel.from_pretrained(base, adapter, is_trainable=True)


def _compare_adapters(start, ours, theirs, steps):
    a, b, s = _adapter_tensors(ours), theirs, _adapter_tensors(start)
    assert sorted(a) == sorted(b) == sorted(s)
    names = sorted(a)
    assert_updates_close([s[n] for n in names], [a[n] for n in names], [b[n] for n in names], lr=LR, steps=steps,
                         names=names)


@pytest.mark.parametrize("wpo", [False, True])
def test_dpo_lora_steps_equal_trl_dpo_trainer(tmp_path, tiny_chat_dir, start_adapter, wpo):
    """Two DPO (sigmoid) steps of LoRA from the same adapter, weights and pairs: jaxtune's loss,
    metrics and updated adapter against TRL's DPOTrainer + PEFT (its reference: a frozen copy of the
    starting adapter, as ours); with and without WPO weighting (dpo_use_weighting)."""
    import datasets
    from trl import DPOConfig, DPOTrainer
    from transformers import AutoTokenizer

    result, records = _jaxtune_run(tmp_path, tiny_chat_dir, start_adapter, "dpo", rl_beta=0.3,
                                   **({"dpo_use_weighting": True} if wpo else {}))
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["pairs"] == 4 for r in steps)

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    rows = [{"prompt": CHATML.format(p["prompt"]), "chosen": p["chosen"] + "<|im_end|>",
             "rejected": p["rejected"] + "<|im_end|>"} for p in PAIRS]
    trainer = DPOTrainer(model=_peft_model(tiny_chat_dir, start_adapter), processing_class=tokenizer,
                         args=_trl_args(tmp_path, DPOConfig, beta=0.3, max_length=None, use_weighting=wpo),
                         train_dataset=datasets.Dataset.from_list(rows))
    trainer.train()
    theirs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(theirs) == 2
    for ours, ref in zip(steps, theirs):
        np.testing.assert_allclose(ours["loss"], ref["loss"], rtol=LOSS_RTOL)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
            np.testing.assert_allclose(ours[key], ref[key], rtol=1e-4, atol=1e-5, err_msg=key)
        assert ours["rewards/accuracies"] == ref["rewards/accuracies"]
    assert abs(steps[1]["rewards/margins"]) > 1e-3  # the second step's rewards are really compared
    trained = {n.replace(".default", ""): p.detach().numpy() for n, p in trainer.model.named_parameters()
               if "lora_" in n and ".default." in n}
    _compare_adapters(start_adapter, Path(result.exports["adapter"]), trained, steps=2)


def _our_examples(tokenizer, rows):
    """Our encoder's examples of `rows` (chatml.prompt_pairs), as TRL's older trainers tokenize them:
    prompt + answer with the prompt's labels -100."""
    from jaxtune.config import DatasetConfig
    from jaxtune.data.formats import build_encoder, tokenizer_info

    enc = build_encoder(DatasetConfig(path="p", type="chatml.prompt_pairs"), tok=tokenizer_info(tokenizer),
                        top_template="tokenizer_default", top_jinja=None, train_on_inputs=False, sequence_len=64,
                        rl="dpo")
    out = []
    for i, row in enumerate(rows):
        [ex] = enc(row, f"row {i}")
        p = ex["prompt_ids"]
        item = {"prompt": "x", "chosen": "x", "rejected": "x", "prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
        for side in ("chosen", "rejected"):
            ids = p + ex[f"{side}_ids"]
            item.update({f"{side}_input_ids": ids, f"{side}_attention_mask": [1] * len(ids),
                         f"{side}_labels": [-100] * len(p) + ex[f"{side}_ids"]})
        out.append(item)
    return out


def test_simpo_lora_steps_equal_trl_cpo_trainer(tmp_path, tiny_chat_dir, start_adapter):
    """Two SimPO steps (TRL's CPOTrainer, loss_type simpo, with its default cpo_alpha = 1 NLL term:
    a per-pair mean plus a per-token mean) against jaxtune's `rl: simpo`, same pairs, weights and
    hyperparameters: losses, metrics and the updated adapter."""
    import datasets
    from transformers import AutoTokenizer
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    result, records = _jaxtune_run(tmp_path, tiny_chat_dir, start_adapter, "simpo", rl_beta=2.0, simpo_gamma=0.5)
    steps = [r for r in records if "loss" in r]

    class PreTokenized(CPOTrainer):  # our tokens (TRL's CPO would add its own BOS/EOS)
        def tokenize_row(self, feature, model=None):
            return {k: v for k, v in feature.items() if k.endswith(("_input_ids", "_attention_mask", "_labels"))}

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    args = _trl_args(tmp_path, CPOConfig, loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=1.0,
                     max_length=512, remove_unused_columns=False)
    trainer = PreTokenized(model=_peft_model(tiny_chat_dir, start_adapter), processing_class=tokenizer, args=args,
                           train_dataset=datasets.Dataset.from_list(_our_examples(tokenizer, PAIRS)))
    trainer.train()
    theirs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(theirs) == len(steps) == 2
    for ours, ref in zip(steps, theirs):
        np.testing.assert_allclose(ours["loss"], ref["loss"], rtol=LOSS_RTOL)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                    "nll_loss"):
            np.testing.assert_allclose(ours[key], ref[key], rtol=1e-5, atol=1e-5, err_msg=key)
        assert ours["rewards/accuracies"] == ref["rewards/accuracies"]
    trained = {n.replace(".default", ""): p.detach().numpy() for n, p in trainer.model.named_parameters()
               if "lora_" in n and ".default." in n}
    _compare_adapters(start_adapter, Path(result.exports["adapter"]), trained, steps=2)


# -- prefix sharing ------------------------------------------------------------------------------

def _pair_rows(share: bool, seed: int = 0, vocab: int = 96):
    """Two packed rows of pairs (prompt + two answers, 2 and 1 pairs) in one layout, as a batch."""
    from jaxtune.data import preference
    from jaxtune.objectives.preference import DPO

    rng = np.random.default_rng(seed)

    def ids(n):
        return rng.integers(3, vocab, n).tolist()

    examples = {"prompt_ids": [ids(7), ids(5), ids(9)], "chosen_ids": [ids(4), ids(6), ids(3)],
                "rejected_ids": [ids(5), ids(2), ids(6)]}
    examples["chosen_labels"] = [list(x) for x in examples["chosen_ids"]]
    examples["rejected_labels"] = [list(x) for x in examples["rejected_ids"]]
    rows, _ = preference.lay_out(examples, kind="preference", capacity=48, packed=True, share=share)
    objective = DPO(loss_types=["sigmoid"], loss_weights=None, beta=0.1, pad_id=0, examples_per_row=2)
    batch = objective.collate([{k: v[i] for k, v in rows.items()} for i in range(len(rows["input_ids"]))], 48)
    return objective, objective.finalize(batch)


@pytest.fixture(scope="module")
def tiny96(tmp_path_factory):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=128)
    return save_tiny(tmp_path_factory.mktemp("pref"), cfg, "tiny96")


@pytest.mark.parametrize("impl", ["xla", "blockwise", "pallas"])
def test_shared_prompts_give_the_unshared_log_probs(tiny96, impl, monkeypatch):
    """Per-pair chosen / rejected log-probs from rows with shared prompts equal those from the same
    pairs laid out whole, with each attention backend (small tiles, so whole tiles are skipped and
    masked; the Pallas kernel interpreted off GPU). fp32: the same products in another order, 1e-5."""
    import jaxtune.kernels.attention as attention_mod
    import jaxtune.kernels.blockwise as blockwise
    import jaxtune.kernels.pallas_gpu as pallas_gpu
    from jaxtune.checkpoint.hf import load_model

    for module, name in ((blockwise, "Q_BLOCK"), (blockwise, "KV_BLOCK"), (pallas_gpu, "BLOCK_Q"),
                         (pallas_gpu, "BLOCK_K")):
        monkeypatch.setattr(module, name, 16 if jax.default_backend() == "gpu" else 8)
    monkeypatch.setitem(attention_mod._PLATFORMS, "pallas", (jax.default_backend(),))
    model = load_model(tiny96, attn_implementation=impl)
    got = []
    for share in (True, False):
        objective, batch = _pair_rows(share)
        got.append(np.asarray(objective.reference_logps(model, jax.tree.map(jnp.asarray, batch))))
    valid = np.asarray(batch["example_valid"]) > 0
    assert valid.sum() == 3 and np.all(got[1][valid] < -5)  # three real pairs, real log-probs
    # the layouts pack the pairs in a different order (by their lengths): compare pair by pair
    shared, whole = (g[valid][np.argsort(g[valid][:, 0])] for g in got)
    np.testing.assert_allclose(shared, whole, rtol=1e-5)


@pytest.mark.parametrize("backend", ["blockwise", "pallas", "splash", "cudnn"])
def test_every_attention_backend_honours_shared_prompts(backend, monkeypatch):
    """Attention outputs of a row with shared prompts equal, token by token, those of the row with
    each answer after its own copy of the prompt (xla's output on the unshared row is the reference;
    gradients follow from the tested backward passes, and the DPO step against TRL runs shared rows). splash: JAX's TPU kernel interpreted, which falls back where it cannot express the
    mask; cudnn: its entry point, which sends these rows to its fallback."""
    import jaxtune.kernels.pallas_gpu as pallas_gpu
    from jaxtune.batch import BRANCH
    from jaxtune.kernels.attention import attention
    from jaxtune.kernels.blockwise import blockwise_attention

    import jaxtune.kernels.blockwise as blockwise

    for module, name in ((blockwise, "Q_BLOCK"), (blockwise, "KV_BLOCK"), (pallas_gpu, "BLOCK_Q"),
                         (pallas_gpu, "BLOCK_K")):
        monkeypatch.setattr(module, name, 8)  # several tiles per row: tiles skipped, masked and full
    rng = np.random.default_rng(1)
    p, c, r, heads, kv_heads, h = 6, 4, 5, 4, 2, 16
    content = {name: rng.standard_normal((n, 3, heads, h)).astype(np.float32)
               for name, n in (("p", p), ("c", c), ("r", r))}  # q, k, v per token

    def row(share):
        pieces, seg, pos, where = [], [], [], []
        if share:
            pieces.append(content["p"][:-1]); seg += [1] * (p - 1); pos += list(range(p - 1))
            where += [("p", i) for i in range(p - 1)]
        for b, name in ((1, "c"), (2, "r")):
            head = content["p"][-1:] if share else content["p"]
            start = p - len(head)
            pieces += [head, content[name]]
            n = len(head) + len(content[name])
            seg += [1 + b * BRANCH] * n
            pos += list(range(start, start + n))
            where += [("p", start + i) for i in range(len(head))] + [(name, i) for i in range(len(content[name]))]
        x = np.concatenate(pieces)
        pad = 32 - len(x)
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)])
        return (jnp.asarray(x[None, :, 0]), jnp.asarray(x[None, :, 1, :kv_heads]), jnp.asarray(x[None, :, 2, :kv_heads]),
                jnp.asarray([seg + [0] * pad]), jnp.asarray([pos + [0] * pad]), where)

    def run(fn, q, k, v, seg, pos):
        return fn(q, k, v, seg, pos)

    def entry(impl, **extra):
        return lambda q, k, v, seg, pos: attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos,
                                                   kv_positions=pos, implementation=impl, **extra)

    kw = dict(causal=True, sliding_window=None, scale=h ** -0.5)
    if backend == "splash":
        from jaxtune.kernels.splash_tpu import splash_attention

        def fn(q, k, v, seg, pos):
            return splash_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos,
                                    fallback=blockwise_attention, fallback_name="blockwise", interpret=True, **kw)
    elif backend == "cudnn":
        from jaxtune.kernels.cudnn import cudnn_attention

        def fn(q, k, v, seg, pos):
            return cudnn_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos,
                                   fallback=blockwise_attention, fallback_name="blockwise", **kw)
    elif backend == "pallas":
        from jaxtune.kernels.pallas_gpu import flash_attention

        def fn(q, k, v, seg, pos):
            return flash_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos,
                                   interpret=jax.default_backend() != "gpu", **kw)
    else:
        fn = entry("blockwise")
    *shared, where_s = row(True)
    *whole, where_w = row(False)
    got_out = run(fn, *shared)
    want_out = run(entry("xla"), *whole)
    index = {}
    for i, key in enumerate(where_w):
        index.setdefault(key, i)  # a prompt token's first copy (both copies have the same output)
    for i, key in enumerate(where_s):
        j = index[key] if key[0] == "p" else where_w.index(key)
        np.testing.assert_allclose(np.asarray(got_out[0, i]), np.asarray(want_out[0, j]), atol=1e-5, err_msg=str(key))


# -- the reference model -------------------------------------------------------------------------

def test_adapters_off_reference_equals_the_base_model(tiny96):
    """The reference the step builds from the policy (adapters' B zeroed, modules_to_save restored
    from their starting copy) gives the log-probs of a separately loaded base model, while the policy
    itself (trained adapters and head) gives others."""
    from flax import nnx

    from jaxtune.checkpoint.hf import load_model
    from jaxtune.objectives.reference import initial_copy, reference_model
    from jaxtune.peft import lora
    from jaxtune.models.llama import LORA_TARGETS

    model = load_model(tiny96)
    spec = lora.LoraSpec(r=4, alpha=8, targets=tuple(LORA_TARGETS), modules_to_save=("lm_head",))
    lora.add_lora(model, spec, jax.random.key(0))
    graphdef, trainable, frozen = nnx.split(model, lora.trainable_filter(model, spec), ...)
    ref_params = initial_copy(trainable, fresh_adapters=True)
    assert sorted(".".join(map(str, p)) for p, _ in nnx.to_flat_state(ref_params)) == ["lm_head.kernel"]
    # "training": every adapter's B and the head move away from the start
    trainable = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 * jax.random.normal(jax.random.key(len(p)), x.shape), trainable)
    objective, batch = _pair_rows(True)
    batch = jax.tree.map(jnp.asarray, batch)
    ref = objective.reference_logps(reference_model(graphdef, trainable, frozen, ref_params), batch)
    base = objective.reference_logps(load_model(tiny96), batch)
    policy = objective.reference_logps(nnx.merge(graphdef, trainable, frozen), batch)
    valid = np.asarray(batch["example_valid"]) > 0
    np.testing.assert_allclose(np.asarray(ref)[valid], np.asarray(base)[valid], rtol=1e-6)
    assert np.abs(np.asarray(policy) - np.asarray(base))[valid].min() > 1e-2


def _full_ft_dpo(tmp_path, model_dir, name, **keys):
    from jaxtune import train

    data = tmp_path / "pairs.jsonl"
    if not data.exists():  # written once: the prepared data's cache key includes the file's mtime
        _write_pairs(data, PAIRS * 2)
    cfg = build_config({
        "base_model": str(model_dir), "rl": "dpo", "datasets": [{"path": str(data), "type": "chatml.prompt_pairs"}],
        "sequence_len": 64, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 3,
        "learning_rate": 1e-3, "optimizer": "adamw_torch", "lr_scheduler": "constant", "save_strategy": "no",
        "val_set_size": 2, "eval_steps": 3, "output_dir": str(tmp_path / name),
        "dataset_prepared_path": str(tmp_path / "prep"), **keys})
    result = train.run(cfg)
    return result, _records(tmp_path / name)


def test_precomputed_reference_gives_the_live_references_steps(tmp_path, tiny_chat_dir):
    """Full fine-tuning DPO: reference log-probs computed once before training (stored beside the
    prepared data, reused by the next run) give the same losses, eval metrics and weights as the
    frozen reference copy in the step."""
    from safetensors.numpy import load_file

    live, live_records = _full_ft_dpo(tmp_path, tiny_chat_dir, "live")
    pre, pre_records = _full_ft_dpo(tmp_path, tiny_chat_dir, "pre", precompute_ref_log_probs=True)
    stored = sorted(p.name for p in Path(tmp_path / "prep").rglob("ref_logps-*.npy"))
    assert len(stored) == 2 and {n.rsplit("-", 1)[-1] for n in stored} == {"train.npy", "eval.npy"}
    for a, b in zip(live_records, pre_records, strict=True):
        for key in ("loss", "eval_loss", "rewards/margins", "eval_rewards/margins"):
            if key in a:
                np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6, err_msg=f"{key} step {a['step']}")
    start = load_file(str(Path(tiny_chat_dir) / "model.safetensors"))
    a, b = (load_file(str(Path(r.exports["hf"]) / "model.safetensors")) for r in (live, pre))
    names = sorted(a)
    assert_updates_close([start[n] for n in names], [b[n] for n in names], [a[n] for n in names], lr=1e-3, steps=3,
                         names=names)
    files = sorted(Path(tmp_path / "prep").rglob("ref_logps-*.npy"))
    written = [f.stat().st_mtime_ns for f in files]
    again, again_records = _full_ft_dpo(tmp_path, tiny_chat_dir, "again", precompute_ref_log_probs=True)
    assert [f.stat().st_mtime_ns for f in files] == written  # read back, not computed again
    assert [r["loss"] for r in again_records if "loss" in r] == [r["loss"] for r in pre_records if "loss" in r]


SHARDED = '''
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jaxtune.checkpoint.hf import load_model
from jaxtune.config import build_config
from jaxtune.data import preference
from jaxtune.objectives.preference import DPO
from jaxtune.optim import build_optimizer
from jaxtune.parallel import mesh as M, ring
from jaxtune.peft import lora
from jaxtune.step import make_train_step

assert jax.device_count() == 8
ring_calls = []
traced = ring.ring_attention
ring.ring_attention = lambda *a, **k: ring_calls.append(1) or traced(*a, **k)
objective = DPO(loss_types=["sigmoid"], loss_weights=None, beta=0.5, pad_id=0, examples_per_row=10)

def batch(i):  # 8 rows of packed pairs with shared prompts (and padding rows), [accumulation 1, rows, tokens]
    rng = np.random.default_rng(i)
    ids = lambda n: rng.integers(3, 96, n).tolist()
    ex = {"prompt_ids": [ids(int(rng.integers(2, 9))) for _ in range(16)]}
    for side in ("chosen", "rejected"):
        ex[f"{side}_ids"] = [ids(int(rng.integers(1, 7))) for _ in range(16)]
        ex[f"{side}_labels"] = [list(x) for x in ex[f"{side}_ids"]]
    rows, _ = preference.lay_out(ex, kind="preference", capacity=48, packed=True, share=True)
    rows = [{k: v[j] for k, v in rows.items()} for j in range(len(rows["input_ids"]))][:7]
    rows += [None] * (8 - len(rows))
    return objective.finalize({k: v[None] for k, v in objective.collate(rows, 48).items()})

def run(plan):
    model = load_model(sys.argv[1], attn_implementation="blockwise")
    spec = lora.LoraSpec(r=4, alpha=8, targets=tuple(lora.lora_targets(model)))
    lora.add_lora(model, spec, jax.random.key(0))
    graphdef, trainable, frozen = nnx.split(model, lora.trainable_filter(model, spec), ...)
    optimizer, schedule = build_optimizer(build_config({"optimizer": "adamw_torch", "learning_rate": 5e-3,
                                                        "lr_scheduler": "constant"}), 5)
    if plan is None:
        opt_state, kwargs, mesh = optimizer.init(trainable), {}, None
    else:
        mesh = plan.make()
        placed = M.place_training_state(plan, mesh, trainable, frozen, optimizer)
        trainable, frozen, opt_state, kwargs = placed.trainable, placed.frozen, placed.opt_state, placed.step_shardings
    step = make_train_step(graphdef, objective, optimizer, schedule, use_rng=False, reference=True, **kwargs)
    out_all = []
    for i in range(4):
        b = batch(i)
        if mesh is None:
            trainable, opt_state, out = step(trainable, frozen, opt_state, b, jax.random.key(0), jnp.int32(i))
        else:
            with jax.set_mesh(mesh):
                trainable, opt_state, out = step(trainable, frozen, opt_state, M.place_batch(b, mesh, objective.layout),
                                                 jax.random.key(0), jnp.int32(i))
        out_all.append({k: float(v) for k, v in out.items()})
    calls = len(ring_calls)
    ring_calls.clear()
    return {"records": out_all, "traces": step.traces, "ring_calls": calls}

result = {"single": run(None)}
for name, kw in {"fsdp4_sequence2": {"fsdp": 4, "sequence": 2}, "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2}}.items():
    result[name] = run(M.MeshPlan(**kw))
print("RESULT " + json.dumps(result))
'''


def test_sharded_dpo_equals_one_device(tiny96):
    """DPO with LoRA (reference: adapters off, in the step) on fsdp=4 x sequence=2 (ring attention over
    rows of shared prompts, per-row reference arrays placed per row) and data=2 x fsdp=2 x tensor=2,
    8 forced CPU devices, equals one device: losses and metrics of 4 steps, 1e-5."""
    import subprocess
    import sys

    env = cpu_env(8)
    proc = subprocess.run([sys.executable, "-c", SHARDED, str(tiny96)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    single = result.pop("single")
    assert single["records"][-1]["rewards/accuracies"] > 0  # the steps really train
    for name, run in result.items():
        assert run["traces"] == 1, name
        for got, want in zip(run["records"], single["records"]):
            for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
                assert abs(got[key] - want[key]) <= 1e-5 * max(1.0, abs(want[key])), (name, key, got, want)
    assert result["fsdp4_sequence2"]["ring_calls"] > 0


# -- configs -------------------------------------------------------------------------------------

def _rl_config(**keys):
    return build_config({"base_model": "m", "datasets": [{"path": "p", "type": "chatml.intel"}], **keys})


def test_rl_keys_resolve_as_axolotl_and_trl_do(monkeypatch):
    from jaxtune.config import base as base_config
    from jaxtune.config import rl as rl_config

    warned = []
    monkeypatch.setattr(base_config, "warn_once", warned.append)
    monkeypatch.setattr(rl_config, "warn_once", warned.append)
    assert _rl_config(rl="dpo").beta == 0.1 and _rl_config(rl="dpo").loss_types == ["sigmoid"]
    ipo = _rl_config(rl="ipo")
    assert ipo.loss_types == ["ipo"] and any("rl: ipo is deprecated" in w for w in warned)
    assert _rl_config(rl="orpo", orpo_alpha=0.2).beta == 0.2
    assert _rl_config(rl="dpo", trl={"beta": 0.3}).beta == 0.3
    assert _rl_config(rl="dpo", dpo_beta=0.4).beta == 0.4  # Axolotl's deprecated name
    mix = _rl_config(rl="dpo", dpo_loss_type=["sigmoid", "sft"], dpo_loss_weights=[1.0, 0.5])
    assert mix.loss_types == ["sigmoid", "sft"]
    _rl_config(rl="dpo", dpo_use_liger_kernel=True, dpo_padding_free=True)
    assert any("dpo_use_liger_kernel" in w for w in warned) and any("dpo_padding_free" in w for w in warned)


@pytest.mark.parametrize("keys,message", [
    ({"rl": "dpo", "dpo_loss_type": ["sigmoid", "kto_pair"]}, "dpo_loss_type 'kto_pair' is not supported; "
                                                              "supported: sigmoid, sigmoid_norm"),
    ({"rl": "dpo", "dpo_loss_type": ["sigmoid"], "dpo_loss_weights": [1.0, 2.0]}, "has 1 entries but dpo_loss_weights 2"),
    ({"rl": "dpo", "dpo_loss_weights": [1.0]}, "dpo_loss_weights needs dpo_loss_type"),
    ({"rl": "orpo", "dpo_loss_type": ["sigmoid"]}, "dpo_loss_type / dpo_loss_weights are for rl: dpo"),
    ({"rl": "dpo", "orpo_alpha": 0.1}, "orpo_alpha do\\(es\\) not apply to rl: dpo"),
    ({"rl": "dpo", "dpo_loss_type": ["exo_pair"]}, "exo_pair needs dpo_label_smoothing > 0"),
    ({"rl": "dpo", "dpo_loss_type": ["aot"], "dpo_use_weighting": True}, "dpo_use_weighting does not combine"),
    ({"rl": "simpo", "precompute_ref_log_probs": True}, "rl: simpo has none"),
    ({"rl": "dpo", "rl_beta": 0.1, "trl": {"beta": 0.2}}, "rl_beta \\(0.1\\) and trl.beta \\(0.2\\) differ"),
    ({"rl": "grpo"}, "rl: grpo needs trl.reward_funcs"),
    ({"rl": "dpo", "trl": {"num_generations": 4}}, "trl.num_generations applies to rl: grpo"),
    ({"rl": "grpo", "trl": {"reward_funcs": ["r.f"], "loss_type": "sapo"}}, "trl.loss_type sapo is not supported"),
    ({"rl": "grpo", "trl": {"reward_funcs": ["r.f"], "entropy_coef": 0.01}}, "'trl.entropy_coef' is not supported: the entropy bonus"),
    ({"rl": "grpo", "trl": {"reward_funcs": ["r.f", "r.g"], "reward_weights": [1.0]}},
     "reward_weights has 1 entries for 2 reward functions"),
    ({"rl": "gdpo", "trl": {"reward_funcs": ["r.f"], "multi_objective_aggregation": "sum_then_normalize"}},
     "rl: gdpo is GRPO with trl.multi_objective_aggregation normalize_then_sum"),
    ({"rl": "grpo", "adapter": "lora", "trl": {"reward_funcs": ["r.f"], "beta": 0.1, "sync_ref_model": True}},
     "sync_ref_model needs a frozen reference copy"),
    ({"rl": "grpo", "trl": {"reward_funcs": ["r.f"], "sync_ref_model": True}}, "needs beta > 0"),
    ({"rl": "dpo", "rpo_alpha": 0.5}, "'rpo_alpha' is not supported: RPO"),
    ({"rl": "dpo", "trl": {"betta": 0.1}}, "unknown config key 'trl.betta'; did you mean 'beta'"),
    ({"rl_beta": 0.1}, "rl_beta / trl.beta need an rl objective"),
])
def test_rl_key_errors_name_the_key(keys, message):
    with pytest.raises(ConfigError, match=message):
        _rl_config(**keys)


def test_plan_counts_the_reference_copy(tiny_chat_dir):
    """Full fine-tuning DPO keeps a frozen copy of the weights (unless precomputed); LoRA none."""
    from jaxtune.plan import plan_memory

    def plan(**keys):
        return plan_memory(build_config({"base_model": str(tiny_chat_dir), "micro_batch_size": 1, **keys}))

    sft, dpo = plan(), plan(rl="dpo")
    assert sft.reference == 0 and dpo.reference == dpo.params
    assert dpo.total > sft.total + dpo.params - 1
    assert plan(rl="dpo", precompute_ref_log_probs=True).reference == 0
    assert plan(rl="dpo", adapter="lora", lora_target_linear=True).reference == 0
    assert "reference model" in dpo.report()


@pytest.mark.parametrize("rl", ["orpo", "kto"])
def test_orpo_and_kto_train_end_to_end(tmp_path, tiny_chat_dir, rl):
    """`rl: orpo` (pairs) and `rl: kto` (labelled completions, packed with their KL completions) train,
    evaluate and export, logging their own metrics under TRL's names."""
    from jaxtune import train

    if rl == "kto":
        rows = [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
                for p in PAIRS for side in ("chosen", "rejected")]
        keys = {"sample_packing": True, "kto_desirable_weight": 1.2}
    else:
        rows, keys = PAIRS, {"orpo_alpha": 0.2}
    data, held_out = tmp_path / "rows.jsonl", tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows))  # KTO: both labels in the eval set
    cfg = build_config({
        "base_model": str(tiny_chat_dir), "rl": rl, "datasets": [{"path": str(data), "type": "chatml.prompt_pairs"}],
        "test_datasets": [{"path": str(held_out), "type": "chatml.prompt_pairs"}],
        "adapter": "lora", "lora_target_linear": True, "lora_r": 4, "sequence_len": 64, "micro_batch_size": 2,
        "max_steps": 3, "learning_rate": 5e-3, "eval_steps": 3, "save_strategy": "no",
        "output_dir": str(tmp_path / "out"), "dataset_prepared_path": str(tmp_path / "prep"), **keys})
    result = train.run(cfg)
    records = _records(tmp_path / "out")
    step = next(r for r in records if r["step"] == 3 and "loss" in r)
    evaluated = next(r for r in records if "eval_loss" in r)
    expected = {"orpo": ("nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/accuracies", "rewards/margins"),
                "kto": ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen")}[rl]
    assert all(k in step and np.isfinite(step[k]) for k in expected), step
    assert all(f"eval_{k}" in evaluated for k in expected if k != "kl"), evaluated
    assert step["pairs" if rl == "orpo" else "completions"] > 0
    assert (Path(result.exports["adapter"]) / "adapter_model.safetensors").exists()
