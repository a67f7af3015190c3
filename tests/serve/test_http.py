"""``jaxattn serve`` as its users meet it: a real uvicorn on 127.0.0.1 serving a checkpoint with
a chat template (the qwen3 fixture), driven by the official ``openai`` client and by raw HTTP.
One server for the module (each xdist worker would start its own: the tests are one group)."""

import asyncio
import contextlib
import json
import socket
import threading
import time
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package itself uses
import openai
import pytest
import uvicorn
from openai.types import Completion
from openai.types.chat import ChatCompletionChunk
from prometheus_client.parser import text_string_to_metric_families

from jaxattn.cli import main
from jaxattn.lm.generate import Stopping
from jaxattn.lm.load import load_any
from jaxattn.lm.sampling import Sampling
from jaxattn.serve import Engine, Request
from jaxattn.serve.http import Server, create_app

pytestmark = pytest.mark.xdist_group("http-server")
MODEL = Path(__file__).parent.parent / "data" / "hf" / "qwen3"
NAME = "qwen3-tiny"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    """(base URL, Server): the server running in a thread of this process."""
    model, tokenizer, _ = load_any(MODEL)
    engine = Engine(model, slots=4, page_size=8, prefill_chunk=32, stopping=Stopping.for_tokenizer(tokenizer))
    server = Server(engine, tokenizer, model_name=NAME, defaults=Request("", 16, Sampling(temperature=0.0)),
                    max_waiting=32, warm_up=False)  # shapes compile as requests need them (jaxattn serve warms up)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health").status_code == 200:
                break
        time.sleep(0.1)
    else:
        raise RuntimeError("the server did not become healthy in 60 s")
    yield url, server
    uv.should_exit = True
    thread.join(timeout=20)


def client(url, **options):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, **options)


def generated_by_cli(capsys, *arguments) -> str:
    """What ``jaxattn generate`` prints at temperature 0."""
    capsys.readouterr()
    assert main(["generate", "--model", str(MODEL), "--temperature", "0", *arguments]) == 0
    return capsys.readouterr().out.rstrip("\n")


def test_completions_and_chat_give_generates_text_streamed_or_not(served, capsys):
    url, server = served
    api = client(url)
    prompt, message = "The next day is", "Hi there"
    expected_completion = generated_by_cli(capsys, "--prompt", prompt, "--max-new-tokens", "12")
    expected_chat = generated_by_cli(capsys, "--chat", message, "--max-new-tokens", "12")

    whole = api.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    assert prompt + whole.choices[0].text == expected_completion
    assert whole.object == "text_completion" and whole.model == NAME and whole.usage.completion_tokens >= 1
    streamed = "".join(chunk.choices[0].text for chunk in
                       api.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert streamed == whole.choices[0].text

    chat = api.chat.completions.create(model=NAME, messages=[{"role": "user", "content": message}],
                                       max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == expected_chat and chat.object == "chat.completion"
    assert chat.choices[0].finish_reason in ("stop", "length")
    chunks = list(api.chat.completions.create(model=NAME, messages=[{"role": "user", "content": message}],
                                              max_tokens=12, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2] if c.choices)
    assert chunks[-1].usage.total_tokens == chat.usage.total_tokens
    assert [model.id for model in api.models.list().data] == [NAME]


def test_stop_strings_cut_the_text_as_openai_does(served):
    url, _ = served
    api = client(url)
    full = api.completions.create(model=NAME, prompt="The next day is", max_tokens=16, temperature=0).choices[0].text
    stop = full[3:5]
    assert len(stop) == 2
    cut = full[: full.find(stop)]
    for stream in (False, True):
        reply = api.completions.create(model=NAME, prompt="The next day is", max_tokens=16, temperature=0, stop=[stop],
                                       stream=stream)
        text = "".join(c.choices[0].text for c in reply) if stream else reply.choices[0].text
        assert text == cut


def test_every_streamed_chunk_is_openais_shape_in_sse_framing(served):
    url, _ = served
    for path, body, model in (("/v1/completions", {"prompt": "Once", "max_tokens": 6}, Completion),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Yo"}], "max_tokens": 6},
                               ChatCompletionChunk)):
        with httpx.stream("POST", url + path, json={"model": NAME, "stream": True, "temperature": 0, **body}) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            raw = "".join(response.iter_text())
        events = raw.split("\n\n")
        assert events[-1] == "" and events[-2] == "data: [DONE]"
        finish_reasons = []
        for event in events[:-2]:
            assert event.startswith("data: ") and "\n" not in event
            fields = json.loads(event[len("data: "):])
            finish_reasons += [choice["finish_reason"] for choice in fields["choices"]]
            if model is Completion:  # its type has no null finish_reason, which every chunk but the last
                # carries (as OpenAI's own streams do; the client builds them without validating)
                fields["choices"] = [{**choice, "finish_reason": choice["finish_reason"] or "stop"}
                                     for choice in fields["choices"]]
            assert model.model_validate(fields).model == NAME
        assert finish_reasons[-1] in ("stop", "length") and set(finish_reasons[:-1]) <= {None}


def test_the_benchmarks_raw_client_reads_every_event_of_a_stream(served):
    """benchmarks/serve.py's load generator (raw HTTP/1.1, chunked transfer encoding split into
    events by hand) reads the same events as a real client: the text, the finish and the usage."""
    import asyncio

    from benchmarks.serve import stream_completion

    url, _ = served
    whole = client(url).completions.create(model=NAME, prompt="Once upon", max_tokens=10, temperature=0)
    events = []
    body = {"model": NAME, "prompt": "Once upon", "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    asyncio.run(stream_completion(int(url.rsplit(":", 1)[1]), body, lambda data: events.append(json.loads(data))))
    choices = [event["choices"][0] for event in events if event["choices"]]
    assert "".join(choice["text"] for choice in choices) == whole.choices[0].text
    assert choices[-1]["finish_reason"] == whole.choices[0].finish_reason
    usage = whole.usage
    assert events[-1]["usage"] == {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                                   "total_tokens": usage.total_tokens}


def test_sixteen_concurrent_streams_each_get_their_own_text(served):
    url, _ = served
    prompts = [f"Item {i}: the" for i in range(16)]
    api = client(url)
    expected = [api.completions.create(model=NAME, prompt=p, max_tokens=10, temperature=0).choices[0].text
                for p in prompts]

    async def one(api, prompt):
        stream = await api.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0, stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def together():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0) as api:
            return await asyncio.gather(*(one(api, p) for p in prompts))

    assert asyncio.run(together()) == expected


def wait_until(condition, seconds=10.0):
    deadline = time.time() + seconds
    while time.time() < deadline and not condition():
        time.sleep(0.02)
    return condition()


def aborted(server) -> float:
    return server.metrics.requests.labels(outcome="aborted")._value.get()


@contextlib.contextmanager
def slow_steps(server, seconds=0.1):
    """Each engine step takes ``seconds`` longer: requests stay running while a test acts on them."""
    server.engine.on_step = lambda engine: time.sleep(seconds)
    try:
        yield
    finally:
        server.engine.on_step = None


def test_a_client_that_goes_away_frees_its_pages(served):
    url, server = served
    tokens, before = server.engine.stats.tokens, aborted(server)
    body = json.dumps({"prompt": "Tell", "max_tokens": 60, "temperature": 0, "stream": True}).encode()
    host, port = url.removeprefix("http://").split(":")
    # Steps of 0.3 s (8 tokens each): the 60 tokens would take 8 of them; the hang-up is seen within one or two.
    with slow_steps(server, 0.3), socket.create_connection((host, int(port))) as connection:  # a client that hangs up
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        while b"data: {" not in received:  # the first chunk: the request runs; now hang up
            received += connection.recv(4096)
    assert wait_until(lambda: server.outstanding == 0 and server.engine.pool.in_use == 0 and not server.engine.busy)
    assert aborted(server) == before + 1
    assert server.engine.stats.tokens - tokens < 50  # it was stopped, not run to its end


BAD = [
    ("not json", b"{prompt:", 400, None),
    ("wrong type", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("out of range", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("too many choices", {"prompt": "x", "n": 2}, 400, "n"),
    ("prompt too long", {"prompt": "word " * 80}, 400, "max_tokens"),
    ("no prompt", {"max_tokens": 3}, 400, "prompt"),
    ("bad stop", {"prompt": "x", "stop": 7}, 400, "stop"),
    ("unknown model", {"prompt": "x", "model": "gpt-9"}, 404, "model"),
]


@pytest.mark.parametrize("name,body,status,param", BAD, ids=[row[0] for row in BAD])
def test_bad_input_gets_its_status_and_openais_error_body_then_the_server_serves(served, name, body, status, param):
    url, _ = served
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(url + "/v1/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["param"] == param
    good = httpx.post(url + "/v1/completions", json={"prompt": "Fine", "max_tokens": 2})
    assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_key_and_a_full_queue_are_refused_then_the_server_serves(served):
    url, server = served
    server.api_key = "sesame"
    try:
        with pytest.raises(openai.AuthenticationError):
            client(url).completions.create(model=NAME, prompt="x", max_tokens=2)
        assert client(url, ).with_options(api_key="sesame").completions.create(model=NAME, prompt="x", max_tokens=2)
        refused = httpx.get(url + "/v1/models")  # every /v1/ route; /health and /metrics stay open
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/health").status_code == 200
    finally:
        server.api_key = None

    async def crowd():
        server.max_waiting = 0  # every slot taken means full
        async with httpx.AsyncClient(base_url=url) as http:
            body = {"prompt": "Tell", "max_tokens": 40, "temperature": 0, "stream": True}  # no end token in 40
            streams = [http.stream("POST", "/v1/completions", json=body) for _ in range(server.engine.slots)]
            responses = [await stream.__aenter__() for stream in streams]
            lines = [response.aiter_lines() for response in responses]  # kept: a dropped one hangs up
            for each in lines:  # each one's first chunk: all of them run
                await each.__anext__()
            refused = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            for stream in streams:
                await stream.__aexit__(None, None, None)
            return refused, responses

    try:
        with slow_steps(server, 0.2):  # a request of 40 tokens runs 5 steps of 8: 1 s
            refused, responses = asyncio.run(crowd())
    finally:
        server.max_waiting = 32
    assert all(response.status_code == 200 for response in responses)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
    assert wait_until(lambda: server.outstanding == 0)
    assert client(url).completions.create(model=NAME, prompt="x", max_tokens=2).choices[0].finish_reason


def test_metrics_parse_with_prometheus_clients_parser(served):
    url, _ = served
    client(url).completions.create(model=NAME, prompt="Count", max_tokens=3)
    families = {family.name: family for family in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    for name in ("jaxattn_requests", "jaxattn_prompt_tokens", "jaxattn_generated_tokens", "jaxattn_running_requests",
                 "jaxattn_waiting_requests", "jaxattn_pages_in_use", "jaxattn_time_to_first_token_seconds",
                 "jaxattn_inter_token_latency_seconds"):
        assert name in families, name
    served_total = sum(s.value for s in families["jaxattn_requests"].samples if s.name == "jaxattn_requests_total")
    assert served_total >= 1
    assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_jaxattn_serve_answers_then_ctrl_c_lets_the_running_request_end_and_exits_0():
    import signal
    import subprocess
    import sys

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "jaxattn", "serve", str(MODEL), "--port", str(port), "--slots", "1",
                                "--prefill-chunk", "16", "--served-model-name", NAME],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _healthy(url), seconds=90), process.stdout.read() if process.poll() is not None else ""
        with httpx.stream("POST", url + "/v1/completions", json={"prompt": "Go", "max_tokens": 30, "temperature": 0,
                                                                   "stream": True}, timeout=60) as response:
            lines = response.iter_lines()
            next(lines)
            process.send_signal(signal.SIGINT)  # while the request runs: it is let to finish
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert process.wait(timeout=30) == 0
        assert "Stopped after" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()


def _healthy(url) -> bool:
    try:
        return httpx.get(url + "/health").status_code == 200
    except httpx.HTTPError:
        return False
