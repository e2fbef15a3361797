"""Conversations -> token ids and labels, with the trained turns found by rendering the template.

How a turn is located: the conversation is rendered once (`full`), and once more per turn with only
that turn's content replaced by a placeholder of the same length (`probe`). The characters where
`full` and `probe` differ are exactly where the template wrote that turn's content, whatever the
template adds around it (headers, `<think>` blocks on the last turn, trimming). Tokens whose
character span overlaps that region train; then the first end-of-turn token after it trains per
`train_on_eos`. No decoded text is searched, and a turn the template does not write (or writes
twice) is an error naming the row, never a silently wrong mask.

Reasoning (Axolotl's `field_thinking` / `template_thinking_key` / `split_thinking`): a message's
reasoning is read from `field_thinking` (or split out of `<think>...</think>` in an assistant's content)
and handed to the template under `template_thinking_key`. The probe replaces the content and drops
the reasoning, as Axolotl's dummy turn `{role, content: sentinel}` does, so a trained turn trains its
reasoning, what the template writes between reasoning and content (`</think>`), and its content. With
Qwen3's template on the final turn:

    full  = "<|im_start|>assistant\n<think>\nR\n</think>\n\nC<|im_end|>\n"
    probe = "<|im_start|>assistant\n<think>\n\n</think>\n\n\x01<|im_end|>\n"
    region = "R\n</think>\n\nC"  (the opening "<think>\n" is the same in both: it does not train)

Worked example (chatml, roles_to_train=[assistant], train_on_eos=turn):

    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    full  = "<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n"
    probe = "<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n\\x01\\x01\\x01\\x01\\x01\\x01<|im_end|>\\n"
    region of turn 1 = full[41:47] == "Hello!"
    tokens  <|im_start|> user \\n Hi <|im_end|> \\n <|im_start|> assistant \\n Hello ! <|im_end|> \\n
    labels   -100        -100 ...                                  -100  Hello ! <|im_end|> -100
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import re
from collections.abc import Sequence

from jaxtune.batch import IGNORE
from jaxtune.errors import JaxtuneError
from jaxtune.logging import warn_once

DEFAULT_ROLE_MAP: dict[str, list[str]] = {
    "user": ["user", "human"],
    "assistant": ["assistant", "gpt", "model"],
    "system": ["system"],
    "tool": ["tool", "ipython", "function"],
}
_PLACEHOLDER = "\x01"
REASONING_KEY = "reasoning_content"  # Axolotl's default for field_thinking and template_thinking_key
# split_thinking: the reasoning delimiters Axolotl tries, in order, and the solution block it unwraps.
THINKING_PAIRS = (("<think>", "</think>"), ("<reasoning>", "</reasoning>"),
                  ("<|begin_of_thought|>", "<|end_of_thought|>"))
SOLUTION_PAIR = ("<|begin_of_solution|>", "<|end_of_solution|>")
# Keys transformers hands to a template as the reasoning (it copies one into the others). Axolotl gives the
# template only the keys it reads, so one of these in the data that the template does not read by
# name is dropped: the reasoning is what `field_thinking` names, whatever the transformers version.
REASONING_ALIASES = ("reasoning_content", "thinking", "reasoning")


@functools.lru_cache(maxsize=64)
def template_reads(template: str, key: str) -> bool:
    """Whether the jinja reads `key` off something (`m.key`, `m['key']`, `m.get('key')`)."""
    k = re.escape(key)
    return re.search(rf"""\.{k}\b|\[\s*['"]{k}['"]\s*\]|get\(\s*['"]{k}['"]""", template) is not None


class TurnNotFoundError(JaxtuneError):
    """A turn of a conversation could not be located in the rendered template."""


@dataclasses.dataclass(frozen=True)
class ChatSpec:
    """How to read and train one chat dataset."""

    template: str
    field_messages: str = "messages"
    role_key: str = "role"
    content_key: str = "content"
    role_map: dict[str, str] = dataclasses.field(default_factory=dict)  # source role -> target role
    roles_to_train: tuple[str, ...] = ("assistant",)
    train_on_eos: str = "turn"
    train_on_inputs: bool = False
    drop_system_message: bool = False
    eot_ids: frozenset[int] = frozenset()  # end-of-turn token ids (eos, eot_tokens, the template's marker)
    field_thinking: str = REASONING_KEY  # message key holding the reasoning in the data
    template_thinking_key: str = REASONING_KEY  # key the chat template reads the reasoning from
    split_thinking: bool = False  # split <think>...</think> out of assistant content into the reasoning

    @classmethod
    def build(cls, template: str, *, field_messages=None, message_property_mappings=None, roles=None,
              roles_to_train=None, train_on_eos=None, train_on_inputs=False, drop_system_message=False,
              eot_ids=frozenset(), default_field="messages", field_thinking=None, template_thinking_key=None,
              split_thinking=False) -> ChatSpec:
        mapping = message_property_mappings or {}
        unknown = set(mapping) - {"role", "content"}
        if unknown:
            raise JaxtuneError(f"message_property_mappings: unknown keys {sorted(unknown)} (role, content)")
        role_map: dict[str, str] = {}
        for target, sources in {**DEFAULT_ROLE_MAP, **(roles or {})}.items():
            for source in sources:
                role_map[source] = target
        return cls(template=template, field_messages=field_messages or default_field,
                   role_key=mapping.get("role", "role"), content_key=mapping.get("content", "content"),
                   role_map=role_map, roles_to_train=tuple(roles_to_train or ("assistant",)),
                   train_on_eos=train_on_eos or "turn", train_on_inputs=train_on_inputs, eot_ids=frozenset(eot_ids),
                   drop_system_message=drop_system_message, field_thinking=field_thinking or REASONING_KEY,
                   template_thinking_key=template_thinking_key or REASONING_KEY, split_thinking=bool(split_thinking))


def normalize_messages(raw, spec: ChatSpec, where: str) -> list[dict]:
    """Rows' messages -> [{"role": target role, "content": str, ...}] with the role names mapped."""
    if not isinstance(raw, (list, tuple)) or not raw:
        raise JaxtuneError(f"{where}: field '{spec.field_messages}' must be a non-empty list of messages")
    out = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict) or spec.role_key not in message:
            raise JaxtuneError(f"{where}: message {i} has no '{spec.role_key}' key (set message_property_mappings)")
        source = message[spec.role_key]
        if source not in spec.role_map:
            raise JaxtuneError(f"{where}: message {i} has role '{source}', which is not mapped; known roles: "
                               f"{sorted(spec.role_map)} (map it with `roles:`)")
        content = message.get(spec.content_key)
        own = (spec.role_key, spec.content_key, spec.field_thinking)
        extra = {k: v for k, v in message.items() if k not in own and v is not None
                 and (k not in REASONING_ALIASES or template_reads(spec.template, k))}
        role = spec.role_map[source]
        if role == "system" and spec.drop_system_message:
            continue
        content = "" if content is None else str(content)
        reasoning = message.get(spec.field_thinking)
        if spec.split_thinking and role == "assistant":
            content, reasoning = split_thinking(content, reasoning)
        if reasoning is not None:
            if not isinstance(reasoning, str):
                raise JaxtuneError(f"{where}: message {i}: the reasoning in '{spec.field_thinking}' (field_thinking) "
                                   f"must be a string, got {type(reasoning).__name__}")
            key = spec.template_thinking_key  # transformers also hands an alias's value to the others
            if not any(template_reads(spec.template, k) for k in (REASONING_ALIASES if key in REASONING_ALIASES
                                                                  else (key,))):
                warn_once(f"the chat template never reads '{spec.template_thinking_key}' (template_thinking_key): "
                          "the messages' reasoning is not rendered and does not train")
            extra[spec.template_thinking_key] = reasoning
        out.append({**extra, "role": role, "content": content})
    return out


def split_thinking(content: str, reasoning=None) -> tuple[str, str | None]:
    """(content, reasoning) with the first delimited reasoning block taken out of `content`, as
    Axolotl's `split_thinking` does: the text between the first pair found (stripped) becomes the
    reasoning (replacing any given one); the content is what follows the closing tag (left-stripped),
    or the inside of a `<|begin_of_solution|>` block there. Text before the opening tag is dropped.

        "<think> 2+2 is 4 </think>\n\nFour." -> ("Four.", "2+2 is 4")
    """
    for opening, closing in THINKING_PAIRS:
        if opening in content and closing in content:
            start, end = content.find(opening), content.find(closing)
            thought = content[start + len(opening):end].strip()
            rest = content[end + len(closing):].lstrip()
            first, last = SOLUTION_PAIR
            if first in rest and last in rest:
                rest = rest[rest.find(first) + len(first):rest.find(last)].strip()
            return rest, thought
    return content, reasoning


def render(tokenizer, template: str, messages: Sequence[dict], *, add_generation_prompt: bool = False,
           **kwargs) -> str:
    return tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **kwargs)


def _common_prefix(a: str, b: str, limit: int) -> int:
    """Length of the common prefix of a and b (at most `limit`), by binary search on slices."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _changed_region(full: str, probe: str) -> tuple[int, int]:
    """[start, end) of `full` that differs from `probe` (common prefix and suffix removed)."""
    limit = min(len(full), len(probe))
    start = _common_prefix(full, probe, limit)
    suffix = _common_prefix(full[::-1], probe[::-1], limit - start)
    return start, len(full) - suffix


def turn_region(tokenizer, spec: ChatSpec, messages: list[dict], i: int, full: str, where: str) -> tuple[int, int]:
    """Character region [start, end) of message i's content in `full` (see the module docstring)."""
    message = messages[i]
    content = message["content"]
    placeholder = _PLACEHOLDER * max(len(content), 1)
    reasoning = message.get(spec.template_thinking_key)
    reasoning_keys = (spec.template_thinking_key, *REASONING_ALIASES)
    dummy = {k: v for k, v in message.items() if k not in reasoning_keys}  # the reasoning goes too
    probe = render(tokenizer, spec.template, [*messages[:i], {**dummy, "content": placeholder}, *messages[i + 1:]])
    if probe == full:
        raise TurnNotFoundError(f"{where}: the chat template does not write message {i} ({message['role']}); "
                                "its tokens cannot be labelled")
    start, end = _changed_region(full, probe)
    region = full[start:end]
    with_reasoning = isinstance(reasoning, str) and reasoning.strip() in region and content.strip() in region
    if end - start > len(content) and region.strip() != content.strip() and not with_reasoning:
        raise TurnNotFoundError(
            f"{where}: message {i} ({message['role']}) could not be located in the rendered template "
            "(the template changes more than the message's own text); labels would be wrong")
    return start, end


def encode_conversation(tokenizer, spec: ChatSpec, messages: list[dict], where: str, trained: Sequence[bool] | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one normalized conversation.

    `trained` (one flag per message) overrides `spec.roles_to_train`, e.g. only the final response of
    a preference pair trains. A turn's end-of-turn token is the first non-whitespace token after its
    content when that token is one of `spec.eot_ids`.
    """
    full = render(tokenizer, spec.template, messages)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if spec.train_on_inputs:
        return list(ids), list(ids)
    labels = [IGNORE] * len(ids)
    if trained is None:
        trained = [m["role"] in spec.roles_to_train for m in messages]
    last_trained = max((i for i, t in enumerate(trained) if t), default=-1)
    eot_ids = spec.eot_ids
    starts = [a for a, _ in offsets]
    ends = [b for _, b in offsets]
    previous_start = -1
    for i in range(len(messages)):
        eos_trains = _eos_trains(spec.train_on_eos, trained[i], i == last_trained)
        if not (trained[i] or eos_trains):
            continue  # nothing of this turn trains: no need to locate it
        start, end = turn_region(tokenizer, spec, messages, i, full, where)
        if start < previous_start:
            raise TurnNotFoundError(f"{where}: the chat template writes message {i} before an earlier message")
        previous_start = start
        first = bisect.bisect_right(ends, start)  # first token ending after start
        last = bisect.bisect_left(starts, end)  # first token starting at or after end
        if trained[i]:
            labels[first:last] = ids[first:last]
        eot = last
        while eot < len(ids) and not full[offsets[eot][0]:offsets[eot][1]].strip() and ids[eot] not in eot_ids:
            eot += 1  # skip whitespace between the content and the end-of-turn token
        if eos_trains and eot < len(ids) and ids[eot] in eot_ids:
            labels[eot] = ids[eot]
    return list(ids), labels


def _eos_trains(mode: str, turn_trains: bool, is_last_trained: bool) -> bool:
    if mode == "all":
        return True
    if mode == "turn":
        return turn_trains
    if mode == "last":
        return is_last_trained
    return False
