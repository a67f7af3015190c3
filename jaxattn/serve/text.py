"""Text as it streams: tokens in, text out, never a broken character, stop strings cut.

A token is not a character: a byte-level tokenizer splits "é" over two tokens, and decoding
the first alone gives the replacement character U+FFFD. So the stream decodes everything it
has (``decode(tokens)``) and sends only the part past what it already sent, and only once the
text does not end in half a character. The chunks it sends therefore concatenate to
``decode(tokens)`` of the whole reply: the streamed and the non-streamed text are the same.

Stop strings (OpenAI's ``stop``): the reply ends where one first appears, and the stop string
itself is not part of it. Text that could be the beginning of a stop string ("\\n\\nUs" with
the stop "\\n\\nUser:") is held back until the next tokens show it is not.
"""

from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of ``text`` could begin a stop string (0 if none)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class TextStream:
    """The text of one reply, as its tokens arrive.

    ``decode(tokens) -> str`` turns all the reply's tokens into text (special tokens skipped);
    ``stops`` the stop strings. ``add(tokens)`` returns the new text that is safe to send;
    ``finish()`` what was held back, once no more tokens come. ``stopped`` tells whether a stop
    string ended the reply (then later tokens add nothing); ``text`` is everything sent.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        self.decode, self.stops = decode, [stop for stop in stops if stop]
        self.tokens: list[int] = []
        self.text = ""
        self.stopped = False

    def _send(self, upto: str) -> str:
        new = upto[len(self.text):] if upto.startswith(self.text) else ""
        self.text += new
        return new

    def add(self, tokens) -> str:
        if self.stopped:
            return ""
        self.tokens.extend(int(token) for token in tokens)
        full = self.decode(self.tokens)
        for stop in self.stops:  # cut at each stop found: the earliest is cut last
            at = full.find(stop)
            if at >= 0:
                full, self.stopped = full[:at], True
        if self.stopped:
            return self._send(full)
        complete = full.rstrip(REPLACEMENT)  # half a character: wait for the rest of its bytes
        return self._send(complete[: len(complete) - held_back(complete, self.stops)])

    def finish(self) -> str:
        """The held-back rest, once the reply has ended without a stop string."""
        if self.stopped:
            return ""
        return self._send(self.decode(self.tokens))
