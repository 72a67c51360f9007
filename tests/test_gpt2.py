"""GPT-2 import and the GPT-2-style model (LayerNorm, GELU MLP, learned positions, biases).

Checked against transformers' own GPT2LMHeadModel on tiny random models built offline: logits,
KV-cached decoding, greedy generation, and self-speculative decoding; the memory-efficient
training step against the reference loss.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mtp import ModelConfig, MTPModel, generate
from mtp.interop import InteropError, export_hf, import_hf, save_meta
from mtp.model import ConfigError
from mtp.speculative import speculative_generate, speculative_sample, tree_generate
from test_loss import check_backward_equals_reference

ATOL = 1e-5
VOCAB = 300
GPT2_STYLE = dict(norm="layer", mlp="gelu", pos_emb="learned", bias=True)


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def make_gpt2(transformers, directory: Path, seed: int = 0, **kw):
    """A tiny random GPT2LMHeadModel saved to `directory`, weights large enough that a wrong
    mapping (a missed transpose, a swapped bias) shows in the logits."""
    config = transformers.GPT2Config(**{"n_embd": 64, "n_layer": 3, "n_head": 4, "n_positions": 128,
                                        "vocab_size": VOCAB, "bos_token_id": None, "eos_token_id": None, **kw})
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = name.endswith("weight") and ".ln_" in name
            p.copy_((1.0 if gain else 0.0) + 0.15 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def gpt2_dir(transformers, tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    return d, make_gpt2(transformers, d)


def hf_logits(hf_model, x):
    with torch.no_grad():
        return hf_model(x).logits


def random_tokens(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randint(VOCAB, shape, generator=torch.Generator().manual_seed(seed))


# ----- import -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n_future", [1, 3])
def test_import_head1_matches_transformers(gpt2_dir, n_future):
    d, hf_model = gpt2_dir
    model, tok = import_hf(d, n_future=n_future)
    cfg = model.cfg
    assert tok is None
    assert (cfg.norm, cfg.mlp, cfg.pos_emb, cfg.bias) == ("layer", "gelu", "learned", True)
    assert (cfg.n_trunk, cfg.n_future, cfg.dim, cfg.ffn_dim, cfg.max_seq_len) == (2, n_future, 64, 256, 128)
    assert model.output.weight.data_ptr() != model.tok_embeddings.weight.data_ptr()  # tied: copied
    x = random_tokens((2, 50))
    with torch.no_grad():
        ours = model(x)
    assert torch.allclose(ours[:, :, 0], hf_logits(hf_model, x), atol=ATOL, rtol=0)
    for j in range(1, n_future):  # init="copy": every head starts as head 1
        assert torch.equal(ours[:, :, j], ours[:, :, 0])


def test_import_untied_custom_width_and_random_heads(transformers, tmp_path):
    hf_model = make_gpt2(transformers, tmp_path, seed=1, n_inner=96, tie_word_embeddings=False,
                         layer_norm_epsilon=1e-3, activation_function="gelu_pytorch_tanh")
    model, _ = import_hf(tmp_path, n_future=2, init="random")
    assert model.cfg.ffn_dim == 96 and model.cfg.norm_eps == 1e-3
    assert torch.equal(model.output.weight, hf_model.lm_head.weight)
    x = random_tokens((2, 30), seed=1)
    with torch.no_grad():
        ours = model(x)
    assert torch.allclose(ours[:, :, 0], hf_logits(hf_model, x), atol=ATOL, rtol=0)
    head = model.heads[1]
    assert head.attention_norm.weight.eq(1).all() and head.attention_norm.bias.eq(0).all()
    assert head.attention.wo.bias.eq(0).all() and not torch.allclose(ours[:, :, 1], ours[:, :, 0], atol=1e-2)


def test_kv_cache_matches_uncached_with_per_row_positions(gpt2_dir):
    model, _ = import_hf(gpt2_dir[0], n_future=3)
    x = random_tokens((2, 24), seed=2)
    with torch.no_grad():
        full = model(x)
        model.setup_cache(2, 24)
        pre = model(x[:, :12], torch.arange(12))
        assert torch.allclose(pre, full[:, :12], atol=ATOL, rtol=0)
        # Row 0 goes back to position 8 (its stale slots 9..11 are masked), row 1 carries on at 12:
        # one call, a different position per row.
        pos = torch.tensor([8, 12])
        for _ in range(10):
            step = model(x[torch.arange(2), pos][:, None], pos[:, None])
            for r in range(2):
                assert torch.allclose(step[r, 0], full[r, pos[r]], atol=ATOL, rtol=0)
            pos = pos + 1


def test_generate_matches_transformers_greedy(gpt2_dir):
    d, hf_model = gpt2_dir
    model, _ = import_hf(d, n_future=1)
    prompts = [random_tokens((1, n), seed=10 + n)[0].tolist() for n in (5, 1, 11)]
    ours = generate(model, prompts, 16).tokens
    for prompt, out in zip(prompts, ours):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0)
        assert out == ref[0, len(prompt):].tolist()


def test_self_speculative_equals_greedy(gpt2_dir):
    # float64 as in test_speculative: a verify pass and a one-token step then round alike.
    model, _ = import_hf(gpt2_dir[0], n_future=3, init="random")
    model = model.double()
    prompts = [random_tokens((1, n), seed=20 + n)[0].tolist() for n in (3, 9, 1)]
    greedy = generate(model, prompts, 14).tokens
    for k in (1, 2):
        assert speculative_generate(model, prompts, 14, k=k).tokens == greedy, f"k={k}"
    assert tree_generate(model, prompts, 14, tree=(3, 2)).tokens == greedy
    assert speculative_sample(model, prompts, 14, temperature=0.0).tokens == greedy


# ----- training -----------------------------------------------------------------------------------

@pytest.mark.parametrize("head_type, chunk", [("parallel", None), ("causal", 5)])
def test_memory_efficient_gradients_equal_reference(head_type, chunk):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=4, n_heads=4, vocab_size=37, n_future=3, max_seq_len=16,
                      head_type=head_type, **GPT2_STYLE)
    model = MTPModel(cfg).double()
    with torch.no_grad():  # non-zero biases and gains, so that their gradients are exercised
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    got = check_backward_equals_reference(model, chunk)
    assert {"tok_embeddings.pos_weight", "norm.bias", "heads.2.feed_forward.w2.bias"} <= set(got)
    assert got["tok_embeddings.pos_weight"][:11].abs().sum() > 0
    assert got["tok_embeddings.pos_weight"][11:].eq(0).all()  # positions never used


# ----- the config ---------------------------------------------------------------------------------

def test_config_defaults_validation_and_init():
    old = ModelConfig.from_dict({"dim": 64, "n_layers": 3, "n_heads": 4, "vocab_size": 50})  # older config.json
    assert (old.norm, old.mlp, old.pos_emb, old.bias, old.non_llama()) == ("rms", "swiglu", "rope", False, "")
    for field, bad in (("norm", "batch"), ("mlp", "relu"), ("pos_emb", "alibi"), ("bias", "yes")):
        with pytest.raises(ConfigError, match=f"^{field} must be"):
            ModelConfig(**{field: bad})
    with pytest.raises(ConfigError, match="even for RoPE"):
        ModelConfig(dim=36, n_heads=4)
    cfg = ModelConfig(dim=36, n_heads=4, n_layers=3, n_future=2, vocab_size=50, max_seq_len=20, **GPT2_STYLE)
    assert cfg.ffn_dim == 144 and cfg.non_llama() == "norm='layer', mlp='gelu', pos_emb='learned', bias=True"
    model = MTPModel(cfg)
    names = dict(model.named_parameters())
    assert names["tok_embeddings.pos_weight"].shape == (20, 36) and names["tok_embeddings.pos_weight"].std() > 0
    assert not any(".w3." in k for k in names)
    for k, p in names.items():
        if k.endswith(".bias"):
            assert p.eq(0).all(), k
        if k.endswith("norm.weight"):
            assert p.eq(1).all(), k
    assert {"heads.1.attention.wo.bias", "heads.1.feed_forward.w1.bias", "norm.bias"} <= names.keys()
    assert MTPModel(ModelConfig.from_dict(cfg.to_dict())).state_dict().keys() == model.state_dict().keys()
    with pytest.raises(ConfigError, match="exceeds max_seq_len"):
        model(torch.zeros(1, 21, dtype=torch.long))


# ----- errors -------------------------------------------------------------------------------------

def test_errors(gpt2_dir, tmp_path):
    bad = Path(shutil.copytree(gpt2_dir[0], tmp_path / "relu"))
    raw = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**raw, "activation_function": "relu"}))
    with pytest.raises(InteropError, match=r"config\.json: activation_function 'relu' is not supported"):
        import_hf(bad)
    model, _ = import_hf(gpt2_dir[0], n_future=2)
    with pytest.raises(InteropError, match="cannot represent this GPT-2-style model"):
        export_hf(model, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(InteropError, match="Meta format is Llama-style only"):
        save_meta(model, tmp_path / "meta")
