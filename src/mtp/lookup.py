"""Prompt lookup drafting (n-gram matching, as vLLM's "ngram" speculator): the tokens that
followed the latest earlier occurrence of the text's longest suffix (max_n..1 tokens) are
proposed as drafts; where fewer than k follow it, the repeat the match implies goes on.

Code repeats itself (names, argument lists, whole lines), and small models repeat themselves
more, so the prompt and the output so far are often the best draft model there is, at no model
cost. Head 1 still verifies every draft, so output is unchanged. Each request keeps an index
from every n-gram (n = 1..max_n) to where it last ended, updated as tokens are committed, so a
proposal costs O(max_n) dictionary lookups and O(k) copying, not a scan of the history.

vLLM's proposer (v1 `ngram_proposer.py`, 0.32) takes the same longest suffix but its earliest
occurrence, and proposes only the tokens up to the end of the text (fewer than k near the end).
Replayed on the same greedy outputs (`replay_lookup`, bench/bench_lookup.py), the latest
occurrence accepts more (its text is the most recent, so the most alike), and continuing the
repeat adds a little in loops shorter than k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

Proposer = Callable[[Sequence[int], int], list[int]]  # (history, k) -> up to k drafts


class NGramIndex:
    """Where each n-gram of one growing token list last ended (n = 1..max_n)."""

    def __init__(self, max_n: int) -> None:
        self.max_n = max_n
        self.last: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # positions < indexed are in `last`

    def propose(self, history: Sequence[int], k: int, min_n: int = 1) -> list[int]:
        """k tokens that followed the latest earlier occurrence of history's longest suffix (of
        max_n down to min_n tokens) seen before; [] when none matches. Where fewer than k tokens
        follow that occurrence (it ended p < k tokens before the suffix), the text is taken to
        repeat with period p past its end: draft i = draft i - p."""
        end = len(history) - 1  # the suffix ends here; index only earlier ends
        for i in range(self.indexed, end):
            for n in range(1, min(self.max_n, i + 1) + 1):
                self.last[tuple(history[i - n + 1 : i + 1])] = i
        self.indexed = max(self.indexed, end)
        for n in range(min(self.max_n, end + 1), min_n - 1, -1):
            j = self.last.get(tuple(history[end - n + 1 :]))
            if j is not None:
                drafts = list(history[j + 1 : j + 1 + k])
                while len(drafts) < k:  # text[end + i] = text[j + i], drafts included
                    drafts.append(drafts[len(drafts) - (end - j)])
                return drafts
        return []


@dataclass
class ReplayCount:
    """Passes of a replayed decode (see `replay_lookup`), added up over requests."""

    tokens: int = 0
    forwards: int = 0  # passes, the prefill included (as GenerationResult.row_forwards)
    drafted: int = 0  # verify passes with at least one proposed draft
    accepted: int = 0  # drafts accepted in those passes

    @property
    def tokens_per_forward(self) -> float:
        """What `mtp bench decode` reports: tokens over all passes, the prefill's included."""
        return self.tokens / self.forwards if self.forwards else 0.0

    @property
    def per_drafted_pass(self) -> float:
        """What vLLM's metrics give (1 + accepted drafts / passes that had drafts): passes
        without a proposal, and the prefill, are left out."""
        return 1 + self.accepted / self.drafted if self.drafted else 1.0

    def __iadd__(self, other: "ReplayCount") -> "ReplayCount":
        self.tokens += other.tokens
        self.forwards += other.forwards
        self.drafted += other.drafted
        self.accepted += other.accepted
        return self


def replay_lookup(prompt: Sequence[int], output: Sequence[int], k: int, propose: Proposer, *,
                  pad: bool = True, limit: int | None = None) -> ReplayCount:
    """Replay greedy prompt-lookup decoding of a known greedy `output` after `prompt`, without a
    model, stopping after `limit` tokens (default: all of `output`): the prefill gives output[0];
    each later pass verifies the drafts `propose` makes from the text so far, accepts their
    longest prefix that equals the output, and adds one token from head 1. `pad`: fill a short
    proposal up to k with repeats of the last token, as the decoder's chain does (vLLM verifies
    only what was proposed). Drafts are checked against all of `output`, so a longer output
    than `limit` counts acceptance past the limit as vLLM's metrics do; tokens stop at it.
    `propose` is called on the growing text of one request, as in the decoder. Counts are
    exact: tokens per forward equal `speculative_generate(..., drafter="lookup")`'s."""
    limit = len(output) if limit is None else min(limit, len(output))
    done = min(1, limit)
    count = ReplayCount(tokens=done, forwards=done)
    text = list(prompt) + list(output[:done])
    while done < limit:
        drafts = list(propose(text, k))[:k]
        proposed = bool(drafts)
        if pad:
            drafts += [text[-1]] * (k - len(drafts))
        accepted = 0
        while accepted < len(drafts) and done + accepted < len(output) and drafts[accepted] == output[done + accepted]:
            accepted += 1
        if proposed:
            count.drafted += 1
            count.accepted += accepted
        step = min(accepted + 1, limit - done)
        text += output[done : done + step]
        done += step
        count.tokens += step
        count.forwards += 1
    return count
