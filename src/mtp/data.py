"""Corpus preparation, tokenizers and memory-mapped training batches.

Pipeline: ``corpus_files`` -> ``split_files`` -> ``prepare`` writes ``train.bin`` /
``val.bin`` (flat token streams, one ``<|endoftext|>`` after every document),
``tokenizer.json`` and ``meta.json``; ``TokenData`` memory-maps a split and serves
batches that are a pure function of ``(seed, step)`` so training can resume exactly.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import math
import os
import re
import sysconfig
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .fsutil import DATASET, atomic_dir, atomic_write_bytes, check_target

__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "DataError",
    "TokenData",
    "Tokenizer",
    "byte_tokenizer",
    "corpus_files",
    "default_corpus_files",
    "prepare",
    "split_files",
    "train_bpe_tokenizer",
    "validation_batches",
]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
# End-of-text names of other tokenizer families (Llama 2/Mistral, Llama 3, Gemma), tried after
# EOS_TOKEN so that tokenizers of imported models (mtp.interop) load from a checkpoint too.
FOREIGN_EOS_TOKENS = ("</s>", "<|end_of_text|>", "<eos>")
N_BYTES = 256
META_FORMAT = "mtp-tokens"
META_VERSION = 1
SPLITS = ("train", "val")

# Long documents are encoded in pieces of about this many characters so a single
# huge file does not build one giant Encoding object in memory.
_PIECE_CHARS = 1 << 20
# A newline between two printable ASCII characters is always its own pre-token under
# the GPT-2 byte-level regex, so cutting right after it leaves BPE output unchanged.
_SAFE_CUT = re.compile(r"(?<=[!-~]\n)(?=[!-~])")
# Encode this much text per encode_batch call: big enough to use both Rust threads,
# small enough to keep the Encoding objects cheap.
_BATCH_CHARS = 4 << 20
# Directories of the stdlib that are test suites, third-party code or build output.
_STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib-dynload"}
)
_PERM_CACHE_SIZE = 4


class DataError(ValueError):
    """A problem with user-supplied data; the message is one line meant for users."""


# --------------------------------------------------------------------------- tokenizers


@functools.lru_cache(maxsize=1)
def _byte_chars() -> tuple[str, ...]:
    """Printable stand-in character for each byte value (the GPT-2 byte-level alphabet).

    Byte-level BPE works on strings, so every byte needs a visible, non-whitespace
    character; printable Latin-1 bytes keep their own character, the rest are shifted
    past U+00FF.
    """
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars: list[str] = []
    shifted = 0
    for b in range(N_BYTES):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(N_BYTES + shifted))
            shifted += 1
    return tuple(chars)


def _base_vocab() -> dict[str, int]:
    """Bytes at ids 0..255 (id == byte value), then the special tokens."""
    vocab = {ch: b for b, ch in enumerate(_byte_chars())}
    for offset, token in enumerate(SPECIAL_TOKENS):
        vocab[token] = N_BYTES + offset
    return vocab


def _byte_level_hf(vocab: dict[str, int], merges: list[tuple[str, str]], use_regex: bool) -> HFTokenizer:
    # Specials live only in the model vocab, not as "added tokens": that way a document
    # that literally contains "<|endoftext|>" is encoded as ordinary bytes and can never
    # inject a document boundary, while decode() still renders the special ids.
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    hf.decoder = decoders.ByteLevel()
    return hf


def _is_plain_byte_tokenizer(hf: HFTokenizer) -> bool:
    """True if `hf` is exactly what byte_tokenizer() builds, so encode may skip Rust."""
    spec = json.loads(hf.to_str())
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") is not None or spec.get("added_tokens") or pre.get("type") != "ByteLevel":
        return False
    if model.get("type") != "BPE" or model.get("merges"):
        return False
    vocab = model.get("vocab") or {}
    return len(vocab) == N_BYTES + len(SPECIAL_TOKENS) and all(
        vocab.get(ch) == b for b, ch in enumerate(_byte_chars())
    )


class Tokenizer:
    """Thin wrapper over a Hugging Face ``tokenizers.Tokenizer``.

    ``kind`` is ``"byte"`` (ids 0..255 are raw bytes) or ``"bpe"``; ``eos_id`` is the id
    of ``<|endoftext|>``, which ``prepare`` appends after every document.
    """

    kind: str
    vocab_size: int
    eos_id: int
    pad_id: int | None

    def __init__(self, hf: HFTokenizer, kind: str | None = None, eos_token: str | None = None) -> None:
        names = (eos_token,) if eos_token is not None else (EOS_TOKEN, *FOREIGN_EOS_TOKENS)
        eos_id = next((i for i in map(hf.token_to_id, names) if i is not None), None)
        if eos_id is None:
            raise DataError(f"tokenizer has no {names[0]} token")
        self.hf = hf
        self.eos_id = eos_id
        self.pad_id = hf.token_to_id(PAD_TOKEN)
        self.vocab_size = hf.get_vocab_size()
        if kind is None:
            kind = "byte" if _is_plain_byte_tokenizer(hf) else "bpe"
        if kind not in ("byte", "bpe"):
            raise DataError(f"unknown tokenizer kind {kind!r}; expected 'byte' or 'bpe'")
        self.kind = kind

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    def encode(self, text: str) -> list[int]:
        """Token ids for `text`; special-token strings in `text` are treated as plain text."""
        if self.kind == "byte":
            # Identical to the HF byte-level path (tested) but much faster.
            return list(text.encode("utf-8"))
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once (parallel in Rust for BPE)."""
        if self.kind == "byte":
            return [list(t.encode("utf-8")) for t in texts]
        return [e.ids for e in self.hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text for `ids`; invalid UTF-8 becomes U+FFFD and special ids render as their names."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: str | Path) -> None:
        """Write ``directory/tokenizer.json`` (atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(directory / "tokenizer.json", self.hf.to_str().encode("utf-8"))

    @classmethod
    def load(cls, directory_or_file: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` from a directory, or a tokenizer file given directly."""
        path = Path(directory_or_file).expanduser()
        if not path.exists():
            raise DataError(f"no tokenizer.json in {path} (path does not exist)")
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise DataError(f"no tokenizer.json in {path}")
        try:
            hf = HFTokenizer.from_str(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read {file}: {exc}") from None
        except Exception as exc:  # tokenizers raises plain Exception on bad JSON
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"{file} is not a valid tokenizer.json: {first}") from None
        return cls(hf)


def byte_tokenizer() -> Tokenizer:
    """Tokenizer with 256 byte tokens (id == byte value) plus ``<|endoftext|>`` and ``<|pad|>``."""
    return Tokenizer(_byte_level_hf(_base_vocab(), [], use_regex=False), kind="byte")


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 8192, *, show_progress: bool = False
) -> Tokenizer:
    """Train a deterministic byte-level BPE tokenizer of at most `vocab_size` tokens.

    Ids 0..255 are the single bytes and 256/257 the special tokens, exactly as in
    ``byte_tokenizer()``; learned merges follow. A small corpus may yield fewer tokens.
    """
    n_fixed = N_BYTES + len(SPECIAL_TOKENS)
    if vocab_size <= n_fixed:
        raise DataError(f"BPE vocab_size must be larger than {n_fixed} (bytes + special tokens), got {vocab_size}")
    scratch = HFTokenizer(models.BPE())
    scratch.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    pieces = (piece for text in texts for piece in _pieces(text) if piece)
    scratch.train_from_iterator(pieces, trainer)

    # Re-number so the layout matches byte_tokenizer(): the trainer orders its
    # alphabet by character, not by byte value.
    model = json.loads(scratch.to_str())["model"]
    vocab = _base_vocab()
    for token, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        if token not in vocab:
            vocab[token] = len(vocab)
    # tokenizers < 0.20 serialises merges as "a b" strings, newer versions as pairs.
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model["merges"]]
    return Tokenizer(_byte_level_hf(vocab, merges, use_regex=True), kind="bpe")


def _pieces(text: str) -> Iterator[str]:
    """Split `text` into ~_PIECE_CHARS pieces at cuts that do not change byte-level BPE output."""
    start = 0
    while len(text) - start > _PIECE_CHARS:
        match = _SAFE_CUT.search(text, start + _PIECE_CHARS)
        if match is None:
            break
        yield text[start : match.start()]
        start = match.start()
    yield text[start:]


# --------------------------------------------------------------------------- corpus files


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _path_key(path: Path, root: Path) -> tuple[str, ...]:
    """Sort key that is independent of where the corpus lives and of the Python version."""
    return Path(_relative(path, root)).parts


def _relative(path: Path, root: Path) -> str:
    try:
        return path.absolute().relative_to(root.absolute()).as_posix()
    except ValueError:
        return path.as_posix()


def _is_text_file(path: Path) -> bool:
    """UTF-8 text without NUL bytes; anything else (binaries, Latin-1 files) is skipped."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if b"\x00" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def default_corpus_files() -> list[Path]:
    """The Python standard library's own ``*.py`` source, without test suites (~12 MB).

    Machine-specific build files (``_sysconfigdata*``, ``config-*``) are left out so the
    corpus is the same on every install of a given Python version.
    """
    root = _stdlib_root()
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith((".", "config-"))
        ]
        for name in filenames:
            if not name.endswith(".py") or name.startswith((".", "_sysconfigdata")):
                continue
            path = Path(dirpath) / name
            if _is_text_file(path):
                files.append(path)
    return sorted(files, key=lambda p: _path_key(p, root))


def corpus_files(source: str | Path | None) -> list[Path]:
    """Text files of a corpus: ``None`` -> the stdlib, a directory -> its text files, a file -> [file].

    In a directory, hidden files and directories, ``__pycache__`` and binary or
    non-UTF-8 files are skipped. The result is sorted by relative path.
    """
    if source is None:
        files = default_corpus_files()
        if not files:
            raise DataError(f"no Python source files found in the standard library at {_stdlib_root()}")
        return files
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"corpus path {path} does not exist")
    if path.is_file():
        if not _is_text_file(path):
            raise DataError(f"corpus file {path} is not a UTF-8 text file")
        return [path]
    if not path.is_dir():
        raise DataError(f"corpus path {path} is neither a file nor a directory")
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        for name in filenames:
            file = Path(dirpath) / name
            if not name.startswith(".") and file.is_file() and _is_text_file(file):
                files.append(file)
    if not files:
        raise DataError(f"no text files found in {path} (hidden, binary and non-UTF-8 files are skipped)")
    return sorted(files, key=lambda p: _path_key(p, path))


def _unit_hash(salt: str, key: str) -> float:
    """Stable pseudo-random number in [0, 1) for `key` (same on every machine and run)."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _common_root(files: Sequence[Path]) -> Path:
    return Path(os.path.commonpath([str(f.absolute().parent) for f in files]))


def split_files(
    files: Iterable[Path], val_fraction: float = 0.05, *, root: str | Path | None = None
) -> tuple[list[Path], list[Path]]:
    """Deterministically split files into (train, val) by a hash of each relative path.

    A file's side depends only on its path relative to `root` (default: the files'
    common directory), so adding files never moves existing ones. With two or more
    files and ``val_fraction > 0`` both sides are non-empty. A single file cannot be
    split here and goes to train (``prepare`` splits it by text position instead).
    """
    files = [Path(f) for f in files]
    _check_fraction(val_fraction)
    if len(files) < 2 or val_fraction == 0:
        return files, []
    base = Path(root) if root is not None else _common_root(files)
    keys = [_unit_hash("split", _relative(f, base)) for f in files]
    in_val = [k < val_fraction for k in keys]
    if not any(in_val):
        in_val[min(range(len(files)), key=keys.__getitem__)] = True
    if all(in_val):
        in_val[max(range(len(files)), key=keys.__getitem__)] = False
    train = [f for f, v in zip(files, in_val) if not v]
    val = [f for f, v in zip(files, in_val) if v]
    return train, val


def _check_fraction(val_fraction: float) -> None:
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")


def _cap_files(files: Sequence[Path], root: Path, max_bytes: int) -> list[Path]:
    """Whole files, visited in hashed order, while they fit in `max_bytes`; returned sorted.

    Hashed order gives a spread-out sample instead of the alphabetically first files;
    the salt differs from split_files' so the sample is not biased towards val.
    """
    order = sorted(range(len(files)), key=lambda i: (_unit_hash("select", _relative(files[i], root)), i))
    chosen: list[int] = []
    total = 0
    for i in order:
        size = files[i].stat().st_size
        if total + size <= max_bytes:
            chosen.append(i)
            total += size
            if total == max_bytes:
                break
    return [files[i] for i in sorted(chosen)]


def _read_text(path: Path, max_bytes: int | None = None) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if max_bytes is not None and len(data) > max_bytes:
        # The cut may split a multi-byte character; drop that partial tail only.
        return data[:max_bytes].decode("utf-8", errors="ignore")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not valid UTF-8 (did it change during prepare?)") from None


def _position_cut(text: str, val_fraction: float) -> int:
    """Index where the last `val_fraction` of `text` starts, moved back to a line start."""
    if val_fraction == 0 or not text:
        return len(text)
    cut = len(text) - math.ceil(len(text) * val_fraction)
    newline = text.rfind("\n", 0, cut)
    return newline + 1 if newline >= 0 else cut


# --------------------------------------------------------------------------- prepare


def _encode_documents(tok: Tokenizer, docs: Iterable[str], dtype: np.dtype) -> Iterator[np.ndarray]:
    """Token arrays for `docs`, each document followed by eos; empty documents are dropped."""
    pieces: list[str] = []
    ends: list[bool] = []  # ends[i]: piece i is the last piece of its document
    chars = 0

    def flush() -> np.ndarray:
        flat: list[int] = []
        for ids, end in zip(tok.encode_batch(pieces), ends):
            flat.extend(ids)
            if end:
                flat.append(tok.eos_id)
        pieces.clear()
        ends.clear()
        return np.array(flat, dtype=dtype)

    for doc in docs:
        if not doc:
            continue
        doc_pieces = list(_pieces(doc)) if tok.kind == "bpe" else [doc]
        for j, piece in enumerate(doc_pieces):
            pieces.append(piece)
            ends.append(j == len(doc_pieces) - 1)
            chars += len(piece)
            if chars >= _BATCH_CHARS:
                yield flush()
                chars = 0
    if pieces:
        yield flush()


def _write_tokens(tok: Tokenizer, docs: Iterable[str], path: Path, dtype: np.dtype) -> int:
    n_tokens = 0
    with open(path, "wb") as f:
        for arr in _encode_documents(tok, docs, dtype):
            f.write(arr.tobytes())
            n_tokens += len(arr)
    return n_tokens


def _token_dtype(vocab_size: int) -> np.dtype:
    # Ids run 0..vocab_size-1, so uint16 holds vocabularies of up to 65536 tokens.
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def prepare(
    source: str | Path | None,
    out_dir: str | Path,
    tokenizer: str | Path | Tokenizer = "bpe",
    vocab_size: int = 8192,
    val_fraction: float = 0.05,
    max_bytes: int | None = None,
    *,
    progress: bool = False,
    force: bool = False,
    exclude: Sequence[str] = (),
) -> dict[str, Any]:
    """Tokenize a corpus into ``out_dir`` and return the metadata written to ``meta.json``.

    An existing dataset in ``out_dir`` is replaced only once the new one is complete; a
    directory holding anything else (a run, a model, other files) is refused unless `force`.

    `tokenizer` is ``"bpe"`` (trained on the train split), ``"byte"``, a path to an
    existing tokenizer.json / directory, or a ``Tokenizer``. Output is byte-identical
    for identical input. Several files are split by file (``split_files``); a single
    file by position (its last `val_fraction` becomes val). `max_bytes` caps the corpus
    size: whole files are taken in hashed order while they fit (a single file is cut).
    `exclude`: glob patterns of relative paths (``tkinter/*``, ``*_test.py``) left out.
    """
    _check_fraction(val_fraction)
    if max_bytes is not None and max_bytes <= 0:
        raise DataError(f"max_bytes must be positive, got {max_bytes}")
    files = corpus_files(source)
    if source is None:
        root, source_desc = _stdlib_root(), f"python-stdlib:{_stdlib_root()}"
    else:
        src = Path(source).expanduser()
        root = src if src.is_dir() else src.parent
        source_desc = str(src.resolve())
    out = Path(out_dir).expanduser()
    check_target(out, (DATASET,), force)
    # Never read our own output back in when out_dir lies inside the corpus directory.
    out_abs = out.resolve()
    files = [f for f in files if not f.resolve().is_relative_to(out_abs)]
    if not files:
        raise DataError(f"corpus {source_desc} has no text files outside the output directory {out}")
    if exclude:
        files = [f for f in files if not any(fnmatch.fnmatch(_relative(f, root), pat) for pat in exclude)]
        if not files:
            raise DataError(f"--exclude {' '.join(exclude)} leaves no files of {source_desc}")

    if max_bytes is not None and len(files) > 1:
        files = _cap_files(files, root, max_bytes)
        if not files:
            raise DataError(f"max_bytes={max_bytes} is smaller than every file in {source_desc}")

    by_position = len(files) == 1
    if by_position:
        text = _read_text(files[0], max_bytes)
        cut = _position_cut(text, val_fraction)
        parts = {"train": text[:cut], "val": text[cut:]}
        train_files, val_files = files, []
        n_bytes = len(text.encode("utf-8"))
    else:
        train_files, val_files = split_files(files, val_fraction, root=root)
        n_bytes = sum(f.stat().st_size for f in files)

    def docs(split: str) -> Iterable[str]:
        if by_position:
            return [parts[split]]
        paths = train_files if split == "train" else val_files
        return (_read_text(f) for f in _progress(paths, progress, split))

    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    elif tokenizer == "byte":
        tok = byte_tokenizer()
    elif tokenizer == "bpe":
        tok = train_bpe_tokenizer(docs("train"), vocab_size, show_progress=progress)
    elif Path(tokenizer).expanduser().exists():
        tok = Tokenizer.load(tokenizer)
    else:
        raise DataError(f"unknown tokenizer {str(tokenizer)!r}: expected 'bpe', 'byte' or a path to a tokenizer.json")
    dtype = _token_dtype(tok.vocab_size)

    # Everything is built in a directory beside `out` and moved in only when complete, so a
    # failure leaves an existing dataset as it was and creates nothing new.
    with atomic_dir(out, commit_file="meta.json") as tmp:
        n_train = _write_tokens(tok, docs("train"), tmp / "train.bin", dtype)
        if n_train == 0:
            raise DataError(f"corpus {source_desc} is empty (no tokens in the train split)")
        n_val = _write_tokens(tok, docs("val"), tmp / "val.bin", dtype)
        tok.save(tmp)
        meta: dict[str, Any] = {
            "format": META_FORMAT,
            "version": META_VERSION,
            "source": source_desc,
            "tokenizer": tok.kind,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
            "dtype": dtype.name,
            "n_train_tokens": n_train,
            "n_val_tokens": n_val,
            "n_files": len(files),
            "n_train_files": len(train_files),
            "n_val_files": len(val_files),
            "n_bytes": n_bytes,
            "split": "position" if by_position else "file",
            "val_fraction": val_fraction,
            "max_bytes": max_bytes,
            **({"exclude": list(exclude)} if exclude else {}),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _progress(files: list[Path], enabled: bool, desc: str) -> Iterable[Path]:
    if not enabled:
        return files
    from tqdm import tqdm  # only needed for interactive runs

    return tqdm(files, desc=f"{desc} files", unit="file")


# --------------------------------------------------------------------------- batches


class TokenData:
    """Memory-mapped view of one split ("train" or "val") of a prepared corpus.

    Windows are strided by ``seq_len`` and hold ``seq_len + extra`` tokens, so the
    ``extra`` (= number of future heads) tokens past each window give every position a
    target for every head.
    """

    tokens: np.memmap

    def __init__(self, directory: str | Path, split: str) -> None:
        self.directory = Path(directory).expanduser()
        self.split = split
        if split not in SPLITS:
            raise DataError(f"split must be 'train' or 'val', got {split!r}")
        meta_path = self.directory / "meta.json"
        if not self.directory.is_dir():
            raise DataError(f"data directory {self.directory} does not exist; run prepare first")
        if not meta_path.is_file():
            raise DataError(f"{self.directory} is not a prepared corpus (no meta.json); run prepare first")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read {meta_path}: {exc}") from None
        if not isinstance(meta, dict) or meta.get("format") != META_FORMAT or meta.get("version") != META_VERSION:
            raise DataError(f"{meta_path} is not a format-{META_VERSION} {META_FORMAT} file; re-run prepare")
        try:
            dtype = np.dtype(meta["dtype"])
            expected = int(meta[f"n_{split}_tokens"])
            self.vocab_size = int(meta["vocab_size"])
            self.eos_id = int(meta["eos_id"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{meta_path} has a missing or invalid field ({exc}); re-run prepare") from None
        if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)) or self.vocab_size > np.iinfo(dtype).max + 1:
            raise DataError(f"{meta_path}: dtype {dtype.name} does not match vocab_size {self.vocab_size}; re-run prepare")
        bin_path = self.directory / f"{split}.bin"
        if not bin_path.is_file():
            raise DataError(f"{bin_path} is missing; re-run prepare")
        size = bin_path.stat().st_size
        if size % dtype.itemsize:
            raise DataError(
                f"{bin_path} is truncated: {size} bytes is not a multiple of the {dtype.itemsize}-byte token size"
            )
        if size // dtype.itemsize != expected:
            raise DataError(
                f"{bin_path} holds {size // dtype.itemsize} tokens but meta.json says {expected}; re-run prepare"
            )
        self.meta = meta
        self.dtype = dtype
        # numpy cannot map an empty file; an empty split simply has no windows.
        self.tokens = np.memmap(bin_path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)  # type: ignore[assignment]
        self._perms: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()

    def __reduce__(self) -> tuple[type[TokenData], tuple[Path, str]]:
        # Re-open the file instead of pickling the whole memmap (e.g. DataLoader workers).
        return (type(self), (self.directory, self.split))

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"TokenData({str(self.directory)!r}, {self.split!r}, tokens={len(self)})"

    def num_windows(self, seq_len: int, extra: int) -> int:
        """Number of full windows of ``seq_len + extra`` tokens, strided by ``seq_len``."""
        if seq_len < 1 or extra < 0:
            raise ValueError(f"need seq_len >= 1 and extra >= 0, got seq_len={seq_len}, extra={extra}")
        n = len(self.tokens)
        return 0 if n < seq_len + extra else (n - extra) // seq_len

    def window(self, i: int, seq_len: int, extra: int) -> np.ndarray:
        """``tokens[i*seq_len : i*seq_len + seq_len + extra]`` (a read-only view)."""
        n = self.num_windows(seq_len, extra)
        if not 0 <= i < n:
            raise IndexError(f"window {i} out of range [0, {n})")
        start = i * seq_len
        return np.asarray(self.tokens[start : start + seq_len + extra])

    def most_frequent(self, k: int) -> np.ndarray:
        """The ids of the k most frequent tokens of this split (fewer if fewer occur), ties by
        id: a draft vocabulary (`MTPModel.set_draft_vocab`)."""
        counts = np.bincount(np.asarray(self.tokens), minlength=self.vocab_size)
        order = np.argsort(-counts, kind="stable")
        return np.sort(order[: min(k, int((counts > 0).sum()))])

    def _require_windows(self, seq_len: int, extra: int) -> int:
        n = self.num_windows(seq_len, extra)
        if n < 1:
            raise DataError(
                f"the {self.split} split of {self.directory} has {len(self.tokens)} tokens, too small for "
                f"seq_len={seq_len} (each window needs {seq_len + extra}); use a smaller seq_len or more data"
            )
        return n

    def _permutation(self, seed: int, epoch: int, n: int) -> np.ndarray:
        key = (seed, epoch, n)
        perm = self._perms.get(key)
        if perm is None:
            # Seeding with the pair (seed, epoch) rather than seed + epoch keeps
            # different seeds from replaying each other's epochs.
            perm = np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n)
            self._perms[key] = perm
            if len(self._perms) > _PERM_CACHE_SIZE:
                self._perms.popitem(last=False)
        else:
            self._perms.move_to_end(key)
        return perm

    def gather(self, windows: np.ndarray, seq_len: int, extra: int) -> torch.Tensor:
        """LongTensor ``(len(windows), seq_len + extra)``: the windows with these indices."""
        index = windows[:, None] * seq_len + np.arange(seq_len + extra)
        return torch.from_numpy(self.tokens[index].astype(np.int64))


    def batch(
        self,
        step: int,
        batch_size: int,
        seq_len: int,
        extra: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> torch.Tensor:
        """LongTensor ``(batch_size, seq_len + extra)`` for global step `step` on `rank`.

        Global step s covers positions ``[s*B*W, (s+1)*B*W)`` of an endless sequence of
        epochs, each a seeded permutation of all windows; rank r takes the r-th block of
        B. The result depends only on the arguments, so resuming at step s is exact.
        """
        return self.gather(self.batch_windows(step, batch_size, seq_len, extra, seed, rank, world_size),
                           seq_len, extra)

    def batch_windows(
        self,
        step: int,
        batch_size: int,
        seq_len: int,
        extra: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> np.ndarray:
        """The indices (int64, batch_size) of the windows `batch` gathers for these arguments:
        what per-window data kept beside the tokens (mtp.base_cache) is looked up by."""
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if step < 0 or seed < 0:
            raise ValueError(f"step and seed must be non-negative, got step={step}, seed={seed}")
        n = self._require_windows(seq_len, extra)
        start = (step * world_size + rank) * batch_size
        positions = np.arange(start, start + batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(positions, n)
        windows = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            windows[mask] = self._permutation(seed, int(epoch), n)[offsets[mask]]
        return windows


def validation_batches(
    data: TokenData, batch_size: int, seq_len: int, extra: int, max_batches: int | None = None
) -> Iterator[torch.Tensor]:
    """Sequential, unshuffled batches of windows from the start of `data`.

    Yields at most `max_batches` batches (all windows when None); the last one may be
    smaller than `batch_size`. Raises DataError up front if there is not one window.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = data._require_windows(seq_len, extra)
    n_batches = math.ceil(n / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max(0, max_batches))

    def batches() -> Iterator[torch.Tensor]:
        for b in range(n_batches):
            windows = np.arange(b * batch_size, min(n, (b + 1) * batch_size), dtype=np.int64)
            yield data.gather(windows, seq_len, extra)

    return batches()
