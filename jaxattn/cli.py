"""The ``jaxattn`` command (also ``python -m jaxattn``): tour, train, generate, inspect."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

DEFAULT_RUN = "runs/default"


def _tour(args) -> int:
    from jaxattn.tour import run_tour

    run_tour(args.text, out=args.out, seed=args.seed, checkpoint=args.checkpoint)
    return 0


def _start_devices(args) -> None:
    """Virtual CPU devices and the multi-process runtime: both before JAX computes anything."""
    import jax

    if args.cpu_devices is not None:
        if args.cpu_devices < 1:
            raise ValueError(f"--cpu-devices must be >= 1, got {args.cpu_devices}")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    given = [args.coordinator is not None, args.num_processes is not None, args.process_id is not None]
    if any(given) and not all(given):
        raise ValueError("a multi-process run needs --coordinator, --num-processes and --process-id together")
    if all(given):
        from jaxattn.lm.parallel import initialize

        initialize(args.coordinator, args.num_processes, args.process_id)


def _model_config_file(path) -> dict:
    """A JSON object of ``TransformerConfig`` fields (e.g. ``{"layers": 6, "qk_norm": "head"}``)."""
    import json
    from pathlib import Path

    from jaxattn.nn import TransformerConfig

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"model config file {str(file)!r} does not exist")
    try:
        fields = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"model config file {str(file)!r} is not JSON: {error}") from error
    known = {field.name for field in dataclasses.fields(TransformerConfig)}
    if not isinstance(fields, dict) or set(fields) - known:
        unknown = sorted(set(fields) - known) if isinstance(fields, dict) else fields
        raise ValueError(f"model config file {str(file)!r} must be an object of TransformerConfig fields; unknown: {unknown}")
    return fields


def _train(args) -> int:
    _start_devices(args)
    import jax

    from jaxattn.lm.checkpoint import RunFolder
    from jaxattn.lm.data import REPEATED_TOKENS, load_corpus, open_corpus
    from jaxattn.lm.parallel import mesh_from_spec
    from jaxattn.lm.train import TrainConfig, preset, train

    run = RunFolder(args.out, overwrite=args.overwrite)
    if args.resume:
        saved = run.read_run()
        config, train_config = run.model_config(), TrainConfig(**saved["train"])
        if args.data is not None and args.data != saved["data"]:
            raise ValueError(f"--resume continues the run on its own data {saved['data']!r}, not {args.data!r}")
        corpus = open_corpus(saved["data"])
        measure = preset("induction").measure if saved["data"] == REPEATED_TOKENS else None
    else:
        chosen = preset(args.preset, attention=args.attention)
        if chosen.corpus is not None and args.data is not None:
            raise ValueError(f"--preset {args.preset} trains on {chosen.corpus.name}; it takes no --data")
        overrides = _model_config_file(args.model_config) if args.model_config else {}
        overrides.update({name: getattr(args, name) for name in ("layers", "width") if getattr(args, name) is not None})
        if args.kernel is not None or "attention_kernel" not in overrides:
            overrides["attention_kernel"] = args.kernel or "auto"
        config = dataclasses.replace(chosen.config, **overrides)
        train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
        train_config = dataclasses.replace(
            chosen.train, **{name: value for name, value in vars(args).items() if name in train_fields and value is not None}
        )
        corpus = chosen.corpus or load_corpus(args.data)
        measure = chosen.measure
    mesh = None if args.mesh is None else mesh_from_spec(args.mesh)
    lead = jax.process_index() == 0
    if lead:
        print(f"Training on {corpus.name}: {len(corpus.train):,} train / {len(corpus.validation):,} validation bytes")
        print(f"Model: {config}")
        print(f"Optimisation: {train_config}")
        if mesh is not None:
            print(f"Mesh: {dict(mesh.shape)} over {jax.device_count()} devices of {jax.process_count()} process(es)")
    summary = train(config, train_config, corpus, run, resume=args.resume, mesh=mesh, measure=measure)
    if lead:
        from jaxattn import viz

        print(f"Loss curve: {viz.training_curve(summary['history'], run.path / 'loss.png')}")
        print("Train loss (bits/byte) by step: " + ", ".join(
            f"{step}: {loss / 0.6931471805599453:.6f}" for step, loss in zip(summary["history"]["step"],
                                                                             summary["history"]["train_loss"])))
        if measure is not None:
            _report_induction(summary, run)
    return 0


def _report_induction(summary: dict, run) -> None:
    """After an induction run: the phase change's figure and the circuit found by ablation."""
    import math

    from jaxattn import viz
    from jaxattn.lm.checkpoint import RunFolder
    from jaxattn.lm.inspection import describe_circuit, induction_circuit
    from jaxattn.lm.tokenizer import ByteTokenizer

    measured = summary["history"]["measured"]
    print("Loss on the repeated half (nats) by step: " + ", ".join(
        f"{step}: {loss:.2f}" for step, loss in zip(measured["step"], measured["repeated_half_loss"])))
    figure = viz.induction_figure(summary["history"], run.path / "induction.png", random_loss=math.log(94))
    print(f"The phase change: {figure}")
    circuit = induction_circuit(RunFolder(run.path).load_model(), ByteTokenizer())  # a fresh reader of the run
    for line in describe_circuit(circuit):
        print(line)


def _serve_requests(args, model, tokenizer) -> int:
    """``generate --requests FILE``: every request through the serving engine, each result
    written to ``--output`` as it finishes; a bad line is an error result of its own."""
    import json

    from tqdm.auto import tqdm

    from jaxattn.lm.generate import Stopping
    from jaxattn.lm.load import load_any
    from jaxattn.lm.sampling import Sampling
    from jaxattn.serve import Engine, Request, serve_requests

    draft_model = None
    if args.draft_model is not None:
        draft_model, draft_tokenizer, _ = load_any(args.draft_model, dtype=args.dtype, quantize=args.quantize)
        probe = "The next day is bright. 1 + 1 = 2"
        if list(draft_tokenizer.encode(probe)) != list(tokenizer.encode(probe)):
            raise ValueError(f"--draft-model {args.draft_model} does not tokenize text as the model does: a draft "
                             "model must share the model's tokenizer")
    stopping = Stopping.for_tokenizer(tokenizer, ignore_eos=args.ignore_eos)
    engine = Engine(model, slots=args.slots, page_size=args.page_size, stopping=stopping, speculative=args.speculative,
                    draft_model=draft_model, cache_dtype=args.kv_cache)
    defaults = Request("", args.max_new_tokens, Sampling(args.temperature, args.top_k, args.top_p), args.seed)
    source = sys.stdin.buffer if args.requests == "-" else open(args.requests, "rb")
    started = time.perf_counter()
    with source, open(args.output, "w", encoding="utf-8") as out, tqdm(unit="request", desc="serve") as bar:
        def write(record):
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            bar.update(1)
            bar.set_postfix(tokens=engine.stats.tokens, pages=engine.pool.in_use)

        counts = serve_requests(engine, tokenizer, source, write, defaults=defaults)
    seconds = time.perf_counter() - started
    stats = engine.stats
    print(f"Served {counts['served']} requests ({counts['rejected']} rejected lines) in {seconds:.1f} s: "
          f"{stats.tokens:,} tokens, {stats.tokens / max(seconds, 1e-9):,.1f} tokens/s, peak {stats.peak_pages} of "
          f"{engine.pool.pages - 1} pages of {engine.page_size} tokens; results in {args.output}")
    return 0


def _generation_settings(args):
    """``(Sampling, max_new_tokens)`` from the flags, else the checkpoint's generation config, else
    jaxattn's defaults; checked before any model is loaded."""
    from jaxattn.lm.load import generation_defaults
    from jaxattn.lm.sampling import Sampling

    checkpoint = generation_defaults(args.model) if args.model is not None else {}
    given = {name: getattr(args, name) for name in ("temperature", "top_k", "top_p", "max_new_tokens")
             if getattr(args, name) is not None}
    if given.get("temperature") == 0:  # greedy: the checkpoint's top-k/top-p do not apply
        checkpoint = {key: value for key, value in checkpoint.items() if key == "max_new_tokens"}
    settings = {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 200, **checkpoint, **given}
    if settings["max_new_tokens"] < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {settings['max_new_tokens']}")
    if any(not stop for stop in args.stop or ()):
        raise ValueError("--stop needs a text to stop at, got an empty one")
    sampling = Sampling(temperature=settings["temperature"], top_k=settings.get("top_k"), top_p=settings.get("top_p"))
    return sampling, int(settings["max_new_tokens"])


class _Streamer:
    """Prints a reply as ``generate`` writes its tokens (``on_tokens``): text without broken
    characters, cut at a stop string, silent after the end token. One object for a whole
    conversation, so that the compiled loop (which holds it) is reused turn after turn."""

    def __init__(self, tokenizer, stopping, stops):
        self.tokenizer, self.stopping, self.stops = tokenizer, stopping, stops or ()

    def start(self):
        from jaxattn.serve.text import TextStream

        self.text = TextStream(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True), self.stops)
        self.ended = False

    def __call__(self, tokens):
        if self.ended:
            return
        token = int(tokens[0])
        print(self.text.add([token]), end="", flush=True)
        self.ended = self.text.stopped or (bool(self.stopping.ids) and token in self.stopping.ids)

    def finish(self) -> str:
        print(self.text.finish(), end="", flush=True)
        return self.text.text


def _reply(args, model, prompt, streamer: _Streamer, sampling, max_new_tokens: int) -> str:
    """Generates a continuation of ``prompt`` (token ids), printing it as it comes; returns its text."""
    from jaxattn.lm.generate import generate

    streamer.start()
    generate(model, [prompt], max_new_tokens=max_new_tokens, sampling=sampling, seed=args.seed,
             use_cache=not args.no_cache, cache_dtype=args.kv_cache, stopping=streamer.stopping, on_tokens=streamer)
    return streamer.finish()


def _converse(args, model, tokenizer, streamer: _Streamer, sampling, max_new_tokens: int) -> int:
    """``generate --chat`` without a message: turns typed in the terminal, the whole history
    rendered by the chat template each turn; an empty line is skipped, Ctrl-D ends."""
    messages = [] if args.system is None else [{"role": "system", "content": args.system}]
    print("Chat with the model: type a message, Enter to send, Ctrl-D to end.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt = tokenizer.encode_chat(messages)
        if len(prompt) + max_new_tokens > model.config.max_length:
            print(f"The conversation ({len(prompt)} tokens) plus {max_new_tokens} new ones no longer fits the model's "
                  f"context of {model.config.max_length}; start a new one.", file=sys.stderr)
            return 0
        messages.append({"role": "assistant", "content": _reply(args, model, prompt, streamer, sampling, max_new_tokens)})
        print()


def _generate(args) -> int:
    from jaxattn.lm.generate import Stopping
    from jaxattn.lm.load import load_any

    if args.kv_cache is not None and args.no_cache:
        raise ValueError(f"--kv-cache {args.kv_cache} says how to store the cache, and --no-cache decodes without one: "
                         "give one of them")
    if args.requests is not None and args.output is None:
        raise ValueError("--requests needs --output, the file the results are written to")
    if args.system is not None and args.chat is None:
        raise ValueError("--system is the system prompt of a --chat conversation: give --chat too")
    sampling, max_new_tokens = _generation_settings(args)
    model, tokenizer, _ = load_any(args.model or args.checkpoint, dtype=args.dtype, quantize=args.quantize, kernel=args.kernel)
    if args.requests is not None:
        args.temperature, args.top_k, args.top_p = sampling.temperature, sampling.top_k, sampling.top_p
        args.max_new_tokens = max_new_tokens
        return _serve_requests(args, model, tokenizer)
    streamer = _Streamer(tokenizer, Stopping.for_tokenizer(tokenizer, ignore_eos=args.ignore_eos), args.stop)
    if args.chat == CONVERSATION:
        return _converse(args, model, tokenizer, streamer, sampling, max_new_tokens)
    if args.chat is not None:  # one turn of an instruct model's conversation, rendered by its chat template
        messages = ([] if args.system is None else [{"role": "system", "content": args.system}])
        prompt = tokenizer.encode_chat(messages + [{"role": "user", "content": args.chat}])
    else:  # the text as the checkpoint's tokenizer encodes it: its BOS included
        prompt = tokenizer.encode(args.prompt)
        print(args.prompt, end="", flush=True)
    _reply(args, model, prompt, streamer, sampling, max_new_tokens)
    print()
    return 0


def _serve(args) -> int:
    """``jaxattn serve MODEL``: the OpenAI-compatible HTTP server (jaxattn.serve.http)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ValueError('jaxattn serve needs FastAPI and uvicorn: pip install "jaxattn[serve]"') from None
    from jaxattn.lm.generate import Stopping
    from jaxattn.lm.load import generation_defaults, load_any
    from jaxattn.lm.sampling import Sampling
    from jaxattn.serve import Engine, Request
    from jaxattn.serve.http import Server, serve

    for name in ("port", "slots", "page_size", "max_waiting", "prefill_chunk", "prefill_tokens"):
        if getattr(args, name) < (0 if name in ("port", "max_waiting") else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be >= {0 if name in ('port', 'max_waiting') else 1}, "
                             f"got {getattr(args, name)}")
    model, tokenizer, description = load_any(args.model, dtype=args.dtype, kernel=args.kernel)
    generation = generation_defaults(args.model)
    defaults = Request("", 16, Sampling(generation.get("temperature", 1.0), generation.get("top_k"),
                                        generation.get("top_p")))
    engine = Engine(model, slots=args.slots, page_size=args.page_size, stopping=Stopping.for_tokenizer(tokenizer),
                    speculative=args.speculative, cache_dtype=args.kv_cache, prefill_chunk=args.prefill_chunk,
                    prefill_tokens=args.prefill_tokens)
    server = Server(engine, tokenizer, model_name=args.served_model_name or args.model, defaults=defaults,
                    api_key=args.api_key, max_waiting=args.max_waiting)
    print(f"Serving {description} as {server.model_name!r} on http://{args.host}:{args.port}/v1 "
          f"({args.slots} slots, pages of {args.page_size}); Ctrl-C stops it", flush=True)
    serve(server, host=args.host, port=args.port)
    print(f"Stopped after {engine.stats.tokens:,} tokens in {engine.stats.steps:,} steps")
    return 0


def _inspect_induction(model, tokenizer, summary: str, seed: int):
    """Prints the induction test's strongest heads; returns ``(weights [L, H, T, T], labels,
    scores [L, H])`` of its first row."""
    from jaxattn.lm.inspection import describe_circuit, describe_induction, induction_circuit, induction_test

    tokens, weights, scores = induction_test(model, tokenizer, seed=seed)
    B, T = tokens.shape
    print(f"{summary}; induction test: {B} rows of {(T - len(tokenizer.encode(''))) // 2} random tokens, "
          "each written twice.")
    print("Induction heads (mean weight from a token's second occurrence on the token that followed its")
    print("first; 1 is a perfect induction head, 1/T a head that spreads its weight evenly):")
    for line in describe_induction(scores):
        print("  " + line)
    L, H = scores.shape
    if L >= 2 and L * H <= 64:  # a small model: find its circuit by zeroing each head (L x H forward passes)
        print("Which heads copying the repeat needs (each head zeroed in turn):")
        for line in describe_circuit(induction_circuit(model, tokenizer, seed=seed)):
            print("  " + line)
    return weights[:, 0], [tokenizer.label(int(t)) for t in tokens[0]], scores


def _inspect_text(args, model, tokenizer, summary: str):
    """Prints the next tokens and the head roles on ``args.text`` and draws the grid; returns
    ``(weights [L, H, T, T], labels)``."""
    import numpy as np

    from jaxattn import viz
    from jaxattn.lm.inspection import capture_attention, describe_heads, head_roles, top_next_tokens

    tokens = tokenizer.encode(args.text)
    if len(tokens) < 3:
        raise ValueError(f"the text {args.text!r} is {len(tokens)} token(s); inspect needs at least 3")
    if len(tokens) > model.config.max_length:
        raise ValueError(f"the text is {len(tokens)} tokens, more than the model's context of {model.config.max_length}")
    labels = [tokenizer.label(int(t)) for t in tokens]
    logits, weights = capture_attention(model, np.asarray(tokens)[None])
    weights = weights[:, 0]  # [L, H, T, T]: the one text
    print(f"{summary}; {len(tokens)} tokens: {' '.join(labels)}  (␣ is a space)")
    print(f"\nMost likely next tokens after {args.text!r}:")
    for rank, (label, token, probability) in enumerate(top_next_tokens(logits, tokenizer, args.top_k), start=1):
        print(f"  {rank:>2}. {label!r:<16} (id {token:>6}) {probability:7.2%}")
    print("\nWhat each head does on this text (mean weight of queries 3 to T, counting from 1, on the first token,")
    print("on the token before it and on itself):")
    for line in describe_heads(head_roles(weights)):
        print("  " + line if line else "")
    layers = None if args.layer is None else [args.layer]
    heads = None if args.head is None else [args.head]
    path = viz.attention_grid(weights, labels, args.out, layers=layers, heads=heads, title=f"Attention on {args.text!r}")
    print(f"\nHeatmaps (rows = layers, columns = heads; a row of a map is a query): {path}")
    return weights, labels


def _inspect(args) -> int:
    import numpy as np

    from jaxattn.lm.explorer import write_explorer
    from jaxattn.lm.load import load_any

    if args.text is None and not args.induction:
        raise ValueError("give a text to look at, or --induction to run the induction test")
    model, tokenizer, description = load_any(args.model, dtype=args.dtype, quantize=args.quantize)
    summary = f"{description}: {model.config.layers} layers x {model.config.heads} heads"
    scores = None
    if args.induction:
        weights, labels, scores = _inspect_induction(model, tokenizer, summary, args.seed)
        title = "Attention on random tokens written twice (the induction test)"
    if args.text is not None:  # the page shows the text when there is one
        if args.induction:
            print()
        weights, labels = _inspect_text(args, model, tokenizer, summary)
        title = f"Attention on {args.text!r}"
    if args.html is not None:
        page = write_explorer(args.html, np.asarray(weights), labels, title=title, description=summary, induction=scores)
        print(f"Explorer page (one file, opens offline): {page}")
    return 0


CONVERSATION = "\0conversation"  # --chat without a message: talk in the terminal


def build_parser() -> argparse.ArgumentParser:
    from jaxattn import __version__
    from jaxattn.functional.kernels import KERNEL_NAMES
    from jaxattn.lm.train import PRESETS

    parser = argparse.ArgumentParser(prog="jaxattn", description="Transformer attention from first principles, in JAX.")
    parser.add_argument("--version", action="version", version=f"jaxattn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    tour = commands.add_parser("tour", help="walk a sentence through attention, step by step")
    tour.add_argument("--text", default="The next day is bright", help="the sentence to walk through")
    tour.add_argument("--out", default="jaxattn-tour", help="folder for the figures (default: ./jaxattn-tour)")
    tour.add_argument("--seed", type=int, default=0, help="seed of the random embeddings and projections")
    tour.add_argument(
        "--checkpoint",
        default=None,
        help=f"trained run to predict with (default: {DEFAULT_RUN} if it exists, else a small model trained in OUT)",
    )
    tour.set_defaults(run=_tour)

    train = commands.add_parser("train", help="train the byte-level language model")
    train.add_argument("--data", default=None, help="UTF-8 text file (default: the stdlib's pydoc_data.topics)")
    train.add_argument("--preset", default="default", choices=list(PRESETS),
                       help="default: the byte-level model on text; induction: a 2-layer attention-only model on "
                            "random bytes written twice, until an induction head forms (about 2.5 minutes)")
    train.add_argument("--out", default=DEFAULT_RUN, help=f"run folder for checkpoints (default: {DEFAULT_RUN})")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace a different run already in --out")
    train.add_argument("--attention", default="gqa", choices=["mha", "gqa", "mqa", "mla"], help="attention family")
    train.add_argument("--kernel", default=None, choices=list(KERNEL_NAMES),
                       help="attention kernels (default: auto, the platform's: XLA on a CPU, cuDNN/Pallas on a GPU, Pallas on a TPU)")
    train.add_argument("--model-config", dest="model_config", default=None,
                       help="JSON file of TransformerConfig fields over the default model (e.g. today's attention)")
    train.add_argument("--layers", type=int, default=None)
    train.add_argument("--width", type=int, default=None)
    train.add_argument("--steps", type=int, default=None)
    train.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    train.add_argument("--seq-len", dest="seq_len", type=int, default=None)
    train.add_argument("--learning-rate", dest="learning_rate", type=float, default=None)
    train.add_argument("--eval-every", dest="eval_every", type=int, default=None)
    train.add_argument("--log-every", dest="log_every", type=int, default=None, help="record the train loss every N steps")
    train.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=None)
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--mesh", default=None,
                       help="train on a device mesh, e.g. data=2,model=2,seq=2 (batch, heads/hidden units, sequence)")
    train.add_argument("--cpu-devices", dest="cpu_devices", type=int, default=None,
                       help="make N virtual CPU devices (to try a mesh on one machine)")
    train.add_argument("--coordinator", default=None, help="HOST:PORT of process 0, for a multi-process run")
    train.add_argument("--num-processes", dest="num_processes", type=int, default=None)
    train.add_argument("--process-id", dest="process_id", type=int, default=None)
    train.set_defaults(run=_train)

    generate = commands.add_parser("generate", help="continue a prompt with a trained or a real model")
    generate.add_argument("--checkpoint", default=DEFAULT_RUN, help=f"run folder (default: {DEFAULT_RUN})")
    generate.add_argument("--model", default=None,
                          help="instead of --checkpoint: a Hugging Face folder or hub id (or a run folder)")
    generate.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                          help="parameters and computation of a Hugging Face model (auto: the checkpoint's own); "
                               "a run folder's weights (bfloat16)")
    generate.add_argument("--quantize", default=None, choices=["int8"],
                          help="int8 weights, one scale per output channel (fewer bytes to read per token)")
    generate.add_argument("--kernel", default=None, choices=list(KERNEL_NAMES),
                          help="attention kernels (default: the model's, auto: XLA on a CPU, cuDNN/Pallas on a GPU, "
                               "Pallas on a TPU; pallas on a CPU runs in interpret mode)")
    generate.add_argument("--kv-cache", dest="kv_cache", default=None, choices=["int8"],
                          help="int8 keys and values, one scale per token and head (fewer bytes to read at long contexts)")
    generate.add_argument("--prompt", default="The next day is bright")
    generate.add_argument("--chat", default=None, nargs="?", const=CONVERSATION,
                          help="instead of --prompt: a user message, in the checkpoint's chat template (instruct models)")
    generate.add_argument("--ignore-eos", dest="ignore_eos", action="store_true",
                          help="write --max-new-tokens tokens even past the end-of-sequence token")
    generate.add_argument("--system", default=None, help="with --chat: a system prompt")
    generate.add_argument("--stop", action="append", default=None,
                          help="end the reply where this text appears, without it (repeatable)")
    generate.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=None,
                          help="default: the checkpoint's generation config, else 200")
    generate.add_argument("--temperature", type=float, default=None,
                          help="0 = greedy; default: the checkpoint's generation config, else 0.8")
    generate.add_argument("--top-k", dest="top_k", type=int, default=None)
    generate.add_argument("--top-p", dest="top_p", type=float, default=None,
                          help="default: the checkpoint's generation config, else 0.95")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--no-cache", dest="no_cache", action="store_true", help="recompute the full pass per token")
    generate.add_argument("--requests", default=None,
                          help="serve many requests: a JSON-lines file (- for standard input), one {\"prompt\": ...} "
                               "a line (also id, max_new_tokens, temperature, top_k, top_p, seed)")
    generate.add_argument("--output", default=None, help="with --requests: the JSON-lines file of results")
    generate.add_argument("--slots", type=int, default=8, help="with --requests: sequences decoded together")
    generate.add_argument("--page-size", dest="page_size", type=int, default=16, help="with --requests: tokens per page")
    generate.add_argument("--speculative", type=int, default=0,
                          help="with --requests: draft tokens per greedy step, by prompt lookup (0: off)")
    generate.add_argument("--draft-model", dest="draft_model", default=None,
                          help="with --requests and --speculative: a small model with the same tokenizer that drafts "
                               "instead of prompt lookup")
    generate.set_defaults(run=_generate)

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming)")
    serve.add_argument("model", help="a Hugging Face folder or hub id, or a jaxattn run folder")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--slots", type=int, default=8, help="requests decoded together")
    serve.add_argument("--page-size", dest="page_size", type=int, default=16, help="tokens per page of the KV pool")
    serve.add_argument("--kv-cache", dest="kv_cache", default=None, choices=["int8"], help="int8 keys and values")
    serve.add_argument("--prefill-chunk", dest="prefill_chunk", type=int, default=256,
                       help="the most prompt tokens a step prefills per request")
    serve.add_argument("--prefill-tokens", dest="prefill_tokens", type=int, default=8192,
                       help="the most tokens one prefill call computes (smaller chunks when many prompts come at once)")
    serve.add_argument("--speculative", type=int, default=0, help="draft tokens per greedy step (prompt lookup)")
    serve.add_argument("--api-key", dest="api_key", default=None, help="require Authorization: Bearer KEY")
    serve.add_argument("--max-waiting", dest="max_waiting", type=int, default=64,
                       help="requests that may wait for a slot before new ones get 503")
    serve.add_argument("--served-model-name", dest="served_model_name", default=None,
                       help="the model's name in the API (default: MODEL as given)")
    serve.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    serve.add_argument("--kernel", default=None, choices=list(KERNEL_NAMES), help="attention kernels (default: auto)")
    serve.set_defaults(run=_serve)

    inspect = commands.add_parser("inspect", help="what the heads of a model attend to on a text")
    inspect.add_argument("model", help="a Hugging Face folder or hub id, or a jaxattn run folder")
    inspect.add_argument("text", nargs="?", default=None, help="the text to look at (optional with --induction)")
    inspect.add_argument("--top-k", dest="top_k", type=int, default=10, help="how many next tokens to list")
    inspect.add_argument("--layer", type=int, default=None, help="show only this layer")
    inspect.add_argument("--head", type=int, default=None, help="show only this head")
    inspect.add_argument("--out", default="attention.png", help="the heatmap PNG (default: ./attention.png)")
    inspect.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    inspect.add_argument("--quantize", default=None, choices=["int8"], help="int8 weights, one scale per output channel")
    inspect.add_argument("--html", default=None, help="also write the interactive explorer page (one offline HTML file)")
    inspect.add_argument("--induction", action="store_true",
                         help="score every head on the induction test (random tokens written twice)")
    inspect.add_argument("--seed", type=int, default=0, help="seed of the induction test's random tokens")
    inspect.set_defaults(run=_inspect)
    return parser


def _use_compilation_cache() -> None:
    """JAX's persistent compilation cache in ~/.cache/jaxattn/jax (unless JAX_COMPILATION_CACHE_DIR
    names another): a command's second run loads its compiled programs instead of compiling them
    (docs/serving.md has the time to the first token, cold and warm)."""
    import os
    from pathlib import Path

    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(Path.home() / ".cache" / "jaxattn" / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)  # a decode loop takes 0.2-2 s to compile


def main(argv=None) -> int:
    """Runs one command. What a user can fix (a bad value, a missing or unreadable file or
    checkpoint: ``ValueError`` and its ``LoadError``/``CheckpointError``, ``FileNotFoundError``,
    a diverging run) is one line on stderr and exit code 2; anything else is a bug, and its
    traceback is shown."""
    args = build_parser().parse_args(argv)
    if args.command in ("generate", "serve", "inspect"):
        _use_compilation_cache()
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        print(f"jaxattn {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # whatever was interrupted has said what it saved
        print(f"jaxattn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
