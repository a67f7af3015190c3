"""Text as it streams: tokens in, text out, never a broken character, stop strings cut.

A token is not a character: a byte-level tokenizer splits "é" over two tokens, and decoding
the first alone gives the replacement character U+FFFD; a SentencePiece tokenizer writes a
word's space as part of the word's first token, and drops it at the start of a text. So the
stream decodes a short window of the latest tokens twice, with and without the new ones
(``prefix`` and ``read`` offsets, as vLLM's incremental detokenizer does), takes the
difference as the new text, and waits while it ends in half a character. Each step costs a
few tokens' decoding, not the whole reply's. At the end, the whole reply is decoded once: the
chunks sent concatenate to ``decode(tokens)`` of the whole reply (the streamed and the
non-streamed text are the same, tested with the servers' own tokenizers).

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

    ``decode(tokens) -> str`` turns tokens into text (special tokens skipped); ``stops`` the stop
    strings. ``add(tokens)`` returns the new text that is safe to send; ``finish()`` what was held
    back, once no more tokens come. ``stopped`` tells whether a stop string ended the reply (then
    later tokens add nothing); ``text`` is everything sent.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        self.decode, self.stops = decode, [stop for stop in stops if stop]
        self.tokens: list[int] = []
        self.decoded = ""  # the reply's text so far, up to the read offset
        self.prefix, self.read = 0, 0  # tokens[prefix:read] is the window decoded last time
        self.text = ""
        self.stopped = False

    def _send(self, upto: str) -> str:
        new = upto[len(self.text):] if upto.startswith(self.text) else ""
        self.text += new
        return new

    def _visible(self) -> str:
        """The reply's text that is safe to show: ``decoded`` (the tokens up to the read offset)
        extended by the text of the newer tokens, without a trailing half character. The offsets
        move on only when the newer tokens end on a whole character."""
        before = self.decode(self.tokens[self.prefix : self.read])
        after = self.decode(self.tokens[self.prefix :])
        if not after.startswith(before):  # a tokenizer whose text is not local: wait for finish()
            return self.decoded
        if after.endswith(REPLACEMENT):  # half a character (or bytes that never make one) at the end
            return self.decoded + after.rstrip(REPLACEMENT)[len(before):]
        self.decoded += after[len(before):]
        self.prefix, self.read = self.read, len(self.tokens)
        return self.decoded

    def add(self, tokens) -> str:
        if self.stopped:
            return ""
        self.tokens.extend(int(token) for token in tokens)
        text = self._visible()
        for stop in self.stops:  # cut at each stop found: the earliest is cut last
            at = text.find(stop, max(0, len(self.text) - len(stop)))
            if at >= 0:
                text, self.stopped = text[:at], True
        if self.stopped:
            return self._send(text)
        return self._send(text[: len(text) - held_back(text, self.stops)])

    def finish(self) -> str:
        """The held-back rest, once the reply has ended without a stop string."""
        if self.stopped:
            return ""
        return self._send(self.decode(self.tokens))
