"""TrainConfig: everything a training run needs, as one small config per concern.

`TrainConfig` holds six sections, each a YAML mapping, a `--help` section and an attribute:
`model` (ModelSpec), `optimizer` (OptimizerConfig), `data` (DataConfig), `checkpointing`
(CheckpointConfig), `runtime` (RuntimeConfig) and `finetuning` (FinetuneConfig), so the learning
rate is `optimizer: {lr: 1e-3}` in YAML and `cfg.optimizer.lr` in Python. Each field's help,
allowed values and bounds are its metadata (mtp.options.opt): they make `--help` and the checks.

`TrainConfig.from_dict` reads YAML, flags and saved `train_config.json` files. Every field also
has a flat key, unique across sections, which is its flag name and what YAML files written before
the sections use: the field's name (`lr: 1e-3`, `--lr`), except `data.dir` (`data: DIR`,
`--data`) and `model.overrides` (`model: {dim: 96}`, `--model dim=96`). A `model:` mapping may
also hold ModelConfig fields directly (`model: {preset: 10M, dim: 96}`): they are its overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .distributed import STRATEGIES
from .loss import TARGETS
from .model import HEAD_TYPES, PRESETS, ConfigError, ModelConfig
from .options import OptionError, _describe, check_field, check_fields, check_mapping, check_value, flat_name, opt


class _Section:
    """A TrainConfig section: its fields are checked when it is made; errors name `KEY.field`."""

    KEY: ClassVar[str]

    def __post_init__(self) -> None:
        check_fields(self, self.KEY + ".")


@dataclass
class ModelSpec(_Section):
    """The model trained: a preset with ModelConfig fields overridden, and its heads."""

    KEY: ClassVar[str] = "model"

    preset: str = opt("tiny", "model size (see `mtp presets`)", tuple(PRESETS))
    n_future: int = opt(4, "number of output heads, i.e. tokens predicted per position", minimum=1)
    head_type: str | None = opt(None, "how heads are stacked on the trunk; none: parallel for a new model, the "
                                      "base's with init_from", HEAD_TYPES)
    shared_head: bool = opt(False, "sequential heads 2..n as one module used at every depth (FastMTP): one "
                                   "block of weights, the trunk keeps the other layers, and decoding may draft "
                                   "deeper than n-1; a base with one stays shared")
    overrides: dict[str, Any] = opt(help="ModelConfig field over the preset's, repeatable (e.g. --model dim=96); "
                                         "in YAML, ModelConfig fields in the model: section", default_factory=dict,
                                    flat="model")
    draft_vocab: int = opt(0, "heads 2..n score only this many tokens, the most frequent in the training split "
                              "(a slice of the unembedding; head 1 scores all); 0: keep the model's (none for a "
                              "new model)", minimum=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.overrides = check_mapping(self.overrides, ModelConfig, "model.overrides.")
        for name in self.overrides:
            if name in _MODEL_FIELDS:
                raise OptionError(f"model.overrides.{name}: set model.{name} (flat: {name}) instead")

    def build(self, vocab_size: int) -> ModelConfig:
        """The ModelConfig of a new model for a tokenizer of `vocab_size` tokens."""
        overrides = {"n_future": self.n_future, "head_type": self.head_type or "parallel", "vocab_size": vocab_size,
                     "shared_head": self.shared_head, **self.overrides}
        cfg = ModelConfig.from_preset(self.preset, **overrides)
        if cfg.vocab_size < vocab_size:
            raise ConfigError(f"model vocab_size={cfg.vocab_size} is smaller than the tokenizer's {vocab_size}")
        return cfg


@dataclass
class OptimizerConfig(_Section):
    """What is optimized and how: the loss over heads, AdamW and the learning-rate schedule."""

    KEY: ClassVar[str] = "optimizer"

    head_weights: list[float] | None = opt(None, "loss weight per head, one number per head; none: unweighted sum")
    steps: int = opt(1000, "optimizer steps", minimum=1)
    lr: float = opt(1e-3, "peak learning rate, a positive number", positive=True)
    warmup: int = opt(100, "linear warmup steps", minimum=0)
    min_lr_ratio: float = opt(0.03, "the cosine schedule ends at this fraction of the peak lr")
    weight_decay: float = opt(0.1, "AdamW decoupled weight decay on matrices")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the gradient norm to this; 0 disables clipping")


@dataclass
class DataConfig(_Section):
    """The training data and how it is cut into batches."""

    KEY: ClassVar[str] = "data"

    dir: str = opt("data/stdlib-bpe", "directory made by `mtp prepare` to train on (in a YAML data: section, "
                                      "its dir:)", flat="data")
    batch_size: int = opt(16, "sequences per micro-batch (per process)", minimum=1)
    seq_len: int = opt(256, "tokens per training sequence (at most the model's max_seq_len)", minimum=1)
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step", minimum=1)
    seed: int = opt(0, "seed of the initial weights and the batch order")


@dataclass
class CheckpointConfig(_Section):
    """The run directory: checkpoints, validation and logs."""

    KEY: ClassVar[str] = "checkpointing"

    out: str = opt("runs/mtp", "run directory: checkpoints, metrics.jsonl, tb/ logs, loss plot")
    resume: bool = opt(False, "continue from the newest intact checkpoint in --out (fresh start if none)")
    save_every: int = opt(200, "steps between checkpoints; the last step is always saved", minimum=0)
    keep: int = opt(2, "checkpoints kept on disk (the newest intact one is never deleted)", minimum=0)
    eval_every: int = opt(200, "steps between validations; 0: only at the end", minimum=0)
    eval_batches: int = opt(10, "validation batches per evaluation", minimum=0)
    log_every: int = opt(10, "steps between metrics.jsonl / TensorBoard records", minimum=1)
    progress: bool = opt(True, "show a progress bar")


@dataclass
class RuntimeConfig(_Section):
    """Where and how it runs: device, precision, memory savers, processes and threads."""

    KEY: ClassVar[str] = "runtime"

    device: str = opt("auto", "auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    dtype: str = opt("auto", "autocast dtype of the forward pass; auto: bf16 on CUDA and on CPUs with native bf16 "
                     "(AVX512-BF16/AMX), fp32 elsewhere", ("auto", "bf16", "fp32"))
    chunk_size: int | None = opt(2048, "positions per cross-entropy chunk (saves memory); none: all at once",
                                 minimum=1)
    compile: bool = opt(False, "torch.compile the trunk and head blocks")
    activation_checkpointing: bool = opt(False, "recompute block activations in backward (less memory)")
    parallel: str = opt("auto", "under torchrun: data parallel (auto = ddp) or FSDP2 sharding; one process: none",
                        STRATEGIES)
    threads: int = opt(0, "CPU threads per process; 0: torch's default alone, CPUs / local processes under "
                          "torchrun", minimum=0)


@dataclass
class FinetuneConfig(_Section):
    """Starting from a checkpoint (what `mtp finetune` sets)."""

    KEY: ClassVar[str] = "finetuning"

    init_from: str | None = opt(None, "start from this checkpoint's weights (finetuning); n_future may differ")
    init_heads: str = opt("copy", "heads added when n_future grows: copies of head 1, or random", ("copy", "random"))
    trainable: str = opt("all", "what trains: everything, the heads (trunk frozen), or heads 2..n only "
                                "(next-token output unchanged)", ("all", "heads", "extra_heads"))
    targets: str = opt("data", "what heads 2..n learn: the data, head 1's greedy tokens (self-distillation, "
                               "for drafting), or head 1's distribution cut to its distill_topk likeliest tokens "
                               "(KL; logged head losses are then KLs)", TARGETS)
    distill_topk: int = opt(32, "targets=distill: head 1's likeliest tokens kept per position (renormalised)",
                            minimum=1)
    base_cache: str | None = opt(None, "trainable=extra_heads: compute the frozen base's outputs (trunk or head 1 "
                                       "output, head 1's top-k and loss) for the training split once, memory-mapped "
                                       "in this directory, and train the heads from them every epoch; auto: "
                                       "OUT/base-cache; rebuilt when the base, data or settings change")
    base_cache_dtype: str = opt("bf16", "dtype of the cached hidden states", ("bf16", "fp32"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.base_cache is not None and self.base_cache.lower() in ("none", "null", "off", ""):
            self.base_cache = None


@dataclass
class TrainConfig:
    """Everything a training run needs, by concern; settable from YAML and from `mtp train --flag
    value` (see the module docstring). Each section's help is the title of its `--help` section."""

    model: ModelSpec = opt(help="the model trained", default_factory=ModelSpec)
    optimizer: OptimizerConfig = opt(help="loss, optimizer and learning-rate schedule",
                                     default_factory=OptimizerConfig)
    data: DataConfig = opt(help="training data and batches", default_factory=DataConfig)
    checkpointing: CheckpointConfig = opt(help="run directory: checkpoints, validation, logs",
                                          default_factory=CheckpointConfig)
    runtime: RuntimeConfig = opt(help="device, precision, memory and processes", default_factory=RuntimeConfig)
    finetuning: FinetuneConfig = opt(help="starting from a checkpoint", default_factory=FinetuneConfig)

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise OptionError(f"{name} must be {cls.__name__}(...) (TrainConfig.from_dict reads mappings), "
                                  f"got {_describe(getattr(self, name))}")
        m, ft = self.model, self.finetuning
        if ft.targets != "data" and m.head_type == "anticausal":
            raise ConfigError(f"targets={ft.targets} needs head 1 to read the trunk output; anticausal heads do not")
        if ft.base_cache is not None and ft.trainable != "extra_heads":
            raise ConfigError(f"base_cache needs trainable=extra_heads (a frozen trunk, head 1 and unembedding), "
                              f"got trainable={ft.trainable}")
        weights = self.optimizer.head_weights
        if weights is not None and len(weights) != m.n_future:
            raise ConfigError(f"head_weights has {len(weights)} numbers but the model has {m.n_future} heads "
                              "(n_future); give one per head")

    @classmethod
    def from_dict(cls, *layers: Mapping[str, Any]) -> TrainConfig:
        """A TrainConfig from mappings of options, flat or nested (see the module docstring), each
        overriding the ones before it (e.g. a command's defaults, a YAML file, the flags typed).
        A wrong key, type or value is one line naming the key as written there."""
        merged: dict[tuple[str, ...], tuple[str, Any]] = {}
        for layer in layers:
            merged.update(config_entries(layer))
        values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        overrides: dict[str, Any] = {}
        for path, (key, value) in merged.items():
            if len(path) == 3:  # ("model", "overrides", ModelConfig field)
                overrides[path[2]] = check_value(key, value, _MODEL_CONFIG_HINTS[path[2]])
            else:
                section, name = path
                f, hint = _FIELDS[section][name]
                values[section][name] = check_field(key, value, f, hint)
        values["model"]["overrides"] = overrides
        return cls(**{name: SECTIONS[name](**vals) for name, vals in values.items()})


SECTIONS: dict[str, type] = {name: hint for name, hint in typing.get_type_hints(TrainConfig).items()}
assert all(cls.KEY == name for name, cls in SECTIONS.items())
# section -> field name -> (field, type hint)
_FIELDS: dict[str, dict[str, tuple[dataclasses.Field, Any]]] = {
    name: {f.name: (f, typing.get_type_hints(cls)[f.name]) for f in dataclasses.fields(cls)}
    for name, cls in SECTIONS.items()}
# flat key (flag name) -> (section, field name)
FLAT_KEYS: dict[str, tuple[str, str]] = {flat_name(f): (section, name) for section, fields in _FIELDS.items()
                                         for name, (f, _) in fields.items()}
assert len(FLAT_KEYS) == sum(len(v) for v in _FIELDS.values()), "flat keys must be unique"
_MODEL_FIELDS = set(_FIELDS["model"]) - {"overrides"}
_MODEL_CONFIG_HINTS = typing.get_type_hints(ModelConfig)


def config_entries(values: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[str, Any]]:
    """{path: (key as written, value)} for a mapping of TrainConfig options, flat or nested; a path
    is (section, field) or ("model", "overrides", ModelConfig field). Unknown keys, and one option
    given twice (flat and nested), are a one-line OptionError."""
    out: dict[tuple[str, ...], tuple[str, Any]] = {}
    # Set inside `model:` (n_future, head_type, draft_vocab, shared_head), an option wins over its flat key:
    # before the sections, `model:` held ModelConfig overrides, which won over the flat fields, and
    # saved configs hold both (head_type: parallel, model: {head_type: causal}).
    in_model: set[tuple[str, ...]] = set()

    def put(path: tuple[str, ...], key: str, value: Any, model_mapping: bool = False) -> None:
        if path in out and not (model_mapping ^ (path in in_model)):
            raise OptionError(f"{out[path][0]} and {key} set the same option; keep one")
        if path in in_model and not model_mapping:
            return
        out[path] = (key, value)
        if model_mapping:
            in_model.add(path)

    unknown: list[str] = []
    for key, value in values.items():
        if key == "model":
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise OptionError(f"model must be a mapping of model options and ModelConfig fields "
                                  f"(e.g. model: {{dim: 96}}), got {_describe(value)}")
            for k, v in value.items():
                if k == "overrides":
                    if not isinstance(v, Mapping):
                        raise OptionError(f"model.overrides must be a mapping of ModelConfig fields, "
                                          f"got {_describe(v)}")
                    for ok, ov in v.items():
                        _model_config_key(f"model.overrides.{ok}", ok)
                        put(("model", "overrides", ok), f"model.overrides.{ok}", ov)
                elif k in _MODEL_FIELDS:
                    put(("model", k), f"model.{k}", v, model_mapping=True)
                else:
                    _model_config_key(f"model.{k}", k)
                    put(("model", "overrides", k), f"model.{k}", v)
        elif key in SECTIONS and isinstance(value, Mapping):
            for k, v in value.items():
                if k not in _FIELDS[key]:
                    raise OptionError(_not_in_section(key, k))
                put((key, k), f"{key}.{k}", v)
        elif key in FLAT_KEYS:
            put(FLAT_KEYS[key], key, value)
        elif key in SECTIONS:
            raise OptionError(f"{key} must be a mapping of {key} options ({', '.join(_FIELDS[key])}), "
                              f"got {_describe(value)}")
        else:
            unknown.append(str(key))
    if unknown:
        msg = f"unknown training option(s): {', '.join(sorted(unknown))}"
        known = [*FLAT_KEYS, *SECTIONS, *(f"{s}.{n}" for s, fields in _FIELDS.items() for n in fields)]
        close = difflib.get_close_matches(unknown[0], known, n=1) if len(unknown) == 1 else []
        raise OptionError(msg + (f" (did you mean {close[0]}?)" if close else ""))
    return out


def _model_config_key(key: str, name: str) -> None:
    if name not in _MODEL_CONFIG_HINTS:
        others = [n for n in _MODEL_CONFIG_HINTS if n not in _MODEL_FIELDS]
        raise OptionError(f"{key} is neither a model option ({', '.join(sorted(_MODEL_FIELDS))}) nor a ModelConfig "
                          f"field ({', '.join(others)})")


def _not_in_section(section: str, name: Any) -> str:
    if name in FLAT_KEYS:
        where = ".".join(FLAT_KEYS[name])
        return f"{section}.{name} is not an option of {section}; {name} is {where}"
    return f"{section}.{name} is not an option of {section}; expected one of {', '.join(_FIELDS[section])}"
