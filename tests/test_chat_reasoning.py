"""Reasoning in chat rows (Axolotl's field_thinking / template_thinking_key / split_thinking).

Axolotl 0.19 (prompt_strategies/chat_template.py) locates a trained turn by diffing the full render
against one where the turn is replaced by `{role, content: sentinel}`: the reasoning is dropped from
the dummy, so the trained span runs from where the reasoning is written to the end of the content.
The expectations here are character spans found in hand-written renders, turned into token labels
by the tokenizer's offsets; they never call jaxtune's turn locator.
"""

from __future__ import annotations

import copy

import pytest

from jaxtune.config import DatasetConfig
from jaxtune.data import chat
from jaxtune.data.chat import IGNORE, split_thinking
from jaxtune.data.formats import build_encoder, tokenizer_info
from jaxtune.errors import JaxtuneError

THINK = ["<think>", "</think>"]
QUESTION = {"role": "user", "content": "What is 2+2?"}


@pytest.fixture(scope="module")
def tok(tokenizer):
    """SmolLM2's tokenizer (chatml markers) with Qwen3's think tags as single special tokens."""
    t = copy.deepcopy(tokenizer)
    t.add_special_tokens({"additional_special_tokens": THINK})
    return t


def encode(tok, entry: dict, rows: list[dict], template="qwen3", jinja=None):
    enc = build_encoder(DatasetConfig(path="data/rows.jsonl", type="chat_template", **entry),
                        tok=tokenizer_info(tok), top_template=template, top_jinja=jinja, train_on_inputs=False,
                        sequence_len=4096)
    return [ex for i, row in enumerate(rows) for ex in enc(row, f"data/rows.jsonl row {i}")]


def labels_for(tok, text: str, spans: list[tuple[str, str]]):
    """(ids, labels) of `text`: tokens overlapping each span train. A span is given as (text it starts
    with, text it ends with), found left to right in `text`; the `<|im_end|>` right after a span trains."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    pos = 0
    for first, last in spans:
        start = text.index(first, pos)
        end = text.index(last, start) + len(last)
        assert text[end:].startswith("<|im_end|>")
        pos = end
        for t, (a, b) in enumerate(offsets):
            if a < end and b > start or a == end and text[a:b] == "<|im_end|>":
                labels[t] = ids[t]
    return ids, labels


def trained_text(tok, ex):
    return tok.decode([t for t in ex["labels"] if t != IGNORE])


def test_reasoning_from_a_custom_field_is_rendered_and_trains(tok):
    row = {"messages": [QUESTION, {"role": "assistant", "thoughts": "Add two and two.", "content": "Four."}]}
    [ex] = encode(tok, {"field_thinking": "thoughts"}, [row])
    text = ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
            "<|im_start|>assistant\n<think>\nAdd two and two.\n</think>\n\nFour.<|im_end|>\n")
    ids, labels = labels_for(tok, text, [("Add two", "Four.")])
    assert ex["input_ids"] == ids
    assert ex["labels"] == labels
    # The opening tag is written whether or not there is reasoning: it does not train; the closing one does.
    assert trained_text(tok, ex) == "Add two and two.\n</think>\n\nFour.<|im_end|>"
    # The default field reads the template's own key; both give the same example.
    default = {"messages": [QUESTION, {"role": "assistant", "reasoning_content": "Add two and two.",
                                       "content": "Four."}]}
    assert encode(tok, {}, [default]) == [ex]
    assert encode(tok, {"field_thinking": "reasoning_content", "template_thinking_key": "reasoning_content"},
                  [default]) == [ex]


def test_reasoning_masks_follow_the_template_per_turn(tok):
    """Qwen3 writes reasoning only after the last user turn: an earlier turn trains its content alone;
    a turn after it that is not the last is written without a think block when its reasoning is
    dropped, so (as in Axolotl) its span starts at `<think>`; the last turn starts at its reasoning."""
    row = {"messages": [
        {"role": "user", "content": "a?"}, {"role": "assistant", "think": "old", "content": "A."},
        {"role": "user", "content": "b?"}, {"role": "assistant", "think": "plan", "content": "B1."},
        {"role": "assistant", "think": "check", "content": "B2."}]}
    [ex] = encode(tok, {"field_thinking": "think"}, [row])
    text = ("<|im_start|>user\na?<|im_end|>\n<|im_start|>assistant\nA.<|im_end|>\n"
            "<|im_start|>user\nb?<|im_end|>\n"
            "<|im_start|>assistant\n<think>\nplan\n</think>\n\nB1.<|im_end|>\n"
            "<|im_start|>assistant\n<think>\ncheck\n</think>\n\nB2.<|im_end|>\n")
    ids, labels = labels_for(tok, text, [("A.", "A."), ("<think>\nplan", "B1."), ("check", "B2.")])
    assert ex["input_ids"] == ids
    assert ex["labels"] == labels
    assert "old" not in tok.decode(ex["input_ids"])


def test_template_thinking_key_names_what_the_template_reads(tok):
    jinja = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
             "{% if m.get('thought') %}[{{ m['thought'] }}] {% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}")
    row = {"messages": [QUESTION, {"role": "assistant", "reasoning_content": "sum", "content": "Four."}]}
    [ex] = encode(tok, {"template_thinking_key": "thought"}, [row], template="jinja", jinja=jinja)
    text = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n[sum] Four.<|im_end|>\n"
    ids, labels = labels_for(tok, text, [("[sum]", "Four.")])
    assert (ex["input_ids"], ex["labels"]) == (ids, labels)


def test_split_thinking_takes_the_block_out_of_the_content(tok):
    inline = {"messages": [QUESTION, {"role": "assistant",
                                      "content": "<think>\n Add two and two. \n</think>\n\n  Four."}]}
    field = {"messages": [QUESTION, {"role": "assistant", "reasoning_content": "Add two and two.",
                                     "content": "Four."}]}
    assert encode(tok, {"split_thinking": True}, [inline]) == encode(tok, {}, [field])
    assert split_thinking("x<think> a </think> b") == ("b", "a")  # text before the tag is dropped
    assert split_thinking("<reasoning>r</reasoning>\nc", "given") == ("c", "r")  # replaces a given reasoning
    assert split_thinking("<|begin_of_thought|> t <|end_of_thought|> <|begin_of_solution|> s <|end_of_solution|>"
                          ) == ("s", "t")
    assert split_thinking("no tags", "given") == ("no tags", "given")
    # only assistant turns are split
    spec = chat.ChatSpec.build("{{ messages }}", split_thinking=True)
    user = chat.normalize_messages([{"role": "user", "content": "<think>u</think> q"}], spec, "row 0")
    assert user == [{"role": "user", "content": "<think>u</think> q"}]


def test_missing_or_bad_reasoning_fields(tok, monkeypatch):
    """As Axolotl: a message without the field has no reasoning, and a misnamed field is not an error:
    its key is not given to the template, which does not read it (Axolotl passes on only the keys a
    template reads; transformers would take a `reasoning` key as the reasoning). A reasoning that is
    not text is an error naming the row; a template that never reads template_thinking_key is warned about."""
    row = {"messages": [QUESTION, {"role": "assistant", "reasoning": "Add two and two.", "content": "Four."}]}
    [ex] = encode(tok, {"field_thinking": "thoughts"}, [row])
    text = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nFour.<|im_end|>\n"
    assert (ex["input_ids"], ex["labels"]) == labels_for(tok, text, [("Four.", "Four.")])
    bad = {"messages": [QUESTION, {"role": "assistant", "thoughts": ["a", "b"], "content": "Four."}]}
    with pytest.raises(JaxtuneError, match=r"rows\.jsonl row 0: message 1: the reasoning in 'thoughts' "
                                           r"\(field_thinking\) must be a string, got list"):
        encode(tok, {"field_thinking": "thoughts"}, [bad])
    warned = []
    monkeypatch.setattr(chat, "warn_once", warned.append)
    [ex] = encode(tok, {"template_thinking_key": "thought"}, [{"messages": [
        QUESTION, {"role": "assistant", "reasoning_content": "r", "content": "Four."}]}])
    assert warned and "never reads 'thought'" in warned[0]
    assert trained_text(tok, ex) == "Four.<|im_end|>"


def test_thinking_keys_belong_to_chat_template(tok):
    with pytest.raises(JaxtuneError, match="field_thinking does not apply to type 'alpaca'"):
        build_encoder(DatasetConfig(path="x", type="alpaca", field_thinking="t"), tok=tokenizer_info(tok),
                      top_template="chatml", top_jinja=None, train_on_inputs=False, sequence_len=64)
