"""Host sampling cost per step: our draw (the cumulative sum inverted at one uniform) against torch.multinomial.

`workers.sampler.sample` serves every sampled row that is not in a decode run (on a CPU: all of them, since
decode runs are off there). This times it on random logits for a batch of rows, with our `_draw` and with
`torch.multinomial` put in its place, in the same process, and prints both and the ratio. Only the draw differs
between the two; top-p's head search (the largest 1,024 probabilities first) is the same in both:

    python -m benchmarks.sampling [--rows 64] [--vocab 49152] [--repeat 5]

The "peaked" logits (randn x 4) stand for an LM's usual distribution, whose top-p head is small; the "flat" ones
(randn) make top-p sort the whole vocabulary.
"""

from __future__ import annotations

import argparse
import time

import torch

from workers import sampler


def _multinomial_draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def _best_seconds(logits: torch.Tensor, rows: list, repeat: int) -> float:
    sampler.sample(logits, rows)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        sampler.sample(logits, rows)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=49152, help="default: SmolLM2's vocabulary")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per setting; the best is reported")
    args = parser.parse_args()
    torch.manual_seed(0)
    flat = torch.randn(args.rows, args.vocab)
    cases = [("temperature 0.8", flat * 4, 1.0, -1), ("top-k 50", flat * 4, 1.0, 50),
             ("top-p 0.9, peaked", flat * 4, 0.9, -1), ("top-p 0.9, flat", flat, 0.9, -1)]
    ours = sampler._draw
    print(f"sample() for {args.rows} seeded rows, vocabulary {args.vocab}, {torch.get_num_threads()} threads; "
          f"best of {args.repeat}")
    print(f"{'case':<20}{'multinomial':>14}{'ours':>12}{'ratio':>9}")
    try:
        for name, logits, top_p, top_k in cases:
            rows = [sampler.SampleRow(0.8, top_p, top_k, 7, i, 3) for i in range(args.rows)]
            sampler._draw = _multinomial_draw
            base = _best_seconds(logits, rows, args.repeat)
            sampler._draw = ours
            mine = _best_seconds(logits, rows, args.repeat)
            print(f"{name:<20}{base * 1e3:>11.1f} ms{mine * 1e3:>9.1f} ms{base / mine:>8.2f}x")
    finally:
        sampler._draw = ours


if __name__ == "__main__":
    main()
