"""mtp.evaluate: pass@k against brute force, the code sandbox (canonical solutions pass, wrong ones
fail, hostile programs are contained), and per-head metrics."""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import time
from pathlib import Path

import pytest
import torch

from mtp.evaluate import (
    SandboxConfig, estimate_pass_at_k, evaluate_functional_correctness, head_metrics, humaneval_program,
    load_humaneval, load_mbpp, mbpp_program, pass_at_k, pass_at_k_table, run_program, run_programs,
    sandbox_report,
)
from mtp.evaluate.execution import _kill_uid  # noqa: F401  (imported to check it exists)
from mtp.loss import mtp_loss

from conftest import tiny_model

REPORT = sandbox_report()
OS_LAYERS = pytest.mark.skipif(not (REPORT["privilege_drop"] and REPORT["pid_namespace"]),
                               reason="needs root with unshare and setpriv for the OS-level layers")


# ----- pass@k ------------------------------------------------------------------------------------
def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 10])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_edge_cases_and_table():
    assert pass_at_k(200, 0, 100) == 0.0
    assert pass_at_k(200, 200, 1) == 1.0
    assert pass_at_k(200, 10, 1) == pytest.approx(10 / 200)
    assert 0 < pass_at_k(1000, 3, 500) < 1  # large n stays finite (no huge binomials)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 6)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    est = estimate_pass_at_k([4, 4], [0, 2], 2)
    assert est.tolist() == pytest.approx([0.0, 1 - math.comb(2, 2) / math.comb(4, 2)])
    table = pass_at_k_table({"a": [True, False, False], "b": [False] * 3}, ks=(1, 2, 10))
    assert table == pytest.approx({"pass@1": (1 / 3) / 2, "pass@2": (2 / 3) / 2})  # k=10 > n left out


# ----- the sandbox: correct and wrong programs ------------------------------------------------------
@pytest.fixture(scope="module")
def humaneval():
    return load_humaneval()


def test_humaneval_canonical_subset_passes_and_wrong_fails(humaneval):
    assert len(humaneval) == 164
    subset = humaneval[:: len(humaneval) // 20][:20]
    samples = {p["task_id"]: [p["canonical_solution"], "    return None\n"] for p in subset}
    report = evaluate_functional_correctness(humaneval, samples, ks=(1, 2), workers=2)
    for task, (good, bad) in report.results.items():
        assert good.passed, (task, good)
        assert not bad.passed
    assert report.pass_at_k["pass@1"] == pytest.approx(0.5)
    assert report.pass_at_k["pass@2"] == pytest.approx(1.0)
    json.dumps(report.to_dict())


def test_humaneval_all_canonical_solutions_pass(humaneval):
    start = time.perf_counter()
    # ~10 s on 2 busy cores: each run is a short process (namespaces + uid switch + interpreter).
    results = run_programs([humaneval_program(p, p["canonical_solution"]) for p in humaneval], workers=4)
    failed = [(p["task_id"], r.detail) for p, r in zip(humaneval, results) if not r.passed]
    assert not failed
    assert time.perf_counter() - start < 120


def test_mbpp_format(tmp_path):
    rows = [
        {"task_id": 1, "text": "add", "code": "def add(a, b):\n    return a + b",
         "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "test_setup_code": "",
         "challenge_test_list": []},
        {"task_id": 2, "text": "sq", "code": "import math\ndef sq(x):\n    return math.sqrt(x)",
         "test_list": ["assert sq(9) == 3"], "test_setup_code": "import math"},
    ]
    path = tmp_path / "mbpp.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = load_mbpp(path)
    assert "assert add(1, 2) == 3" in mbpp_program(problems[0], problems[0]["code"])
    samples = {1: [rows[0]["code"], "def add(a, b):\n    return a - b"], 2: [rows[1]["code"]]}
    report = evaluate_functional_correctness(problems, {str(k): v for k, v in samples.items()}, ks=(1,))
    assert [r.passed for r in report.results["1"]] == [True, False]
    assert report.results["2"][0].passed
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": 3, "prompt": "x"}) + "\n")
    with pytest.raises(ValueError):
        load_mbpp(bad)


def test_exit_tricks_do_not_pass():
    assert run_program("pass").passed
    assert not run_program("raise SystemExit(0)").passed
    assert not run_program("import os\nos._exit(0)").passed
    res = run_program("print('x' * 10_000_000)", SandboxConfig(output_limit=100))
    assert res.passed and len(res.stdout) == 100
    failed = run_program("assert 1 == 2, 'nope'")
    assert failed.status == "failed" and "AssertionError" in failed.detail


# ----- hostile programs ------------------------------------------------------------------------------
def no_audit(**kw) -> SandboxConfig:
    """Only the OS-level layers: shows they hold without the in-process guard."""
    return SandboxConfig(audit_hook=False, **kw)


def test_infinite_loop_times_out():
    start = time.perf_counter()
    res = run_program("while True:\n    pass\n", SandboxConfig(timeout=1.0))
    assert res.status == "timeout"
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("audit", [True, False])
def test_fork_bomb_is_contained(audit):
    if not audit and not (REPORT["rlimit_nproc_enforced"] and REPORT["pid_namespace"]):
        pytest.skip("RLIMIT_NPROC or the PID namespace is not available")
    before = len([p for p in os.listdir("/proc") if p.isdigit()])
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n        pass\n"
    start = time.perf_counter()
    res = run_program(code, SandboxConfig(timeout=1.5, audit_hook=audit))
    assert res.status in ("timeout", "failed")
    assert time.perf_counter() - start < 6
    time.sleep(0.2)
    after = len([p for p in os.listdir("/proc") if p.isdigit()])
    assert after - before < 20  # no runaway processes left behind (others' jobs may start a few)


@pytest.mark.parametrize("audit", [True, False])
def test_unbounded_allocation_fails(audit):
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))\n"
    start = time.perf_counter()
    res = run_program(code, SandboxConfig(timeout=5, memory_mb=256, audit_hook=audit))
    assert res.status == "failed" and "MemoryError" in res.detail
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("audit", [True, pytest.param(False, marks=OS_LAYERS)])
def test_cannot_delete_or_write_outside_its_directory(tmp_path, audit):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    code = (f"import os, shutil\n"
            f"for f in (lambda: os.remove({str(victim)!r}), lambda: shutil.rmtree({str(tmp_path)!r}),\n"
            f"          lambda: open({str(victim)!r}, 'w').write('gone'),\n"
            f"          lambda: open({str(tmp_path / 'new.txt')!r}, 'w').write('x')):\n"
            f"    try:\n        f()\n    except Exception:\n        pass\n"
            f"open('inside.txt', 'w').write('ok')\n"  # its own directory stays writable
            f"assert open('inside.txt').read() == 'ok'\n")
    res = run_program(code, SandboxConfig(audit_hook=audit))
    assert res.passed, res
    assert victim.read_text() == "precious"
    assert not (tmp_path / "new.txt").exists()


@pytest.mark.parametrize("audit", [True, pytest.param(False, marks=OS_LAYERS)])
def test_cannot_kill_the_harness(audit):
    code = (f"import os, signal\n"
            f"for pid in ({os.getpid()}, os.getppid()):\n"
            f"    try:\n        os.kill(pid, signal.SIGKILL)\n    except Exception:\n        pass\n")
    res = run_program(code, SandboxConfig(audit_hook=audit))
    assert res.status in ("passed", "failed")  # and this test process is still alive to check it


@pytest.mark.parametrize("audit", [True, pytest.param(False, marks=pytest.mark.skipif(
    not REPORT["network_namespace"], reason="no network namespace"))])
def test_no_network_even_to_localhost(audit):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    code = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            f"s.sendall(b'hello')\n")
    try:
        res = run_program(code, SandboxConfig(timeout=4, audit_hook=audit))
        assert res.status == "failed", res
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


def test_file_size_limit():
    res = run_program("open('big', 'wb').write(b'x' * (8 * 2**20))\n", SandboxConfig(file_size_mb=1))
    assert not res.passed


# ----- per-head metrics --------------------------------------------------------------------------------
def test_head_metrics_agree_with_loss():
    model = tiny_model(0, training=True, n_future=3, vocab_size=50)
    tokens = torch.randint(50, (4, 19))
    res = head_metrics(model, [tokens], seq_len=16, topk=(1, 50))
    _, per_head = mtp_loss(model(tokens[:, :16]), tokens)
    assert res["loss"] == pytest.approx(per_head.tolist(), rel=1e-5)
    assert res["acc@50"] == pytest.approx([1.0] * 3)
    assert res["prefix_acc"][0] == 1.0
    assert res["prefix_acc"][1] >= res["prefix_acc"][2]
    assert res["est_tokens_per_forward"] == pytest.approx(1 + sum(res["prefix_acc"][1:]))


# ----- code generation for HumanEval / MBPP -------------------------------------------------------
def test_cut_at_stop_and_prompts():
    from mtp.evaluate.codegen import cut_at_stop, problem_prompt

    assert cut_at_stop("    return x\n\ndef g():\n    pass\nprint(1)") == "    return x\n"
    assert cut_at_stop("    return x\n") == "    return x\n"
    assert cut_at_stop("    y = 1\n# note\nprint(y)") == "    y = 1"
    mbpp = {"task_id": 2, "text": "Add two numbers.", "test_list": ["assert add(1, 2) == 3"]}
    assert problem_prompt(mbpp) == '"""\nAdd two numbers.\nassert add(1, 2) == 3\n"""\n'
    assert problem_prompt({"task_id": "t", "prompt": "def f():\n"}) == "def f():\n"
    chat = "<user>\n{prompt}<end>\n<assistant>\n{prompt}"
    assert problem_prompt({"task_id": "t", "prompt": "def f():\n"}, chat) == "<user>\ndef f():\n<end>\n<assistant>\ndef f():\n"
    assert cut_at_stop("    return 1\n```\nThis function") == "    return 1\n"


def test_generate_completions_greedy_speculative_and_samples():
    from mtp.data import byte_tokenizer
    from mtp.evaluate.codegen import CodegenConfig, cut_at_stop, generate_completions
    from mtp.generate import generate

    tok = byte_tokenizer()
    model = tiny_model(0, n_future=3, vocab_size=tok.vocab_size)
    problems = load_humaneval()[:3]
    greedy = generate_completions(model, tok, problems, CodegenConfig(max_new_tokens=12, batch_size=2))
    assert list(greedy) == [p["task_id"] for p in problems] and all(len(c) == 1 for c in greedy.values())
    stops = [] if tok.eos_id is None else [tok.eos_id]
    direct = generate(model, [tok.encode(problems[1]["prompt"])], 12, stop_tokens=stops).tokens[0]
    assert greedy[problems[1]["task_id"]] == [cut_at_stop(tok.decode([t for t in direct if t not in stops]))]
    for spec in ("1", "2", "tree"):
        assert generate_completions(model, tok, problems, CodegenConfig(max_new_tokens=12, speculative=spec)) == greedy
    for drafter in ("lookup", "both"):  # `mtp eval-code --drafter`
        cfg = CodegenConfig(max_new_tokens=12, speculative="2", drafter=drafter)
        assert generate_completions(model, tok, problems, cfg) == greedy
    sampled = generate_completions(model, tok, problems, CodegenConfig(samples=3, temperature=1.0, max_new_tokens=6))
    assert all(len(c) == 3 for c in sampled.values())
    with pytest.raises(ValueError, match="one completion per problem"):
        generate_completions(model, tok, problems, CodegenConfig(samples=2))
    with pytest.raises(ValueError, match="number of drafts k or 'tree'"):
        generate_completions(model, tok, problems, CodegenConfig(speculative="fast"))


def test_progress_counter_counts_finished_completions():
    from mtp.evaluate.codegen import ProgressCounter

    class Bar:
        n = 0

        def update(self, k: int) -> None:
            self.n += k

    bar = Bar()
    count = ProgressCounter(bar, max_new_tokens=3, eos=9)
    count([[1], [2, 9], []])  # row 1 ended with end-of-text
    count([[1, 1], [], [4]])  # row 0 reached 3 tokens
    count([[], [], [4, 4]])  # row 2 too
    assert bar.n == 3
