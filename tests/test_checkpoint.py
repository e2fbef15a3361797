"""HF -> jaxtune -> HF round trips, sharded files, atomic writes and the errors people see."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import LlamaConfig, Qwen2Config

import jaxtune
from jaxtune.checkpoint import io
from jaxtune.cli import main
from jaxtune.errors import ModelLoadError
from tests.conftest import save_tiny

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32)


def _tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    src = save_tiny(tmp_path, Qwen2Config(**TINY, tie_word_embeddings=False), "src", dtype=dtype)
    model, _ = jaxtune.load_pretrained(src)
    out = jaxtune.save_pretrained(model, tmp_path / "out")
    before, after = _tensors(src), _tensors(out)
    assert set(before) == set(after)
    for name in before:
        assert before[name].dtype == after[name].dtype, name
        assert np.array_equal(before[name].view(np.uint8), after[name].view(np.uint8)), name
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == ("float32" if dtype == torch.float32 else "bfloat16")
    assert json.loads((out / "generation_config.json").read_text()) == \
        json.loads((src / "generation_config.json").read_text())


def test_sharded_export_with_index_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    src = save_tiny(tmp_path, LlamaConfig(**TINY), "src")
    model, _ = jaxtune.load_pretrained(src)
    out = jaxtune.save_pretrained(model, tmp_path / "out", max_shard_size="20KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in _tensors(out).values())
    reloaded, _ = jaxtune.load_pretrained(out)  # our reader follows the index
    assert np.array_equal(np.asarray(reloaded.layers.mlp.up_proj.kernel[...]),
                          np.asarray(model.layers.mlp.up_proj.kernel[...]))
    hf_src = AutoModelForCausalLM.from_pretrained(src)
    hf_out = AutoModelForCausalLM.from_pretrained(out)
    for (n, a), (_, b) in zip(hf_src.state_dict().items(), hf_out.state_dict().items()):
        assert torch.equal(a, b), n


def test_export_replaces_atomically_and_survives_a_crash(tmp_path):
    src = save_tiny(tmp_path, LlamaConfig(**TINY), "src")
    model, _ = jaxtune.load_pretrained(src)
    out = jaxtune.save_pretrained(model, tmp_path / "out")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError):
        with io.atomic_directory(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("crash while writing")
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    jaxtune.save_pretrained(model, out)  # overwriting an existing export works
    assert (out / "model.safetensors").read_bytes() == before


def test_parse_size():
    assert io.parse_size("5GB") == 5 * 10**9
    assert io.parse_size("2MiB") == 2 * 2**20
    assert io.parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot read"):
        io.parse_size("lots")


# -- errors -----------------------------------------------------------------------------------

def _error(tmp_path, edit) -> str:
    src = save_tiny(tmp_path, LlamaConfig(**TINY), "bad")
    edit(src)
    with pytest.raises(ModelLoadError) as info:
        jaxtune.load_pretrained(src)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_error_missing_config(tmp_path):
    msg = _error(tmp_path, lambda d: (d / "config.json").unlink())
    assert "no config.json" in msg and "bad" in msg


def test_error_unsupported_architecture_lists_supported(tmp_path):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg["architectures"] = ["FalconForCausalLM"]
        (d / "config.json").write_text(json.dumps(cfg))

    msg = _error(tmp_path, edit)
    assert "'FalconForCausalLM' is not supported" in msg and "GPTNeoXForCausalLM" in msg and "LlamaForCausalLM" in msg \
        and "Qwen3ForCausalLM" in msg


def test_error_corrupted_safetensors(tmp_path):
    msg = _error(tmp_path, lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00garbage"))
    assert "model.safetensors" in msg and "not a valid safetensors" in msg


def test_error_shape_mismatch_names_tensor(tmp_path):
    def edit(d):
        tensors = load_file(d / "model.safetensors")
        tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((47, 32), np.float32)
        save_file(tensors, d / "model.safetensors")

    msg = _error(tmp_path, edit)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "(47, 32)" in msg and "(48, 32)" in msg


def test_error_missing_and_unknown_tensors(tmp_path):
    def drop(d):
        tensors = load_file(d / "model.safetensors")
        del tensors["model.norm.weight"]
        save_file(tensors, d / "model.safetensors")

    assert "model.norm.weight is missing" in _error(tmp_path / "a", drop)

    def add(d):
        tensors = load_file(d / "model.safetensors")
        tensors["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
        save_file(tensors, d / "model.safetensors")

    assert "model.layers.0.extra.weight" in _error(tmp_path / "b", add)


def test_cli_prints_one_line_error(tmp_path, capsys):
    src = save_tiny(tmp_path, LlamaConfig(**TINY), "bad")
    (src / "model.safetensors").write_bytes(b"corrupt")
    capsys.readouterr()  # drop the fixture's own output
    assert main(["generate", "--model", str(src), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxtune: error:") and "not a valid safetensors" in err
    assert "\n" not in err and "Traceback" not in err


def test_cli_subprocess_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jaxtune.cli", "generate", "--model", str(tmp_path / "nope"),
                           "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1] == f"jaxtune: error: model directory {tmp_path / 'nope'} does not exist"
    assert "Traceback" not in proc.stderr


def test_error_truncated_safetensors(tmp_path):
    def truncate(d):
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) - 100])

    msg = _error(tmp_path, truncate)
    assert "model.safetensors" in msg and "truncated" in msg


def test_loading_adopts_host_buffers_without_a_copy(tmp_path):
    """On CPU the assembled host buffer becomes the parameter (peak memory = parameters once)."""
    import jax

    from jaxtune.checkpoint.hf import load_model

    src = save_tiny(tmp_path, LlamaConfig(**TINY), "src")
    hosts = {}

    def place(path, host, axes):
        arr = jax.device_put(host)
        hosts[path] = host.ctypes.data == arr.unsafe_buffer_pointer()
        return arr

    load_model(src, place=place)
    assert hosts and all(hosts.values())


def test_trust_remote_code_never_runs_repository_code(tmp_path, monkeypatch):
    """trust_remote_code: true with a checkpoint that ships code (config.json auto_map) is an error naming
    the file that would run; without shipped code it has no effect (one warning); false or unset: nothing."""
    import jaxtune.checkpoint.hf as hf

    src = save_tiny(tmp_path, LlamaConfig(**TINY), "remote")
    said = []
    monkeypatch.setattr(hf, "warn_once", said.append)
    hf.check_remote_code(src, True)
    assert len(said) == 1 and "no effect" in said[0]
    hf.check_remote_code(src, False)
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_mine.MyConfig", "AutoModelForCausalLM": "org/repo--modeling_mine.MyLM"}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"would run configuration_mine.py, modeling_mine.py from .*remote"):
        hf.check_remote_code(src, True)
    hf.check_remote_code(src, None)


def test_reinit_weights_draws_fresh_weights(tmp_path):
    """Axolotl's reinit_weights: every weight drawn afresh as transformers initialises the config
    (kernels and embeddings ~ N(0, initializer_range), norm scales 1), none left from the checkpoint."""
    import numpy as np
    from flax import nnx

    from jaxtune.build import build_model
    from jaxtune.config import build_config

    src = save_tiny(tmp_path, LlamaConfig(**{**TINY, "initializer_range": 0.05}), "reinit")
    cfg = build_config({"base_model": str(src), "datasets": [{"path": "x.jsonl", "type": "completion"}],
                        "reinit_weights": True})
    model, _, _ = build_model(cfg)
    base, _ = jaxtune.load_pretrained(src)
    fresh, old = nnx.to_flat_state(nnx.state(model, nnx.Param)), dict(nnx.to_flat_state(nnx.state(base, nnx.Param)))
    for name, var in fresh:
        value, before = np.asarray(var.get_value()), np.asarray(old[name].get_value())
        assert value.shape == before.shape and not np.allclose(value, before), name
        if name[-1] == "scale":
            assert np.all(value == 1), name
        else:  # thousands of draws: the sample std is within a few % of 0.05
            assert abs(value.std() - 0.05) < 0.1 * 0.05 and abs(value.mean()) < 0.01, name
