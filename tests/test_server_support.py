"""Helpers shared by the server tests (no tests here): a tiny model with a byte-level BPE tokenizer and a chat
template, PEFT prefix adapters for it, and the real `prefix-serve serve` started as a subprocess.

Everything is built locally: the tokenizer is trained on a few sentences, the model is random, the adapters come
from `get_peft_model(...).save_pretrained`. The byte-level tokenizer makes a random model emit partial UTF-8
sequences, which exercises the server's incremental detokenization.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from tiny_models import make_prefix_adapter, tiny_config  # noqa: E402

API_KEY = "test-key-123"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]  # ids 0..5; bos 1, eos 2
VOCAB_SIZE = 320
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CORPUS = ["the quick brown fox jumps over the lazy dog", "prefix tuning trains a few virtual tokens per layer",
          "serve thousands of tasks on one frozen model", "café crème brûlée, naïve façade", "日本語のテキスト 🙂",
          "SELECT name FROM users WHERE id = 1;", "ahoy matey, the ship sails at dawn"]


def build_tokenizer(out_dir: Path):
    """A byte-level BPE tokenizer of VOCAB_SIZE tokens with a jinja chat template, saved into `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=SPECIAL_TOKENS[3:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_model(out_dir: Path, seed: int = 0, max_position_embeddings: int | None = None) -> Path:
    """A 2-layer random Llama whose vocabulary matches build_tokenizer's, with that tokenizer saved beside it.
    `max_position_embeddings` (the served context) replaces tiny_config's 256."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    if max_position_embeddings is not None:
        config.max_position_embeddings = max_position_embeddings
    config.vocab_size = VOCAB_SIZE
    config.bos_token_id, config.eos_token_id = 1, 2
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(out_dir))
    tokenizer = build_tokenizer(out_dir)
    assert len(tokenizer) == VOCAB_SIZE, len(tokenizer)
    return out_dir


def build_prefixes(model_dir: Path, out_dir: Path, count: int, first_seed: int = 0) -> dict[str, Path]:
    """`count` adapters with 3, 5, 7, ... virtual tokens (most leave a partly filled last block)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i in range(count):
        name = f"task{first_seed + i}"
        paths[name] = make_prefix_adapter(model_dir, out_dir / name, num_virtual_tokens=3 + 2 * i,
                                          seed=first_seed + i, scale=3.0)
    return paths


class ServerProcess:
    """`python -m engine.serving.server ...` (the `serve` subcommand) on a free port; `wait_ready()` sets `url`."""

    def __init__(self, args: list[str], startup_timeout: float = 180.0):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.serving.server", *args, "--port", "0"],
                                     cwd=str(REPO_ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self.url: str | None = None
        self.expected_exit_code = 0  # SIGTERM: a clean shutdown
        self.startup_timeout = startup_timeout
        self._ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def wait_ready(self) -> "ServerProcess":
        if not self._ready.wait(self.startup_timeout) or self.url is None:
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.lines))
        return self

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            match = re.search(r"ready on (http://\S+)", line)
            if match:
                self.url = match.group(1)
                self._ready.set()
        self._ready.set()

    def output(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def http(method: str, url: str, body: dict | None = None, key: str | None = API_KEY,
         raw: bytes | None = None) -> tuple[int, bytes]:
    """A plain HTTP call (urllib), for the routes and error cases the openai client does not cover."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`. Each thread lists the children it started (a Ray replica starts its engine
    process from a thread other than its main one), so all of its threads are read."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:  # the thread or the process ended meanwhile
            continue
    return children + [grandchild for child in children for grandchild in descendants(child)]


def cpu_ticks(pid: int) -> int:
    """User and system CPU time of a process and everything below it, in clock ticks (0 for one that is gone)."""
    total = 0
    for proc in [pid, *descendants(pid)]:
        try:
            fields = Path(f"/proc/{proc}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime and stime, fields 14 and 15 of stat
    return total
