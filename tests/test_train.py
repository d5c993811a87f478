"""Tests for `prefix-serve train` / `eval` and the demo prefixes.

The default tests build a tiny random Llama with a character-level tokenizer locally (nothing downloaded) and train
a few steps on it. Tests that train or evaluate SmolLM2 are marked slow.
"""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import pytest
import torch

from engine.training.train import (Example, TrainingDataError, TrainOptions, completion_loss, load_examples,
                                   make_batch, prefix_from_text, train)

EOS, PAD = 1, 2
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def _char_tokenizer():
    """One token per printable character, with <eos> and <pad>: 99 ids, inside the tiny model's vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": EOS, "<pad>": PAD}
    for char in [c for c in string.printable if c not in "\t\r\x0b\x0c"]:
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>",
                                        unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, 2 KV heads, head dim 16) saved with a tokenizer."""
    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    config = tiny_config("llama")
    config.eos_token_id, config.pad_token_id, config.bos_token_id = EOS, PAD, None
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(out))
    _char_tokenizer().save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_dir))


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _pairs(count: int) -> list[dict]:
    """A learnable toy task: 'abc=' -> 'cba' (reverse)."""
    words = ["abc", "hello", "prefix", "tune", "kv", "cache", "model", "token", "serve", "batch", "llama", "peft"]
    return [{"prompt": f"{w}=", "completion": w[::-1]} for w in (words * math.ceil(count / len(words)))[:count]]


# --- data errors ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "completion": "b"}, {"prompt": "only a prompt"}], "line 2: missing field(s) ['completion']"),
    ([{"prompt": "a", "completion": "b"}, "", "{not json"], "line 3: not valid JSON"),
    ([["a", "b"]], "line 1: expected a JSON object"),
    ([{"prompt": 3, "completion": "b"}], 'line 1: "prompt" must be a string'),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "line 1: the last message must be the assistant's"),
    ([{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}], 'line 1: message 0 needs'),
    ([{"prompt": "a", "completion": "  "}], "line 1: the completion is empty"),
    ([{"prompt": "a", "completion": "b"}, {"messages": [{"role": "user", "content": "hi"},
                                                        {"role": "assistant", "content": ""}]}],
     "line 2: the completion is empty"),
    ([], "has no examples"),
    (["", "   "], "has no examples"),
])
def test_bad_training_data_raises_an_error_naming_the_line(tmp_path, tokenizer, rows, message):
    data = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(TrainingDataError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        load_examples(str(data), tokenizer, max_length=256)


def test_a_file_that_is_not_utf8_names_its_line(tmp_path, tokenizer):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(TrainingDataError, match="line 2: not UTF-8 text"):
        load_examples(str(data), tokenizer, max_length=256)
    data.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\n{"prompt": "\xff"}\n')
    with pytest.raises(TrainingDataError, match="line 2: not UTF-8 text .* at byte 50"):  # counted from the BOM
        load_examples(str(data), tokenizer, max_length=256)
    data.write_bytes(b'\xef\xbb\xbf{"prompt": "a\xe2\x80\xa8b", "completion": "c"}\r\n')  # BOM, U+2028, CRLF
    assert len(load_examples(str(data), tokenizer, max_length=256)) == 1
    data.write_bytes(b'{"prompt": "a", "completion": "b"}\r{"prompt": "c", "completion": "d"}\r')  # CR only
    assert [e.line for e in load_examples(str(data), tokenizer, max_length=256)] == [1, 2]


def test_missing_data_file_raises_training_data_error(tmp_path, tokenizer):
    with pytest.raises(TrainingDataError, match="does not exist"):
        load_examples(str(tmp_path / "nope.jsonl"), tokenizer, max_length=256)


def test_example_longer_than_the_context_is_rejected_by_line(tmp_path, tiny_dir):
    data = _write_jsonl(tmp_path / "long.jsonl", _pairs(3) + [{"prompt": "x" * 250, "completion": "y"}])
    options = TrainOptions(data=str(data), out=str(tmp_path / "out"), model=str(tiny_dir), num_virtual_tokens=8,
                           steps=1)
    with pytest.raises(TrainingDataError, match=r"line 4: the example is 252 tokens long; with the 8 virtual "
                                                r"tokens that exceeds the context of 256"):
        train(options)
    assert not (tmp_path / "out").exists()


def test_train_command_prints_the_error_and_exits_2(tmp_path, tiny_dir, capsys):
    import argparse

    from engine.training import train as train_module

    parser = argparse.ArgumentParser()
    train_module.add_parser(parser.add_subparsers())
    data = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}])
    args = parser.parse_args(["train", "--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "o")])
    assert args.func(args) == 2
    assert "bad.jsonl, line 1: missing field(s) ['completion']" in capsys.readouterr().err


# --- tokenization and loss ------------------------------------------------------------------------------------------

def test_prompt_completion_example_appends_eos_to_the_completion(tmp_path, tokenizer):
    data = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab=", "completion": "ba"}])
    [example] = load_examples(str(data), tokenizer, max_length=256)
    assert tokenizer.decode(example.prompt_ids) == "ab="
    assert list(example.completion_ids) == tokenizer("ba").input_ids + [EOS]


def test_chat_example_learns_only_the_final_assistant_turn_through_its_end_token(tmp_path, tokenizer):
    messages = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    data = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    [example] = load_examples(str(data), tokenizer, max_length=256)
    assert tokenizer.decode(example.prompt_ids) == "<user>q1<eos><assistant>a1<eos><user>q2<eos><assistant>"
    assert list(example.completion_ids) == tokenizer("a2").input_ids + [EOS]


def test_left_padded_batch_loss_equals_each_examples_own_completion_loss(tiny_dir):
    """Left padding with explicit positions must not change any example's loss, with or without a prefix."""
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32),
                          PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    examples = [Example(1, (10, 11, 12, 13, 14, 15, 16), (20, 21, EOS)), Example(2, (30, 31), (40, 41, 42, 43, EOS))]
    with torch.no_grad():
        for model in (base, peft):
            total = completion_loss(model, make_batch(examples, PAD), reduction="sum")
            reference = 0.0
            for e in examples:  # unpadded, labels masked on the prompt: the standard HF loss, summed
                ids = torch.tensor([e.prompt_ids + e.completion_ids])
                labels = ids.clone()
                labels[0, :len(e.prompt_ids)] = -100
                reference += model(input_ids=ids, labels=labels).loss.item() * len(e.completion_ids)
            assert total.item() == pytest.approx(reference, rel=1e-5)


def test_prefix_initialized_from_text_acts_like_that_text_prepended(tiny_dir, tokenizer):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    peft = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6))
    peft.prompt_encoder["default"].load_prompt_embeddings(prefix_from_text(base, tokenizer, "abc", 6))
    text_ids = tuple(tokenizer("abcabc").input_ids)
    example = Example(1, tuple(tokenizer("hi=").input_ids), tuple(tokenizer("ih").input_ids))
    with torch.no_grad():
        with_prefix = completion_loss(peft, make_batch([example], PAD))
        prepended = completion_loss(base, make_batch([Example(1, text_ids + example.prompt_ids,
                                                              example.completion_ids)], PAD))
    assert with_prefix.item() == pytest.approx(prepended.item(), rel=1e-5)


# --- the round trip: train -> PEFT loads -> our engine serves the referee's greedy output ---------------------------

@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    data = _write_jsonl(root / "train.jsonl", _pairs(24))
    heldout = _write_jsonl(root / "eval.jsonl", _pairs(8))
    options = TrainOptions(data=str(data), eval_data=str(heldout), out=str(root / "adapter"), model=str(tiny_dir),
                           num_virtual_tokens=5, steps=6, batch_size=4, lr=5e-2)
    return options, train(options)


def test_training_uses_the_prefix_and_lowers_the_loss(trained):
    options, result = trained
    assert result.trainable_params == 5 * 2 * 2 * 32  # P * layers * (key, value) * (kv heads * head dim)
    assert result.trainable_percent < 1.0
    assert result.eval_loss_before != pytest.approx(result.eval_loss_base, rel=1e-3)  # the prefix is in play
    assert result.eval_loss_after < result.eval_loss_before


def test_training_saves_a_standard_safetensors_peft_adapter(trained):
    from safetensors.torch import load_file

    options, _ = trained
    out = Path(options.out)
    assert (out / "adapter_model.safetensors").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_virtual_tokens"], config["num_layers"], config["token_dim"],
            config["num_attention_heads"]) == ("PREFIX_TUNING", 5, 2, 32, 2)
    assert list(load_file(str(out / "adapter_model.safetensors"))) == ["prompt_embeddings"]


def test_trained_adapter_loads_in_peft_with_the_saved_prefix(trained, tiny_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    options, _ = trained
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, options.out)
    saved = load_file(str(Path(options.out) / "adapter_model.safetensors"))["prompt_embeddings"]
    assert torch.equal(model.prompt_encoder["default"].embedding.weight.detach(), saved)


def test_engine_serves_the_trained_prefix_with_the_peft_forward_referees_greedy_tokens(trained, tiny_dir, tokenizer):
    from tiny_models import peft_forward_greedy

    from engine import LLM, SamplingParams

    options, _ = trained
    prompts = [tokenizer(text).input_ids for text in ("abc=", "serve=", "kv cache=")]
    llm = LLM(model=str(tiny_dir), device="cpu", dtype="float32")
    llm.load_prefix("reverse", options.out)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, prefix="reverse", use_tqdm=False)
    referee = [peft_forward_greedy(tiny_dir, Path(options.out), prompt, 8) for prompt in prompts]
    assert [out.outputs[0].token_ids for out in outs] == referee
    assert referee != [peft_forward_greedy(tiny_dir, None, prompt, 8) for prompt in prompts]  # the prefix matters


def test_prefix_projection_saves_the_projected_prefix_that_peft_and_the_engine_load(tmp_path, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from engine.model_spec import ModelSpec
    from engine.prefix_registry import check_adapter_tensor, read_adapter_config

    data = _write_jsonl(tmp_path / "train.jsonl", _pairs(4))
    options = TrainOptions(data=str(data), out=str(tmp_path / "proj"), model=str(tiny_dir), num_virtual_tokens=4,
                           prefix_projection=True, encoder_hidden_size=16, steps=1, batch_size=4)
    result = train(options)
    assert result.trainable_params == 4 * 32 + (32 * 16 + 16) + (16 * 128 + 128)  # embedding + the MLP
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    PeftModel.from_pretrained(base, options.out)
    spec = ModelSpec.from_config(base.config)
    check_adapter_tensor(options.out, spec, read_adapter_config(options.out, spec))  # shape [4, 2 * 2 * 32]


def test_a_one_step_run_changes_the_prefix(tmp_path, tiny_dir):
    """Warm-up starts from a learning rate of 0; a run too short for a 5% warm-up must not spend its steps
    there (found when `--steps 1` left the untrained and trained losses equal)."""
    data = _write_jsonl(tmp_path / "train.jsonl", _pairs(4))
    options = TrainOptions(data=str(data), eval_data=str(data), out=str(tmp_path / "one"), model=str(tiny_dir),
                           num_virtual_tokens=4, steps=1, batch_size=4)
    result = train(options)
    assert result.eval_loss_after != result.eval_loss_before


def test_saving_an_adapter_for_a_hub_named_base_makes_no_network_attempt(tmp_path, tiny_dir, monkeypatch):
    """An adapter trained on the embedded model records the hub name HuggingFaceTB/SmolLM2-135M-Instruct as its base.
    PEFT's save_pretrained then asked the hub whether that model's vocabulary was resized ("Unable to fetch remote
    file" offline; a hang behind a firewall that drops packets). The save must not try."""
    import socket
    import warnings

    import peft.utils.other

    from engine import model_loader
    from engine.training.train import EMBEDDED_BASE_NAME

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the test suite's offline mode hid the lookup
    monkeypatch.setattr(peft.utils.other, "file_exists", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(model_loader, "resolve_model_path", lambda model: str(tiny_dir))  # model=None: the tiny one
    data = _write_jsonl(tmp_path / "train.jsonl", _pairs(4))
    options = TrainOptions(data=str(data), out=str(tmp_path / "adapter"), model=None, num_virtual_tokens=4, steps=1,
                           batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(options)
    assert attempts == []
    assert not [w for w in caught if "Unable to fetch remote file" in str(w.message)]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == EMBEDDED_BASE_NAME
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


# --- evaluation metrics ---------------------------------------------------------------------------------------------

def test_score_counts_json_format_and_exact_match():
    from engine.training.evaluate import score

    reference = '{"name": "Ann Lee", "age": 30}'
    outputs = ['{"name": "Ann Lee", "age": 30}', 'JSON: ```json\n{"name": "Ann Lee", "age": 31}\n```',
               '{"age": 30, "name": "Ann Lee"}', '{"name": "Ann Lee", "age": 30, "city": "Rome"}', "Ann Lee is 30."]
    metrics = score(outputs, [reference] * 5, json_keys=("name", "age"))
    assert metrics["format_rate"] == 60.0  # the first three: text around the object and key order do not matter
    assert metrics["exact_match"] == 40.0
    assert 0 < metrics["rougeL"] < 100


def test_score_exact_match_ignores_whitespace_and_rouge_is_percent():
    from engine.training.evaluate import score

    metrics = score(["Arr!  Ahoy matey!", "Hello friend"], ["Arr! Ahoy matey!", "Arr! Ahoy matey!"])
    assert metrics["exact_match"] == 50.0
    assert metrics["rougeL"] == pytest.approx(50.0)


def test_eval_items_put_the_instruction_before_the_last_user_turn(tmp_path, tokenizer):
    from engine.training.evaluate import load_eval_items

    data = _write_jsonl(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": "x=1"},
                                                             {"role": "assistant", "content": " 1 "}]}])
    [item] = load_eval_items(str(data), tokenizer, instruction="Do it: ")
    assert tokenizer.decode(item.prompt_ids) == "<user>x=1<eos><assistant>"
    assert tokenizer.decode(item.instruction_ids) == "<user>Do it: x=1<eos><assistant>"
    assert item.reference == "1"
    empty = _write_jsonl(tmp_path / "e.jsonl", [{"messages": [{"role": "user", "content": "x=1"},
                                                              {"role": "assistant", "content": ""}]}])
    assert load_eval_items(str(empty), tokenizer)[0].reference == ""  # an error for training only


def test_eval_without_rouge_score_fails_before_generating_anything(tmp_path, monkeypatch, capsys):
    """A plain install once ran every reply for minutes, then failed on `import rouge_score`."""
    import argparse
    import sys

    from engine.training import evaluate

    def generate_nothing(*args, **kwargs):
        raise AssertionError("the evaluation started before its metric's package was checked")

    monkeypatch.setattr(evaluate, "evaluate_task", generate_nothing)
    monkeypatch.setattr(evaluate, "evaluate_demo", generate_nothing)
    monkeypatch.setitem(sys.modules, "rouge_score", None)  # `import rouge_score` now raises ImportError
    parser = argparse.ArgumentParser()
    evaluate.add_parser(parser.add_subparsers())
    for argv in (["eval", "--data", "t.jsonl", "--prefix", "p"], ["eval", "--demo"]):
        args = parser.parse_args(argv)
        assert args.func(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("prefix-serve eval: error: ROUGE-L needs the rouge-score package")
        assert err.rstrip().endswith("pip install rouge-score")


def test_rouge_score_is_a_dependency_of_a_plain_install():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert any(dep.startswith("rouge-score") for dep in project["dependencies"])


# --- demo datasets and committed prefixes ---------------------------------------------------------------------------

def test_demo_datasets_are_regenerated_exactly_and_test_inputs_are_held_out():
    from engine.training.demo_data import TASKS, generate

    for task in TASKS.values():
        train_rows, test_rows = generate(task)
        assert (len(train_rows), len(test_rows)) == (task.num_train, task.num_test)
        for name, rows in (("train.jsonl", train_rows), ("test.jsonl", test_rows)):
            committed = [json.loads(line) for line in (task.directory / name).read_text().splitlines()]
            assert committed == rows, f"{task.name}/{name} differs from `python -m engine.training.demo_data`"
        train_inputs = {r["messages"][0]["content"] for r in train_rows}
        assert not train_inputs & {r["messages"][0]["content"] for r in test_rows}


def test_pirate_rewrite_rules():
    from engine.training.demo_data import to_pirate

    assert to_pirate("Hello, my friend! I am looking for the treasure today.") == \
        "Arr! Ahoy, me matey! I be lookin' fer th' treasure today!"


def test_committed_demo_prefixes_fit_the_embedded_model():
    from engine.training.demo_data import TASKS
    from engine.model_spec import ModelSpec
    from engine.prefix_registry import check_adapter_tensor, read_adapter_config

    spec = ModelSpec("llama", 30, 9, 3, 64, 49152, 8192, (2,))  # SmolLM2-135M-Instruct
    trained = [task for task in TASKS.values() if (task.directory / "adapter_config.json").is_file()]
    assert trained, "no demo prefix adapter is committed"
    for task in trained:
        check_adapter_tensor(str(task.directory), spec, read_adapter_config(str(task.directory), spec))


# --- slow: the real model -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_prefix_training_on_smollm2_reaches_the_prefix(tmp_path):
    """Two steps on the embedded model: the prefix changes the loss and gradients reach only the prefix."""
    from engine.training.demo_data import TASKS

    task = TASKS["e2e_restaurant"]
    rows = (task.directory / "train.jsonl").read_text().splitlines()[:8]
    data = _write_jsonl(tmp_path / "small.jsonl", rows)
    result = train(TrainOptions(data=str(data), eval_data=str(data), out=str(tmp_path / "p"), num_virtual_tokens=8,
                                steps=2, batch_size=4))
    assert result.eval_loss_before != pytest.approx(result.eval_loss_base, rel=1e-3)
    assert result.eval_loss_after < result.eval_loss_before
    assert result.trainable_params == 8 * 30 * 2 * 192


@pytest.mark.slow
def test_each_demo_prefix_beats_the_base_model_on_its_metric():
    from engine.training.demo_data import TASKS
    from engine.training.evaluate import evaluate_task

    for task in TASKS.values():
        results = evaluate_task(task.name, str(task.directory / "test.jsonl"), str(task.directory),
                                instruction=task.instruction, json_keys=task.json_keys, limit=20)
        score = {r.system: r.metrics[task.metric] for r in results}
        prefix = next(v for k, v in score.items() if k.startswith("prefix"))
        assert prefix > score["base model, instruction prompt"], (task.name, score)
        assert prefix > score["base model, bare input"], (task.name, score)


@pytest.mark.slow
def test_demo_prefixes_served_by_the_engine_match_the_peft_forward_referee():
    from tiny_models import peft_forward_greedy

    from engine import LLM, SamplingParams
    from engine.training.demo_data import TASKS
    from engine.training.evaluate import load_eval_items
    from engine.model_loader import resolve_model_path

    llm = LLM(model=None, device="cpu", dtype="float32")
    model_dir = Path(resolve_model_path(None))
    for task in TASKS.values():
        llm.load_prefix(task.name, str(task.directory))
        for item in load_eval_items(str(task.directory / "test.jsonl"), llm.tokenizer, limit=2):
            out = llm.generate([{"prompt_token_ids": item.prompt_ids}], SamplingParams(max_tokens=40, temperature=0.0),
                               prefix=task.name, use_tqdm=False)[0].outputs[0]
            eos = llm.tokenizer.eos_token_id
            assert out.token_ids == peft_forward_greedy(model_dir, task.directory, item.prompt_ids, 40, eos=eos)
