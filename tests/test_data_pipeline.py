"""Sources, config, the prepared-data cache, mixing/splitting, and the grain loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxtune.config import ConfigError, build_config, load_config
from jaxtune.data.loader import BatchLoader
from jaxtune.data.prepare import EmptyDatasetError, prepare
from jaxtune.data.sources import DataSourceError, load_rows
from jaxtune.errors import JaxtuneError

ALPACA_ROWS = [{"instruction": f"Say {i}", "input": "" if i % 2 else f"ctx {i}", "output": f"answer {i}"} for i in range(40)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path, smollm2_dir, datasets, **kw):
    return build_config({"base_model": str(smollm2_dir), "datasets": datasets, "sequence_len": 256,
                         "dataset_prepared_path": str(tmp_path / "prepared"), "dataset_processes": 1, **kw})


# -- sources ---------------------------------------------------------------------------------------

def test_local_file_types_and_directories(tmp_path):
    import datasets

    from jaxtune.config import DatasetConfig

    ds = datasets.Dataset.from_list(ALPACA_ROWS[:5])
    write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS[:5])
    (tmp_path / "a.json").write_text(json.dumps(ALPACA_ROWS[:5]))
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.to_csv(str(tmp_path / "a.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    (tmp_path / "dir").mkdir()
    write_jsonl(tmp_path / "dir" / "part1.jsonl", ALPACA_ROWS[:3])
    write_jsonl(tmp_path / "dir" / "part2.jsonl", ALPACA_ROWS[3:5])
    (tmp_path / "noext").write_text((tmp_path / "a.jsonl").read_text())
    paths = [("a.jsonl", {}), ("a.json", {}), ("a.parquet", {}), ("a.csv", {}), (str(arrow), {}), ("saved", {}),
             ("dir", {}), ("noext", {"ds_type": "json"}), ("a.jsonl", {"shards": 5, "shards_idx": 1})]
    for path, extra in paths:
        rows = load_rows(DatasetConfig(path=str(tmp_path / path), type="alpaca", **extra), 0)
        want = ALPACA_ROWS[1:2] if extra.get("shards") else ALPACA_ROWS[:5]
        assert [r["instruction"] for r in rows] == [r["instruction"] for r in want], path


def test_fsspec_urls(tmp_path, monkeypatch):
    import datasets
    import fsspec

    from jaxtune.config import DatasetConfig

    write_jsonl(tmp_path / "u.jsonl", ALPACA_ROWS[:4])
    rows = load_rows(DatasetConfig(path=f"file://{tmp_path / 'u.jsonl'}", type="alpaca"), 0)
    assert len(rows) == 4
    # The tests run with the hub offline, which `datasets` applies to every remote filesystem; the
    # in-memory one needs no network.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with fsspec.open("memory://bucket/data/rows.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ALPACA_ROWS[:3]))
    rows = load_rows(DatasetConfig(path="memory://bucket/data", type="alpaca"), 0)
    assert [r["output"] for r in rows] == ["answer 0", "answer 1", "answer 2"]


def test_bad_sources_have_clear_errors(tmp_path):
    from jaxtune.config import DatasetConfig

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    with pytest.raises(DataSourceError, match=r"bad\.jsonl:2: invalid JSON"):
        load_rows(DatasetConfig(path=str(bad), type="alpaca"), 0)
    with pytest.raises(DataSourceError, match="not found locally.*hub"):
        load_rows(DatasetConfig(path="someone/no-such-dataset-xyz", type="alpaca"), 3)


def test_missing_field_and_empty_dataset(tmp_path, smollm2_dir):
    write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x", "response": "y"}])
    cfg = config(tmp_path, smollm2_dir, [{"path": str(tmp_path / "d.jsonl"), "type": "alpaca"}])
    with pytest.raises(JaxtuneError, match=r"datasets\[0\].*missing field 'output'.*response"):
        prepare(cfg)
    write_jsonl(tmp_path / "long.jsonl", [{"text": "word " * 400}])
    cfg = config(tmp_path, smollm2_dir, [{"path": str(tmp_path / "long.jsonl"), "type": "completion"}])
    with pytest.raises(EmptyDatasetError, match="no training rows"):
        prepare(cfg)


# -- config ----------------------------------------------------------------------------------------

def test_config_errors_name_the_key(tmp_path, caplog):
    with pytest.raises(ConfigError, match="unknown config key 'sequence_length'; did you mean 'sequence_len'"):
        build_config({"sequence_length": 10})
    with pytest.raises(ConfigError, match=r"unknown config key 'datasets\[0\].feild'; did you mean 'field'"):
        build_config({"datasets": [{"path": "x", "feild": "text"}]})
    with pytest.raises(ConfigError, match="dataset_weights has 1 entries for 2 datasets"):
        build_config({"datasets": [{"path": "a"}, {"path": "b"}], "dataset_weights": [1]})
    cfg = build_config({"datasets": [{"path": "a", "train_on_split": "test", "message_field_role": "from"}],
                        "sample_packing_bin_size": 200}, overrides=["sequence_len=512", "sample_packing=true"])
    assert cfg.datasets[0].split == "test" and cfg.datasets[0].message_property_mappings == {"role": "from"}
    assert cfg.sequence_len == 512 and cfg.sample_packing is True
    (tmp_path / "c.yml").write_text("datasets:\n  - path: data.jsonl\n    type: alpaca\n")
    (tmp_path / "data.jsonl").write_text("")
    assert load_config(tmp_path / "c.yml").datasets[0].path == str(tmp_path / "data.jsonl")


# -- prepare: cache, mixing, splitting, packing ---------------------------------------------------

def test_cache_is_reused_and_readable(tmp_path, smollm2_dir, monkeypatch):
    import datasets

    import jaxtune.data.sources as sources

    write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    cfg = config(tmp_path, smollm2_dir, [{"path": str(tmp_path / "a.jsonl"), "type": "alpaca"}],
                 sample_packing=True, val_set_size=0.25)
    first = prepare(cfg)
    assert first.eval is not None and first.stats["eval_samples"] == 10
    cached = datasets.load_from_disk(str(first.path / "train"))
    assert {"input_ids", "labels", "segment_ids", "positions"} <= set(cached.column_names)
    monkeypatch.setattr(sources, "load_rows", lambda *a: pytest.fail("the cache was not reused"))
    second = prepare(cfg)
    assert second.path == first.path and second.train["input_ids"] == first.train["input_ids"]
    monkeypatch.undo()
    changed = prepare(cfg.model_copy(update={"sequence_len": 128}))
    assert changed.path != first.path


def test_val_split_is_deterministic_and_weights_mix(tmp_path, smollm2_dir):
    a = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS[:30])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"doc {i}"} for i in range(10)])
    entries = [{"path": str(a), "type": "alpaca"}, {"path": str(b), "type": "completion"}]
    one = prepare(config(tmp_path, smollm2_dir, entries, val_set_size=8, seed=3))
    two = prepare(config(tmp_path / "other", smollm2_dir, entries, val_set_size=8, seed=3))
    assert one.eval["input_ids"] == two.eval["input_ids"] and len(one.eval) == 8 and len(one.train) == 32
    mixed = prepare(config(tmp_path, smollm2_dir, entries, dataset_weights=[1, 3], shuffle_merged_datasets=False))
    texts = [mixed.tokenizer.decode(x) for x in mixed.train["input_ids"]]
    from_b = sum(t.startswith("doc") for t in texts)
    assert len(texts) == 40 and from_b == 30  # 3/4 of 40 rows from the 10-row dataset (each repeated 3x)


def test_too_long_rows_truncate_or_raise(tmp_path, smollm2_dir):
    rows = [{"text": "word " * 400}, {"text": "short"}]
    write_jsonl(tmp_path / "t.jsonl", rows)
    entry = [{"path": str(tmp_path / "t.jsonl"), "type": "completion"}]
    data = prepare(config(tmp_path, smollm2_dir, entry, excess_length_strategy="truncate"))
    assert sorted(len(x) for x in data.train["input_ids"])[-1] == 256 and data.stats["too_long"]
    dropped = prepare(config(tmp_path, smollm2_dir, entry))
    assert len(dropped.train) == 1
    with pytest.raises(JaxtuneError, match="longer than sequence_len=256"):
        prepare(config(tmp_path, smollm2_dir, entry, excess_length_strategy="raise"))


def test_special_tokens_and_added_tokens(tmp_path, smollm2_dir):
    write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS[:4])
    cfg = config(tmp_path, smollm2_dir, [{"path": str(tmp_path / "a.jsonl"), "type": "alpaca"}],
                 tokens=["<tool>", "</tool>"], special_tokens={"pad_token": "<|pad|>"})
    data = prepare(cfg)
    assert data.vocab_size == 49152 + 3
    tok = data.tokenizer
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == 49152  # special tokens first, then `tokens`
    assert tok("<tool>x</tool>", add_special_tokens=False)["input_ids"][::2] == [49153, 49154]


# -- loader ----------------------------------------------------------------------------------------

def _rows(n, rng):
    return [{"input_ids": [i] * int(rng.integers(1, 50)), "labels": [i] * 3} for i in range(n)]


def test_loader_deterministic_resumable_and_bucketed():
    import datasets

    rng = np.random.default_rng(0)
    rows = datasets.Dataset.from_list([{**r, "labels": r["input_ids"]} for r in _rows(37, rng)])
    make = lambda: BatchLoader(rows, batch_size=4, sequence_len=256, pad_id=0, packed=False, seed=7,  # noqa: E731
                               shard_index=0, shard_count=1)
    a = [b["input_ids"] for b in make().iterate(num_epochs=2)]
    b = [b["input_ids"] for b in make().iterate(num_epochs=2)]
    assert len(a) == 2 * 10 and all((x == y).all() for x, y in zip(a, b))
    assert {x.shape[1] for x in a} <= {64}  # the 64-token bucket holds every batch here
    assert not all((x == y).all() for x, y in zip(a[:10], a[10:]) if x.shape == y.shape)  # reshuffled per epoch
    loader = make()
    it = loader.iterate(num_epochs=2)
    for _ in range(13):
        next(it)
    state = json.loads(json.dumps(loader.state()))
    rest = [b["input_ids"] for b in make().iterate(num_epochs=2, state=state)]
    assert len(rest) == 7 and all((x == y).all() for x, y in zip(rest, a[13:]))


def test_two_hosts_see_every_row_once():
    import datasets

    rows = datasets.Dataset.from_list([{"input_ids": [i + 1], "labels": [i + 1]} for i in range(23)])
    seen, steps = [], []
    for host in range(2):
        loader = BatchLoader(rows, batch_size=4, sequence_len=64, pad_id=0, packed=False, seed=1,
                             shard_index=host, shard_count=2)
        batches = list(loader.iterate(num_epochs=1))
        steps.append(len(batches))
        for b in batches:
            seen += [int(r[0]) for r, s in zip(b["input_ids"], b["segment_ids"]) if s[0] == 1]
            assert ((b["segment_ids"] == 0) <= (b["labels"] == -100)).all()  # padding never trains
    assert steps[0] == steps[1] == 3
    assert sorted(seen) == list(range(1, 24))


def test_preprocess_cli_debug_with_two_processes(tmp_path, smollm2_dir, capsys):
    """`jaxtune preprocess --debug` on the shipped chat sample, tokenized by 2 worker processes."""
    from jaxtune.cli import main

    repo = Path(__file__).resolve().parents[1]
    code = main(["preprocess", str(repo / "configs" / "chat_sample.yml"), "--debug", "--debug-examples", "1",
                 f"base_model={smollm2_dir}", f"dataset_prepared_path={tmp_path}", "dataset_processes=2"])
    out = capsys.readouterr().out
    assert code == 0 and "prepared 2 training rows and 2 eval rows (sft)" in out
    trained = [line for line in out.splitlines() if " * " in line]
    assert trained and any("<|im_end|>" in line for line in trained)
    assert not any("'user'" in line for line in trained)  # prompt tokens are never marked
    assert main(["preprocess", str(tmp_path / "missing.yml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_loader_pads_to_sequence_len_when_asked():
    import datasets

    rows = datasets.Dataset.from_list([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 4)
    for pad, width in ((True, 200), (False, 64)):
        loader = BatchLoader(rows, batch_size=2, sequence_len=200, pad_id=0, packed=False, pad_to_sequence_len=pad,
                             shard_index=0, shard_count=1)
        assert {b["input_ids"].shape for b in loader.iterate()} == {(2, width)}


def test_min_sample_len_and_exact_deduplication(tmp_path, smollm2_dir):
    """Axolotl's min_sample_len drops short SFT rows; dataset_exact_deduplication drops rows equal (after
    tokenization) to an earlier one, and test rows equal to a training row."""
    rows = ALPACA_ROWS[:10] + ALPACA_ROWS[:4] + [{"instruction": "x", "input": "", "output": "y"}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    test = write_jsonl(tmp_path / "test.jsonl", ALPACA_ROWS[8:12])
    entries = [{"path": str(train), "type": "alpaca"}]
    plain = prepare(config(tmp_path, smollm2_dir, entries, shuffle_merged_datasets=False))
    lengths = [len(x) for x in plain.train["input_ids"]]
    assert len(plain.train) == 15
    cut = max(lengths)  # only the longest rows stay
    short = prepare(config(tmp_path, smollm2_dir, entries, shuffle_merged_datasets=False, min_sample_len=cut))
    assert [len(x) for x in short.train["input_ids"]] == [n for n in lengths if n >= cut]
    assert 0 < len(short.train) < len(lengths)
    unique = prepare(config(tmp_path, smollm2_dir, entries, shuffle_merged_datasets=False,
                            dataset_exact_deduplication=True, test_datasets=[{"path": str(test), "type": "alpaca"}]))
    assert unique.train["input_ids"] == plain.train["input_ids"][:10] + plain.train["input_ids"][14:]
    assert len(unique.eval) == 2  # rows 8 and 9 are training rows too; 10 and 11 stay
    assert {tuple(x) for x in unique.eval["input_ids"]}.isdisjoint({tuple(x) for x in unique.train["input_ids"]})


def test_curriculum_sampling_reads_rows_in_order():
    import datasets

    from jaxtune.trainer import make_plan

    rng = np.random.default_rng(0)
    rows = datasets.Dataset.from_list([{**r, "labels": r["input_ids"]} for r in _rows(12, rng)])
    loader = BatchLoader(rows, batch_size=4, sequence_len=256, pad_id=0, packed=False, seed=7, shuffle=False,
                         shard_index=0, shard_count=1)
    firsts = [b["input_ids"][:, 0].tolist() for b in loader.iterate(num_epochs=2)]
    want = [[r[0] for r in rows["input_ids"][i:i + 4]] for i in (0, 4, 8)]
    assert sorted(map(sorted, firsts)) == sorted(map(sorted, want * 2))
    cfg = build_config({"curriculum_sampling": True, "num_epochs": 0.5})
    assert cfg.curriculum_sampling and make_plan(cfg, 10, has_eval=False).total_steps == 5
