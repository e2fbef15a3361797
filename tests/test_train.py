"""`jaxtune.train` end to end on a tiny model: resume equals an uninterrupted run, exports load in
transformers and PEFT with the same logits, QLoRA trains, failures are clear."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxtune.config import ConfigError, build_config
from jaxtune.errors import JaxtuneError

DATA = Path(__file__).resolve().parents[1] / "configs" / "data" / "quickstart_train.jsonl"


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(DATA.read_text().splitlines(keepends=True)[:120]))
    return path


def _cfg(tmp_path, model_dir, data, **keys):
    base = {
        "base_model": str(model_dir),
        "datasets": [{"path": str(data), "type": "chat_template"}],
        "val_set_size": 8, "sequence_len": 256, "sample_packing": True, "micro_batch_size": 2,
        "gradient_accumulation_steps": 2, "max_steps": 4, "learning_rate": 2e-3, "lr_scheduler": "cosine",
        "warmup_steps": 1, "adapter": "lora", "lora_target_linear": True, "lora_r": 4, "lora_alpha": 8,
        "lora_dropout": 0.1, "output_dir": str(tmp_path / "out"), "dataset_prepared_path": str(tmp_path.parent / "prep"),
        "save_steps": 3, "eval_steps": 2, "logging_steps": 1,
    }
    base.update(keys)
    return build_config({k: v for k, v in base.items() if v is not None})


def _records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_interrupted_run_resumes_to_the_same_result(tmp_path, tiny_chat_dir, small_data, monkeypatch):
    """Ctrl-C at step 3 saves a checkpoint; the same command resumes and ends exactly where an
    uninterrupted run ends (losses, eval losses, adapter weights), LoRA dropout RNG included."""
    from jaxtune import train, trainer

    straight = train.run(_cfg(tmp_path / "a", tiny_chat_dir, small_data))
    out_a = Path(straight.exports["hf"]).parent

    cfg_b = _cfg(tmp_path / "b", tiny_chat_dir, small_data)
    real_stack, calls = trainer.stack_micro_batches, {"n": 0}

    def interrupt_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_stack(*args, **kwargs)

    monkeypatch.setattr(trainer, "stack_micro_batches", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg_b)
    out_b = Path(cfg_b.output_dir)
    assert (out_b / "checkpoints" / "2").is_dir() and not (out_b / "hf").exists()
    monkeypatch.setattr(trainer, "stack_micro_batches", real_stack)
    resumed = train.run(cfg_b)

    a, b = _records(out_a), _records(out_b)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "eval_loss", "grad_norm", "lr"):
            if key in ra:
                np.testing.assert_allclose(rb[key], ra[key], rtol=1e-6, atol=1e-7, err_msg=f"{key} step {ra['step']}")
    wa = load_file(str(out_a / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(out_b / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], atol=1e-6, err_msg=k)
    assert resumed.last["step"] == straight.last["step"] == 4
    assert "eval_loss" in resumed.last
    assert (out_b / "config.resolved.yml").exists()
    assert sorted(int(p.name) for p in (out_a / "checkpoints").iterdir()) == [3, 4]

    # `jaxtune export` rebuilds hf/ and adapter/ from a checkpoint (here the last one).
    from jaxtune.cli import main

    shutil.rmtree(out_b / "hf")
    shutil.rmtree(out_b / "adapter")
    assert main(["export", str(out_b / "config.resolved.yml"), "--checkpoint", str(out_b / "checkpoints" / "4")]) == 0
    exported = load_file(str(out_b / "adapter" / "adapter_model.safetensors"))
    for k in wa:
        np.testing.assert_allclose(exported[k], wa[k], atol=1e-6, err_msg=k)
    assert (out_b / "hf" / "model.safetensors").exists()


def test_exports_load_in_transformers_and_peft(tmp_path, tiny_chat_dir, small_data):
    """hf/ (merged) in transformers and adapter/ in PEFT give jaxtune's logits (fp32, 1e-4);
    lm_head trains fully (lora_modules_to_save) and rides along in the adapter."""
    import jax.numpy as jnp
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train_run(tmp_path, tiny_chat_dir, small_data, lora_modules_to_save=["lm_head"], max_steps=3,
                       peft_layers_to_transform=[1], lora_dropout=0.0)
    ids = np.random.default_rng(0).integers(0, 49152, (2, 17))
    ours = np.asarray(result.model(jnp.asarray(ids)))
    merged = AutoModelForCausalLM.from_pretrained(result.exports["hf"], dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = merged(torch.tensor(ids)).logits.numpy()
        peft_model = PeftModel.from_pretrained(base, result.exports["adapter"]).eval()
        peft_logits = peft_model(torch.tensor(ids)).logits.numpy()
        plain = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(hf_logits, ours, atol=1e-4)
    np.testing.assert_allclose(peft_logits, ours, atol=1e-4)
    assert np.abs(plain - ours).max() > 1e-3  # training changed the model
    config = json.loads((Path(result.exports["adapter"]) / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1] and config["modules_to_save"] == ["lm_head"]
    names = load_file(str(Path(result.exports["adapter"]) / "adapter_model.safetensors"))
    assert not any(".layers.0." in n for n in names) and "base_model.model.lm_head.weight" in names


def train_run(tmp_path, model_dir, data, **keys):
    from jaxtune import train

    return train.run(_cfg(tmp_path, model_dir, data, save_strategy="no", eval_steps=None, **keys))


def test_qlora_trains_and_exports(tmp_path, tiny_chat_dir, small_data):
    import jax
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    from jaxtune.peft.qlora import QuantizedKernel

    result = train_run(tmp_path, tiny_chat_dir, small_data, adapter="qlora", load_in_4bit=True, max_steps=8,
                       learning_rate=1e-2, lora_dropout=0.0, gradient_accumulation_steps=1, lr_scheduler="constant")
    assert isinstance(result.model.layers.mlp.down_proj.kernel, QuantizedKernel)
    losses = [r["loss"] for r in _records(tmp_path / "out") if "loss" in r]
    assert losses[-1] < losses[0] - 0.05, losses
    ids = np.random.default_rng(1).integers(0, 49152, (1, 9))
    ours = np.asarray(result.model(jnp.asarray(ids)))
    merged = AutoModelForCausalLM.from_pretrained(result.exports["hf"], dtype=torch.float32).eval()
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.tensor(ids)).logits.numpy(), ours, atol=1e-4)
    del jax


def test_non_finite_loss_stops_naming_the_step(tmp_path, tiny_chat_dir, small_data, monkeypatch):
    import jax.numpy as jnp

    from jaxtune import train
    from jaxtune.models.llama import CausalLM

    real = CausalLM.target_nll_sum
    monkeypatch.setattr(CausalLM, "target_nll_sum", lambda self, *args: real(self, *args) * jnp.nan)
    with pytest.raises(JaxtuneError, match="loss is nan at step 1"):
        train.run(_cfg(tmp_path, tiny_chat_dir, small_data))
    assert not (tmp_path / "out" / "hf").exists()


def test_loss_watchdog_stops_naming_the_step(tmp_path, tiny_chat_dir, small_data, monkeypatch):
    """Axolotl's loss_watchdog_threshold / _patience: once the loss has stayed above the threshold for
    `patience` steps in a row, training stops there and the run ends as at its last step (metrics,
    checkpoint, export)."""
    from jaxtune import train, trainer

    said = []
    monkeypatch.setattr(trainer, "warn", said.append)
    train.run(_cfg(tmp_path, tiny_chat_dir, small_data, loss_watchdog_threshold=0.0, loss_watchdog_patience=2,
                   max_steps=6, save_steps=None))
    steps = [r["step"] for r in _records(tmp_path / "out") if "loss" in r]
    assert steps == [1, 2]
    assert len(said) == 1 and "above loss_watchdog_threshold 0 for 2 steps in a row at step 2" in said[0]
    assert (tmp_path / "out" / "adapter").is_dir()
    with pytest.raises(JaxtuneError, match="loss_watchdog_patience"):
        _cfg(tmp_path, tiny_chat_dir, small_data, loss_watchdog_patience=0)


def test_resume_false_refuses_existing_checkpoints(tmp_path):
    from jaxtune.checkpoint.resume import Checkpoints, resolve_resume

    ckpts = Checkpoints(tmp_path / "checkpoints")
    assert resolve_resume(None, ckpts) is None
    with pytest.raises(JaxtuneError, match="has no checkpoint"):
        resolve_resume(True, ckpts)
    ckpts.save(5, {"params": {"x": np.zeros(2, np.float32)}}, {"step": 5})
    assert resolve_resume(None, ckpts)[1] == 5
    with pytest.raises(JaxtuneError, match="already has checkpoints"):
        resolve_resume(False, ckpts)
    assert resolve_resume(str(tmp_path / "checkpoints" / "5"), ckpts)[1] == 5


def test_training_config_errors():
    with pytest.raises(ConfigError, match="unknown config key 'gradient_accumulation'; did you mean "
                                          "'gradient_accumulation_steps'"):
        build_config({"gradient_accumulation": 4})
    with pytest.raises(ConfigError, match="warmup_steps and warmup_ratio cannot both be set"):
        build_config({"warmup_steps": 10, "warmup_ratio": 0.1})
    with pytest.raises(ConfigError, match="save_steps and saves_per_epoch cannot both be set"):
        build_config({"save_steps": 10, "saves_per_epoch": 2})
    with pytest.raises(ConfigError, match="micro_batch_size: Input should be a valid integer"):
        build_config({"micro_batch_size": "four"})
    with pytest.raises(ConfigError, match="unknown optimizer 'adamw_torch_fuzed'; did you mean 'adamw_torch_fused'"):
        build_config({"optimizer": "adamw_torch_fuzed"})
    with pytest.raises(ConfigError, match="adapter: qlora needs load_in_4bit"):
        build_config({"adapter": "qlora", "lora_target_linear": True})
    with pytest.raises(ConfigError, match="rl: grpo needs trl.reward_funcs"):
        build_config({"rl": "grpo"})
    with pytest.raises(ConfigError, match="lora_model_dir set without adapter"):
        build_config({"lora_model_dir": "x"})
    cfg = build_config({"flash_attention": True, "sequence_parallel_degree": 1, "tf32": True})
    assert cfg.attn_implementation == "flash_attention_2" and cfg.context_parallel_size == 1
    assert build_config({}, overrides=["save_strategy=no"]).save_strategy == "no"  # YAML reads `no` as false
    with pytest.raises(ConfigError, match="chunked_cross_entropy and use_cut_cross_entropy"):
        build_config({"chunked_cross_entropy": True, "use_cut_cross_entropy": False})


def test_kernel_keys_pick_the_backends():
    from jaxtune.build import resolve_attention, resolve_chunked_loss

    assert resolve_chunked_loss(build_config({})) is True
    assert resolve_chunked_loss(build_config({"use_cut_cross_entropy": False})) is False
    assert resolve_chunked_loss(build_config({"chunked_cross_entropy": False})) is False
    expected = {"auto": "blockwise", "sdpa": "blockwise", "flash_attention_2": "blockwise", "eager": "xla",
                "xla": "xla", "blockwise": "blockwise"}
    for key, backend in expected.items():
        assert resolve_attention(build_config({"attn_implementation": key})) == backend
    assert resolve_attention(build_config({"flash_attention": True})) == "blockwise"


def test_unfrozen_parameters_are_the_only_ones_that_change(tmp_path, tiny_chat_dir, small_data):
    """Axolotl's unfrozen_parameters in full fine-tuning: the head, rows 0-15 of layer 1's up_proj (one
    layer of a stacked tensor, some rows of it) and embedding rows [0:32) train; every other tensor, layer
    and row of the exported model is bit-identical to the base model, weight decay notwithstanding."""
    from jaxtune import train

    cfg = _cfg(tmp_path, tiny_chat_dir, small_data, adapter=None, lora_target_linear=None, lora_r=None,
               lora_alpha=None, lora_dropout=None, max_steps=2, save_steps=None, eval_steps=None, weight_decay=0.1,
               unfrozen_parameters=["^lm_head.weight$", "model.layers.1.mlp.up_proj.weight[0:16]",
                                    "^model.embed_tokens.weight$[:32]"])
    train.run(cfg)
    before = load_file(str(tiny_chat_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "out" / "hf" / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == {"lm_head.weight", "model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight"}
    up = "model.layers.1.mlp.up_proj.weight"
    assert not np.array_equal(before[up][:16], after[up][:16])
    np.testing.assert_array_equal(before[up][16:], after[up][16:])
    emb = "model.embed_tokens.weight"
    np.testing.assert_array_equal(before[emb][32:], after[emb][32:])

    with pytest.raises(JaxtuneError, match="'model.layers.9.mlp' match no parameter"):
        train.run(_cfg(tmp_path / "x", tiny_chat_dir, small_data, adapter=None, lora_target_linear=None,
                       unfrozen_parameters=["model.layers.9.mlp"]))
    with pytest.raises(ConfigError, match="unfrozen_parameters chooses what trains in full fine-tuning"):
        _cfg(tmp_path, tiny_chat_dir, small_data, unfrozen_parameters=["^lm_head"])


def test_early_stopping_and_load_best_model_at_end(tmp_path, tiny_chat_dir, small_data, monkeypatch):
    """early_stopping_patience stops once eval_loss has not improved for that many evaluations in a row;
    with load_best_model_at_end the export is the best evaluation's checkpoint (kept by rotation), not
    the last step's. The evaluation values are given (the metric is patched); the rules are HF's."""
    from jaxtune import train, trainer
    from jaxtune.checkpoint.resume import Checkpoints

    real = trainer.Trainer.evaluate

    def given(values):
        it = iter(values)
        monkeypatch.setattr(trainer.Trainer, "evaluate", lambda self: {**real(self), "eval_loss": next(it)})

    said = []
    monkeypatch.setattr(trainer, "warn", said.append)
    keys = dict(eval_steps=2, save_steps=2, lr_scheduler="constant_with_warmup")
    given([3.0, 2.0, 2.5, 2.6, 1.0, 1.0])
    result = train.run(_cfg(tmp_path, tiny_chat_dir, small_data, max_steps=12, save_total_limit=1,
                            early_stopping_patience=2, load_best_model_at_end=True, **keys))
    evals = [r for r in _records(tmp_path / "out") if "eval_loss" in r]
    assert [(r["step"], r["eval_loss"]) for r in evals] == [(2, 3.0), (4, 2.0), (6, 2.5), (8, 2.6)]
    assert result.last["step"] == 8 and any("has not improved for 2 evaluations" in s for s in said)
    # save_total_limit 1 keeps the newest checkpoint, and the best one (step 4) besides
    assert sorted(int(p.name) for p in (tmp_path / "out" / "checkpoints").iterdir()) == [4, 8]
    checkpoints = Checkpoints(tmp_path / "out" / "checkpoints")
    assert checkpoints.read_meta(8)["best_model"]["saved"] == [2.0, 4]
    checkpoints.close()
    # the exported adapter is step 4's: the same run stopped at step 4 exports the same weights
    given([3.0, 2.0])
    train.run(_cfg(tmp_path / "four", tiny_chat_dir, small_data, max_steps=4, load_best_model_at_end=False, **keys))
    exported = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    four = load_file(str(tmp_path / "four" / "out" / "adapter" / "adapter_model.safetensors"))
    assert exported.keys() == four.keys()
    for k in four:
        np.testing.assert_allclose(exported[k], four[k], atol=1e-6, err_msg=k)
    with pytest.raises(JaxtuneError, match="early_stopping_patience needs evaluations"):
        train.run(_cfg(tmp_path / "x", tiny_chat_dir, small_data, early_stopping_patience=2, val_set_size=0,
                       eval_steps=None))
