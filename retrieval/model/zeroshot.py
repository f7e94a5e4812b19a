"""Zero-shot classification: an image against label prompts, with the checkpoint's temperature."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from retrieval.errors import ConfigError
from retrieval.model.encoder import Encoder, ImageInput

__all__ = ["LabelScore", "classify"]

DEFAULT_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class LabelScore:
    label: str
    probability: float  # softmax over the labels of cosine / temperature
    score: float  # the cosine similarity itself


def classify(
    encoder: Encoder, images: Sequence[ImageInput], labels: Sequence[str], template: str = DEFAULT_TEMPLATE
) -> list[list[LabelScore]]:
    """Per image, the labels ranked by probability (highest first).

    Each label is embedded as ``template.format(label)``; the probabilities use the model's
    learned temperature, as its contrastive loss did.
    """
    labels = [label.strip() for label in labels if label.strip()]
    if len(labels) < 2:
        raise ConfigError("give at least two labels")
    if "{}" not in template:
        raise ConfigError("the template needs a {} where the label goes")
    text = encoder.encode_texts([template.format(label) for label in labels])  # (L, D)
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
