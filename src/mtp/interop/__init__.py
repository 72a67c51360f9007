"""Conversion between MTPModel and other checkpoint formats.

- `mtp.interop.meta`: Meta's multi-token prediction release (params.json + consolidated.pth).
- `mtp.interop.hf`: Hugging Face Llama / Mistral / Qwen2 / GPT-2 causal LMs (import; export as Llama).
- `mtp.interop.gguf`: Llama-family .gguf files (import, dequantised through transformers).
- `mtp.interop.serving`: sequential heads for serving engines (export): a GLM-4-MoE model with an
  MTP layer (transformers' generate(use_mtp=True)), a Llama target + EAGLE draft (vLLM).

Optional dependencies (transformers, sentencepiece) are imported only when a converter runs.
"""

from pathlib import Path

from ._common import InteropError
from .gguf import import_gguf, is_gguf
from .hf import export_hf, import_hf
from .meta import SentencePieceTokenizer, load_meta, save_meta
from .serving import export_hf_mtp, export_vllm_eagle

__all__ = ["InteropError", "SentencePieceTokenizer", "detect_format", "export_hf", "export_hf_mtp",
           "export_vllm_eagle", "import_gguf", "import_hf", "is_gguf", "load_meta", "save_meta"]


def detect_format(directory: str | Path) -> str:
    """Which format a checkpoint holds: "gguf" (a .gguf file), "meta" (params.json) or "hf" (config.json)."""
    path = Path(directory)
    if is_gguf(path):
        return "gguf"
    if not path.is_dir():
        raise InteropError(f"{path} is not a directory")
    if (path / "params.json").is_file():
        return "meta"
    if (path / "config.json").is_file():
        return "hf"
    raise InteropError(f"{path}: neither params.json (Meta) nor config.json (Hugging Face) found")
