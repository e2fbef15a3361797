"""How many of Axolotl's own example configs jaxtune accepts as they are (`jaxtune validate`), with
`base_model` pointed at a local model (nothing is downloaded): the count, and each rejection's reason
grouped, so every rejection can be checked to name a real missing capability.

Axolotl's examples are not part of this repository: fetch its `examples/` folder (any revision) and
point this script at it. Configs of multimodal models (a processor, images, vision/audio towers) and
of mixture-of-experts models are counted apart: they need capabilities jaxtune does not have yet.

    python scripts/check_axolotl_examples.py path/to/axolotl/examples --model bundled:smollm2
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import re
import sys
import tempfile
from pathlib import Path

import yaml

_MULTIMODAL = re.compile(r"processor_type|image_size|vision|-vl|_vl|multimodal|audio|voxtral|llava|pixtral|"
                         r"qwen2_5_vl|gemma-3n|smolvlm|lfm2-vl|mllama|idefics", re.I)
_MOE = re.compile(r"mixtral|moe|a3b|a1b|a4b|a22b|a14b|deepseek-v[23]|deepseek-r1|gpt-oss|dbrx|jamba|"
                  r"granite-3\.\d-\d+b-a|olmoe|glm-4\.[57]|glm4\.[57]|glm45|glm47|llama-4|llama4|kimi|"
                  r"minimax|qwen3-next|arcee.*trinity|expert_parallel|lora_target_parameters", re.I)


def kind_of(text: str) -> str:
    if _MULTIMODAL.search(text):
        return "multimodal"
    if _MOE.search(text):
        return "moe"
    return "text-dense"


def check(path: Path, model: str, work: Path) -> tuple[str, str]:
    """('ok', '') or ('rejected', the error line) for one example config."""
    from jaxtune.cli import main

    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        return "rejected", "not a mapping"
    raw["base_model"] = model
    raw.pop("base_model_config", None)
    raw.pop("tokenizer_config", None)
    target = work / path.name
    target.write_text(yaml.safe_dump(raw, sort_keys=False))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["validate", str(target)])
        except Exception as exc:  # a crash is a bug in jaxtune, counted apart
            return "crashed", f"{type(exc).__name__}: {exc}"
    if code == 0:
        return "ok", ""
    line = next((l for l in err.getvalue().splitlines() if l.startswith("jaxtune: error:")), err.getvalue()[-300:])
    return "rejected", line.removeprefix("jaxtune: error: ").replace(str(target), path.name)


def _reason(line: str) -> str:
    """The rejection's reason without the config-specific parts, to group them."""
    line = re.sub(r"^.*?\.ya?ml: ", "", line)
    line = re.sub(r"\(got .*?\)", "", line)
    return re.sub(r"datasets\[\d+\]", "datasets[i]", line)[:160]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("examples", type=Path, help="Axolotl's examples/ folder")
    parser.add_argument("--model", default="bundled:smollm2", help="local model every config is pointed at")
    parser.add_argument("--verbose", action="store_true", help="list every config's result")
    args = parser.parse_args()
    files = sorted(p for p in args.examples.rglob("*.y*ml") if "archived" not in p.parts)
    results: dict[str, list[tuple[Path, str, str]]] = collections.defaultdict(list)
    with tempfile.TemporaryDirectory() as work:
        for path in files:
            text = path.read_text()
            if "base_model" not in text:
                continue  # not a training config (a deepspeed/fsdp json-like file, a cloud spec, ...)
            status, line = check(path, args.model, Path(work))
            results[kind_of(str(path) + "\n" + text)].append((path, status, line))
    for kind in ("text-dense", "moe", "multimodal"):
        rows = results.get(kind, [])
        ok = sum(1 for _, s, _ in rows if s == "ok")
        crashed = [r for r in rows if r[1] == "crashed"]
        print(f"{kind}: {ok} of {len(rows)} validate ({100 * ok / max(len(rows), 1):.0f}%)"
              + (f"; {len(crashed)} CRASHED" if crashed else ""))
        reasons = collections.Counter(_reason(line) for _, s, line in rows if s != "ok")
        for reason, n in reasons.most_common():
            print(f"  {n:3d}  {reason}")
        if args.verbose:
            for path, status, line in rows:
                print(f"    {status:8s} {path.relative_to(args.examples)}  {line[:140]}")
    sys.exit(1 if any(s == "crashed" for rows in results.values() for _, s, _ in rows) else 0)


if __name__ == "__main__":
    main()
