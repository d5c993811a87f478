"""`prefix-serve demo`: the same prompts with and without each demo prefix, generated in one mixed batch.

Each demo prefix directory may hold a `test.jsonl` of chat examples; the demo takes the user turns of the first
few as its prompts. All prompts, for every prefix and for the bare model, go through one `generate` call, so
the demo also shows different prefixes sharing one batch.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

from engine.model_loader import DEMO_PREFIX_DIR

FALLBACK_PROMPTS = ["Tell me about the sea in one sentence.", "What is the capital of France?"]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="show the same prompts with and without each demo prefix",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="Hugging Face model directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prefix-dir", default=None,
                   help="directory whose subdirectories are PEFT prefix adapters (default: the shipped demo "
                        "prefixes, with the embedded model)")
    p.add_argument("--examples", type=int, default=2, help="prompts per prefix (default 2)")
    p.add_argument("--max-tokens", type=int, default=60, help="new tokens per answer (default 60)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def _demo_prompts(prefix_dir: Path, count: int) -> list[str]:
    test = prefix_dir / "test.jsonl"
    if not test.is_file():
        return FALLBACK_PROMPTS[:count]
    prompts = []
    for line in test.read_text().splitlines()[:count]:
        messages = json.loads(line).get("messages", [])
        user = [m["content"] for m in messages if m.get("role") == "user"]
        if user:
            prompts.append(user[-1])
    return prompts or FALLBACK_PROMPTS[:count]


def run(args) -> int:
    from engine import LLM, SamplingParams

    root = Path(args.prefix_dir) if args.prefix_dir else (DEMO_PREFIX_DIR if args.model is None else None)
    llm = LLM(model=args.model, device=args.device)
    names = llm.engine.register_prefix_dir(str(root)) if root is not None and root.is_dir() else []
    if not names:
        print("No prefixes found; showing the bare model only.")
    cases = [(name, prompt) for name in names for prompt in _demo_prompts(root / name, args.examples)]
    if not cases:
        cases = [(None, p) for p in FALLBACK_PROMPTS]
    conversations, prefixes = [], []
    for name, prompt in cases:
        for prefix in (None, name) if name else (None,):
            conversations.append([{"role": "user", "content": prompt}])
            prefixes.append(prefix)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    outputs = llm.chat(conversations, params, prefix=prefixes)
    width = 100
    for conversation, prefix, out in zip(conversations, prefixes, outputs):
        if prefix is None:
            print("\n" + "=" * width)
            print(textwrap.fill(f"PROMPT: {conversation[0]['content']}", width))
        label = f"[{prefix}]" if prefix else "[base model]"
        answer = out.outputs[0].text.strip().replace("\n", " ")
        print(textwrap.fill(f"{label:>18} {answer}", width, subsequent_indent=" " * 19))
    return 0
