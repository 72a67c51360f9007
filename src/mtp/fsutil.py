"""Safe writes: every file and directory the commands produce is built beside its target and only
published once complete, so a failure (an exception, a full disk, a kill) leaves what was there.

`atomic_write_bytes` / `atomic_write_text` replace one file; `atomic_dir` builds a directory's
content in a hidden temporary directory next to it and then publishes it; `describe_dir` says
what an existing directory holds, so that a command can refuse to write over something else.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TMP_PREFIX = ".tmp-"  # temporary files and directories start with this (hidden from corpora)


class TargetError(ValueError):
    """An output path that holds something the command must not overwrite; one line, for users."""


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once the directory holding it is synced (POSIX; no-op elsewhere).
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` by `data`: readers see the old file or the new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_tree(root: Path) -> None:
    """Flush every file under `root` to disk (before a rename publishes them)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(Path(dirpath) / name, "rb") as fh:
                os.fsync(fh.fileno())


@contextmanager
def atomic_dir(target: str | Path, *, replace: bool = False, commit_file: str | None = None) -> Iterator[Path]:
    """Yield an empty directory beside `target` to write into; publish it when the block ends.

    On an exception the temporary directory is removed and `target` is untouched (a new target
    is never created). Publishing a new target is one rename. For an existing target:
    `replace=True` swaps the whole directory (the old one is moved aside, then deleted);
    otherwise the new entries are moved into it one by one, `commit_file` (the file whose
    presence marks the content complete, e.g. meta.json) removed first and moved in last, so a
    kill between the renames leaves a directory that reads as unfinished, not a mix."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise TargetError(f"{target} is a file, not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{TMP_PREFIX}{target.name}-"))
    try:
        yield tmp
        fsync_tree(tmp)
        if not target.exists():
            os.rename(tmp, target)
        elif replace:
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{TMP_PREFIX}old-{target.name}-"))
            os.rename(target, old / target.name)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old / target.name, target)  # put the old one back
                raise
            finally:
                if not (old / target.name).exists() or target.exists():
                    shutil.rmtree(old, ignore_errors=True)
        else:
            _merge_into(tmp, target, commit_file)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _merge_into(src: Path, target: Path, commit_file: str | None) -> None:
    if commit_file is not None:
        (target / commit_file).unlink(missing_ok=True)
    entries = sorted(src.iterdir(), key=lambda p: p.name == commit_file)  # the commit file last
    for entry in entries:
        dest = target / entry.name
        if entry.is_dir() and dest.is_dir():
            shutil.rmtree(dest)
        os.replace(entry, dest)
    _fsync_dir(target)


def remove_stale_temps(directory: str | Path, prefix: str = TMP_PREFIX) -> list[Path]:
    """Delete temporary files/directories left in `directory` by a killed writer; returns them.
    Only call this when no other writer can be active there (e.g. when a run starts)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = sorted(p for p in directory.iterdir() if p.name.startswith(prefix))
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


# ----- what a directory holds ---------------------------------------------------------------------

DATASET, RUN, CHECKPOINT, HF_MODEL, META_MODEL = "dataset", "run", "checkpoint", "hf", "meta"


def describe_dir(path: str | Path) -> tuple[str, str] | None:
    """(kind, words for users) of what `path` holds, or None when it is missing or empty.
    kind is one of DATASET, RUN, CHECKPOINT, HF_MODEL, META_MODEL or "other"."""
    path = Path(path)
    if not path.is_dir():
        return None
    names = sorted(p.name for p in path.iterdir() if not p.name.startswith(TMP_PREFIX))
    if not names:
        return None
    ckpts = [n for n in names if n.startswith("ckpt-")]
    if "latest" in names or ckpts:
        latest = (path / "latest").read_text().strip() if (path / "latest").is_file() else "none"
        return RUN, f"a training run ({len(ckpts)} checkpoint(s), latest: {latest})"
    if "meta.json" in names and "train.bin" in names:
        return DATASET, "a prepared dataset (meta.json, train.bin)"
    if "config.json" in names and "model.safetensors" in names and "mtp_heads.safetensors" not in names \
            and _is_mtp_config(path / "config.json"):
        return CHECKPOINT, "an mtp checkpoint (config.json, model.safetensors)"
    if "config.json" in names:
        return HF_MODEL, "a Hugging Face model (config.json)"
    if "params.json" in names:
        return META_MODEL, "a Meta-format model (params.json)"
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return "other", f"{len(names)} other file(s) ({shown})"


def _is_mtp_config(path: Path) -> bool:
    # Our config.json has n_future; a Hugging Face one has model_type.
    import json

    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "n_future" in cfg and "model_type" not in cfg


def check_target(path: str | Path, allowed: tuple[str, ...], force: bool, flag: str = "--out") -> None:
    """Refuse (TargetError) to write into `path` when it holds something other than `allowed`
    kinds, unless `force`."""
    found = describe_dir(path)
    if found is None or found[0] in allowed or force:
        return
    raise TargetError(f"{flag} {path} already holds {found[1]}; choose another {flag} or pass --force")
