"""Prompt lookup drafting (n-gram matching, as vLLM's "ngram" speculator): the tokens that
followed the latest earlier occurrence of the text's last n tokens are proposed as drafts.

Code repeats itself (names, argument lists, whole lines), and small models repeat themselves
more, so the prompt and the output so far are often the best draft model there is, at no model
cost. Head 1 still verifies every draft, so output is unchanged. Each request keeps an index
from every n-gram (n = 1..max_n) to where it last ended, updated as tokens are committed, so a
proposal costs O(max_n) dictionary lookups, not a scan of the history.
"""

from __future__ import annotations

from typing import Sequence


class NGramIndex:
    """Where each n-gram of one growing token list last ended (n = 1..max_n)."""

    def __init__(self, max_n: int) -> None:
        self.max_n = max_n
        self.last: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # positions < indexed are in `last`

    def propose(self, history: Sequence[int], k: int, min_n: int = 1) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of history's longest
        suffix (of max_n down to min_n tokens) seen before; [] when none matches."""
        end = len(history) - 1  # the suffix ends here; index only earlier ends
        for i in range(self.indexed, end):
            for n in range(1, min(self.max_n, i + 1) + 1):
                self.last[tuple(history[i - n + 1 : i + 1])] = i
        self.indexed = max(self.indexed, end)
        for n in range(min(self.max_n, end + 1), min_n - 1, -1):
            j = self.last.get(tuple(history[end - n + 1 :]))
            if j is not None:
                return list(history[j + 1 : j + 1 + k])
        return []
