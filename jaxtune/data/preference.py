"""Preference rows: Axolotl's DPO/ORPO/KTO dataset types -> examples, and examples -> rows.

Two kinds of examples come out of the encoders (completions tokenized as TRL does: the completion is
what follows the longest common prefix of the tokenized prompt and prompt + completion):
  - "preference" pairs:    {prompt_ids, chosen_ids, chosen_labels, rejected_ids, rejected_labels}
  - "unpaired" (KTO):      {prompt_ids, completion_ids, completion_labels, label (1 desirable / 0)}
Labels are -100 on completion tokens that do not train (a chat template's text after the end of turn
is cut off: nothing after the last trained token can change a sequence log-probability).

The types: `chat_template.default`, `chat_template.argilla_chat` and ORPO's `chat_template.argilla`
render messages with a chat template (the masks come from rendering, as for SFT); `chatml.*`,
`llama3.*`, `zephyr.nectar` and `user_defined.default` write the prompt as Axolotl writes it (literal
strings) and tokenize as TRL does (EOS appended to a completion that lacks it).

`lay_out` turns examples into training rows (jaxtune.batch explains the segment ids): each pair's
prompt once and its answers as two branches (or, with `prefix_sharing: false`, two whole sequences),
several pairs per row with `sample_packing`. KTO rows hold a completion and, for the KL term, the
completion of the previous example of its micro-batch under the same prompt (TRL's mismatched pairs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from jaxtune.batch import BRANCH, IGNORE
from jaxtune.data import chat
from jaxtune.data.chat import ChatSpec
from jaxtune.errors import JaxtuneError

# Axolotl's literal prompt formats: (system + user turn, user turn only, end of a completion).
_FORMATS = {
    "chatml": ("<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>",
               "<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n"),
    "llama3": ("<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|><|start_header_id|>user<|end_header_id|>"
               "\n\n{prompt}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
               "<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
               "\n\n", "<|eot_id|>", "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
}
# chatml./llama3. DPO types: the prompt column, and where the answers sit.
_PAIR_TYPES = {"default": None, "argilla": None, "argilla_chat": "argilla_chat", "icr": "input", "intel": "question",
               "prompt_pairs": "prompt", "ultra": "prompt"}
_KTO_TYPES = {"argilla": "instruction", "argilla_chat": "argilla_chat", "intel": "question", "prompt_pairs": "prompt",
              "ultra": "prompt"}

PAIR_TYPES = (("chat_template.default", "chat_template.argilla_chat", "chat_template.argilla", "zephyr.nectar",
               "user_defined.default")
              + tuple(f"{f}.{t}" for f in _FORMATS for t in _PAIR_TYPES))
KTO_TYPES = ("chat_template.default", "user_defined.default") + tuple(f"{f}.{t}" for f in _FORMATS for t in _KTO_TYPES)


def _text(row: dict, name: str, where: str) -> str:
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise JaxtuneError(f"{where}: field {name!r} is {'missing' if value is None else 'empty'}")
    if not isinstance(value, str):
        raise JaxtuneError(f"{where}: field {name!r} must be text, got {type(value).__name__}")
    return value


def _last_content(row: dict, name: str, where: str, content_key: str = "content") -> str:
    """The content of the last message of a message list (argilla_chat / ultra rows)."""
    value = row.get(name)
    if not isinstance(value, list) or not value or not isinstance(value[-1], dict):
        raise JaxtuneError(f"{where}: field {name!r} must be a non-empty list of messages")
    content = value[-1].get(content_key)
    if not isinstance(content, str) or not content.strip():
        raise JaxtuneError(f"{where}: the last message of field {name!r} has no content")
    return content


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _trim(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """Drop the tokens after the last trained one (they cannot change a sequence log-prob)."""
    last = max((i for i, t in enumerate(labels) if t != IGNORE), default=-1)
    return ids[:last + 1], labels[:last + 1]


@dataclasses.dataclass(frozen=True)
class TextTokenizer:
    """TRL's tokenization of (prompt, completion) text: both tokenized with the tokenizer's special
    tokens, the completion being what follows their longest common prefix."""

    tokenizer: object
    eos_token: str

    def __call__(self, prompt: str, completions: list[str], where: str) -> tuple[list[int], list[list[int]]]:
        prompt_ids = self.tokenizer(prompt)["input_ids"]
        fulls = []
        for text in completions:
            if not text.endswith(self.eos_token):
                text = text + self.eos_token
            fulls.append(self.tokenizer(prompt + text)["input_ids"])
        p = min([len(prompt_ids)] + [_common_prefix(prompt_ids, f) for f in fulls])
        answers = [f[p:] for f in fulls]
        if any(not a for a in answers):
            raise JaxtuneError(f"{where}: a completion tokenizes to nothing after the prompt")
        return prompt_ids[:p], answers


def _text_pair(tok: TextTokenizer, prompt: str, chosen: str, rejected: str, where: str) -> dict:
    prompt_ids, (c, r) = tok(prompt, [chosen, rejected], where)
    return {"prompt_ids": prompt_ids, "chosen_ids": c, "chosen_labels": list(c), "rejected_ids": r,
            "rejected_labels": list(r)}


def _axolotl_prompt(style: str, row: dict, prompt_key: str, where: str) -> str:
    with_system, user_only, *_ = _FORMATS[style]
    prompt = _text(row, prompt_key, where)
    system = row.get("system")
    return with_system.format(system=system, prompt=prompt) if system else user_only.format(prompt=prompt)


def _history_prompt(style: str, messages: list, where: str) -> str:
    """argilla_chat KTO rows: every message but the last written out, then the assistant header."""
    *_, turn, header = _FORMATS[style]
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise JaxtuneError(f"{where}: message {i} has no text content")
        out.append(turn.format(role=m.get("role", "user"), content=m["content"]))
    return "".join(out) + header


def text_pair_reader(type_name: str) -> Callable[[dict, str], tuple[str, str, str]]:
    """(prompt, chosen, rejected) text of a row for Axolotl's literal DPO types."""
    style, kind = type_name.split(".", 1)
    if style == "zephyr":
        def nectar(row, where):
            answers = row.get("answers")
            if not isinstance(answers, list) or len(answers) < 2:
                raise JaxtuneError(f"{where}: field 'answers' must list at least two ranked answers")
            ranked = sorted(answers, key=lambda a: a["rank"])
            prompt = f"<|system|>\n</s>\n<|user|>\n{_text(row, 'prompt', where)}</s>\n<|assistant|>\n"
            return prompt, ranked[-1]["answer"], ranked[-2]["answer"]
        return nectar
    end = _FORMATS[style][2]
    column = _PAIR_TYPES[kind]
    if column == "argilla_chat":
        def argilla_chat(row, where):
            chosen = row.get("chosen")
            if not isinstance(chosen, list) or len(chosen) < 2:
                raise JaxtuneError(f"{where}: field 'chosen' must be a [user, assistant] message list")
            prompt = _FORMATS[style][1].format(prompt=chosen[0].get("content", ""))
            return prompt, _last_content(row, "chosen", where) + end, _last_content(row, "rejected", where) + end
        return argilla_chat

    def read(row, where):
        key = column or next((k for k in ("prompt", "input", "question", "instruction") if k in row), "instruction")
        if kind == "ultra":
            return (_axolotl_prompt(style, row, key, where), _last_content(row, "chosen", where) + end,
                    _last_content(row, "rejected", where) + end)
        fallback = kind in ("default", "argilla")  # Axolotl's default also reads chosen_response / rejected_response
        chosen = "chosen_response" if fallback and "chosen" not in row else "chosen"
        rejected = "rejected_response" if fallback and "rejected" not in row else "rejected"
        return (_axolotl_prompt(style, row, key, where), _text(row, chosen, where) + end,
                _text(row, rejected, where) + end)
    return read


def text_kto_reader(type_name: str) -> Callable[[dict, str], tuple[str, str]]:
    """(prompt, completion) text of a row for Axolotl's literal KTO types."""
    style, kind = type_name.split(".", 1)
    end = _FORMATS[style][2]
    column = _KTO_TYPES[kind]
    if column == "argilla_chat":
        def argilla_chat(row, where):
            messages = row.get("completion")
            if not isinstance(messages, list) or len(messages) < 2:
                raise JaxtuneError(f"{where}: field 'completion' must be a message list ending in the answer")
            return _history_prompt(style, messages[:-1], where), _last_content(row, "completion", where) + end
        return argilla_chat
    return lambda row, where: (_axolotl_prompt(style, row, column, where), _text(row, "completion", where) + end)


def user_defined_reader(fields: dict, *, kto: bool) -> Callable[[dict, str], tuple]:
    """Axolotl's user_defined.default: columns and formats from the dataset entry."""
    f_prompt, f_system = fields.get("field_prompt") or "prompt", fields.get("field_system") or "system"
    prompt_format = fields.get("prompt_format") or "{prompt}"

    def prompt_of(row, where):
        value = _text(row, f_prompt, where)
        if "{system}" in prompt_format:
            return prompt_format.format(system=row.get(f_system) or "", prompt=value)
        return prompt_format.format(prompt=value)

    if kto:
        f_completion = fields.get("field_completion") or "completion"
        completion_format = fields.get("completion_format") or "{completion}"
        return lambda row, where: (prompt_of(row, where),
                                   completion_format.format(completion=_text(row, f_completion, where)))
    f_chosen, f_rejected = fields.get("field_chosen") or "chosen", fields.get("field_rejected") or "rejected"
    chosen_format = fields.get("chosen_format") or "{chosen}"
    rejected_format = fields.get("rejected_format") or "{rejected}"
    return lambda row, where: (prompt_of(row, where), chosen_format.format(chosen=_text(row, f_chosen, where)),
                               rejected_format.format(rejected=_text(row, f_rejected, where)))


def kto_label(row: dict, field: str, where: str) -> int:
    value = row.get(field)
    if not isinstance(value, (bool, np.bool_)):
        raise JaxtuneError(f"{where}: field {field!r} must be a boolean label (true: desirable), got {value!r}")
    return int(bool(value))


def chat_completions(tokenizer, spec: ChatSpec, prompt: list[dict], answers: list[dict], where: str
                     ) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
    """Render prompt + each answer with the chat template; only each answer trains. Returns the
    shared untrained prefix and each answer's (ids, labels) after it, trailing untrained tokens cut."""
    full = []
    for answer in answers:
        messages = prompt + chat.normalize_messages([answer], spec, where)
        if messages[-1]["role"] != "assistant":
            raise JaxtuneError(f"{where}: the response must be an assistant message")
        if not messages[-1]["content"].strip():
            raise JaxtuneError(f"{where}: the response is empty")
        trained = [False] * (len(messages) - 1) + [True]
        full.append(chat.encode_conversation(tokenizer, spec, messages, where, trained=trained))
    # The prompt: the longest common prefix that trains in none of them.
    p = min(len(ids) for ids, _ in full)
    for ids, labels in full:
        first_trained = next((i for i, t in enumerate(labels) if t != IGNORE), len(labels))
        p = min(p, first_trained, _common_prefix(full[0][0], ids))
    out = []
    for ids, labels in full:
        a_ids, a_labels = _trim(ids[p:], labels[p:])
        if not any(t != IGNORE for t in a_labels):
            raise JaxtuneError(f"{where}: a response has no trained token after the prompt")
        out.append((a_ids, a_labels))
    return full[0][0][:p], out


# ----------------------------------------------------------------------------------------- rows


def example_length(prompt: int, answers: list[int], share: bool) -> int:
    """Tokens an example takes in a row: the prompt once and each answer after a copy of the
    prompt's last token (shared), or the prompt before every answer."""
    if share and prompt:
        return prompt + sum(answers) + len(answers) - 1
    return len(answers) * prompt + sum(answers)


def lay_out_example(prompt: list[int], answers: list[tuple[list[int], list[int]]], k: int, share: bool) -> dict:
    """One example as row pieces (lists): the prompt segment (id k) and answer b as branch id
    k + b * BRANCH (b = 1, 2); see jaxtune.batch."""
    ids, labels, segments, positions = [], [], [], []
    p = len(prompt)
    shared = share and p > 0
    if shared:
        ids += prompt[:-1]
        labels += [IGNORE] * (p - 1)
        segments += [k] * (p - 1)
        positions += range(p - 1)
    for b, (a_ids, a_labels) in enumerate(answers, start=1):
        head = prompt[-1:] if shared else prompt
        start = p - len(head)
        ids += head + list(a_ids)
        labels += [IGNORE] * len(head) + list(a_labels)
        segments += [k + b * BRANCH] * (len(head) + len(a_ids))
        positions += range(start, start + len(head) + len(a_ids))
    return {"input_ids": ids, "labels": labels, "segment_ids": segments, "positions": list(positions)}


def kl_partners(n: int, chunk: int) -> np.ndarray:
    """TRL's KL completions: example i takes the completion of the example before it within its chunk
    of `chunk` examples (the first of a chunk takes the chunk's last)."""
    partner = np.arange(n) - 1
    starts = np.arange(0, n, chunk)
    ends = np.minimum(starts + chunk, n) - 1
    partner[starts] = ends
    return partner


def lay_out(examples: dict[str, list], *, kind: str, capacity: int, packed: bool, share: bool,
            kl_chunk: int | None = None, sequence_len: int | None = None) -> tuple[dict[str, list], dict]:
    """Examples (columns of a dataset) -> rows (columns) and stats. `kind` "preference" (pairs) or
    "unpaired" (KTO; `kl_chunk` set: a KL completion per example, cut so that prompt + KL completion
    fits `sequence_len`). Rows: input_ids, labels, segment_ids, positions and `examples` (how many
    the row holds); KTO rows also `kto_label`."""
    from jaxtune.data.packing import first_fit_decreasing

    n = len(examples["prompt_ids"])
    if kind == "preference":
        answers = [[(examples["chosen_ids"][i], examples["chosen_labels"][i]),
                    (examples["rejected_ids"][i], examples["rejected_labels"][i])] for i in range(n)]
    else:
        own = [(examples["completion_ids"][i], examples["completion_labels"][i]) for i in range(n)]
        partners = kl_partners(n, kl_chunk) if kl_chunk else None

        def kl(i):
            ids, labels = own[partners[i]]
            room = (sequence_len or capacity) - len(examples["prompt_ids"][i])
            return list(ids[:room]), list(labels[:room])
        answers = [[own[i]] + ([kl(i)] if partners is not None else []) for i in range(n)]
    lengths = [example_length(len(examples["prompt_ids"][i]), [len(a) for a, _ in answers[i]], share) for i in range(n)]
    too_long = [i for i, length in enumerate(lengths) if length > capacity]
    if too_long:
        raise JaxtuneError(f"example {too_long[0]} takes {lengths[too_long[0]]} tokens, more than a row's {capacity}")
    bins = first_fit_decreasing(lengths, capacity) if packed else [[i] for i in range(n)]
    rows: dict[str, list] = {"input_ids": [], "labels": [], "segment_ids": [], "positions": [], "examples": []}
    if kind == "unpaired":
        rows["kto_label"] = []
    for members in bins:
        row = {"input_ids": [], "labels": [], "segment_ids": [], "positions": []}
        for k, i in enumerate(members, start=1):
            piece = lay_out_example(examples["prompt_ids"][i], answers[i], k, share)
            for key in row:
                row[key] += piece[key]
        for key in row:
            rows[key].append(row[key])
        rows["examples"].append(len(members))
        if kind == "unpaired":
            rows["kto_label"].append([int(examples["label"][i]) for i in members])
    unshared = sum(example_length(len(examples["prompt_ids"][i]), [len(a) for a, _ in answers[i]], False)
                   for i in range(n))
    stats = {"examples": n, "rows": len(bins), "tokens": int(sum(lengths)), "unshared_tokens": int(unshared),
             "max_examples_per_row": max((len(b) for b in bins), default=1)}
    return rows, stats


# ------------------------------------------------------------------------------------- encoders


def _build_chat_spec(entry, tok, top_template: str, top_jinja: str | None, *, template_name: str | None = None):
    from jaxtune.data.formats import end_of_turn_ids
    from jaxtune.data.templates import resolve_chat_template

    name = template_name or entry.chat_template or top_template
    jinja = entry.chat_template_jinja or (top_jinja if name == "jinja" else None)
    template = resolve_chat_template(name, jinja, tok.tokenizer)
    return ChatSpec.build(template, field_messages=entry.field_messages, message_property_mappings=entry.message_property_mappings,
                          roles=entry.roles, train_on_eos=entry.train_on_eos, drop_system_message=entry.drop_system_message,
                          eot_ids=end_of_turn_ids(tok, name))


def _answer_message(value, where: str, name: str) -> dict:
    if isinstance(value, str):
        if not value.strip():
            raise JaxtuneError(f"{where}: field {name!r} is empty")
        return {"role": "assistant", "content": value}
    if isinstance(value, dict):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return value[-1]
    raise JaxtuneError(f"{where}: field {name!r} is {'missing' if value is None else 'not a response'} (a string or "
                       "an assistant message)")


def _chat_prompt(row: dict, field: str, where: str) -> list[dict]:
    value = row.get(field)
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise JaxtuneError(f"{where}: field {field!r} is missing or not a list of messages")
    return value


@dataclasses.dataclass
class PairEncoder:
    """A row -> one preference pair example (see the module docstring)."""

    read: Callable[[dict, str], dict]
    columns: tuple[str, ...]
    type_name: str
    kind: str = "preference"

    def __call__(self, row: dict, where: str) -> list[dict]:
        return [self.read(row, where)]

    def check_columns(self, columns: list[str], where: str) -> None:
        missing = [c for c in self.columns if c not in columns]
        if missing:
            raise JaxtuneError(f"{where}: missing field {missing[0]!r} for type '{self.type_name}'; the dataset "
                               f"has columns {sorted(columns)}")


def build_preference_encoder(entry, *, tok, rl: str, top_template: str, top_jinja: str | None) -> PairEncoder:
    """The encoder of one `datasets:` entry for a preference objective (`rl` dpo/ipo/orpo/simpo: pairs;
    kto: labelled completions). Raises for a type that does not make that kind of rows."""
    type_name = entry.type
    kto = rl == "kto"
    user_defined = not isinstance(type_name, str)
    if user_defined:
        fields = type_name.model_dump(exclude_none=True)
        type_name = "user_defined.default"
    else:
        fields = {k: getattr(entry, k) for k in USER_DEFINED_KEYS if getattr(entry, k, None) is not None}
    supported = KTO_TYPES if kto else PAIR_TYPES
    if type_name not in supported:
        kind = "KTO rows (prompt, completion, label)" if kto else "preference pairs"
        raise JaxtuneError(f"dataset {entry.path}: type '{type_name}' does not make {kind} for rl: {rl}; types: "
                           f"{', '.join(supported)}")
    text = TextTokenizer(tok.tokenizer, tok.tokenizer.eos_token)
    label_field = fields.get("field_label") or "label"
    if kto:
        if type_name == "chat_template.default":
            spec = _build_chat_spec(entry, tok, top_template, top_jinja)
            field_messages, field_completion = entry.field_messages or "messages", entry.field_completion or "completion"

            def read(row, where):
                prompt = chat.normalize_messages(_chat_prompt(row, field_messages, where), spec, where)
                answer = _answer_message(row.get(field_completion), where, field_completion)
                prompt_ids, [(ids, labels)] = chat_completions(tok.tokenizer, spec, prompt, [answer], where)
                return {"prompt_ids": prompt_ids, "completion_ids": ids, "completion_labels": labels,
                        "label": kto_label(row, label_field, where)}
            return PairEncoder(read, (field_messages, field_completion, label_field), type_name, kind="unpaired")
        reader = user_defined_reader(fields, kto=True) if type_name == "user_defined.default" \
            else text_kto_reader(type_name)

        def read(row, where):
            prompt, completion = reader(row, where)
            prompt_ids, [ids] = text(prompt, [completion], where)
            return {"prompt_ids": prompt_ids, "completion_ids": ids, "completion_labels": list(ids),
                    "label": kto_label(row, label_field, where)}
        return PairEncoder(read, (label_field,), type_name, kind="unpaired")

    if type_name.startswith("chat_template."):
        spec = _build_chat_spec(entry, tok, top_template, top_jinja)
        field_chosen, field_rejected = entry.field_chosen or "chosen", entry.field_rejected or "rejected"
        if type_name == "chat_template.default":
            field_messages = entry.field_messages or "messages"
            columns = (field_messages, field_chosen, field_rejected)

            def messages_of(row, where):
                return (_chat_prompt(row, field_messages, where), _answer_message(row.get(field_chosen), where, field_chosen),
                        _answer_message(row.get(field_rejected), where, field_rejected))
        else:  # argilla_chat (DPO) and argilla (ORPO): chosen / rejected are whole conversations
            columns = (field_chosen, field_rejected)

            def messages_of(row, where):
                chosen, rejected = row.get(field_chosen), row.get(field_rejected)
                for name, value in ((field_chosen, chosen), (field_rejected, rejected)):
                    if not isinstance(value, list) or len(value) < 2:
                        raise JaxtuneError(f"{where}: field {name!r} must be a conversation ending in the response")
                prompt = list(chosen[:-1])
                if type_name == "chat_template.argilla" and row.get("system"):
                    prompt = [{"role": "system", "content": row["system"]}] + prompt
                if type_name == "chat_template.argilla" and row.get("prompt"):
                    prompt = [m if m.get("role") != "user" else {**m, "content": row["prompt"]} for m in prompt]
                return prompt, _answer_message(chosen, where, field_chosen), _answer_message(rejected, where,
                                                                                                field_rejected)

        def read(row, where):
            prompt, chosen, rejected = messages_of(row, where)
            prompt = chat.normalize_messages(prompt, spec, where)
            prompt_ids, [(c, c_labels), (r, r_labels)] = chat_completions(tok.tokenizer, spec, prompt,
                                                                          [chosen, rejected], where)
            return {"prompt_ids": prompt_ids, "chosen_ids": c, "chosen_labels": c_labels, "rejected_ids": r,
                    "rejected_labels": r_labels}
        return PairEncoder(read, columns, type_name)

    reader = user_defined_reader(fields, kto=False) if type_name == "user_defined.default" \
        else text_pair_reader(type_name)

    def read_text(row, where):
        prompt, chosen, rejected = reader(row, where)
        return _text_pair(text, prompt, chosen, rejected, where)
    return PairEncoder(read_text, (), type_name)


# Dataset-entry keys of Axolotl's user_defined.default (also accepted as a `type:` mapping).
USER_DEFINED_KEYS = ("field_prompt", "field_system", "field_chosen", "field_rejected", "field_completion",
                     "field_label", "prompt_format", "chosen_format", "rejected_format", "completion_format")


def preference_type_keys(type_name: str, chat_keys: set[str]) -> set[str]:
    """Dataset-entry keys a preference type reads (besides where and how to load the rows)."""
    if type_name == "user_defined.default":
        return set(USER_DEFINED_KEYS)
    if type_name == "chat_template.default":
        return chat_keys | {"field_chosen", "field_rejected", "field_completion", "field_label"}
    if type_name.startswith("chat_template."):
        return (chat_keys - {"field_messages"}) | {"field_chosen", "field_rejected"}
    return set()
