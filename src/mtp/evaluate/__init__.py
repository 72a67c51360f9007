"""Evaluation tools: per-head metrics, unbiased pass@k, and a sandbox for running generated code."""

from .execution import (
    ExecResult, SandboxConfig, check_correctness, evaluate_functional_correctness, humaneval_program,
    load_humaneval, load_mbpp, mbpp_program, run_program, run_programs, sandbox_report,
)
from .metrics import evaluate_prepared, head_metrics
from .passk import estimate_pass_at_k, pass_at_k, pass_at_k_table

__all__ = [
    "ExecResult", "SandboxConfig", "check_correctness", "estimate_pass_at_k", "evaluate_prepared", "evaluate_functional_correctness",
    "head_metrics", "humaneval_program", "load_humaneval", "load_mbpp", "mbpp_program", "pass_at_k", "pass_at_k_table",
    "run_program", "run_programs", "sandbox_report",
]
