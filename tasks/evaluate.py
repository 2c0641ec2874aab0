"""Evaluate: score models on the fresh holdout and the golden suite, and price their predictions.

Quality is kept per example as well as per set, so the gate can compare
champion and challenger on the very same examples (paired bootstrap) and per
slice (the ``group`` column, a domain in CLINC150). Every figure comes from
the model as ``refit serve`` runs it (the adapter merged into the base, the
forward pass on ONNX Runtime, or torch where serving would fall back to it),
so the cost and latency rules judge what users will pay for. Cost is
measured side by side: CPU-seconds per 1,000 predictions in batches, latency
of single-text requests, and the adapter's bytes on disk.

Quality needs each model's answers, not its cost: where champion and
challenger run the same encoder (an update that trained the head alone), the
encoder runs once and each model's head answers on its states; states kept
for that encoder stand in for its pass, and the new ones are kept. Each
reuse is checked against the model's own served pass on probe texts
(``refit.runtime.encoder_states.outputs_of``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from refit import modeling
from refit.cost import Meter, Rates

log = logging.getLogger("refit.evaluate")
# Texts of a cost sample. A cascade's judges a ratio of 0.5 and needs each tier's texts in proportion
# (``tier_sample``). The gate's pair judges a ratio of 1.5, and its two models take turns on the same texts, so
# which texts were drawn cancels out of that ratio; it takes half as many.
COST_SAMPLE_ROWS = 256
PAIR_COST_SAMPLE_ROWS = 128
LATENCY_SAMPLE_ROWS = 48
COST_REPEATS = 3
LATENCY_REPEATS = 2  # requests per text; its fastest counts
CALIBRATION_BINS = 15


@dataclass(frozen=True)
class SliceMetrics:
    rows: int
    accuracy: float
    macro_f1: float
    mean_confidence: float
    calibration_error: float = 0.0  # expected calibration error, 15 equal-width bins


@dataclass(frozen=True)
class Evaluation:
    """Quality per evaluation set and per slice, and the measured cost of inference.

    ``correct`` holds, per set, 1 or 0 for each example in the set's row order:
    two evaluations on the same sets are paired example by example.
    """

    slices: dict[str, SliceMetrics]
    cpu_seconds_per_1k: float
    cost_per_1k_usd: float
    groups: dict[str, SliceMetrics] = field(default_factory=dict)  # "<set>/<group>"
    correct: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    latency_ms_p50: float = 0.0
    latency_ms_p95: float = 0.0
    artifact_bytes: int = 0
    # What was scored, so a later stage can reuse these figures only for the same model on the same sets:
    runtime: str = ""  # "onnx" or "torch", as served
    adapter_digest: str = ""  # adapter_digest() of the scored adapter
    set_digests: dict[str, str] = field(default_factory=dict)  # set_digest() of each set
    # Text -> (label, confidence) the model answered on the scored sets, as served: later stages of the same
    # flow (the drift reference's snapshot) read these instead of running the model again.
    answers: dict[str, tuple[str, float]] = field(default_factory=dict, repr=False)

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}_{name}_{k}": float(v) for name, m in self.slices.items() for k, v in asdict(m).items()}
        out |= {f"{prefix}_{name.replace('/', '_')}_accuracy": m.accuracy for name, m in self.groups.items()}
        out[f"{prefix}_inference_cpu_seconds_per_1k"] = self.cpu_seconds_per_1k
        out[f"{prefix}_inference_cost_per_1k_usd"] = self.cost_per_1k_usd
        out[f"{prefix}_latency_ms_p50"] = self.latency_ms_p50
        out[f"{prefix}_latency_ms_p95"] = self.latency_ms_p95
        out[f"{prefix}_artifact_bytes"] = float(self.artifact_bytes)
        return out


def calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """Expected calibration error: |accuracy - confidence| per confidence bin, weighted by rows."""
    if len(confidence) == 0:
        return 0.0
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in np.unique(index):
        pick = index == b
        total += pick.sum() * abs(correct[pick].mean() - confidence[pick].mean())
    return float(total / len(confidence))


def _slice(truth: list, predicted: list, confidence: np.ndarray, correct: np.ndarray) -> SliceMetrics:
    from sklearn.metrics import f1_score

    return SliceMetrics(
        rows=len(truth),
        accuracy=float(correct.mean()) if len(truth) else 0.0,
        macro_f1=float(f1_score(truth, predicted, average="macro", zero_division=0)) if len(truth) else 0.0,
        mean_confidence=float(confidence.mean()) if len(truth) else 0.0,
        calibration_error=calibration_error(confidence, correct),
    )


def quality(model, sets: dict[str, pd.DataFrame], probabilities: dict[str, np.ndarray] | None = None
            ) -> tuple[dict[str, SliceMetrics], dict[str, SliceMetrics], dict[str, np.ndarray]]:
    """Per set and per ``group`` slice: accuracy, macro-F1, confidence, calibration; and per-example hits.

    ``model`` is a served model (``refit.runtime.served.ServedModel``), as it
    answers in production. Its batches run on every available core: this
    meters nothing (``cpu_seconds_per_1k`` and ``latency_ms`` do, on one).
    ``probabilities`` (per set, texts x labels): what it answers there, when
    already known (``served_probabilities``).
    """
    from refit.processes import available_cpus

    slices, groups, hits = {}, {}, {}
    for name, frame in sets.items():
        if probabilities is None:
            predicted, confidence = model.predict(frame["text"].tolist(), workers=available_cpus())
        else:
            best = probabilities[name].argmax(axis=1)
            predicted = [model.labels[i] for i in best]
            confidence = probabilities[name][np.arange(len(best)), best]
        confidence = np.asarray(confidence, dtype=np.float64)
        truth = frame["label"].tolist()
        correct = np.array([p == t for p, t in zip(predicted, truth)], dtype=np.float64)
        slices[name], hits[name] = _slice(truth, predicted, confidence, correct), correct
        if "group" in frame.columns:
            for group, rows in frame.groupby("group", sort=True).indices.items():
                groups[f"{name}/{group}"] = _slice([truth[i] for i in rows], [predicted[i] for i in rows],
                                                   confidence[rows], correct[rows])
    return slices, groups, hits


def served_probabilities(models: dict[str, object], adapter_dirs: dict[str, Path], sets: dict[str, pd.DataFrame],
                         store=None, model_name: str | None = None) -> dict[str, dict[str, np.ndarray]]:
    """What each served model answers on each set (probabilities), sharing the encoder's pass where they can.

    Models whose adapters run the same encoder (an update that trained the
    head alone, against its champion) need one pass of it: the last model
    runs it (the challenger, in ``evaluate_pair``'s order), the others answer
    with their own heads on its states. With a ``store``, states kept for
    that encoder (``refit.runtime.encoder_states``: the cascade build's, an
    earlier evaluation's) stand in for the pass as well, and the states this
    pass computed are kept for the next. Every reuse is checked against the
    model's own served pass on probe texts first (``outputs_of``).
    """
    from refit.processes import available_cpus
    from refit.runtime.encoder_states import EncoderStates, fingerprint, outputs_of, state_key

    texts = list(dict.fromkeys(t for frame in sets.values() for t in frame["text"]))
    position = {text: i for i, text in enumerate(texts)}
    shared: dict[str, dict[str, np.ndarray]] = {}  # encoder -> text hash -> state
    computed: dict[str, tuple[list[str], np.ndarray]] = {}  # encoder -> the states this pass ran
    out = {}
    for name in reversed(list(models)):
        encoder = _encoder_of(adapter_dirs[name], fingerprint)
        if encoder is not None and encoder not in shared and store is not None and model_name:
            shared[encoder] = _load_states(EncoderStates(store, model_name, encoder=encoder))
        kept = shared.get(encoder) if encoder is not None else None
        outputs = outputs_of(models[name], texts, kept, workers=available_cpus())
        if encoder is not None and outputs.states.size:
            shared[encoder] = (kept or {}) | {state_key(t): s for t, s in zip(texts, outputs.states)}
            if not outputs.reused or outputs.reused < len(texts):
                computed[encoder] = (texts, outputs.states)
        out[name] = {set_name: outputs.probabilities[[position[t] for t in frame["text"]]]
                     for set_name, frame in sets.items()}
    if store is not None and model_name:
        for encoder, (seen, states) in computed.items():
            EncoderStates(store, model_name, encoder=encoder).keep(seen, states)
    return dict(reversed(list(out.items())))


def _encoder_of(adapter_dir: Path, fingerprint) -> str | None:
    try:
        return fingerprint(adapter_dir)
    except Exception:  # noqa: BLE001 - an adapter of an unexpected shape: scored on its own pass
        return None


def _load_states(states) -> dict[str, np.ndarray]:
    try:
        return states.load()
    except Exception:  # noqa: BLE001 - a cache: a miss costs the pass
        log.exception("encoder states %s not read", states.encoder)
        return {}


@contextmanager
def _one_thread() -> Iterator[None]:
    """Torch and numpy's BLAS on one thread for the block: cost and latency measured without threads spinning.

    BLAS matters for a cascade: its student's product with the word vectors
    left two OpenBLAS threads spinning into the champion's pass that followed,
    billed to the cascade (measured in docs/cascade.md).
    """
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(threads)


def cpu_seconds_per_1k(models: dict[str, object], texts: list[str], repeats: int = COST_REPEATS) -> dict[str, float]:
    """CPU-seconds per 1,000 predictions for each served model, measured side by side.

    The models take turns on the same texts, each keeps its fastest repeat,
    and all run on one thread: with several, threads spin while they wait
    for a busy core, and that spinning would be billed as inference.
    """
    best = {name: float("inf") for name in models}
    with _one_thread():
        for _ in range(repeats):
            for name, model in models.items():
                with Meter() as meter:
                    model.predict(texts)
                best[name] = min(best[name], meter.cpu_seconds)
    return {name: seconds / max(1, len(texts)) * 1000 for name, seconds in best.items()}


def latency_ms(models: dict[str, object], texts: list[str],
               repeats: int = LATENCY_REPEATS) -> dict[str, tuple[float, float]]:
    """p50 and p95 milliseconds of one-text requests, the models alternating text by text.

    Each text's latency is its fastest of ``repeats`` requests, as cost keeps
    its fastest repeat: a neighbour taking the core for one request would
    otherwise decide a p95 over a few dozen texts.
    """
    import time

    seen: dict[str, list[float]] = {name: [] for name in models}
    with _one_thread():
        for text in texts:
            best = {name: float("inf") for name in models}
            for _ in range(repeats):
                for name, model in models.items():
                    start = time.perf_counter()
                    model.predict([text])
                    best[name] = min(best[name], (time.perf_counter() - start) * 1000)
            for name, value in best.items():
                seen[name].append(value)
    return {name: (float(np.percentile(v, 50)), float(np.percentile(v, 95))) for name, v in seen.items()}


# Served models kept loaded in this process, the newest last: the evaluation's champion and challenger, which the
# cascade build (the challenger, once promoted) and the ladder's next attempt (the champion) load again.
LOADED_MODELS = 2
_loaded: dict[tuple[str, str], object] = {}


def load_served_models(adapter_dirs: dict[str, Path], runtime: str | None = None) -> dict[str, object]:
    """Each adapter made ready to serve exactly as ``refit serve`` does: merged, on ONNX Runtime (or torch).

    One inference thread each, so that the cost of the two is compared on
    equal terms; ``runtime`` defaults to ``REFIT_SERVE_RUNTIME``. An adapter
    loaded by one of the last ``LOADED_MODELS`` calls (the same files, the
    same runtime) is not merged and exported again: it is the same model.
    """
    from refit.settings import Settings
    from refit.runtime.served import from_adapter

    runtime = runtime or Settings().serve_runtime
    models = {}
    with _one_thread():
        for name, path in adapter_dirs.items():
            key = (adapter_digest(path), runtime)
            model = _loaded.pop(key, None)
            if model is None:
                model = from_adapter(path, 0, tokenizer=modeling.load_tokenizer(path), runtime=runtime, threads=1)
            _loaded[key] = models[name] = model
    for key in list(_loaded)[: max(0, len(_loaded) - LOADED_MODELS)]:
        del _loaded[key]
    return models




def artifact_bytes(adapter_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(adapter_dir).rglob("*") if p.is_file())


def adapter_digest(adapter_dir: Path) -> str:
    """Hash of every file of an adapter directory (names and bytes): which model a figure belongs to."""
    import hashlib

    digest = hashlib.sha256()
    root = Path(adapter_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:32]


def set_digest(frame: pd.DataFrame) -> str:
    """Hash of a judging set's rows (text, label and group where there is one): which set a figure belongs to."""
    from refit.data import fingerprint

    return fingerprint(frame, [c for c in ("text", "label", "group") if c in frame.columns])


def _sample_texts(sets: dict[str, pd.DataFrame], n: int) -> list[str]:
    texts = pd.concat([frame["text"] for frame in sets.values()])
    return texts.sample(n=min(n, len(texts)), random_state=0).tolist()


def tier_sample(texts: Sequence[str], answered: np.ndarray, n: int, seed: int = 0) -> list[str]:
    """``n`` of ``texts`` in which the student answers the share it answers of all of them (``answered``).

    A cascade's cost and latency are measured on a sample, and what it costs
    is mostly the share of texts it escalates. A plain random draw of 256
    texts has a share about 3 points off the judged sets' (one standard
    error; in one build of the default demo's cascade, 48.8% against 57.5%).
    Drawn from each tier in proportion, the sample has the judged sets'
    share, and each tier's texts are still a random draw.
    """
    texts, answered = np.asarray(list(texts), dtype=object), np.asarray(answered, dtype=bool)
    n = min(n, len(texts))
    if n == 0:
        return []
    rng = np.random.default_rng(seed)
    take = int(round(n * answered.mean()))
    student, champion = np.flatnonzero(answered), np.flatnonzero(~answered)
    picked = np.concatenate([rng.choice(student, size=min(take, len(student)), replace=False),
                             rng.choice(champion, size=min(n - take, len(champion)), replace=False)])
    return texts[np.sort(picked)].tolist()


def score_models(adapter_dirs: dict[str, Path], sets: dict[str, pd.DataFrame], rates: Rates, store=None,
                 model_name: str | None = None) -> dict[str, Evaluation]:
    """Quality and inference cost of each adapter on the same sets, every figure from the model as served.

    ``store`` and ``model_name``: where encoder states are kept
    (``served_probabilities``); without them each encoder still runs once.
    """
    models = load_served_models(adapter_dirs)
    cpu = cpu_seconds_per_1k(models, _sample_texts(sets, PAIR_COST_SAMPLE_ROWS))
    latency = latency_ms(models, _sample_texts(sets, LATENCY_SAMPLE_ROWS))
    probabilities = served_probabilities(models, adapter_dirs, sets, store, model_name)
    digests = {set_name: set_digest(frame) for set_name, frame in sets.items()}
    scored = {}
    for name, model in models.items():
        slices, groups, hits = quality(model, sets, probabilities[name])
        scored[name] = Evaluation(slices, round(cpu[name], 4), round(rates.price(cpu[name]), 8), groups=groups,
                                  correct=hits, latency_ms_p50=round(latency[name][0], 3),
                                  latency_ms_p95=round(latency[name][1], 3),
                                  artifact_bytes=artifact_bytes(adapter_dirs[name]), runtime=model.runtime,
                                  adapter_digest=adapter_digest(adapter_dirs[name]), set_digests=digests,
                                  answers=_answers(model.labels, sets, probabilities[name]))
    return scored


def _answers(labels: Sequence[str], sets: dict[str, pd.DataFrame], probabilities: dict[str, np.ndarray]
             ) -> dict[str, tuple[str, float]]:
    out = {}
    for name, frame in sets.items():
        best = probabilities[name].argmax(axis=1)
        confidence = probabilities[name][np.arange(len(best)), best]
        out |= {text: (labels[i], float(p)) for text, i, p in zip(frame["text"], best, confidence)}
    return out


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(adapter_dir: Path, sets: dict[str, pd.DataFrame], rates: Rates, store=None,
             model_name: str | None = None) -> Evaluation:
    return score_models({"model": adapter_dir}, sets, rates, store, model_name)["model"]


@task(name="evaluate-pair", cache_policy=NO_CACHE)
def evaluate_pair(champion_dir: Path, challenger_dir: Path, sets: dict[str, pd.DataFrame], rates: Rates,
                  store=None, model_name: str | None = None) -> tuple[Evaluation, Evaluation]:
    """Champion and challenger on the same sets, their costs measured in turns."""
    scored = score_models({"champion": champion_dir, "challenger": challenger_dir}, sets, rates, store, model_name)
    return scored["champion"], scored["challenger"]


def accuracy_on(adapter_dir: Path, frames: dict[str, pd.DataFrame]) -> dict[str, float]:
    """Accuracy of one adapter on each named frame: for reports (a scenario's ``external`` sets), never a gate."""
    model, tokenizer = modeling.load_model(adapter_dir), modeling.load_tokenizer(adapter_dir)
    out = {}
    for name, frame in frames.items():
        predicted, _ = modeling.predict(model, tokenizer, frame["text"].tolist())
        out[name] = float(np.mean([p == t for p, t in zip(predicted, frame["label"])])) if len(frame) else 0.0
    return out
