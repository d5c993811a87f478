"""Output processing: sampled tokens -> sequence progress -> request outputs.

It appends tokens, decides when a sequence finishes (a stop token id, EOS, a stop string, `max_tokens` or the
context limit), cuts the text at a stop string, and builds `RequestOutput`s with their text.
"""

from __future__ import annotations

from typing import Callable

from engine.outputs import CompletionOutput, RequestOutput
from scheduler.request import Request, Sequence, SequenceStatus


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int], max_model_len: int,
                 finish: Callable[[Sequence, str], None]):
        self.tokenizer = tokenizer  # None: token ids only, no text and no stop strings
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self._finish = finish  # the scheduler's: releases the sequence's blocks at once

    def append_run(self, seq: Sequence, tokens: list[int]) -> tuple[int, bool]:
        """Append a decode run's tokens up to and including the first that stops the sequence; returns how many
        were kept and whether the sequence finished.

        A run never passes `max_tokens` or the context limit (the scheduler sees to it), so without stop strings
        only a stop token or EOS can end it early, and one `check_stop` on the last kept token decides."""
        params = seq.request.params
        if params.stop_strings and self.tokenizer is not None:  # text may match at any token: check each
            for kept, token in enumerate(tokens, start=1):
                seq.token_ids.append(token)
                if self.check_stop(seq):
                    return kept, True
            return len(tokens), False
        kept = len(tokens)
        stops = params.stop_token_id_set if params.ignore_eos else params.stop_token_id_set | self.eos_token_ids
        if stops:
            kept = next((i for i, token in enumerate(tokens, start=1) if token in stops), kept)
        seq.token_ids.extend(tokens[:kept])
        return kept, self.check_stop(seq)

    def check_stop(self, seq: Sequence) -> bool:
        """Finish the sequence if its newest token ends it; returns whether it did."""
        params = seq.request.params
        token = seq.token_ids[-1]
        reason, stop_reason = None, None
        if token in params.stop_token_id_set:
            reason, stop_reason = "stop", token
        elif not params.ignore_eos and token in self.eos_token_ids:
            reason = "stop"
        elif params.stop_strings and self.tokenizer is not None:
            reason, stop_reason = self._find_stop_string(seq)
        if reason is None:
            num_tokens = len(seq.token_ids)
            # the tokens this one was sampled after; a later step's, still in flight (async scheduling), do not count
            if (num_tokens - len(seq.request.prompt_token_ids) >= params.max_tokens
                    or seq.num_tokens - seq.num_pending >= self.max_model_len):
                reason = "length"
            else:
                return False
        seq.stop_reason = stop_reason
        self._finish(seq, reason)
        if not isinstance(stop_reason, str):
            seq.output_text = self.decode(seq)
        return True

    def _find_stop_string(self, seq: Sequence) -> tuple[str | None, str | None]:
        """Look for a stop string that the newest token completed; decode all of the output only when one may be
        there.

        Only a tail of the output is decoded, but it must reach back far enough: a stop string that ends in the
        newest token's text starts at most `longest` characters before that text. A token may decode to less
        than one character (byte-level BPE spends up to four on an emoji), so the tail is measured in characters,
        not tokens: it grows until the text before the newest token holds `longest` characters, plus three for
        a character cut at the tail's start (decoded as U+FFFD, one per byte)."""
        stops = seq.request.params.stop_strings
        longest = max(map(len, stops))
        output = seq.output_token_ids
        window = longest + 4
        while window < len(output) and len(self._text(output[-window:-1])) < longest + 3:
            window *= 2
        if not any(stop in self._text(output[-window:]) for stop in stops):
            return None, None
        text = self.decode(seq)
        hits = [(text.find(stop), stop) for stop in stops if stop in text]
        if not hits:  # the tail decoded differently without its left context
            return None, None
        cut, stop = min(hits)
        seq.output_text = text[:cut]
        return "stop", stop

    def _text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def decode(self, seq: Sequence) -> str:
        return "" if self.tokenizer is None else self._text(seq.output_token_ids)

    def make_output(self, request: Request, now: float, want_text: bool) -> RequestOutput:
        """The request's output now. Finished samples carry their final text; running ones their text so far when
        `want_text` (streaming), else none (decoding it would cost a full decode per step)."""
        completions = []
        for seq in sorted(request.sequences, key=lambda s: s.sample_index):
            text = seq.output_text if seq.status is SequenceStatus.FINISHED else (
                self.decode(seq) if want_text else "")
            completions.append(CompletionOutput(seq.sample_index, text, list(seq.output_token_ids),
                                                seq.finish_reason, seq.stop_reason))
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, completions,
                             request.finished, prefix=request.prefix_name,
                             metrics={"arrival_time": request.arrival_time,
                                      "first_token_time": request.first_token_time, "now": now})
