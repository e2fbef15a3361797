"""Row formats (`type:`): a dataset row -> tokenized examples with labels.

Kinds of examples that come out:
  - "sft":        {input_ids, labels}; labels are -100 where a token does not train;
  - "preference" and "unpaired": pairs and KTO's labelled completions (data/preference.py), for the
                  `rl:` objectives;
  - "prompt":     {prompt_ids} plus the row's other columns as they are (GRPO's rewards read them).

Prompt formats tokenize each piece (prompt, response) separately and concatenate the ids, so the
label boundary is a token boundary by construction. Chat formats go through `chat.py`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from jaxtune.config import DatasetConfig, UserDefinedFormat, UserDefinedPreference
from jaxtune.data import chat
from jaxtune.data.chat import IGNORE, ChatSpec
from jaxtune.data.preference import KTO_TYPES, PAIR_TYPES, build_preference_encoder, preference_type_keys
from jaxtune.data.templates import NAMED_END_OF_TURN, resolve_chat_template
from jaxtune.errors import JaxtuneError
from jaxtune.logging import warn_once

ALPACA = UserDefinedFormat(
    system_prompt="Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n",
    format="### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    no_input_format="### Instruction:\n{instruction}\n\n### Response:\n",
)
ALPACA_NO_INPUT_SYSTEM = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n")


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    """What encoders need to know about the tokenizer, computed once."""

    tokenizer: Any
    bos_id: int | None  # prepended to prompt formats when the tokenizer adds a BOS itself
    eos_id: int
    eot_ids: frozenset[int]  # eos + the config's eot_tokens; a chat template adds its own marker


class Encoder:
    kind = "sft"
    type_name = ""
    columns: tuple[str, ...] = ()

    def __call__(self, row: dict, where: str) -> list[dict]:
        raise NotImplementedError

    def check_columns(self, columns: list[str], where: str) -> None:
        missing = [c for c in self.columns if c not in columns]
        if missing:
            raise JaxtuneError(f"{where}: missing field {missing[0]!r} for type '{self.type_name}'; the dataset "
                               f"has columns {sorted(columns)}")


def _text_ids(tok: TokenizerInfo, text: str) -> list[int]:
    return tok.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _field(row: dict, name: str, where: str, *, required: bool = True) -> str:
    value = row.get(name)
    if value is None:
        if required:
            raise JaxtuneError(f"{where}: field {name!r} is missing or null")
        return ""
    return str(value)


@dataclasses.dataclass
class PromptFormatEncoder(Encoder):
    """alpaca and the user-defined format: prompt (untrained unless train_on_inputs) + output + EOS."""

    tok: TokenizerInfo
    spec: UserDefinedFormat
    train_on_inputs: bool
    no_input_system: str | None = None
    type_name: str = "user-defined"

    def __post_init__(self):
        self.columns = (self.spec.field_instruction, self.spec.field_output)

    def __call__(self, row, where):
        s = self.spec
        instruction = _field(row, s.field_instruction, where)
        inp = _field(row, s.field_input, where, required=False)
        system = _field(row, s.field_system, where, required=False) or (
            s.system_prompt if inp or self.no_input_system is None else self.no_input_system)
        prompt = (s.system_format.format(system=system) if system else "")
        prompt += s.format.format(instruction=instruction, input=inp) if inp else \
            s.no_input_format.format(instruction=instruction)
        prompt_ids = ([self.tok.bos_id] if self.tok.bos_id is not None else []) + _text_ids(self.tok, prompt)
        out_ids = _text_ids(self.tok, _field(row, s.field_output, where)) + [self.tok.eos_id]
        labels = (prompt_ids if self.train_on_inputs else [IGNORE] * len(prompt_ids)) + out_ids
        return [{"input_ids": prompt_ids + out_ids, "labels": list(labels)}]


@dataclasses.dataclass
class CompletionEncoder(Encoder):
    """Raw text, every token trained, EOS appended. `pretrain` splits long texts into chunks."""

    tok: TokenizerInfo
    field: str
    chunk: int | None = None  # sequence_len for pretrain
    type_name: str = "completion"

    def __post_init__(self):
        self.columns = (self.field,)

    def __call__(self, row, where):
        ids = ([self.tok.bos_id] if self.tok.bos_id is not None else []) + _text_ids(
            self.tok, _field(row, self.field, where)) + [self.tok.eos_id]
        pieces = [ids] if self.chunk is None else [ids[i:i + self.chunk] for i in range(0, len(ids), self.chunk)]
        return [{"input_ids": p, "labels": list(p)} for p in pieces]


@dataclasses.dataclass
class InputOutputEncoder(Encoder):
    """`segments: [{text, label}]`: each segment tokenized alone; label false -> -100. BOS, no EOS."""

    tok: TokenizerInfo
    type_name: str = "input_output"
    columns: tuple[str, ...] = ("segments",)

    def __call__(self, row, where):
        segments = row.get("segments")
        if not isinstance(segments, list) or not segments:
            raise JaxtuneError(f"{where}: 'segments' must be a non-empty list of {{text, label}}")
        ids = [self.tok.bos_id] if self.tok.bos_id is not None else []
        labels = [IGNORE] * len(ids)
        for i, seg in enumerate(segments):
            if not isinstance(seg, dict) or "text" not in seg:
                raise JaxtuneError(f"{where}: segment {i} has no 'text'")
            piece = _text_ids(self.tok, str(seg["text"]))
            ids += piece
            labels += piece if seg.get("label", True) else [IGNORE] * len(piece)
        return [{"input_ids": ids, "labels": labels}]


@dataclasses.dataclass
class ChatEncoder(Encoder):
    """chat_template (and sharegpt): multi-turn conversations, every trained-role turn trains."""

    tok: TokenizerInfo
    spec: ChatSpec
    type_name: str = "chat_template"

    def __post_init__(self):
        self.columns = (self.spec.field_messages,)

    def __call__(self, row, where):
        messages = chat.normalize_messages(row.get(self.spec.field_messages), self.spec, where)
        ids, labels = chat.encode_conversation(self.tok.tokenizer, self.spec, messages, where)
        return [{"input_ids": ids, "labels": labels}]


@dataclasses.dataclass
class PromptEncoder(Encoder):
    """Prompt rows (GRPO), as TRL reads them: a message list is rendered with the chat template and the
    generation prompt; a string is tokenized as it is (with the tokenizer's own special tokens, as
    TRL's `processing_class(text=prompts)`). With `transform` (Axolotl's `type: module.fn`), each raw
    row goes through it first. The row keeps the prompt (messages normalized to role/content) and
    every other column, as JSON, for the reward functions."""

    tok: TokenizerInfo
    make_spec: Callable[[], ChatSpec]  # the chat template, resolved when a prompt is a message list
    field: str
    transform: Callable | None = None
    remove_columns: tuple[str, ...] | str = ()  # or "__all__" (Axolotl's): keep only what the transform returns
    type_name: str = "prompt"
    kind = "prompt"

    def __post_init__(self):
        self.columns = () if self.transform is not None else (self.field,)
        self._spec = None

    def __call__(self, row, where):
        import json

        if self.transform is not None:
            row = self._transformed(row, where)
        value = row.get(self.field)
        if isinstance(value, str):
            ids = self.tok.tokenizer(value)["input_ids"]
        elif isinstance(value, list):
            if self._spec is None:
                self._spec = self.make_spec()
            value = [{"role": m["role"], "content": m["content"]}
                     for m in chat.normalize_messages(value, self._spec, where)]
            text = chat.render(self.tok.tokenizer, self._spec.template, value, add_generation_prompt=True)
            ids = self.tok.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            raise JaxtuneError(f"{where}: {self.field!r} must be a string or a list of messages (got "
                               f"{type(value).__name__}{' from the transform' if self.transform else ''})")
        if not ids:
            raise JaxtuneError(f"{where}: the prompt is empty")
        columns = {k: v for k, v in row.items() if k != self.field}
        return [{"prompt_ids": ids, "prompt": json.dumps(value), "columns": json.dumps(columns, default=str)}]

    def _transformed(self, row, where):
        try:
            out = self.transform(dict(row), tokenizer=self.tok.tokenizer) if _takes_tokenizer(self.transform) \
                else self.transform(dict(row))
        except Exception as e:  # noqa: BLE001 - the user's transform: say where
            raise JaxtuneError(f"{where}: dataset type {self.type_name!r} raised {type(e).__name__}: {e}") from e
        if not isinstance(out, dict):
            raise JaxtuneError(f"{where}: dataset type {self.type_name!r} returned {type(out).__name__}, not a row")
        merged = {} if self.remove_columns == "__all__" else \
            {k: v for k, v in row.items() if k not in self.remove_columns}
        merged.update(out)  # as datasets.map: the returned columns over the row's
        return merged


def _takes_tokenizer(fn) -> bool:
    import inspect

    try:
        return "tokenizer" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


SFT_TYPES = ("alpaca", "completion", "pretrain", "input_output", "chat_template", "sharegpt")
PROMPT_TYPES = ("prompt",)
SUPPORTED_TYPES = SFT_TYPES + PROMPT_TYPES + tuple(dict.fromkeys(PAIR_TYPES + KTO_TYPES))


# Dataset keys each type reads, besides the ones every type reads (where and how to load the rows).
_CHAT_KEYS = {"field_messages", "message_property_mappings", "roles", "roles_to_train", "train_on_eos",
              "chat_template", "chat_template_jinja", "drop_system_message"}
_THINKING_KEYS = {"field_thinking", "template_thinking_key", "split_thinking"}  # SFT chat_template only, as Axolotl
_LOADING_KEYS = {"path", "type", "ds_type", "data_files", "split", "name", "revision", "trust_remote_code", "shards",
                 "shards_idx", "preprocess_shards"}
TYPE_KEYS: dict[str, set[str]] = {
    "alpaca": set(), "user-defined": set(), "input_output": set(),
    "completion": {"field"}, "pretrain": {"field"},
    "chat_template": _CHAT_KEYS | _THINKING_KEYS, "sharegpt": _CHAT_KEYS | _THINKING_KEYS,
    "prompt": _CHAT_KEYS | {"field_prompt"},
    **{t: preference_type_keys(t, _CHAT_KEYS) for t in PAIR_TYPES + KTO_TYPES},
}


def _check_keys(entry: DatasetConfig, type_name: str) -> None:
    """A dataset key the type does not read is an error, never silently ignored."""
    unused = sorted(k for k in entry.model_fields_set - _LOADING_KEYS if k not in TYPE_KEYS[type_name])
    if unused:
        raise JaxtuneError(f"dataset {entry.path}: {', '.join(unused)} does not apply to type '{type_name}' "
                           f"(it reads: {', '.join(sorted(TYPE_KEYS[type_name])) or 'no extra keys'})")


def end_of_turn_ids(tok: TokenizerInfo, template_name: str | None) -> frozenset[int]:
    """End-of-turn ids for a chat template: eos, eot_tokens, and a named template's own marker."""
    marker = NAMED_END_OF_TURN.get(template_name or "")
    ids = tok.tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else []
    return tok.eot_ids | frozenset(ids) if len(ids) == 1 else tok.eot_ids


def build_encoder(entry: DatasetConfig, *, tok: TokenizerInfo, top_template: str, top_jinja: str | None,
                  train_on_inputs: bool, sequence_len: int, rl: str | None = None, transform_cfg=None,
                  dataset_index: int = 0) -> Encoder:
    """The encoder for one `datasets:` entry (`rl`: the objective, whose rows it makes; `transform_cfg`
    and `dataset_index`: what a GRPO row transform's loader is called with, as Axolotl calls it)."""
    kind = entry.type
    if kind is None and rl not in ("grpo", "gdpo"):
        raise JaxtuneError(f"dataset {entry.path}: set `type:` (one of {', '.join(SUPPORTED_TYPES)}, or a "
                           "user-defined mapping)")
    if isinstance(kind, str) and kind not in TYPE_KEYS and rl not in ("grpo", "gdpo"):
        raise JaxtuneError(f"dataset {entry.path}: unknown type '{kind}'; supported: {', '.join(SUPPORTED_TYPES)} "
                           "(or a user-defined mapping)")
    if rl in ("grpo", "gdpo"):
        return _prompt_encoder(entry, tok, top_template, top_jinja, transform_cfg, dataset_index)
    if rl is not None:
        if train_on_inputs:
            raise JaxtuneError(f"dataset {entry.path}: train_on_inputs does not apply to rl: {rl} (only the "
                               "responses are compared)")
        name = kind if isinstance(kind, str) else "user_defined.default"
        _check_keys(entry, name if name in TYPE_KEYS else "user_defined.default")
        return build_preference_encoder(entry, tok=tok, rl=rl, top_template=top_template, top_jinja=top_jinja)
    if isinstance(kind, str) and kind in PAIR_TYPES + KTO_TYPES and kind not in SFT_TYPES:
        raise JaxtuneError(f"dataset {entry.path}: type '{kind}' makes preference rows; set rl: dpo (or ipo, orpo, "
                           "simpo) for pairs, or rl: kto for labelled completions")
    if isinstance(kind, UserDefinedPreference):
        raise JaxtuneError(f"dataset {entry.path}: this user-defined type maps preference fields; set rl: dpo (or "
                           "kto) to train on it")
    _check_keys(entry, kind if isinstance(kind, str) else "user-defined")
    if isinstance(kind, UserDefinedFormat):
        return PromptFormatEncoder(tok, kind, train_on_inputs)
    if kind == "alpaca":
        return PromptFormatEncoder(tok, ALPACA, train_on_inputs, no_input_system=ALPACA_NO_INPUT_SYSTEM,
                                   type_name="alpaca")
    if kind in ("completion", "pretrain"):
        return CompletionEncoder(tok, entry.field or "text", chunk=sequence_len if kind == "pretrain" else None,
                                 type_name=kind)
    if kind == "input_output":
        return InputOutputEncoder(tok)

    def spec(**defaults) -> ChatSpec:
        return _chat_spec(entry, tok, top_template, top_jinja, train_on_inputs=train_on_inputs, **defaults)

    if kind in ("chat_template", "sharegpt"):
        if kind == "sharegpt":
            warn_once("type: sharegpt is deprecated; it is read as chat_template over conversations/from/value")
            return ChatEncoder(tok, spec(field_messages="conversations",
                                         mappings={"role": "from", "content": "value"}), type_name="sharegpt")
        return ChatEncoder(tok, spec())
    raise JaxtuneError(f"dataset {entry.path}: type 'prompt' makes prompt rows for rl: grpo (set rl: grpo and "
                       "trl.reward_funcs)")


def _chat_spec(entry: DatasetConfig, tok: TokenizerInfo, top_template: str, top_jinja: str | None, *,
               train_on_inputs: bool = False, field_messages: str | None = None, mappings=None) -> ChatSpec:
    name = entry.chat_template or top_template
    jinja = entry.chat_template_jinja or (top_jinja if name == "jinja" else None)
    template = resolve_chat_template(name, jinja, tok.tokenizer)
    return ChatSpec.build(
        template, field_messages=entry.field_messages or field_messages,
        message_property_mappings=entry.message_property_mappings or mappings, roles=entry.roles,
        roles_to_train=entry.roles_to_train, train_on_eos=entry.train_on_eos, train_on_inputs=train_on_inputs,
        drop_system_message=entry.drop_system_message, eot_ids=end_of_turn_ids(tok, name),
        field_thinking=entry.field_thinking, template_thinking_key=entry.template_thinking_key,
        split_thinking=entry.split_thinking)


def _prompt_encoder(entry: DatasetConfig, tok: TokenizerInfo, top_template: str, top_jinja: str | None, cfg,
                    dataset_index: int) -> PromptEncoder:
    """GRPO's rows: `type: prompt` (or none: a `prompt` column as it is), or Axolotl's `type: module.fn`
    row transform."""
    kind = entry.type
    if kind is not None and not isinstance(kind, str):
        raise JaxtuneError(f"dataset {entry.path}: rl: grpo reads prompts: type: prompt, a module.fn row transform, "
                           "or no type (a `prompt` column)")
    if kind is None or kind == "prompt":
        _check_keys(entry, "prompt")
        return PromptEncoder(tok, functools.partial(_chat_spec, entry, tok, top_template, top_jinja),
                             entry.field_prompt or "prompt")
    if kind in TYPE_KEYS or "." not in kind:
        raise JaxtuneError(f"dataset {entry.path}: type '{kind}' makes {'SFT or preference' if kind in TYPE_KEYS else 'no'}"
                           " rows; rl: grpo trains on prompts: type: prompt, a module.fn row transform (Axolotl's "
                           "form: fn(cfg, dataset_idx) returns transform(row) -> {'prompt': ..., ...}), or no type")
    from jaxtune.objectives.rewards import dataset_transform

    _check_keys(entry, "prompt")
    transform, kwargs = dataset_transform(kind, cfg, dataset_index)
    unknown = sorted(set(kwargs) - {"remove_columns"})
    if unknown:
        raise JaxtuneError(f"dataset {entry.path}: type {kind!r} returned map arguments {unknown}; jaxtune reads "
                           "remove_columns only")
    remove = kwargs.get("remove_columns") or ()
    return PromptEncoder(tok, functools.partial(_chat_spec, entry, tok, top_template, top_jinja),
                         entry.field_prompt or "prompt", transform=transform, remove_columns=remove if remove == "__all__" else tuple(remove),
                         type_name=kind)


def tokenizer_info(tokenizer, eot_tokens: list[str] | None = None) -> TokenizerInfo:
    if tokenizer.eos_token_id is None:
        raise JaxtuneError("the tokenizer has no eos_token; set special_tokens: {eos_token: ...}")
    probe = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id] else None
    eot = {tokenizer.eos_token_id}
    for name in eot_tokens or []:
        ids = tokenizer(name, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise JaxtuneError(f"eot_tokens: {name!r} is not a single token in the vocabulary (add it with tokens:)")
        eot.add(ids[0])
    return TokenizerInfo(tokenizer, bos, tokenizer.eos_token_id, frozenset(eot))


__all__ = ["SUPPORTED_TYPES", "build_encoder", "end_of_turn_ids", "tokenizer_info", "TokenizerInfo", "Encoder"]
