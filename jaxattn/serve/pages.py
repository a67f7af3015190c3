"""Pages on the host: who holds which page of the KV pool, and which prefix a page holds.

The pool's arrays live on the device (``PagedKVCache``); which sequence holds which page
is plain Python between calls. Shape letters: none (page numbers and token lists).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from jaxattn.functional.kv_cache import TRASH_PAGE


def prefix_keys(tokens: list[int], page_size: int) -> list[tuple]:
    """The prefixes of a prompt that end at each of its full pages, leaving at least its last
    token to compute (its logits give the first new token): the keys of the prefix table."""
    full = (len(tokens) - 1) // page_size
    return [tuple(tokens[: (i + 1) * page_size]) for i in range(full)]


class PagePool:
    """Who holds which page: a free list, a reference count per page, and the prefix table
    (the tokens of a prompt up to the end of one of its pages -> the page that holds them).

    Page ``TRASH_PAGE`` is never handed out. When its last holder lets a page go, it returns
    to the free list, unless it holds a prefix of the table: then it stays *cached*, still
    found by the table, so that a later request with the same prefix takes it back instead
    of computing it again (vLLM's automatic prefix caching), until the free list runs out
    and the least recently released cached page is reused (its entry leaves the table).
    """

    def __init__(self, pages: int):
        self.pages = pages
        self.free = deque(page for page in range(pages) if page != TRASH_PAGE)
        self.cached: dict[int, None] = {}  # unreferenced pages that hold a prefix, least recently released first
        self.evicted = 0  # cached pages taken for new tokens
        self.references = np.zeros(pages, np.int64)
        self.prefix_page: dict[tuple, int] = {}
        self.page_prefix: dict[int, tuple] = {}

    @property
    def in_use(self) -> int:
        """Pages some sequence holds (cached ones are not: they can be reused at once)."""
        return self.pages - 1 - len(self.free) - len(self.cached)

    @property
    def available(self) -> int:
        return len(self.free) + len(self.cached)

    def take(self) -> int:
        """A page for new tokens: a free one, else the least recently released cached one."""
        if self.free:
            page = self.free.popleft()
        else:
            page = next(iter(self.cached))
            del self.cached[page]
            del self.prefix_page[self.page_prefix.pop(page)]
            self.evicted += 1
        self.references[page] = 1
        return page

    def share(self, page: int) -> int:
        """One more holder of a page of the prefix table (taken back from the cache if unheld)."""
        self.cached.pop(page, None)
        self.references[page] += 1
        return page

    def release(self, page: int) -> None:
        self.references[page] -= 1
        if self.references[page] == 0:
            if page in self.page_prefix:
                self.cached[page] = None
            else:
                self.free.append(page)

    def register(self, prefix: tuple, page: int) -> None:
        """Page ``page`` holds the last page of ``prefix`` (its whole tokens, computed)."""
        if prefix not in self.prefix_page and page not in self.page_prefix:
            self.prefix_page[prefix] = page
            self.page_prefix[page] = prefix
