from mtp.lookup import NGramIndex


def test_longest_suffix_match_proposes_what_followed_its_latest_occurrence():
    idx = NGramIndex(max_n=3)
    h = [1, 2, 3, 9, 1, 2, 3, 7, 5, 2, 3]
    # suffix (2, 3) last occurred ending at index 6 (not 10: the suffix itself); then came 7, 5.
    assert idx.propose(h, 2) == [7, 5]
    assert idx.propose(h + [7], 3) == [5, 2, 3]  # (2, 3, 7) at 5..7 -> 5, 2, 3
    assert NGramIndex(max_n=3).propose([4, 4, 4], 2) == [4]  # (4, 4) ended at 1: one token after it


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
