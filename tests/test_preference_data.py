"""Preference data: Axolotl's DPO/ORPO/KTO dataset types, tokenized as TRL does; pairs laid out with a
shared prompt (and without), packed several per row; bad rows named; the length policy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxtune.batch import BRANCH, IGNORE
from jaxtune.config import DatasetConfig, build_config
from jaxtune.data import preference
from jaxtune.data.formats import build_encoder, tokenizer_info
from jaxtune.data.prepare import prepare
from jaxtune.errors import JaxtuneError


def encode(tok, entry: dict, rows: list[dict], rl="dpo", template="tokenizer_default"):
    enc = build_encoder(DatasetConfig(**entry), tok=tokenizer_info(tok), top_template=template, top_jinja=None,
                        train_on_inputs=False, sequence_len=4096, rl=rl)
    return [ex for i, row in enumerate(rows) for ex in enc(row, f"p.jsonl row {i}")]


def trl_split(tok, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """TRL's tokenization of a text example (DPOTrainer._prepare_dataset)."""
    if not completion.endswith(tok.eos_token):
        completion += tok.eos_token
    p, full = tok(prompt)["input_ids"], tok(prompt + completion)["input_ids"]
    n = next((i for i, (a, b) in enumerate(zip(p, full)) if a != b), min(len(p), len(full)))
    return p[:n], full[n:]


CHATML = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
CHATML_SYSTEM = "<|im_start|>system\n{}<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("type_name,row,prompt,chosen,rejected", [
    ("chatml.intel", {"system": "Be kind", "question": "Pick", "chosen": "Apple", "rejected": "Rock"},
     CHATML_SYSTEM.format("Be kind", "Pick"), "Apple<|im_end|>", "Rock<|im_end|>"),
    ("chatml.prompt_pairs", {"prompt": "Pick", "chosen": "Apple", "rejected": "Rock"}, CHATML.format("Pick"),
     "Apple<|im_end|>", "Rock<|im_end|>"),
    ("chatml.icr", {"input": "Pick", "chosen": "Apple", "rejected": "Rock"}, CHATML.format("Pick"),
     "Apple<|im_end|>", "Rock<|im_end|>"),
    ("chatml.argilla", {"instruction": "Pick", "chosen_response": "Apple", "rejected_response": "Rock"},
     CHATML.format("Pick"), "Apple<|im_end|>", "Rock<|im_end|>"),
    ("chatml.ultra", {"prompt": "Pick", "chosen": [{"role": "user", "content": "Pick"},
                                                    {"role": "assistant", "content": "Apple"}],
                      "rejected": [{"role": "user", "content": "Pick"}, {"role": "assistant", "content": "Rock"}]},
     CHATML.format("Pick"), "Apple<|im_end|>", "Rock<|im_end|>"),
    ("chatml.argilla_chat", {"chosen": [{"role": "user", "content": "Pick"}, {"role": "assistant", "content": "Apple"}],
                             "rejected": [{"role": "user", "content": "Pick"},
                                          {"role": "assistant", "content": "Rock"}]},
     CHATML.format("Pick"), "Apple<|im_end|>", "Rock<|im_end|>"),
    ("llama3.intel", {"question": "Pick", "chosen": "Apple", "rejected": "Rock"},
     "<|start_header_id|>user<|end_header_id|>\n\nPick<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
     "Apple<|eot_id|>", "Rock<|eot_id|>"),
    ("zephyr.nectar", {"prompt": "Pick", "answers": [{"answer": "Rock", "rank": 2}, {"answer": "Apple", "rank": 3},
                                                     {"answer": "Mud", "rank": 1}]},
     "<|system|>\n</s>\n<|user|>\nPick</s>\n<|assistant|>\n", "Apple", "Rock"),
])
def test_axolotl_text_types_tokenize_as_trl(tokenizer, type_name, row, prompt, chosen, rejected):
    """The prompt written as Axolotl writes it, then TRL's tokenization (EOS appended if missing)."""
    [ex] = encode(tokenizer, {"path": "p.jsonl", "type": type_name}, [row])
    p, c = trl_split(tokenizer, prompt, chosen)
    _, r = trl_split(tokenizer, prompt, rejected)
    assert ex["prompt_ids"] == p and ex["chosen_ids"] == c and ex["rejected_ids"] == r
    assert ex["chosen_labels"] == c and ex["rejected_labels"] == r  # every completion token trains


def test_user_defined_mapping_and_entry_keys(tokenizer):
    row = {"q": "Pick", "sys": "Be kind", "good": "Apple", "bad": "Rock"}
    fields = {"field_prompt": "q", "field_system": "sys", "field_chosen": "good", "field_rejected": "bad",
              "prompt_format": "[{system}] {prompt} =>", "chosen_format": " {chosen}!", "rejected_format": " {rejected}?"}
    [a] = encode(tokenizer, {"path": "p.jsonl", "type": fields}, [row])
    [b] = encode(tokenizer, {"path": "p.jsonl", "type": "user_defined.default", **fields}, [row])
    assert a == b
    p, c = trl_split(tokenizer, "[Be kind] Pick =>", " Apple!")
    assert a["prompt_ids"] == p and a["chosen_ids"] == c


def test_chat_template_pairs_share_the_rendered_prompt(tokenizer):
    row = {"messages": [{"role": "system", "content": "Be kind"}, {"role": "user", "content": "Pick a fruit"}],
           "chosen": "An apple", "rejected": {"role": "assistant", "content": "A rock"}}
    [ex] = encode(tokenizer, {"path": "p.jsonl", "type": "chat_template.default"}, [row])
    prompt = tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
    assert ex["prompt_ids"] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    im_end = tokenizer.eos_token_id
    # the answer and its end of turn train; the template's newline after it is cut (it changes nothing)
    assert ex["chosen_ids"] == tokenizer("An apple", add_special_tokens=False)["input_ids"] + [im_end]
    assert ex["chosen_labels"] == ex["chosen_ids"]
    argilla = {"chosen": row["messages"][1:] + [{"role": "assistant", "content": "An apple"}],
               "rejected": row["messages"][1:] + [{"role": "assistant", "content": "A rock"}]}
    [ex2] = encode(tokenizer, {"path": "p.jsonl", "type": "chat_template.argilla_chat"}, [argilla])
    assert ex2["chosen_ids"] == ex["chosen_ids"] and ex2["rejected_ids"] == ex["rejected_ids"]


def test_kto_rows(tokenizer):
    rows = [{"prompt": "Pick", "completion": "Apple", "label": True}, {"prompt": "Pick", "completion": "Rock",
                                                                         "label": False}]
    a, b = encode(tokenizer, {"path": "p.jsonl", "type": "chatml.prompt_pairs"}, rows, rl="kto")
    p, c = trl_split(tokenizer, CHATML.format("Pick"), "Apple<|im_end|>")
    assert (a["prompt_ids"], a["completion_ids"], a["label"], b["label"]) == (p, c, 1, 0)
    with pytest.raises(JaxtuneError, match=r"p.jsonl row 0: field 'label' must be a boolean"):
        encode(tokenizer, {"path": "p.jsonl", "type": "chatml.prompt_pairs"},
               [{"prompt": "Pick", "completion": "Apple", "label": "yes"}], rl="kto")


def test_bad_pairs_name_file_row_and_field(tokenizer):
    entry = {"path": "p.jsonl", "type": "chatml.prompt_pairs"}
    with pytest.raises(JaxtuneError, match=r"p.jsonl row 1: field 'rejected' is empty"):
        encode(tokenizer, entry, [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                  {"prompt": "a", "chosen": "b", "rejected": "  "}])
    with pytest.raises(JaxtuneError, match=r"p.jsonl row 0: field 'chosen' is missing"):
        encode(tokenizer, entry, [{"prompt": "a", "rejected": "c"}])
    with pytest.raises(JaxtuneError, match=r"row 0: field 'chosen' is empty"):
        encode(tokenizer, {"path": "p.jsonl", "type": "chat_template.default"},
               [{"messages": [{"role": "user", "content": "a"}], "chosen": "", "rejected": "c"}])
    with pytest.raises(JaxtuneError, match="type 'alpaca' does not make preference pairs for rl: dpo"):
        encode(tokenizer, {"path": "p.jsonl", "type": "alpaca"}, [])
    with pytest.raises(JaxtuneError, match="type 'chatml.intel' makes preference rows; set rl: dpo"):
        encode(tokenizer, {"path": "p.jsonl", "type": "chatml.intel"}, [], rl=None)
    with pytest.raises(JaxtuneError, match="type 'zephyr.nectar' does not make KTO rows"):
        encode(tokenizer, {"path": "p.jsonl", "type": "zephyr.nectar"}, [], rl="kto")


def test_lay_out_shares_the_prompt(tmp_path):
    """The worked example of jaxtune.batch: ids, segments and positions of a shared and an unshared
    pair, and two pairs packed in one row."""
    ex = {"prompt_ids": [[10, 11, 12, 13]], "chosen_ids": [[20, 21, 22]], "chosen_labels": [[20, 21, 22]],
          "rejected_ids": [[30, 31]], "rejected_labels": [[30, IGNORE]]}
    rows, stats = preference.lay_out(ex, kind="preference", capacity=32, packed=False, share=True)
    assert rows["input_ids"] == [[10, 11, 12, 13, 20, 21, 22, 13, 30, 31]]
    assert rows["labels"] == [[IGNORE] * 3 + [IGNORE, 20, 21, 22, IGNORE, 30, IGNORE]]
    k, c, r = 1, 1 + BRANCH, 1 + 2 * BRANCH
    assert rows["segment_ids"] == [[k] * 3 + [c] * 4 + [r] * 3]
    assert rows["positions"] == [[0, 1, 2, 3, 4, 5, 6, 3, 4, 5]]
    assert stats["tokens"] == 10 and stats["unshared_tokens"] == 13
    rows, _ = preference.lay_out(ex, kind="preference", capacity=32, packed=False, share=False)
    assert rows["input_ids"] == [[10, 11, 12, 13, 20, 21, 22, 10, 11, 12, 13, 30, 31]]
    assert rows["segment_ids"] == [[c] * 7 + [r] * 6]
    assert rows["positions"] == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5]]
    two = {key: value * 2 for key, value in ex.items()}
    rows, stats = preference.lay_out(two, kind="preference", capacity=24, packed=True, share=True)
    assert len(rows["input_ids"]) == 1 and rows["examples"] == [2] and stats["max_examples_per_row"] == 2
    assert sorted(set(rows["segment_ids"][0])) == [1, 2, 1 + BRANCH, 2 + BRANCH, 1 + 2 * BRANCH, 2 + 2 * BRANCH]


def test_kto_kl_completions_come_from_the_example_before_in_its_chunk():
    assert preference.kl_partners(5, 2).tolist() == [1, 0, 3, 2, 4]
    assert preference.kl_partners(4, 4).tolist() == [3, 0, 1, 2]
    ex = {"prompt_ids": [[1, 2], [3, 4]], "completion_ids": [[5], [6, 7]], "completion_labels": [[5], [6, 7]],
          "label": [1, 0]}
    rows, _ = preference.lay_out(ex, kind="unpaired", capacity=16, packed=True, share=True, kl_chunk=2)
    assert rows["kto_label"] == [[1, 0]]
    # example 1 (prompt 3 4): its completion 6 7, then the KL completion 5 (example 0's) after the prompt
    assert rows["input_ids"] == [[1, 2, 5, 2, 6, 7, 3, 4, 6, 7, 4, 5]]


def _write(tmp_path, rows):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path, smollm2_dir, path, **kw):
    return build_config({"base_model": str(smollm2_dir), "rl": "dpo", "sequence_len": 64, "dataset_processes": 1,
                         "datasets": [{"path": str(path), "type": "chatml.prompt_pairs", "preprocess_shards": 3}],
                         "dataset_prepared_path": str(tmp_path / "prepared"), "shuffle_merged_datasets": False, **kw})


def test_pairs_through_prepare_packed_and_unpacked(tmp_path, smollm2_dir):
    path = _write(tmp_path, [{"prompt": f"Pick {i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(9)])
    data = prepare(_config(tmp_path, smollm2_dir, path))
    assert data.kind == "preference" and len(data.train) == 9 and data.row_len == 128 and data.examples_per_row == 1
    row = data.train[0]
    trained = [t for t in row["labels"] if t != IGNORE]
    assert data.tokenizer.decode(trained) == "yes 0<|im_end|>no 0<|im_end|>"
    packed = prepare(_config(tmp_path, smollm2_dir, path, sample_packing=True))
    assert len(packed.train) < 9 and packed.examples_per_row > 1 and sum(packed.train["examples"]) == 9
    layout = packed.stats["train_layout"]
    assert layout["tokens"] < layout["unshared_tokens"]  # shared prompts
    unshared = prepare(_config(tmp_path, smollm2_dir, path, prefix_sharing=False))
    assert sum(len(x) for x in unshared.train["input_ids"]) == layout["unshared_tokens"]


def test_length_policy_for_pairs(tmp_path, smollm2_dir, caplog):
    long = " ".join(["word"] * 80)
    rows = [{"prompt": "Pick", "chosen": "yes", "rejected": "no"}, {"prompt": "Pick", "chosen": long, "rejected": "no"},
            {"prompt": long, "chosen": "yes", "rejected": "no"}]
    path = _write(tmp_path, rows)
    assert len(prepare(_config(tmp_path, smollm2_dir, path)).train) == 1  # drop (the default)
    truncated = prepare(_config(tmp_path, smollm2_dir, path, excess_length_strategy="truncate"))
    assert len(truncated.train) == 2  # the long answer cut to fit, the pair whose prompt fills the row dropped
    assert max(len(x) for x in truncated.train["input_ids"]) <= 128
    with pytest.raises(JaxtuneError, match="2 examples have a prompt \\+ answer longer than sequence_len=64 "
                                           "\\(first: row 1"):
        prepare(_config(tmp_path, smollm2_dir, path, excess_length_strategy="raise"))


def test_preprocess_debug_shows_pair_rows(tmp_path, smollm2_dir, capsys):
    from jaxtune.cli import main

    _write(tmp_path, [{"prompt": "Pick", "chosen": "yes", "rejected": "no"}])
    (tmp_path / "c.yml").write_text(f"base_model: {smollm2_dir}\nrl: dpo\ndatasets:\n  - path: p.jsonl\n"
                                    f"    type: chatml.prompt_pairs\ndataset_prepared_path: {tmp_path / 'prep'}\n")
    assert main(["preprocess", str(tmp_path / "c.yml"), "--debug"]) == 0
    out = capsys.readouterr().out
    assert "=== row 0 (1 example)" in out and "seg 1/chosen" in out and "seg 1/rejected" in out
    assert any(" * " in line and "'yes'" in line for line in out.splitlines())
    assert not np.any([" * " in line and "'user'" in line for line in out.splitlines()])
