"""Label masks, token by token, for every format, against expectations computed here independently.

Chat expectations use the turn-by-turn prefix method (render the conversation up to each assistant
turn with the generation prompt, and up to the end of that turn): the implementation locates turns
differently (by diffing renders), so the two must agree.
"""

from __future__ import annotations

import copy
import json

import pytest

from jaxtune.config import DatasetConfig
from jaxtune.data.chat import IGNORE, TurnNotFoundError
from jaxtune.data.formats import SUPPORTED_TYPES, build_encoder, end_of_turn_ids, tokenizer_info
from jaxtune.data.templates import NAMED_TEMPLATES
from jaxtune.errors import JaxtuneError

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4, of course."},
    {"role": "user", "content": "And 3*3?"},
    {"role": "assistant", "content": "9"},
]
MARKERS = ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<start_of_turn>", "<end_of_turn>",
           "[INST]", "[/INST]", "<think>", "</think>"]


@pytest.fixture(scope="module")
def marked_tokenizer(tokenizer):
    """SmolLM2's tokenizer with the other templates' markers as single special tokens."""
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    return tok


def encode(tok, entry: dict, rows: list[dict], *, template="tokenizer_default", train_on_inputs=False,
           sequence_len=4096, eot_tokens=None, rl=None):
    enc = build_encoder(DatasetConfig(**entry), tok=tokenizer_info(tok, eot_tokens), top_template=template,
                        top_jinja=None, train_on_inputs=train_on_inputs, sequence_len=sequence_len, rl=rl)
    out = []
    for i, row in enumerate(rows):
        out += enc(row, f"row {i}")
    return out


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def expected_chat_labels(tok, template, messages, eot_ids, train_on_eos="turn", roles=("assistant",)):
    """Prefix method: tokens inside [render(prefix, gen prompt), render(prefix + turn)) train,
    up to the turn's end-of-turn token (included per train_on_eos); whitespace after it does not."""
    full = tok.apply_chat_template(messages, chat_template=template, tokenize=False)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = [IGNORE] * len(enc["input_ids"])
    turns = [i for i, m in enumerate(messages) if m["role"] in roles]
    for n, i in enumerate(turns):
        if messages[i]["role"] == "assistant":
            prefix = tok.apply_chat_template(messages[:i], chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
        else:  # other roles have no generation prompt: chatml's header, written out (used with chatml only)
            prefix = tok.apply_chat_template(messages[:i], chat_template=template, tokenize=False) \
                + f"<|im_start|>{messages[i]['role']}\n"
        upto = tok.apply_chat_template(messages[:i + 1], chat_template=template, tokenize=False)
        assert full.startswith(prefix) and full.startswith(upto)
        ended = False
        for t, (tid, (a, b)) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
            if a >= len(prefix) and b <= len(upto) and not ended:
                if tid in eot_ids:
                    ended = True
                    if train_on_eos == "all" or train_on_eos == "turn" or (train_on_eos == "last" and n == len(turns) - 1):
                        labels[t] = tid
                else:
                    labels[t] = tid
    return enc["input_ids"], labels


@pytest.mark.parametrize("name", ["tokenizer_default", "chatml", "llama3", "mistral", "gemma"])
def test_chat_template_masks_every_assistant_turn(marked_tokenizer, name):
    tok = marked_tokenizer
    eot_ids = end_of_turn_ids(tokenizer_info(tok), name)
    template = tok.chat_template if name == "tokenizer_default" else NAMED_TEMPLATES[name]
    messages = CONVERSATION if name not in ("mistral",) else CONVERSATION  # system folded by the template
    [ex] = encode(tok, {"path": "x", "type": "chat_template"}, [{"messages": messages}], template=name)
    ids, labels = expected_chat_labels(tok, template, messages, eot_ids)
    assert ex["input_ids"] == ids
    assert ex["labels"] == labels
    # every assistant turn trains, not only the last
    trained_text = tok.decode([t for t in ex["labels"] if t != IGNORE])
    for m in messages:
        if m["role"] == "assistant":
            assert m["content"] in trained_text
    assert "Hi there" not in trained_text and "terse" not in trained_text


@pytest.mark.parametrize("train_on_eos", ["turn", "all", "last", "none"])
def test_train_on_eos(tokenizer, train_on_eos):
    eot_ids = tokenizer_info(tokenizer).eot_ids
    [ex] = encode(tokenizer, {"path": "x", "type": "chat_template", "train_on_eos": train_on_eos},
                  [{"messages": CONVERSATION}])
    eos = tokenizer.eos_token_id
    trained_eos = [i for i, t in enumerate(ex["labels"]) if t == eos]
    all_eos = [i for i, t in enumerate(ex["input_ids"]) if t == eos]
    ids, want = expected_chat_labels(tokenizer, tokenizer.chat_template, CONVERSATION, eot_ids,
                                     train_on_eos=train_on_eos)
    if train_on_eos == "all":  # every turn's end-of-turn token, trained turns or not
        for i in all_eos:
            want[i] = eos
    if train_on_eos == "none":
        want = [IGNORE if t == eos else t for t in want]
    assert ex["labels"] == want
    expected_count = {"turn": 3, "all": len(all_eos), "last": 1, "none": 0}[train_on_eos]
    assert len(trained_eos) == expected_count


def test_roles_to_train_and_train_on_inputs(tokenizer):
    eot_ids = tokenizer_info(tokenizer).eot_ids
    [ex] = encode(tokenizer, {"path": "x", "type": "chat_template", "roles_to_train": ["user", "assistant"]},
                  [{"messages": CONVERSATION}])
    _, want = expected_chat_labels(tokenizer, tokenizer.chat_template, CONVERSATION, eot_ids,
                                   roles=("user", "assistant"))
    assert ex["labels"] == want
    [ex] = encode(tokenizer, {"path": "x", "type": "chat_template"}, [{"messages": CONVERSATION}],
                  train_on_inputs=True)
    assert ex["labels"] == ex["input_ids"]


def test_qwen3_template_thinking_blocks(marked_tokenizer):
    """Qwen3 writes a <think> block only on the final assistant turn: the final turn trains its think
    block and answer, earlier turns their plain content (rendered differently than when they were last)."""
    tok = marked_tokenizer
    msgs = [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "first"},
            {"role": "user", "content": "b?"}, {"role": "assistant", "content": "second"}]
    [ex] = encode(tok, {"path": "x", "type": "chat_template"}, [{"messages": msgs}], template="qwen3")
    full = tok.apply_chat_template(msgs, chat_template=NAMED_TEMPLATES["qwen3"], tokenize=False)
    assert "<think>\n\n</think>\n\nsecond" in full and "<think>\n\n</think>\n\nfirst" not in full
    trained = [t for t in ex["labels"] if t != IGNORE]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert trained == ids_of(tok, "first") + [im_end] + ids_of(tok, "second") + [im_end]


def test_sharegpt_alias_and_role_mapping(tokenizer):
    row = {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"}]}
    [ex] = encode(tokenizer, {"path": "x", "type": "sharegpt"}, [row])
    [ref] = encode(tokenizer, {"path": "x", "type": "chat_template"},
                   [{"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]}])
    assert ex == ref
    custom = {"dialog": [{"speaker": "me", "text": "Hi there"}, {"speaker": "bot", "text": "Hello!"}]}
    [ex] = encode(tokenizer, {"path": "x", "type": "chat_template", "field_messages": "dialog",
                              "message_property_mappings": {"role": "speaker", "content": "text"},
                              "roles": {"user": ["me"], "assistant": ["bot"]}}, [custom])
    assert ex == ref


def test_turn_not_in_template_is_an_error(tokenizer):
    only_users = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    entry = {"path": "x", "type": "chat_template", "chat_template": "jinja", "chat_template_jinja": only_users}
    with pytest.raises(TurnNotFoundError, match="row 0.*message 1"):
        encode(tokenizer, entry, [{"messages": CONVERSATION[1:3]}])


def test_unmapped_role_names_row(tokenizer):
    with pytest.raises(JaxtuneError, match="row 0.*role 'narrator'"):
        encode(tokenizer, {"path": "x", "type": "chat_template"},
               [{"messages": [{"role": "narrator", "content": "x"}]}])


def test_alpaca_with_and_without_input(tokenizer):
    rows = [{"instruction": "Add", "input": "2 and 3", "output": "5"}, {"instruction": "Say hi", "input": "", "output": "hi"}]
    ex = encode(tokenizer, {"path": "x", "type": "alpaca"}, rows)
    with_input = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                  "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd\n\n"
                  "### Input:\n2 and 3\n\n### Response:\n")
    no_input = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                "request.\n\n### Instruction:\nSay hi\n\n### Response:\n")
    eos = tokenizer.eos_token_id
    for got, prompt, out in ((ex[0], with_input, "5"), (ex[1], no_input, "hi")):
        p, o = ids_of(tokenizer, prompt), ids_of(tokenizer, out) + [eos]
        assert got["input_ids"] == p + o
        assert got["labels"] == [IGNORE] * len(p) + o


def test_user_defined_format(tokenizer):
    fmt = {"system_prompt": "SYS", "system_format": "<s>{system}</s>\n", "field_instruction": "q", "field_input": "ctx",
           "field_output": "a", "format": "Q: {instruction}\nC: {input}\nA:", "no_input_format": "Q: {instruction}\nA:"}
    rows = [{"q": "why", "ctx": "sky", "a": " blue"}, {"q": "who", "a": " me", "system": "custom"}]
    ex = encode(tokenizer, {"path": "x", "type": fmt}, rows)
    p0 = ids_of(tokenizer, "<s>SYS</s>\nQ: why\nC: sky\nA:")
    p1 = ids_of(tokenizer, "<s>custom</s>\nQ: who\nA:")
    eos = tokenizer.eos_token_id
    assert ex[0]["labels"] == [IGNORE] * len(p0) + ids_of(tokenizer, " blue") + [eos]
    assert ex[1]["input_ids"] == p1 + ids_of(tokenizer, " me") + [eos]
    assert ex[1]["labels"] == [IGNORE] * len(p1) + ids_of(tokenizer, " me") + [eos]


def test_completion_pretrain_and_input_output(tokenizer):
    eos = tokenizer.eos_token_id
    [ex] = encode(tokenizer, {"path": "x", "type": "completion", "field": "body"}, [{"body": "Once upon a time"}])
    assert ex["input_ids"] == ex["labels"] == ids_of(tokenizer, "Once upon a time") + [eos]
    text = " ".join(f"word{i}" for i in range(100))
    chunks = encode(tokenizer, {"path": "x", "type": "pretrain"}, [{"text": text}], sequence_len=32)
    whole = ids_of(tokenizer, text) + [eos]
    assert [t for c in chunks for t in c["input_ids"]] == whole and all(len(c["input_ids"]) <= 32 for c in chunks)
    segs = {"segments": [{"text": "Q: hi\n", "label": False}, {"text": "A: yo", "label": True},
                         {"text": "\n#", "label": False}]}
    [ex] = encode(tokenizer, {"path": "x", "type": "input_output"}, [segs])
    a, b, c = ids_of(tokenizer, "Q: hi\n"), ids_of(tokenizer, "A: yo"), ids_of(tokenizer, "\n#")
    assert ex["input_ids"] == a + b + c
    assert ex["labels"] == [IGNORE] * len(a) + b + [IGNORE] * len(c)


def test_prompt_rows_keep_other_columns(tokenizer):
    """GRPO's rows: a message list through the chat template (generation prompt added); the prompt
    and every other column kept for the reward functions."""
    messages = [{"role": "user", "content": "2+2?"}]
    [ex] = encode(tokenizer, {"path": "x", "type": "prompt"}, [{"prompt": messages, "answer": "4"}], rl="grpo")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ex["prompt_ids"] == ids_of(tokenizer, text)
    assert json.loads(ex["prompt"]) == messages and json.loads(ex["columns"]) == {"answer": "4"}
    with pytest.raises(JaxtuneError, match="type 'prompt' makes prompt rows for rl: grpo"):
        encode(tokenizer, {"path": "x", "type": "prompt"}, [{"prompt": "2+2?"}])


def test_unknown_type_lists_supported(tokenizer):
    with pytest.raises(JaxtuneError, match="unknown type 'alpacca'.*alpaca.*chat_template"):
        encode(tokenizer, {"path": "x", "type": "alpacca"}, [])
    assert {"alpaca", "completion", "input_output", "chat_template", "sharegpt", "pretrain"} <= set(SUPPORTED_TYPES)


def test_per_dataset_template_trains_its_own_end_of_turn(marked_tokenizer):
    """A dataset's own `chat_template: llama3` (top level left at tokenizer_default) trains <|eot_id|>."""
    tok = marked_tokenizer
    msgs = CONVERSATION[1:3]
    [ex] = encode(tok, {"path": "x", "type": "chat_template", "chat_template": "llama3"}, [{"messages": msgs}])
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert [t for t in ex["labels"] if t != IGNORE] == ids_of(tok, "Hello! How can I help?") + [eot]


def test_keys_a_type_does_not_read_are_errors(tokenizer):
    with pytest.raises(JaxtuneError, match="field_messages does not apply to type 'alpaca'"):
        encode(tokenizer, {"path": "x", "type": "alpaca", "field_messages": "conversations"}, [])
    with pytest.raises(JaxtuneError, match="field_chosen does not apply to type 'chatml.intel'"):
        encode(tokenizer, {"path": "x", "type": "chatml.intel", "field_chosen": "good"}, [], rl="dpo")
