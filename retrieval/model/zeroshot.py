"""Zero-shot classification: images against label prompts, with the checkpoint's temperature.

One path for every caller: ``label_vectors`` makes each label's vector from its prompts (the mean
of the prompt ensemble, unit norm), ``classify`` ranks labels for images, and ``retrieval eval``
scores its zero-shot accuracy with the same ``label_vectors``, so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from retrieval.errors import ConfigError
from retrieval.model.encoder import Encoder, ImageInput

__all__ = ["DEFAULT_TEMPLATE", "LabelScore", "classify", "label_vectors"]

DEFAULT_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class LabelScore:
    label: str
    probability: float  # softmax over the labels of cosine / temperature
    score: float  # the cosine similarity itself


def label_vectors(
    encode_texts: Callable[[list[str]], np.ndarray], labels: Sequence[str], templates: Sequence[str]
) -> np.ndarray:
    """Each label's vector, (L, D) float32 unit norm: the mean of its prompts ``template.format(label)``."""
    if not templates or any("{}" not in t for t in templates):
        raise ConfigError("every prompt template needs a {} where the label goes")
    prompts = encode_texts([t.format(label) for label in labels for t in templates])
    classes = prompts.reshape(len(labels), len(templates), -1).mean(axis=1)  # (L, D), prompt ensemble
    return (classes / np.linalg.norm(classes, axis=1, keepdims=True)).astype(np.float32)


def classify(
    encoder: Encoder,
    images: Sequence[ImageInput],
    labels: Sequence[str],
    templates: str | Sequence[str] = (DEFAULT_TEMPLATE,),
) -> list[list[LabelScore]]:
    """Per image, the labels ranked by probability (highest first).

    Each label is embedded from its prompts (``label_vectors``; one template or several); the
    probabilities use the model's learned temperature, as its contrastive loss did.
    """
    templates = (templates,) if isinstance(templates, str) else tuple(templates)
    labels = [label.strip() for label in labels if label.strip()]
    if len(labels) < 2:
        raise ConfigError("give at least two labels")
    text = label_vectors(encoder.encode_texts, labels, templates)  # (L, D)
    vision = encoder.encode_images(images)  # (N, D)
    cosine = vision @ text.T  # (N, L)
    temperature = max(encoder.temperature, 1e-4)
    logits = cosine / temperature
    logits -= logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    ranked = []
    for p_row, c_row in zip(probabilities, cosine, strict=True):
        order = np.argsort(-p_row, kind="stable")
        ranked.append([LabelScore(labels[j], float(p_row[j]), float(c_row[j])) for j in order])
    return ranked
