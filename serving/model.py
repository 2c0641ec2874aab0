"""A registered version made ready to serve: adapter merged into the base, batched prediction.

Merging the LoRA weights into the base (peft ``merge_and_unload``) leaves a
plain transformers model: one matmul per layer instead of two, and no peft
wrappers on the hot path. Prediction sorts texts by length and pads each
batch only to its own longest text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from refit import modeling


@dataclass(frozen=True)
class ServedModel:
    """One version, merged and in eval mode. Immutable: a swap replaces the whole object."""

    version: int
    model: torch.nn.Module
    tokenizer: object
    labels: tuple[str, ...]
    batch_size: int = 32

    @torch.inference_mode()
    def predict(self, texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """Label and its probability for each text, in the order given."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        labels: list[str] = [""] * len(texts)
        confidence = np.zeros(len(texts), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            features = self.tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                                      max_length=modeling.MAX_LENGTH, return_tensors="pt")
            proba = torch.softmax(self.model(**features).logits, dim=-1)
            best, index = proba.max(dim=-1)
            for row, i in enumerate(batch):
                labels[i] = self.labels[int(index[row])]
                confidence[i] = float(best[row])
        return labels, confidence


def merged(adapter_dir: Path) -> torch.nn.Module:
    """The adapter folded into the base weights: a plain transformers classifier."""
    model = modeling.load_model(adapter_dir).merge_and_unload()
    model.eval()
    return model


def from_adapter(adapter_dir: Path, version: int, batch_size: int = 32, tokenizer=None) -> ServedModel:
    model = merged(adapter_dir)
    return ServedModel(version, model, tokenizer or modeling.load_tokenizer(),
                       tuple(modeling.model_labels(model)), batch_size)


def load_version(model_name: str, version: int, batch_size: int = 32, tokenizer=None) -> ServedModel:
    """Download a registered version's adapter and make it ready to serve."""
    from registry import versions

    return from_adapter(versions.download_adapter(model_name, version), version, batch_size, tokenizer)
