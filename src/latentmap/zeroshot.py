"""Zero-shot classification by an image-text model's own text tower.

Every class name goes through every prompt template (``zeroshot.templates``); the text embeddings
are normalised, averaged per class and normalised again (CLIP's prompt ensembling); each image's
logit for a class is the model's logit scale x the cosine of its image embedding (the model's
``get_image_features``, latentmap's ``embed`` at the last block) and the class embedding, plus the
model's logit bias where it has one (SigLIP). The predicted class is the largest logit. With one
template these are exactly the logits transformers' own forward pass returns as
``logits_per_image`` (tested to 1e-5 on CLIP, SigLIP and SigLIP 2); probabilities are the softmax
over classes (CLIP) or per-class sigmoids (SigLIP's pairwise training).

The text embeddings are cached like image embeddings: an entry of the embedding cache keyed by the
model's identity and the prompts. ``zeroshot_acc`` and ``zeroshot_balanced_acc`` get half-sample
intervals like every other metric (the classifier is fixed: no image is used to fit it), and
``tables/zeroshot_per_class.csv`` each class's recall with its exact binomial interval.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from latentmap import stats

log = logging.getLogger(__name__)
TEXT_FORMAT = 1  # bump on purpose when the cached text embeddings' meaning changes


def prompts(templates: list[str], class_names: list[str]) -> list[str]:
    """Every class through every template, class by class: (C x T) prompts. A folder name's
    underscores are read as spaces (``golden_retriever``: "a photo of a golden retriever."), as
    CLIP's own ImageNet prompts write class names."""
    return [template.format(name.replace("_", " ")) for name in class_names for template in templates]


def _unit(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values / np.maximum(np.linalg.norm(values, axis=-1, keepdims=True), 1e-12)


def class_embeddings(text: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, D) unit class embeddings from (C x T, D) prompt embeddings (class-major)."""
    per_class = _unit(text).reshape(n_classes, -1, text.shape[-1])
    return _unit(per_class.mean(axis=1))


def logits(images: np.ndarray, classes: np.ndarray, scale: float, bias: float | None) -> np.ndarray:
    """(N, C) the model's logits: scale x cos(image, class) (+ bias)."""
    return scale * (_unit(images) @ classes.T) + (0.0 if bias is None else bias)


def probabilities(found: np.ndarray, sigmoid: bool) -> np.ndarray:
    """(N, C): per-class sigmoids (SigLIP) or the softmax over the classes (CLIP)."""
    if sigmoid:
        return 1.0 / (1.0 + np.exp(-found))
    shifted = np.exp(found - found.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


@dataclass
class Text:
    """The class prompts' embeddings and the model's logit scale and bias (None where it has none)."""

    embeddings: np.ndarray  # (P, D)
    scale: float
    bias: float | None
    cache: str  # hit, miss or off


def text_embeddings(backbone, texts: list[str], cache_dir: str | None) -> Text | None:
    """``texts`` through the backbone's text tower, or None for a model without one. Read from the
    embedding cache when an entry for this model and these prompts exists (the text tower is then
    not loaded at all: the entry keeps the logit scale and bias), else encoded and written
    atomically."""
    from latentmap.store import EmbeddingCache

    family = backbone.text_family()
    if family is None:
        return None

    def encoded() -> Text | None:
        tower = backbone.text_tower()
        return None if tower is None else Text(tower.encode(texts), tower.logit_scale, tower.logit_bias, "miss")

    if cache_dir is None:
        found = encoded()
        return None if found is None else Text(found.embeddings, found.scale, found.bias, "off")
    digest = hashlib.sha256(json.dumps({"kind": "text", "format": TEXT_FORMAT, "model": backbone.identity(),
                                        "padding": str(family.text_padding), "prompts": texts},
                                       sort_keys=True).encode()).hexdigest()[:40]
    cache = EmbeddingCache(Path(cache_dir))
    with cache.lock(digest):
        cached, meta = cache.load(digest, "text"), cache.meta(digest)
        if cached is not None:
            return Text(np.asarray(cached), float(meta["logit_scale"]), meta["logit_bias"], "hit")
        found = encoded()
        if found is not None:
            cache.write(digest, lambda folder: np.save(folder / "text.npy", found.embeddings),
                        {"kind": "text", "model": backbone.identity(), "prompts": len(texts),
                         "logit_scale": found.scale, "logit_bias": found.bias})
        return found


@dataclass
class ZeroShot:
    """What a run logs of zero-shot classification."""

    scores: dict[str, stats.Interval]
    per_class: pd.DataFrame
    prompts: pd.DataFrame
    predicted: np.ndarray  # (n,) the scored images' predicted classes
    classes: np.ndarray  # (C, D) unit class embeddings


def evaluate(images: np.ndarray, labels: np.ndarray, class_names: list[str], templates: list[str], text: np.ndarray,
             scale: float, bias: float | None, members: np.ndarray, half_scale: float,
             confidence: float) -> ZeroShot:
    """Zero-shot scores of (n, D) image embeddings with ``labels``, from the (C x T, D) prompt
    embeddings ``text``; intervals from the half-samples ``members`` (B, n)."""
    classes = class_embeddings(text, len(class_names))
    predicted = logits(images, classes, scale, bias).argmax(axis=1)
    correct = (predicted == labels).astype(np.float64)
    counts = np.bincount(labels, minlength=len(class_names))
    present = np.flatnonzero(counts)

    def balanced(rows: np.ndarray) -> float:
        hits = np.bincount(labels[rows], weights=correct[rows], minlength=len(class_names))
        seen = np.bincount(labels[rows], minlength=len(class_names))
        kept = seen > 0
        return float((hits[kept] / seen[kept]).mean())

    everyone = np.arange(len(labels))
    accuracy, balanced_accuracy = float(correct.mean()), balanced(everyone)
    halves_acc = np.array([correct[m].mean() for m in members]) if len(members) else np.zeros(0)
    halves_bal = np.array([balanced(np.flatnonzero(m)) for m in members]) if len(members) else np.zeros(0)
    held = "the prompts and the model"
    scores = {"zeroshot_acc": stats.from_halves(accuracy, halves_acc, half_scale, len(labels), confidence,
                                                proportion=True, held=held),
              "zeroshot_balanced_acc": stats.from_halves(balanced_accuracy, halves_bal, half_scale, len(labels),
                                                         confidence, bounds=(0.0, 1.0), held=held)}
    rows = []
    for c in present:
        members_c = labels == c
        hits = int(correct[members_c].sum())
        lo, hi = stats.clopper_pearson(hits, int(counts[c]), confidence)
        wrong = predicted[members_c & (predicted != labels)]
        confused = np.bincount(wrong, minlength=len(class_names))
        rows.append({"class": class_names[c], "n": int(counts[c]), "recall": hits / counts[c], "lo": lo, "hi": hi,
                     "most_predicted_instead": class_names[int(confused.argmax())] if len(wrong) else ""})
    table = pd.DataFrame([{"class": name, "template": template, "prompt": template.format(name)}
                          for name in class_names for template in templates])
    return ZeroShot(scores, pd.DataFrame(rows), table, predicted, classes)
