"""Interop with Meta's multi-token prediction checkpoints and Hugging Face Llama-family models.

The Meta side is checked against an independent reference written here in Meta's own style
(interleaved complex RoPE via torch.polar / view_as_complex, `layers` + `extra_heads`); the
Hugging Face side against transformers itself, on tiny random models built offline.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtp.checkpoint import load_model
from mtp.cli import main
from mtp.data import Tokenizer, byte_tokenizer
from mtp.interop import InteropError, SentencePieceTokenizer, export_hf, import_hf, load_meta, save_meta
from mtp.interop.meta import half_to_interleaved, interleaved_to_half
from mtp.model import ModelConfig, MTPModel

ATOL = 1e-5


# ----- an independent Meta-style reference ---------------------------------------------------------

def meta_ffn_dim(dim: int, multiple_of: int, mult: float | None) -> int:
    hidden = int(2 * (4 * dim) / 3)
    if mult is not None:
        hidden = int(mult * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class RefRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def ref_freqs_cis(head_dim: int, end: int, theta: float) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def ref_rotary(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # pairs (2i, 2i+1)
    return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3).type_as(x)


class RefAttention(nn.Module):
    def __init__(self, p: dict) -> None:
        super().__init__()
        self.h, self.kv = p["n_heads"], p.get("n_kv_heads") or p["n_heads"]
        self.hd = p["dim"] // self.h
        self.wq = nn.Linear(p["dim"], self.h * self.hd, bias=False)
        self.wk = nn.Linear(p["dim"], self.kv * self.hd, bias=False)
        self.wv = nn.Linear(p["dim"], self.kv * self.hd, bias=False)
        self.wo = nn.Linear(self.h * self.hd, p["dim"], bias=False)

    def forward(self, x, freqs_cis, mask):
        B, T, _ = x.shape
        q = ref_rotary(self.wq(x).view(B, T, self.h, self.hd), freqs_cis)
        k = ref_rotary(self.wk(x).view(B, T, self.kv, self.hd), freqs_cis)
        v = self.wv(x).view(B, T, self.kv, self.hd)
        rep = self.h // self.kv
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(2, 3) / math.sqrt(self.hd) + mask
        out = F.softmax(scores.float(), dim=-1).type_as(q) @ v
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class RefFeedForward(nn.Module):
    def __init__(self, p: dict) -> None:
        super().__init__()
        hidden = meta_ffn_dim(p["dim"], p["multiple_of"], p.get("ffn_dim_multiplier"))
        self.w1 = nn.Linear(p["dim"], hidden, bias=False)
        self.w2 = nn.Linear(hidden, p["dim"], bias=False)
        self.w3 = nn.Linear(p["dim"], hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RefBlock(nn.Module):
    def __init__(self, p: dict) -> None:
        super().__init__()
        self.attention, self.feed_forward = RefAttention(p), RefFeedForward(p)
        self.attention_norm = RefRMSNorm(p["dim"], p["norm_eps"])
        self.ffn_norm = RefRMSNorm(p["dim"], p["norm_eps"])

    def forward(self, x, freqs_cis, mask):
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class RefMetaTransformer(nn.Module):
    """Meta's multi-token layout: layers[:-1] trunk, layers[-1] head 1, extra_heads[j] head j+2."""

    def __init__(self, p: dict) -> None:
        super().__init__()
        self.p, n = p, p["n_future_tokens"]
        self.tok_embeddings = nn.Embedding(p["vocab_size"], p["dim"])
        self.layers = nn.ModuleList(RefBlock(p) for _ in range(p["n_layers"] - n + 1))
        self.extra_heads = nn.ModuleList(RefBlock(p) for _ in range(n - 1))
        self.norm = RefRMSNorm(p["dim"], p["norm_eps"])
        self.output = nn.Linear(p["dim"], p["vocab_size"], bias=False)

    def forward(self, tokens):
        T = tokens.shape[1]
        freqs_cis = ref_freqs_cis(self.p["dim"] // self.p["n_heads"], T, self.p["rope_theta"])
        mask = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
        h = self.tok_embeddings(tokens)
        for layer in self.layers[:-1]:
            h = layer(h, freqs_cis, mask)
        outs = [layer(h, freqs_cis, mask) for layer in [self.layers[-1], *self.extra_heads]]
        return self.output(self.norm(torch.stack(outs, dim=-2)))


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Weights large enough that a wrong RoPE layout or norm would show in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return module


def meta_params(**kw) -> dict:
    return {"dim": 48, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 96, "multiple_of": 16,
            "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500.0, "n_future_tokens": 3, **kw}


def write_meta(directory: Path, ref: RefMetaTransformer, params: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(params))
    torch.save(ref.state_dict(), directory / "consolidated.pth")
    return directory


def tokens(vocab: int, T: int = 12, B: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    """A tiny Llama-like SentencePiece BPE model (byte fallback, identity normalisation)."""
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "def", "return", "import", "class", "self", "print", "\n    "]
    (d / "corpus.txt").write_text("".join(rng.choice(words) + " " for _ in range(2000)))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "sp"), vocab_size=300, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    return d / "sp.model"


# ----- Meta format ---------------------------------------------------------------------------------

def test_rope_permutations_are_inverse_and_match_complex_rotation():
    w = torch.randn(4 * 8, 5)
    assert torch.equal(half_to_interleaved(interleaved_to_half(w, 4), 4), w)
    # Rotating interleaved pairs of x equals rotating halves of the permuted x.
    from mtp.model import apply_rope, rope_tables

    x = torch.randn(1, 6, 4, 8)
    cos, sin = rope_tables(8, torch.arange(6)[None], 10000.0)
    ours = apply_rope(interleaved_to_half(x.reshape(6, 32).T, 4).T.reshape(1, 6, 4, 8), cos, sin)
    ref = ref_rotary(x, ref_freqs_cis(8, 6, 10000.0))
    assert torch.allclose(ours, interleaved_to_half(ref.reshape(6, 32).T, 4).T.reshape(1, 6, 4, 8), atol=1e-6)


@pytest.mark.parametrize("n_future", [1, 3])
def test_load_meta_matches_reference(tmp_path, n_future):
    params = meta_params(n_future_tokens=n_future)
    ref = randomize_(RefMetaTransformer(params), seed=n_future).eval()
    model, tok = load_meta(write_meta(tmp_path, ref, params))
    assert tok is None and model.cfg.n_future == n_future and model.cfg.n_trunk == 4 - n_future
    assert not any(p.is_meta for p in model.parameters())
    x = tokens(96)
    with torch.no_grad():
        ours, theirs = model(x), ref(x)
    assert ours.shape == theirs.shape == (2, 12, n_future, 96)
    assert torch.allclose(ours, theirs, atol=ATOL, rtol=0)
    # Without the row permutation the logits would differ: the test does see the RoPE layout.
    with torch.no_grad():
        wq = model.trunk_layers[0].attention.wq if model.trunk_layers else model.heads[0].attention.wq
        wq.weight.copy_(half_to_interleaved(wq.weight, 4))
        assert not torch.allclose(model(x), theirs, atol=1e-3)


def test_load_meta_vocab_from_tokenizer_and_sentencepiece(tmp_path, spm_model):
    import sentencepiece

    params = meta_params(vocab_size=300)
    ref = randomize_(RefMetaTransformer(params), seed=3).eval()
    write_meta(tmp_path, ref, {**params, "vocab_size": -1})
    (tmp_path / "tokenizer.model").write_bytes(spm_model.read_bytes())
    model, tok = load_meta(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer) and model.cfg.vocab_size == 300
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    text = "def cat(self):\n    return the mat é"
    assert tok.encode(text) == sp.encode(text) and tok.decode(tok.encode(text)) == text
    assert tok.eos_id == 2
    x = tokens(300)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=ATOL, rtol=0)


def test_save_meta_round_trip_through_reference(tmp_path):
    cfg = ModelConfig(dim=48, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=80, n_future=2, hidden_dim=72,
                      rope_theta=1000.0)
    model = randomize_(MTPModel(cfg), seed=5).eval()
    save_meta(model, tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    ref = RefMetaTransformer(params)
    ref.load_state_dict(torch.load(tmp_path / "consolidated.pth", weights_only=True), strict=True)
    x = tokens(80)
    with torch.no_grad():
        assert torch.allclose(model(x), ref.eval()(x), atol=ATOL, rtol=0)
    back, _ = load_meta(tmp_path)
    assert back.cfg.ffn_dim == 72 and back.cfg.n_future == 2
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_meta_errors_name_file_and_field(tmp_path, spm_model):
    with pytest.raises(InteropError, match="params.json is missing"):
        load_meta(tmp_path)
    params = meta_params()
    ref = randomize_(RefMetaTransformer(params), seed=1)
    d = write_meta(tmp_path / "ok", ref, params)
    (d / "consolidated.pth").rename(d / "moved.pth")
    with pytest.raises(InteropError, match="consolidated.pth is missing"):
        load_meta(d)
    (d / "moved.pth").rename(d / "consolidated.pth")
    (d / "params.json").write_text(json.dumps({k: v for k, v in params.items() if k != "dim"}))
    with pytest.raises(InteropError, match="params.json: missing field 'dim'"):
        load_meta(d)
    (d / "params.json").write_text(json.dumps({**params, "multiple_of": 64}))
    with pytest.raises(InteropError, match=r"consolidated.pth: layers.0.feed_forward.w1.weight has shape"):
        load_meta(d)
    (d / "params.json").write_text(json.dumps({**params, "n_future_tokens": 2}))
    with pytest.raises(InteropError, match="consolidated.pth: (missing|unexpected) tensor"):
        load_meta(d)
    (d / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))
    (d / "tokenizer.model").write_bytes(spm_model.read_bytes())  # 300 tokens, weights have 96 rows
    with pytest.raises(InteropError, match="vocab_size mismatch") as e:
        load_meta(d)
    assert "\n" not in str(e.value)


# ----- Hugging Face --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


HF_KW = dict(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)


def make_hf(transformers, directory: Path, kind: str, spm_model: Path | None = None, seed: int = 0, **kw):
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    config = cls[0](**{**HF_KW, "rope_theta": 2000.0, **kw})
    torch.manual_seed(seed)
    model = cls[1](config).eval()
    with torch.no_grad():
        for p in model.parameters():  # HF's init (std 0.02, unit norms) is too gentle to catch mistakes
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.dim() == 1 and p.shape[0] == 48 else torch.randn_like(p) * 0.15)
    model.save_pretrained(directory)
    if spm_model is not None:  # a Llama-style tokenizer converted from SentencePiece, eos </s>
        SentencePieceTokenizer.load(spm_model).to_tokenizer().save(directory)
        (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return model


@pytest.fixture(scope="module")
def llama_dir(transformers, tmp_path_factory, spm_model):
    d = tmp_path_factory.mktemp("llama")
    return d, make_hf(transformers, d, "llama", spm_model)


def hf_logits(hf_model, x):
    with torch.no_grad():
        return hf_model(x).logits


@pytest.mark.parametrize("n_future", [1, 3])
def test_import_llama_head1_matches_transformers(llama_dir, n_future):
    d, hf_model = llama_dir
    model, tok = import_hf(d, n_future=n_future)
    assert model.cfg.n_trunk == 3 and model.cfg.n_future == n_future and model.cfg.hidden_dim == 80
    assert tok is not None and tok.hf.id_to_token(tok.eos_id) == "</s>"
    x = tokens(300)
    with torch.no_grad():
        ours = model(x)
    assert torch.allclose(ours[:, :, 0], hf_logits(hf_model, x), atol=ATOL, rtol=0)
    for j in range(1, n_future):  # init="copy": every head starts as head 1
        assert torch.equal(ours[:, :, j], ours[:, :, 0])


def test_import_random_heads(llama_dir):
    d, hf_model = llama_dir
    model, _ = import_hf(d, n_future=2, init="random")
    x = tokens(300)
    with torch.no_grad():
        ours = model(x)
    assert torch.allclose(ours[:, :, 0], hf_logits(hf_model, x), atol=ATOL, rtol=0)
    assert not torch.allclose(ours[:, :, 1], ours[:, :, 0], atol=1e-2)
    assert model.heads[1].attention_norm.weight.eq(1).all()


@pytest.mark.parametrize("kind, kw", [("mistral", {"eos_token_id": 256}),  # eos from config.json
                                      ("qwen2", {"tie_word_embeddings": True})])  # eos: <|endoftext|>
def test_import_mistral_and_qwen2(transformers, tmp_path, kind, kw):
    hf_model = make_hf(transformers, tmp_path, kind, seed=1, **kw)
    byte_tokenizer().save(tmp_path)  # no tokenizer_config.json
    model, tok = import_hf(tmp_path, n_future=3)
    assert model.cfg.attn_bias == (kind == "qwen2") and tok.eos_id == byte_tokenizer().eos_id
    assert model.output.weight.data_ptr() != model.tok_embeddings.weight.data_ptr()
    x = tokens(300)
    with torch.no_grad():
        assert torch.allclose(model(x)[:, :, 0], hf_logits(hf_model, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn_bias", [False, True])
def test_export_loads_in_transformers_and_round_trips(transformers, tmp_path, attn_bias):
    cfg = ModelConfig(dim=48, n_layers=5, n_heads=4, n_kv_heads=2, vocab_size=300, n_future=3,
                      attn_bias=attn_bias, head_type="causal" if attn_bias else "parallel")
    model = randomize_(MTPModel(cfg), seed=7).eval()
    tok = byte_tokenizer()
    export_hf(model, tok, tmp_path / "base")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    assert type(hf_model).__name__ == ("Qwen2ForCausalLM" if attn_bias else "LlamaForCausalLM")
    x = tokens(300)
    with torch.no_grad():
        ours = model(x)
    assert torch.allclose(ours[:, :, 0], hf_logits(hf_model, x), atol=ATOL, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "base")
    text = "def f(x):\n    return x + 1"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf_tok.eos_token_id == tok.eos_id

    export_hf(model, tok, tmp_path / "all", all_heads=True)
    back, back_tok = import_hf(tmp_path / "all")
    assert back.cfg == cfg and back_tok.encode(text) == tok.encode(text)
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    with torch.no_grad():
        assert torch.equal(back(x), ours)


def test_shared_sequential_head_round_trips_through_hf_export(transformers, tmp_path):
    # The shared module is written once (heads.1) and comes back tied to every depth.
    cfg = ModelConfig(dim=48, n_layers=5, n_heads=4, n_kv_heads=2, vocab_size=300, n_future=4,
                      head_type="sequential", shared_head=True)
    model = randomize_(MTPModel(cfg), seed=7).eval()
    export_hf(model, byte_tokenizer(), tmp_path / "all", all_heads=True)
    back, _ = import_hf(tmp_path / "all")
    assert back.cfg == cfg and back.heads[3].eh_proj.weight is back.heads[1].eh_proj.weight
    x = tokens(300)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_hf_errors(transformers, tmp_path, llama_dir):
    with pytest.raises(InteropError, match="config.json is missing"):
        import_hf(tmp_path)
    transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(InteropError, match="no weights"):  # a GPT-2 config alone: supported, but weights missing
        import_hf(tmp_path / "gpt2")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(InteropError, match="model_type 'bert' is not supported"):
        import_hf(tmp_path / "bert")
    transformers.LlamaConfig(**HF_KW).save_pretrained(tmp_path / "noweights")
    with pytest.raises(InteropError, match="no weights"):
        import_hf(tmp_path / "noweights")
    wrong = Path(shutil.copytree(llama_dir[0], tmp_path / "wrong"))
    (wrong / "config.json").write_text(json.dumps({**json.loads((wrong / "config.json").read_text()),
                                                   "intermediate_size": 40}))
    with pytest.raises(InteropError, match=r"mlp\.\w+_proj\.weight has shape .*config.json implies"):
        import_hf(wrong)
    small = tmp_path / "small"
    make_hf(transformers, small, "llama", vocab_size=200)
    (small / "tokenizer.json").write_bytes((llama_dir[0] / "tokenizer.json").read_bytes())  # 300 tokens
    (small / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(InteropError, match="vocab_size mismatch"):
        import_hf(small)
    with pytest.raises(InteropError, match="head_type='linear'"):
        export_hf(MTPModel(ModelConfig(n_future=2, head_type="linear")), None, tmp_path / "x")


# ----- CLI -----------------------------------------------------------------------------------------

def test_cli_import_and_export(transformers, tmp_path, spm_model, capsys):
    params = meta_params(vocab_size=300)
    ref = randomize_(RefMetaTransformer(params), seed=9).eval()
    src = write_meta(tmp_path / "meta", ref, params)
    (src / "tokenizer.model").write_bytes(spm_model.read_bytes())
    assert main(["import", str(src), "--out", str(tmp_path / "run")]) == 0
    model, tok = load_model(tmp_path / "run")
    assert isinstance(tok, Tokenizer) and tok.eos_id == 2
    assert tok.decode(tok.encode("the cat sat")) == "the cat sat"
    x = tokens(300)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=ATOL, rtol=0)

    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--all-heads"]) == 0
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run2")]) == 0
    back, _ = load_model(tmp_path / "run2")
    with torch.no_grad():
        assert torch.allclose(back(x), ref(x), atol=ATOL, rtol=0)

    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run3"), "--format", "meta"]) == 2
    assert "params.json is missing" in capsys.readouterr().err
