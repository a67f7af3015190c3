"""What a request is, read from a JSON-lines file (``jaxattn generate --requests``) and, with
the same validation, from any other way in.

A request is a JSON object: ``prompt`` (text, required), and optionally ``id`` (a string or an
integer, echoed in its result), ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``,
``seed``; a field given as ``null`` takes its default. ``parse_request`` checks each field and
says in plain words what is wrong ("temperature must be a number, got 'hot'").

A requests file is read line by line, as bytes: a line that is not UTF-8, not JSON, not an
object or not a valid request becomes an error result of its own (with the request's ``id``
when the line has one, and always its line number), and every other line is served. Blank
lines are not requests and get no result.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Iterable, Iterator

from jaxattn.functional.checks import check_int, check_number
from jaxattn.lm.sampling import Sampling


class RequestError(ValueError):
    """A request that cannot be served as sent; ``param`` names the field at fault, if one is."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class Request:
    """One request, checked: the prompt text and how to continue it."""

    prompt: str
    max_new_tokens: int = 200
    sampling: Sampling = Sampling()
    seed: int = 0
    id: object = None


def _text(name, value):
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    return value


def _identifier(name, value):
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{name} must be a string or an integer, got {value!r}")
    return value


# Each field: its check (raising ValueError with the words a user reads).
FIELDS: dict[str, Callable] = {
    "prompt": _text,
    "id": _identifier,
    "max_new_tokens": lambda name, value: check_int(name, value, minimum=1),
    "temperature": lambda name, value: check_number(name, value, minimum=0),
    "top_k": lambda name, value: check_int(name, value, minimum=1),
    "top_p": lambda name, value: check_number(name, value, above=0, maximum=1),
    "seed": lambda name, value: check_int(name, value, minimum=0, maximum=2**31 - 1),
}


def parse_request(fields, defaults: Request = Request(""), *, unknown: str = "error") -> Request:
    """A JSON object's fields -> a checked ``Request``, each field missing (or null) taken from
    ``defaults``. ``unknown="error"`` refuses a field it does not know (a misspelt
    ``max_tokens`` would otherwise be ignored silently); ``"ignore"`` skips it, as an HTTP API
    whose clients send extra fields does. Raises ``RequestError`` naming the field."""
    if not isinstance(fields, dict):
        raise RequestError(f"a request is a JSON object with a \"prompt\", got a JSON {type(fields).__name__}: "
                           f"{json.dumps(fields)[:60]}")
    checked = {}
    for name, value in fields.items():
        if name not in FIELDS:
            if unknown == "error":
                raise RequestError(f"unknown field {name!r} (the fields are {', '.join(FIELDS)})", param=name)
            continue
        if value is not None:
            try:
                checked[name] = FIELDS[name](name, value)
            except ValueError as error:
                raise RequestError(str(error), param=name) from None
    if "prompt" not in checked:
        raise RequestError("the request has no \"prompt\" (the text to continue)", param="prompt")
    base = defaults.sampling
    sampling = Sampling(temperature=checked.get("temperature", base.temperature), top_k=checked.get("top_k", base.top_k),
                        top_p=checked.get("top_p", base.top_p))
    return Request(checked["prompt"], checked.get("max_new_tokens", defaults.max_new_tokens), sampling,
                   checked.get("seed", defaults.seed), checked.get("id", defaults.id))


def _id_of(fields):
    """The id a line asked for, if it is one a result can carry (else None)."""
    value = fields.get("id") if isinstance(fields, dict) else None
    return value if isinstance(value, (str, int)) and not isinstance(value, bool) else None


def read_requests(lines: Iterable[bytes], defaults: Request = Request("")) -> Iterator[tuple[int, Request | RequestError, object]]:
    """``(line number, request or the error that line is, id)`` for every line that is not
    blank; ``id`` is the request's own, else its line number."""
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            yield number, RequestError(f"the line is not UTF-8 text (byte {raw[error.start]:#04x} at column "
                                       f"{error.start + 1})"), number
            continue
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as error:
            yield number, RequestError(f"the line is not JSON ({error.msg} at column {error.colno})"), number
            continue
        own_id = _id_of(fields)
        try:
            request = parse_request(fields, defaults)
        except RequestError as error:
            yield number, error, number if own_id is None else own_id
            continue
        request = dataclasses.replace(request, id=number if request.id is None else request.id)
        yield number, request, request.id


def result_record(request_id, line: int, tokens, finish_reason: str, text: str, error: str | None = None) -> dict:
    """One line of a results file."""
    record = {"id": request_id, "line": line, "text": text, "tokens": [int(t) for t in tokens],
              "finish_reason": finish_reason}
    if error is not None:
        record["error"] = error
    return record


def serve_requests(engine, tokenizer, lines: Iterable[bytes], write: Callable[[dict], None], *,
                   defaults: Request = Request(""), on_result: Callable | None = None) -> dict:
    """Serves every request of ``lines`` through ``engine``; ``write(record)`` is called with
    each result as it finishes, error results first. Returns ``{"served", "rejected"}``."""
    lines_of, rejected, served = {}, 0, 0
    for number, request, request_id in read_requests(lines, defaults):
        if isinstance(request, RequestError):
            write(result_record(request_id, number, [], "error", "", str(request)))
            rejected += 1
            continue
        key = ("line", number)  # the engine's id; the user's id may repeat across lines
        lines_of[key] = (request.id, number)
        engine.submit(tokenizer.encode(request.prompt), id=key, max_new_tokens=request.max_new_tokens,
                      sampling=request.sampling, seed=request.seed)
    for result in engine.run():
        request_id, number = lines_of[result.id]
        write(result_record(request_id, number, result.tokens, result.finish_reason,
                            tokenizer.decode(result.tokens, skip_special_tokens=True), result.error))
        served += 1
        if on_result is not None:
            on_result(result)
    return {"served": served, "rejected": rejected}
