"""Model families and the registry from HF `architectures` names to them."""

from __future__ import annotations

from types import ModuleType

from jaxtune.errors import ModelLoadError
from jaxtune.models import gemma, gpt_neox, llama, phi3

# Each family module gives: ARCHITECTURES, config_from_hf, CausalLM (a models.stack.DecoderLM),
# hf_tensor_name and LORA_TARGETS. Adding a family is its module and its line here.
FAMILY_MODULES: tuple[ModuleType, ...] = (llama, gpt_neox, phi3, gemma)
_FAMILIES: dict[str, ModuleType] = {arch: family for family in FAMILY_MODULES for arch in family.ARCHITECTURES}

SUPPORTED_ARCHITECTURES = tuple(sorted(_FAMILIES))


def family_for(architecture: str) -> ModuleType:
    """The module implementing `architecture` (it provides config_from_hf, CausalLM, hf_tensor_name)."""
    try:
        return _FAMILIES[architecture]
    except KeyError:
        raise ModelLoadError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        ) from None
