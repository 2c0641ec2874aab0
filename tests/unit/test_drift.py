"""Drift checks on real CLINC150 text: quiet windows stay quiet, shifted ones fire.

True intents stand in for the model's predicted labels and a uniform random
number for its confidence, so the tests need no trained model: they test the
check's logic. How well it detects drift with a real champion is
``refit bench drift``'s to measure.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from refit.errors import RefitError
from tasks.drift import (
    DriftPolicy,
    check_drift,
    label_shift,
    load_drift_policy,
    measure_drift,
    sample_frame,
)

HOME_DOMAINS = ["banking", "credit_cards", "kitchen_and_dining", "home", "auto_and_commute"]


@cache
def _load_clinc(directory: Path) -> pd.DataFrame:
    """Every CLINC150 row, all splits pooled: text, intent and its domain (``oos`` for out-of-scope)."""
    raw = json.loads((directory / "data_full.json").read_text())
    domain_of = {intent: domain for domain, intents in json.loads((directory / "domains.json").read_text()).items()
                 for intent in intents}
    domain_of["oos"] = "oos"
    rows = [(text, intent, domain_of[intent]) for split in raw.values() for text, intent in split]
    return pd.DataFrame(rows, columns=["text", "intent", "domain"])


@pytest.fixture(scope="module")
def clinc(data_dir) -> pd.DataFrame:
    return _load_clinc(data_dir)


@pytest.fixture(scope="module")
def policy() -> DriftPolicy:
    return load_drift_policy()[0]


def _as_served(frame: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    return pd.DataFrame({
        "text": frame["text"].to_numpy(),
        "predicted_label": frame["intent"].to_numpy(),
        "confidence": rng.uniform(0.6, 1.0, len(frame)),
    })


def windows(clinc: pd.DataFrame, seed: int, shifted_share: float = 0.0, focus_domains: tuple[str, ...] = (),
            focus_share: float = 0.0, n_reference: int = 1000,
            n_current: int = 800) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A reference from the five home domains plus oos, and a window of other texts.

    ``shifted_share`` of the window comes from the five other domains and
    ``focus_share`` from ``focus_domains`` alone; the rest is drawn like the
    reference.
    """
    rng = np.random.default_rng(seed)
    home = clinc[clinc["domain"].isin(HOME_DOMAINS + ["oos"])]
    other = clinc[~clinc["domain"].isin(HOME_DOMAINS + ["oos"])]
    reference = home.iloc[rng.choice(len(home), n_reference, replace=False)]
    rest = home.drop(reference.index)
    focus = rest[rest["domain"].isin(focus_domains)]
    focused = focus.iloc[rng.choice(len(focus), round(focus_share * n_current), replace=False)]
    rest = rest.drop(focused.index)
    n_shifted = round(shifted_share * n_current)
    current = pd.concat([
        focused,
        rest.iloc[rng.choice(len(rest), n_current - len(focused) - n_shifted, replace=False)],
        other.iloc[rng.choice(len(other), n_shifted, replace=False)],
    ]).sample(frac=1.0, random_state=seed)
    return _as_served(reference, rng), _as_served(current, rng)


def test_window_from_the_same_domains_is_not_drift(clinc, policy):
    reference, current = windows(clinc, seed=0)

    result = measure_drift(reference, current, policy)

    assert set(result.signals) >= {"text", "prediction", "confidence"}
    assert not any(s.drifted for s in result.signals.values()), result.to_dict()
    assert (result.drift_detected, result.severity) == (False, "none")
    assert (result.rows_reference, result.rows_current, result.rows_sampled) == (1000, 800, 800)
    assert result.sample_method == "all"


def test_forty_percent_from_other_domains_fires_the_text_signal(clinc, policy):
    reference, current = windows(clinc, seed=1, shifted_share=0.4)

    result = measure_drift(reference, current, policy)

    text = result.signals["text"]
    assert text.drifted and text.direction == "above" and text.value > text.threshold, result.to_dict()
    assert result.drift_detected
    assert result.severity == "high"


def test_thirty_percent_from_other_domains_is_detected(clinc, policy):
    reference, current = windows(clinc, seed=2, shifted_share=0.3)

    assert measure_drift(reference, current, policy).drift_detected


def test_prediction_signal_fires_on_a_label_mix_shift(clinc, policy):
    reference, current = windows(clinc, seed=3, focus_domains=("banking", "credit_cards"), focus_share=0.7)

    result = measure_drift(reference, current, policy)

    prediction = result.signals["prediction"]
    assert prediction.drifted and prediction.value > prediction.threshold, result.to_dict()
    assert result.drift_detected


def test_label_shift_is_near_zero_for_chance_and_large_for_new_labels():
    rng = np.random.default_rng(0)
    labels = [f"intent_{i}" for i in range(76)]
    reference = pd.Series(rng.choice(labels, 1000))
    same_mix = pd.Series(rng.choice(labels, 500))
    half_new = pd.concat([pd.Series(rng.choice(labels, 250)), pd.Series(rng.choice(["new_a", "new_b"], 250))])

    assert abs(label_shift(reference, same_mix)) < 0.05
    assert label_shift(reference, half_new) > 0.25


@pytest.mark.parametrize("side", ["reference", "current"])
def test_missing_text_column_raises(clinc, policy, side):
    reference, current = windows(clinc, seed=5)
    frames = {"reference": reference, "current": current}
    frames[side] = frames[side].drop(columns="text")

    with pytest.raises(RefitError, match="has no column 'text'"):
        measure_drift(frames["reference"], frames["current"], policy)


def test_signals_without_their_columns_are_skipped(clinc, policy):
    reference, current = windows(clinc, seed=6)

    result = measure_drift(reference[["text"]], current, policy)

    # only the signals that need nothing but text remain
    assert set(result.signals) == {"text", "descriptor_length"}
    with_embedding = _enabled(policy, "embedding")
    assert set(measure_drift(reference[["text"]], current, with_embedding).signals) == {
        "text", "descriptor_length", "embedding"}


def test_window_above_the_sample_limit_is_sampled_by_label(clinc, policy):
    reference, _ = windows(clinc, seed=7)
    home = clinc[clinc["domain"].isin(HOME_DOMAINS + ["oos"])]
    big = _as_served(home.iloc[:3000], np.random.default_rng(7))

    result = measure_drift(reference, big, policy)

    assert (result.rows_current, result.rows_sampled) == (3000, policy.max_sample_rows)
    assert result.sample_method == f"stratified by predicted_label, seed {policy.seed} (current 3000 -> 1000)"
    sample = sample_frame(big, policy.max_sample_rows, policy.seed, "predicted_label")
    expected = big["predicted_label"].value_counts() * policy.max_sample_rows / len(big)
    got = sample["predicted_label"].value_counts().reindex(expected.index, fill_value=0)
    assert len(sample) == policy.max_sample_rows
    assert (got - expected).abs().max() < 1
    assert sample.equals(sample_frame(big, policy.max_sample_rows, policy.seed, "predicted_label"))
    assert not sample.equals(sample_frame(big, policy.max_sample_rows, policy.seed + 1, "predicted_label"))


def test_result_serialises_without_the_report(clinc, policy):
    reference, current = windows(clinc, seed=8, shifted_share=0.4)

    result = check_drift.fn(reference, current, policy)

    verdict = json.loads(json.dumps(result.to_dict()))
    assert "report_html" not in verdict
    assert verdict["signals"]["text"]["direction"] == "above"
    assert "Evidently" in result.report_html and "Embedding novelty (refit)" in result.report_html
    assert check_drift.name == "drift"
    assert measure_drift(reference, current, policy, report=False).report_html == ""


def test_shipped_policy_loads():
    policy, path = load_drift_policy()
    assert path.name == "drift.yaml"
    assert policy.min_window_rows <= policy.max_sample_rows


@pytest.mark.parametrize("edit, field", [
    (lambda raw: raw.update(max_rows=5), "max_rows"),
    (lambda raw: raw["text"].update(treshold=0.2), "text.treshold"),
    (lambda raw: raw["prediction"].update(method="ks"), "prediction.method"),
])
def test_policy_file_with_an_unknown_key_or_method_fails(tmp_path, edit, field):
    import yaml

    raw = yaml.safe_load(load_drift_policy()[1].read_text())
    edit(raw)
    path = tmp_path / "drift.yaml"
    path.write_text(yaml.safe_dump(raw))

    with pytest.raises(RefitError, match=field.replace(".", r"\.")):
        load_drift_policy(path)


EXTRA_SIGNALS = ("embedding", "descriptor_length", "descriptor_oov", "descriptor_non_letter", "performance",
                 "confidence_drop", "low_confidence", "performance_estimate")
CHAMPION_SIGNALS = ("confidence_drop", "low_confidence", "performance_estimate")


def _enabled(policy: DriftPolicy, *names: str, **changes) -> DriftPolicy:
    return policy.model_copy(update={n: getattr(policy, n).model_copy(update={"enabled": True} | changes)
                                     for n in names})


def _labelled(frame: pd.DataFrame, wrong_share: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """``label`` is the true intent; ``wrong_share`` of predictions are swapped for another row's."""
    out = frame.assign(label=frame["predicted_label"])
    rng = np.random.default_rng(seed)
    wrong = rng.choice(len(out), round(wrong_share * len(out)), replace=False)
    predicted = out["predicted_label"].to_numpy().copy()
    predicted[wrong] = np.roll(predicted[wrong], 1)
    return out.assign(predicted_label=predicted)


def test_shipped_policy_counts_only_the_performance_estimate_of_the_champion_signals(policy):
    assert {n for n in EXTRA_SIGNALS if getattr(policy, n).enabled} == {
        "descriptor_length", "performance", *CHAMPION_SIGNALS}
    assert {n for n in EXTRA_SIGNALS if getattr(policy, n).counts_toward_verdict} == {"performance_estimate"}
    assert policy.text.method == "embedding_novelty"
    # no threshold of a counted signal is a number measured on one data set: each comes from the reference
    assert {n for n in ("text", "prediction", *CHAMPION_SIGNALS) if getattr(policy, n).threshold == "calibrated"} \
        == {"text", "prediction", *CHAMPION_SIGNALS}


def test_every_extra_signal_is_reported_and_none_changes_a_quiet_verdict(clinc, policy):
    reference, current = windows(clinc, seed=0)

    result = measure_drift(_labelled(reference), _labelled(current), _enabled(policy, *EXTRA_SIGNALS))

    assert set(result.signals) == {"text", "prediction", "confidence", *EXTRA_SIGNALS}
    verdict = json.loads(json.dumps(result.to_dict()))
    for name in EXTRA_SIGNALS:
        signal = verdict["signals"][name]
        assert set(signal) >= {"value", "threshold", "drifted"} and not signal["counts_toward_verdict"]
        assert not signal["drifted"], verdict
    assert (result.drift_detected, result.severity) == (False, "none")
    performance = result.signals["performance"].details
    assert performance["accuracy_reference"] == performance["accuracy_current"] == 1.0
    assert performance["macro_f1_current"] == 1.0
    estimate = result.signals["performance_estimate"].details
    # every reference prediction is right, so CBPE maps every confidence to a hit rate of 1
    assert estimate["reference_accuracy"] == estimate["estimated_accuracy_current"] == 1.0
    assert -0.4 < estimate["reference_calibration_gap"] < -0.1  # confidences are uniform on 0.6-1.0
    assert estimate["reference_scored_on"] == "training or unknown"
    # the report shows every signal Evidently measured, descriptors included
    assert "Drift in column descriptor_length" in result.report_html or "descriptor_length" in result.report_html.split(
        "Embedding novelty")[-1], "descriptor_length missing from the report"


def test_embedding_signal_is_larger_on_a_shifted_window(clinc, policy):
    only_embedding = _enabled(policy, "embedding")
    quiet = measure_drift(*windows(clinc, seed=0), only_embedding).signals["embedding"]
    shifted = measure_drift(*windows(clinc, seed=1, shifted_share=0.4), only_embedding).signals["embedding"]

    assert shifted.value > 3 * max(quiet.value, 1e-4) and shifted.drifted and not quiet.drifted, (quiet, shifted)
    assert shifted.details["rows_current"] == policy.embedding.max_rows


def test_performance_drift_fires_on_a_large_accuracy_drop_and_needs_enough_labels(clinc, policy):
    reference, current = windows(clinc, seed=4)
    with_performance = _enabled(policy, "performance")

    result = measure_drift(_labelled(reference), _labelled(current, wrong_share=0.3), with_performance)

    signal = result.signals["performance"]
    assert signal.drifted and 0.25 < signal.value < 0.35, signal
    assert signal.details["macro_f1_drop"] > 0.2
    assert result.severity == "none"  # reported only unless the policy opts in
    few = _labelled(current, wrong_share=0.3)
    few.loc[few.index[policy.performance.min_labelled - 1:], "label"] = None
    assert "performance" not in measure_drift(_labelled(reference), few, with_performance).signals
    opted_in = _enabled(policy, "performance", counts_toward_verdict=True)
    result = measure_drift(_labelled(reference), _labelled(current, wrong_share=0.3), opted_in)
    assert (result.drift_detected, result.severity) == (True, "low")


def test_performance_estimate_sees_falling_confidence(clinc, policy):
    reference, current = windows(clinc, seed=4)
    current = current.assign(confidence=current["confidence"] - 0.3)

    signal = measure_drift(reference, current, _enabled(policy, "performance_estimate")).signals["performance_estimate"]

    assert signal.drifted and 0.25 < signal.value < 0.35
    assert signal.details["estimated_accuracy_current"] < 0.6


def test_descriptors_fire_on_very_long_texts(clinc, policy):
    reference, current = windows(clinc, seed=9)
    current = current.assign(text=current["text"] + " " + current["text"] + " " + current["text"] + " 42 !!")
    descriptors = ("descriptor_length", "descriptor_oov", "descriptor_non_letter")

    result = measure_drift(reference, current, _enabled(policy, *descriptors))

    assert result.signals["descriptor_length"].drifted, result.to_dict()
    assert result.signals["descriptor_non_letter"].drifted


# --- embedding novelty, champion signals, and what a check imports -------------------------------------


def within_domain_windows(clinc: pd.DataFrame, seed: int, new_share: float, n_reference: int = 1000,
                          n_current: int = 500) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A reference of 10 of each home domain's 15 intents; ``new_share`` of the window from the other 5."""
    rng = np.random.default_rng(seed)
    home = clinc[clinc["domain"].isin(HOME_DOMAINS)]
    intents = sorted(home["intent"].unique())
    known = {i for d in HOME_DOMAINS for i in sorted(home.loc[home["domain"] == d, "intent"].unique())[:10]}
    assert len(known) == 50 and len(intents) == 75
    seen, new = home[home["intent"].isin(known)], home[~home["intent"].isin(known)]
    reference = seen.iloc[rng.choice(len(seen), n_reference, replace=False)]
    rest = seen.drop(reference.index)
    n_new = round(new_share * n_current)
    current = pd.concat([rest.iloc[rng.choice(len(rest), n_current - n_new, replace=False)],
                         new.iloc[rng.choice(len(new), n_new, replace=False)]])
    return _as_served(reference, rng)[["text"]], _as_served(current, rng)[["text"]]


def test_embedding_novelty_sees_new_intents_inside_known_domains(clinc, policy):
    quiet = measure_drift(*within_domain_windows(clinc, seed=0, new_share=0.0), policy, report=False)
    shifted = measure_drift(*within_domain_windows(clinc, seed=0, new_share=0.3), policy, report=False)

    text_quiet, text_shifted = quiet.signals["text"], shifted.signals["text"]
    assert text_quiet.method == "embedding_novelty"
    assert not text_quiet.drifted and abs(text_quiet.value) < text_quiet.threshold, text_quiet
    assert text_shifted.drifted and text_shifted.value > text_quiet.value + 0.04, (text_quiet, text_shifted)
    assert text_shifted.details["current_similarity"] < text_shifted.details["reference_similarity"]
    assert (quiet.severity, shifted.severity) == ("none", "low")


def test_embedding_novelty_samples_at_most_max_rows_a_side(clinc, policy):
    reference, current = windows(clinc, seed=11, n_reference=1000, n_current=800)
    small = policy.model_copy(update={"text": policy.text.model_copy(update={"max_rows": 300})})

    details = measure_drift(reference, current, small, report=False).signals["text"].details

    assert (details["rows_reference"], details["rows_current"]) == (300, 300)


def _held_out(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(scored_on="held_out")


def test_champion_signals_count_only_when_the_reference_was_scored_on_held_out_rows(clinc, policy):
    reference, current = windows(clinc, seed=12)
    unsure = current.assign(confidence=current["confidence"] - 0.3)

    trained_on = measure_drift(reference, unsure, policy, report=False)
    held_out = measure_drift(_held_out(reference), unsure, policy, report=False)
    quiet = measure_drift(_held_out(reference), current, policy, report=False)

    for name in CHAMPION_SIGNALS:
        assert trained_on.signals[name].drifted and not trained_on.signals[name].counts_toward_verdict, name
        counted = name == "performance_estimate"  # the raw confidence signals report, in any case
        assert held_out.signals[name].drifted and held_out.signals[name].counts_toward_verdict == counted, name
        assert not quiet.signals[name].drifted, quiet.signals[name]
    assert trained_on.severity == "none" and held_out.severity == "low"
    assert held_out.signals["low_confidence"].details["share_current"] > 0.5
    assert held_out.signals["performance_estimate"].details["reference_scored_on"] == "held_out"


def test_cbpe_maps_confidence_to_the_reference_hit_rate():
    from tasks.drift import expected_accuracy

    rng = np.random.default_rng(0)
    confidence = rng.uniform(0, 1, 20_000)
    correct = rng.uniform(0, 1, 20_000) < confidence ** 2  # over-confident: the hit rate is confidence squared

    estimate = expected_accuracy(confidence, correct, rng.uniform(0.5, 1.0, 5_000))

    assert abs(estimate - 7 / 12) < 0.02  # mean of c^2 for c uniform on [0.5, 1]
    assert abs(rng.uniform(0.5, 1.0, 5_000).mean() - estimate) > 0.15  # the raw mean confidence is far off


def test_cbpe_signal_uses_the_labelled_reference(clinc, policy):
    reference, current = windows(clinc, seed=13)
    rng = np.random.default_rng(13)
    wrong = rng.uniform(0, 1, len(reference)) > reference["confidence"]  # hit rate = confidence
    labelled = _held_out(reference.assign(label=np.where(wrong, "another intent", reference["predicted_label"])))

    signal = measure_drift(labelled, current.assign(confidence=current["confidence"] - 0.2), policy,
                           report=False).signals["performance_estimate"]

    assert signal.method == "cbpe"
    assert abs(signal.details["reference_accuracy"] - (~wrong).mean()) < 1e-9
    assert 0.1 < signal.value < 0.3 and signal.drifted and signal.counts_toward_verdict, signal


def test_refit_values_match_evidentlys(clinc, policy):
    """Refit computes the shipped methods itself (no Evidently import); Evidently, given them, measures the same."""
    from tasks.drift import _evidently_report

    reference, current = windows(clinc, seed=14, shifted_share=0.2)

    ours = measure_drift(reference, current, policy, report=False).signals
    thresholds = {name: ours[name].threshold for name in ("text", "confidence")}
    theirs, report_html = _evidently_report(reference, current, thresholds, policy,
                                            {"text": "text", "confidence": "confidence"}, ["text", "confidence"], [],
                                            "text", "predicted_label", "confidence")

    assert theirs["confidence"] == pytest.approx(ours["confidence"].value, rel=1e-9)
    assert theirs["text"] == pytest.approx(ours["text"].value, rel=1e-6)
    assert "Embedding novelty (refit)" in report_html


def test_classification_quality_matches_sklearn():
    from sklearn.metrics import accuracy_score, f1_score

    from tasks.drift import classification_quality

    rng = np.random.default_rng(1)
    truth = rng.choice(list("abcde"), 300)
    predicted = np.where(rng.uniform(size=300) < 0.7, truth, rng.choice(list("abcdef"), 300))
    frame = pd.DataFrame({"label": truth, "predicted": predicted})

    quality = classification_quality(frame, "label", "predicted")

    assert quality["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert quality["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro", zero_division=0))


def test_sentence_embeddings_reuse_gives_the_same_vectors():
    from tasks import drift

    texts = ["what is my balance", "book a table for two", "what is my balance"]
    first = drift.sentence_embeddings(texts)
    drift._embedded.clear()
    again = drift.sentence_embeddings(texts[::-1])

    np.testing.assert_allclose(first, again[::-1], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(first[0], first[2])


def test_importing_the_drift_stage_loads_no_prefect_evidently_or_torch():
    import subprocess
    import sys

    code = ("import tasks.drift, sys; before = [m for m in ('prefect', 'evidently', 'torch') if m in sys.modules]; "
            "from tasks.drift import check_drift; print(before, type(check_drift).__name__, check_drift.name)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "[] Task drift", proc.stderr[-2000:]


def test_the_plain_torch_encoder_matches_transformers():
    """``sentence_embeddings`` runs BERT without transformers; the same texts through ``AutoModel`` agree."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from tasks import drift

    texts = ["what is my balance", "can you book a table for two at 7 tonight at the italian place downtown",
             "hi", "Transfer $40 from checking to savings, please!"]
    path = drift._base_model_path()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    features = tokenizer(texts, padding=True, truncation=True, max_length=drift.EMBEDDING_MAX_LENGTH,
                         return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**features).last_hidden_state
    mask = features["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    drift._embedded.clear()

    np.testing.assert_allclose(drift.sentence_embeddings(texts, runtime="torch"), expected, atol=1e-5)


def test_onnx_embeddings_equal_the_torch_ones(clinc, tmp_path, monkeypatch):
    """The ONNX graph (built from the weights, no torch) embeds as torch does, to float noise, batch sizes aside."""
    from refit.runtime import encoder_onnx
    from tasks import drift

    monkeypatch.setenv("REFIT_HOME", str(tmp_path))
    drift._onnx_encoder.cache_clear()
    texts = list(clinc["text"].sample(300, random_state=7)) + list(drift.PROBE_TEXTS)
    try:
        session = drift._onnx_encoder()
        drift._embedded.clear()
        on_torch = drift.sentence_embeddings(texts, runtime="torch")
        drift._embedded.clear()
        on_onnx = drift.sentence_embeddings(texts, runtime="onnx")
    finally:
        drift._embedded.clear()
        drift._onnx_encoder.cache_clear()

    assert session is not None  # exported and opened: otherwise "onnx" would have run torch, and this proves nothing
    assert [p.name for p in (tmp_path / "cache" / "encoders").iterdir()] == [
        encoder_onnx.encoder_file(tmp_path, drift.encoder_fingerprint()).name]  # no partial file left beside it
    np.testing.assert_allclose(on_onnx, on_torch, atol=1e-5, rtol=0)
    assert encoder_onnx.encoder_file(tmp_path, "a" * 64) != encoder_onnx.encoder_file(tmp_path, "b" * 64)


def test_a_graph_that_disagrees_with_numpy_is_not_kept(tmp_path, monkeypatch):
    """The build's own check: a graph off by more than MAX_DIFF raises, and leaves no file, whole or partial."""
    import json

    from safetensors.numpy import load_file

    from refit.runtime import encoder_onnx
    from tasks import drift

    model = drift._base_model_path()
    weights, config = load_file(str(model / "model.safetensors")), json.loads((model / "config.json").read_text())
    rows = [e.ids for e in drift._base_tokenizer().encode_batch(list(drift.PROBE_TEXTS[:2]))]
    honest = encoder_onnx.numpy_encode
    monkeypatch.setattr(encoder_onnx, "numpy_encode", lambda *a: honest(*a) + 1e-3)
    target = tmp_path / "encoders" / "x.onnx"

    with pytest.raises(ValueError, match="differs from numpy"):
        encoder_onnx.build(weights, config, target, [rows])
    assert list(target.parent.iterdir()) == []


def test_available_cpus_is_capped_by_a_cgroup_quota(tmp_path):
    import os

    from refit.processes import available_cpus, side_by_side

    affinity = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # one and a half cores: one whole one
    assert available_cpus(quota) == 1
    quota.write_text("max 100000\n")
    assert available_cpus(quota) == affinity
    assert available_cpus(tmp_path / "no-cgroup") == affinity
    quota.write_text("0 100000\n")  # less than a core is still one
    assert available_cpus(quota) == 1
    assert side_by_side(lambda x: x * x, list(range(50)), workers=3) == [x * x for x in range(50)]  # in order


def test_wasserstein_distance_matches_scipy():
    from scipy.stats import wasserstein_distance as scipys

    from tasks.drift import wasserstein_distance

    rng = np.random.default_rng(3)
    for n, m in ((1, 1), (7, 300), (500, 1000)):
        u, v = rng.normal(size=n), rng.normal(0.4, 2.0, m)
        assert wasserstein_distance(u, v) == pytest.approx(scipys(u, v), rel=1e-12, abs=1e-15)
    ties = np.round(rng.uniform(size=400), 1)
    assert wasserstein_distance(ties, ties[::-1]) == 0.0
    assert wasserstein_distance(ties, ties + 0.25) == pytest.approx(0.25)


@pytest.mark.parametrize("seed", range(6))
def test_isotonic_expected_accuracy_matches_sklearn(seed):
    from sklearn.isotonic import IsotonicRegression

    from tasks.drift import expected_accuracy

    rng = np.random.default_rng(seed)
    confidence = rng.uniform(0.3, 1.0, [1, 5, 400, 1000, 300, 2000][seed])
    if seed % 2:  # ties, and values 1 ulp apart, which sklearn merges as one
        confidence = np.r_[np.round(confidence, 2), np.nextafter(np.round(confidence[:20], 2), 2)]
    correct = rng.uniform(size=len(confidence)) < confidence ** 2
    window = rng.uniform(0.0, 1.2, 800)  # beyond the reference's range on both sides

    fitted = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(confidence, correct.astype(float))

    assert expected_accuracy(confidence, correct, window) == pytest.approx(fitted.predict(window).mean(), abs=1e-12)


def test_reference_embeddings_are_reused_only_for_the_same_reference_and_encoder():
    from tasks import drift

    reference = pd.Series(["what is my balance", "book a table for two", "what is my balance", "play some jazz"])
    drift._embedded.clear()
    vectors = drift.sentence_embeddings(list(reference))
    drift.sentence_embeddings(["a window text, not the reference's"])
    payload = drift.reference_embeddings_payload(reference)
    assert payload is not None
    assert drift.reference_embeddings_payload(reference, already=payload) is None  # nothing new to keep

    drift._embedded.clear()
    assert drift.reuse_reference_embeddings(payload, reference[::-1]) == "read"  # order and repeats aside
    assert set(drift._embedded) == set(reference)  # the window's text was not kept with the reference
    assert np.array_equal(drift.sentence_embeddings(list(reference)), vectors)

    drift._embedded.clear()
    assert drift.reuse_reference_embeddings(payload, reference.replace("play some jazz", "play some rock")) == "stale"
    assert drift.reuse_reference_embeddings(None, reference) == "missing"
    assert drift.reuse_reference_embeddings(b"not an npz file", reference) == "unreadable"
    assert drift._embedded == {}
    # another encoder (weights, tokenizer or pooling) makes them stale too
    import io

    with np.load(io.BytesIO(payload)) as saved:
        parts = dict(saved)
    meta = json.loads(parts["meta"].tobytes())
    other = io.BytesIO()
    np.savez(other, **parts | {"meta": np.frombuffer(json.dumps(meta | {"encoder": "0" * 64}).encode(), np.uint8)})
    assert drift.reuse_reference_embeddings(other.getvalue(), reference) == "stale"


def test_a_window_the_cascade_served_is_compared_with_the_reference_as_the_cascade_answers_it():
    from tasks.drift import reference_as_served

    reference = pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"], "predicted_label": ["x", "y"],
                              "confidence": [0.95, 0.9], "served_label": ["x", "x"], "served_confidence": [0.7, 0.6],
                              "served_by": ["student", "student"]})
    by_cascade = pd.DataFrame({"text": ["c"], "served_by": ["student"]})
    by_champion = pd.DataFrame({"text": ["c"], "served_by": ["champion"]})
    served = reference_as_served(reference, by_cascade)
    assert served["confidence"].tolist() == [0.7, 0.6] and served["predicted_label"].tolist() == ["x", "x"]
    # The champion alone (no cascade, or its guard tripped), or a log without tiers: the champion's own columns.
    for window in (by_champion, pd.DataFrame({"text": ["c"]})):
        assert reference_as_served(reference, window)["confidence"].tolist() == [0.95, 0.9]
    # A reference written before cascades (no served columns) is used as it is.
    plain = reference.drop(columns=["served_label", "served_confidence", "served_by"])
    assert reference_as_served(plain, by_cascade) is plain


def test_a_window_the_cascade_served_in_part_is_compared_with_a_reference_mixed_in_that_part():
    """One student row does not turn the whole reference into the cascade's; a guard tripped halfway gives half."""
    from tasks.drift import reference_as_served

    n = 400
    reference = pd.DataFrame({"text": [f"t{i}" for i in range(n)], "predicted_label": ["x"] * n,
                              "confidence": [0.9] * n, "served_label": ["x"] * n, "served_confidence": [0.5] * n,
                              "served_by": ["student", "champion"] * (n // 2)})  # the student answers half

    def cascade_part(student_rows: int, rows: int = 100) -> float:
        window = pd.DataFrame({"served_by": ["student"] * student_rows + ["champion"] * (rows - student_rows)})
        return float((reference_as_served(reference, window)["confidence"] == 0.5).mean())

    assert cascade_part(50) == 1.0  # the cascade served all of it: its share is the reference's
    assert cascade_part(1) < 0.06
    assert 0.4 < cascade_part(25) < 0.6
    assert cascade_part(0) == 0.0
