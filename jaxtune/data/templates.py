"""Chat templates: the tokenizer's own, a named one, or jinja from the config.

The named templates are written after the models' published templates (tools left out). They are
plain jinja for transformers' `apply_chat_template`, so rendering is transformers' code, not ours.
"""

from __future__ import annotations

from jaxtune.errors import JaxtuneError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Mistral instruct: the system message is folded into the first user turn.
MISTRAL = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first %}{{ '[INST] ' + system + message['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('mistral template: roles are system, user, assistant') }}{% endif %}"
    "{% endfor %}"
)

# Qwen3: chatml with thinking blocks. Assistant turns after the last user query carry a
# `<think>` block (empty when there is no reasoning) when they are last or have reasoning; earlier
# turns are rendered without it, as Qwen's template does.
QWEN3 = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- set content = message['content'] %}{%- set reasoning = message.get('reasoning_content') or '' %}"
    "{%- if not reasoning and '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Gemma: roles user/model; a system message is prepended to the first user turn.
GEMMA = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] | trim + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{% set prefix = system if loop.first else '' %}"
    "{{ '<start_of_turn>' + role + '\\n' + prefix + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

NAMED_TEMPLATES: dict[str, str] = {
    "chatml": CHATML,
    "llama3": LLAMA3,
    "mistral": MISTRAL,
    "qwen3": QWEN3,
    "gemma": GEMMA,
}

# The end-of-turn marker each named template writes (trained per `train_on_eos`).
NAMED_END_OF_TURN: dict[str, str] = {
    "chatml": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "qwen3": "<|im_end|>",
    "gemma": "<end_of_turn>",
}


def resolve_chat_template(name: str | None, jinja: str | None, tokenizer) -> str:
    """The jinja text for a `chat_template` setting (tokenizer_default, a name, or jinja)."""
    if name in (None, "tokenizer_default"):
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise JaxtuneError("chat_template: tokenizer_default, but the tokenizer has no chat template; set "
                               f"chat_template to one of {sorted(NAMED_TEMPLATES)} or to jinja")
        return template
    if name == "jinja":
        if not jinja:
            raise JaxtuneError("chat_template: jinja needs chat_template_jinja")
        return jinja
    if name.startswith("tokenizer_default_fallback_"):
        fallback = name.removeprefix("tokenizer_default_fallback_")
        return getattr(tokenizer, "chat_template", None) or resolve_chat_template(fallback, None, tokenizer)
    if name not in NAMED_TEMPLATES:
        raise JaxtuneError(f"unknown chat_template '{name}'; choose tokenizer_default, jinja, or one of "
                           f"{sorted(NAMED_TEMPLATES)}")
    return NAMED_TEMPLATES[name]
