"""`jaxtune <verb>`: the command line.

Verbs: convert (GGUF -> HF directory, or prepare the bundled model), generate (KV-cache sampling),
preprocess (tokenize, mask and pack a config's datasets into the cache), train (fine-tune), export
(hf/ and adapter/ from a checkpoint or adapter), validate (print the resolved config or its errors),
plan (memory per device before loading a weight).
Errors caused by input print one line `jaxtune: error: ...` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _convert(args: argparse.Namespace) -> int:
    from jaxtune import bundled
    from jaxtune.checkpoint.gguf import convert_gguf_to_hf

    if args.bundled:
        if args.source or args.output:
            raise SystemExit("jaxtune convert: --bundled takes no SOURCE/OUTPUT")
        print(bundled.prepare(args.bundled, force=args.force))
        return 0
    if not args.source or not args.output:
        raise SystemExit("jaxtune convert: give SOURCE.gguf and OUTPUT_DIR, or --bundled NAME")
    print(convert_gguf_to_hf(args.source, args.output, max_shard_size=args.max_shard_size))
    return 0


def _generate(args: argparse.Namespace) -> int:
    import jaxtune
    from jaxtune import bundled
    from jaxtune.errors import JaxtuneError
    from jaxtune.generate import SamplingConfig, generate
    from jaxtune.peft.adapter import merge_peft_adapter

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed)
    model, tokenizer = jaxtune.load_pretrained(bundled.resolve(args.model), dtype=args.dtype)
    if tokenizer is None:
        raise JaxtuneError(f"{args.model} has no tokenizer files; generate needs one")
    if args.adapter:
        merge_peft_adapter(model, args.adapter)
    results = generate(model, tokenizer, args.prompt, sampling, chat=args.chat, system=args.system)
    if args.json:
        print(json.dumps([r.__dict__ for r in results], ensure_ascii=False, indent=2))
        return 0
    for i, r in enumerate(results):
        if len(results) > 1:
            print(f"=== [{i}] {r.prompt}")
        print(r.text)
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from jaxtune.config import load_config
    from jaxtune.data.debug import describe_example
    from jaxtune.data.prepare import prepare

    cfg = load_config(args.config, args.overrides)
    data = prepare(cfg, force=args.force)
    stats = data.stats
    print(f"prepared {stats['train_rows']} training rows and {stats['eval_rows']} eval rows ({data.kind}) in "
          f"{data.path}")
    if args.debug:
        color = sys.stdout.isatty()
        for i in range(min(args.debug_examples, len(data.train))):
            row = data.train[i]
            if data.kind == "prompt":
                print(f"=== example {i} (prompt)\n{data.tokenizer.decode(row['prompt_ids'])}")
                continue
            if data.kind in ("preference", "unpaired"):
                n = row["examples"]
                print(f"=== row {i} ({n} example{'s' if n != 1 else ''})")
                branches = ("chosen", "rejected") if data.kind == "preference" else ("completion", "KL completion")
                print(describe_example(data.tokenizer, row, color=color, branches=branches))
                continue
            print(f"=== example {i}")
            print(describe_example(data.tokenizer, row, color=color))
    return 0


def _train(args: argparse.Namespace) -> int:
    from jaxtune.config import load_config
    from jaxtune.train import run

    try:
        run(load_config(args.config, args.overrides))
    except KeyboardInterrupt:
        return 130
    return 0


def _export(args: argparse.Namespace) -> int:
    from jaxtune.config import load_config
    from jaxtune.train import export_run

    overrides = list(args.overrides) + ([f"lora_model_dir={args.lora_model_dir}"] if args.lora_model_dir else [])
    written = export_run(load_config(args.config, overrides), args.checkpoint)
    for path in written.values():
        print(path)
    return 0


_HUB_ID = r"[A-Za-z0-9][\w.-]*/[\w.-]+"
_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt", ".gz", ".zst")



def _check_adapter_sites(cfg, architecture: str) -> None:
    """lora_target_modules and lora_target_parameters against the family's adapter sites."""
    from jaxtune.errors import JaxtuneError
    from jaxtune.models import family_for

    if not cfg.adapter:
        return
    family = family_for(architecture)
    targets, params = family.LORA_TARGETS, getattr(family, "LORA_PARAMETERS", {})
    if isinstance(cfg.lora_target_modules, list):
        unknown = [t for t in cfg.lora_target_modules if t not in targets]
        if unknown:
            raise JaxtuneError(f"lora_target_modules: {', '.join(unknown)} are not projections of "
                               f"{architecture}'s layers; it has {', '.join(targets)}")
    unknown = [t for t in cfg.lora_target_parameters or () if not any(p == t or p.endswith("." + t) for p in params)]
    if unknown:
        raise JaxtuneError(f"lora_target_parameters: {', '.join(unknown)} name no parameter of {architecture}'s "
                           f"layers; it has {', '.join(params) or 'none (it is not a mixture of experts)'}")

def _check_sources(cfg) -> list[str]:
    """Lines about where base_model and the datasets come from; an error for a path that exists nowhere."""
    import re
    from pathlib import Path

    from jaxtune import bundled
    from jaxtune.checkpoint.hf import check_remote_code, read_hf_config
    from jaxtune.errors import JaxtuneError

    lines = []
    model = str(cfg.base_model or "")
    if not model:
        raise JaxtuneError("base_model is not set")
    if model.startswith(bundled.PREFIX):
        _check_adapter_sites(cfg, "LlamaForCausalLM")  # SmolLM2
        lines.append(f"base_model: {model} (the bundled model, prepared on first use)")
    elif Path(model).is_dir():
        _, architecture = read_hf_config(model)  # names a missing config.json or an unsupported architecture
        check_remote_code(model, cfg.trust_remote_code)
        _check_adapter_sites(cfg, architecture)
        lines.append(f"base_model: {model} ({architecture})")
    elif re.fullmatch(_HUB_ID, model):
        lines.append(f"base_model: {model} is a Hugging Face hub id, not a local directory: jaxtune downloads nothing "
                     f"at run time; fetch it first (hf download {model} --local-dir DIR) and point base_model at DIR")
    else:
        raise JaxtuneError(f"base_model {model}: no such directory, and not a hub id (org/name) either")
    for group in ("datasets", "test_datasets"):
        for i, entry in enumerate(getattr(cfg, group) or []):
            path = entry.path
            if "://" in path or Path(path).exists():
                continue
            if re.fullmatch(_HUB_ID, path) and Path(path).suffix not in _DATA_SUFFIXES:
                lines.append(f"{group}[{i}].path: {path} is read with datasets.load_dataset (a hub dataset)")
            else:
                raise JaxtuneError(f"{group}[{i}].path {path}: no such file or directory (looked in the working "
                                   f"directory and the config's), and not a hub id")
    return lines


def _validate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import yaml

    from jaxtune.config import dump_config, load_config, parse_override
    from jaxtune.config.keys import config_report

    cfg = load_config(args.config, args.overrides)
    raw = yaml.safe_load(Path(args.config).read_text()) or {}
    for item in args.overrides or []:
        keys, value = parse_override(item)
        if len(keys) == 1:
            raw[keys[0]] = value
    print(dump_config(cfg), end="")
    notes = config_report(raw) + _check_sources(cfg)
    if notes:
        print("# keys not taken as they are, and sources:")
        for line in notes:
            print(f"#   {line}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from jaxtune.config import load_config
    from jaxtune.plan import host_memory, parse_bytes, plan_memory, suggest_meshes

    import jax

    cfg = load_config(args.config, args.overrides)
    platform = args.platform or jax.default_backend()
    devices = args.devices or (jax.device_count() if platform == jax.default_backend() else 1)
    memory = parse_bytes(args.device_memory) if args.device_memory else host_memory(platform)
    plan = plan_memory(cfg, devices=devices, device_memory=memory, platform=platform)
    print(plan.report())
    if memory:
        fitting = suggest_meshes(cfg, devices, memory, platform)
        if fitting:
            print("meshes that fit (smallest first):")
            for keys, total in fitting:
                print(f"  {keys}  ->  {total / 2**30:.2f} GiB per device")
        else:
            print(f"no mesh of {devices} device(s) fits {memory / 2**30:.1f} GiB: use more devices, adapter: qlora, "
                  "gradient_checkpointing, or a shorter sequence_len")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxtune", description="LLM post-training in JAX/Flax")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("convert", help="convert a GGUF file to an HF directory (or prepare the bundled model)")
    p.add_argument("source", nargs="?", help="GGUF file")
    p.add_argument("output", nargs="?", help="HF directory to write")
    p.add_argument("--bundled", metavar="NAME", help="prepare a bundled model (smollm2) and print its directory")
    p.add_argument("--force", action="store_true", help="with --bundled: convert again even if cached")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.set_defaults(func=_convert)

    p = verbs.add_parser("generate", help="generate text with a model (KV-cache sampler)")
    p.add_argument("--model", required=True, help="HF model directory, or bundled:smollm2")
    p.add_argument("--adapter", help="PEFT LoRA adapter directory to merge before generating")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the tokenizer's chat template (default: when it has one)")
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.set_defaults(func=_generate)

    p = verbs.add_parser("preprocess", help="tokenize, mask and pack the datasets of a config into the cache")
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--debug", action="store_true", help="print examples token by token with their labels")
    p.add_argument("--debug-examples", type=int, default=3, help="how many examples --debug prints")
    p.add_argument("--force", action="store_true", help="rebuild even if the cache has it")
    p.set_defaults(func=_preprocess)

    p = verbs.add_parser("train", help="fine-tune from a config (same as python -m jaxtune.train --config)")
    p.add_argument("config", help="YAML config (Axolotl keys)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=_train)

    p = verbs.add_parser("export", help="write output_dir/hf (merged) and adapter/ from a checkpoint or an adapter "
                         "(Axolotl's merge-lora)")
    p.add_argument("config", help="YAML config of the run")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--checkpoint", help="a checkpoint directory (default: the newest in output_dir/checkpoints)")
    p.add_argument("--lora-model-dir", help="export this PEFT adapter merged into base_model")
    p.set_defaults(func=_export)

    p = verbs.add_parser("plan", help="memory per device for a config, the largest micro_batch_size that fits, "
                         "meshes that fit")
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--devices", type=int, help="number of devices (default: those present)")
    p.add_argument("--device-memory", help="memory of one device, e.g. 80GiB (default: this machine's)")
    p.add_argument("--platform", choices=("cpu", "gpu", "tpu"), help="plan for this platform (default: this "
                   "machine's)")
    p.set_defaults(func=_plan)

    p = verbs.add_parser("validate", help="print the resolved config and each key that was mapped or has no "
                         "effect, or the config's errors; check that base_model and the datasets exist")
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=_validate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from jaxtune.errors import JaxtuneError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come before or after options.
    if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except JaxtuneError as e:
        print(f"jaxtune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
