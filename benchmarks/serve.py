"""Serving many requests: the engine against static batching and transformers' continuous batching.

    python -m benchmarks.serve [--requests 64] [--slots 16] [--page-size 16] [--quick]

Needs the ``parity`` extra (PyTorch CPU + transformers). One process, one model: a random
Llama-shaped checkpoint made with transformers (4 layers, width 256, 4 query / 2 key-value
heads of 64, SwiGLU 768, vocabulary 8192), saved with ``save_pretrained`` and loaded into
jaxattn with ``load_hf_model``, so every side holds the same weights; float32, greedy.

1. The trace: 64 requests submitted at once, prompts of 16-512 random tokens, each with its
   own limit of 16-256 new tokens and an end token; the lengths drawn uniformly, and again
   log-uniformly (long-tailed: most requests short, a few long, as real traffic is). A random model has no natural end, so
   the end token is chosen from a first, untimed pass of the engine without one (which also
   compiles its shapes): the token that ends the most requests somewhere between their 16th
   token and their limit without ending any before the 16th. Tokens/s counts each request's
   own tokens (up to its end token or limit) over the wall time of the whole trace:
   - the engine (``jaxattn.serve.Engine``), its KV memory in use (pages x page size)
     and the tokens held sampled after every step;
   - static batching: the same requests in submission order, in batches of ``slots``, each
     batch one ``generate`` call that runs until its longest request ends (every batch is
     run once untimed first, so compiling is not counted);
   - transformers' continuous batching (its ``ContinuousBatchingManager``, the machinery of
     ``generate_batch``, with each request's own limit and the end token), once untimed to
     warm up and once timed (the uniform trace only).
2. Prefix sharing: 32 requests whose prompts are one 512-token prefix and 16 tokens of their
   own, 16 new tokens each, with sharing on and off: time to first token (from submission,
   all submitted at once) and the pages held.
3. Speculative decoding by prompt lookup, on repetitive text: 16 prompts that repeat a
   random 24-token sentence (about 130 tokens), 256 new tokens; a random model's greedy
   continuation soon settles into a cycle, which prompt lookup then drafts. Tokens/s with
   and without; the outputs are compared token for token, and any difference must start at
   a near-tie (the two top logits within 1e-4 in the model's uncached forward).
4. Tokens/s against the number of slots (1 to 16) on the first 24 requests of the uniform trace,
   engine and static batching, each run once untimed first.

Prints a table; writes benchmarks/results/serve-<device>-<date>.json and img/serve.png (the
pages of the pool over time for a few requests; KV memory in use against tokens held over
the trace; tokens/s against slots).

``--http`` measures the HTTP server instead (``jaxattn.serve.http``, a real uvicorn on
127.0.0.1): the trace sent by concurrent streaming clients (one asyncio process, prompts as
token ids) against the same trace through the in-process engine, in one run: tokens/s, time to
first token and inter-token latency (p50, p99); and the engine at one slot against ``generate``
(batch 1, greedy, the same requests one after another: tokens/s, median of 3 runs of each, in turn,
same tokens). ``python -m benchmarks.serve_calls`` times the engine's decode call alone.
Writes benchmarks/results/serve-http-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.timing import device_kind, write_results
from jaxattn.serve import Engine
from jaxattn.lm.generate import Stopping, generate
from jaxattn.lm.hf import load_hf_model

RESULTS = Path(__file__).parent / "results"
FIGURE = Path(__file__).parent.parent / "img" / "serve.png"
PAD = 0


def make_models(vocab: int, folder=None):
    """The transformers model and the same weights in jaxattn (saved in ``folder`` if given,
    with a word-level tokenizer whose token i is the text "ti", so a server can load it)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=768, vocab_size=vocab,
                                      max_position_embeddings=1024)
    reference = transformers.AutoModelForCausalLM.from_config(config).eval()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(folder or scratch)
        reference.save_pretrained(folder)
        model, _ = load_hf_model(folder)
        if folder != Path(scratch):
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers

            words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
            words.pre_tokenizer, words.decoder = pre_tokenizers.WhitespaceSplit(), decoders.WordPiece(cleanup=False)
            words.save(str(folder / "tokenizer.json"))
    return reference, model


def make_trace(count: int, vocab: int, *, prompt=(16, 512), new=(16, 256), seed: int = 0, long_tailed: bool = False):
    """``count`` (prompt, limit) pairs: random prompt tokens; lengths uniform in the ranges, or
    log-uniform (``long_tailed``: as many requests between 16 and 64 tokens as between 64 and 256)."""
    rng = np.random.default_rng(seed)

    def length(low, high):
        if long_tailed:
            return int(round(np.exp(rng.uniform(np.log(low), np.log(high)))))
        return int(rng.integers(low, high + 1))

    trace = []
    for _ in range(count):
        prompt_length = length(*prompt)
        trace.append((rng.integers(1, vocab, prompt_length).astype(np.int32), length(*new)))
    return trace


def cut(tokens, limit: int, eos: int | None) -> list[int]:
    """A request's own output: up to its limit, and up to and including the end token."""
    tokens = [int(t) for t in tokens[:limit]]
    if eos is not None and eos in tokens:
        tokens = tokens[: tokens.index(eos) + 1]
    return tokens


def choose_end_token(outputs: list[list[int]], limits: list[int], shortest: int = 16) -> int:
    """The token that ends the most requests between their ``shortest``-th token and their
    limit and none earlier (``outputs``: each request's tokens without an end token)."""
    best, best_count = None, -1
    for token in sorted({t for row in outputs for t in row}):
        firsts = [row.index(token) if token in row else None for row in outputs]
        if any(f is not None and f < shortest - 1 for f in firsts):
            continue
        count = sum(f is not None and f < limit for f, limit in zip(firsts, limits))
        if count > best_count:
            best, best_count = token, count
    return best


def serve(model, trace, *, slots, page_size, stopping, max_length, speculative=0, prefix_sharing=True, pages=None,
          on_step=None):
    """Runs the trace through a fresh engine; returns (results by request index, seconds, engine)."""
    engine = Engine(model, slots=slots, page_size=page_size, stopping=stopping, max_length=max_length,
                    speculative=speculative, prefix_sharing=prefix_sharing, pages=pages)
    engine.warm_up()  # compile every shape first, as a server does (static batching's are compiled too)
    engine.on_step = on_step
    start = time.perf_counter()
    for index, (prompt, limit) in enumerate(trace):
        engine.submit(prompt, max_new_tokens=limit, id=index)
    results = {result.id: result for result in engine.run()}
    return results, time.perf_counter() - start, engine


def static_batching(model, trace, *, slots, stopping, say):
    """Each batch of ``slots`` requests through one ``generate`` call until its longest ends;
    every batch is run twice and the second run timed. Returns (outputs, seconds, KV slots
    reserved by the largest batch)."""
    outputs, seconds, reserved = [], 0.0, 0
    for start in range(0, len(trace), slots):
        batch = trace[start : start + slots]
        prompts, limits = [p for p, _ in batch], [n for _, n in batch]

        def run():
            return np.asarray(generate(model, prompts, max_new_tokens=max(limits), stopping=stopping))

        run()  # compile this batch's shapes
        began = time.perf_counter()
        tokens = run()
        seconds += time.perf_counter() - began
        reserved = max(reserved, len(batch) * (max(len(p) for p in prompts) + max(limits)))
        outputs += [cut(row, limit, stopping.ids[0] if stopping.ids else None) for row, limit in zip(tokens, limits)]
        say(f"  static batch {start // slots + 1}/{-(-len(trace) // slots)}: {seconds:.1f} s so far", flush=True)
    return outputs, seconds, reserved


def transformers_continuous(reference, trace, *, eos):
    """The trace through transformers' continuous batching manager; (outputs, seconds)."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, eos_token_id=eos, pad_token_id=PAD, max_new_tokens=max(n for _, n in trace))
    with torch.no_grad(), reference.continuous_batching_context_manager(generation_config=config, block=True,
                                                                        timeout=5) as manager:
        start = time.perf_counter()
        ids = [manager.add_request(prompt.tolist(), request_id=f"r{index}", max_new_tokens=limit, eos_token_id=eos)
               for index, (prompt, limit) in enumerate(trace)]
        done = {}
        while len(done) < len(ids):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                done[result.request_id] = result
            elif result is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching stopped before the trace was done")
        seconds = time.perf_counter() - start
    outputs = [cut(done[f"r{index}"].generated_tokens, limit, eos) for index, (_, limit) in enumerate(trace)]
    return outputs, seconds


def memory_summary(engine) -> dict:
    """KV memory in use (pages x page size) against the tokens held, after every step."""
    memory = np.array(engine.stats.memory, dtype=np.float64)  # [steps, 2]
    peak = int(memory[:, 0].argmax())
    busy = memory[:, 1] > 0
    return dict(peak_tokens_of_pages=int(memory[peak, 0]), tokens_held_at_peak=int(memory[peak, 1]),
                ratio_at_peak=float(memory[peak, 0] / memory[peak, 1]),
                ratio_over_the_trace=float(memory[busy, 0].sum() / memory[busy, 1].sum()),
                peak_pages=engine.stats.peak_pages)


def near_tie_differences(model, trace, plain, speculative_outputs, tolerance: float = 1e-4) -> list[dict]:
    """Where two greedy outputs differ: the first differing position, and the gap between the
    two top logits of the model's uncached forward there."""
    differences = []
    for index, ((prompt, _), a, b) in enumerate(zip(trace, plain, speculative_outputs)):
        if a == b:
            continue
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        context = np.concatenate([prompt, np.asarray(a[:first], np.int32)])[None]
        logits = np.asarray(model(jax.numpy.asarray(context))[0, -1], np.float64)
        top = np.sort(logits)[-2:]
        differences.append(dict(request=index, position=first, top_two_gap=float(top[1] - top[0]),
                                near_tie=bool(top[1] - top[0] <= tolerance)))
    return differences


def draw(figure_path: Path, occupancy, memory, slot_rows, static_reserved, page_size):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    owners = sorted({owner for step in occupancy for owner in step.values()})
    colors = plt.get_cmap("tab10")
    for step, pages in enumerate(occupancy):
        for page, owner in pages.items():
            ax.add_patch(plt.Rectangle((step, page - 0.45), 1, 0.9, color=colors(owners.index(owner) % 10), lw=0))
    ax.set_xlim(0, len(occupancy))
    ax.set_ylim(0.3, 1 + max((max(p) for p in occupancy if p), default=1))
    ax.set_xlabel("engine step")
    ax.set_ylabel("page of the pool")
    ax.set_title(f"The pool: {len(owners)} requests, 3 slots, pages of {page_size} tokens\n"
                 "(a color per request; a page is taken as tokens arrive, given back at the end)", fontsize=9)

    ax = axes[1]
    memory = np.asarray(memory)
    ax.plot(memory[:, 0], label="KV memory in use (pages x page size)", lw=1.2)
    ax.plot(memory[:, 1], label="tokens held", lw=1.2, ls="--")
    ax.axhline(static_reserved, color="gray", lw=1, ls=":", label="static batching reserves (largest batch)")
    ax.set_xlabel("engine step")
    ax.set_ylabel("tokens")
    ax.set_title("The 64-request trace: memory follows the tokens", fontsize=9)
    ax.legend(fontsize=8)

    ax = axes[2]
    ax.plot([r["slots"] for r in slot_rows], [r["engine_tokens_per_s"] for r in slot_rows], "o-", label="engine")
    ax.plot([r["slots"] for r in slot_rows], [r["static_tokens_per_s"] for r in slot_rows], "s--",
            label="static batching (generate)")
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["slots"] for r in slot_rows], [str(r["slots"]) for r in slot_rows])
    ax.set_xlabel("slots (rows of one compiled step)")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"Throughput against slots ({slot_rows[0]['requests']} requests of the trace)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    figure_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure_path, dpi=110)
    plt.close(fig)


def percentiles(values) -> dict:
    values = np.asarray(values, np.float64)
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


async def stream_completion(port: int, body: dict, on_event) -> None:
    """One streaming POST /v1/completions on a connection of its own, read as raw HTTP/1.1: the
    response's chunks (chunked transfer encoding) are split into server-sent events, and
    ``on_event(data)`` gets each event's JSON text. A load generator's client: it spends the
    least CPU it can per event, which here the server and the model share (2 cores)."""
    import asyncio
    import json

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        payload = json.dumps(body).encode()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(payload), payload))
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"the server answered {status!r}")
        headers = b""
        while (line := await reader.readline()) not in (b"\r\n", b""):
            headers += line.lower()
        if b"transfer-encoding: chunked" not in headers:  # how uvicorn sends a streamed body
            raise RuntimeError(f"expected a chunked body, got the headers {headers!r}")
        pending = b""
        while size := int((await reader.readline()).strip() or b"0", 16):
            pending += (await reader.readexactly(size + 2))[:-2]  # a chunk, then CRLF
            *events, pending = pending.split(b"\n\n")
            for event in events:
                if event.startswith(b"data: {"):
                    on_event(event[len(b"data: "):])
    finally:
        writer.close()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process (all its threads) has used, from /proc; None where that
    cannot be read (no /proc: not Linux; or no such process)."""
    import os

    stat = Path(f"/proc/{pid}/stat")
    if not stat.exists():
        return None
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def over_http(folder: Path, trace, *, vocab, slots, page_size, eos, say) -> dict:
    """The trace through ``jaxattn serve`` in a process of its own (as a server runs), one
    streaming client per request, all at once, from this process's asyncio loop. Also the CPU
    seconds the server and the clients used over the timed pass (the machine's cores are shared)."""
    import asyncio
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": int(eos)}))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "jaxattn", "serve", str(folder), "--port", str(port), "--slots",
                               str(slots), "--page-size", str(page_size), "--max-waiting", str(len(trace)),
                               "--served-model-name", "bench"], env=os.environ.copy())
    try:
        while True:  # warm-up compiles every shape before /health says ok
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if server.poll() is not None:
                raise RuntimeError("jaxattn serve exited")
            time.sleep(0.2)

        async def one(prompt, limit):
            start, arrivals, usage = time.perf_counter(), [], {}

            def on_event(data):
                chunk = json.loads(data)
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    arrivals.append(time.perf_counter() - start)
                usage.update(chunk.get("usage") or {})

            body = {"prompt": [int(t) for t in prompt], "max_tokens": limit, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            await stream_completion(port, body, on_event)
            return arrivals, usage["completion_tokens"], time.perf_counter() - start

        async def everyone(requests):
            return await asyncio.gather(*(one(prompt, limit) for prompt, limit in requests))

        # Once untimed (the server's first requests), with other tokens of the same lengths: the
        # server keeps released prompt pages for reuse (prefix sharing), and the timed requests must
        # not find their prompts already computed (the in-process engine is new).
        rng = np.random.default_rng(1)
        asyncio.run(everyone([(rng.integers(1, vocab, len(prompt)), limit) for prompt, limit in trace]))
        server_cpu, client_cpu, start = cpu_seconds(server.pid), time.process_time(), time.perf_counter()
        replies = asyncio.run(everyone(trace))
        seconds = time.perf_counter() - start
        server_cpu = None if server_cpu is None else cpu_seconds(server.pid) - server_cpu
        client_cpu = time.process_time() - client_cpu
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
    tokens = sum(made for _, made, _ in replies)
    first = [arrivals[0] for arrivals, _, _ in replies if arrivals]
    gaps = [b - a for arrivals, _, _ in replies for a, b in zip(arrivals, arrivals[1:])]
    totals = [total for _, _, total in replies]
    say(f"  over HTTP: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tokens/s; time to first token "
        f"p50 {np.percentile(first, 50):.3f} s, inter-token p50 {np.percentile(gaps, 50) * 1e3:.1f} ms; CPU: server "
        f"{'?' if server_cpu is None else f'{server_cpu:.1f}'} s, clients {client_cpu:.1f} s", flush=True)
    return dict(tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds, ttft_s=percentiles(first),
                inter_token_s=percentiles(gaps), total_s=percentiles(totals), server_cpu_s=server_cpu,
                client_cpu_s=client_cpu)


def in_process(model, trace, *, slots, page_size, stopping, max_length, say) -> dict:
    serve(model, trace, slots=slots, page_size=page_size, stopping=stopping, max_length=max_length)  # untimed
    cpu = time.process_time()
    results, seconds, _ = serve(model, trace, slots=slots, page_size=page_size, stopping=stopping, max_length=max_length)
    cpu = time.process_time() - cpu  # every thread of this process: XLA's too
    rows = [results[i] for i in range(len(trace))]
    tokens = sum(len(r.tokens) for r in rows)
    gaps = [(r.total_s - r.first_token_s) / (len(r.tokens) - 1) for r in rows if len(r.tokens) > 1]
    say(f"  in process: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tokens/s; time to first token "
        f"p50 {np.percentile([r.first_token_s for r in rows], 50):.3f} s; CPU {cpu:.1f} s", flush=True)
    return dict(tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds,
                ttft_s=percentiles([r.first_token_s for r in rows]), inter_token_s=percentiles(gaps),
                total_s=percentiles([r.total_s for r in rows]), cpu_s=cpu, outputs=[r.tokens for r in rows])


def one_slot(model, requests, *, page_size, stopping, max_length, say) -> dict:
    """The engine at one slot against generate, batch 1, the requests one after another; the
    median of 3 timed runs of each (after one untimed; the two in turn), and whether their
    tokens agree."""
    engine = Engine(model, slots=1, page_size=page_size, stopping=stopping, max_length=max_length)
    engine.warm_up()  # once, as a server does before it takes requests: not timed

    def by_engine():  # one after another, as the generate calls run
        outputs = []
        for index, (prompt, limit) in enumerate(requests):
            engine.submit(prompt, max_new_tokens=limit, id=index)
            outputs += [result.tokens for result in engine.run()]
        return outputs

    def by_generate():
        outputs = []
        for prompt, limit in requests:
            tokens = np.asarray(generate(model, [prompt], max_new_tokens=limit, stopping=stopping))
            outputs.append(cut(tokens[0], limit, stopping.ids[0] if stopping.ids else None))
        return outputs

    runs = {"engine": by_engine, "generate": by_generate}
    outputs = {name: run() for name, run in runs.items()}  # untimed: each once
    times = {name: [] for name in runs}
    for _ in range(3):  # in turn, so that the machine's drift reaches both alike
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    timings = {}
    for name in runs:
        tokens = sum(len(t) for t in outputs[name])
        timings[name] = dict(tokens=tokens, tokens_per_s=[tokens / t for t in times[name]],
                             median_tokens_per_s=tokens / float(np.median(times[name])), outputs=outputs[name])
    same = timings["engine"].pop("outputs") == timings["generate"].pop("outputs")
    ratio = timings["engine"]["median_tokens_per_s"] / timings["generate"]["median_tokens_per_s"]
    say(f"  one slot: engine {timings['engine']['median_tokens_per_s']:.1f} tokens/s, generate "
        f"{timings['generate']['median_tokens_per_s']:.1f} ({ratio:.2f}x); same tokens: {same}", flush=True)
    return dict(timings, ratio=ratio, same_tokens=same, requests=len(requests))


def main_http(args) -> dict:
    from benchmarks.timing import cpu_model

    began = time.perf_counter()
    vocab = 8192
    folder = Path(tempfile.mkdtemp(prefix="jaxattn-serve-"))
    _, model = make_models(vocab, folder)
    count = 12 if args.quick else args.requests
    trace = make_trace(count, vocab, prompt=(16, 128) if args.quick else (16, 512),
                       new=(16, 48) if args.quick else (16, 256))
    max_length = model.config.max_length  # as the server's engine has it
    say = print
    say(f"device: {device_kind()} ({cpu_model()}); {count} requests, {args.slots} slots", flush=True)
    free, _, _ = serve(model, trace, slots=args.slots, page_size=args.page_size, stopping=Stopping(),
                       max_length=max_length)
    eos = choose_end_token([free[i].tokens for i in range(count)], [n for _, n in trace])
    stopping = Stopping((eos,), PAD)
    layout = dict(slots=args.slots, page_size=args.page_size, stopping=stopping, max_length=max_length, say=say)
    local = in_process(model, trace, **layout)
    local_outputs = local.pop("outputs")
    http = over_http(folder, trace, vocab=vocab, slots=args.slots, page_size=args.page_size, eos=eos, say=say)
    requests = trace[:4] if args.quick else trace[:8]
    single = one_slot(model, requests, page_size=args.page_size, stopping=stopping, max_length=max_length, say=say)
    results = dict(device_kind=device_kind(), cpu=cpu_model(), date=datetime.date.today().isoformat(), requests=count,
                   setup="the server is `jaxattn serve` in a process of its own; the clients one asyncio process",
                   slots=args.slots, end_token=eos, in_process=local, http=http,
                   http_over_in_process=http["tokens_per_s"] / local["tokens_per_s"],
                   http_ttft_p50_over_median_total=http["ttft_s"]["p50"] / http["total_s"]["p50"],
                   same_tokens_count=sum(len(t) for t in local_outputs) == http["tokens"], one_slot=single,
                   model="Llama-shaped, 4 layers x 256, 4/2 heads of 64, vocabulary 8192, float32")
    say(f"HTTP / in process: {results['http_over_in_process']:.2f}x tokens/s; HTTP time to first token p50 is "
        f"{results['http_ttft_p50_over_median_total']:.2f} of the median request's time", flush=True)
    results["seconds"] = time.perf_counter() - began
    if not args.quick:
        print(f"wrote {write_results(results, 'serve-http', args.results)}")
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--speculative", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="a small trace and no slot sweep (a smoke test)")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--figure", default=str(FIGURE))
    parser.add_argument("--http", action="store_true", help="the HTTP server against the in-process engine")
    args = parser.parse_args(argv)
    if args.http:
        return main_http(args)
    import torch
    import transformers

    began = time.perf_counter()
    vocab, slots, page_size = 8192, args.slots, args.page_size
    versions = {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
    print(f"device: {device_kind()}; torch threads {torch.get_num_threads()}; {versions}", flush=True)
    reference, model = make_models(vocab)
    count = 12 if args.quick else args.requests
    trace = make_trace(count, vocab, prompt=(16, 128) if args.quick else (16, 512),
                       new=(16, 48) if args.quick else (16, 256))
    max_length = 512 + 256 + args.speculative
    results = {"device_kind": device_kind(), "versions": versions, "date": datetime.date.today().isoformat(),
               "model": "Llama-shaped, 4 layers x 256, 4/2 heads of 64, vocabulary 8192, float32", "slots": slots,
               "page_size": page_size}

    # 1. The trace, with lengths uniform and long-tailed.
    def run_trace(name, trace, *, with_transformers):
        limits = [n for _, n in trace]
        print(f"  {name}: {len(trace)} requests; first an untimed engine pass without an end token", flush=True)
        free, seconds, _ = serve(model, trace, slots=slots, page_size=page_size, stopping=Stopping(),
                                 max_length=max_length)
        eos = choose_end_token([free[i].tokens for i in range(len(trace))], limits)
        stopping = Stopping((eos,), PAD)
        print(f"  untimed pass {seconds:.1f} s; end token {eos}", flush=True)
        served, engine_s, engine = serve(model, trace, slots=slots, page_size=page_size, stopping=stopping,
                                         max_length=max_length)
        outputs = [served[i].tokens for i in range(len(trace))]
        tokens = sum(len(t) for t in outputs)
        memory = memory_summary(engine)
        ended = sum(served[i].finish_reason == "eos" for i in range(len(trace)))
        print(f"  engine: {tokens} tokens in {engine_s:.2f} s = {tokens / engine_s:.1f} tokens/s; {ended} of "
              f"{len(trace)} end at the end token; KV in use at its peak {memory['peak_tokens_of_pages']} tokens of "
              f"pages for {memory['tokens_held_at_peak']} held ({memory['ratio_at_peak']:.3f}x)", flush=True)
        static_outputs, static_s, reserved = static_batching(model, trace, slots=slots, stopping=stopping, say=print)
        print(f"  static batching: {tokens} tokens in {static_s:.2f} s = {tokens / static_s:.1f} tokens/s "
              f"-> engine {static_s / engine_s:.2f}x", flush=True)
        row = dict(requests=len(trace), prompt_tokens=int(sum(len(p) for p, _ in trace)),
                   prompt_lengths=[len(p) for p, _ in trace], limits=limits, end_token=eos, ended_at_end_token=ended,
                   tokens=tokens, engine_s=engine_s, engine_tokens_per_s=tokens / engine_s, static_s=static_s,
                   static_tokens_per_s=tokens / static_s, engine_over_static=static_s / engine_s,
                   static_kv_reserved_tokens=reserved, memory=memory,
                   same_as_static=int(sum(a == b for a, b in zip(outputs, static_outputs))),
                   steps=engine.stats.steps, calls=engine.stats.calls)
        if with_transformers:
            print("  transformers' continuous batching: one untimed pass, then the timed one", flush=True)
            transformers_continuous(reference, trace, eos=eos)
            theirs, theirs_s = transformers_continuous(reference, trace, eos=eos)
            their_tokens = sum(len(t) for t in theirs)
            print(f"  transformers: {their_tokens} tokens in {theirs_s:.2f} s = {their_tokens / theirs_s:.1f} tokens/s",
                  flush=True)
            row.update(transformers_mode="continuous batching (ContinuousBatchingManager, as generate_batch uses it)",
                       transformers_tokens=their_tokens, transformers_s=theirs_s,
                       transformers_tokens_per_s=their_tokens / theirs_s,
                       engine_over_transformers=(tokens / engine_s) / (their_tokens / theirs_s),
                       same_as_transformers=int(sum(a == b for a, b in zip(outputs, theirs))))
        return row, engine.stats.memory, stopping, outputs

    print(f"[1/4] the trace, {count} requests, lengths uniform, then long-tailed", flush=True)
    results["trace"], trace_memory, stopping, engine_outputs = run_trace("uniform lengths", trace, with_transformers=True)
    static_reserved = results["trace"]["static_kv_reserved_tokens"]
    if not args.quick:
        long_tailed = make_trace(count, vocab, long_tailed=True)
        results["long_tailed_trace"], *_ = run_trace("long-tailed lengths", long_tailed, with_transformers=False)

    # 2. Prefix sharing.
    print("[2/4] prefix sharing: 32 requests sharing a 512-token prefix", flush=True)
    rng = np.random.default_rng(1)
    prefix = rng.integers(1, vocab, 128 if args.quick else 512).astype(np.int32)
    shared_trace = [(np.concatenate([prefix, rng.integers(1, vocab, 16).astype(np.int32)]), 16) for _ in range(32)]
    sharing = {}
    for label, on in (("warm-up", True), ("warm-up", False), ("with sharing", True), ("without sharing", False)):
        out, seconds, engine = serve(model, shared_trace, slots=slots, page_size=page_size, stopping=Stopping(),
                                     max_length=max_length, prefix_sharing=on)
        if label == "warm-up":
            continue
        ttft = np.array([out[i].first_token_s for i in range(len(shared_trace))])
        sharing[label] = dict(mean_ttft_s=float(ttft.mean()), median_ttft_s=float(np.median(ttft)), seconds=seconds,
                              peak_pages=engine.stats.peak_pages, shared_pages=engine.stats.shared_pages,
                              outputs=[out[i].tokens for i in range(len(shared_trace))])
        print(f"  {label}: mean time to first token {ttft.mean():.3f} s, peak pages {engine.stats.peak_pages}, "
              f"pages shared {engine.stats.shared_pages}", flush=True)
    same = sharing["with sharing"].pop("outputs") == sharing["without sharing"].pop("outputs")
    results["prefix_sharing"] = dict(sharing, prefix_tokens=len(prefix), prefix_pages=len(prefix) // page_size,
                                     same_outputs=same, ttft_ratio=sharing["without sharing"]["mean_ttft_s"]
                                     / sharing["with sharing"]["mean_ttft_s"])
    print(f"  time to first token {results['prefix_sharing']['ttft_ratio']:.2f}x better with sharing; "
          f"same outputs: {same}", flush=True)

    # 3. Speculative decoding.
    print(f"[3/4] speculative decoding (prompt lookup, {args.speculative} drafts) on repetitive text", flush=True)
    rng = np.random.default_rng(2)
    repetitive = []
    for _ in range(16):
        sentence = rng.integers(1, vocab, 24).astype(np.int32)
        repetitive.append((np.tile(sentence, 6)[: int(rng.integers(120, 140))], 32 if args.quick else 256))
    runs = {}
    for label, k in (("warm-up", 0), ("warm-up", args.speculative), ("plain", 0), ("speculative", args.speculative)):
        out, seconds, engine = serve(model, repetitive, slots=slots, page_size=page_size, stopping=Stopping(),
                                     max_length=max_length, speculative=k)
        if label == "warm-up":
            continue
        made = sum(len(out[i].tokens) for i in range(len(repetitive)))
        runs[label] = dict(tokens=made, seconds=seconds, tokens_per_s=made / seconds, calls=engine.stats.calls,
                           drafted=engine.stats.drafted, accepted=engine.stats.accepted,
                           outputs=[out[i].tokens for i in range(len(repetitive))])
        print(f"  {label}: {made / seconds:.1f} tokens/s, {engine.stats.calls} calls, "
              f"{engine.stats.accepted} of {engine.stats.drafted} drafts accepted", flush=True)
    differences = near_tie_differences(model, repetitive, runs["plain"].pop("outputs"), runs["speculative"].pop("outputs"))
    results["speculative"] = dict(runs, text="16 prompts, each a random 24-token sentence repeated (120-139 tokens)",
                                  speedup=runs["speculative"]["tokens_per_s"] / runs["plain"]["tokens_per_s"],
                                  differing_requests=differences,
                                  every_difference_a_near_tie=all(d["near_tie"] for d in differences))
    print(f"  {results['speculative']['speedup']:.2f}x; requests that differ: {len(differences)} "
          f"(all near-ties: {results['speculative']['every_difference_a_near_tie']})", flush=True)

    # 4. Slots, and the pool drawn over time.
    slot_rows = []
    if not args.quick:
        print("[4/4] tokens/s against slots, first 24 requests of the trace", flush=True)
        subset = trace[:24]
        subset_tokens = sum(len(t) for t in engine_outputs[:24])
        for n in (1, 2, 4, 8, 16):
            pages = 16 * -(-max_length // page_size) + 1  # one pool size for every run: one set of compiled shapes
            serve(model, subset, slots=n, page_size=page_size, stopping=stopping, max_length=max_length, pages=pages)
            _, seconds, _ = serve(model, subset, slots=n, page_size=page_size, stopping=stopping,
                                  max_length=max_length, pages=pages)
            _, static_seconds, _ = static_batching(model, subset, slots=n, stopping=stopping, say=lambda *a, **k: None)
            slot_rows.append(dict(slots=n, requests=len(subset), engine_tokens_per_s=subset_tokens / seconds,
                                  static_tokens_per_s=subset_tokens / static_seconds))
            print(f"  {n} slots: engine {subset_tokens / seconds:.1f} tokens/s, static {subset_tokens / static_seconds:.1f}",
                  flush=True)
        results["slots"] = slot_rows
        occupancy = []
        serve(model, trace[:9], slots=3, page_size=page_size, stopping=stopping, max_length=max_length,
              on_step=lambda e: occupancy.append({p: s.id for s in e.running if s is not None for p in s.pages}))
        draw(Path(args.figure), occupancy, trace_memory, slot_rows, static_reserved, page_size)
        print(f"  figure: {args.figure}")

    t = results["trace"]
    print()
    print("| measure | jaxattn engine | other | ratio |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| {count}-request trace, uniform lengths, tokens/s vs static batching | {t['engine_tokens_per_s']:.1f} | "
          f"{t['static_tokens_per_s']:.1f} | {t['engine_over_static']:.2f}x |")
    if "long_tailed_trace" in results:
        lt = results["long_tailed_trace"]
        print(f"| the same with long-tailed lengths, vs static batching | {lt['engine_tokens_per_s']:.1f} | "
              f"{lt['static_tokens_per_s']:.1f} | {lt['engine_over_static']:.2f}x |")
    print(f"| the uniform trace vs transformers continuous batching (CPU) | {t['engine_tokens_per_s']:.1f} | "
          f"{t['transformers_tokens_per_s']:.1f} | {t['engine_over_transformers']:.2f}x |")
    print(f"| KV memory in use at its peak / tokens held | {t['memory']['peak_tokens_of_pages']} | "
          f"{t['memory']['tokens_held_at_peak']} | {t['memory']['ratio_at_peak']:.3f}x |")
    p = results["prefix_sharing"]
    print(f"| mean time to first token, 32 requests sharing a prefix (s): with sharing, without; without / with | "
          f"{p['with sharing']['mean_ttft_s']:.3f} | "
          f"{p['without sharing']['mean_ttft_s']:.3f} | {p['ttft_ratio']:.2f}x |")
    s = results["speculative"]
    print(f"| speculative (prompt lookup) vs plain, tokens/s | {s['speculative']['tokens_per_s']:.1f} | "
          f"{s['plain']['tokens_per_s']:.1f} | {s['speedup']:.2f}x |")
    print(f"same tokens as static batching: {t['same_as_static']}/{count}; as transformers: {t['same_as_transformers']}/{count}")
    results["seconds"] = time.perf_counter() - began
    if not args.quick:
        path = write_results(results, "serve", args.results)
        print(f"wrote {path}")
    print(f"Done in {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
