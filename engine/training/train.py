"""`prefix-serve train`: fit a PEFT prefix-tuning adapter on a frozen base model from JSONL examples.

Each line of the data is `{"prompt": ..., "completion": ...}` or `{"messages": [{"role", "content"}, ...]}` ending
in an assistant turn (rendered with the model's chat template). The loss covers the completion tokens only: the
completion plus EOS, or the final assistant turn through its end-of-turn token. The result is a standard PEFT
adapter directory (adapter_config.json + adapter_model.safetensors, never pickle) that both PEFT and prefix-serve
load. `--full-finetune` instead trains every weight and saves a model directory: the baseline that prefix tuning is
measured against, trained by the same loop on the same batches.
"""

from __future__ import annotations

import argparse
import codecs
import json
import math
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.errors import PrefixServeError
from engine.peft_format import kv_to_prefix

EMBEDDED_BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # recorded in adapters trained on the embedded default


class TrainingDataError(PrefixServeError, ValueError):
    """A training or evaluation JSONL file is missing, empty or has a malformed or too-long example."""


@dataclass(frozen=True)
class Example:
    """One tokenized example; `line` is its 1-based line number in the JSONL file."""

    line: int
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]


@dataclass(frozen=True)
class TrainOptions:
    data: str
    out: str
    model: str | None = None
    num_virtual_tokens: int = 16
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    epochs: float = 3.0
    steps: int | None = None
    lr: float | None = None  # None: 1e-2 for a prefix, 5e-5 for --full-finetune
    batch_size: int = 8
    eval_data: str | None = None
    max_length: int | None = None  # None: the model's context length
    seed: int = 0
    full_finetune: bool = False
    init_text: str | None = None  # start the prefix as this text's KV cache instead of PEFT's random init

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (5e-5 if self.full_finetune else 1e-2)


# --- data ---------------------------------------------------------------------------------------------------------

def read_records(path: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; names the line of any that is not a JSON object."""
    file = Path(path)
    if not file.is_file():
        raise TrainingDataError(f"Data file {path!r} does not exist.")
    data = file.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        at = exc.start + (3 if data.startswith(codecs.BOM_UTF8) else 0)  # utf-8-sig counts after its BOM
        line = data[:at].count(b"\n") + 1
        raise TrainingDataError(f"{path}, line {line}: not UTF-8 text ({exc.reason} at byte {at}); save the file "
                                "as UTF-8.") from None
    # Any line ending (a raw CR cannot occur inside a JSON string); not splitlines(), which also splits at
    # U+2028 and other characters that JSON strings may hold
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    records = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except ValueError as exc:
            raise TrainingDataError(f"{path}, line {number}: not valid JSON ({exc}).") from None
        if not isinstance(record, dict):
            raise TrainingDataError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}.")
        records.append((number, record))
    if not records:
        raise TrainingDataError(f"Data file {path!r} has no examples. Each line must be a JSON object with "
                                '"prompt" and "completion", or with "messages".')
    return records


def _check_messages(messages, where: str, need_answer: bool) -> None:
    if not isinstance(messages, list) or not messages:
        raise TrainingDataError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects.')
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise TrainingDataError(f'{where}: message {i} needs a string "role" and a string "content".')
    if need_answer and (messages[-1]["role"] != "assistant" or len(messages) < 2):
        raise TrainingDataError(f"{where}: the last message must be the assistant's answer, after at least one "
                                "other message.")


def _chat_template(tokenizer, messages: list[dict], where: str, add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise TrainingDataError(f'{where}: "messages" needs a model with a chat template; this one has none. '
                                'Use "prompt" and "completion" instead.')
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def split_record(record: dict, where: str, tokenizer, need_answer: bool = True) -> tuple[str, str | None, bool]:
    """(prompt text, completion text or None, whether the prompt is chat-rendered) for one JSONL record."""
    if "messages" in record:
        messages = record["messages"]
        _check_messages(messages, where, need_answer)
        if messages[-1]["role"] != "assistant":
            return _chat_template(tokenizer, messages, where, True), None, True
        prompt = _chat_template(tokenizer, messages[:-1], where, True)
        full = _chat_template(tokenizer, messages, where, False)
        if not full.startswith(prompt):
            raise TrainingDataError(f"{where}: the chat template renders the conversation so that it does not "
                                    "extend its prompt; use prompt/completion pairs for this model.")
        return prompt, full[len(prompt):].rstrip(), True  # nothing to learn after the end-of-turn token
    missing = [key for key in ("prompt", "completion") if key not in record]
    if "prompt" in missing or (need_answer and missing):
        raise TrainingDataError(f'{where}: missing field(s) {missing}. Each line needs "prompt" and "completion" '
                                '(strings), or "messages" (a chat ending in the assistant\'s answer).')
    for key in ("prompt", "completion"):
        if key in record and not isinstance(record[key], str):
            raise TrainingDataError(f'{where}: "{key}" must be a string, got {type(record[key]).__name__}.')
    return record["prompt"], record.get("completion"), False


def encode_prompt(prompt: str, chat: bool, tokenizer) -> list[int]:
    """Token ids of a prompt, exactly as training saw it (chat text already holds its special tokens)."""
    return tokenizer(prompt, add_special_tokens=not chat)["input_ids"]


def encode_record(record: dict, line: int, path: str, tokenizer) -> Example:
    where = f"{path}, line {line}"
    prompt, completion, chat = split_record(record, where, tokenizer)
    prompt_ids = encode_prompt(prompt, chat, tokenizer)
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if not chat and tokenizer.eos_token_id is not None:
        completion_ids.append(tokenizer.eos_token_id)  # learn to stop
    if not prompt_ids:
        raise TrainingDataError(f"{where}: the prompt is empty; the first completion token needs a prompt token "
                                "to be predicted from.")
    if not completion.strip() or (chat and not record["messages"][-1]["content"].strip()):
        raise TrainingDataError(f"{where}: the completion is empty.")
    return Example(line, tuple(prompt_ids), tuple(completion_ids))


def load_examples(path: str, tokenizer, max_length: int, num_virtual_tokens: int = 0) -> list[Example]:
    """Every example of a JSONL file, tokenized and checked to fit `max_length` together with the prefix."""
    examples = []
    for line, record in read_records(path):
        example = encode_record(record, line, path, tokenizer)
        length = len(example.prompt_ids) + len(example.completion_ids)
        if length + num_virtual_tokens > max_length:
            raise TrainingDataError(
                f"{path}, line {line}: the example is {length} tokens long; with the {num_virtual_tokens} virtual "
                f"tokens that exceeds the context of {max_length} tokens. Shorten it or raise --max-length.")
        examples.append(example)
    return examples


def make_batch(examples: list[Example], pad_id: int):
    """Left-padded tensors, so every completion ends at the last column and only the last K logits are needed.

    input_ids, attention_mask, position_ids: [B, T]; targets: [B, K], K = longest completion, -100 outside it.
    """
    import torch

    length = max(len(e.prompt_ids) + len(e.completion_ids) for e in examples)
    width = max(len(e.completion_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    targets = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, example in enumerate(examples):
        ids = example.prompt_ids + example.completion_ids
        input_ids[row, length - len(ids):] = torch.tensor(ids)
        attention_mask[row, length - len(ids):] = 1
        targets[row, width - len(example.completion_ids):] = torch.tensor(example.completion_ids)
    # Real tokens are numbered from 0; PEFT adds the P virtual tokens, as the engine's positions do.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "targets": targets}


def completion_loss(model, batch, reduction: str = "mean"):
    """Cross-entropy over the completion tokens only; `model` is a PeftModel or a plain causal LM."""
    import torch.nn.functional as F

    targets = batch["targets"]  # [B, K]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], logits_to_keep=targets.shape[1] + 1).logits
    logits = logits[:, :-1].float()  # [B, K, V]: column j predicts targets[:, j]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction=reduction)


def eval_loss(model, examples: list[Example], batch_size: int, pad_id: int) -> float:
    """Mean completion-token loss over `examples`."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = make_batch(examples[start:start + batch_size], pad_id)
            total += completion_loss(model, batch, reduction="sum").item()
            count += int((batch["targets"] != -100).sum())
    return total / count


def batches(examples: list[Example], batch_size: int, seed: int):
    """Endless shuffled passes over the examples, one batch at a time."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield [examples[i] for i in order[start:start + batch_size]]


# --- model --------------------------------------------------------------------------------------------------------

def build_prefix_model(base_model, tokenizer, options: TrainOptions, base_name: str):
    """Wrap a frozen base model in a fresh PEFT prefix (PrefixTuningConfig; PEFT freezes the base weights)."""
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=options.num_virtual_tokens,
                                prefix_projection=options.prefix_projection,
                                encoder_hidden_size=options.encoder_hidden_size)
    model = get_peft_model(base_model, config)
    model.peft_config["default"].base_model_name_or_path = base_name  # a hub name rather than a local cache path
    if options.init_text is not None:
        if options.prefix_projection:
            raise PrefixServeError("--init-text sets the prefix itself, so it cannot be combined with "
                                   "--prefix-projection (whose MLP computes the prefix).")
        initial = prefix_from_text(base_model, tokenizer, options.init_text, options.num_virtual_tokens)
        model.prompt_encoder["default"].load_prompt_embeddings(initial)
    return model


def prefix_from_text(base_model, tokenizer, text: str, num_virtual_tokens: int):
    """The KV cache of `text` (repeated or cut to P tokens) in PEFT's layout: [P, L*2*kv_heads*head_dim].

    Keys in the cache already carry rotary embeddings for positions 0..P-1, and a request's own positions start at
    P, so a prefix holding them acts exactly like the text typed before the prompt (the paper's "initialize with
    real words' activations").
    """
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PrefixServeError("--init-text must not be empty.")
    ids = (ids * math.ceil(num_virtual_tokens / len(ids)))[:num_virtual_tokens]
    with torch.no_grad():
        cache = base_model(input_ids=torch.tensor([ids]), use_cache=True).past_key_values
    # [L, 2, P, kv_heads, head_dim]: each layer's keys and values, as the engine's cache holds a prefix
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]).transpose(1, 2) for layer in cache.layers])
    return kv_to_prefix(kv)


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, all) parameter counts; for a PeftModel `all` includes the prefix, as PEFT reports it."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def total_steps(options: TrainOptions, num_examples: int) -> int:
    if options.steps is not None:
        return options.steps
    return max(1, math.ceil(options.epochs * math.ceil(num_examples / options.batch_size)))


@dataclass
class TrainResult:
    steps: int
    examples_seen: int
    trainable_params: int
    all_params: int
    final_train_loss: float
    seconds: float
    eval_loss_base: float | None = None
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.all_params


def _check_options(options: TrainOptions) -> None:
    if options.num_virtual_tokens < 1:
        raise PrefixServeError("--num-virtual-tokens must be at least 1.")
    if options.batch_size < 1 or (options.steps is not None and options.steps < 1) or options.epochs <= 0:
        raise PrefixServeError("--batch-size and --steps must be at least 1 and --epochs above 0.")
    if options.learning_rate <= 0:
        raise PrefixServeError("--lr must be positive.")


def train(options: TrainOptions) -> TrainResult:
    """Train per `options`, save the adapter (or, with full_finetune, the model) to `options.out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.model_loader import resolve_model_path
    from engine.model_spec import ModelSpec

    _check_options(options)
    model_dir = resolve_model_path(options.model)
    base_name = EMBEDDED_BASE_NAME if options.model is None else options.model
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(options.seed)
    base_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    spec = ModelSpec.from_config(base_model.config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    virtual = 0 if options.full_finetune else options.num_virtual_tokens
    max_length = min(options.max_length or spec.max_model_len, spec.max_model_len)
    train_set = load_examples(options.data, tokenizer, max_length, virtual)
    eval_set = load_examples(options.eval_data, tokenizer, max_length, virtual) if options.eval_data else []

    result_losses: dict[str, float] = {}
    if eval_set:
        result_losses["eval_loss_base"] = eval_loss(base_model, eval_set, options.batch_size, pad_id)
    model = base_model if options.full_finetune else build_prefix_model(base_model, tokenizer, options, base_name)
    model.train()
    trainable, everything = parameter_counts(model)
    what = "full fine-tune" if options.full_finetune else f"prefix of {options.num_virtual_tokens} virtual tokens"
    print(f"prefix-serve train: {what} on {spec.model_type} ({spec.num_layers} layers); "
          f"trainable params: {trainable:,} of {everything:,} ({100.0 * trainable / everything:.4f}%)", flush=True)
    if eval_set and not options.full_finetune:
        result_losses["eval_loss_before"] = eval_loss(model, eval_set, options.batch_size, pad_id)

    steps = total_steps(options, len(train_set))
    final_loss, seen, seconds = _optimize(model, train_set, options, steps, pad_id)
    model.eval()
    if eval_set:
        result_losses["eval_loss_after"] = eval_loss(model, eval_set, options.batch_size, pad_id)
    result = TrainResult(steps, seen, trainable, everything, final_loss, seconds, **result_losses)
    _save(model, tokenizer, options, result)
    _report(options, result)
    return result


def _optimize(model, examples: list[Example], options: TrainOptions, steps: int, pad_id: int):
    """AdamW with 5% warmup (none under 20 steps) and linear decay over `steps` batches; returns (smoothed loss,
    examples seen, seconds)."""
    import torch
    from tqdm import tqdm
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=options.learning_rate,
                                  weight_decay=0.0)
    # warm-up steps start from a learning rate of 0, so a run under 20 steps has none (one would waste its first)
    schedule = get_linear_schedule_with_warmup(optimizer, steps // 20, steps)
    stream = batches(examples, options.batch_size, options.seed)
    smoothed, seen, started = None, 0, time.perf_counter()
    with tqdm(total=steps, desc="train", unit="step", dynamic_ncols=True) as bar:
        for _ in range(steps):
            group = next(stream)
            loss = completion_loss(model, make_batch(group, pad_id))
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            seen += len(group)
            smoothed = loss.item() if smoothed is None else 0.9 * smoothed + 0.1 * loss.item()
            bar.set_postfix(loss=f"{smoothed:.4f}")
            bar.update(1)
    seconds = time.perf_counter() - started
    return smoothed, seen, seconds


def _save(model, tokenizer, options: TrainOptions, result: TrainResult) -> None:
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    if options.full_finetune:
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
    else:
        # PEFT's default ("auto") asks the model hub whether the base model's vocabulary was resized, which hangs
        # behind a firewall that drops packets; a prefix never changes the embeddings, so there is nothing to ask
        model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    record = {"options": asdict(options), "result": asdict(result) | {"trainable_percent": result.trainable_percent}}
    (out / "training_log.json").write_text(json.dumps(record, indent=2) + "\n")


def _report(options: TrainOptions, result: TrainResult) -> None:
    print(f"trained {result.steps} steps ({result.examples_seen} examples) in {result.seconds:.0f} s; "
          f"final train loss {result.final_train_loss:.4f}")
    if result.eval_loss_after is not None:
        parts = [f"base model {result.eval_loss_base:.4f}"]
        if result.eval_loss_before is not None:
            parts.append(f"untrained prefix {result.eval_loss_before:.4f}")
        parts.append(f"trained {result.eval_loss_after:.4f}")
        print("eval loss (completion tokens): " + ", ".join(parts))
    kind = "model" if options.full_finetune else "adapter"
    print(f"saved the {kind} to {options.out}")


# --- command line -------------------------------------------------------------------------------------------------

def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a PEFT prefix-tuning adapter on JSONL data",
        description="Train a PEFT prefix (PrefixTuningConfig) on a frozen base model. Data: JSONL lines of "
                    '{"prompt", "completion"} or {"messages": [...]} ending in the assistant\'s answer; the loss '
                    "covers the completion only. Saves adapter_config.json + adapter_model.safetensors.")
    parser.add_argument("--model", default=None, help="Hugging Face model directory (default: the embedded "
                                                      "SmolLM2-135M-Instruct)")
    parser.add_argument("--data", required=True, help="training JSONL file")
    parser.add_argument("--out", required=True, help="directory to save the adapter into")
    parser.add_argument("--num-virtual-tokens", type=int, default=16, help="prefix length P (default 16)")
    parser.add_argument("--prefix-projection", action="store_true",
                        help="train through PEFT's two-layer MLP reparametrization (the saved tensor is its output)")
    parser.add_argument("--encoder-hidden-size", type=int, default=None,
                        help="hidden size of that MLP (default: PEFT's, the model's KV width)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=3.0, help="passes over the data (default 3)")
    length.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--lr", type=float, default=None,
                        help="AdamW peak learning rate, linear decay (default 1e-2; 5e-5 with --full-finetune)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-data", default=None, help="JSONL file to report completion loss on")
    parser.add_argument("--max-length", type=int, default=None,
                        help="longest example allowed, in tokens, counting the prefix (default: model context)")
    parser.add_argument("--init-text", default=None,
                        help="start the prefix as the KV cache of this text (repeated or cut to P tokens), e.g. the "
                             "task's instruction, instead of PEFT's random initialization")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-finetune", action="store_true",
                        help="baseline: train all weights instead of a prefix and save a model directory")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    options = TrainOptions(data=args.data, out=args.out, model=args.model, num_virtual_tokens=args.num_virtual_tokens,
                           prefix_projection=args.prefix_projection, encoder_hidden_size=args.encoder_hidden_size,
                           epochs=args.epochs, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                           eval_data=args.eval_data, max_length=args.max_length, seed=args.seed,
                           full_finetune=args.full_finetune, init_text=args.init_text)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' cache-API renames, not the user's
    try:
        train(options)
    except PrefixServeError as exc:
        print(f"prefix-serve train: error: {exc}", file=sys.stderr)
        return 2
    return 0
