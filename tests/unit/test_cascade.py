"""The cascade: calibration never sees judging texts, the threshold holds the policy, the gate refuses a loss."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from refit.runtime.cascade import CHAMPION, STUDENT, CascadeModel, Student
from tasks.cascade import (CascadePolicy, TierFigures, build, calibrate, fit_student, judge, load_cascade_policy,
                           split_for_calibration)

LABELS = ("balance", "flight", "weather")
WORDS = {"balance": ["balance", "account", "money", "bank"], "flight": ["flight", "fly", "plane", "airport"],
         "weather": ["weather", "rain", "sunny", "forecast"]}


def texts_of(label: str, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"{' '.join(rng.choice(WORDS[label], size=3))} please {i}" for i in range(n)]


class KeywordChampion:
    """A served model stand-in: labels a text by the label whose keywords it holds, counting every call."""

    labels, batch_size, version, runtime = LABELS, 32, 1, "test"

    def __init__(self) -> None:
        self.seen: list[str] = []

    def probabilities(self, texts):
        out = np.full((len(texts), len(LABELS)), 0.05, dtype=np.float32)
        for row, text in enumerate(texts):
            for col, label in enumerate(LABELS):
                out[row, col] += sum(word in text for word in WORDS[label])
        return out / out.sum(axis=1, keepdims=True)

    def probabilities_of(self, texts, workers=1):
        self.seen.extend(texts)
        return self.probabilities(texts)

    def probabilities_and_states(self, texts, workers=1):
        return self.probabilities_of(texts), np.zeros((len(texts), 4), dtype=np.float32)

    def predict(self, texts, workers=1):
        proba = self.probabilities_of(texts)
        return [LABELS[i] for i in proba.argmax(axis=1)], proba.max(axis=1)


def policy(**changes) -> CascadePolicy:
    shipped, _ = load_cascade_policy()
    return shipped.model_copy(update=changes)


def test_shipped_policy_loads_and_states_the_issue_targets():
    shipped, path = load_cascade_policy()
    assert path.name == "cascade.yaml"
    assert shipped.min_accuracy_ratio == 0.99 and shipped.max_cost_ratio == 0.5 and shipped.max_slice_loss == 0.02


def test_policy_typo_is_an_error(tmp_path):
    from refit.errors import RefitError

    bad = tmp_path / "bad.yaml"
    bad.write_text(load_cascade_policy()[1].read_text() + "max_cost_ration: 0.4\n")
    with pytest.raises(RefitError, match="max_cost_ration"):
        load_cascade_policy(str(bad))


def test_calibration_split_never_holds_a_judging_text():
    pool = [f"text number {i}" for i in range(400)]
    judging = pool[::3] + ["  TEXT NUMBER 1 "]  # a judging text in another case and spacing is still the same text
    fit, calibration = split_for_calibration(pool + pool[:50], judging, share=0.3)
    banned = {t.strip().lower() for t in judging}
    assert not banned & {t.lower() for t in fit + calibration}
    assert "text number 1" not in fit + calibration
    assert not set(fit) & set(calibration)
    assert len(fit) + len(calibration) == len(set(pool)) - len(set(pool[::3]) | {"text number 1"})
    assert 0.2 < len(calibration) / (len(fit) + len(calibration)) < 0.4


def test_build_calibrates_only_on_texts_outside_the_judging_sets():
    pool = [t for label in LABELS for t in texts_of(label, 80)]
    golden = pd.DataFrame({"text": pool[::4], "label": [lab for lab in LABELS for _ in range(20)],
                           "group": "g"})
    champion = KeywordChampion()
    built = build(champion, pool, [], {"golden": golden}, policy(min_calibration_texts=10),
                  cost_texts=pool[:30], latency_texts=pool[:3])
    judged = set(golden["text"])
    assert built.calibration_texts and not judged & set(built.calibration_texts)
    assert built.fit_texts + len(built.calibration_texts) == len(set(pool) - judged)


def _evaluation_of(champion, sets, adapter_dir):
    """What ``tasks.evaluate.score_models`` records for ``champion`` on ``sets``: accuracies and what it scored."""
    from tasks.evaluate import Evaluation, SliceMetrics, adapter_digest, set_digest

    slices, groups, answers = {}, {}, {}
    for name, frame in sets.items():
        predicted, confidence = champion.predict(frame["text"].tolist())
        answers |= {text: (label, float(p)) for text, label, p in zip(frame["text"], predicted, confidence)}
        correct = np.array([p == t for p, t in zip(predicted, frame["label"])])
        slices[name] = SliceMetrics(len(frame), float(correct.mean()), 0.0, 0.0)
        for group, rows in frame.groupby("group").indices.items():
            groups[f"{name}/{group}"] = SliceMetrics(len(rows), float(correct[rows].mean()), 0.0, 0.0)
    return Evaluation(slices, 1.0, 0.0, groups=groups, runtime=champion.runtime,
                      adapter_digest=adapter_digest(adapter_dir),
                      set_digests={name: set_digest(frame) for name, frame in sets.items()}, answers=answers)


def test_the_champion_side_is_its_evaluation_and_the_cascade_is_judged_as_served(tmp_path):
    """The judging sets cost the champion no pass: its figures, and its answers where the student escalates, are
    the evaluation's; the cascade's answers are what it answers as served."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"the champion's weights")
    pool = [t for label in LABELS for t in texts_of(label, 80)]
    hard = ["weather flight bank", "rain plane money", "sunny airport account", "forecast fly balance"] * 5
    golden = pd.DataFrame({"text": pool[::4] + hard, "label": [lab for lab in LABELS for _ in range(20)]
                           + ["weather"] * 20, "group": ["g1", "g2"] * 40})
    judged = set(golden["text"])
    others = [t for t in pool if t not in judged]
    champion = KeywordChampion()
    evaluation = _evaluation_of(champion, {"golden": golden}, adapter)
    champion.seen.clear()
    rules = policy(min_calibration_texts=10)

    built = build(champion, pool, [], {"golden": golden}, rules, cost_texts=others[:30], latency_texts=others[:3],
                  evaluation=evaluation, adapter_dir=adapter)
    assert built.champion_from_evaluation
    assert built.champion.accuracy == {"golden": evaluation.slices["golden"].accuracy}
    assert built.champion.groups == {g: (m.rows, m.accuracy) for g, m in evaluation.groups.items()}
    labels, _, tiers = built.answers["golden"]
    escalated = [t for t, tier in zip(golden["text"], tiers) if tier == CHAMPION]
    assert escalated and not [t for t in champion.seen if t in judged]
    cascade_alone = CascadeModel(champion, built.cascade.student, built.cascade.threshold)
    served = cascade_alone.predict_tiers(golden["text"].tolist())
    assert [t for t in champion.seen if t in judged] == escalated  # as served, the escalated texts reach it
    assert (labels, tiers) == (served[0], served[2])
    np.testing.assert_allclose(built.answers["golden"][1], served[1], rtol=1e-6)
    measured = build(champion, pool, [], {"golden": golden}, rules, cost_texts=others[:30], latency_texts=others[:3])
    assert not measured.champion_from_evaluation  # no evaluation given: the champion's own pass, the same figures
    assert (measured.champion.accuracy, measured.champion.groups) == (built.champion.accuracy, built.champion.groups)
    assert measured.figures.accuracy == built.figures.accuracy
    assert measured.answers["golden"][::2] == built.answers["golden"][::2]  # labels and tiers

    for other_sets, other_adapter in (({"golden": golden.iloc[1:]}, adapter), ({"golden": golden}, tmp_path)):
        again = build(champion, pool, [], other_sets, rules, cost_texts=others[:30], latency_texts=others[:3],
                      evaluation=evaluation, adapter_dir=other_adapter)
        assert not again.champion_from_evaluation  # another set or another model: measured, not borrowed


def test_the_reference_gets_the_cascade_answers_it_was_judged_with(tmp_path):
    from refit.store import LocalStore
    from tasks.cascade import serve_reference
    from tasks.deploy import reference_prefix

    pool = [t for label in LABELS for t in texts_of(label, 80)]
    golden = pd.DataFrame({"text": pool[::4], "label": [lab for lab in LABELS for _ in range(20)]})
    champion = KeywordChampion()
    built = build(champion, pool, [], {"golden": golden}, policy(min_calibration_texts=10), cost_texts=pool[1:30],
                  latency_texts=pool[1:3])
    store = LocalStore(tmp_path)
    sample = pd.DataFrame({"text": golden["text"].tolist()[:10] + ["rain forecast not judged"], "label": "weather"})
    store.put_parquet(reference_prefix("m", 1) + "sample.parquet", sample)
    before = built.cascade.stats.texts

    serve_reference(store, "m", 1, built.cascade, built.answers, {"golden": golden})
    assert built.cascade.stats.texts - before == 1  # only the text the judging sets did not hold
    got = store.get_parquet(reference_prefix("m", 1) + "sample.parquet")
    labels, confidence, tiers = CascadeModel(champion, built.cascade.student,
                                             built.cascade.threshold).predict_tiers(sample["text"].tolist())
    assert got["served_label"].tolist() == labels and got["served_by"].tolist() == tiers
    np.testing.assert_allclose(got["served_confidence"], confidence, atol=1e-6)


def test_threshold_is_the_lowest_that_keeps_disagreement_within_policy():
    conf = np.array([0.99, 0.95, 0.90, 0.80, 0.70, 0.60, 0.50, 0.40, 0.30, 0.20])
    champion = ["a"] * 10
    student = ["a", "a", "a", "a", "b", "a", "a", "b", "a", "a"]
    # One disagreement in ten is 10%: allowed, the cut may go down to 0.50 (the next disagreement is at 0.40).
    assert calibrate(student, conf, champion, 0.10) == pytest.approx(0.50)
    # No disagreement allowed: only the four surest answers.
    assert calibrate(student, conf, champion, 0.0) == pytest.approx(0.80)
    # The surest answer already disagrees: the student never answers.
    assert calibrate(["b"] + student[1:], conf, champion, 0.0) == float("inf")


def test_threshold_never_splits_a_tie():
    conf = np.array([0.9, 0.8, 0.8, 0.7])
    assert calibrate(["a", "a", "b", "a"], conf, ["a"] * 4, 0.0) == pytest.approx(0.9)


def figures(accuracy: float, cpu: float, share: float, slice_accuracy: float = 0.9) -> TierFigures:
    return TierFigures({"golden": accuracy, "fresh": accuracy}, {"golden/banking": (100, slice_accuracy)},
                       {"golden": share, "fresh": share}, cpu, 5.0)


def test_gate_passes_a_cheap_cascade_that_keeps_accuracy():
    verdict = judge(figures(0.90, 10.0, 0.0), figures(0.895, 4.0, 0.7, 0.89), 0.8, policy())
    assert verdict.passed, verdict.summary
    assert {r.name for r in verdict.rules} >= {"golden_accuracy_ratio", "fresh_accuracy_ratio", "cpu_per_1k_ratio",
                                                "student_share", "worst_slice_loss (golden/banking)"}


def test_gate_refuses_a_cascade_that_loses_accuracy_and_says_by_how_much():
    verdict = judge(figures(0.90, 10.0, 0.0), figures(0.85, 2.0, 0.9, 0.80), 0.5, policy())
    assert not verdict.passed
    failed = {r.name for r in verdict.failed}
    assert failed == {"golden_accuracy_ratio", "fresh_accuracy_ratio", "worst_slice_loss (golden/banking)"}
    assert verdict.summary.startswith("champion alone: ")
    assert "golden_accuracy_ratio failed: +0.9444 (must be >= +0.9900)" in verdict.summary


def test_gate_refuses_a_cascade_that_costs_too_much_or_answers_too_little():
    verdict = judge(figures(0.90, 10.0, 0.0), figures(0.90, 6.0, 0.1), 0.99, policy())
    assert {r.name for r in verdict.failed} == {"cpu_per_1k_ratio", "student_share"}


def test_distilled_student_agrees_with_its_teacher_on_unseen_texts():
    champion = KeywordChampion()
    train = [t for label in LABELS for t in texts_of(label, 40)]
    student = fit_student(train, champion.probabilities(train), LABELS, c=20.0)
    unseen = [t for label in LABELS for t in texts_of(label, 20, seed=1)]
    predicted, confidence = student.predict(unseen)
    assert np.mean([p == c for p, c in zip(predicted, champion.predict(unseen)[0])]) > 0.9
    assert confidence.shape == (len(unseen),) and (confidence > 0).all()


def test_student_round_trips_without_pickle(tmp_path):
    champion = KeywordChampion()
    train = [t for label in LABELS for t in texts_of(label, 30)]
    student = fit_student(train, champion.probabilities(train), LABELS, c=5.0)
    loaded = Student.load(student.save(tmp_path / "student"))
    probe = ["is it sunny", "book a plane", "my bank account"]
    np.testing.assert_allclose(loaded.probabilities(probe), student.probabilities(probe), atol=1e-5)
    assert loaded.labels == LABELS


def test_the_threshold_applies_to_the_students_margin_and_a_student_stored_before_margins_keeps_its_probability(
        tmp_path):
    import json

    champion = KeywordChampion()
    train = [t for label in LABELS for t in texts_of(label, 30)]
    student = fit_student(train, champion.probabilities(train), LABELS, c=5.0)
    probe = ["is it sunny", "book a plane", "my bank account", "qq zz"]
    labels, confidence, margin = student.answer(probe)
    top_two = np.sort(student.probabilities(probe), axis=1)[:, -2:]
    np.testing.assert_allclose(confidence, top_two[:, 1], atol=1e-6)  # what is served: the label's probability
    np.testing.assert_allclose(margin, top_two[:, 1] - top_two[:, 0], atol=1e-6)  # what is routed on
    predicted, predicted_confidence = student.predict(probe)
    assert predicted == labels and np.array_equal(predicted_confidence, confidence)

    saved = student.save(tmp_path / "student")
    assert Student.load(saved).routing == "margin"
    spec = json.loads((saved / "student.json").read_text())
    del spec["routing"]  # as stored before margins
    (saved / "student.json").write_text(json.dumps(spec))
    older = Student.load(saved)
    assert older.routing == "probability"
    np.testing.assert_allclose(older.answer(probe)[2], confidence, atol=1e-6)
    # The cascade routes on the margin: texts under the threshold go to the champion.
    threshold = float(np.median(margin))
    by_margin = CascadeModel(champion, student, threshold).predict_tiers(probe)[2]
    assert by_margin == [STUDENT if m >= threshold else CHAMPION for m in margin]
    with pytest.raises(ValueError, match="routes on"):
        Student(LABELS, student.vectorizers, student.coef, student.intercept, routing="entropy")


def test_a_student_reads_its_champions_word_embeddings_and_is_loaded_with_them(tmp_path):
    """Word vectors are the served champion's input embeddings, averaged over a text's pieces; never stored."""
    import torch

    from refit import modeling
    from tasks.cascade import WORD_SCALE
    from tasks.evaluate import load_served_models

    torch.set_num_threads(1)
    adapter = modeling.save_model(modeling.new_model(list(LABELS), modeling.LoraSpec(), seed=4), tmp_path / "a")
    [champion] = load_served_models({"m": adapter}, runtime="torch").values()
    train = [t for label in LABELS for t in texts_of(label, 30)]
    student = fit_student(train, KeywordChampion().probabilities(train), LABELS, c=5.0, champion=champion)

    table = champion.model.get_input_embeddings().weight.detach().numpy()
    pieces = champion.tokenizer("is it sunny", add_special_tokens=False)["input_ids"]
    mean = table[pieces].mean(axis=0)
    np.testing.assert_allclose(student.dense(["is it sunny"])[0], mean / np.linalg.norm(mean) * WORD_SCALE,
                               atol=1e-5)
    assert student.coef.shape[1] == student.features(train).shape[1] + table.shape[1]

    saved = student.save(tmp_path / "student")
    assert "word_vectors" in (saved / "student.json").read_text()
    assert set(np.load(saved / "student.npz").files) == {"coef", "intercept", "idf_0", "idf_1"}  # no table copy
    probe = ["is it sunny", "book a plane", "my bank account", "a text of words no n-gram knows"]
    np.testing.assert_allclose(Student.load(saved, champion).probabilities(probe), student.probabilities(probe),
                               atol=1e-5)
    with pytest.raises(ValueError, match="load it with the served champion"):
        Student.load(saved)
    other = modeling.save_model(modeling.new_model(list(LABELS), modeling.LoraSpec(), seed=5), tmp_path / "b")
    [stranger] = load_served_models({"m": other}, runtime="torch").values()
    with torch.no_grad():
        stranger.model.get_input_embeddings().weight[7] += 1.0  # another model: its table differs
    with pytest.raises(ValueError, match="fitted on other input embeddings"):
        Student.load(saved, stranger)


def test_served_by_is_right_per_text_and_only_unsure_texts_reach_the_champion():
    champion = KeywordChampion()
    train = [t for label in LABELS for t in texts_of(label, 40)]
    student = fit_student(train, champion.probabilities(train), LABELS, c=20.0)
    texts = ["rain forecast sunny weather", "hello there", "flight plane airport fly", "zzz"]
    _, _, margin = student.answer(texts)
    threshold = float(np.sort(margin)[1]) + 1e-6  # the two least sure go to the champion
    cascade = CascadeModel(champion, student, threshold)
    labels, _, served_by = cascade.predict_tiers(texts)
    expected = [STUDENT if m >= threshold else CHAMPION for m in margin]
    assert served_by == expected and served_by.count(CHAMPION) == 2
    assert champion.seen == [t for t, s in zip(texts, served_by) if s == CHAMPION]
    assert labels[0] == "weather" and labels[2] == "flight"
    assert cascade.stats.texts == 4 and cascade.stats.student_share == pytest.approx(0.5)


def test_guard_falls_back_to_the_champion_when_the_share_collapses():
    from refit.runtime.cascade import ShareGuard

    champion = KeywordChampion()
    train = [t for label in LABELS for t in texts_of(label, 40)]
    student = fit_student(train, champion.probabilities(train), LABELS, c=20.0)
    easy = [t for label in LABELS for t in texts_of(label, 10, seed=2)]
    hard = [f"qq zz {i}" for i in range(30)]
    easy_conf, hard_conf = student.answer(easy)[2], student.answer(hard)[2]
    assert hard_conf.max() < easy_conf.min(), "precondition: the student is surer of the easy texts"
    guard = ShareGuard(gated_share=0.9, max_drop=0.25, min_texts=20)
    cascade = CascadeModel(champion, student, float(easy_conf.min()), guard=guard)

    for start in range(0, len(easy), 5):
        assert set(cascade.predict_tiers(easy[start : start + 5])[2]) == {STUDENT}
    assert guard.tripped is None
    for start in range(0, 15, 5):  # the newest 20 texts hold 15 hard ones: share 0.25, below 0.9 - 0.25
        cascade.predict_tiers(hard[start : start + 5])
    assert guard.tripped and "fell below 0.650" in guard.tripped
    champion.seen.clear()
    assert cascade.predict_tiers(easy[:4])[2] == [CHAMPION] * 4  # easy texts too: the champion alone now
    assert champion.seen == easy[:4]


def test_guard_holds_while_the_share_stays_within_policy():
    from refit.runtime.cascade import ShareGuard

    guard = ShareGuard(gated_share=0.6, max_drop=0.25, min_texts=100)
    for _ in range(50):
        guard.observe(10, 4)  # share 0.40 >= 0.35
    assert guard.tripped is None
    guard.observe(10, 0)  # the newest 100 texts: 36 of them the student's, 0.36 still above
    assert guard.tripped is None
    guard.observe(10, 0)
    assert guard.tripped is not None  # 0.32 < 0.35


def test_student_share_of_a_request_log_window():
    from refit.runtime.cascade import student_share

    assert student_share(pd.DataFrame({"text": ["a"]})) is None  # written before the cascade existed
    window = pd.DataFrame({"served_by": [STUDENT, STUDENT, CHAMPION, None]})
    assert student_share(window) == pytest.approx(2 / 3)


def test_served_by_stays_with_its_text_when_concurrent_requests_share_a_pass():
    import asyncio

    from serving.engine import Engine
    from serving.guards import LiveStats
    from serving.rollout import Slot

    champion = KeywordChampion()
    train = [t for label in LABELS for t in texts_of(label, 40)]
    student = fit_student(train, champion.probabilities(train), LABELS, c=20.0)
    sure = texts_of("weather", 3, seed=5)
    unsure = ["qq zz 1", "qq zz 2"]
    threshold = float(student.answer(sure)[2].min())
    assert student.answer(unsure)[2].max() < threshold
    slot = Slot(CascadeModel(champion, student, threshold), LiveStats(0.048))
    passes: list[int] = []

    async def run():
        engine = Engine(batch_size=32, on_pass=lambda s, n, cpu: passes.append(n), max_wait=0.2)
        engine.start()
        answers = await asyncio.gather(engine.predict(slot, [sure[0], unsure[0]]),
                                       engine.predict(slot, [unsure[1], sure[1], sure[2]]))
        await engine.stop()
        return answers

    first, second = asyncio.run(run())
    assert passes == [5]  # one forward pass for both requests
    assert first[2] == [STUDENT, CHAMPION] and second[2] == [CHAMPION, STUDENT, STUDENT]
    assert first[0][0] == "weather" and len(first[1]) == 2 and len(second[0]) == 3


def test_a_cascade_that_cannot_be_built_is_refused_with_its_reason_and_never_raises(tmp_path, monkeypatch):
    import mlflow

    import tasks.evaluate
    from refit.cost import Rates
    from refit.settings import Settings
    from registry import versions
    from registry.tracking import configure
    from refit.runtime.cascade import VERDICT_TAG
    from tasks.cascade import build_cascade

    monkeypatch.setenv("REFIT_HOME", str(tmp_path / "home"))
    experiment_id = configure(Settings())
    with mlflow.start_run(experiment_id=experiment_id) as run:
        pass
    version = versions.register("m", run.info.run_id, {})

    def broken(adapter_dirs, runtime=None):
        raise RuntimeError("export broke")

    monkeypatch.setattr(tasks.evaluate, "load_served_models", broken)
    golden = pd.DataFrame({"text": ["a"], "label": ["balance"]})
    result = build_cascade("m", version, tmp_path, pd.DataFrame({"text": ["x"]}), [], {"golden": golden},
                           Rates(0.048, 2.5), experiment_id)
    assert not result["passed"]
    assert "could not be built (RuntimeError: export broke)" in result["verdict"]
    tags = versions.version_tags("m", version)
    assert tags[VERDICT_TAG] == "refused" and "export broke" in tags["refit.cascade_reasons"]


def test_the_cost_sample_has_the_judged_sets_student_share():
    from tasks.evaluate import tier_sample

    texts = [f"text {i}" for i in range(1000)]
    answered = np.arange(1000) % 10 < 6  # the student answers 60% of the judged texts
    sample = tier_sample(texts, answered, 256, seed=3)
    index = [int(t.split()[1]) for t in sample]
    assert len(set(index)) == 256 and np.mean(answered[index]) == pytest.approx(0.6, abs=0.5 / 256)
    assert tier_sample(texts, answered, 256, seed=3) == sample  # the same draw every time
    assert sorted(tier_sample(texts[:10], answered[:10], 256)) == sorted(texts[:10])  # fewer texts: all of them
    assert tier_sample([], np.zeros(0, dtype=bool), 256) == []
