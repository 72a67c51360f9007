"""Sequential (DeepSeek-V3-style) heads in the formats serving engines load.

`export_hf_mtp` writes a GLM-4-MoE directory whose MTP layer is head 2, for transformers'
`generate(use_mtp=True)`; `export_vllm_eagle` writes a Llama target plus an EAGLE-1 draft
directory for vLLM's `speculative_config={"method": "eagle", ...}`. Both carry head 2 only; what
each engine computes differently from our heads is spelled out in each function (and in the
README, "Serving the heads elsewhere").

Our head 2 at position t (h1: head 1's output before the shared norm, e: the input embedding of
x_{t+1}, both RMS-normed with their own weights; `norm`/`output`: the shared final norm and
unembedding):

    x  = eh_proj([enorm(e); hnorm(h1)])
    h2 = x + attn(attention_norm(x));  h2 = h2 + ffn(ffn_norm(h2))
    logits = output(norm(h2))

transformers is imported inside the functions only (optional dependency: `mtp[hf]`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..model import MTPModel
from ._common import InteropError
from .hf import _BLOCK_NAMES, _hf_name, _require_transformers, export_hf, quiet_transformers, save_hf_tokenizer

# transformers 5.24 finds the MTP weights of GLM-4-MoE by the layer numbers of the released
# checkpoints (Glm4MoePreTrainedModel._keys_to_ignore_on_load_unexpected: model.layers.46 / .92,
# GLM-4.5-Air and GLM-4.5), so the main model has one of these layer counts and one MTP layer.
GLM_LAYER_COUNTS = (46, 92)
# The MTP layer of GLM-4-MoE is always a mixture of experts (get_mtp_config sets
# first_k_dense_replace=0). Ours is dense: it becomes the shared expert, beside two routed experts
# of width 16 (the narrowest whose rows transformers' grouped matmul takes: 16-byte strides)
# whose weights are zero, so they add exactly 0 whichever the router picks.
GLM_ROUTED_EXPERTS = 2
GLM_EXPERT_WIDTH = 16
EAGLE_DRAFT = "eagle-draft"  # the draft's subdirectory of a vllm-eagle export
DRAFT_IDS = "draft_ids"  # MTPModel's draft-vocabulary buffer


def _check_sequential(model: MTPModel, fmt: str) -> None:
    cfg = model.cfg
    if cfg.head_type != "sequential" or cfg.n_future < 2:
        raise InteropError(f"--format {fmt} exports sequential heads (head_type=sequential, n_future >= 2); "
                           f"this model has head_type={cfg.head_type!r}, n_future={cfg.n_future}")
    if cfg.non_llama():
        raise InteropError(f"--format {fmt} writes Llama-style blocks, which cannot represent this "
                           f"GPT-2-style model ({cfg.non_llama()})")


def _state(model: MTPModel) -> dict[str, Tensor]:
    # A draft vocabulary (draft_ids) is not carried: neither engine restricts an EAGLE-1 / MTP
    # draft to a subset of the vocabulary, so the exported head 2 scores every token.
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != DRAFT_IDS}


def _block(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Our block parameters under `prefix` (e.g. "heads.1.block.") in Hugging Face Llama names."""
    return {hf: state[prefix + ours] for ours, hf in _BLOCK_NAMES.items() if prefix + ours in state}


def _identity_block(like: dict[str, Tensor]) -> dict[str, Tensor]:
    """A decoder layer that returns its input exactly: every projection zero (attention and MLP
    add exactly 0 to the residual stream), norms one."""
    return {k: torch.ones_like(v) if k.endswith("layernorm.weight") else torch.zeros_like(v) for k, v in like.items()}


# ----- transformers: GLM-4-MoE with one MTP layer --------------------------------------------------

def export_hf_mtp(model: MTPModel, tokenizer: Any | None, directory: str | Path) -> Path:
    """Trunk + head 1 as the main model and head 2 as its MTP layer, in transformers'
    GLM-4-MoE format (`Glm4MoeForCausalLM`; `generate(use_mtp=True)` drafts with head 2).

    No dense Llama-like family of transformers 5.24 registers MTP weights; GLM-4-MoE is the
    closest: Llama attention (no q/k norm, q/k/v biases optional), half-rotation RoPE (partial
    rotary factor 1 here), RMSNorm, SwiGLU, and DeepSeek-V3's MTP module (enorm, hnorm, eh_proj
    on [e; h], one decoder layer, post_norm, the shared head). What it takes to be exact:

    - The main model has 46 layers (92 above that): our trunk + head 1, then layers that return
      their input exactly (all projections zero). They cost compute (46 - n_trunk - 1 layers).
    - transformers passes the main model's last hidden state after the final norm unless the
      config says `tie_last_hidden_states: false`, which it does here: hnorm then reads head 1's
      output before the shared norm, as ours does.
    - post_norm (the checkpoints' shared_head.norm) is our shared final norm's copy, so the MTP
      logits are lm_head(norm(h2)) as ours.
    - The MTP layer's MLP is a mixture of experts: ours is its shared expert (as ffn_dim / 16
      shared experts of width 16) and two zero routed experts of width 16 add exactly 0.
    - RoPE: the MTP layer sees positions t+1 (of the token it reads) where ours uses t: the same
      attention (RoPE depends on differences only), rounded differently.
    - A draft vocabulary (cfg.draft_vocab) is not carried: the MTP layer scores every token.
    - One MTP layer: heads 3..n are not written. transformers' MTP chain would also differ from
      ours there: it feeds the next MTP layer the post_norm output (the normed hidden state it
      unembeds), ours feeds head i the output of head i-1 before the norm.
    """
    _check_sequential(model, "hf-mtp")
    _require_transformers()
    from transformers import Glm4MoeConfig

    cfg = model.cfg
    n_main = cfg.n_trunk + 1
    layers = next((n for n in GLM_LAYER_COUNTS if n >= n_main), None)
    if layers is None:
        raise InteropError(f"--format hf-mtp: trunk + head 1 is {n_main} layers; transformers loads a GLM-4-MoE "
                           f"MTP layer only after {' or '.join(map(str, GLM_LAYER_COUNTS))} layers")
    width = GLM_EXPERT_WIDTH if cfg.ffn_dim % GLM_EXPERT_WIDTH == 0 else cfg.ffn_dim
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = _state(model)
    dtype = state["norm.weight"].dtype
    eos_id = tokenizer.eos_id if tokenizer is not None else None
    with quiet_transformers():
        hf_cfg = Glm4MoeConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
            num_hidden_layers=layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
            rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False, attention_bias=cfg.attn_bias, use_qk_norm=False,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 1.0},
            partial_rotary_factor=1.0, first_k_dense_replace=layers,  # every main layer dense
            n_routed_experts=GLM_ROUTED_EXPERTS, num_experts_per_tok=1, n_group=1, topk_group=1,
            moe_intermediate_size=width, n_shared_experts=cfg.ffn_dim // width,  # shared expert = our FFN
            norm_topk_prob=True, routed_scaling_factor=1.0, num_nextn_predict_layers=1,
            tie_last_hidden_states=False,  # hidden_states[-1] before the final norm (what hnorm reads)
            bos_token_id=None, eos_token_id=eos_id, pad_token_id=getattr(tokenizer, "pad_id", None),
        )
        hf_cfg.architectures = ["Glm4MoeForCausalLM"]
        hf_cfg.dtype = str(dtype).removeprefix("torch.")
        hf_cfg.save_pretrained(directory)

    out = {_hf_name(k, cfg.n_trunk): v for k, v in state.items()
           if not (k.startswith("heads.") and not k.startswith("heads.0."))}
    head1 = _block(state, "heads.0.")
    for i in range(n_main, layers):  # a copy each: safetensors refuses shared tensors
        out.update({f"model.layers.{i}.{k}": v for k, v in _identity_block(head1).items()})
    mtp = f"model.layers.{layers}."
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):
        out[mtp + name] = state[f"heads.1.{name}"]
    out[mtp + "shared_head.norm.weight"] = state["norm.weight"].clone()
    for k, v in _block(state, "heads.1.block.").items():
        out[mtp + k.replace("mlp.", "mlp.shared_experts.")] = v
    d = cfg.dim
    out[mtp + "mlp.gate.weight"] = torch.zeros(GLM_ROUTED_EXPERTS, d)  # the router stays fp32 in transformers
    out[mtp + "mlp.gate.e_score_correction_bias"] = torch.zeros(GLM_ROUTED_EXPERTS)
    for e in range(GLM_ROUTED_EXPERTS):
        out[mtp + f"mlp.experts.{e}.gate_proj.weight"] = torch.zeros(width, d, dtype=dtype)
        out[mtp + f"mlp.experts.{e}.up_proj.weight"] = torch.zeros(width, d, dtype=dtype)
        out[mtp + f"mlp.experts.{e}.down_proj.weight"] = torch.zeros(d, width, dtype=dtype)
    save_file(out, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, directory, cfg.max_seq_len)
    return directory


# ----- vLLM: Llama target + EAGLE-1 draft -----------------------------------------------------------

def export_vllm_eagle(model: MTPModel, tokenizer: Any | None, directory: str | Path) -> Path:
    """The target (trunk + head 1) as a Hugging Face Llama directory and head 2 as a vLLM EAGLE-1
    draft in `directory/eagle-draft` (`EagleLlamaForCausalLM`):

        LLM(model=DIR, speculative_config={"method": "eagle", "model": DIR + "/eagle-draft",
                                           "num_speculative_tokens": k})

    vLLM's EAGLE-1 draft computes, at target position t (vllm/model_executor/models/llama_eagle.py,
    llama.py, v1/spec_decode/llm_base_proposer.py):

        x = fc([E_draft[x_{t+1}]; H_t])    H_t: the target's last hidden state AFTER its final norm
        layers: Llama decoder layers, the first without its input norm (identity)
        logits = lm_head_target(hidden + residual)       no final norm

    How ours maps onto it, exactly up to a per-token positive factor of the logits:

    - enorm(e) depends on the token only: the draft carries its own embedding table, enorm
      applied to each row (vLLM keeps a draft embedding that differs from the target's).
    - hnorm: H_t = n ⊙ h1/rms(h1) with n the target's final-norm weight. The target is written
      with n folded into lm_head (norm weight 1, lm_head = output · diag(n): the same function),
      so H_t = h1/rms(h1) and hnorm's weight goes into fc's second half: fc = [W_e, W_h diag(w_h)].
    - Our block needs its attention norm, which vLLM removes from the first draft layer: the
      draft has two layers, layer 0 returning its input exactly (all projections zero) and layer 1
      our block. The zero layer costs as much compute as the block.
    - No final norm in the draft: its logits are lm_head_target(h2) = output(n ⊙ h2), ours are
      output(n ⊙ h2 / rms(h2)): the same up to the factor rms(h2) > 0 per token, so the same
      argmax, i.e. the same greedy drafts (vLLM drafts greedily unless draft_sample_method is
      probabilistic); sampled drafts would see a different temperature.
    - Depth >= 2: EAGLE runs the same module again on its own output h2 (not normed) and the
      token it drafted; ours runs head 3 on hnorm_3(h2). Heads 3..n are not written.
    - RoPE, attention and the MLP are Llama's; q/k/v biases (attn_bias) are refused.
    - A draft vocabulary (cfg.draft_vocab) is not carried: the draft scores every token (EAGLE-1
      has no draft vocabulary; EAGLE-3's d2t would need its other layout).

    EAGLE-3 (`Eagle3LlamaForCausalLM`, `norm_before_fc`) has the norms (input_layernorm on e,
    input_norm / hidden_norm on the hidden state) and a final norm, but its first layer feeds
    [norm(e); norm(fc(h))] (2 dim) straight into q/k/v with fc(h) alone as the residual, where
    ours feeds attention_norm(eh_proj([e; h])) with eh_proj([e; h]) as the residual; no choice of
    its weights computes ours, so EAGLE-1 is the closer mapping.
    """
    _check_sequential(model, "vllm-eagle")
    cfg = model.cfg
    if cfg.attn_bias:
        raise InteropError("--format vllm-eagle: q/k/v biases (attn_bias=True, Qwen2-style) are not supported")
    _require_transformers()
    from transformers import LlamaConfig

    directory = Path(directory)
    export_hf(model, tokenizer, directory)
    state = _state(model)
    dtype = state["norm.weight"].dtype
    n = state["norm.weight"].float()

    # Target: the final norm's weight folded into lm_head (the same logits, rounded differently).
    target_path = directory / "model.safetensors"
    target = {k: v for k, v in load_file(str(target_path)).items() if k != DRAFT_IDS}
    target["model.norm.weight"] = torch.ones_like(target["model.norm.weight"])
    target["lm_head.weight"] = (state["output.weight"].float() * n).to(dtype)
    save_file(target, str(target_path), metadata={"format": "pt"})

    # Draft: fc, its own (enorm-ed) embedding, a zero layer 0 and head 2's block as layer 1.
    head = model.heads[1]
    with torch.no_grad():
        emb = head.enorm(state["tok_embeddings.weight"].float().to(head.enorm.weight.device)).cpu()
    w_e, w_h = state["heads.1.eh_proj.weight"].float().split(cfg.dim, dim=1)
    fc = torch.cat([w_e, w_h * state["heads.1.hnorm.weight"].float()], dim=1)
    block = _block(state, "heads.1.block.")
    layer0 = {k: v for k, v in _identity_block(block).items() if k != "input_layernorm.weight"}
    draft = {"fc.weight": fc.to(dtype), "embed_tokens.weight": emb.to(dtype)}
    draft.update({f"layers.0.{k}": v for k, v in layer0.items()})
    draft.update({f"layers.1.{k}": v for k, v in block.items()})
    draft_dir = directory / EAGLE_DRAFT
    draft_dir.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        draft_cfg = LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim, num_hidden_layers=2,
            num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, hidden_act="silu",
            max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
            tie_word_embeddings=False, attention_bias=False, mlp_bias=False, bos_token_id=None,
            eos_token_id=tokenizer.eos_id if tokenizer is not None else None,
        )
        draft_cfg.architectures = ["LlamaForCausalLM"]  # vLLM's EAGLEConfig makes it EagleLlamaForCausalLM
        draft_cfg.dtype = str(dtype).removeprefix("torch.")
        draft_cfg.torch_dtype = draft_cfg.dtype
        draft_cfg.save_pretrained(draft_dir)
    save_file(draft, str(draft_dir / "model.safetensors"), metadata={"format": "pt"})
    return directory
