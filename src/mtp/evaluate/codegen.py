"""Code generation for HumanEval / MBPP: prompts, completions from a model, pass@k.

A completion is decoded until the tokenizer's end-of-text token or `max_new_tokens`, then cut at
the first stop sequence (the usual ones for HumanEval-style completions: the next top-level
statement ends the function).
Greedy (temperature 0) gives one completion per problem; self-speculative decoding gives the
same tokens faster, so `speculative` only changes the speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..model import MTPModel
from ..modes import mode_from_flags

STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ", "```")


@dataclass(frozen=True)
class CodegenConfig:
    samples: int = 1  # completions per problem (pass@k needs samples >= k)
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float | None = None
    seed: int = 0
    speculative: str | None = None  # None (plain), a number of drafts k, or "tree" (greedy only): `mode_from_flags`
    drafter: str = "heads"  # with a chain: heads, lookup (prompt lookup) or both
    batch_size: int = 8  # rows decoded at once (continuous batching)
    # What the model sees: {prompt} is the problem's prompt. Chat models need their own format,
    # ending with the prompt again so the answer continues the function (see `problem_prompt`).
    template: str = "{prompt}"


def problem_prompt(problem: Mapping[str, Any], template: str = "{prompt}") -> str:
    """HumanEval: the given prompt (signature + docstring). MBPP: the task text and its first test
    as a docstring; the model then writes the whole function. Put into `template`, e.g. for a
    chat model '<|im_start|>user\nComplete:\n{prompt}<|im_end|>\n<|im_start|>assistant\n{prompt}':
    the completion is scored after the problem's own prompt either way."""
    if "prompt" in problem:
        prompt = str(problem["prompt"])
    else:
        prompt = f'"""\n{problem["text"]}\n{problem["test_list"][0]}\n"""\n'
    return template.replace("{prompt}", prompt)


def cut_at_stop(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """The text up to (not including) the earliest stop sequence."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(ends)] if ends else text


class ProgressCounter:
    """on_tokens callback that advances a progress bar by the completions that just finished."""

    def __init__(self, bar: Any, max_new_tokens: int, eos: int | None) -> None:
        self.bar, self.limit, self.eos = bar, max_new_tokens, eos
        self.lengths: dict[int, int] = {}

    def __call__(self, new: list[list[int]]) -> None:
        done = 0
        for i, tokens in enumerate(new):
            if tokens:
                self.lengths[i] = self.lengths.get(i, 0) + len(tokens)
                done += self.lengths[i] >= self.limit or tokens[-1] == self.eos
        if done:
            self.bar.update(done)


def generate_completions(model: MTPModel, tokenizer: Any, problems: Sequence[Mapping[str, Any]],
                         cfg: CodegenConfig, progress: bool = False) -> dict[str, list[str]]:
    """task_id -> `cfg.samples` completions, each cut at the first stop sequence."""
    if cfg.samples < 1:
        raise ValueError(f"samples must be >= 1, got {cfg.samples}")
    if cfg.temperature == 0 and cfg.samples > 1:
        raise ValueError("greedy decoding gives one completion per problem: use --samples 1 or a temperature > 0")
    mode = mode_from_flags(cfg.speculative, cfg.drafter)
    mode.check_temperature(cfg.temperature)
    if "{prompt}" not in cfg.template:
        raise ValueError("the prompt template must contain {prompt}")
    ids = [tokenizer.encode(problem_prompt(p, cfg.template)) for p in problems for _ in range(cfg.samples)]
    eos = getattr(tokenizer, "eos_id", None)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(ids), desc="completions", unit="done", dynamic_ncols=True)
    kw = dict(stop_tokens=() if eos is None else (eos,), batch_size=cfg.batch_size,
              on_tokens=None if bar is None else ProgressCounter(bar, cfg.max_new_tokens, eos))
    res = mode.run(model, ids, cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, **kw)
    if bar is not None:
        bar.close()
    out: dict[str, list[str]] = {}
    for i, tokens in enumerate(res.tokens):
        task = str(problems[i // cfg.samples]["task_id"])
        text = tokenizer.decode(tokens[:-1] if tokens and tokens[-1] == eos else tokens)
        out.setdefault(task, []).append(cut_at_stop(text))
    return out
