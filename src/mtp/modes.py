"""Decoding modes: one object for "how to decode", whichever way it was asked for.

A `DecodeMode` is plain decoding (one token per forward, greedy or sampled), a chain of k drafts
(from the heads, from prompt lookup, or lookup where it matches else the heads) or a Medusa tree.
Two spellings build one:

    parse_mode("spec3+lookup")             the benchmark's: greedy | spec<k> | spec<k>+lookup |
                                           lookup<k> | tree | tree:3,2,1
    mode_from_flags("3", drafter="both")   `mtp generate` / `mtp eval-code`: --speculative k|tree
                                           and --drafter heads|lookup|both

and `DecodeMode.run` hands the request to `generate`, `speculative_generate` or `tree_generate`.
Every error is a one-line `GenerationError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Collection

from .generate import GenerationError, GenerationResult, TokenCallback, generate
from .model import MTPModel
from .speculative import DRAFTERS, DraftTree, chain_for, check_tree, default_tree, speculative_generate, tree_generate

KINDS = ("plain", "chain", "tree")
MODE_GRAMMAR = "greedy, spec<k>, spec<k>+lookup, lookup<k>, tree or tree:3,2,1"
# [0-9] rather than \d or str.isdigit: those accept digits such as "³" that int() refuses.
_CHAIN = re.compile(r"spec([0-9]+)(\+lookup)?|lookup([0-9]+)")
_NUMBER = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class DecodeMode:
    """kind "plain": `generate`; "chain": k drafts per verify pass from `drafter` (see DRAFTERS);
    "tree": the draft tree of per-depth `widths` (None: DEFAULT_TREE fitted to the model).
    Checked on construction; str() is the benchmark spelling, and parse_mode(str(m)) == m."""

    kind: str = "plain"
    k: int | None = None  # chain only
    widths: tuple[int, ...] | None = None  # tree only
    drafter: str = "heads"  # chain only, when not "heads"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GenerationError(f"decoding kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.drafter not in DRAFTERS:
            raise GenerationError(f"drafter must be one of {', '.join(DRAFTERS)}, got {self.drafter!r}")
        if self.kind != "chain" and self.drafter != "heads":
            raise GenerationError(f"--drafter {self.drafter} drafts a chain: give it with --speculative k")
        if self.kind == "chain" and (not isinstance(self.k, int) or self.k < 1):
            raise GenerationError(f"k must be >= 1 drafts, got k={self.k}")
        if self.kind != "chain" and self.k is not None:
            raise GenerationError(f"k (drafts) goes with kind 'chain', not {self.kind!r}")
        if self.widths is not None:
            if self.kind != "tree":
                raise GenerationError(f"tree widths go with kind 'tree', not {self.kind!r}")
            object.__setattr__(self, "widths", tuple(self.widths))  # hashable whatever sequence came in
            DraftTree.from_branching(self.widths)  # positive widths, or its one-line error

    def __str__(self) -> str:
        if self.kind == "plain":
            return "greedy"
        if self.kind == "tree":
            return "tree" if self.widths is None else "tree:" + ",".join(map(str, self.widths))
        return {"heads": f"spec{self.k}", "both": f"spec{self.k}+lookup", "lookup": f"lookup{self.k}"}[self.drafter]

    @property
    def flags(self) -> str:
        """How `mtp generate` spells the mode, for messages (the benchmark spelling where it has none)."""
        if self.kind == "tree" and self.widths is None:
            return "--speculative tree"
        if self.kind == "chain":
            return f"--speculative {self.k}" + ("" if self.drafter == "heads" else f" --drafter {self.drafter}")
        return str(self)

    def check_temperature(self, temperature: float) -> None:
        """Tree and prompt-lookup drafts are verified greedily: refuse a temperature they would
        ignore or that the decoder would reject later (after the model is loaded)."""
        if temperature == 0:
            return
        if self.kind == "tree":
            # Tree verification accepts the greedy path only; sampling would silently be ignored.
            raise GenerationError(f"{self.flags} decodes greedily, so --temperature {temperature} would be "
                                  "ignored: use --temperature 0, or --speculative k to sample")
        if self.drafter != "heads":
            raise GenerationError(f"{self.flags}: prompt lookup drafts are verified greedily; use --temperature 0, "
                                  "or --drafter heads to sample")

    def check(self, model: MTPModel, temperature: float = 0.0) -> None:
        """Fail before decoding (or timing) anything when the mode cannot run on `model`."""
        self.check_temperature(temperature)
        if self.kind == "chain" and self.drafter != "lookup":  # prompt lookup alone needs no heads
            chain_for(model, self.k)
        elif self.kind == "tree":
            check_tree(model, default_tree(model.cfg.n_future) if self.widths is None
                       else DraftTree.from_branching(self.widths))

    def run(self, model: MTPModel, prompts: list[list[int]], max_new_tokens: int, *,
            batch_size: int | None = None, temperature: float = 0.0, top_k: int | None = None,
            top_p: float | None = None, seed: int | None = None, stop_tokens: Collection[int] = (),
            on_tokens: TokenCallback | None = None, compile: bool = False) -> GenerationResult:
        """Decode `prompts` in this mode; arguments as in `generate` (the decoders check the rest);
        `compile`: the decoding passes run through torch.compile (`mtp.compiled`)."""
        self.check_temperature(temperature)
        if self.kind == "plain":
            return generate(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, stop_tokens=stop_tokens, on_tokens=on_tokens, batch_size=batch_size,
                            compile=compile)
        if self.kind == "tree":
            return tree_generate(model, prompts, max_new_tokens, tree=self.widths, stop_tokens=stop_tokens,
                                 on_tokens=on_tokens, batch_size=batch_size, compile=compile)
        return speculative_generate(model, prompts, max_new_tokens, k=self.k, temperature=temperature, top_k=top_k,
                                    top_p=top_p, seed=seed, stop_tokens=stop_tokens, on_tokens=on_tokens,
                                    batch_size=batch_size, drafter=self.drafter, compile=compile)


def parse_mode(text: str) -> DecodeMode:
    """The benchmark grammar: greedy | spec<k> (chain of k head drafts) | spec<k>+lookup (prompt
    lookup where it matches, else the heads) | lookup<k> (prompt lookup alone) | tree (default
    tree) | tree:3,2,1 (given widths)."""
    if text == "greedy":
        return DecodeMode()
    if text == "tree":
        return DecodeMode("tree")
    if text.startswith("tree:"):
        return DecodeMode("tree", widths=parse_widths(text[5:]))
    if chain := _CHAIN.fullmatch(text):
        spec_k, plus_lookup, lookup_k = chain.groups()
        if lookup_k is not None:
            return DecodeMode("chain", k=int(lookup_k), drafter="lookup")
        return DecodeMode("chain", k=int(spec_k), drafter="both" if plus_lookup else "heads")
    raise GenerationError(f"unknown decoding mode {text!r}; use {MODE_GRAMMAR}")


def parse_widths(text: str) -> tuple[int, ...]:
    parts = text.split(",")
    if not all(_NUMBER.fullmatch(p) for p in parts):
        raise GenerationError(f"tree widths must look like 3,2,1, got {text!r}")
    return tuple(int(p) for p in parts)


def mode_from_flags(speculative: str | int | None, drafter: str = "heads") -> DecodeMode:
    """The command-line grammar: --speculative absent (plain), k (a chain of k drafts) or 'tree'
    (the default tree), and --drafter (heads, lookup or both; chains only)."""
    spec = None if speculative is None else str(speculative)  # Python callers may pass k as an int
    if spec is None:
        return DecodeMode(drafter=drafter)
    if spec == "tree":
        return DecodeMode("tree", drafter=drafter)
    if _NUMBER.fullmatch(spec):
        return DecodeMode("chain", k=int(spec), drafter=drafter)
    raise GenerationError(f"--speculative takes a number of drafts k or 'tree', got {spec!r}")
