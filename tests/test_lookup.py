import random

import pytest

from mtp import generate, speculative_generate
from mtp.lookup import NGramIndex, replay_lookup

from conftest import tiny_model


def brute_force(history, k, max_n=3, latest=True, fill=True):
    """Proposal rules by scanning the whole text: the longest suffix (max_n..1 tokens) that
    occurred before (ending before the text's end); its latest (mtp) or earliest (vLLM's ngram
    proposer) occurrence; the k tokens after it, cut at the end of the text (vLLM; mtp before the
    fill) or continued by the repeat the match implies (text[end + i] = text[j + i])."""
    end = len(history) - 1
    for n in range(min(max_n, end), 0, -1):
        ends = [j for j in range(n - 1, end) if history[j - n + 1 : j + 1] == history[end - n + 1 :]]
        if ends:
            j = ends[-1] if latest else ends[0]
            text = list(history)
            while len(text) < j + 1 + k and fill:
                text.append(text[j + 1 + len(text) - len(history)])
            return text[j + 1 : j + 1 + k]
    return []


def test_longest_suffix_match_proposes_what_followed_its_latest_occurrence():
    idx = NGramIndex(max_n=3)
    h = [1, 2, 3, 9, 1, 2, 3, 7, 5, 2, 3]
    # suffix (2, 3) last occurred ending at index 6 (not 10: the suffix itself); then came 7, 5.
    assert idx.propose(h, 2) == [7, 5]
    assert idx.propose(h + [7], 3) == [5, 2, 3]  # (2, 3, 7) at 5..7 -> 5, 2, 3
    # (4, 4) ended at 1: one token follows it, and the repeat it implies (period 1) gives the next.
    assert NGramIndex(max_n=3).propose([4, 4, 4], 2) == [4, 4]


def test_a_match_near_the_end_continues_the_repeat_it_implies():
    # (1, 2, 3) occurred ending at index 3, 3 tokens before the end: period 3. The tokens after
    # it run out after 3 drafts; the rest repeat them (the old rule, and vLLM's, stop at 3).
    h = [9, 1, 2, 3, 1, 2, 3]
    assert NGramIndex(max_n=3).propose(h, 5) == [1, 2, 3, 1, 2]
    assert brute_force(h, 5, fill=False) == brute_force(h, 5, latest=False, fill=False) == [1, 2, 3]
    assert NGramIndex(max_n=3).propose([7, 1, 2], 5) == []  # no match: nothing to repeat
    assert NGramIndex(max_n=2).propose([5, 6, 5], 4) == [6, 5, 6, 5]  # (5) at 0: period 2


def test_latest_occurrence_not_the_earliest_as_vllm():
    h = [1, 2, 5, 1, 2, 6, 1, 2]
    assert NGramIndex(max_n=3).propose(h, 2) == [6, 1]  # what followed (1, 2) last time
    assert brute_force(h, 2, latest=False, fill=False) == [5, 1]  # vLLM: the first time


def test_the_index_proposes_what_a_scan_of_the_whole_text_does():
    rng = random.Random(0)
    for trial in range(300):
        vocab, max_n, k = rng.choice([2, 3, 5, 20]), rng.randint(1, 4), rng.randint(1, 7)
        history, idx = [rng.randrange(vocab) for _ in range(rng.randint(1, 4))], NGramIndex(max_n)
        for _ in range(30):  # the text grows by 1..3 tokens between proposals, as in decoding
            assert idx.propose(history, k) == brute_force(history, k, max_n), (trial, history, k, max_n)
            history += [rng.randrange(vocab) for _ in range(rng.randint(1, 3))]


def test_replay_counts_passes_by_hand():
    # A loop of period 2: the fill drafts 4 loop tokens each pass, all accepted, + head 1's token.
    prompt, output = [1, 2], [1, 2] * 6
    new = replay_lookup(prompt, output, 4, NGramIndex(3).propose)
    assert (new.tokens, new.forwards) == (12, 4)  # prefill 1, then 5 + 5 + 1 (the end)
    # Cut at the end of the text, the latest occurrence's 2 tokens are all a pass drafts (the old
    # rule padded them with the last token): prefill 1, then 3 + 3 + 3 + 2 tokens.
    old = replay_lookup(prompt, output, 4, lambda h, k: brute_force(h, k, fill=False))
    assert (old.tokens, old.forwards) == (12, 5)
    # vLLM's rule (earliest occurrence, cut, no padding): 3 + 3, then (1, 2, 1) at the start has
    # 4 tokens after it: + 5.
    vllm = replay_lookup(prompt, output, 4, lambda h, k: brute_force(h, k, latest=False, fill=False), pad=False)
    assert (vllm.tokens, vllm.forwards) == (12, 4)
    # Its metric leaves out the prefill: 1 + accepted drafts / passes with drafts.
    assert (vllm.drafted, vllm.accepted, vllm.per_drafted_pass) == (3, 8, 1 + 8 / 3)
    assert vllm.tokens_per_forward == 3.0 and new.tokens_per_forward == 3.0
    assert replay_lookup(prompt, output, 4, NGramIndex(3).propose, limit=6).forwards == 2
    assert replay_lookup(prompt, [], 4, NGramIndex(3).propose).forwards == 0


@pytest.mark.parametrize("k", [1, 3, 4])
def test_replay_equals_the_decoder(k):
    # The decoder's tokens per forward, batched, equal the replay of its greedy output request
    # by request: the replay is a faithful model of the speculative loop.
    model = tiny_model(0, n_future=1, init_std=0.2)
    rng = random.Random(k)
    ps = [[5, 6, 7, 8] * 6, [9, 1, 9, 2, 9, 3] * 4] + [[rng.randrange(512) for _ in range(rng.randint(3, 40))]
                                                      for _ in range(3)]
    alone = generate(model, ps, 30).tokens
    out = speculative_generate(model, ps, 30, k=k, drafter="lookup", batch_size=2)
    assert out.tokens == alone
    replays = [replay_lookup(p, o, k, NGramIndex(3).propose) for p, o in zip(ps, alone)]
    assert [r.forwards for r in replays] == out.row_forwards
    assert sum(r.tokens for r in replays) == sum(map(len, out.tokens))


def test_no_match_and_growing_history():
    idx = NGramIndex(max_n=2)
    h = [1, 2, 3]
    assert idx.propose(h, 3) == []
    h += [1]
    assert idx.propose(h, 3) == [2, 3, 1]
    assert idx.propose(h, 3, min_n=2) == []


def test_bench_decode_reads_a_prompt_file_and_writes_json(tiny_run, tmp_path):
    import json

    from mtp.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("def f(a):\n    \n\nclass A:\n    x = ")
    out = tmp_path / "rows.json"
    assert main(["bench", "decode", "--checkpoint", str(tiny_run), "--prompts", str(prompts), "--json", str(out),
                 "--max-new-tokens", "6", "--repeats", "1", "--dtype", "bf16",
                 "--modes", "greedy", "spec1", "lookup2"]) == 0
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["greedy", "spec1", "lookup2"]
    assert all(r["same_as_greedy"] and r["dtype"] == "bfloat16" and r["tokens"] == 12 for r in rows)
