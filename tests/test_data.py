"""Tests for mtp.data: tokenizers, corpus discovery and splitting, prepare, TokenData batches."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from mtp import data as D
from mtp.data import (
    EOS_TOKEN,
    DataError,
    TokenData,
    Tokenizer,
    byte_tokenizer,
    corpus_files,
    default_corpus_files,
    prepare,
    split_files,
    train_bpe_tokenizer,
    validation_batches,
)

SAMPLES = [
    "def f(x):\n    return x + 1\n",
    "héllo wörld — ünïcödé ✓ 日本語 🙂\n",
    "tabs\tand\r\nCRLF  \n\n   trailing   ",
    "",
]


def _stdlib_texts(max_bytes: int = 150_000) -> list[str]:
    texts, total = [], 0
    for f in default_corpus_files():
        text = f.read_text(encoding="utf-8")
        if total + len(text) > max_bytes:
            break
        texts.append(text)
        total += len(text)
    return texts


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe_tokenizer(_stdlib_texts(), vocab_size=512)


@pytest.fixture(scope="module")
def stdlib_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stdlib")
    prepare(None, out, tokenizer="bpe", vocab_size=512, max_bytes=200_000)
    return out


def _write_tree(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return root


def _synthetic(directory: Path, n_tokens: int, n_val: int = 0) -> Path:
    """A prepared directory whose token at position p is p, so windows are identifiable."""
    directory.mkdir(parents=True, exist_ok=True)
    np.arange(n_tokens, dtype=np.uint16).tofile(directory / "train.bin")
    np.arange(n_val, dtype=np.uint16).tofile(directory / "val.bin")
    meta = {"format": "mtp-tokens", "version": 1, "dtype": "uint16", "vocab_size": 65536, "eos_id": 0,
            "n_train_tokens": n_tokens, "n_val_tokens": n_val}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


# ------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_layout() -> None:
    tok = byte_tokenizer()
    assert (tok.kind, tok.vocab_size, tok.eos_id, tok.pad_id) == ("byte", 258, 256, 257)
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))  # id == byte value
        assert tok.decode(ids) == text
        # the fast path must agree with the underlying Hugging Face tokenizer
        assert tok.hf.encode(text, add_special_tokens=False).ids == ids
    assert tok.decode([104, 105, tok.eos_id]) == "hi" + EOS_TOKEN


def test_special_token_text_is_not_special(bpe: Tokenizer) -> None:
    text = f"a{EOS_TOKEN}b"
    for tok in (byte_tokenizer(), bpe):
        ids = tok.encode(text)
        assert tok.eos_id not in ids
        assert tok.decode(ids) == text


def test_bpe_round_trip_and_layout(bpe: Tokenizer) -> None:
    assert bpe.kind == "bpe"
    assert 258 < bpe.vocab_size <= 512
    assert (bpe.eos_id, bpe.pad_id) == (256, 257)
    for text in SAMPLES:
        assert bpe.decode(bpe.encode(text)) == text
    code = _stdlib_texts(20_000)[-1]
    ids = bpe.encode(code)
    assert bpe.decode(ids) == code
    assert len(ids) < 0.7 * len(code.encode("utf-8"))  # merges actually compress
    assert bpe.encode("\x07") == [7]  # single bytes keep id == byte value
    assert bpe.encode_batch(SAMPLES[:2]) == [bpe.encode(s) for s in SAMPLES[:2]]


def test_bpe_training_is_deterministic(bpe: Tokenizer) -> None:
    again = train_bpe_tokenizer(_stdlib_texts(), vocab_size=512)
    assert again.hf.to_str() == bpe.hf.to_str()


def test_bpe_rejects_tiny_vocab() -> None:
    with pytest.raises(DataError, match="vocab_size"):
        train_bpe_tokenizer(["abc"], vocab_size=258)


def test_long_documents_are_cut_without_changing_tokens(bpe: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "".join(_stdlib_texts(60_000))
    monkeypatch.setattr(D, "_PIECE_CHARS", 3_000)
    pieces = list(D._pieces(text))
    assert len(pieces) > 5 and "".join(pieces) == text
    assert [i for p in pieces for i in bpe.encode(p)] == bpe.encode(text)


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_tokenizer_save_load(tmp_path: Path, bpe: Tokenizer, kind: str) -> None:
    tok = byte_tokenizer() if kind == "byte" else bpe
    tok.save(tmp_path / "tk")
    assert (tmp_path / "tk" / "tokenizer.json").is_file()
    for where in (tmp_path / "tk", tmp_path / "tk" / "tokenizer.json", str(tmp_path / "tk")):
        loaded = Tokenizer.load(where)
        assert (loaded.kind, loaded.vocab_size, loaded.eos_id) == (tok.kind, tok.vocab_size, tok.eos_id)
        assert [loaded.encode(s) for s in SAMPLES] == [tok.encode(s) for s in SAMPLES]


def test_tokenizer_load_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no tokenizer.json in"):
        Tokenizer.load(tmp_path)
    with pytest.raises(DataError, match="no tokenizer.json in"):
        Tokenizer.load(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)


# ------------------------------------------------------------------------- corpus files


def test_default_corpus_is_stdlib_without_tests() -> None:
    files = default_corpus_files()
    assert len(files) > 300
    assert files == default_corpus_files()
    root = D._stdlib_root()
    rel = [f.relative_to(root) for f in files]
    assert rel == sorted(rel, key=lambda p: p.parts)
    assert all(p.suffix == ".py" for p in rel)
    banned = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    assert not any(banned & set(p.parts[:-1]) for p in rel)
    assert Path("os.py") in rel and Path("json/decoder.py") in rel


def test_corpus_files_directory(tmp_path: Path) -> None:
    root = _write_tree(tmp_path, {
        "b.py": "print(1)\n", "a/z.txt": "z\n", "a/y.md": "# y\n", ".hidden/x.py": "x\n", ".env": "K=1\n",
        "img.bin": b"\x89PNG\x00\x01", "latin1.txt": "caf\xe9".encode("latin-1"),
    })
    files = corpus_files(root)
    assert [f.relative_to(root).as_posix() for f in files] == ["a/y.md", "a/z.txt", "b.py"]
    assert corpus_files(root / "b.py") == [root / "b.py"]


@pytest.mark.parametrize("case", ["missing", "empty_dir", "binary_only", "binary_file"])
def test_bad_sources_raise_data_error(tmp_path: Path, case: str) -> None:
    if case == "missing":
        source, pattern = tmp_path / "nope", "does not exist"
    elif case == "empty_dir":
        source, pattern = tmp_path, "no text files"
    elif case == "binary_only":
        source = _write_tree(tmp_path, {"a.bin": b"\x00\x01\x02", "b.txt": b"\xff\xfe bad utf8"})
        pattern = "no text files"
    else:
        source = tmp_path / "x.bin"
        source.write_bytes(b"abc\x00def")
        pattern = "not a UTF-8 text file"
    with pytest.raises(DataError, match=pattern):
        corpus_files(source)
    with pytest.raises(DataError, match=pattern):
        prepare(source, tmp_path / "out", tokenizer="byte")
    assert not (tmp_path / "out" / "meta.json").exists()


def test_prepare_empty_corpus(tmp_path: Path) -> None:
    src = _write_tree(tmp_path / "src", {"a.txt": "", "b/c.txt": ""})
    with pytest.raises(DataError, match=r"corpus .* is empty"):
        prepare(src, tmp_path / "out", tokenizer="byte")
    (tmp_path / "one.txt").write_text("")
    with pytest.raises(DataError, match=r"corpus .* is empty"):
        prepare(tmp_path / "one.txt", tmp_path / "out", tokenizer="byte")


def test_split_files_deterministic_and_disjoint(tmp_path: Path) -> None:
    names = [f"pkg/mod{i}.py" for i in range(200)]
    files = [tmp_path / n for n in names]
    train, val = split_files(files, 0.1)
    assert (train, val) == split_files(files, 0.1)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(files)
    assert 5 <= len(val) <= 40  # ~10% of 200
    # membership depends only on the relative path, not on where the corpus lives
    moved = [Path("/elsewhere/corpus") / n for n in names]
    _, val_moved = split_files(moved, 0.1)
    assert [p.relative_to("/elsewhere/corpus") for p in val_moved] == [p.relative_to(tmp_path) for p in val]
    # adding files never moves existing ones
    _, val_more = split_files(files + [tmp_path / "pkg/extra.py"], 0.1)
    assert set(val) <= set(val_more)


def test_split_files_small_inputs(tmp_path: Path) -> None:
    two = [tmp_path / "a.py", tmp_path / "b.py"]
    train, val = split_files(two, 0.05)
    assert len(train) == 1 and len(val) == 1 and set(train + val) == set(two)
    train, val = split_files(two, 0.99)
    assert len(train) == 1 and len(val) == 1
    assert split_files(two[:1], 0.05) == (two[:1], [])
    assert split_files(two, 0.0) == (two, [])
    with pytest.raises(DataError, match="val_fraction"):
        split_files(two, 1.0)


# ------------------------------------------------------------------------- prepare


def test_prepare_byte_layout_is_exact(tmp_path: Path) -> None:
    files = {"b.py": "x = 1\n", "a/one.txt": "ünï\n", "a/two.txt": "two\n", "c.md": "", "d.txt": "d\n"}
    src = _write_tree(tmp_path / "src", files)
    meta = prepare(src, tmp_path / "out", tokenizer="byte", val_fraction=0.3)
    tr_files, va_files = split_files(corpus_files(src), 0.3, root=src)
    assert meta["n_train_files"] == len(tr_files) and meta["n_val_files"] == len(va_files) >= 1

    def expected(paths: list[Path]) -> list[int]:  # sorted order, empty docs dropped, eos after each
        out: list[int] = []
        for p in paths:
            if p.read_bytes():
                out += list(p.read_bytes()) + [256]
        return out

    for split, paths in (("train", tr_files), ("val", va_files)):
        stored = np.fromfile(tmp_path / "out" / f"{split}.bin", dtype=np.uint16).tolist()
        assert stored == expected(paths)
        assert meta[f"n_{split}_tokens"] == len(stored)
    on_disk = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert on_disk == meta
    assert (meta["tokenizer"], meta["vocab_size"], meta["eos_id"], meta["dtype"]) == ("byte", 258, 256, "uint16")
    assert meta["n_files"] == 5 and meta["split"] == "file"
    assert Tokenizer.load(tmp_path / "out").kind == "byte"
    assert not list((tmp_path / "out").glob(".*tmp"))  # temp files cleaned up


def test_prepare_is_byte_identical(tmp_path: Path, stdlib_prepared: Path) -> None:
    prepare(None, tmp_path, tokenizer="bpe", vocab_size=512, max_bytes=200_000)
    names = ["train.bin", "val.bin", "tokenizer.json", "meta.json"]
    for name in names:
        assert (tmp_path / name).read_bytes() == (stdlib_prepared / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


def test_prepare_stdlib_meta_and_tokens(stdlib_prepared: Path) -> None:
    meta = json.loads((stdlib_prepared / "meta.json").read_text())
    assert meta["tokenizer"] == "bpe" and 258 < meta["vocab_size"] <= 512
    assert meta["n_bytes"] <= 200_000 and meta["n_files"] >= 10
    assert meta["n_val_files"] >= 1 and meta["n_val_tokens"] > 0
    assert meta["n_train_files"] + meta["n_val_files"] == meta["n_files"]
    train = TokenData(stdlib_prepared, "train")
    assert len(train) == meta["n_train_tokens"] > 10_000
    assert int(train.tokens.max()) < meta["vocab_size"]
    assert int(train.tokens[-1]) == meta["eos_id"]
    tok = Tokenizer.load(stdlib_prepared)
    first_doc = np.asarray(train.tokens[: int(np.argmax(train.tokens == tok.eos_id))]).tolist()
    assert "def " in tok.decode(first_doc) or "import " in tok.decode(first_doc)


def test_prepare_single_file_splits_by_position(tmp_path: Path) -> None:
    text = "".join(f"line {i} ünï\n" for i in range(400))
    src = tmp_path / "corpus.txt"
    src.write_text(text, encoding="utf-8")
    meta = prepare(src, tmp_path / "out", tokenizer="byte", val_fraction=0.1)
    assert meta["split"] == "position" and meta["n_files"] == 1
    tok = byte_tokenizer()
    train = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16).tolist()
    val = np.fromfile(tmp_path / "out" / "val.bin", dtype=np.uint16).tolist()
    assert train[-1] == val[-1] == tok.eos_id
    train_text, val_text = tok.decode(train[:-1]), tok.decode(val[:-1])
    assert train_text + val_text == text
    assert val_text.startswith("line ")  # cut at a line start
    assert 0.08 < len(val_text) / len(text) < 0.12
    # max_bytes cuts a single file instead of dropping it
    capped = prepare(src, tmp_path / "cap", tokenizer="byte", val_fraction=0.1, max_bytes=1000)
    assert capped["n_bytes"] <= 1000 and capped["n_train_tokens"] + capped["n_val_tokens"] <= 1002


def test_prepare_with_bpe_and_existing_tokenizer(tmp_path: Path, bpe: Tokenizer) -> None:
    src = _write_tree(tmp_path / "src", {f"m{i}.py": t for i, t in enumerate(_stdlib_texts(30_000))})
    meta = prepare(src, tmp_path / "out", tokenizer=bpe)
    assert meta["vocab_size"] == bpe.vocab_size
    bpe.save(tmp_path / "tk")
    meta2 = prepare(src, tmp_path / "out2", tokenizer=tmp_path / "tk")
    assert (tmp_path / "out" / "train.bin").read_bytes() == (tmp_path / "out2" / "train.bin").read_bytes()
    assert meta2["n_train_tokens"] == meta["n_train_tokens"]
    with pytest.raises(DataError, match="unknown tokenizer"):
        prepare(src, tmp_path / "out3", tokenizer="wordpiece")


def test_prepare_into_the_corpus_directory_is_stable(tmp_path: Path) -> None:
    src = _write_tree(tmp_path, {"a.txt": "alpha\n", "b.txt": "beta\n", "c.txt": "gamma\n"})
    first = prepare(src, src / "prepared", tokenizer="byte")
    second = prepare(src, src / "prepared", tokenizer="byte")  # must not read its own tokenizer.json/meta.json
    assert first == second and first["n_files"] == 3


def test_prepare_max_bytes_too_small(tmp_path: Path) -> None:
    src = _write_tree(tmp_path / "src", {"a.txt": "a" * 100, "b.txt": "b" * 100})
    with pytest.raises(DataError, match="max_bytes"):
        prepare(src, tmp_path / "out", tokenizer="byte", max_bytes=10)


def test_prepare_exclude_leaves_out_matching_files(tmp_path: Path) -> None:
    files = {"gui/tk.py": "tk.call(1)\n" * 5, "gui/sub/more.py": "tk.call(2)\n", "core.py": "x = 1\n",
             "util.py": "y = 2\n", "data.txt": "zz\n"}
    src = _write_tree(tmp_path / "src", files)
    meta = prepare(src, tmp_path / "out", tokenizer="byte", val_fraction=0.3, exclude=["gui/*", "*.txt"])
    assert meta["n_files"] == 2 and meta["exclude"] == ["gui/*", "*.txt"]
    kept = bytes(np.concatenate([np.fromfile(tmp_path / "out" / f"{s}.bin", dtype=np.uint16)
                                 for s in ("train", "val")]).astype(np.uint8).tolist())
    assert b"tk.call" not in kept and b"zz" not in kept and b"x = 1" in kept and b"y = 2" in kept
    assert "exclude" not in prepare(src, tmp_path / "all", tokenizer="byte", val_fraction=0.3)
    with pytest.raises(DataError, match="leaves no files"):
        prepare(src, tmp_path / "none", tokenizer="byte", exclude=["*"])
    assert not (tmp_path / "none").exists()


# ------------------------------------------------------------------------- TokenData


def test_token_data_errors(tmp_path: Path, stdlib_prepared: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        TokenData(tmp_path / "nope", "train")
    with pytest.raises(DataError, match="no meta.json"):
        TokenData(tmp_path, "train")
    with pytest.raises(DataError, match="split"):
        TokenData(stdlib_prepared, "test")
    d = _synthetic(tmp_path / "trunc", 100)
    with open(d / "train.bin", "ab") as f:
        f.write(b"\x01")  # odd size for uint16
    with pytest.raises(DataError, match="truncated"):
        TokenData(d, "train")
    d = _synthetic(tmp_path / "short", 100)
    (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:100])
    with pytest.raises(DataError, match="meta.json says 100"):
        TokenData(d, "train")
    d = _synthetic(tmp_path / "nobin", 100)
    (d / "val.bin").unlink()
    with pytest.raises(DataError, match="missing"):
        TokenData(d, "val")


def test_windows(tmp_path: Path) -> None:
    data = TokenData(_synthetic(tmp_path, 103), "train")
    assert data.num_windows(10, 3) == 10  # last window: tokens 90..102
    assert data.num_windows(10, 4) == 9
    assert data.num_windows(200, 0) == 0
    assert data.window(2, 10, 3).tolist() == list(range(20, 33))
    assert data.window(9, 10, 3).tolist() == list(range(90, 103))
    with pytest.raises(IndexError):
        data.window(10, 10, 3)


def _starts(batch: torch.Tensor, seq_len: int) -> list[int]:
    """Window index of each row of a batch from a `_synthetic` corpus."""
    return [int(r[0]) // seq_len for r in batch]


def test_batch_shape_determinism_and_content(tmp_path: Path) -> None:
    d = _synthetic(tmp_path, 4000)
    data, other = TokenData(d, "train"), TokenData(d, "train")
    b = data.batch(5, 8, 32, 2, seed=1)
    assert b.shape == (8, 34) and b.dtype == torch.long
    assert torch.equal(b, other.batch(5, 8, 32, 2, seed=1))  # pure function of (seed, step)
    assert torch.equal(b, data.batch(5, 8, 32, 2, seed=1))  # and of cache state
    for row in b:  # every row is a contiguous window strided by seq_len
        assert int(row[0]) % 32 == 0
        assert row.tolist() == list(range(int(row[0]), int(row[0]) + 34))
    assert not torch.equal(b, data.batch(6, 8, 32, 2, seed=1))
    assert not torch.equal(b, data.batch(5, 8, 32, 2, seed=2))


def test_batch_ranks_partition_global_batch(tmp_path: Path) -> None:
    data = TokenData(_synthetic(tmp_path, 5000), "train")
    for step in (0, 7, 40):  # 40 crosses into later epochs (155 windows)
        full = data.batch(step, 4 * 3, 32, 1, seed=3)
        parts = [data.batch(step, 4, 32, 1, seed=3, rank=r, world_size=3) for r in range(3)]
        assert torch.equal(torch.cat(parts), full)
        starts = [set(_starts(p, 32)) for p in parts]
        assert not (starts[0] & starts[1] or starts[0] & starts[2] or starts[1] & starts[2])


def test_batch_epoch_rollover(tmp_path: Path) -> None:
    data = TokenData(_synthetic(tmp_path, 10 * 16 + 1), "train")  # exactly 10 windows
    assert data.num_windows(16, 1) == 10
    seen = [_starts(data.batch(s, 5, 16, 1), 16) for s in range(4)]
    epoch0, epoch1 = seen[0] + seen[1], seen[2] + seen[3]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))  # each epoch visits every window once
    assert epoch0 != epoch1  # and reshuffles
    # a batch straddling an epoch boundary continues into the next epoch's order
    straddle = _starts(data.batch(1, 7, 16, 1), 16)
    assert straddle == epoch0[7:] + epoch1[:4]
    # more windows per batch than exist: wraps through several epochs
    assert data.batch(0, 25, 16, 1).shape == (25, 17)


def test_batch_too_small_and_empty_split(tmp_path: Path) -> None:
    data = TokenData(_synthetic(tmp_path, 20, n_val=0), "train")
    with pytest.raises(DataError, match="too small for seq_len=32"):
        data.batch(0, 2, 32, 2)
    val = TokenData(tmp_path, "val")
    assert len(val) == 0 and val.num_windows(4, 1) == 0
    with pytest.raises(DataError, match="too small"):
        validation_batches(val, 2, 4, 1, 10)


def test_validation_batches(tmp_path: Path) -> None:
    data = TokenData(_synthetic(tmp_path, 1000), "train")  # (1000 - 2) // 64 = 15 windows
    batches = list(validation_batches(data, 4, 64, 2, max_batches=100))
    assert [b.shape[0] for b in batches] == [4, 4, 4, 3]
    assert [s for b in batches for s in _starts(b, 64)] == list(range(15))
    assert all(b.shape[1] == 66 for b in batches)
    again = list(validation_batches(data, 4, 64, 2, max_batches=2))
    assert len(again) == 2 and all(torch.equal(x, y) for x, y in zip(again, batches))


def test_token_data_pickles_without_copying(tmp_path: Path) -> None:
    data = TokenData(_synthetic(tmp_path, 1000), "train")
    blob = pickle.dumps(data)
    assert len(blob) < 500
    clone = pickle.loads(blob)
    assert torch.equal(clone.batch(3, 2, 16, 1), data.batch(3, 2, 16, 1))
