"""An OpenAI-compatible HTTP server over the engine: ``jaxattn serve MODEL``.

FastAPI, uvicorn and prometheus-client (the ``serve`` extra: ``pip install -e ".[serve]"``; this
module needs them, ``import jaxattn`` and ``jaxattn.serve`` never do). The endpoints answer in OpenAI's shapes, so its clients (``openai``, curl, the
tools built on them) work unchanged:

    POST /v1/completions        {"prompt": "...", "max_tokens": 16, "stream": false, ...}
    POST /v1/chat/completions   {"messages": [{"role": "user", "content": "..."}], ...}
    GET  /v1/models             the one model served
    GET  /health                200 once warmed up, 503 before
    GET  /metrics               Prometheus text: requests by outcome, tokens, running and waiting
                                requests, pages in use, time to first token, inter-token latency

How the parts meet. The engine runs in one thread (``EngineThread``) and nothing else touches
it: a request handler puts "submit" and "abort" commands into its inbox and receives the
engine's deltas (``Delta``: the tokens each step added) on an asyncio queue of its own. When
nothing runs, the thread blocks on the inbox (no polling). A handler turns tokens into text
with a ``TextStream`` (no broken characters, stop strings cut) and sends each piece as a
server-sent event, or the whole reply at the end. A client that goes away, or a stop string,
aborts the request in the engine, which frees its pages.

Bad input is a 400 with OpenAI's error body ``{"error": {"message", "type", "param",
"code"}}`` (malformed JSON, wrong types, values out of range, ``n`` other than 1, a prompt that
cannot fit); an unknown model a 404; a missing or wrong key (``--api-key``) a 401; a full
waiting queue a 503. The server stays up after each of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import queue
import threading
import time
import uuid
from typing import Callable

from fastapi import APIRouter, Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from jaxattn.lm.sampling import Sampling
from jaxattn.serve.engine import Delta, Engine
from jaxattn.serve.requests import Request, RequestError, parse_request
from jaxattn.serve.text import TextStream

FINISH_REASONS = {"eos": "stop", "length": "length", "stop": "stop"}  # the engine's -> OpenAI's


class ServerError(Exception):
    """An answer that is an HTTP error: its status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------- the engine's thread


class EngineThread:
    """The engine in a thread of its own, fed by a queue.

    ``submit(tokens, ..., deliver)`` returns the request's id at once; ``deliver(delta)`` is then
    called from the engine's thread with every ``Delta`` of that request, the last one carrying
    its ``finish_reason``. ``abort(id)`` ends a request early. ``after_step(engine)`` runs after
    every step (metrics).
    """

    def __init__(self, engine: Engine, *, after_step: Callable | None = None):
        self.engine, self.after_step = engine, after_step
        self.inbox: queue.Queue = queue.Queue()
        self.deliveries: dict[object, Callable[[Delta], None]] = {}
        self.ids = itertools.count()
        self.thread = threading.Thread(target=self._run, name="jaxattn-engine", daemon=True)
        self.ready = threading.Event()
        self.error: BaseException | None = None

    def start(self, *, warm_up: bool = True) -> None:
        self.warm_up = warm_up
        self.thread.start()

    def submit(self, tokens, *, max_new_tokens: int, sampling: Sampling, seed: int, deliver) -> int:
        request_id = next(self.ids)
        self.inbox.put(("submit", request_id, (tokens, max_new_tokens, sampling, seed), deliver))
        return request_id

    def abort(self, request_id) -> None:
        self.inbox.put(("abort", request_id, None, None))

    def stop(self) -> None:
        self.inbox.put(("stop", None, None, None))
        self.thread.join(timeout=30)

    def _run(self) -> None:
        try:
            if self.warm_up:
                self.engine.warm_up()
            self.ready.set()
            while True:
                commands = [self.inbox.get()] if not self.engine.busy else []  # idle: block until there is work
                while True:
                    try:
                        commands.append(self.inbox.get_nowait())
                    except queue.Empty:
                        break
                for command, request_id, arguments, deliver in commands:
                    if command == "stop":
                        return
                    if command == "submit":
                        tokens, max_new_tokens, sampling, seed = arguments
                        self.deliveries[request_id] = deliver
                        self.engine.submit(tokens, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                                           id=request_id)
                    elif command == "abort":
                        self.engine.abort(request_id)
                self._deliver(self.engine.take_deltas())  # refused at submit, aborted
                if self.engine.busy:
                    self.engine.step()
                    self._deliver(self.engine.take_deltas())
                    if self.after_step is not None:
                        self.after_step(self.engine)
        except BaseException as error:  # the server reports it on /health and to every waiting client
            self.error = error
            self.ready.set()
            self._deliver([Delta(request_id, [], "error") for request_id in list(self.deliveries)])
            raise

    def _deliver(self, deltas) -> None:
        """Hands a step's deltas over in one ``post``: one wake-up of the receivers' event loop a
        step, however many requests the step served."""
        handed = []
        for delta in deltas:
            deliver = self.deliveries.get(delta.id)
            if deliver is None:
                continue
            handed.append((deliver, delta))
            if delta.finish_reason is not None:
                del self.deliveries[delta.id]
        if handed:
            self.post(lambda: [deliver(delta) for deliver, delta in handed])


# ------------------------------------------------------------------------- the metrics


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("jaxattn_requests", "Requests by outcome", ["outcome"], registry=self.registry)
        self.prompt_tokens = Counter("jaxattn_prompt_tokens", "Prompt tokens of requests served", registry=self.registry)
        self.generated_tokens = Counter("jaxattn_generated_tokens", "Tokens generated", registry=self.registry)
        self.running = Gauge("jaxattn_running_requests", "Requests in a slot", registry=self.registry)
        self.waiting = Gauge("jaxattn_waiting_requests", "Requests waiting for a slot", registry=self.registry)
        self.pages = Gauge("jaxattn_pages_in_use", "Pages of the KV pool held", registry=self.registry)
        latency = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.first_token = Histogram("jaxattn_time_to_first_token_seconds", "From arrival to the first token",
                                     buckets=latency, registry=self.registry)
        self.inter_token = Histogram("jaxattn_inter_token_latency_seconds", "Between a request's successive tokens",
                                     buckets=latency, registry=self.registry)

    def after_step(self, engine: Engine) -> None:
        self.running.set(sum(sequence is not None for sequence in engine.running))
        self.waiting.set(len(engine.waiting))
        self.pages.set(engine.pool.in_use)

    def text(self) -> bytes:
        return generate_latest(self.registry)


# ------------------------------------------------------------------- reading a request


def _check_stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise RequestError(f"stop must be a string or a list of at most 4 strings, got {json.dumps(stop)[:80]}",
                           param="stop")
    return stops


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {\"role\", \"content\"} objects", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or \
                not isinstance(message.get("content"), str):
            raise RequestError(f"messages[{index}] must be an object with a string \"role\" and a string \"content\"",
                               param="messages")
    return [{"role": message["role"], "content": message["content"]} for message in messages]


class Reply:
    """One request, read: its prompt tokens and how to continue them."""

    def __init__(self, tokens, request: Request, stops: list[str], stream: bool, include_usage: bool):
        self.tokens, self.request, self.stops = tokens, request, stops
        self.stream, self.include_usage = stream, include_usage


class Server:
    """What the endpoints share: the model's name, its tokenizer, the engine's thread, the
    metrics, the defaults, the bound on waiting requests."""

    def __init__(self, engine: Engine, tokenizer, *, model_name: str, defaults: Request = Request(""),
                 api_key: str | None = None, max_waiting: int = 64, warm_up: bool = True):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.defaults, self.api_key, self.max_waiting = defaults, api_key, max_waiting
        self.metrics = Metrics()
        self.thread = EngineThread(engine, after_step=self.metrics.after_step)
        self.outstanding = 0  # requests submitted and not yet ended (the event loop's count)
        self.created = int(time.time())
        self.warm_up = warm_up

    def decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def read(self, body, *, chat: bool) -> Reply:
        """A request body -> ``Reply``; ``ServerError`` (400, 404) for what cannot be served."""
        if not isinstance(body, dict):
            raise ServerError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise ServerError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                              param="model", code="model_not_found")
        try:
            if body.get("n") not in (None, 1):
                raise RequestError(f"n must be 1 (one choice per request), got {json.dumps(body['n'])}", param="n")
            for name in ("stream",):
                if body.get(name) is not None and not isinstance(body[name], bool):
                    raise RequestError(f"{name} must be true or false, got {json.dumps(body[name])}", param=name)
            options = body.get("stream_options") or {}
            if not isinstance(options, dict):
                raise RequestError("stream_options must be an object", param="stream_options")
            stops = _check_stop(body.get("stop"))
            if chat:
                prompt_tokens = self.tokenizer.encode_chat(_check_messages(body.get("messages")))
                prompt = ""
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                    prompt = prompt[0]
                if isinstance(prompt, list) and prompt and all(type(token) is int for token in prompt):
                    prompt_tokens, prompt = self._token_ids(prompt), ""  # token ids, as OpenAI's API takes them
                elif isinstance(prompt, str):
                    prompt_tokens = self.tokenizer.encode(prompt)
                else:
                    raise RequestError("prompt must be a string, a list of one string, or a list of token ids",
                                       param="prompt")
            limit = body.get("max_completion_tokens") if chat else None
            limit = body.get("max_tokens") if limit is None else limit
            room = self.engine.max_length - len(prompt_tokens) - self.engine.speculative
            default_limit = self.defaults.max_new_tokens if not chat else max(1, room)
            fields = {"prompt": prompt, "max_new_tokens": limit, "temperature": body.get("temperature"),
                      "top_k": body.get("top_k"), "top_p": body.get("top_p"), "seed": body.get("seed")}
            request = parse_request(fields, Request("", default_limit, self.defaults.sampling, self.defaults.seed),
                                    unknown="ignore")
        except RequestError as error:
            param = {"max_new_tokens": "max_tokens"}.get(error.param, error.param)
            raise ServerError(400, str(error).replace("max_new_tokens", param or "max_tokens"), param=param) from None
        if request.sampling.temperature > 2:
            raise ServerError(400, f"temperature must be at most 2, got {request.sampling.temperature}", param="temperature")
        if not len(prompt_tokens):
            raise ServerError(400, "the prompt has no tokens", param="messages" if chat else "prompt")
        if len(prompt_tokens) + request.max_new_tokens + self.engine.speculative > self.engine.max_length:
            raise ServerError(400, f"the prompt's {len(prompt_tokens)} tokens plus max_tokens={request.max_new_tokens} "
                                   f"exceed the {self.engine.max_length} tokens a sequence may hold",
                              param="max_tokens", code="context_length_exceeded")
        return Reply(prompt_tokens, request, stops, bool(body.get("stream")), bool(options.get("include_usage")))

    def _token_ids(self, tokens: list[int]):
        vocab = self.engine.model.config.vocab_size
        if not all(0 <= token < vocab for token in tokens):
            raise RequestError(f"token ids must be in [0, {vocab}), the model's vocabulary", param="prompt")
        return tokens

    # --------------------------------------------------------------- serving one

    async def deltas(self, reply: Reply):
        """The engine's deltas of one request as they come: ``(request id, async iterator)``."""
        inbox: asyncio.Queue = asyncio.Queue()
        request_id = self.thread.submit(reply.tokens, max_new_tokens=reply.request.max_new_tokens,
                                        sampling=reply.request.sampling, seed=reply.request.seed,
                                        deliver=inbox.put_nowait)  # run in the loop (EngineThread.post)

        async def iterate():
            while True:
                delta = await inbox.get()
                yield delta
                if delta.finish_reason is not None:
                    return

        return request_id, iterate()

    async def pieces(self, reply: Reply, gone=None):
        """``(text, finish_reason or None, completion tokens)`` as the reply grows; the last piece
        has the finish reason. A stop string ends the request in the engine too, and so does the
        client going away (``await gone()`` true, asked with a delta, at most every 50 ms)."""
        self.outstanding += 1
        self.metrics.prompt_tokens.inc(len(reply.tokens))
        started, last = time.perf_counter(), None
        text, generated, outcome = TextStream(self.decode, reply.stops), 0, "aborted"
        request_id, deltas = await self.deltas(reply)
        try:
            asked = started
            async for delta in deltas:
                now = time.perf_counter()
                if gone is not None and now - asked > 0.05:  # asking costs: at most every 50 ms
                    asked = now
                    if await gone():
                        return  # the finally below aborts the request: its pages go back now
                if delta.tokens:
                    if last is None:
                        self.metrics.first_token.observe(now - started)
                    else:
                        self.metrics.inter_token.observe((now - last) / len(delta.tokens))
                    last = now
                    generated += len(delta.tokens)
                    self.metrics.generated_tokens.inc(len(delta.tokens))
                piece = text.add(delta.tokens)
                if text.stopped:
                    self.thread.abort(request_id)  # the engine may still run it: free its pages now
                    outcome = "stop"
                    yield piece, "stop", generated
                    return
                if delta.finish_reason is not None:
                    outcome = delta.finish_reason
                    if outcome == "error":
                        raise ServerError(500, "the engine failed", kind="server_error")
                    yield piece + text.finish(), FINISH_REASONS.get(outcome, outcome), generated
                    return
                if piece:
                    yield piece, None, generated
        finally:
            if outcome == "aborted":  # the client went away before the end
                self.thread.abort(request_id)
            self.metrics.requests.labels(outcome=FINISH_REASONS.get(outcome, outcome)).inc()
            self.outstanding -= 1

    def envelope(self, kind: str, request_id: str, choices: list, usage: dict | None = None) -> dict:
        body = {"id": request_id, "object": kind, "created": int(time.time()), "model": self.model_name,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    @staticmethod
    def usage(reply: Reply, generated: int) -> dict:
        return {"prompt_tokens": len(reply.tokens), "completion_tokens": generated,
                "total_tokens": len(reply.tokens) + generated}

    async def complete(self, reply: Reply, *, chat: bool) -> dict:
        """The whole reply at once."""
        pieces, finish, generated = [], None, 0
        async for piece, finish, generated in self.pieces(reply):
            pieces.append(piece)
        text = "".join(pieces)
        choice = {"index": 0, "finish_reason": finish, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        prefix = "chatcmpl-" if chat else "cmpl-"
        return self.envelope("chat.completion" if chat else "text_completion", prefix + uuid.uuid4().hex, [choice],
                             self.usage(reply, generated))

    async def events(self, reply: Reply, *, chat: bool, gone=None):
        """The reply as server-sent events: chunks, then ``data: [DONE]``. ``gone``: whether the
        client has gone away (an uvicorn that cannot write to it does not say so)."""
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice, usage=None):
            return f"data: {json.dumps(self.envelope(kind, request_id, choice, usage))}\n\n"

        if chat:  # the role first, as OpenAI's stream does
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                          "logprobs": None}])
        generated = 0
        async for piece, finish, generated in self.pieces(reply, gone):
            if piece or finish is not None:
                content = {"delta": {"content": piece} if piece else {}} if chat else {"text": piece}
                yield chunk([{"index": 0, **content, "finish_reason": finish, "logprobs": None}])
        if reply.include_usage:
            yield chunk([], self.usage(reply, generated))
        yield "data: [DONE]\n\n"


# ----------------------------------------------------------------------- the app


def create_app(server: Server):
    """The FastAPI application of ``server``: its routes, its errors, its lifespan (the engine
    thread starts with it and stops with it)."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.thread.post = asyncio.get_running_loop().call_soon_threadsafe  # deltas reach the handlers' loop
        server.thread.start(warm_up=server.warm_up)
        yield
        server.thread.stop()

    app = FastAPI(title="jaxattn", lifespan=lifespan)

    def error_response(error: ServerError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(ServerError)
    async def server_error(request, error: ServerError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, error):  # FastAPI's 422 becomes OpenAI's 400
        return error_response(ServerError(400, f"invalid request: {error.errors()[:1]}"))

    async def check_key(request: HTTPRequest):
        """The key, when the server has one, on every /v1/ route: a dependency of their router (an
        HTTP middleware would pass each streamed chunk through a queue and a task of its own:
        measured, 1.6 s of the event loop's time over benchmarks/serve.py's 64-request trace)."""
        if server.api_key is not None and request.headers.get("authorization") != f"Bearer {server.api_key}":
            raise ServerError(401, "a valid API key is needed: Authorization: Bearer KEY",
                              kind="authentication_error", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    async def body_of(request: HTTPRequest):
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ServerError(400, f"the request body is not JSON: {error}") from None

    async def answer(request: HTTPRequest, *, chat: bool):
        if server.thread.error is not None or not server.thread.ready.is_set():
            raise ServerError(503, "the server is not ready (warming up, or its engine failed)", kind="server_error")
        reply = server.read(await body_of(request), chat=chat)
        if server.outstanding >= server.engine.slots + server.max_waiting:
            raise ServerError(503, f"the server is busy: {server.outstanding} requests are running or waiting; "
                                   "try again later", kind="server_error", code="overloaded")
        if reply.stream:
            return StreamingResponse(server.events(reply, chat=chat, gone=request.is_disconnected),
                                     media_type="text/event-stream")
        return JSONResponse(await server.complete(reply, chat=chat))

    @v1.post("/completions")
    async def completions(request: HTTPRequest):
        return await answer(request, chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await answer(request, chat=True)

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "jaxattn"}]}

    @app.get("/health")
    async def health():
        if server.thread.error is not None:
            return JSONResponse({"status": "failed", "error": repr(server.thread.error)}, status_code=503)
        if not server.thread.ready.is_set():
            return JSONResponse({"status": "warming up"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.text(), media_type="text/plain; version=0.0.4")

    app.include_router(v1)  # after its routes: the app takes a copy of them
    return app


def serve(server: Server, *, host: str = "127.0.0.1", port: int = 8000, grace_s: float = 10.0) -> None:
    """Runs the server until Ctrl-C: then it stops accepting, lets running requests end for
    ``grace_s`` seconds (aborting what is left), and returns."""
    import uvicorn

    uvicorn.run(create_app(server), host=host, port=port, workers=1, log_level="warning",
                timeout_graceful_shutdown=grace_s)
