"""Output processing: stop strings, stop tokens and lengths, checked on the engine's sequences directly."""

from __future__ import annotations

from engine import SamplingParams
from engine.output_processor import OutputProcessor
from scheduler.request import Request, Sequence, SequenceStatus


class ByteTokenizer:
    """One token per UTF-8 byte, as byte-level BPE spends on characters it has no merge for: an emoji is four
    tokens, a CJK character three. Decoding a cut character gives U+FFFD, as Hugging Face tokenizers do."""

    eos_token_id = None

    @staticmethod
    def encode(text: str) -> list[int]:
        return list(text.encode())

    @staticmethod
    def decode(token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(token_ids).decode(errors="replace")


def _sequence(params: SamplingParams, prompt: list[int]) -> Sequence:
    request = Request("r", None, prompt, params, None, 0)
    seq = Sequence(0, request, list(prompt), status=SequenceStatus.RUNNING)
    request.sequences.append(seq)
    return seq


def _generate(stop: str, text: str) -> tuple[Sequence, int]:
    """Feed `text` token by token (one per byte) until a stop; returns the sequence and the tokens fed."""
    finished = []
    processor = OutputProcessor(ByteTokenizer(), set(), 10_000, lambda seq, reason: finished.append(reason))
    seq = _sequence(SamplingParams(max_tokens=1000, stop=[stop]), [65])
    for fed, token in enumerate(ByteTokenizer.encode(text), start=1):
        seq.token_ids.append(token)
        if processor.check_stop(seq):
            return seq, fed
    return seq, len(text.encode())


def test_a_stop_string_of_multi_token_characters_is_found_where_it_completes():
    stop = "🙂🙃🙂"  # 3 characters, 12 tokens: a window of len(stop) + 4 = 7 tokens cannot hold it
    seq, fed = _generate(stop, "hello " + stop + " and more")
    assert (seq.stop_reason, seq.output_text) == (stop, "hello ")
    assert fed == len(("hello " + stop).encode())  # at the token that completes it, not later


def test_a_cjk_stop_string_is_found_after_long_output():
    stop = "結束了"
    text = "前" * 50 + stop + "後"
    seq, fed = _generate(stop, text)
    assert (seq.stop_reason, seq.output_text) == (stop, "前" * 50)
    assert fed == len(("前" * 50 + stop).encode())


def test_text_that_only_looks_like_a_stop_string_when_cut_does_not_stop():
    seq, _ = _generate("🙂🙂", "🙂🙃🙂x")  # shares bytes with the stop but never holds it whole
    assert seq.stop_reason is None


def test_a_decode_run_keeps_tokens_up_to_the_first_stop_token():
    processor = OutputProcessor(None, {9}, 10_000, lambda seq, reason: None)
    seq = _sequence(SamplingParams(max_tokens=100, stop_token_ids=[5]), [1])
    kept, stopped = processor.append_run(seq, [3, 4, 5, 6])
    assert (kept, stopped, seq.output_token_ids, seq.stop_reason) == (3, True, [3, 4, 5], 5)
    seq = _sequence(SamplingParams(max_tokens=100), [1])
    assert processor.append_run(seq, [3, 9, 6]) == (2, True)  # EOS
    seq = _sequence(SamplingParams(max_tokens=100, ignore_eos=True), [1])
    assert processor.append_run(seq, [3, 9, 6]) == (3, False)
