"""Sequential heads exported for serving engines (`mtp export --format hf-mtp | vllm-eagle`).

hf-mtp is checked against transformers itself: its `generate(use_mtp=True)` gives our greedy
output and its drafts are our head 2's logits. vllm-eagle is checked against a reference of
vLLM's EAGLE-1 draft forward written here from vLLM 0.32's formulas (llama_eagle.py, llama.py:
fused add + RMSNorm, no input norm in the first draft layer, no final norm, the target's hidden
state after its final norm), fed the exported files. Every norm weight of the test model is
randomised, so a norm applied in the wrong place, or to the wrong hidden state, shows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mtp import generate
from mtp.interop import InteropError, export_hf_mtp, export_vllm_eagle
from mtp.interop.serving import EAGLE_DRAFT

from conftest import tiny_model

transformers = pytest.importorskip("transformers")

ATOL = 1e-4  # fp32: our RoPE/norm arithmetic vs transformers' and the reference's


def serving_model(seed: int = 0, **overrides):
    """A sequential-head tiny model (3 trunk layers, head 1, heads 2 and 3), norms randomised."""
    model = tiny_model(seed, head_type="sequential", n_future=3, init_std=0.2, **overrides)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)  # in [0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, {format: directory}) with both formats written from one model."""
    root = tmp_path_factory.mktemp("serving")
    model = serving_model()
    dirs = {"hf-mtp": export_hf_mtp(model, None, root / "hf-mtp"),
            "vllm-eagle": export_vllm_eagle(model, None, root / "vllm-eagle")}
    return model, dirs


def prompts(count: int = 2, length: int = 11) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 512, (length + 3 * i,), generator=g).tolist() for i in range(count)]


def load_hf(directory: Path, **kw):
    from mtp.interop.hf import quiet_transformers

    with quiet_transformers():
        return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kw).eval()


# ----- transformers: GLM-4-MoE with head 2 as its MTP layer ----------------------------------------

def test_hf_mtp_files(exported):
    model, dirs = exported
    cfg = model.cfg
    hf_cfg = json.loads((dirs["hf-mtp"] / "config.json").read_text())
    assert hf_cfg["model_type"] == "glm4_moe" and hf_cfg["architectures"] == ["Glm4MoeForCausalLM"]
    assert hf_cfg["num_hidden_layers"] == 46 and hf_cfg["first_k_dense_replace"] == 46
    assert hf_cfg["num_nextn_predict_layers"] == 1 and hf_cfg["tie_last_hidden_states"] is False
    assert hf_cfg["rope_parameters"]["partial_rotary_factor"] == 1.0 and not hf_cfg["use_qk_norm"]
    assert hf_cfg["moe_intermediate_size"] * hf_cfg["n_shared_experts"] == cfg.ffn_dim
    w = load_file(str(dirs["hf-mtp"] / "model.safetensors"))
    mtp = {k[len("model.layers.46."):]: v for k, v in w.items() if k.startswith("model.layers.46.")}
    assert not any(k.startswith("model.layers.47.") for k in w)  # one MTP layer: head 3 is not written
    for name in ("enorm", "hnorm", "eh_proj"):
        assert torch.equal(mtp[f"{name}.weight"], model.heads[1].get_parameter(f"{name}.weight").detach())
    assert torch.equal(mtp["shared_head.norm.weight"], model.norm.weight.detach())
    assert torch.equal(mtp["mlp.shared_experts.down_proj.weight"],
                       model.heads[1].block.feed_forward.w2.weight.detach())
    assert all(not v.any() for k, v in mtp.items() if ".experts." in k)  # routed experts add exactly 0
    padding = [v for k, v in w.items() if k.startswith("model.layers.10.") and not k.endswith("layernorm.weight")]
    assert padding and all(not v.any() for v in padding)  # layers 4..45 return their input


def check_mtp_generate(model, directory: Path, monkeypatch, new_tokens: int = 20) -> int:
    """transformers' generate(use_mtp=True) on the export equals our greedy output, and each of
    its drafts is our head 2's logits; returns how many drafts it made."""
    from transformers.generation.candidate_generator import MTPCandidateGenerator

    hf = load_hf(directory)
    drafts = []
    original = MTPCandidateGenerator.get_candidates

    def recording(self, input_ids, *args, **kwargs):
        ids, logits = original(self, input_ids, *args, **kwargs)
        if logits is not None:
            drafts.append((input_ids.clone(), logits.clone()))
        return ids, logits

    monkeypatch.setattr(MTPCandidateGenerator, "get_candidates", recording)
    for prompt in prompts():
        x = torch.tensor([prompt])
        with torch.no_grad():
            torch.testing.assert_close(hf(x).logits[0], model(x)[0, :, 0], rtol=ATOL, atol=ATOL)
            out = hf.generate(x, max_new_tokens=new_tokens, do_sample=False, use_mtp=True, pad_token_id=0)
        assert out[0, len(prompt):].tolist() == generate(model, [prompt], new_tokens).tokens[0]
    for ids, logits in drafts:
        # ids ends with the token head 1 just committed; the draft is head 2 at the position before it.
        with torch.no_grad():
            ours = model(ids)[0, -2, 1]
        torch.testing.assert_close(logits[0, 0], ours, rtol=ATOL, atol=ATOL)
    return len(drafts)


def test_hf_mtp_generate_equals_greedy_and_drafts_equal_head_2(exported, monkeypatch):
    model, dirs = exported
    assert check_mtp_generate(model, dirs["hf-mtp"], monkeypatch) >= 30


def test_hf_mtp_with_qkv_biases(tmp_path, monkeypatch):
    # GLM-4-MoE's attention_bias is Qwen2's: biases on q, k and v only, as our attn_bias.
    model = serving_model(1, attn_bias=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.2)
    assert check_mtp_generate(model, export_hf_mtp(model, None, tmp_path / "hf-mtp"), monkeypatch, 8) >= 10


def test_serving_formats_refuse_what_they_cannot_write(tmp_path):
    cases = [
        (export_hf_mtp, tiny_model(0, n_future=2),
         "--format hf-mtp exports sequential heads (head_type=sequential, n_future >= 2); "
         "this model has head_type='parallel', n_future=2"),
        (export_vllm_eagle, tiny_model(0, head_type="sequential", n_future=1),
         "--format vllm-eagle exports sequential heads (head_type=sequential, n_future >= 2); "
         "this model has head_type='sequential', n_future=1"),
        (export_hf_mtp, tiny_model(0, head_type="sequential", n_future=2, n_layers=96),
         "--format hf-mtp: trunk + head 1 is 95 layers; transformers loads a GLM-4-MoE MTP layer only after "
         "46 or 92 layers"),
        (export_vllm_eagle, tiny_model(0, head_type="sequential", n_future=2, attn_bias=True),
         "--format vllm-eagle: q/k/v biases (attn_bias=True, Qwen2-style) are not supported"),
    ]
    for export, model, message in cases:
        with pytest.raises(InteropError) as e:
            export(model, None, tmp_path / "out")
        assert str(e.value) == message
        assert not (tmp_path / "out").exists()


# ----- vLLM: Llama target + EAGLE-1 draft -----------------------------------------------------------

DRAFT_LAYER = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
               "post_attention_layernorm.weight"]


def test_vllm_eagle_files(exported):
    model, dirs = exported
    cfg = model.cfg
    d, V, kv = cfg.dim, cfg.vocab_size, cfg.n_kv_heads * cfg.head_dim
    target = json.loads((dirs["vllm-eagle"] / "config.json").read_text())
    assert target["architectures"] == ["LlamaForCausalLM"] and target["num_hidden_layers"] == cfg.n_trunk + 1
    draft_dir = dirs["vllm-eagle"] / EAGLE_DRAFT
    draft = json.loads((draft_dir / "config.json").read_text())
    assert draft["architectures"] == ["LlamaForCausalLM"] and draft["model_type"] == "llama"
    assert (draft["num_hidden_layers"], draft["hidden_size"], draft["intermediate_size"]) == (2, d, cfg.ffn_dim)
    assert (draft["num_attention_heads"], draft["num_key_value_heads"]) == (cfg.n_heads, cfg.n_kv_heads)
    assert draft["vocab_size"] == V and draft["rms_norm_eps"] == cfg.norm_eps and not draft["tie_word_embeddings"]
    w = load_file(str(draft_dir / "model.safetensors"))
    expected = {"fc.weight", "embed_tokens.weight", *(f"layers.0.{n}" for n in DRAFT_LAYER),
                *(f"layers.1.{n}" for n in DRAFT_LAYER), "layers.1.input_layernorm.weight"}
    assert set(w) == expected  # no lm_head (shared with the target), no input norm in layer 0
    assert w["fc.weight"].shape == (d, 2 * d) and w["embed_tokens.weight"].shape == (V, d)
    assert w["layers.1.self_attn.k_proj.weight"].shape == (kv, d)
    assert all(not w[f"layers.0.{n}"].any() for n in DRAFT_LAYER[:-1])  # layer 0 returns its input
    t = load_file(str(dirs["vllm-eagle"] / "model.safetensors"))
    assert torch.equal(t["model.norm.weight"], torch.ones(d))  # the final norm's weight is in lm_head
    torch.testing.assert_close(t["lm_head.weight"], model.output.weight.detach() * model.norm.weight.detach())


def rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def neox_rope(x, positions, theta):
    # x (T, H, hd): vLLM's get_rope(is_neox_style=True) for Llama, halves rotated.
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = positions[:, None].float() * inv
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def vllm_llama_layer(w, prefix, hidden, residual, positions, c):
    """vllm LlamaDecoderLayer.forward (fused add + RMSNorm); EAGLE's first layer has no input norm."""
    eps, nh, nkv = c["rms_norm_eps"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = c["hidden_size"] // nh
    if residual is None:
        residual = hidden
        if prefix + "input_layernorm.weight" in w:
            hidden = rms_norm(hidden, w[prefix + "input_layernorm.weight"], eps)
    else:
        residual = hidden + residual
        hidden = rms_norm(residual, w[prefix + "input_layernorm.weight"], eps)
    T = hidden.shape[0]
    q = (hidden @ w[prefix + "self_attn.q_proj.weight"].T).view(T, nh, hd)
    k = (hidden @ w[prefix + "self_attn.k_proj.weight"].T).view(T, nkv, hd)
    v = (hidden @ w[prefix + "self_attn.v_proj.weight"].T).view(T, nkv, hd)
    theta = c["rope_parameters"]["rope_theta"]
    q, k = neox_rope(q, positions, theta), neox_rope(k, positions, theta)
    k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
    scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    attn = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, nh * hd)
    hidden = attn @ w[prefix + "self_attn.o_proj.weight"].T
    residual = hidden + residual
    hidden = rms_norm(residual, w[prefix + "post_attention_layernorm.weight"], eps)
    gate, up = hidden @ w[prefix + "mlp.gate_proj.weight"].T, hidden @ w[prefix + "mlp.up_proj.weight"].T
    return (F.silu(gate) * up) @ w[prefix + "mlp.down_proj.weight"].T, residual


def vllm_eagle_draft(draft_dir: Path, target_hidden, lm_head, next_tokens, positions):
    """vllm EagleLlamaForCausalLM: x = fc([embed(x_{t+1}); H_t]), the layers, hidden + residual,
    logits from the target's lm_head (no final norm). Returns (logits, final hidden)."""
    w = load_file(str(draft_dir / "model.safetensors"))
    c = json.loads((draft_dir / "config.json").read_text())
    hidden = torch.cat([F.embedding(next_tokens, w["embed_tokens.weight"]), target_hidden], -1) @ w["fc.weight"].T
    residual = None
    for i in range(c["num_hidden_layers"]):
        hidden, residual = vllm_llama_layer(w, f"layers.{i}.", hidden, residual, positions, c)
    hidden = hidden + residual
    return hidden @ lm_head.T, hidden


def test_vllm_eagle_draft_reproduces_head_2(exported):
    model, dirs = exported
    out = dirs["vllm-eagle"]
    hf = load_hf(out)
    lm_head = load_file(str(out / "model.safetensors"))["lm_head.weight"]
    for prompt in prompts(3):
        x = torch.tensor([prompt])
        with torch.no_grad():
            ours = model(x)[0]
            target = hf(x, output_hidden_states=True)
            torch.testing.assert_close(target.logits[0], ours[:, 0], rtol=ATOL, atol=ATOL)  # same target
            H = target.hidden_states[-1][0]  # after the final norm: what vLLM passes to an EAGLE-1 draft
            T = len(prompt)
            logits, h2 = vllm_eagle_draft(out / EAGLE_DRAFT, H[: T - 1], lm_head, x[0, 1:], torch.arange(T - 1))
        # The draft has no final norm: its logits are ours times rms(h2) per position, so the same argmax.
        scale = torch.rsqrt(h2.pow(2).mean(-1, keepdim=True) + model.cfg.norm_eps)
        torch.testing.assert_close(logits * scale, ours[: T - 1, 1], rtol=ATOL, atol=ATOL)
        assert torch.equal(logits.argmax(-1), ours[: T - 1, 1].argmax(-1))


def test_a_draft_vocabulary_is_not_written(tmp_path):
    # Neither engine restricts these drafts to a subset of the vocabulary: head 2 scores every token.
    model = serving_model()
    model.set_draft_vocab(range(0, 512, 2))
    for export in (export_hf_mtp, export_vllm_eagle):
        out = export(model, None, tmp_path / export.__name__)
        files = [out / "model.safetensors"] + ([out / EAGLE_DRAFT / "model.safetensors"]
                                              if export is export_vllm_eagle else [])
        assert all("draft_ids" not in load_file(str(f)) for f in files)
    load_hf(tmp_path / "export_vllm_eagle")  # the target loads without an unexpected tensor

