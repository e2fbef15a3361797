"""Model families and the registry from HF `architectures` names to them."""

from __future__ import annotations

from types import ModuleType

from jaxtune.errors import ModelLoadError
from jaxtune.models import gemma, gpt_neox, llama, mixtral, phi3, qwen2_moe, qwen3_moe

# Each family module gives: ARCHITECTURES, config_from_hf, CausalLM (a models.stack.DecoderLM),
# hf_tensor_name and LORA_TARGETS, and hf_tensor_parts where a parameter is several checkpoint tensors
# (tensor_parts). A mixture of experts adds EXPERTS and LORA_PARAMETERS, and where some layers are dense
# (CausalLM.DENSE_BLOCK) DENSE_LINEARS and DENSE_LORA_TARGETS; OTHER_LINEARS lists a routed layer's other
# nn.Linear projections (QLoRA quantizes them). Adding a family is its module and its line here.
FAMILY_MODULES: tuple[ModuleType, ...] = (llama, gpt_neox, phi3, gemma, mixtral, qwen3_moe, qwen2_moe)
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


def tensor_parts(family: ModuleType, cfg, ppath: tuple[str, ...], layer: int | None) -> list[tuple[str, tuple]]:
    """The checkpoint tensors of one parameter (one layer's slice of a stacked one), each with the index
    of the part of that array it fills (HF's [out, in] transposed into a kernel's [in, out]): one
    tensor and the whole array (`()`) for most parameters; an MoE's stacked experts are one tensor per
    expert and part (the family's `hf_tensor_parts`)."""
    parts = getattr(family, "hf_tensor_parts", None)
    return parts(cfg, ppath, layer) if parts is not None else [(family.hf_tensor_name(ppath, layer), ())]
