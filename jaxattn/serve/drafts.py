"""Draft proposers for speculative decoding: tokens a greedy sequence may accept in one call.

Every greedy decode step proposes up to k tokens per sequence; the model verifies them all
in one call of 1 + k tokens and keeps the drafts that equal its own greedy tokens. Two
proposers, one interface (``propose(sequences, room) -> {slot: tokens}``; ``prefill`` and
``warm_up`` for the pools a proposer keeps, ``calls`` for the compiled calls it made):

- ``PromptLookup``: the tokens that followed the latest earlier occurrence of the sequence's
  last n-gram (Saxena 2023): free, and good on text that repeats its prompt.
- ``DraftModel``: a small model with the same vocabulary drafts k tokens greedily
  (Leviathan et al. 2023, arXiv 2211.17192); its keys and values live in pools of its own,
  read through the same page tables.
"""

from __future__ import annotations

from typing import Callable

from jaxattn.serve.runner import ModelRunner


def lookup_drafts(tokens: list[int], room: int, ngram: int) -> list[int]:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the last
    n-gram of ``tokens`` (n = ngram .. 1), at most ``room`` of them."""
    if room < 1:
        return []
    for n in range(min(ngram, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == tail:
                # Copy what followed, reading on into the copy itself when it reaches the end
                # (as LZ77 does): a repeat of period p drafts ``room`` tokens, not p - n.
                draft = []
                for j in range(start + n, start + n + room):
                    draft.append(tokens[j] if j < len(tokens) else draft[j - len(tokens)])
                return draft
    return []


class PromptLookup:
    """Drafts by prompt lookup; needs no model and no pools, so it prefills and compiles nothing."""

    calls = 0

    def __init__(self, ngram: int = 3):
        self.ngram = ngram

    def prefill(self, rows, T: int) -> None:
        pass

    def warm_up(self, chunks: dict[int, list[int]]) -> int:
        return 0

    def propose(self, sequences, room: Callable) -> dict[int, list[int]]:
        return {sequence.slot: lookup_drafts(sequence.tokens, room(sequence), self.ngram) for sequence in sequences}


class DraftModel:
    """Drafts with a small model. Its pools hold ``sequence.draft_cached`` tokens of each
    sequence; the engine rolls that count back past rejected drafts, as it does its own."""

    def __init__(self, runner: ModelRunner, k: int):
        self.runner, self.k = runner, k

    @property
    def calls(self) -> int:
        return self.runner.calls

    @staticmethod
    def length_of(sequence) -> int:
        return sequence.draft_cached

    def prefill(self, rows, T: int) -> None:
        """Reads the rows' prompt chunks into the draft model's pools, as the model reads them."""
        self.runner.call(rows, T, lengths_of=self.length_of)

    def propose(self, sequences, room: Callable) -> dict[int, list[int]]:
        """One call writes the tokens the draft pools lack (one, or two when every draft was
        accepted) and drafts k tokens for every sequence with room; its pools then hold all but
        the last draft."""
        drafting = [sequence for sequence in sequences if room(sequence) > 0]
        if not drafting:
            return {}
        drafts = self.runner.draft([(s, s.tokens[s.draft_cached :]) for s in drafting], self.k, lengths_of=self.length_of)
        for sequence in drafting:
            sequence.draft_cached = len(sequence.tokens) + self.k - 1
        return {sequence.slot: drafts[row, : room(sequence)].tolist() for row, sequence in enumerate(drafting)}

    def warm_up(self, chunks: dict[int, list[int]]) -> int:
        """Compiles every shape the draft model is called with (``chunks``: the prefill chunks
        of each bucket of rows); returns their number."""
        for R, tokens in chunks.items():
            for T in tokens:
                self.runner.call([], T, lengths_of=self.length_of, R=R)
            self.runner.draft([], self.k, lengths_of=self.length_of, R=R)
        return sum(len(tokens) + 1 for tokens in chunks.values())


