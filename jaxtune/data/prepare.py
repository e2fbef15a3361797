"""The data pipeline up to the cache: read -> format -> tokenize + mask -> length policy -> mix ->
split -> pack -> `dataset_prepared_path/<hash>/{train,eval}` (readable by `datasets.load_from_disk`).

The cache key hashes everything that changes the result: the dataset entries and the files they
point to (size and modification time), the tokenizer (vocabulary, added and special tokens), the
chat template, sequence_len, packing and masking settings. A second run with the same key reads the
cache and tokenizes nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from jaxtune.config import Config, DatasetConfig
from jaxtune.data import packing, sources
from jaxtune.data.formats import Encoder, build_encoder, tokenizer_info
from jaxtune.errors import JaxtuneError
from jaxtune.logging import info, warn_once

CACHE_VERSION = 2
PREFERENCE_KINDS = ("preference", "unpaired")  # rows of laid-out examples (data/preference.py)


class EmptyDatasetError(JaxtuneError):
    pass


@dataclasses.dataclass
class PreparedData:
    train: object  # datasets.Dataset
    eval: object | None
    kind: str  # sft | preference | unpaired | prompt
    stats: dict
    path: Path
    tokenizer: object
    packed: bool
    eval_packed: bool
    row_len: int  # tokens a row may hold: sequence_len, or twice it for preference rows (two answers)
    examples_per_row: int = 1  # the most examples (pairs, completions) a row holds

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)


def load_tokenizer_for(cfg: Config):
    """The tokenizer for a config, with `special_tokens`, `tokens` and a chosen chat template applied.

    Returns (tokenizer, report) where report says how the vocabulary grew (the trainer resizes the
    model's embeddings to `len(tokenizer)`).
    """
    from jaxtune import bundled
    from jaxtune.checkpoint.hf import load_tokenizer
    from jaxtune.data.templates import resolve_chat_template

    source = cfg.tokenizer_config or cfg.base_model
    if not source:
        raise JaxtuneError("set base_model (or tokenizer_config) so the data can be tokenized")
    path = bundled.resolve(source)
    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        raise JaxtuneError(f"no tokenizer files in {path} (looked for tokenizer.json / tokenizer_config.json)")
    before = len(tokenizer)
    if cfg.special_tokens:
        allowed = {"bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token"}
        bad = set(cfg.special_tokens) - allowed
        if bad:
            raise JaxtuneError(f"special_tokens: unknown keys {sorted(bad)}; allowed: {sorted(allowed)}")
        tokenizer.add_special_tokens(dict(cfg.special_tokens))
    if cfg.tokens:
        tokenizer.add_tokens(list(cfg.tokens))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.chat_template != "tokenizer_default":
        tokenizer.chat_template = resolve_chat_template(cfg.chat_template, cfg.chat_template_jinja, tokenizer)
    report = {"vocab_before": before, "vocab_after": len(tokenizer)}
    if len(tokenizer) != before:
        info(f"tokenizer vocabulary grew from {before} to {len(tokenizer)} tokens: the model's embeddings "
             f"will be resized to {len(tokenizer)}")
    return tokenizer, report


def _file_fingerprint(path: str) -> list:
    p = Path(path).expanduser()
    if "://" in path or not p.exists():
        return [path]
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _module_fingerprint(dotted: str, dirs: list[str]) -> list:
    import importlib.util
    import sys

    for d in reversed(dirs):
        if d not in sys.path:
            sys.path.insert(0, d)
    try:
        found = importlib.util.find_spec(dotted.rsplit(".", 1)[0])
    except (ImportError, ValueError):
        found = None
    return _file_fingerprint(found.origin) if found is not None and found.origin else [dotted]


def cache_key(cfg: Config, tokenizer) -> str:
    data_keys = ["dataset_weights", "shuffle_merged_datasets", "val_set_size", "dataset_shard_num",
                 "dataset_shard_idx", "seed", "sequence_len", "excess_length_strategy", "sample_packing",
                 "eval_sample_packing", "train_on_inputs", "chat_template", "chat_template_jinja", "eot_tokens",
                 "special_tokens", "tokens", "rl", "prefix_sharing", "kto_loss_type", "min_sample_len",
                 "dataset_exact_deduplication"]
    payload = {
        "version": CACHE_VERSION,
        "config": {k: getattr(cfg, k) for k in data_keys},
        "datasets": [e.model_dump(mode="json") for e in cfg.datasets],
        "test_datasets": [e.model_dump(mode="json") for e in cfg.test_datasets or []],
        "files": [_file_fingerprint(e.path) for e in list(cfg.datasets) + list(cfg.test_datasets or [])],
        # a `type: module.fn` transform (GRPO) is code of the user's: its file is part of the key
        "transforms": [_module_fingerprint(e.type, cfg.code_dirs)
                       for e in list(cfg.datasets) + list(cfg.test_datasets or [])
                       if isinstance(e.type, str) and "." in e.type],
        "tokenizer": hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest(),
        "special": tokenizer.special_tokens_map,
        "template": getattr(tokenizer, "chat_template", None),
        # KTO's KL completions come from the example before, within chunks of micro_batch_size (TRL's rule)
        "kl_chunk": cfg.micro_batch_size if cfg.rl == "kto" else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _encode_batch(batch: dict, indices: list[int], *, encoder: Encoder, where: str) -> dict:
    """datasets.map function: a batch of raw rows -> a batch of tokenized examples."""
    columns = list(batch)
    out: dict[str, list] = {}
    for j, idx in enumerate(indices):
        row = {c: batch[c][j] for c in columns}
        for example in encoder(row, f"{where} row {idx}"):
            for key, value in example.items():
                out.setdefault(key, []).append(value)
    return out


def _tokenize(ds, encoder: Encoder, where: str, processes: int, shards: int | None):
    import datasets

    encoder.check_columns(ds.column_names, where)
    kwargs = dict(batched=True, with_indices=True, remove_columns=ds.column_names,
                  fn_kwargs={"encoder": encoder, "where": where}, desc=f"tokenizing {where}",
                  num_proc=processes if processes > 1 and len(ds) >= 2 * processes else None)
    if not shards or shards <= 1:
        return ds.map(_encode_batch, **kwargs)
    parts = [ds.shard(shards, i, contiguous=True) for i in range(shards)]
    return datasets.concatenate_datasets([p.map(_encode_batch, **kwargs) for p in parts])


def _length_policy(ds, kind: str, cfg: Config, where: str, stats: dict):
    """Drop / truncate / reject rows longer than sequence_len, and drop rows with nothing to train."""
    if kind == "prompt":
        return _prompt_length_policy(ds, cfg, where, stats)
    if kind in PREFERENCE_KINDS:
        return _example_length_policy(ds, kind, cfg, where, stats)
    limit = cfg.sequence_len
    lengths = np.asarray([len(x) for x in ds["input_ids"]]) if len(ds) else np.zeros(0)
    too_long = _over_limit(lengths, cfg, where, stats, "rows are longer")
    if too_long.size:
        strategy = cfg.excess_length_strategy
        info(f"{where}: {too_long.size} of {len(ds)} rows longer than sequence_len={limit} were "
             f"{'dropped' if strategy == 'drop' else 'truncated'}")
        if strategy == "drop":
            ds = ds.select(np.flatnonzero(lengths <= limit))
        else:
            ds = ds.map(lambda b: {c: [x[:limit] for x in b[c]] for c in ("input_ids", "labels")}, batched=True,
                        desc=f"truncating {where}")
    trains = [any(t != -100 for t in x) for x in ds["labels"]] if len(ds) else []
    return _drop_untrained(ds, np.asarray(trains, bool), where, stats)


def _prompt_length_policy(ds, cfg: Config, where: str, stats: dict):
    """GRPO prompts longer than sequence_len: dropped, truncated from the left (the end of the prompt,
    next to the completion, stays; as TRL and Axolotl), or an error naming the row."""
    limit = cfg.sequence_len
    lengths = np.asarray([len(x) for x in ds["prompt_ids"]]) if len(ds) else np.zeros(0, int)
    too_long = _over_limit(lengths, cfg, where, stats, "prompts are longer")
    if too_long.size:
        info(f"{where}: {too_long.size} of {len(ds)} prompts longer than sequence_len={limit} were "
             f"{'dropped' if cfg.excess_length_strategy == 'drop' else 'truncated from the left'}")
        if cfg.excess_length_strategy == "drop":
            return ds.select(np.flatnonzero(lengths <= limit))
        return ds.map(lambda b: {"prompt_ids": [x[-limit:] for x in b["prompt_ids"]]}, batched=True,
                      desc=f"truncating {where}")
    return ds


def _over_limit(lengths: np.ndarray, cfg: Config, where: str, stats: dict, what: str) -> np.ndarray:
    """Indices of the lengths over sequence_len (counted in stats); an error naming the first under
    excess_length_strategy: raise."""
    too_long = np.flatnonzero(lengths > cfg.sequence_len)
    stats.setdefault("too_long", {})[where] = int(too_long.size)
    if too_long.size and cfg.excess_length_strategy == "raise":
        raise JaxtuneError(f"{where}: {too_long.size} {what} than sequence_len={cfg.sequence_len} (first: row "
                           f"{int(too_long[0])}, {int(lengths[too_long[0]])} tokens); set excess_length_strategy: "
                           "drop or truncate")
    return too_long


def _drop_untrained(ds, trains: np.ndarray, where: str, stats: dict):
    untrained = int(len(ds) - np.sum(trains))
    stats.setdefault("no_trained_tokens", {})[where] = untrained
    if untrained:
        info(f"{where}: {untrained} rows with no trained token were dropped")
        ds = ds.select(np.flatnonzero(trains))
    return ds


def _example_length_policy(ds, kind: str, cfg: Config, where: str, stats: dict):
    """Preference examples: each sequence (prompt + an answer) must fit sequence_len, as TRL's
    max_length. drop: the example goes; truncate: answers are cut to fit (TRL's keep_start), and an
    example whose prompt alone fills sequence_len goes; raise: an error naming the row."""
    limit = cfg.sequence_len
    answers = ("chosen", "rejected") if kind == "preference" else ("completion",)
    prompt = np.asarray([len(x) for x in ds["prompt_ids"]]) if len(ds) else np.zeros(0, int)
    longest = np.max([prompt + np.asarray([len(x) for x in ds[f"{a}_ids"]], int) for a in answers], axis=0) \
        if len(ds) else np.zeros(0, int)
    too_long = _over_limit(longest, cfg, where, stats, "examples have a prompt + answer longer")
    if too_long.size:
        strategy = cfg.excess_length_strategy
        if strategy == "drop":
            info(f"{where}: {too_long.size} of {len(ds)} examples longer than sequence_len={limit} were dropped")
            ds = ds.select(np.flatnonzero(longest <= limit))
        else:
            prompt_only = np.flatnonzero(prompt >= limit)
            if prompt_only.size:
                info(f"{where}: {prompt_only.size} examples whose prompt alone fills sequence_len={limit} were "
                     "dropped")
                ds = ds.select(np.flatnonzero(prompt < limit))
            info(f"{where}: answers of {too_long.size - prompt_only.size} examples were truncated to fit "
                 f"sequence_len={limit}")

            def cut(batch):
                out = {}
                for a in answers:
                    room = [limit - len(p) for p in batch["prompt_ids"]]
                    out[f"{a}_ids"] = [x[:r] for x, r in zip(batch[f"{a}_ids"], room)]
                    out[f"{a}_labels"] = [x[:r] for x, r in zip(batch[f"{a}_labels"], room)]
                return out
            ds = ds.map(cut, batched=True, desc=f"truncating {where}")
    trains = np.all([[any(t != -100 for t in x) for x in ds[f"{a}_labels"]] for a in answers], axis=0) \
        if len(ds) else np.zeros(0, bool)
    return _drop_untrained(ds, trains, where, stats)


def _drop_short(ds, minimum: int, kind: str, where: str):
    """Axolotl's min_sample_len: SFT rows of fewer than `minimum` tokens go."""
    if kind != "sft":
        warn_once(f"min_sample_len applies to SFT rows; {where} holds {kind} rows: no effect there")
        return ds
    keep = np.flatnonzero([len(ids) >= minimum for ids in ds["input_ids"]])
    if len(keep) < len(ds):
        info(f"{where}: {len(ds) - len(keep)} rows shorter than min_sample_len={minimum} tokens were dropped")
        ds = ds.select(keep)
    return ds


def _deduplicate(ds, seen: set[bytes], where: str):
    """dataset_exact_deduplication: rows equal, column by column after tokenization, to one seen before go."""
    keep = []
    for i, row in enumerate(ds):
        digest = hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).digest()
        if digest not in seen:
            seen.add(digest)
            keep.append(i)
    if len(keep) < len(ds):
        info(f"{where}: {len(ds) - len(keep)} duplicate rows were dropped (dataset_exact_deduplication)")
        ds = ds.select(keep)
    return ds


def _mix(parts: list, weights: list[float] | None, seed: int):
    """Concatenate datasets; with weights, each contributes round(share * total) rows (subsampled
    without replacement, or repeated whole plus a sample when its share exceeds its size)."""
    import datasets

    if weights is None:
        return datasets.concatenate_datasets(parts)
    total = sum(len(p) for p in parts)
    shares = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    rng = np.random.default_rng(seed)
    chosen = []
    for part, share in zip(parts, shares):
        want = int(round(share * total))
        if want == 0 or len(part) == 0:
            continue
        full, rest = divmod(want, len(part))
        idx = np.concatenate([np.tile(np.arange(len(part)), full),
                              np.sort(rng.choice(len(part), size=rest, replace=False))])
        chosen.append(part.select(idx))
    return datasets.concatenate_datasets(chosen)


def _pack(ds, capacity: int, kind: str, where: str, stats: dict):
    import datasets

    if kind != "sft":
        raise JaxtuneError(f"sample_packing applies to SFT and preference rows; {where} has {kind} rows")
    lengths = np.asarray([len(x) for x in ds["input_ids"]])
    packed = packing.pack_examples(ds["input_ids"], ds["labels"], capacity)
    eff = packing.packing_efficiency(lengths, len(packed["input_ids"]), capacity)
    stats[f"{where}_packing_efficiency"] = eff
    info(f"{where}: packed {len(ds)} samples into {len(packed['input_ids'])} rows of {capacity} tokens "
         f"(packing efficiency {eff:.1%})")
    return datasets.Dataset.from_dict(packed)


def _lay_out(ds, kind: str, cfg: Config, packed: bool, where: str, stats: dict):
    """Preference examples -> rows (data/preference.py): prompts shared (prefix_sharing), several
    examples per row when packed."""
    import datasets

    from jaxtune.data import preference

    kl_chunk = cfg.micro_batch_size if kind == "unpaired" and cfg.kto_loss_type == "kto" else None
    rows, layout = preference.lay_out(ds.to_dict(), kind=kind, capacity=row_length(cfg, kind), packed=packed,
                                      share=cfg.prefix_sharing, kl_chunk=kl_chunk, sequence_len=cfg.sequence_len)
    capacity = row_length(cfg, kind)
    layout["efficiency"] = layout["tokens"] / max(layout["rows"] * capacity, 1) if packed else None
    stats[f"{where}_layout"] = layout
    saved = 1 - layout["tokens"] / max(layout["unshared_tokens"], 1)
    info(f"{where}: {layout['examples']} examples in {layout['rows']} rows of up to {capacity} tokens"
         + (f" (packing efficiency {layout['efficiency']:.1%})" if packed else "")
         + (f"; shared prompts save {saved:.1%} of the tokens" if cfg.prefix_sharing else ""))
    return datasets.Dataset.from_dict(rows)


def row_length(cfg: Config, kind: str) -> int:
    """Tokens a row may hold: sequence_len, or twice it for preference rows (each of an example's two
    sequences may take sequence_len)."""
    return 2 * cfg.sequence_len if kind in PREFERENCE_KINDS else cfg.sequence_len


def _build(cfg: Config, tokenizer, processes: int) -> tuple[object, object | None, str, dict]:
    import datasets

    info_ = tokenizer_info(tokenizer, cfg.eot_tokens)
    stats: dict = {}

    def encode_entries(entries: list[DatasetConfig], label: str) -> tuple[list, str]:
        parts, kinds = [], set()
        for i, entry in enumerate(entries):
            where = f"{label}[{i}] ({entry.path})"
            encoder = build_encoder(entry, tok=info_, top_template=cfg.chat_template, top_jinja=cfg.chat_template_jinja,
                                    train_on_inputs=cfg.train_on_inputs, sequence_len=cfg.sequence_len, rl=cfg.rl,
                                    transform_cfg=cfg, dataset_index=i)
            raw = sources.load_rows(entry, i)
            ds = _tokenize(raw, encoder, where, processes, entry.preprocess_shards)
            ds = _length_policy(ds, encoder.kind, cfg, where, stats)
            if cfg.min_sample_len:
                ds = _drop_short(ds, cfg.min_sample_len, encoder.kind, where)
            stats.setdefault("rows", {})[where] = len(ds)
            parts.append(ds)
            kinds.add(encoder.kind)
        if len(kinds) > 1:
            raise JaxtuneError(f"{label} mixes row kinds {sorted(kinds)}; SFT, preference, KTO and prompt datasets "
                               "cannot be trained together")
        return parts, kinds.pop()

    if not cfg.datasets:
        raise JaxtuneError("the config has no datasets")
    parts, kind = encode_entries(cfg.datasets, "datasets")
    train = _mix(parts, cfg.dataset_weights, cfg.seed)
    if cfg.shuffle_merged_datasets:
        train = train.shuffle(seed=cfg.seed).flatten_indices()
    if cfg.dataset_shard_num:
        train = train.shard(cfg.dataset_shard_num, cfg.dataset_shard_idx or 0, contiguous=True)
    seen: set[bytes] = set()
    if cfg.dataset_exact_deduplication:  # as Axolotl: before the eval split; test rows also against train
        train = _deduplicate(train, seen, "datasets")
    evaluation = None
    if cfg.test_datasets:
        eval_parts, eval_kind = encode_entries(cfg.test_datasets, "test_datasets")
        if eval_kind != kind:
            raise JaxtuneError(f"test_datasets hold {eval_kind} rows but datasets hold {kind} rows")
        evaluation = datasets.concatenate_datasets(eval_parts)
        if cfg.dataset_exact_deduplication:
            evaluation = _deduplicate(evaluation, seen, "test_datasets")
    elif cfg.val_set_size:
        size = cfg.val_set_size
        n_eval = int(round(size * len(train))) if size < 1 else int(size)
        if not 0 < n_eval < len(train):
            raise JaxtuneError(f"val_set_size={size} leaves {len(train) - n_eval} training and {n_eval} eval rows "
                               f"out of {len(train)}")
        split = train.train_test_split(test_size=n_eval, seed=cfg.seed, shuffle=True)
        train, evaluation = split["train"], split["test"]
    if len(train) == 0:
        raise EmptyDatasetError("no training rows are left after filtering (see the counts above): check "
                                "sequence_len, excess_length_strategy and roles_to_train")
    stats["train_samples"] = len(train)
    stats["eval_samples"] = len(evaluation) if evaluation is not None else 0
    if kind in PREFERENCE_KINDS:
        train = _lay_out(train, kind, cfg, cfg.sample_packing, "train", stats)
        if evaluation is not None and len(evaluation):
            evaluation = _lay_out(evaluation, kind, cfg, cfg.packs_eval, "eval", stats)
    elif kind == "prompt":
        if cfg.sample_packing:
            warn_once("sample_packing has no effect under rl: grpo: each row of a GRPO batch holds one prompt and its "
                      "completions, laid out when they are sampled")
    else:
        if cfg.sample_packing:
            train = _pack(train, cfg.sequence_len, kind, "train", stats)
        if evaluation is not None and cfg.packs_eval and len(evaluation):
            evaluation = _pack(evaluation, cfg.sequence_len, kind, "eval", stats)
    stats["train_rows"], stats["eval_rows"] = len(train), len(evaluation) if evaluation is not None else 0
    if kind == "sft":
        stats["train_tokens"] = int(sum(len(x) for x in train["input_ids"]))
        stats["trained_tokens"] = int(sum(sum(t != -100 for t in x) for x in train["labels"]))
    return train, evaluation, kind, stats


def prepare(cfg: Config, *, tokenizer=None, processes: int | None = None, force: bool = False) -> PreparedData:
    """Build (or reuse) the tokenized, masked and packed datasets of a config."""
    if tokenizer is None:
        tokenizer, _ = load_tokenizer_for(cfg)
    root = Path(cfg.dataset_prepared_path or "last_run_prepared")
    key = cache_key(cfg, tokenizer)
    target = root / key
    if target.is_dir() and (target / "meta.json").exists() and not force:
        info(f"using prepared data from {target}")
        return _load_prepared(target, tokenizer)
    processes = processes or cfg.dataset_processes or min(os.cpu_count() or 1, 8)
    train, evaluation, kind, stats = _build(cfg, tokenizer, processes)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        train.save_to_disk(str(tmp / "train"))
        if evaluation is not None:
            evaluation.save_to_disk(str(tmp / "eval"))
        per_row = [stats.get(f"{w}_layout", {}).get("max_examples_per_row", 1) for w in ("train", "eval")]
        meta = {"kind": kind, "stats": stats, "packed": cfg.sample_packing,
                "eval_packed": bool(evaluation is not None and cfg.packs_eval), "sequence_len": cfg.sequence_len,
                "row_len": row_length(cfg, kind), "examples_per_row": max(per_row)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info(f"prepared data written to {target}")
    return _load_prepared(target, tokenizer)


def _load_prepared(target: Path, tokenizer) -> PreparedData:
    """The cached datasets (memory-mapped Arrow) and their metadata."""
    import datasets

    meta = json.loads((target / "meta.json").read_text())
    train = datasets.load_from_disk(str(target / "train"))
    evaluation = datasets.load_from_disk(str(target / "eval")) if (target / "eval").exists() else None
    return PreparedData(train, evaluation, meta["kind"], meta["stats"], target, tokenizer, meta["packed"],
                        meta["eval_packed"], meta["row_len"], meta["examples_per_row"])
