"""Model families and the registry from HF `architectures` names to them."""

from __future__ import annotations

from types import ModuleType

from jaxtune.errors import ModelLoadError
from jaxtune.models import llama

_FAMILIES: dict[str, ModuleType] = {arch: llama for arch in llama.ARCHITECTURES}

SUPPORTED_ARCHITECTURES = tuple(sorted(_FAMILIES))


def family_for(architecture: str) -> ModuleType:
    """The module implementing `architecture` (it provides config_from_hf, CausalLM, hf_tensor_name)."""
    try:
        return _FAMILIES[architecture]
    except KeyError:
        raise ModelLoadError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        ) from None
