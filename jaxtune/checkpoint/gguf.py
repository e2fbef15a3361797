"""GGUF (llama.cpp) -> HF directory: dequantized float safetensors, config.json, tokenizer, chat template.

Tensors are read and dequantized with the `gguf` package, one tensor at a time while writing.
llama.cpp's converter permutes the rows of q_proj and k_proj (to interleave RoPE halves); we undo
it, so the result equals transformers' own GGUF loader (tests/test_gguf.py checks this).

The tokenizer is rebuilt from GGUF metadata with transformers' public tokenizer classes
(byte-level BPE for `tokenizer.ggml.model == "gpt2"`), control tokens as special tokens,
user-defined tokens as added tokens, and the chat template.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from jaxtune.checkpoint.io import TensorToWrite, atomic_directory, write_safetensors
from jaxtune.errors import ModelLoadError

SUPPORTED_GGUF_ARCHITECTURES = ("llama",)
SUPPORTED_GGUF_TOKENIZERS = ("gpt2",)

_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4

# Pre-tokenizer split patterns by `tokenizer.ggml.pre` (types not listed keep GPT-2's byte-level split).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
                         "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}


def _reader(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # the gguf package raises ValueError/struct errors for bad files
        raise ModelLoadError(f"{path} is not a readable GGUF file ({e})") from None


def _metadata(reader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception:  # noqa: BLE001 - exotic field types we do not need
            continue
    return meta


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's `permute` of q/k rows: (n, 2, d/2, in) -> (n, d/2, 2, in) order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_config(meta: dict, tensor_names: set[str]) -> dict:
    arch = meta["general.architecture"]

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    n_head = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = int(get("vocab_size", len(meta["tokenizer.ggml.tokens"])))
    rope_params: dict = {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10000.0))}
    scaling = get("rope.scaling.type")
    if scaling and scaling != "none":
        if scaling not in ("linear", "yarn"):
            raise ModelLoadError(f"GGUF rope scaling type {scaling!r} is not supported (supported: linear, yarn)")
        rope_params.update(rope_type=scaling, factor=float(get("rope.scaling.factor")))
        if get("rope.scaling.original_context_length") is not None:
            rope_params["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
    if "rope_freqs.weight" in tensor_names:
        raise ModelLoadError("GGUF files with a rope_freqs tensor (llama3-style rope) are not supported yet")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
        "head_dim": int(get("rope.dimension_count", hidden // n_head)),
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_parameters": rope_params,
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False,
        "mlp_bias": False,
        "dtype": "float32",
    }
    for ours, theirs in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                         ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{theirs}" in meta:
            config[ours] = int(meta[f"tokenizer.ggml.{theirs}"])
    return config


_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _hf_name(gguf_name: str) -> str:
    base, _, leaf = gguf_name.rpartition(".")
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{leaf}"
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{leaf}"
    raise ModelLoadError(f"GGUF tensor {gguf_name} has no HF counterpart in the llama layout")


def _tensors(reader, config: dict) -> list[TensorToWrite]:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    out = []
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        name = _hf_name(t.name)
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        n_head = None
        if name.endswith("self_attn.q_proj.weight"):
            n_head = config["num_attention_heads"]
        elif name.endswith("self_attn.k_proj.weight"):
            n_head = config["num_key_value_heads"]

        def produce(t=t, shape=shape, n_head=n_head):
            if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                w = np.asarray(t.data, dtype=np.float32)
            else:
                w = dequantize(t.data, t.tensor_type).astype(np.float32)
            w = w.reshape(shape)
            return _unpermute(w, n_head) if n_head else w

        out.append(TensorToWrite(name, shape, np.dtype(np.float32), produce))
    return out


def build_tokenizer(meta: dict):
    """A transformers fast tokenizer equivalent to the one the GGUF metadata describes."""
    from tokenizers import AddedToken, Regex, pre_tokenizers
    from transformers import GPT2Tokenizer, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    kind = meta.get("tokenizer.ggml.model")
    if kind not in SUPPORTED_GGUF_TOKENIZERS:
        raise ModelLoadError(
            f"GGUF tokenizer model {kind!r} is not supported; supported: {', '.join(SUPPORTED_GGUF_TOKENIZERS)}"
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    token_types = list(meta.get("tokenizer.ggml.token_type") or [])
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges") or []]
    slow = GPT2Tokenizer(vocab=vocab, merges=merges)
    control = [AddedToken(tok, normalized=False, special=True)
               for tok, kind_ in zip(tokens, token_types) if kind_ == _TOKEN_CONTROL and set(tok) <= alphabet]
    if control:
        slow.add_special_tokens({"additional_special_tokens": control}, replace_extra_special_tokens=False)
    known = slow.get_vocab()
    user = [AddedToken(tok, normalized=False, special=False)
            for tok, kind_ in zip(tokens, token_types) if kind_ == _TOKEN_USER_DEFINED and tok in known]
    if user:
        slow.add_tokens(user)
    backend = slow.backend_tokenizer
    split = _PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is not None:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )

    def token(key: str):
        idx = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(idx)] if idx is not None else None

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        additional_special_tokens=[t.content for t in control],
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
    )


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, max_shard_size="5GB") -> Path:
    """Convert a llama-architecture GGUF file into an HF directory (float32 weights)."""
    path = Path(gguf_path)
    reader = _reader(path)
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    config = _llama_config(meta, {t.name for t in reader.tensors})
    tokenizer = build_tokenizer(meta)
    tensors = _tensors(reader, config)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    with atomic_directory(out_dir) as tmp:
        write_safetensors(tmp, tensors, max_shard_size)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)
