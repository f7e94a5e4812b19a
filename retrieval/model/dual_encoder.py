"""The seed's dual encoder, ``MultiModalEncoder``, built from local tower folders only.

Text tower (BERT) and image tower (ViT) each give their [CLS] hidden state, a linear projection
maps it into the shared space, and the result is L2-normalized, so a dot product is a cosine::

    text:  input_ids (B, T)        -> last_hidden_state[:, 0] (B, H_t) -> text_projection   -> (B, D)
    image: pixel_values (B, 3, H, W) -> last_hidden_state[:, 0] (B, H_v) -> visual_projection -> (B, D)

``load_state_dict`` accepts the checkpoints real training scripts write: a ``module.`` (DDP) or
``_orig_mod.`` (``torch.compile``) prefix, pooler weights present or absent, projections with or
without bias, and any embedding width D. Everything else must match exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import (
    MODEL_MAPPING,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from retrieval.errors import CheckpointError, ModelError
from retrieval.model.spec import DEFAULT_TEXT_MODEL, DEFAULT_VISION_MODEL

__all__ = ["MultiModalEncoder", "normalize_state_dict"]


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_VOCABULARY_FILES = ("vocab.txt", "tokenizer.json")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Buffers that older transformers releases saved and current ones recreate.
_DROPPABLE_BUFFERS = ("text_encoder.embeddings.position_ids",)
# Recent transformers name image processor backends (ViTImageProcessorPil, backend="pil"); older
# releases call the PIL one the "slow" processor (use_fast=False).
_NAMED_BACKENDS = hasattr(transformers, "ViTImageProcessorPil")
_PIL_BACKEND: dict[str, Any] = {"backend": "pil"} if _NAMED_BACKENDS else {"use_fast": False}
_PIL_VIT_PROCESSOR = getattr(transformers, "ViTImageProcessorPil" if _NAMED_BACKENDS else "ViTImageProcessor")
_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def _tower_folder(name: str | Path, role: str) -> Path:
    folder = Path(name)
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"{role} model folder {folder} has no config.json; towers load from local folders only "
            "(nothing is downloaded)"
        )
    return folder


def load_tower(folder: Path, weights: Mapping[str, torch.Tensor] | None = None) -> PreTrainedModel:
    """A transformer tower from a local folder: its weights if present, else random init.

    With ``weights`` (the tower's part of a checkpoint) the tower is built from its config and
    those tensors directly: neither random initialisation nor the folder's own weights, which
    the checkpoint replaces anyway (seconds for BERT-base and ViT-B/16 on a CPU).
    """
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        if weights is not None:
            tower = _with_weights(config, weights)
            if tower is not None:
                return tower
        if any((folder / f).is_file() for f in _WEIGHT_FILES):
            return AutoModel.from_pretrained(folder, local_files_only=True)
        return AutoModel.from_config(config)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot build a tower from {folder}: {e}") from e


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No per-tensor "Loading weights" bar from transformers while a tower is built; restored after."""
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _with_weights(config: PretrainedConfig, weights: Mapping[str, torch.Tensor]) -> PreTrainedModel | None:
    """The tower of ``config`` holding ``weights``, or None when they do not fit it.

    The caller's strict key check then reports the difference in the engine's own words.
    """
    found: Any = MODEL_MAPPING[type(config)]
    tower_class = found[0] if isinstance(found, tuple) else found  # a few types list several classes
    try:
        with _quiet_loading():
            tower = tower_class.from_pretrained(None, config=config, state_dict=dict(weights))
    except (RuntimeError, ValueError, KeyError):
        return None
    return tower.float()  # as a tower built from its config: float32 whatever the checkpoint holds


def load_tokenizer(folder: Path, config: PretrainedConfig) -> Any:
    """The folder's tokenizer; its ids must fit the tower's embedding table."""
    # Without a vocabulary file, transformers builds a tokenizer that maps every word to [UNK].
    if not any((folder / name).is_file() for name in _VOCABULARY_FILES):
        raise ModelError(f"no tokenizer vocabulary in {folder} (expected vocab.txt or tokenizer.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"unusable tokenizer in {folder}: {e}") from e
    if len(tokenizer) > int(config.vocab_size):
        raise ModelError(
            f"tokenizer in {folder} has {len(tokenizer)} tokens but the tower embeds only {config.vocab_size}"
        )
    return tokenizer


def load_image_processor(folder: Path, config: PretrainedConfig) -> Any:
    """The folder's image processor, PIL backend; a folder without one gets ViT's defaults.

    The PIL backend is what ``resample`` in the config names, and what transformers 4 used for ViT:
    transformers 5 otherwise picks a torchvision backend whose resize differs, so the same image
    would embed differently depending on whether torchvision happens to be installed.
    """
    if not (folder / "preprocessor_config.json").is_file():
        size = int(getattr(config, "image_size", 224))
        return _PIL_VIT_PROCESSOR(size={"height": size, "width": size})
    try:
        return AutoImageProcessor.from_pretrained(folder, local_files_only=True, **_PIL_BACKEND)
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"unusable preprocessor_config.json in {folder}: {e}") from e


def normalize_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip ``module.`` / ``_orig_mod.`` wrapper prefixes (in any nesting) from every key."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        out[name] = value
    return out


class MultiModalEncoder(nn.Module):
    """BERT text tower + ViT image tower + linear projections + learned temperature.

    Construction mirrors the seed: ``MultiModalEncoder(bert_model_name=..., vit_model_name=...)``
    with two local folders. ``embed_dim`` is only a starting point: loading a checkpoint resizes
    the projections to the checkpoint's tensors.
    """

    def __init__(
        self,
        bert_model_name: str | Path = DEFAULT_TEXT_MODEL,
        vit_model_name: str | Path = DEFAULT_VISION_MODEL,
        embed_dim: int = 256,
        temperature: float = 0.07,
        *,
        tower_weights: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        super().__init__()
        text_folder = _tower_folder(bert_model_name, "text")
        vision_folder = _tower_folder(vit_model_name, "vision")
        weights = tower_weights or {}
        self.text_encoder = load_tower(text_folder, weights.get("text_encoder"))
        self.visual_encoder = load_tower(vision_folder, weights.get("visual_encoder"))
        self.text_tokenizer = load_tokenizer(text_folder, self.text_encoder.config)
        self.image_processor = load_image_processor(vision_folder, self.visual_encoder.config)
        self.text_folder = text_folder
        self.vision_folder = vision_folder
        text_width = int(self.text_encoder.config.hidden_size)
        vision_width = int(self.visual_encoder.config.hidden_size)
        self.text_projection = nn.Linear(text_width, embed_dim)
        self.visual_projection = nn.Linear(vision_width, embed_dim)
        self.temperature = nn.Parameter(torch.tensor(float(temperature)))

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], bert_model_name: str | Path, vit_model_name: str | Path
    ) -> MultiModalEncoder:
        """The model of a checkpoint's ``model_state_dict``, loaded as ``load_state_dict`` does.

        Equal to constructing from the two folders and loading the state, only faster: each tower
        is built straight from its tensors.
        """
        state = normalize_state_dict(state_dict)
        towers: dict[str, dict[str, torch.Tensor]] = {"text_encoder": {}, "visual_encoder": {}}
        for key, value in state.items():
            prefix, _, rest = key.partition(".")
            if prefix in towers and key not in _DROPPABLE_BUFFERS:
                towers[prefix][rest] = value
        model = cls(bert_model_name, vit_model_name, tower_weights=towers)
        model.load_state_dict(state)
        return model

    @property
    def embed_dim(self) -> int:
        return int(self.text_projection.out_features)

    @property
    def device(self) -> torch.device:
        return self.temperature.device

    # -- encoding ---------------------------------------------------------------------------

    def encode_text(self, text_inputs: Mapping[str, Any], normalize: bool = True) -> torch.Tensor:
        """Tokenizer output (``input_ids`` (B, T), ...) -> (B, D) float32, unit norm."""
        return self.project_text(self.text_cls(text_inputs), normalize)

    def encode_image(self, image_inputs: Mapping[str, Any], normalize: bool = True) -> torch.Tensor:
        """Image processor output (``pixel_values`` (B, 3, H, W)) -> (B, D) float32, unit norm."""
        return self.project_image(self.image_cls(image_inputs), normalize)

    def text_cls(self, text_inputs: Mapping[str, Any]) -> torch.Tensor:
        """The text tower's [CLS] hidden state, (B, H_t)."""
        inputs = {k: v.to(self.device) for k, v in text_inputs.items() if k in _TEXT_INPUTS}
        return self.text_encoder(**inputs).last_hidden_state[:, 0, :]  # of (B, T, H_t)

    def image_cls(self, image_inputs: Mapping[str, Any]) -> torch.Tensor:
        """The image tower's [CLS] hidden state, (B, H_v)."""
        pixels = image_inputs["pixel_values"].to(self.device)
        return self.visual_encoder(pixel_values=pixels).last_hidden_state[:, 0, :]  # of (B, 1 + P, H_v)

    def project_text(self, cls: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[CLS] states (B, H_t) -> (B, D) float32 in the shared space."""
        return self._finish(self.text_projection(cls), normalize)

    def project_image(self, cls: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[CLS] states (B, H_v) -> (B, D) float32 in the shared space."""
        return self._finish(self.visual_projection(cls), normalize)

    @staticmethod
    def _finish(projected: torch.Tensor, normalize: bool) -> torch.Tensor:
        # The one place embeddings are normalized; in float32 even under autocast.
        projected = projected.float()
        return F.normalize(projected, dim=-1) if normalize else projected

    def forward(
        self, text_inputs: Mapping[str, Any], image_inputs: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both modalities at once: ``(text (B, D), image (B, D))``, unit norm."""
        return self.encode_text(text_inputs), self.encode_image(image_inputs)

    # -- checkpoints ------------------------------------------------------------------------

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load the seed's ``model_state_dict``, tolerant only where real checkpoints differ.

        Wrapper prefixes are stripped, the projections and temperature take the checkpoint's
        shapes (and bias or no bias), pooler weights may be present or absent, and the legacy
        ``position_ids`` buffer is ignored. Any other difference raises ``CheckpointError``
        listing the missing and unexpected keys and the mismatched shapes.
        """
        state = normalize_state_dict(state_dict)
        own = set(super().state_dict())
        for key in _DROPPABLE_BUFFERS:
            if key in state and key not in own:
                del state[key]
        self._conform_heads(state)
        self._conform_poolers(state)
        if strict:
            self._check_keys(state)
        return super().load_state_dict(state, strict=strict, assign=assign)

    def _conform_heads(self, state: Mapping[str, torch.Tensor]) -> None:
        """Rebuild projections / temperature to the checkpoint's shapes when the widths agree."""
        dims = set()
        for name, tower in (
            ("text_projection", self.text_encoder),
            ("visual_projection", self.visual_encoder),
        ):
            weight = state.get(f"{name}.weight")
            if weight is None or weight.dim() != 2:
                continue
            out_dim, in_dim = weight.shape
            dims.add(int(out_dim))
            if in_dim != tower.config.hidden_size:
                continue  # a real mismatch: reported by _check_keys
            old: nn.Linear = getattr(self, name)
            has_bias = f"{name}.bias" in state
            if old.out_features != out_dim or (old.bias is not None) != has_bias:
                new = nn.Linear(int(in_dim), int(out_dim), bias=has_bias)
                setattr(self, name, new.to(device=old.weight.device, dtype=old.weight.dtype))
        if len(dims) > 1:
            raise CheckpointError(
                f"text and image projections disagree on the embedding width: {sorted(dims)}"
            )
        temperature = state.get("temperature")
        if temperature is not None and temperature.shape != self.temperature.shape:
            self.temperature = nn.Parameter(torch.empty(temperature.shape, device=self.device))

    def _conform_poolers(self, state: dict[str, torch.Tensor]) -> None:
        """Poolers are unused for [CLS] embeddings: follow the checkpoint's choice to keep one."""
        for name, tower in (("text_encoder", self.text_encoder), ("visual_encoder", self.visual_encoder)):
            prefix = f"{name}.pooler."
            in_state = any(k.startswith(prefix) for k in state)
            if getattr(tower, "pooler", None) is not None and not in_state:
                tower.register_module("pooler", None)
            elif getattr(tower, "pooler", None) is None and in_state:
                for key in [k for k in state if k.startswith(prefix)]:
                    del state[key]

    def _check_keys(self, state: Mapping[str, torch.Tensor]) -> None:
        own = super().state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = sorted(
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in set(own) & set(state)
            if state[k].shape != own[k].shape
        )
        if missing or unexpected or shapes:
            raise CheckpointError(_mismatch_report(missing, unexpected, shapes))


def _mismatch_report(missing: list[str], unexpected: list[str], shapes: list[str], limit: int = 8) -> str:
    parts = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            shown = ", ".join(items[:limit]) + (
                f", ... ({len(items) - limit} more)" if len(items) > limit else ""
            )
            parts.append(f"{len(items)} {label}: {shown}")
    return "checkpoint does not match the model towers; " + "; ".join(parts)
