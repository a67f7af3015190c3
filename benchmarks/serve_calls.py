"""The serving engine's compiled decode call, alone: what two of its choices are worth.

    python -m benchmarks.serve_calls [--rows 1 2 4 8 16] [--held 300] [--steps 8] [--quick]

The model is benchmarks/serve.py's (Llama-shaped, 4 layers x 256, 4/2 heads of 64, vocabulary
8192, float32, greedy), in an engine of 16 slots with pages of 16 tokens. Every row holds
``held`` tokens in pages of its own (in order), and one call runs ``steps`` decode steps over
``rows`` rows (``ModelRunner.steps``' compiled program, ``runner.forward_steps``):

1. **Split or not.** XLA's CPU compiler splits some fused loops over its threads; the engine
   compiles calls of at most ``UNSPLIT_MAX_TOKENS`` tokens without that split
   (``jaxattn/serve/runner.py``). Both programs for each number of rows: ms per call, queued
   back to back, median of 5 blocks of 10 calls; and whether the two sample the same tokens.
2. **Queued or read.** The engine queues its next call of several steps before it reads the
   last one's tokens. Its calls as it makes them (``ModelRunner.steps``, then
   ``StepsInFlight.read``: the tokens and the count of steps run), each queued before the last
   is read, against each read before the next is made.

Prints a table and writes benchmarks/results/serve-calls-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from types import SimpleNamespace

import numpy as np

from benchmarks.serve import RESULTS, make_models
from benchmarks.timing import cpu_model, device_kind, write_results
from jaxattn.lm.generate import Stopping
from jaxattn.lm.sampling import Sampling
from jaxattn.serve import Engine
from jaxattn.serve.runner import UNSPLIT_MAX_TOKENS


def held_rows(runner, rows: int) -> list:
    """``rows`` sequences for ``ModelRunner.arrays``: row r's table its own pages in order,
    greedy, one new token each."""
    N = runner.pages_per_sequence
    return [(SimpleNamespace(pages=list(1 + r * N + np.arange(N)), seed=0, generated=[], sampling=Sampling()), [1])
            for r in range(rows)]


def time_blocks(run, *, blocks: int, calls: int) -> float:
    """Seconds per call: the median over ``blocks`` of ``run(calls)`` divided by ``calls``."""
    run(calls)  # compile and warm up
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        run(calls)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def measure_rows(runner, rows: int, *, held: int, steps: int, blocks: int, calls: int, say) -> dict:
    sequences = held_rows(runner, rows)
    options = dict(count=steps, stopping=Stopping(), lengths_of=lambda sequence: held)
    written, sampling = runner.arrays(sequences, 1, lengths_of=options["lengths_of"])
    arrays = (*written, *sampling, np.int32(steps), options["stopping"], np.zeros(rows, bool))  # nothing ended
    sampled = {}

    def program(split: bool):  # one of the two compiled programs, called directly, its calls queued
        forward = runner.forward_steps[split]

        def run(count):
            for _ in range(count):
                out, _, _, _, runner.cache = forward(runner.leaves, runner.cache, *arrays, n=steps)
            sampled[split] = np.asarray(out)

        return run

    def engine_calls(queued: bool):  # as the engine makes them: ModelRunner.steps, then StepsInFlight.read
        def run(count):
            before = None
            for _ in range(count):
                launched = runner.steps(sequences, steps, after=before if queued else None, **options)
                if queued:  # the next call is made before the last one is read
                    if before is not None:
                        before.read()
                    before = launched
                else:
                    launched.read()
            if before is not None:
                before.read()

        return run

    row = dict(rows=rows, held=held, steps=steps, engine_uses="split" if rows > UNSPLIT_MAX_TOKENS else "unsplit")
    for split in (True, False):
        row["split_ms" if split else "unsplit_ms"] = 1e3 * time_blocks(program(split), blocks=blocks, calls=calls)
    row["same_tokens"] = bool(np.array_equal(sampled[True], sampled[False]))
    row["queued_ms"] = 1e3 * time_blocks(engine_calls(True), blocks=blocks, calls=calls)
    row["read_each_ms"] = 1e3 * time_blocks(engine_calls(False), blocks=blocks, calls=calls)
    say(f"| {rows} | {row['split_ms']:.2f} | {row['unsplit_ms']:.2f} | {row['engine_uses']} | {row['same_tokens']} | "
        f"{row['queued_ms']:.2f} | {row['read_each_ms']:.2f} |", flush=True)
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--held", type=int, default=300, help="tokens each row holds")
    parser.add_argument("--steps", type=int, default=8, help="decode steps a call")
    parser.add_argument("--quick", action="store_true", help="one row, 2 steps, few calls (a smoke test)")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    rows, steps, blocks, calls = ([1], 2, 2, 2) if args.quick else (args.rows, args.steps, 5, 10)
    began = time.perf_counter()
    _, model = make_models(8192)
    engine = Engine(model, slots=max(rows), page_size=16, decode_steps=steps)
    if args.held + steps > engine.max_length:
        raise ValueError(f"--held {args.held} + --steps {steps} exceeds the engine's {engine.max_length} tokens a row")
    say = print
    say(f"device: {device_kind()} ({cpu_model()}); one call of {steps} decode steps, {args.held} tokens held a row; "
        f"ms a call (median of {blocks} blocks of {calls} calls)", flush=True)
    say("| rows | split | unsplit | the engine uses | same tokens | queued | read each |", flush=True)
    say("| ---: | ---: | ---: | --- | --- | ---: | ---: |", flush=True)
    table = [measure_rows(engine.runner, R, held=args.held, steps=steps, blocks=blocks, calls=calls, say=say)
             for R in rows]
    results = dict(device_kind=device_kind(), cpu=cpu_model(), date=datetime.date.today().isoformat(),
                   model="Llama-shaped, 4 layers x 256, 4/2 heads of 64, vocabulary 8192, float32",
                   unsplit_max_tokens=UNSPLIT_MAX_TOKENS, rows=table, seconds=time.perf_counter() - began)
    say(f"done in {results['seconds']:.0f} s", flush=True)
    if not args.quick:
        print(f"wrote {write_results(results, 'serve-calls', args.results)}")
    return results


if __name__ == "__main__":
    main()
