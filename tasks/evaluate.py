"""Evaluate: score models on the golden and shifted sets, and price their predictions."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from refit import modeling
from refit.cost import Meter, Rates

COST_SAMPLE_ROWS = 256
COST_REPEATS = 3


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


def quality(model, tokenizer, sets: dict[str, pd.DataFrame]) -> dict[str, SliceMetrics]:
    """Accuracy, macro-F1 and mean confidence on each set."""
    from sklearn.metrics import f1_score

    slices = {}
    for name, frame in sets.items():
        predicted, confidence = modeling.predict(model, tokenizer, frame["text"].tolist())
        truth = frame["label"].tolist()
        slices[name] = SliceMetrics(
            rows=len(frame),
            accuracy=float(sum(p == t for p, t in zip(predicted, truth)) / max(1, len(frame))),
            macro_f1=float(f1_score(truth, predicted, average="macro", zero_division=0)),
            mean_confidence=float(confidence.mean()) if len(frame) else 0.0,
        )
    return slices


def cpu_seconds_per_1k(models: dict[str, object], tokenizer, texts: list[str],
                       repeats: int = COST_REPEATS) -> dict[str, float]:
    """CPU-seconds per 1,000 predictions for each model, measured side by side.

    The models take turns on the same texts, each keeps its fastest repeat,
    and all run on one thread: with several, threads spin while they wait
    for a busy core, and that spinning would be billed as inference.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = {name: float("inf") for name in models}
    try:
        for _ in range(repeats):
            for name, model in models.items():
                with Meter() as meter:
                    modeling.predict(model, tokenizer, texts)
                best[name] = min(best[name], meter.cpu_seconds)
    finally:
        torch.set_num_threads(threads)
    return {name: seconds / max(1, len(texts)) * 1000 for name, seconds in best.items()}


def _cost_texts(sets: dict[str, pd.DataFrame]) -> list[str]:
    texts = pd.concat([frame["text"] for frame in sets.values()])
    return texts.sample(n=min(COST_SAMPLE_ROWS, len(texts)), random_state=0).tolist()


def score_models(adapter_dirs: dict[str, Path], sets: dict[str, pd.DataFrame], rates: Rates) -> dict[str, Evaluation]:
    """Quality and inference cost of each adapter on the same sets."""
    tokenizer = modeling.load_tokenizer()
    models = {name: modeling.load_model(path) for name, path in adapter_dirs.items()}
    cpu = cpu_seconds_per_1k(models, tokenizer, _cost_texts(sets))
    return {name: Evaluation(quality(model, tokenizer, sets), round(cpu[name], 4), round(rates.price(cpu[name]), 8))
            for name, model in models.items()}


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(adapter_dir: Path, sets: dict[str, pd.DataFrame], rates: Rates) -> Evaluation:
    return score_models({"model": adapter_dir}, sets, rates)["model"]


@task(name="evaluate-pair", cache_policy=NO_CACHE)
def evaluate_pair(champion_dir: Path, challenger_dir: Path, sets: dict[str, pd.DataFrame],
                  rates: Rates) -> tuple[Evaluation, Evaluation]:
    """Champion and challenger on the same sets, their costs measured in turns."""
    scored = score_models({"champion": champion_dir, "challenger": challenger_dir}, sets, rates)
    return scored["champion"], scored["challenger"]
