"""The data keys: `datasets:` entries (DatasetConfig), user-defined formats, and the top-level keys
that shape the prepared data (lengths, packing, templates, splits)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from jaxtune.config.base import Section, rewrite_deprecated, warn_no_effect

class UserDefinedFormat(Section):
    """`type:` given as a mapping: a prompt format written in the config (Axolotl's user-defined)."""

    system_prompt: str = Field("", description="System text used when the row has no system field.")
    system_format: str = Field("{system}", description="How the system text is written; must contain {system}.")
    field_system: str = Field("system", description="Column holding a per-row system text.")
    field_instruction: str = Field("instruction", description="Column holding the instruction.")
    field_input: str = Field("input", description="Column holding the optional input.")
    field_output: str = Field("output", description="Column holding the response (trained).")
    format: str = Field("{instruction} {input} ", description="Prompt template; may use {instruction} and {input}.")
    no_input_format: str = Field("{instruction} ", description="Prompt template for rows without input; no {input}.")
    field: str | None = Field(None, description="Unused for this format (accepted for Axolotl compatibility).")

    @field_validator("no_input_format")
    @classmethod
    def _no_input(cls, v: str) -> str:
        if "{input}" in v:
            raise ValueError("no_input_format must not contain {input}")
        return v

    @field_validator("system_format")
    @classmethod
    def _system(cls, v: str) -> str:
        if "{system}" not in v:
            raise ValueError("system_format must contain {system}")
        return v


class UserDefinedPreference(Section):
    """`type:` given as a mapping for a preference or KTO dataset (Axolotl's user_defined.default)."""

    field_prompt: str | None = Field(None, description="Column holding the prompt (default `prompt`).")
    field_system: str | None = Field(None, description="Column holding a system text (default `system`).")
    field_chosen: str | None = Field(None, description="DPO: column of the chosen response (default `chosen`).")
    field_rejected: str | None = Field(None, description="DPO: column of the rejected response (default `rejected`).")
    field_completion: str | None = Field(None, description="KTO: column of the completion (default `completion`).")
    field_label: str | None = Field(None, description="KTO: column of the boolean label (default `label`).")
    prompt_format: str | None = Field(None, description="How the prompt is written: {prompt} and optionally "
                                      "{system}.")
    chosen_format: str | None = Field(None, description="How the chosen response is written ({chosen}).")
    rejected_format: str | None = Field(None, description="How the rejected response is written ({rejected}).")
    completion_format: str | None = Field(None, description="KTO: how the completion is written ({completion}).")


class DatasetConfig(Section):
    """One entry of `datasets:` / `test_datasets:`."""

    path: str = Field(..., description="Local file or directory, datasets hub id, or fsspec URL (s3://, gs://, file://...).")
    type: str | UserDefinedFormat | UserDefinedPreference | None = Field(
        None, description="Row format: alpaca, completion, input_output, chat_template, sharegpt (deprecated), "
        "pretrain, a preference type (with rl:), a prompt type, or a user-defined mapping.")
    ds_type: Literal["json", "jsonl", "parquet", "csv", "arrow", "text"] | None = Field(
        None, description="File type when the extension does not say it.")
    data_files: str | list[str] | None = Field(None, description="Files within `path` (or hub repo) to load.")
    split: str = Field("train", description="Split to take.")
    name: str | None = Field(None, description="Dataset configuration name: a hub dataset's, or one a local "
                             "directory's README.md lists under `configs:` (an error for other local sources).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Hub datasets with loading scripts are not supported.")
    shards: int | None = Field(None, ge=1, description="Split the dataset into this many shards and keep one.")
    shards_idx: int | None = Field(None, ge=0, description="Which shard to keep (default 0).")
    preprocess_shards: int | None = Field(None, ge=1, description="Tokenize in this many pieces (memory bound).")
    field: str | None = Field(None, description="completion / pretrain: the text column (default `text`).")
    # chat_template / sharegpt
    field_messages: str | None = Field(None, description="Column holding the list of messages.")
    message_property_mappings: dict[str, str] | None = Field(
        None, description="Message keys to read: {role: <key>, content: <key>}.")
    roles: dict[str, list[str]] | None = Field(
        None, description="Target role -> source role names, e.g. {assistant: [gpt, model]}.")
    roles_to_train: list[str] | None = Field(None, description="Roles whose turns train (default: assistant).")
    train_on_eos: Literal["turn", "all", "last", "none"] | None = Field(
        None, description="Which end-of-turn tokens train: each trained turn's, all, the last, or none.")
    chat_template: str | None = Field(None, description="Per-dataset chat template (as the top-level key).")
    chat_template_jinja: str | None = Field(None, description="Per-dataset jinja template (chat_template: jinja).")
    drop_system_message: bool = Field(False, description="Remove system messages before rendering.")
    field_thinking: str | None = Field(None, description="chat_template: message key holding the reasoning "
                                       "(default reasoning_content); given to the template as template_thinking_key.")
    template_thinking_key: str | None = Field(None, description="chat_template: key the chat template reads the "
                                              "reasoning from (default reasoning_content).")
    split_thinking: bool = Field(False, description="chat_template: take <think>...</think> (or <reasoning>, "
                                 "<|begin_of_thought|>) out of assistant content into the reasoning.")
    # preference pairs, KTO rows and prompts (user_defined.default reads the formats)
    field_prompt: str | None = Field(None, description="Preference/prompt rows: the prompt column.")
    field_system: str | None = Field(None, description="user_defined.default: the system column.")
    field_chosen: str | None = Field(None, description="Preference rows: the chosen response column.")
    field_rejected: str | None = Field(None, description="Preference rows: the rejected response column.")
    field_completion: str | None = Field(None, description="KTO rows: the completion column.")
    field_label: str | None = Field(None, description="KTO rows: the boolean label column (true: desirable).")
    prompt_format: str | None = Field(None, description="user_defined.default: how the prompt is written.")
    chosen_format: str | None = Field(None, description="user_defined.default: how the chosen response is written.")
    rejected_format: str | None = Field(None, description="user_defined.default: how the rejected response is "
                                        "written.")
    completion_format: str | None = Field(None, description="user_defined.default (KTO): how the completion is "
                                          "written.")

    @model_validator(mode="before")
    @classmethod
    def _deprecated(cls, data: Any) -> Any:
        return warn_no_effect(rewrite_deprecated(data, "dataset"), "dataset") if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _check(self) -> DatasetConfig:
        if self.trust_remote_code:
            raise ValueError("trust_remote_code: true is not supported: datasets with loading scripts cannot be "
                             "read (convert the dataset to parquet/json first)")
        if self.shards_idx is not None and self.shards is None:
            raise ValueError("shards_idx needs shards")
        if self.shards is not None and (self.shards_idx or 0) >= self.shards:
            raise ValueError(f"shards_idx {self.shards_idx} is out of range for shards: {self.shards}")
        return self


class DataKeys(Section):
    """Top-level keys of the data pipeline."""

    datasets: list[DatasetConfig] = Field(default_factory=list, description="Training datasets.")
    test_datasets: list[DatasetConfig] | None = Field(None, description="Explicit evaluation datasets.")
    dataset_weights: list[float] | None = Field(
        None, description="Share of each training dataset in the mix (normalized); rows are subsampled or "
        "repeated deterministically by seed. Default: plain concatenation.")
    shuffle_merged_datasets: bool = Field(True, description="Shuffle rows after merging datasets.")
    val_set_size: float = Field(0.0, ge=0, description="Eval split: fraction (< 1) or number of rows (>= 1).")
    dataset_shard_num: int | None = Field(None, ge=1, description="Keep one of this many shards of the merged data.")
    dataset_shard_idx: int | None = Field(None, ge=0, description="Which merged shard to keep.")
    seed: int = Field(42, description="Seed for shuffling, splitting and mixing.")
    sequence_len: int = Field(2048, ge=8, description="Maximum tokens per row (and packed row length).")
    excess_length_strategy: Literal["drop", "truncate", "raise"] = Field(
        "drop", description="What happens to rows longer than sequence_len.")
    sample_packing: bool = Field(False, description="Pack several samples per row (segment ids keep them apart).")
    eval_sample_packing: bool | None = Field(None, description="Pack the eval set (default: as sample_packing).")
    pad_to_sequence_len: bool = Field(False, description="Pad every batch to sequence_len (one shape).")
    train_on_inputs: bool = Field(False, description="Train on prompt tokens too.")
    chat_template: str = Field("tokenizer_default", description="tokenizer_default, a named template "
                               "(chatml, llama3, mistral, qwen3, gemma), or jinja (with chat_template_jinja).")
    chat_template_jinja: str | None = Field(None, description="The jinja template when chat_template: jinja.")
    eot_tokens: list[str] | None = Field(None, description="End-of-turn tokens besides the tokenizer's eos.")
    special_tokens: dict[str, str] | None = Field(None, description="bos_token/eos_token/pad_token/unk_token to set.")
    tokens: list[str] | None = Field(None, description="New tokens to add to the vocabulary.")
    dataset_prepared_path: str | None = Field(None, description="Cache directory of tokenized (packed) data.")
    dataset_processes: int | None = Field(None, ge=1, description="Tokenization processes (default: CPU count).")
    min_sample_len: int | None = Field(None, ge=1, description="Drop SFT rows of fewer tokens than this (Axolotl's "
                                       "filter; rows with no trained token are always dropped).")
    dataset_exact_deduplication: bool | None = Field(None, description="Drop rows identical (after tokenization) to "
                                                     "an earlier one, and eval rows identical to a training row.")

    @model_validator(mode="after")
    def _check_data(self) -> DataKeys:
        if self.dataset_weights is not None:
            if len(self.dataset_weights) != len(self.datasets):
                raise ValueError(f"dataset_weights has {len(self.dataset_weights)} entries for "
                                 f"{len(self.datasets)} datasets")
            if any(w < 0 for w in self.dataset_weights) or sum(self.dataset_weights) <= 0:
                raise ValueError("dataset_weights must be >= 0 with a positive sum")
        if (self.chat_template == "jinja") != (self.chat_template_jinja is not None):
            raise ValueError("chat_template: jinja and chat_template_jinja go together")
        if self.dataset_shard_idx is not None and self.dataset_shard_num is None:
            raise ValueError("dataset_shard_idx needs dataset_shard_num")
        if self.dataset_shard_num is not None and (self.dataset_shard_idx or 0) >= self.dataset_shard_num:
            raise ValueError("dataset_shard_idx must be < dataset_shard_num")
        return self

    @property
    def packs_eval(self) -> bool:
        return self.sample_packing if self.eval_sample_packing is None else self.eval_sample_packing
