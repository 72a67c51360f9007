"""Hugging Face Llama-family models and GPT-2 <-> MTPModel.

Import: the first L-1 decoder layers become the trunk, the last one head 1, and heads 2..n are
copies of it (init="copy") or freshly initialised (init="random"), unless the directory carries
heads saved by `export_hf(all_heads=True)`. Hugging Face Llama already uses the half-rotation
RoPE convention, so no permutation is needed. GPT-2 becomes a GPT-2-style MTPModel (LayerNorm,
GELU MLP, learned positions, biases; see mtp.model): its Conv1D weights are stored [in, out], so
they are transposed, and the fused c_attn is split into q, k, v. Export writes trunk + head 1 as
a plain LlamaForCausalLM (Qwen2ForCausalLM when the model has q/k/v biases) that transformers
loads; with all_heads=True the other heads go to mtp_heads.safetensors + mtp_config.json beside
it. GPT-2-style models are not exported.

transformers is imported inside the functions only (optional dependency: `mtp[hf]`).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..model import ConfigError, ModelConfig, MTPModel, head_blocks
from ._common import InteropError, assign_state, check_vocab, make_config, random_block, read_json, require_dir

SUPPORTED = ("llama", "mistral", "qwen2")  # the Llama family (also what GGUF import accepts)
GPT2 = "gpt2"
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both the tanh-approximate GELU
CONFIG = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
MTP_CONFIG = "mtp_config.json"
MTP_HEADS = "mtp_heads.safetensors"
MTP_FORMAT = "mtp-heads"
DEFAULT_N_FUTURE = 4

# Our block parameter names -> Hugging Face decoder layer names.
_BLOCK_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_HF_BLOCK_NAMES = {v: k for k, v in _BLOCK_NAMES.items()}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_HF_TOP_NAMES = {v: k for k, v in _TOP_NAMES.items()}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# GPT-2: our block names -> GPT-2 block names (q, k and v all come from the fused c_attn).
_GPT2_BLOCK_NAMES = {
    "attention_norm.weight": "ln_1.weight", "attention_norm.bias": "ln_1.bias",
    "attention.wq.weight": "attn.c_attn.weight", "attention.wk.weight": "attn.c_attn.weight",
    "attention.wv.weight": "attn.c_attn.weight", "attention.wq.bias": "attn.c_attn.bias",
    "attention.wk.bias": "attn.c_attn.bias", "attention.wv.bias": "attn.c_attn.bias",
    "attention.wo.weight": "attn.c_proj.weight", "attention.wo.bias": "attn.c_proj.bias",
    "ffn_norm.weight": "ln_2.weight", "ffn_norm.bias": "ln_2.bias",
    "feed_forward.w1.weight": "mlp.c_fc.weight", "feed_forward.w1.bias": "mlp.c_fc.bias",
    "feed_forward.w2.weight": "mlp.c_proj.weight", "feed_forward.w2.bias": "mlp.c_proj.bias",
}
_GPT2_TOP_NAMES = {"tok_embeddings.weight": "transformer.wte.weight",
                   "tok_embeddings.pos_weight": "transformer.wpe.weight",
                   "norm.weight": "transformer.ln_f.weight", "norm.bias": "transformer.ln_f.bias",
                   "output.weight": "lm_head.weight"}
_GPT2_OURS = {v: k for k, v in _GPT2_BLOCK_NAMES.items() if "c_attn" not in v}
_GPT2_LAYER = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
_GPT2_BUFFERS = re.compile(r"(^|\.)attn\.(masked_)?bias$")  # causal-mask buffers of older checkpoints
_OURS_BLOCK = re.compile(r"^(trunk_layers|heads)\.(\d+)\.(.+)$")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings and progress bars for the duration (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise InteropError("Hugging Face interop needs transformers: pip install 'mtp[hf]'") from None


def _dtype_kwarg() -> str:
    """from_pretrained's dtype argument: `dtype` since transformers 4.56, `torch_dtype` before."""
    import transformers

    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ----- names ---------------------------------------------------------------------------------------

def _source_name(ours: str, n_trunk: int, top: dict[str, str], block: dict[str, str], layers: str) -> str:
    """The source model's name of one of our trunk / head-1 parameters (heads >= 2 keep our names):
    `top` maps top-level names, `block` names inside a block, and block i is `{layers}.{i}`."""
    if ours in top:
        return top[ours]
    m = _OURS_BLOCK.match(ours)
    if m and not (m[1] == "heads" and int(m[2]) > 0):
        layer = int(m[2]) if m[1] == "trunk_layers" else n_trunk + int(m[2])
        return f"{layers}.{layer}.{block.get(m[3], m[3])}"
    return ours


def _hf_name(ours: str, n_trunk: int) -> str:
    return _source_name(ours, n_trunk, _TOP_NAMES, _BLOCK_NAMES, "model.layers")


def _gpt2_name(ours: str, n_trunk: int) -> str:
    return _source_name(ours, n_trunk, _GPT2_TOP_NAMES, _GPT2_BLOCK_NAMES, "transformer.h")


# ----- import --------------------------------------------------------------------------------------

def _check_architecture(directory: Path) -> dict[str, Any]:
    """Refuse what MTPModel cannot represent before transformers loads anything."""
    path = directory / CONFIG
    if not path.is_file():
        raise InteropError(f"{path} is missing: not a Hugging Face model directory")
    raw = read_json(path)
    model_type = raw.get("model_type")
    if model_type not in (*SUPPORTED, GPT2):
        raise InteropError(f"{path}: model_type {model_type!r} is not supported "
                           f"(supported: {', '.join((*SUPPORTED, GPT2))})")
    if not any((directory / f).is_file() for f in WEIGHT_FILES):
        raise InteropError(f"{directory}: no weights ({' or '.join(WEIGHT_FILES[::2])}) next to {CONFIG}")
    return raw


def _rope_theta(config: Any, path: Path) -> float:
    rope = dict(getattr(config, "rope_parameters", None) or {})  # transformers >= 5
    scaling = getattr(config, "rope_scaling", None) or {}  # transformers 4
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise InteropError(f"{path}: RoPE scaling {rope_type!r} (field rope_scaling) is not supported")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def _hf_fields(config: Any, model_type: str, path: Path) -> dict[str, Any]:
    """ModelConfig fields (except the layer/head counts) from a transformers config."""
    if model_type == GPT2:
        return _gpt2_fields(config, path)
    dim, n_heads = config.hidden_size, config.num_attention_heads
    if getattr(config, "hidden_act", "silu") != "silu":
        raise InteropError(f"{path}: hidden_act {config.hidden_act!r} is not supported (only silu)")
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None and head_dim * n_heads != dim:
        raise InteropError(f"{path}: head_dim={head_dim} differs from hidden_size / num_attention_heads "
                           f"= {dim // n_heads}, which MTPModel assumes")
    if model_type != "qwen2" and getattr(config, "attention_bias", False):
        raise InteropError(f"{path}: attention_bias=true (bias on every projection) is not supported")
    if getattr(config, "mlp_bias", False):
        raise InteropError(f"{path}: mlp_bias=true is not supported")
    max_len = int(getattr(config, "max_position_embeddings", 2048))
    window = getattr(config, "sliding_window", None)
    uses_window = model_type == "mistral" or getattr(config, "use_sliding_window", False)
    if uses_window and window:
        # MTPModel attends to the whole prefix, which equals sliding-window attention up to the window.
        max_len = min(max_len, int(window))
    return dict(
        dim=dim, n_heads=n_heads, n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        vocab_size=config.vocab_size, hidden_dim=config.intermediate_size, norm_eps=float(config.rms_norm_eps),
        rope_theta=_rope_theta(config, path), max_seq_len=max_len, attn_bias=model_type == "qwen2",
    )


def _gpt2_fields(config: Any, path: Path) -> dict[str, Any]:
    """ModelConfig fields (except the layer/head counts) from a transformers GPT2Config."""
    act = config.activation_function
    if act not in GPT2_ACTIVATIONS:
        raise InteropError(f"{path}: activation_function {act!r} is not supported (only gelu_new, the tanh GELU)")
    if not getattr(config, "scale_attn_weights", True):
        raise InteropError(f"{path}: scale_attn_weights=false (unscaled attention) is not supported")
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise InteropError(f"{path}: scale_attn_by_inverse_layer_idx=true is not supported")
    if getattr(config, "add_cross_attention", False):
        raise InteropError(f"{path}: add_cross_attention=true is not supported (decoder-only models only)")
    dim, n_heads = int(config.n_embd), int(config.n_head)
    if dim % n_heads:
        raise InteropError(f"{path}: n_embd={dim} is not divisible by n_head={n_heads}")
    return dict(
        dim=dim, n_heads=n_heads, n_kv_heads=n_heads, vocab_size=int(config.vocab_size),
        hidden_dim=int(config.n_inner) if config.n_inner is not None else 4 * dim,
        norm_eps=float(config.layer_norm_epsilon), max_seq_len=int(config.n_positions),
        norm="layer", mlp="gelu", pos_emb="learned", bias=True,
        rope_theta=10000.0, attn_bias=False,  # unused / covered by bias; compared with saved heads
    )


def _llama_state(hf_state: dict[str, Tensor], n_trunk: int) -> dict[str, Tensor]:
    """Our state dict (trunk, head 1 and the top-level tensors) from a Llama-family model's."""
    state: dict[str, Tensor] = {}
    for name, t in hf_state.items():
        m = _HF_LAYER.match(name)
        if m:
            i, rest = int(m[1]), m[2]
            ours = _HF_BLOCK_NAMES.get(rest, rest)
            state[f"trunk_layers.{i}.{ours}" if i < n_trunk else f"heads.{i - n_trunk}.{ours}"] = t
        elif name in _HF_TOP_NAMES:
            state[_HF_TOP_NAMES[name]] = t
        elif not name.endswith("rotary_emb.inv_freq"):
            state[name] = t  # unexpected: reported by assign_state
    return state


def _gpt2_state(hf_state: dict[str, Tensor], n_trunk: int) -> dict[str, Tensor]:
    """Our state dict (trunk, head 1 and the top-level tensors) from a GPT2LMHeadModel's."""
    ours_of = {v: k for k, v in _GPT2_TOP_NAMES.items()}
    state: dict[str, Tensor] = {}
    for name, t in hf_state.items():
        m = _GPT2_LAYER.match(name)
        if m is None:
            state[ours_of.get(name, name)] = t  # unknown names: reported by assign_state
            continue
        i, rest = int(m[1]), m[2]
        if _GPT2_BUFFERS.search(rest):
            continue
        prefix = f"trunk_layers.{i}." if i < n_trunk else f"heads.{i - n_trunk}."
        if rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
            # Conv1D stores [in, out]: transpose, then split the fused output rows into q, k, v.
            fused = t.t() if t.dim() == 2 else t
            kind = rest.rsplit(".", 1)[1]
            for part, chunk in zip(("wq", "wk", "wv"), fused.chunk(3, dim=0)):
                state[f"{prefix}attention.{part}.{kind}"] = chunk.contiguous()
            continue
        ours = _GPT2_OURS.get(rest, rest)
        # The other Conv1D weights ([in, out]) become nn.Linear weights ([out, in]).
        is_conv = rest in ("attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        state[prefix + ours] = t.t().contiguous() if is_conv else t
    return state


def _saved_heads(directory: Path) -> tuple[ModelConfig, dict[str, Tensor]] | None:
    """(config, heads 2..n in our names) written by export_hf(all_heads=True), if present."""
    path = directory / MTP_CONFIG
    if not path.is_file():
        return None
    meta = read_json(path)
    if meta.get("format") != MTP_FORMAT or not isinstance(meta.get("model"), dict):
        raise InteropError(f"{path}: field format must be {MTP_FORMAT!r} with a 'model' config")
    try:
        cfg = ModelConfig.from_dict(meta["model"])
    except (ConfigError, TypeError) as e:
        raise InteropError(f"{path}: field model: {_first_line(e)}") from None
    heads_path = directory / MTP_HEADS
    if not heads_path.is_file():
        raise InteropError(f"{heads_path} is missing ({MTP_CONFIG} says the extra heads are saved)")
    try:
        heads = load_file(str(heads_path))
    except Exception as e:
        raise InteropError(f"{heads_path} is corrupt or truncated ({_first_line(e)})") from None
    return cfg, heads


def _hf_eos_token(directory: Path, hf_tok: Any, config: Any) -> str | None:
    tok_cfg = directory / "tokenizer_config.json"
    if tok_cfg.is_file():
        eos = read_json(tok_cfg).get("eos_token")
        if isinstance(eos, dict):  # serialised AddedToken
            eos = eos.get("content")
        if isinstance(eos, str) and hf_tok.token_to_id(eos) is not None:
            return eos
    eos_id = getattr(config, "eos_token_id", None)
    if isinstance(eos_id, (list, tuple)):
        eos_id = eos_id[0] if eos_id else None
    return hf_tok.id_to_token(eos_id) if isinstance(eos_id, int) else None


def load_hf_tokenizer(directory: str | Path, config: Any | None = None) -> Any | None:
    """tokenizer.json (or a SentencePiece tokenizer.model) as an mtp.data.Tokenizer; None if absent."""
    from tokenizers import Tokenizer as HFTokenizer

    from ..data import DataError, Tokenizer
    from .meta import SentencePieceTokenizer

    directory = Path(directory)
    file = directory / "tokenizer.json"
    if not file.is_file():
        if (directory / "tokenizer.model").is_file():
            return SentencePieceTokenizer.load(directory / "tokenizer.model").to_tokenizer()
        return None
    try:
        hf_tok = HFTokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises plain Exception on bad JSON
        raise InteropError(f"{file} is not a valid tokenizer.json ({_first_line(e)})") from None
    hf_tok.no_padding()
    hf_tok.no_truncation()
    eos = _hf_eos_token(directory, hf_tok, config)  # None: Tokenizer tries the usual names
    try:
        return Tokenizer(hf_tok, eos_token=eos)
    except DataError:
        raise InteropError(f"{directory}: no end-of-text token (field eos_token in tokenizer_config.json "
                           f"or eos_token_id in {CONFIG})") from None


def import_hf(directory: str | Path, n_future: int | None = None, init: str = "copy",
              dtype: torch.dtype | None = None) -> tuple[MTPModel, Any | None]:
    """(MTPModel in eval mode, mtp.data.Tokenizer or None) from a local Hugging Face model directory.

    n_future: number of heads; None means the heads saved by export_hf(all_heads=True) if any,
    else 4. Heads beyond those saved are copies of head 1 (init="copy") or random (init="random").
    dtype: None keeps the stored dtype. Nothing is downloaded: `directory` must be local.
    """
    if init not in ("copy", "random"):
        raise InteropError(f"init must be 'copy' or 'random', got {init!r}")
    directory = require_dir(directory, "Hugging Face")
    raw = _check_architecture(directory)
    model_type = raw["model_type"]
    config_path = directory / CONFIG
    _require_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM

    with quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(directory, local_files_only=True)
        except Exception as e:
            raise InteropError(f"{config_path}: {_first_line(e)}") from None
        fields = _hf_fields(config, model_type, config_path)
        saved = _saved_heads(directory)
        n_layers = int(config.num_hidden_layers)
        n_trunk = n_layers - 1
        if saved is not None:
            _check_saved_matches(saved[0], fields, n_trunk, directory / MTP_CONFIG)
        n = n_future if n_future is not None else (saved[0].n_future if saved else DEFAULT_N_FUTURE)
        if n < 1:
            raise InteropError(f"n_future must be >= 1, got {n}")
        try:
            # ignore_mismatched_sizes: let us report the offending tensor instead of a generic error.
            hf_model, info = AutoModelForCausalLM.from_pretrained(
                directory, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True,
                **{_dtype_kwarg(): dtype or "auto"})
        except Exception as e:
            raise InteropError(f"{directory}: transformers cannot load the weights ({_first_line(e)})") from None
    tied = bool(getattr(config, "tie_word_embeddings", False))
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key, ckpt_shape, model_shape = mismatched[0]
        raise InteropError(f"{directory}: weight {key} has shape {tuple(ckpt_shape)}, "
                           f"{CONFIG} implies {tuple(model_shape)}")
    missing = sorted(k for k in info.get("missing_keys") or [] if not (tied and k == "lm_head.weight"))
    unexpected = sorted(k for k in info.get("unexpected_keys") or []
                        if "rotary_emb" not in k and not _GPT2_BUFFERS.search(k))
    if missing or unexpected:
        what = f"is missing weight {missing[0]}" if missing else f"has weight {unexpected[0]} that {CONFIG} does not"
        raise InteropError(f"{directory} {what} (field num_hidden_layers or architecture mismatch)")

    tokenizer = load_hf_tokenizer(directory, config)
    return convert_hf_model(hf_model, tokenizer, n, init=init, source=directory, fields=fields, saved=saved)


def convert_hf_model(hf_model: Any, tokenizer: Any | None, n_future: int, init: str = "copy", *,
                     source: Path, fields: dict[str, Any] | None = None,
                     saved: tuple[ModelConfig, dict[str, Tensor]] | None = None) -> tuple[MTPModel, Any | None]:
    """(MTPModel, tokenizer) from an already loaded Llama-family or GPT-2 transformers model
    (import_hf's weight mapping; also used by the GGUF import). `source` names the origin in
    error messages."""
    config = hf_model.config
    gpt2 = config.model_type == GPT2
    if fields is None:
        if config.model_type not in (*SUPPORTED, GPT2):
            raise InteropError(f"{source}: model_type {config.model_type!r} is not supported "
                               f"(supported: {', '.join((*SUPPORTED, GPT2))})")
        fields = _hf_fields(config, config.model_type, source)
    if n_future < 1:
        raise InteropError(f"n_future must be >= 1, got {n_future}")
    if init not in ("copy", "random"):
        raise InteropError(f"init must be 'copy' or 'random', got {init!r}")
    n = n_future
    n_trunk = int(config.num_hidden_layers) - 1
    tied = bool(getattr(config, "tie_word_embeddings", False))
    config_path = source / CONFIG if source.is_dir() else source
    hf_state = hf_model.state_dict()
    state = _gpt2_state(hf_state, n_trunk) if gpt2 else _llama_state(hf_state, n_trunk)
    if tied or state.get("output.weight") is None or (
            state["output.weight"].data_ptr() == state["tok_embeddings.weight"].data_ptr()):
        state["output.weight"] = state["tok_embeddings.weight"].clone()  # MTPModel's unembedding is untied

    cfg_fields = {**(saved[0].to_dict() if saved is not None else fields), "n_future": n}
    cfg_fields["n_layers"] = n_trunk + head_blocks(cfg_fields.get("head_type", "parallel"), n,
                                                   cfg_fields.get("shared_head", False))
    cfg = make_config(config_path, **cfg_fields)
    head1 = {k[len("heads.0."):]: v for k, v in state.items() if k.startswith("heads.0.")}
    saved_heads = saved[1] if saved else {}
    for j in range(1, min(n, 2) if cfg.shared_head else n):  # a shared head is saved once, as heads.1
        prefix = f"heads.{j}."
        own = {k[len(prefix):]: v for k, v in saved_heads.items() if k.startswith(prefix)}
        if own:
            block = {k: v.to(head1[k].dtype) if k in head1 else v for k, v in own.items()}
        elif init == "copy":
            block = {k: v.clone() for k, v in head1.items()}
        else:
            block = random_block(cfg, like=state["tok_embeddings.weight"])
        state.update({prefix + k: v for k, v in block.items()})

    check_vocab(tokenizer, cfg.vocab_size, source)
    rename = _gpt2_name if gpt2 else _hf_name
    return assign_state(cfg, state, source, lambda k: rename(k, n_trunk), config_name=CONFIG), tokenizer


def _check_saved_matches(saved: ModelConfig, fields: dict[str, Any], n_trunk: int, path: Path) -> None:
    theirs = saved.to_dict()
    for key in ("dim", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta", "attn_bias"):
        if theirs[key] != fields[key]:
            raise InteropError(f"{path}: field model.{key}={theirs[key]!r} does not match {CONFIG} ({fields[key]!r})")
    if saved.ffn_dim != fields["hidden_dim"]:
        raise InteropError(f"{path}: FFN width {saved.ffn_dim} does not match {CONFIG} intermediate_size")
    if saved.n_trunk != n_trunk:
        raise InteropError(f"{path}: {saved.n_trunk} trunk layers, but {CONFIG} has {n_trunk + 1} layers "
                           f"(trunk + head 1)")


# ----- export --------------------------------------------------------------------------------------

def export_hf(model: MTPModel, tokenizer: Any | None, directory: str | Path, all_heads: bool = False) -> Path:
    """Write trunk + head 1 as a standard Hugging Face causal LM directory (config.json,
    model.safetensors, tokenizer files) that AutoModelForCausalLM.from_pretrained loads; with
    all_heads=True also mtp_config.json + mtp_heads.safetensors for import_hf to restore every head."""
    cfg = model.cfg
    if cfg.head_type in ("linear", "anticausal"):
        raise InteropError(f"head_type={cfg.head_type!r}: head 1 is not one decoder layer on the trunk, so the "
                           "model has no Hugging Face equivalent")
    if cfg.non_llama():
        raise InteropError(f"Hugging Face export writes Llama/Qwen2 models, which cannot represent this "
                           f"GPT-2-style model ({cfg.non_llama()})")
    _require_transformers()
    from transformers import LlamaConfig, Qwen2Config

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    eos_id = tokenizer.eos_id if tokenizer is not None else None
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_trunk + 1, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        hidden_act="silu", max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=False, bos_token_id=None, eos_token_id=eos_id,
        pad_token_id=getattr(tokenizer, "pad_id", None),
    )
    with quiet_transformers():
        if cfg.attn_bias:  # Qwen2 is Llama with q/k/v biases, exactly our attn_bias
            hf_cfg = Qwen2Config(**common, use_sliding_window=False)
            hf_cfg.architectures = ["Qwen2ForCausalLM"]
        else:
            hf_cfg = LlamaConfig(**common, attention_bias=False, mlp_bias=False)
            hf_cfg.architectures = ["LlamaForCausalLM"]
        hf_cfg.dtype = str(dtype).removeprefix("torch.")  # transformers 5
        hf_cfg.torch_dtype = hf_cfg.dtype  # transformers 4
        hf_cfg.save_pretrained(directory)

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    base = {_hf_name(k, cfg.n_trunk): v for k, v in state.items()
            if not (k.startswith("heads.") and not k.startswith("heads.0."))}
    save_file(base, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, directory, cfg.max_seq_len)
    if all_heads:
        extra = {k: v for k, v in state.items() if k.startswith("heads.") and not k.startswith("heads.0.")}
        save_file(extra, str(directory / MTP_HEADS), metadata={"format": "pt"})
        meta = {"format": MTP_FORMAT, "version": 1, "model": cfg.to_dict()}
        (directory / MTP_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    else:
        for stale in (MTP_HEADS, MTP_CONFIG):  # never leave heads of an earlier export behind
            (directory / stale).unlink(missing_ok=True)
    return directory


def save_hf_tokenizer(tokenizer: Any, directory: str | Path, max_len: int | None = None) -> None:
    """tokenizer.json as is, plus the tokenizer_config.json transformers' AutoTokenizer reads."""
    from .meta import SentencePieceTokenizer

    if isinstance(tokenizer, SentencePieceTokenizer):
        tokenizer.save_model(directory)  # keep the original beside the converted tokenizer.json
        tokenizer = tokenizer.to_tokenizer()
    if not hasattr(tokenizer, "hf"):
        raise InteropError(f"cannot export tokenizer of type {type(tokenizer).__name__}")
    directory = Path(directory)
    tokenizer.save(directory)
    eos = tokenizer.hf.id_to_token(tokenizer.eos_id)
    pad = tokenizer.hf.id_to_token(tokenizer.pad_id) if tokenizer.pad_id is not None else None
    tok_cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos,
                               "clean_up_tokenization_spaces": False}
    if pad is not None:
        tok_cfg["pad_token"] = pad
    if max_len is not None:
        tok_cfg["model_max_length"] = max_len
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    specials = {k: v for k, v in (("eos_token", eos), ("pad_token", pad)) if v is not None}
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
