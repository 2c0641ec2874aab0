"""Evaluate: score a model on the golden and shifted sets, and price its predictions."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from refit import modeling
from refit.cost import Meter, Rates


@dataclass(frozen=True)
class SliceMetrics:
    rows: int
    accuracy: float
    macro_f1: float
    mean_confidence: float


@dataclass(frozen=True)
class Evaluation:
    """Quality per evaluation set and the measured cost of inference."""

    slices: dict[str, SliceMetrics]
    cpu_seconds_per_1k: float
    cost_per_1k_usd: float

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}_{name}_{k}": float(v) for name, m in self.slices.items() for k, v in asdict(m).items()}
        out[f"{prefix}_inference_cpu_seconds_per_1k"] = self.cpu_seconds_per_1k
        out[f"{prefix}_inference_cost_per_1k_usd"] = self.cost_per_1k_usd
        return out


def score(model, tokenizer, sets: dict[str, pd.DataFrame], rates: Rates) -> Evaluation:
    """Accuracy, macro-F1 and confidence on each set; CPU cost per 1,000 predictions."""
    from sklearn.metrics import f1_score

    slices, rows, cpu = {}, 0, 0.0
    for name, frame in sets.items():
        with Meter() as meter:
            predicted, confidence = modeling.predict(model, tokenizer, frame["text"].tolist())
        rows, cpu = rows + len(frame), cpu + meter.cpu_seconds
        truth = frame["label"].tolist()
        slices[name] = SliceMetrics(
            rows=len(frame),
            accuracy=float(sum(p == t for p, t in zip(predicted, truth)) / max(1, len(frame))),
            macro_f1=float(f1_score(truth, predicted, average="macro", zero_division=0)),
            mean_confidence=float(confidence.mean()) if len(frame) else 0.0,
        )
    per_1k = cpu / max(1, rows) * 1000
    return Evaluation(slices, round(per_1k, 4), round(rates.price(per_1k), 8))


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(adapter_dir: Path, sets: dict[str, pd.DataFrame], rates: Rates) -> Evaluation:
    model = modeling.load_model(adapter_dir)
    return score(model, modeling.load_tokenizer(), sets, rates)
