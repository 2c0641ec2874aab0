"""Cascade: build, calibrate and gate a cheap tier that answers the easy traffic in front of the champion.

The student is a linear model over TF-IDF word and character n-grams and
the champion's input embeddings, distilled from the champion's soft outputs on texts production already has
(the replay pool and recent traffic, no new labels). Chosen by measurement
(docs/cascade.md): it costs about 1% of a MiniLM forward pass per text,
where a student with fewer transformer layers would cost a third or more and
leave too little room for the texts it must escalate.

Its threshold is calibrated on a calibration split of those texts that is
never one of the sets that judge it (a text of ``fresh`` or ``golden`` is
removed by its normalised hash before anything is split): the lowest student
margin (``Student.answer``) at which the texts it would answer disagree with
the champion on at most ``max_calibration_disagreement`` of the calibration texts.

The cascade is then gated as a unit, as served (``refit.runtime.cascade``, ONNX
Runtime, one thread, side by side with the champion alone), on the same
golden and fresh sets the promotion gate used: accuracy ratio, worst slice
loss, CPU per 1,000 ratio and the student's share. A refused cascade is not
served; its verdict says which rule refused it and by how much.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from refit.cost import Rates
from refit.data import text_hash
from refit.policy import StrictModel, load_policy
from refit.verdict import RuleVerdict, at_least, at_most, html_page, html_table, markdown_table
from refit.runtime.cascade import (ARTIFACT_DIR, CHAMPION, GUARD_TAG, RUN_TAG, STUDENT, THRESHOLD_TAG, VERDICT_TAG,
                                   CascadeModel, Student, WordVectors, served_by_champion)
from refit.runtime.encoder_states import Outputs, outputs_of

log = logging.getLogger("refit.cascade")
SOFT_TOP_K = 5  # the champion's top labels per text a student learns from, weighted by their probability
# The word vectors' norm against the n-grams' (each vectorizer's rows have norm 1): docs/cascade.md measures it.
WORD_SCALE = 3.0


class CascadePolicy(StrictModel):
    """How a student is calibrated, what its cascade must show to be served, and its live guard."""

    calibration_share: float = Field(gt=0, lt=1, description="Share of the unlabelled texts kept for calibration.")
    min_calibration_texts: int = Field(ge=1, description="Fewer calibration texts: no cascade is built.")
    max_calibration_disagreement: float = Field(
        ge=0, lt=1, description="Share of calibration texts the student may answer differently from the champion.")
    min_accuracy_ratio: float = Field(gt=0, description="Cascade / champion accuracy on each judging set.")
    max_slice_loss: float = Field(ge=0, description="Accuracy any one slice (set/group) may lose, in fractions.")
    min_slice_rows: int = Field(ge=1, description="Smaller slices are reported but not judged.")
    max_cost_ratio: float = Field(gt=0, description="Cascade / champion inference CPU per 1,000, as served.")
    min_student_share: float = Field(ge=0, le=1, description="Share of the judged texts the student must answer.")
    max_share_drop: float = Field(ge=0, le=1, description="Live guard: the student's share may fall this far "
                                  "below its gated share before the champion serves alone.")
    guard_min_texts: int = Field(ge=1, description="Live guard: texts served before the share is judged.")
    student_c: float = Field(gt=0, description="Inverse regularisation of the student's logistic regression.")


def load_cascade_policy(name_or_path: str = "cascade") -> tuple[CascadePolicy, Path]:
    return load_policy(CascadePolicy, name_or_path)


# --- the student ------------------------------------------------------------------------------------------------

# An n-gram in fewer texts than this is dropped: it cannot teach the student much, and it makes every solver step
# dearer. Measured on clinc-three-shifts-trickle's bootstrap and first update (docs/cascade.md): features 23,870 ->
# 9,172 and 25,525 -> 9,832, fit 27.0 -> 12.2 and 21.6 -> 9.5 CPU-s, golden student share 0.753 -> 0.762 and
# 0.727 -> 0.739 at the same 1% calibration disagreement.
MIN_DF = 3


def vectorizers():
    from sklearn.feature_extraction.text import TfidfVectorizer

    return (TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, lowercase=True, min_df=MIN_DF),
            TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, lowercase=True,
                            min_df=MIN_DF))


def fit_student(texts: Sequence[str], teacher: np.ndarray, labels: Sequence[str], c: float,
                top_k: int = SOFT_TOP_K, champion=None) -> Student:
    """Distil the champion's probabilities ``teacher`` (texts x labels) into a logistic regression.

    Features: TF-IDF n-grams and, given the served ``champion``, the mean of
    its input embeddings over each text's pieces (``WordVectors``). Each
    text's soft targets: its ``top_k`` labels, weighted by the champion's
    probability of them, fitted by ``refit.distill``.
    """
    from scipy.sparse import hstack

    from refit.distill import fit_soft_logistic, soft_targets

    fitted = vectorizers()
    features = hstack([v.fit_transform(list(texts)) for v in fitted], format="csr")  # each text analysed once
    words = WordVectors.of(getattr(champion, "model", None), getattr(champion, "tokenizer", None), WORD_SCALE)
    student = Student(tuple(labels), fitted, np.zeros((len(labels), 0)), np.zeros(len(labels)), words)
    taught, weights, biases = fit_soft_logistic(features, soft_targets(teacher, top_k), c,
                                                dense=student.dense(texts))
    coef = np.zeros((len(labels), weights.shape[1]), dtype=np.float32)
    intercept = np.full(len(labels), -1e4, dtype=np.float32)  # a label no text was taught: never the student's
    coef[taught] = weights
    intercept[taught] = biases
    return Student(tuple(labels), fitted, coef, intercept, words)


def calibrate(student_labels: Sequence[str], student_score: np.ndarray, champion_labels: Sequence[str],
              max_disagreement: float) -> float:
    """The lowest student score (``Student.answer``) whose answers disagree with the champion on few enough texts.

    Texts at or above the threshold are answered by the student; what the
    cascade can lose against the champion is at most their disagreements,
    counted over all calibration texts. Returns ``inf`` (the student never
    answers) when even its surest answer breaks the limit.
    """
    conf = np.asarray(student_score, dtype=np.float64)
    if len(conf) == 0:
        return float("inf")
    disagree = np.array([s != c for s, c in zip(student_labels, champion_labels)], dtype=np.float64)
    order = np.argsort(-conf, kind="stable")
    lost = np.cumsum(disagree[order]) / len(conf)
    sorted_conf = conf[order]
    # Cut only between distinct confidences: every text with the threshold's confidence is answered.
    last_of_tie = np.append(sorted_conf[1:] != sorted_conf[:-1], True)
    ok = np.flatnonzero((lost <= max_disagreement) & last_of_tie)
    return float(sorted_conf[ok[-1]]) if len(ok) else float("inf")


def split_for_calibration(texts: Sequence[str], judging: Sequence[str], share: float,
                          seed: int = 0) -> tuple[list[str], list[str]]:
    """Unique texts, minus every text of the judging sets (by normalised hash), split into fit and calibration.

    The split is by hash, so a text keeps its side across runs.
    """
    banned = {text_hash(t) for t in judging}
    seen, kept = set(), []
    for text in texts:
        key = text_hash(text)
        if key in banned or key in seen or not str(text).strip():
            continue
        seen.add(key)
        kept.append(str(text))
    cut = int(share * 1000)
    calibration = [t for t in kept if int(text_hash(f"{seed}:{t}")[:8], 16) % 1000 < cut]
    chosen = set(calibration)
    return [t for t in kept if t not in chosen], calibration


# --- the gate ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CascadeVerdict(RuleVerdict):
    """Whether the cascade is served: every rule with its result, the student's threshold, or why none was built."""

    threshold: float
    error: str = ""  # why no cascade could be built at all

    PASSED = "serve the cascade: all rules passed"
    REFUSED = "champion alone"

    @property
    def summary(self) -> str:
        if not self.passed and self.error:
            return f"champion alone: the cascade could not be built ({self.error})"
        return super().summary

    def to_dict(self) -> dict:
        return {"passed": self.passed, "summary": self.summary, "threshold": self.threshold, "error": self.error,
                "rules": self.rule_dicts()}

    def markdown(self) -> str:
        return f"**Cascade verdict: {self.summary}** (threshold {self.threshold:.4f})\n\n{markdown_table(self.rules)}"


@dataclass(frozen=True)
class TierFigures:
    """One way of serving (champion alone, or the cascade) measured on the judging sets."""

    accuracy: dict[str, float]  # per set
    groups: dict[str, tuple[int, float]]  # "<set>/<group>" -> (rows, accuracy)
    student_share: dict[str, float]  # per set (0 for the champion alone)
    cpu_seconds_per_1k: float
    latency_ms_p95: float

    def to_dict(self) -> dict:
        return asdict(self)


def judge(champion: TierFigures, cascade: TierFigures, threshold: float, policy: CascadePolicy) -> CascadeVerdict:
    """Every rule of ``policy`` for the cascade against the champion alone, on every judging set."""
    rules = []
    for name, accuracy in champion.accuracy.items():
        ratio = cascade.accuracy[name] / accuracy if accuracy else 1.0
        rules.append(at_least(f"{name}_accuracy_ratio", ratio, policy.min_accuracy_ratio))
    losses = {g: champion.groups[g][1] - acc for g, (rows, acc) in cascade.groups.items()
              if g in champion.groups and rows >= policy.min_slice_rows}
    if losses:
        worst = max(losses, key=losses.get)
        rules.append(at_most(f"worst_slice_loss ({worst})", losses[worst], policy.max_slice_loss))
    cost = cascade.cpu_seconds_per_1k / champion.cpu_seconds_per_1k if champion.cpu_seconds_per_1k else float("inf")
    rules.append(at_most("cpu_per_1k_ratio", cost, policy.max_cost_ratio))
    shares = cascade.student_share
    rules.append(at_least("student_share", min(shares.values()) if shares else 0.0, policy.min_student_share))
    return CascadeVerdict(all(r.passed for r in rules), rules, threshold)


def worst_slice_loss(champion: TierFigures, cascade: TierFigures, min_rows: int = 1) -> float:
    losses = [champion.groups[g][1] - acc for g, (rows, acc) in cascade.groups.items()
              if g in champion.groups and rows >= min_rows]
    return round(max(losses), 6) if losses else 0.0


# --- measuring as served ----------------------------------------------------------------------------------------

Answers = dict[str, tuple[list[str], np.ndarray, list[str]]]  # per set: labels, confidences, tiers


def served_answers(model, sets: dict[str, pd.DataFrame], workers: int = 1) -> Answers:
    """What a served model or cascade answers on each set, and which tier answered (bulk: meters nothing)."""
    answers = {}
    for name, frame in sets.items():
        texts = frame["text"].tolist()
        if isinstance(model, CascadeModel):
            answers[name] = model.predict_tiers(texts, workers=workers)
        else:
            labels, confidence = model.predict(texts, workers=workers) if workers > 1 else model.predict(texts)
            answers[name] = (list(labels), np.asarray(confidence), served_by_champion(texts))
    return answers


def figures(model, sets: dict[str, pd.DataFrame], cpu_per_1k: float, p95: float,
            answers: Answers | None = None) -> TierFigures:
    """Accuracy per set and per group slice, and the student's share, of a served model or cascade.

    ``answers``: what it answered on ``sets`` (``served_answers``), when already known.
    """
    answers = answers if answers is not None else served_answers(model, sets)
    accuracy, groups, shares = {}, {}, {}
    for name, frame in sets.items():
        predicted, _, tiers = answers[name]
        if isinstance(model, CascadeModel):
            shares[name] = float(np.mean([t == STUDENT for t in tiers])) if tiers else 0.0
        correct = np.array([p == t for p, t in zip(predicted, frame["label"])], dtype=np.float64)
        accuracy[name] = float(correct.mean()) if len(correct) else 0.0
        if "group" in frame.columns:
            for group, rows in frame.groupby("group", sort=True).indices.items():
                groups[f"{name}/{group}"] = (len(rows), float(correct[rows].mean()))
    return TierFigures(accuracy, groups, shares, round(cpu_per_1k, 4), round(p95, 3))


def judged_figures(evaluation, champion, adapter_dir: Path | None, sets: dict[str, pd.DataFrame],
                   cpu_per_1k: float, p95: float) -> TierFigures | None:
    """The champion's figures from the evaluation that judged it for promotion, if it judged this model here.

    The evaluation scored the same adapter on the same sets, served the same
    way (``tasks.evaluate.load_served_models``): its per-set and per-slice accuracies are
    the ones ``figures`` would measure again. None (measure them) when any
    of that cannot be shown: another adapter, another set, another runtime.
    """
    from tasks.evaluate import adapter_digest, set_digest

    if evaluation is None or adapter_dir is None:
        return None
    why = ("another runtime" if evaluation.runtime != champion.runtime
           else "another adapter" if evaluation.adapter_digest != adapter_digest(adapter_dir)
           else "other sets" if evaluation.set_digests != {name: set_digest(f) for name, f in sets.items()}
           else "")
    if why:
        log.info("the champion's figures are measured again: the evaluation given judged %s", why)
        return None
    groups = {name: (m.rows, m.accuracy) for name, m in evaluation.groups.items()}
    return TierFigures({name: evaluation.slices[name].accuracy for name in sets}, groups, {}, round(cpu_per_1k, 4),
                       round(p95, 3))


@dataclass(frozen=True)
class Measured:
    """Champion alone and the cascade on the judging sets, and what the cascade answered there."""

    champion: TierFigures
    cascade: TierFigures
    answers: Answers  # the cascade's, per set
    champion_from_evaluation: bool  # the champion's accuracies are those of the evaluation that judged it


def measure(champion, cascade: CascadeModel, sets: dict[str, pd.DataFrame], cost_texts: list[str],
            latency_texts: list[str], evaluation=None, adapter_dir: Path | None = None) -> Measured:
    """Champion alone and the cascade, side by side on one thread (``tasks.evaluate``'s meters).

    Cost and latency are measured in turns on the same sample, as served.
    The cascade answers every judged text as served; where ``evaluation``
    judged this champion on these sets (``judged_figures``), the champion's
    accuracies are the evaluation's, and so are its answers to the texts the
    student escalates (``CascadeModel.answers_given``); else it runs again.
    """
    from refit.processes import available_cpus
    from tasks.evaluate import cpu_seconds_per_1k, latency_ms

    models = {CHAMPION: champion, "cascade": cascade}
    cpu = cpu_seconds_per_1k(models, cost_texts)
    latency = latency_ms(models, latency_texts)
    workers = available_cpus()
    judged = judged_figures(evaluation, champion, adapter_dir, sets, cpu[CHAMPION], latency[CHAMPION][1])
    before = judged or figures(champion, sets, cpu[CHAMPION], latency[CHAMPION][1],
                               served_answers(champion, sets, workers))
    answers = (served_answers(cascade, sets, workers) if judged is None else  # the champion's answers are known
               {name: cascade.answers_given(frame["text"].tolist(), evaluation.answers) for name, frame in sets.items()})
    return Measured(before, figures(cascade, sets, cpu["cascade"], latency["cascade"][1], answers), answers,
                    judged is not None)


def champion_outputs(champion, texts: list[str], kept: dict[str, np.ndarray] | None = None) -> Outputs:
    """The served champion's probabilities for ``texts`` and each text's encoder state.

    A text whose state was kept for this champion's encoder (an update that
    trained the head alone keeps the encoder) is answered by the head on it
    (``refit.runtime.encoder_states.outputs_of``); the others run the
    forward pass, batches sorted by length as served, on every available
    core (bulk work that meters nothing). The states are kept for the next
    update, which trains the head on them.
    """
    from refit.processes import available_cpus

    return outputs_of(champion, texts, kept, workers=available_cpus())


@dataclass
class CascadeBuild:
    """A cascade built and judged (not yet logged)."""

    cascade: CascadeModel | None
    verdict: CascadeVerdict
    champion: TierFigures | None
    figures: TierFigures | None
    fit_texts: int
    calibration_texts: list[str]
    calibration_agreement: float
    state_texts: list[str] = field(default_factory=list)  # the texts the champion was run on, and their states
    states: np.ndarray | None = None
    reused_states: int = 0  # texts whose kept encoder state stood in for the champion's pass
    answers: Answers = field(default_factory=dict)  # the cascade's answers on each judging set
    champion_from_evaluation: bool = False  # the champion's accuracies are the evaluation's


def build(champion, pool_texts: Sequence[str], recent_texts: Sequence[str], sets: dict[str, pd.DataFrame],
          policy: CascadePolicy, seed: int = 0, cost_texts: list[str] | None = None,
          latency_texts: list[str] | None = None, kept: dict[str, np.ndarray] | None = None,
          evaluation=None, adapter_dir: Path | None = None) -> CascadeBuild:
    """Distil, calibrate and judge a cascade in front of the served ``champion``; nothing is logged.

    ``kept``: encoder states of the champion's encoder (``champion_outputs``);
    ``evaluation`` and ``adapter_dir``: the evaluation that judged this
    champion on ``sets``, and its adapter (``judged_figures``).
    """
    from tasks.evaluate import COST_SAMPLE_ROWS, LATENCY_SAMPLE_ROWS, tier_sample

    judging = [t for frame in sets.values() for t in frame["text"]]
    fit, calibration = split_for_calibration(list(pool_texts) + list(recent_texts), judging,
                                             policy.calibration_share, seed)
    if len(calibration) < policy.min_calibration_texts or not fit:
        rule = at_least("calibration_texts", len(calibration), policy.min_calibration_texts)
        return CascadeBuild(None, CascadeVerdict(False, [rule], float("inf")), None, None, len(fit), calibration, 0.0)
    taught = champion_outputs(champion, fit + calibration, kept)
    teacher, calibration_proba = taught.probabilities[: len(fit)], taught.probabilities[len(fit) :]
    student = fit_student(fit, teacher, champion.labels, policy.student_c, champion=champion)
    champion_labels = [champion.labels[i] for i in calibration_proba.argmax(axis=1)]
    student_labels, _, student_score = student.answer(calibration)
    threshold = calibrate(student_labels, student_score, champion_labels, policy.max_calibration_disagreement)
    agreement = float(np.mean([s == c for s, c in zip(student_labels, champion_labels)]))
    cascade = CascadeModel(champion, student, threshold)
    judged = list(dict.fromkeys(judging))
    answered = student.answer(judged)[2] >= threshold if judged else np.zeros(0, dtype=bool)
    measured = measure(champion, cascade, sets, cost_texts or tier_sample(judged, answered, COST_SAMPLE_ROWS, seed),
                       latency_texts or tier_sample(judged, answered, LATENCY_SAMPLE_ROWS, seed), evaluation,
                       adapter_dir)
    verdict = judge(measured.champion, measured.cascade, threshold, policy)
    return CascadeBuild(cascade, verdict, measured.champion, measured.cascade, len(fit), calibration, agreement,
                        fit + calibration, taught.states, taught.reused, measured.answers,
                 measured.champion_from_evaluation)


# --- the one call the flows make -------------------------------------------------------------------------------

def _html(title: str, verdict: CascadeVerdict, result: dict) -> str:
    facts = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                    for k, v in result.items() if not isinstance(v, dict))
    return html_page(title, verdict.summary, html_table(verdict.rules) + f"<table>{facts}</table>")


def build_cascade(model_name: str, version: int, adapter_dir: Path, pool: pd.DataFrame, recent_texts: Sequence[str],
                  sets: dict[str, pd.DataFrame], rates: Rates, experiment_id: str, policy: str = "cascade",
                  seed: int = 0, store=None, evaluation=None) -> dict:
    """Build, calibrate and gate the cascade of a registered version, and record it in MLflow.

    Called by the flows after a promotion (and after bootstrap or adopt
    registers v1). Logs a ``cascade`` run (nested under the active run, if
    any) holding the student, ``cascade.json`` and ``cascade.html``, and tags
    the version with the verdict, threshold and figures: what ``refit serve``
    reads to decide whether to serve the cascade. Never raises for a
    cascade that cannot be built: the verdict says why, and the champion
    serves alone.

    Args:
        model_name: registered model.
        version: the version just promoted.
        adapter_dir: its adapter (local directory).
        pool: the replay pool (a ``text`` column; labels are not used).
        recent_texts: recent unlabelled traffic.
        sets: the judging sets (``golden`` and, after an update, ``fresh``): never fitted or calibrated on.
        rates: prices, for cost per 1,000 in USD.
        experiment_id: MLflow experiment of the run.
        policy: cascade policy name or YAML path.
        seed: of the calibration split.
        store: where the champion's encoder states are kept for the next
            update (``refit.runtime.encoder_states``), and read back where
            this champion's encoder already has some (a head-only update
            keeps its parent's encoder); None keeps and reads none.
        evaluation: the ``tasks.evaluate.Evaluation`` that judged this
            version on ``sets`` for promotion; the champion's accuracies are
            taken from it instead of a second pass (only when it scored the
            same adapter files on the same sets with the same runtime).
    """
    from registry import versions

    rules, rules_path = load_cascade_policy(policy)
    built = _build_or_explain(model_name, version, Path(adapter_dir), pool, recent_texts, sets, rules, seed, store,
                              evaluation)
    verdict = built.verdict
    kept = keep_states(store, model_name, Path(adapter_dir), built)
    if verdict.passed and store is not None:
        try:
            serve_reference(store, model_name, version, built.cascade, built.answers, sets)
        except Exception:  # noqa: BLE001 - the monitor then compares with the champion's columns, as before
            log.exception("the drift reference of %s v%d keeps the champion's predictions only", model_name, version)
    result = _result(model_name, version, built, kept, rules, rates)
    result["run_id"] = _log_run(model_name, version, built, result, rules, rules_path, experiment_id)
    versions.set_tags(model_name, version, _version_tags(verdict, result, rules, rules_path))
    log.info("cascade of %s v%d: %s", model_name, version, verdict.summary)
    return result


def _build_or_explain(model_name: str, version: int, adapter_dir: Path, pool: pd.DataFrame,
                      recent_texts: Sequence[str], sets: dict[str, pd.DataFrame], rules: CascadePolicy, seed: int,
                      store, evaluation) -> CascadeBuild:
    """``build`` on the served champion; a build that raises becomes a refused verdict that says why."""
    from tasks.evaluate import load_served_models

    try:
        champion = load_served_models({CHAMPION: adapter_dir})[CHAMPION]
        return build(champion, pool["text"].tolist(), list(recent_texts), sets, rules, seed,
                     kept=kept_states(store, model_name, adapter_dir), evaluation=evaluation, adapter_dir=adapter_dir)
    except Exception as exc:  # noqa: BLE001 - a cascade is an optimisation: its failure never blocks the champion
        log.exception("cascade of %s v%d could not be built", model_name, version)
        return CascadeBuild(None, CascadeVerdict(False, [], float("inf"), f"{type(exc).__name__}: {exc}"[:500]),
                            None, None, 0, [], 0.0)


def _result(model_name: str, version: int, built: CascadeBuild, kept: int, rules: CascadePolicy,
            rates: Rates) -> dict:
    """What ``build_cascade`` returns and logs: the verdict, the build's counts and, if measured, the figures."""
    verdict = built.verdict
    result = {"model_name": model_name, "version": version, "passed": verdict.passed, "verdict": verdict.summary,
              "threshold": verdict.threshold, "fit_texts": built.fit_texts,
              "calibration_texts": len(built.calibration_texts),
              "calibration_agreement": round(built.calibration_agreement, 4), "encoder_states_kept": kept,
              "encoder_states_reused": built.reused_states,
              "champion_figures_from_evaluation": built.champion_from_evaluation}
    if built.figures is not None:
        champ, casc = built.champion, built.figures
        result |= {
            "cost_ratio": round(casc.cpu_seconds_per_1k / champ.cpu_seconds_per_1k, 4),
            "accuracy_ratio": round(min(casc.accuracy[s] / champ.accuracy[s] if champ.accuracy[s] else 1.0
                                        for s in champ.accuracy), 4),
            "student_share": round(min(casc.student_share.values()), 4),
            "worst_slice_loss": worst_slice_loss(champ, casc, rules.min_slice_rows),
            "champion_cpu_seconds_per_1k": champ.cpu_seconds_per_1k,
            "cascade_cpu_seconds_per_1k": casc.cpu_seconds_per_1k,
            "champion_cost_per_1k_usd": round(rates.price(champ.cpu_seconds_per_1k), 8),
            "cascade_cost_per_1k_usd": round(rates.price(casc.cpu_seconds_per_1k), 8),
            "champion": champ.to_dict(), "cascade": casc.to_dict()}
    return result


def _log_run(model_name: str, version: int, built: CascadeBuild, result: dict, rules: CascadePolicy,
             rules_path: Path, experiment_id: str) -> str:
    """The ``cascade`` run (nested under the active run, if any): policy, figures, student, JSON and HTML; its id."""
    import tempfile

    import mlflow

    from registry.tracking import RUN_TYPE, log_json, log_policy

    verdict = built.verdict
    nested = mlflow.active_run() is not None
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"cascade v{version}", nested=nested,
                          tags={RUN_TYPE: "cascade", "refit.model": model_name, "refit.version": str(version)}) as run:
        log_policy(rules_path)
        mlflow.log_params({f"cascade.{k}": v for k, v in rules.model_dump().items()})
        mlflow.log_metrics({k: float(v) for k, v in result.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)}
                           | {"passed": float(verdict.passed)})
        if built.cascade is not None:
            with tempfile.TemporaryDirectory(prefix="refit-student-") as directory:
                mlflow.log_artifacts(str(built.cascade.student.save(Path(directory))), ARTIFACT_DIR)
        log_json(verdict.to_dict() | result, f"{ARTIFACT_DIR}/cascade.json")
        mlflow.log_text(_html(f"Cascade: {model_name} v{version}", verdict, result), f"{ARTIFACT_DIR}/cascade.html")
    return run.info.run_id


def _version_tags(verdict: CascadeVerdict, result: dict, rules: CascadePolicy, rules_path: Path) -> dict[str, str]:
    """The version's cascade tags: what ``refit serve`` reads to decide whether to serve the cascade."""
    from refit.policy import file_hash

    tags = {VERDICT_TAG: "passed" if verdict.passed else "refused", "refit.cascade_reasons": verdict.summary[:5000],
            THRESHOLD_TAG: repr(verdict.threshold), RUN_TAG: result["run_id"],
            "refit.cascade_policy_hash": file_hash(rules_path),
            GUARD_TAG: json.dumps({"max_share_drop": rules.max_share_drop, "guard_min_texts": rules.guard_min_texts})}
    for key in ("cost_ratio", "accuracy_ratio", "student_share", "worst_slice_loss", "champion_cpu_seconds_per_1k",
                "cascade_cpu_seconds_per_1k"):
        if key in result:
            tags[f"refit.cascade_{key.removeprefix('cascade_')}"] = str(result[key])
    return tags


def kept_states(store, model_name: str, adapter_dir: Path) -> dict[str, np.ndarray] | None:
    """The encoder states kept for this adapter's encoder (None: no store, or none kept); a cache, never an error."""
    from refit.runtime.encoder_states import EncoderStates

    if store is None:
        return None
    try:
        return EncoderStates.of(store, model_name, adapter_dir).load() or None
    except Exception:  # noqa: BLE001 - a miss costs the forward pass, never the build
        log.exception("encoder states of %s not read", model_name)
        return None


def keep_states(store, model_name: str, adapter_dir: Path, built: CascadeBuild) -> int:
    """Keep the encoder states the build's passes returned, for the next update; the rows kept (0: none).

    A cache: a failure to write is logged and costs the next update its forward pass, never this build.
    """
    from refit.runtime.encoder_states import EncoderStates

    if store is None or built.states is None or not built.state_texts:
        return 0
    return EncoderStates.of(store, model_name, adapter_dir).keep(built.state_texts, built.states)


def serve_reference(store, model_name: str, version: int, cascade: CascadeModel, answers: Answers | None = None,
                    sets: dict[str, pd.DataFrame] | None = None) -> None:
    """Add to the version's drift reference what its cascade answers on the reference texts.

    The monitor compares a window the cascade served with these columns
    (``tasks.drift.reference_as_served``), so the cheap tier's own
    confidences are not read as drift. A version with no reference yet is
    left alone. The reference's texts are drawn from the judging sets, and
    what the cascade answered there (``answers`` on ``sets``) is reused;
    any other text is answered now.
    """
    from tasks.deploy import reference_prefix
    from tasks.drift import SERVED_COLUMNS

    key = reference_prefix(model_name, version) + "sample.parquet"
    if not store.exists(key):
        return
    sample = store.get_parquet(key)
    known = {}
    for name, (labels, confidence, tiers) in (answers or {}).items():
        for text, label, conf, tier in zip((sets or {})[name]["text"], labels, confidence, tiers):
            known[text] = (label, float(conf), tier)
    texts = sample["text"].tolist()
    missing = [t for t in dict.fromkeys(texts) if t not in known]
    if missing:
        for text, label, conf, tier in zip(missing, *cascade.predict_tiers(missing)):
            known[text] = (label, float(conf), tier)
    labels, confidence, tiers = zip(*(known[t] for t in texts)) if texts else ((), (), ())
    store.put_parquet(key, sample.assign(**{SERVED_COLUMNS["predicted_label"]: list(labels),
                                            SERVED_COLUMNS["confidence"]: np.asarray(confidence, dtype=float),
                                            "served_by": list(tiers)}))


@task(name="cascade", cache_policy=NO_CACHE)
def cascade(model_name: str, version: int, adapter_dir: Path, pool: pd.DataFrame, recent_texts: Sequence[str],
            sets: dict[str, pd.DataFrame], rates: Rates, experiment_id: str, policy: str = "cascade",
            store=None, evaluation=None) -> dict:
    return build_cascade(model_name, version, adapter_dir, pool, recent_texts, sets, rates, experiment_id, policy,
                         store=store, evaluation=evaluation)
