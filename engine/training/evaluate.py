"""`prefix-serve eval`: score a trained prefix on a held-out JSONL split, generating greedily through our engine.

Compared on the same examples:
- the base model given a plain instruction prompt (the instruction, then the input), and given the bare input;
- the base model with the trained prefix and the bare input, served by prefix-serve's `LLM`;
- optionally a fully fine-tuned copy of the model (`prefix-serve train --full-finetune`), given the bare input.

Metrics: ROUGE-L F1 (rouge-score), exact match, and for JSON tasks the format rate (the reply holds a JSON object
with exactly the expected keys). `--demo` evaluates the shipped demo prefixes and prints the table in
docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import PrefixServeError
from engine.peft_format import ADAPTER_CONFIG, prefix_tensor_shape


@dataclass(frozen=True)
class EvalItem:
    """One held-out example: the bare prompt, the instruction prompt (token ids) and the reference answer."""

    prompt_ids: list[int]
    instruction_ids: list[int]
    reference: str
    source: str  # the input as the user wrote it (the last user turn, or the prompt)


@dataclass
class SystemScore:
    task: str
    system: str
    trained_params: str
    metrics: dict[str, float]
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    seconds: float = 0.0


# --- data ---------------------------------------------------------------------------------------------------------

def _with_instruction(record: dict, instruction: str) -> dict:
    """The same record with `instruction` put in front of the (last) user input."""
    if "messages" in record:
        messages = [dict(m) for m in record["messages"][:-1]]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last_user]["content"] = instruction + messages[last_user]["content"]
        return {"messages": messages + [record["messages"][-1]]}
    return {"prompt": instruction + record["prompt"], "completion": record.get("completion", "")}


def load_eval_items(path: str, tokenizer, instruction: str = "", limit: int | None = None) -> list[EvalItem]:
    """Held-out examples, tokenized exactly as `prefix-serve train` tokenizes prompts."""
    from engine.training.train import encode_prompt, read_records, split_record

    items = []
    for line, record in read_records(path)[:limit]:
        where = f"{path}, line {line}"
        prompt, _, chat = split_record(record, where, tokenizer)
        instructed, _, _ = split_record(_with_instruction(record, instruction), where, tokenizer)
        if chat:
            reference = record["messages"][-1]["content"]
            source = [m["content"] for m in record["messages"] if m["role"] == "user"][-1]
        else:
            reference, source = record["completion"], record["prompt"]
        items.append(EvalItem(encode_prompt(prompt, chat, tokenizer), encode_prompt(instructed, chat, tokenizer),
                              reference.strip(), source))
    return items


# --- metrics ------------------------------------------------------------------------------------------------------

def parse_json_object(text: str) -> dict | None:
    """The first JSON object in a reply, or None. Text around it (a "JSON:" label, a ``` fence) is tolerated."""
    start = text.find("{")
    while start != -1:
        try:
            value, _ = json.JSONDecoder().raw_decode(text, start)
            if isinstance(value, dict):
                return value
        except ValueError:
            pass
        start = text.find("{", start + 1)
    return None


def score(outputs: list[str], references: list[str], json_keys: tuple[str, ...] = ()) -> dict[str, float]:
    """Mean metrics in percent: rougeL (F1), exact_match, and format_rate when `json_keys` are given."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(ref, out)["rougeL"].fmeasure for out, ref in zip(outputs, references)]
    if json_keys:
        parsed = [parse_json_object(out) for out in outputs]
        formatted = [p is not None and set(p) == set(json_keys) for p in parsed]
        exact = [p is not None and p == json.loads(ref) for p, ref in zip(parsed, references)]
    else:
        exact = [" ".join(out.split()) == " ".join(ref.split()) for out, ref in zip(outputs, references)]
    metrics = {"rougeL": _percent(rouge), "exact_match": _percent(exact)}
    if json_keys:
        metrics["format_rate"] = _percent(formatted)
    return metrics


def _percent(values) -> float:
    values = [float(v) for v in values]
    return 100.0 * sum(values) / max(1, len(values))


# --- generation ---------------------------------------------------------------------------------------------------

def generate_texts(llm, prompts: list[list[int]], prefix: str | None, max_tokens: int) -> list[str]:
    from engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, prefix=prefix, use_tqdm=False)
    return [out.outputs[0].text.strip() for out in outs]


def adapter_share(adapter_dir: str, total_params: int) -> str:
    """"184,320 (0.137%)": the parameters training updated, from training_log.json, else the saved prefix size."""
    log = Path(adapter_dir) / "training_log.json"
    if log.is_file():
        trainable = json.loads(log.read_text())["result"]["trainable_params"]
    else:
        config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
        kv_heads = config["num_attention_heads"]  # PEFT's name for the KV heads
        trainable = math.prod(prefix_tensor_shape(config["num_virtual_tokens"], config["num_layers"], kv_heads,
                                                  config["token_dim"] // kv_heads))
    return f"{trainable:,} ({100.0 * trainable / total_params:.3f}%)"


def _run_system(llm, task: str, system: str, params: str, items: list[EvalItem], instructed: bool,
                prefix: str | None, max_tokens: int, json_keys: tuple[str, ...]) -> SystemScore:
    started = time.perf_counter()
    prompts = [item.instruction_ids if instructed else item.prompt_ids for item in items]
    outputs = generate_texts(llm, prompts, prefix, max_tokens)
    metrics = score(outputs, [item.reference for item in items], json_keys)
    result = SystemScore(task, system, params, metrics, [item.source for item in items], outputs,
                         time.perf_counter() - started)
    print(f"  {system}: " + ", ".join(f"{k} {v:.1f}" for k, v in result.metrics.items())
          + f" ({result.seconds:.0f} s)", flush=True)
    return result


def evaluate_task(task: str, data: str, prefix_dir: str, model: str | None = None, instruction: str = "",
                  full_model: str | None = None, json_keys: tuple[str, ...] = (), limit: int | None = None,
                  max_tokens: int = 48, device: str = "cpu") -> list[SystemScore]:
    """Score the base model (instruction prompt and bare prompt), the prefix and optionally a full fine-tune."""
    from engine import LLM

    llm = LLM(model=model, device=device, dtype="float32")
    total = _count_params(model)
    items = load_eval_items(data, llm.tokenizer, instruction, limit)
    print(f"{task}: {len(items)} held-out examples from {data}", flush=True)
    rest = (max_tokens, json_keys)
    results = []
    if instruction:
        results.append(_run_system(llm, task, "base model, instruction prompt", "0", items, True, None, *rest))
    results.append(_run_system(llm, task, "base model, bare input", "0", items, False, None, *rest))
    llm.load_prefix(task, prefix_dir)
    results.append(_run_system(llm, task, "prefix (ours, served by prefix-serve)", adapter_share(prefix_dir, total),
                               items, False, task, *rest))
    llm.shutdown()
    if full_model:
        full = LLM(model=full_model, device=device, dtype="float32")
        results.append(_run_system(full, task, "full fine-tune", f"{total:,} (100%)", items, False, None, *rest))
        full.shutdown()
    return results


def _count_params(model: str | None) -> int:
    """Parameter count of a model directory, from its safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    from engine.model_loader import resolve_model_path

    count = 0
    for file in Path(resolve_model_path(model)).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                size = 1
                for dim in shape:
                    size *= dim
                count += size
    return count


# --- reporting ----------------------------------------------------------------------------------------------------

def markdown_table(results: list[SystemScore]) -> str:
    def cell(metrics: dict, key: str) -> str:
        return f"{metrics[key]:.1f}" if key in metrics else "–"

    lines = ["| task | system | trained parameters | format rate % | exact match % | ROUGE-L |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.task} | {r.system} | {r.trained_params} | {cell(r.metrics, 'format_rate')} | "
                     f"{cell(r.metrics, 'exact_match')} | {cell(r.metrics, 'rougeL')} |")
    return "\n".join(lines)


def markdown_examples(results: list[SystemScore], count: int = 2) -> str:
    """The first `count` inputs of each task with every system's reply, for the docs."""
    lines = []
    for task in dict.fromkeys(r.task for r in results):
        rows = [r for r in results if r.task == task]
        for index in range(min(count, len(rows[0].inputs))):
            lines += [f"**{task}**, input: `{rows[0].inputs[index]}`", "", "| system | reply |", "|---|---|"]
            lines += [f"| {r.system} | {_cell(r.outputs[index])} |" for r in rows]
            lines.append("")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ⏎ ")


def evaluate_demo(tasks: list[str], full_models: dict[str, str], limit: int | None, max_tokens: int,
                  device: str) -> list[SystemScore]:
    from engine.training.demo_data import TASKS, display_path

    results = []
    for name in tasks:
        task = TASKS[name]
        results += evaluate_task(name, display_path(task.directory / "test.jsonl"), display_path(task.directory),
                                 instruction=task.instruction, full_model=full_models.get(name),
                                 json_keys=task.json_keys, limit=limit, max_tokens=max_tokens, device=device)
    return results


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="score a prefix on held-out data against the base model (and a full fine-tune)",
        description="Generate greedily through prefix-serve for held-out JSONL examples (the training format) "
                    "and report ROUGE-L, exact match and, for JSON tasks, the format rate.")
    parser.add_argument("--data", help="held-out JSONL file (same format as training data)")
    parser.add_argument("--prefix", help="PEFT prefix adapter directory to evaluate")
    parser.add_argument("--model", default=None, help="base model directory (default: the embedded model)")
    parser.add_argument("--instruction", default="",
                        help="text put before each input for the base model's instruction-prompt baseline")
    parser.add_argument("--json-keys", default="", help="comma-separated keys a reply's JSON object must have")
    parser.add_argument("--full-model", action="append", default=[],
                        help="fully fine-tuned model directory to compare (with --demo: TASK=DIR)")
    parser.add_argument("--demo", action="store_true", help="evaluate the shipped demo prefixes")
    parser.add_argument("--tasks", default=None, help="with --demo: comma-separated subset of the demo tasks")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    parser.add_argument("--max-tokens", type=int, default=48, help="generation limit per reply (default 48)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=None, help="also write scores and outputs as JSON to this file")
    parser.set_defaults(func=run)


def check_metric_dependencies() -> None:
    """Fail before any reply is generated, not after minutes of it, when the ROUGE package is missing (it is a
    dependency of prefix-serve, but an install may predate that or have skipped dependencies)."""
    try:
        from rouge_score import rouge_scorer  # noqa: F401 - with its own imports (nltk)
    except ImportError as exc:
        raise PrefixServeError(f"ROUGE-L needs the rouge-score package and its dependencies ({exc}): "
                               "pip install rouge-score") from None


def run(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        check_metric_dependencies()
        if args.demo:
            from engine.training.demo_data import TASKS

            tasks = args.tasks.split(",") if args.tasks else list(TASKS)
            unknown = [t for t in tasks if t not in TASKS]
            if unknown:
                raise PrefixServeError(f"Unknown demo task(s) {unknown}; choose from {list(TASKS)}.")
            bad = [item for item in args.full_model if "=" not in item]
            if bad:
                raise PrefixServeError(f"With --demo, --full-model takes TASK=DIR (one per task), got {bad}.")
            full = dict(item.split("=", 1) for item in args.full_model)
            results = evaluate_demo(tasks, full, args.limit, args.max_tokens, args.device)
        else:
            if not args.data or not args.prefix:
                raise PrefixServeError("Pass --data and --prefix (or --demo).")
            keys = tuple(k.strip() for k in args.json_keys.split(",") if k.strip())
            results = evaluate_task(Path(args.prefix).name, args.data, args.prefix, args.model, args.instruction,
                                    args.full_model[0] if args.full_model else None, keys, args.limit,
                                    args.max_tokens, args.device)
    except PrefixServeError as exc:
        print(f"prefix-serve eval: error: {exc}", file=sys.stderr)
        return 2
    print()
    print(markdown_table(results))
    print()
    print(markdown_examples(results))
    if args.output:
        Path(args.output).write_text(json.dumps([r.__dict__ for r in results], indent=2, ensure_ascii=False) + "\n")
    return 0
