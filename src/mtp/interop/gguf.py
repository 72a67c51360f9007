"""GGUF files (llama.cpp) -> MTPModel, through transformers.

transformers reads a Llama-family .gguf file and dequantises it to float (needs the `gguf` and
`accelerate` packages: pip install 'mtp[gguf]'); the loaded model then goes through the same
weight mapping as `import_hf` (trunk = first L-1 layers, head 1 = the last, heads 2..n copies
of it or random). The tokenizer is transformers' fast tokenizer rebuilt from the GGUF metadata;
its `tokenizers` backend becomes an mtp.data.Tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..model import MTPModel
from ._common import InteropError
from .hf import DEFAULT_N_FUTURE, SUPPORTED, _dtype_kwarg, _first_line, convert_hf_model, quiet_transformers

# Document separator written by `mtp prepare`: SmolLM2-style models end documents with
# <|endoftext|> in pretraining (their chat eos <|im_end|> only closes chat turns), and a saved
# checkpoint's tokenizer.json reloads with <|endoftext|> first anyway (mtp.data.Tokenizer).
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


def is_gguf(path: str | Path) -> bool:
    """True for a file whose name ends in .gguf (what `mtp import` treats as GGUF)."""
    p = Path(path)
    return p.suffix.lower() == ".gguf" and p.is_file()


def load_gguf_hf(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(transformers causal LM in eval mode, its fast tokenizer) from a .gguf file, dequantised."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InteropError(f"{path} does not exist or is not a file")
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise InteropError("GGUF import needs transformers, gguf and accelerate: pip install 'mtp[gguf]'") from None
    with quiet_transformers():
        try:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True,
                                                         **{_dtype_kwarg(): dtype})
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        except Exception as e:  # unsupported architecture / quantisation, corrupt file
            raise InteropError(f"{path}: transformers cannot load this GGUF file ({_first_line(e)})") from None
    if model.config.model_type not in SUPPORTED:
        raise InteropError(f"{path}: architecture {model.config.model_type!r} is not supported "
                           f"(supported: {', '.join(SUPPORTED)})")
    return model.eval(), tokenizer


def to_mtp_tokenizer(hf_tokenizer: Any) -> Any:
    """mtp.data.Tokenizer over a transformers fast tokenizer's `tokenizers` backend."""
    from ..data import Tokenizer

    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InteropError("the GGUF tokenizer has no fast (tokenizers) backend")
    backend = type(backend).from_str(backend.to_str())  # own copy: padding/truncation off
    backend.no_padding()
    backend.no_truncation()
    eos = next((t for t in EOS_CANDIDATES if backend.token_to_id(t) is not None), None)
    if eos is None:
        eos = getattr(hf_tokenizer, "eos_token", None)
    if eos is None or backend.token_to_id(eos) is None:
        raise InteropError("the GGUF tokenizer has no end-of-text token")
    return Tokenizer(backend, eos_token=eos)


def import_gguf(path: str | Path, n_future: int | None = None, init: str = "copy",
                dtype: torch.dtype = torch.float32) -> tuple[MTPModel, Any]:
    """(MTPModel in eval mode, mtp.data.Tokenizer) from a Llama-family .gguf file; heads 2..n are
    copies of head 1 (init="copy") or random. Weights are dequantised to `dtype` (default fp32)."""
    hf_model, hf_tok = load_gguf_hf(path, dtype)
    tokenizer = to_mtp_tokenizer(hf_tok)
    n = DEFAULT_N_FUTURE if n_future is None else n_future
    model, tok = convert_hf_model(hf_model, tokenizer, n, init=init, source=Path(path))
    return model, tok
