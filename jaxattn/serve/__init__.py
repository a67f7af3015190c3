"""Serving: many requests at once over a paged KV cache, in small parts that talk to each other.

- ``pages.py``: ``PagePool``, who holds which page, and the prefix table;
- ``runner.py``: ``ModelRunner``, the compiled calls and the arrays they take;
- ``drafts.py``: draft proposers for speculative decoding (prompt lookup, a draft model);
- ``engine.py``: ``Engine``, the scheduler (admission, preemption, steps), and its ``EngineStats``;
- ``requests.py``: what a request is, read from a file or a socket, checked in one place.
"""

from jaxattn.serve.drafts import DraftModel, PromptLookup, lookup_drafts
from jaxattn.serve.engine import Delta, Engine, EngineStats, Result, Sequence
from jaxattn.serve.pages import PagePool, prefix_keys
from jaxattn.serve.requests import Request, RequestError, parse_request, read_requests, serve_requests
from jaxattn.serve.runner import ModelRunner, bucket

__all__ = ["Delta", "DraftModel", "Engine", "EngineStats", "ModelRunner", "PagePool", "PromptLookup", "Request", "RequestError",
           "Result", "Sequence", "bucket", "lookup_drafts", "parse_request", "prefix_keys", "read_requests",
           "serve_requests"]
