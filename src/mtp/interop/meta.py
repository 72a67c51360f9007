"""The checkpoint format of Meta's multi-token prediction release (facebook/multi-token-prediction).

A directory holds `params.json`, `consolidated.pth` and usually a SentencePiece `tokenizer.model`.
The blocks are `layers` (n_layers - n_future_tokens + 1 of them: the trunk, then head 1 last) and
`extra_heads` (heads 2..n), followed by the shared `norm` and `output`.

Meta rotates interleaved pairs (x[2i], x[2i+1]) as complex numbers; MTPModel rotates halves
(x[i], x[i + hd/2]) like Hugging Face. Permuting the rows of wq and wk per head turns one into
the other (scores q.k are unchanged because q and k are permuted alike), so conversion is exact.
"""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..fsutil import atomic_write_bytes
from ..model import ModelConfig, MTPModel
from ._common import InteropError, assign_state, check_vocab, make_config, read_json, require_dir

PARAMS = "params.json"
WEIGHTS = "consolidated.pth"
SPM_TOKENIZER = "tokenizer.model"
DEFAULT_MAX_SEQ_LEN = 4096  # params.json rarely says; Llama 2 era models were trained at 4096

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_EXTRA = re.compile(r"^extra_heads\.(\d+)\.(.+)$")
_OURS_TRUNK = re.compile(r"^trunk_layers\.(\d+)\.(.+)$")
_OURS_HEAD = re.compile(r"^heads\.(\d+)\.(.+)$")
_IGNORED = {"rope.freqs"}  # a buffer some Llama releases saved; recomputed from rope_theta


# ----- RoPE layouts --------------------------------------------------------------------------------

def interleaved_to_half(w: Tensor, n_heads: int) -> Tensor:
    """Rows of wq/wk from Meta's interleaved layout to the half-rotation layout.

    Per head, row 2i+j (pair i, real j=0 / imaginary j=1) moves to row j*hd/2 + i: the same
    permutation as Hugging Face's convert_llama_weights_to_hf."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def half_to_interleaved(w: Tensor, n_heads: int) -> Tensor:
    """Inverse of `interleaved_to_half`."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


# ----- tokenizer -----------------------------------------------------------------------------------

class SentencePieceTokenizer:
    """A SentencePiece `tokenizer.model` behind mtp.data.Tokenizer's interface.

    Like mtp.data.Tokenizer, `encode` adds no BOS/EOS. `save` writes tokenizer.model and, when
    transformers is installed, a converted tokenizer.json so mtp.checkpoint.load_model finds it.
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, source: str | Path = SPM_TOKENIZER) -> None:
        try:
            import sentencepiece as spm
        except ImportError:
            raise InteropError(f"{source}: reading SentencePiece tokenizers needs sentencepiece "
                               "(pip install 'mtp[hf]')") from None
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with multi-line text
            raise InteropError(f"{source} is not a SentencePiece model ({str(e).splitlines()[0] if str(e) else e})") from None
        self.vocab_size: int = self.sp.vocab_size()
        if self.sp.eos_id() < 0:
            raise InteropError(f"{source}: the SentencePiece model defines no eos piece (eos_id)")
        self.eos_id: int = self.sp.eos_id()
        self.bos_id: int | None = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.pad_id: int | None = self.sp.pad_id() if self.sp.pad_id() >= 0 else None

    @classmethod
    def load(cls, path: str | Path) -> "SentencePieceTokenizer":
        path = Path(path)
        file = path / SPM_TOKENIZER if path.is_dir() else path
        if not file.is_file():
            raise InteropError(f"{file} is missing")
        return cls(file.read_bytes(), source=file)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self.sp.encode(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def save_model(self, directory: str | Path) -> None:
        """Write directory/tokenizer.model (atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(directory / SPM_TOKENIZER, self.model_proto)

    def save(self, directory: str | Path) -> None:
        """tokenizer.model, plus tokenizer.json when the conversion is available (see to_tokenizer)."""
        self.save_model(directory)
        try:
            converted = self.to_tokenizer()
        except InteropError as e:
            warnings.warn(f"wrote only {SPM_TOKENIZER}: {e}", stacklevel=2)
            return
        converted.save(directory)

    def to_tokenizer(self) -> Any:
        """The same vocabulary as an mtp.data.Tokenizer (via transformers' Llama converter).

        Decoding is identical; encoding matches SentencePiece on ordinary text but can differ on
        rare inputs (e.g. text starting with several spaces), a known property of the conversion."""
        try:
            from transformers import LlamaTokenizerFast
        except ImportError:
            raise InteropError("converting tokenizer.model to tokenizer.json needs transformers "
                               "(pip install 'mtp[hf]')") from None
        from tokenizers import Tokenizer as HFTokenizer

        from ..data import Tokenizer
        from .hf import quiet_transformers

        with tempfile.TemporaryDirectory() as tmp, quiet_transformers():
            (Path(tmp) / SPM_TOKENIZER).write_bytes(self.model_proto)
            try:
                fast = LlamaTokenizerFast.from_pretrained(tmp, local_files_only=True)
            except Exception as e:
                raise InteropError(f"cannot convert {SPM_TOKENIZER} to tokenizer.json ({type(e).__name__})") from None
        backend = HFTokenizer.from_str(fast.backend_tokenizer.to_str())
        backend.no_padding()
        backend.no_truncation()
        return Tokenizer(backend, kind="bpe", eos_token=self.sp.id_to_piece(self.eos_id))


# ----- reading -------------------------------------------------------------------------------------

def _read_params(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InteropError(f"{path} is missing: not a Meta checkpoint directory")
    params = read_json(path)
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise InteropError(f"{path}: missing field {key!r}")
    if params.get("use_scaled_rope"):
        raise InteropError(f"{path}: field use_scaled_rope (Llama 3.1 RoPE scaling) is not supported")
    return params


def _field(params: dict[str, Any], key: str, kind: type, default: Any, path: Path) -> Any:
    value = params.get(key, default)
    if value is None:
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise InteropError(f"{path}: field {key!r} must be {kind.__name__}, got {value!r}") from None


def _weights_file(directory: Path) -> Path:
    path = directory / WEIGHTS
    if path.is_file():
        return path
    shards = sorted(directory.glob("consolidated.*.pth"))
    if len(shards) == 1:
        return shards[0]
    if len(shards) > 1:
        raise InteropError(f"{directory}: {len(shards)} model-parallel shards (consolidated.*.pth) are not "
                           "supported; merge them into one consolidated.pth first")
    raise InteropError(f"{path} is missing")


def _torch_load(path: Path) -> dict[str, Tensor]:
    try:
        # mmap: tensors stay on disk until touched, so a 7B checkpoint is not read into RAM twice.
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:
        try:  # files in the legacy (non-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InteropError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__})") from None
    except Exception as e:
        raise InteropError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InteropError(f"{path} does not hold a flat state dict of tensors")
    return state


def _read_tokenizer(directory: Path) -> Any | None:
    if (directory / SPM_TOKENIZER).is_file():
        return SentencePieceTokenizer.load(directory / SPM_TOKENIZER)
    if (directory / "tokenizer.json").is_file():  # what save_meta writes for an mtp.data.Tokenizer
        from ..data import DataError, Tokenizer

        try:
            return Tokenizer.load(directory)
        except DataError as e:
            raise InteropError(str(e)) from None
    return None


def load_meta(directory: str | Path, *, max_seq_len: int | None = None,
              dtype: torch.dtype | None = None) -> tuple[MTPModel, Any | None]:
    """(model in eval mode, tokenizer or None) from a Meta multi-token prediction checkpoint.

    Tensors are memory-mapped and become the model's parameters without a copy (except the
    permuted wq/wk); `dtype` converts afterwards. `max_seq_len` defaults to params.json's or 4096.
    """
    directory = require_dir(directory, "Meta")
    params_path = directory / PARAMS
    params = _read_params(params_path)
    weights = _weights_file(directory)
    tokenizer = _read_tokenizer(directory)
    state = _torch_load(weights)

    n_heads = _field(params, "n_heads", int, None, params_path)
    n_kv_heads = _field(params, "n_kv_heads", int, None, params_path) or n_heads
    n_future = _field(params, "n_future_tokens", int, 1, params_path)
    vocab = _field(params, "vocab_size", int, -1, params_path)
    vocab_from = f"{PARAMS} field vocab_size"
    if vocab <= 0:  # Meta's code takes it from the tokenizer
        if tokenizer is not None:
            vocab, vocab_from = tokenizer.vocab_size, "the tokenizer"
        elif "tok_embeddings.weight" in state:
            vocab, vocab_from = state["tok_embeddings.weight"].shape[0], "tok_embeddings.weight"
    emb = state.get("tok_embeddings.weight")
    if emb is None:
        raise InteropError(f"{weights}: missing tensor tok_embeddings.weight")
    if emb.shape[0] != vocab:
        raise InteropError(f"{weights}: tok_embeddings.weight has {emb.shape[0]} rows but the vocabulary "
                           f"size from {vocab_from} is {vocab} (vocab_size mismatch)")
    check_vocab(tokenizer, vocab, directory)

    cfg = make_config(
        params_path,
        dim=_field(params, "dim", int, None, params_path),
        n_layers=_field(params, "n_layers", int, None, params_path),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=vocab,
        n_future=n_future,
        multiple_of=_field(params, "multiple_of", int, 256, params_path),
        ffn_dim_multiplier=_field(params, "ffn_dim_multiplier", float, None, params_path),
        norm_eps=_field(params, "norm_eps", float, 1e-5, params_path),
        rope_theta=_field(params, "rope_theta", float, 10000.0, params_path),
        max_seq_len=max_seq_len or _field(params, "max_seq_len", int, DEFAULT_MAX_SEQ_LEN, params_path),
    )
    ours: dict[str, Tensor] = {}
    for name, t in state.items():
        if name in _IGNORED:
            continue
        key = _from_meta_name(name, cfg.n_trunk)
        if key.endswith("attention.wq.weight") and t.shape[0] == cfg.n_heads * cfg.head_dim:
            t = interleaved_to_half(t, cfg.n_heads)
        elif key.endswith("attention.wk.weight") and t.shape[0] == cfg.n_kv_heads * cfg.head_dim:
            t = interleaved_to_half(t, cfg.n_kv_heads)
        ours[key] = t
    model = assign_state(cfg, ours, weights, lambda k: _to_meta_name(k, cfg.n_trunk), config_name=PARAMS)
    if dtype is not None:
        model.to(dtype)
    return model, tokenizer


def _from_meta_name(name: str, n_trunk: int) -> str:
    m = _LAYER.match(name)
    if m:
        i, rest = int(m[1]), m[2]
        if i < n_trunk:
            return f"trunk_layers.{i}.{rest}"
        if i == n_trunk:
            return f"heads.0.{rest}"
        return name  # more layers than params.json implies: reported as unexpected
    m = _EXTRA.match(name)
    if m:
        return f"heads.{int(m[1]) + 1}.{m[2]}"
    return name


def _to_meta_name(name: str, n_trunk: int) -> str:
    m = _OURS_TRUNK.match(name)
    if m:
        return f"layers.{m[1]}.{m[2]}"
    m = _OURS_HEAD.match(name)
    if m:
        j = int(m[1])
        return f"layers.{n_trunk}.{m[2]}" if j == 0 else f"extra_heads.{j - 1}.{m[2]}"
    return name


# ----- writing -------------------------------------------------------------------------------------

def _meta_ffn_fields(cfg: ModelConfig) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that reproduce cfg.ffn_dim under Meta's sizing rule."""
    if cfg.hidden_dim is None:
        return cfg.multiple_of, cfg.ffn_dim_multiplier
    candidates: list[tuple[int, float | None]] = [(cfg.multiple_of, cfg.ffn_dim_multiplier)]
    base = int(2 * 4 * cfg.dim / 3)
    # multiple_of=1 and a multiplier aimed at the middle of [hidden, hidden+1) survive float rounding.
    candidates.append((1, (cfg.hidden_dim + 0.5) / base))
    for multiple_of, mult in candidates:
        probe = ModelConfig(dim=cfg.dim, n_layers=1, n_heads=cfg.n_heads, multiple_of=multiple_of,
                            ffn_dim_multiplier=mult, vocab_size=1)
        if probe.ffn_dim == cfg.hidden_dim:
            return multiple_of, mult
    raise InteropError(f"hidden_dim={cfg.hidden_dim} cannot be expressed with params.json's multiple_of/ffn_dim_multiplier")


def save_meta(model: MTPModel, directory: str | Path, tokenizer: Any | None = None) -> Path:
    """Write `model` (and tokenizer.model / tokenizer.json) in the Meta release format."""
    cfg = model.cfg
    if cfg.head_type != "parallel":
        raise InteropError(f"the Meta format has parallel transformer heads only; this model has head_type={cfg.head_type!r}")
    if cfg.attn_bias:
        raise InteropError("the Meta format has no attention biases; this model has attn_bias=True")
    if cfg.non_llama():
        raise InteropError(f"the Meta format is Llama-style only; this GPT-2-style model has {cfg.non_llama()}")
    multiple_of, mult = _meta_ffn_fields(cfg)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state: dict[str, Tensor] = {}
    for key, t in model.state_dict().items():
        t = t.detach().cpu()
        if key.endswith("attention.wq.weight"):
            t = half_to_interleaved(t, cfg.n_heads)
        elif key.endswith("attention.wk.weight"):
            t = half_to_interleaved(t, cfg.n_kv_heads)
        state[_to_meta_name(key, cfg.n_trunk)] = t.contiguous()
    params = {
        "dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size, "multiple_of": multiple_of, "ffn_dim_multiplier": mult,
        "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "max_seq_len": cfg.max_seq_len,
        "n_future_tokens": cfg.n_future,
    }
    torch.save(state, directory / WEIGHTS)
    (directory / PARAMS).write_text(json.dumps(params, indent=2) + "\n")
    if isinstance(tokenizer, SentencePieceTokenizer):
        tokenizer.save_model(directory)
    elif tokenizer is not None:
        tokenizer.save(directory)
    return directory
