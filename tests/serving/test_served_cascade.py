"""The server runs a version's gated cascade: ``served_by`` per text, the tier in the request log; a refused one never loads."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import yaml

from refit import requestlog
from refit.policy import POLICY_DIR
from refit.store import LocalStore
from refit.runtime.cascade import CHAMPION, RUN_TAG, STUDENT, THRESHOLD_TAG, VERDICT_TAG, Student
from tests.serving.conftest import unique_texts


def cascade_policy(path: Path, **overrides) -> Path:
    policy = yaml.safe_load((POLICY_DIR / "cascade.yaml").read_text())
    policy.update({"min_calibration_texts": 20} | overrides)
    path.write_text(yaml.safe_dump(policy))
    return path


def built(registry, data_dir, tmp_path, store=None, **overrides) -> dict:
    """Build v1's cascade as the flows do: pool and recent traffic from train/val texts, judged on test texts."""
    import mlflow

    from refit.cost import Rates
    from refit.data import load_clinc150
    from tasks.cascade import build_cascade

    labels = sorted(pd.read_json(registry.adapters.good / "labels.json")[0])
    frame = load_clinc150(data_dir)
    known = frame[frame["label"].isin(labels)]
    pool = known[known["split"] == "train"][["text", "label"]]
    recent = known[known["split"] == "val"]["text"].tolist()
    golden = known[known["split"] == "test"].groupby("label").head(8)[["text", "label", "group"]]
    policy = cascade_policy(tmp_path / "cascade.yaml", **overrides)
    result = build_cascade(registry.name, 1, registry.adapters.good, pool, recent, {"golden": golden},
                           Rates(0.048, 2.5), registry.experiment_id, policy=str(policy), store=store)
    assert mlflow.active_run() is None
    return result | {"golden": golden}


def _champion(registry):
    """The served champion a student is loaded with: it reads the champion's input embeddings."""
    from tasks.evaluate import load_served_models

    return load_served_models({"champion": registry.adapters.good})["champion"]


def _in_a_thread(fn):
    """``fn()`` on a thread of its own, as the server sets its limits: OpenBLAS ignored a later thread's limit
    once the main thread had set one to the value it already had."""
    import threading

    out = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


def test_a_passed_cascade_serves_and_each_prediction_names_its_tier(registry, start_server, data_dir, tmp_path):
    from registry import versions

    # Loose enough that a tiny test model's cascade passes; the shipped rules are tested in tests/unit.
    result = built(registry, data_dir, tmp_path, min_accuracy_ratio=0.5, max_slice_loss=1.0, max_cost_ratio=5.0,
                   min_student_share=0.0, max_calibration_disagreement=0.01)
    assert result["passed"], result["verdict"]
    tags = versions.version_tags(registry.name, 1)
    assert tags[VERDICT_TAG] == "passed" and float(tags[THRESHOLD_TAG]) == result["threshold"]
    import mlflow

    artifacts = Path(mlflow.artifacts.download_artifacts(run_id=tags[RUN_TAG], artifact_path="cascade"))
    assert {"student.json", "student.npz", "cascade.json", "cascade.html"} <= {p.name for p in artifacts.iterdir()}
    student = Student.load(artifacts, _champion(registry))

    from threadpoolctl import threadpool_info, threadpool_limits

    blas = _in_a_thread(lambda: threadpool_limits(limits=2, user_api="blas"))  # as where nothing limits BLAS
    try:
        server = start_server()
        assert httpx.get(server.url + "/rollout").json()["runtimes"] == {"1": "cascade+onnx"}
        # The student's product is too small for threads: their spinning would be billed to the passes after it.
        assert {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"} == {1}
        texts = unique_texts(registry.adapters.texts, 30) + [f"zq xv {i}" for i in range(10)]  # some it cannot know
        answer = httpx.post(server.url + "/predict", json={"texts": texts}, timeout=60)
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
        _, _, margin = student.answer(texts)
        expected = [STUDENT if m >= result["threshold"] else CHAMPION for m in margin]
        assert [p["served_by"] for p in predictions] == expected
        assert set(expected) == {STUDENT, CHAMPION}, "the texts should exercise both tiers"
        student_labels, _ = student.predict(texts)
        for p, label, tier in zip(predictions, student_labels, expected):
            if tier == STUDENT:
                assert p["label"] == label

        metrics = httpx.get(server.url + "/metrics").text
        assert 'refit_cascade_student_share{version="1"}' in metrics
        assert 'refit_cascade_cpu_seconds_per_1k{tier="student",version="1"}' in metrics
        server.stop()
        assert {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"} == {2}
    finally:  # later tests measure cost: they need BLAS as it was
        _in_a_thread(blas.restore_original_limits)
    logged = requestlog.read_inference(LocalStore(registry.settings.local_store_root), registry.name,
                                       pd.Timestamp.now(tz="UTC") - pd.Timedelta(hours=1),
                                       pd.Timestamp.now(tz="UTC") + pd.Timedelta(hours=1))
    by_text = dict(zip(logged["text"], logged["served_by"]))
    assert [by_text[t] for t in texts] == expected


def test_a_passed_cascade_leaves_the_reference_as_it_serves_and_the_encoder_states(registry, data_dir, tmp_path):
    """The drift reference gains what the cascade answers on its texts; the passes' encoder states are kept."""
    from refit.runtime.encoder_states import EncoderStates
    from tasks.deploy import reference_prefix

    store = LocalStore(tmp_path / "store")
    key = reference_prefix(registry.name, 1) + "sample.parquet"
    texts = unique_texts(registry.adapters.texts, 30) + [f"zq xv {i}" for i in range(10)]
    store.put_parquet(key, pd.DataFrame({"text": texts, "label": "x", "predicted_label": "x", "confidence": 0.9,
                                         "scored_on": "held_out"}))
    result = built(registry, data_dir, tmp_path, store=store, min_accuracy_ratio=0.5, max_slice_loss=1.0,
                   max_cost_ratio=5.0, min_student_share=0.0, max_calibration_disagreement=0.01)
    assert result["passed"], result["verdict"]
    import mlflow

    from registry import versions

    tags = versions.version_tags(registry.name, 1)
    student = Student.load(Path(mlflow.artifacts.download_artifacts(run_id=tags[RUN_TAG], artifact_path="cascade")),
                           _champion(registry))
    sample = store.get_parquet(key)
    student_labels, student_conf, margin = student.answer(texts)
    expected = [STUDENT if m >= result["threshold"] else CHAMPION for m in margin]
    assert sample["served_by"].tolist() == expected and set(expected) == {STUDENT, CHAMPION}
    for row, label, conf, tier in zip(sample.itertuples(), student_labels, student_conf, expected):
        if tier == STUDENT:
            assert row.served_label == label and abs(row.served_confidence - conf) < 1e-6
    assert sample["confidence"].tolist() == [0.9] * len(texts)  # the champion's columns stay

    kept = EncoderStates.of(store, registry.name, registry.adapters.good).load()
    assert result["encoder_states_kept"] == len(kept) > 0
    assert all(state.shape == (kept[next(iter(kept))].shape[0],) for state in kept.values())


def test_a_cascade_that_loses_accuracy_is_refused_and_the_champion_serves_alone(registry, start_server, data_dir,
                                                                                 tmp_path, monkeypatch):
    import tasks.cascade
    from registry import versions

    # A student taught the wrong answers (each text's probabilities moved to the next label) and allowed to answer
    # nearly every text: everything passes but the accuracy the cascade loses.
    fit = tasks.cascade.fit_student
    monkeypatch.setattr(tasks.cascade, "fit_student",
                        lambda texts, teacher, labels, c, **more: fit(texts, np.roll(teacher, 1, axis=1), labels, c,
                                                                      **more))
    result = built(registry, data_dir, tmp_path, max_calibration_disagreement=0.99, max_cost_ratio=5.0,
                   min_student_share=0.0, max_slice_loss=1.0)
    assert not result["passed"]
    assert result["verdict"].startswith("champion alone: golden_accuracy_ratio failed"), result["verdict"]
    assert result["accuracy_ratio"] < 0.5
    tags = versions.version_tags(registry.name, 1)
    assert tags[VERDICT_TAG] == "refused" and tags["refit.cascade_reasons"].startswith("champion alone: ")

    server = start_server()
    assert httpx.get(server.url + "/rollout").json()["runtimes"] == {"1": "onnx"}
    answer = httpx.post(server.url + "/predict", json={"texts": registry.adapters.texts[:10]}, timeout=60)
    assert [p["served_by"] for p in answer.json()["predictions"]] == [CHAMPION] * 10


def test_the_guard_falls_back_to_the_champion_when_the_share_collapses_and_mlflow_says_why(
        registry, start_server, data_dir, tmp_path):
    import mlflow

    from registry import versions
    from refit.runtime.cascade import FALLBACK_TAG

    result = built(registry, data_dir, tmp_path, min_accuracy_ratio=0.5, max_slice_loss=1.0, max_cost_ratio=5.0,
                   min_student_share=0.2, max_calibration_disagreement=0.01, max_share_drop=0.1, guard_min_texts=20)
    assert result["passed"], result["verdict"]
    server = start_server()
    hard = [f"zq xv {i}" for i in range(40)]  # texts no tier has seen: the student escalates them
    for start in range(0, 40, 10):
        answer = httpx.post(server.url + "/predict", json={"texts": hard[start : start + 10]}, timeout=60)
        assert answer.status_code == 200
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not versions.version_tags(registry.name, 1).get(FALLBACK_TAG):
        time.sleep(0.5)
    reason = versions.version_tags(registry.name, 1).get(FALLBACK_TAG, "")
    assert "traffic got harder" in reason
    runs = mlflow.search_runs([registry.experiment_id], filter_string="tags.`refit.run_type` = 'cascade-fallback'")
    assert len(runs) == 1
    easy = unique_texts(registry.adapters.texts, 10)
    answer = httpx.post(server.url + "/predict", json={"texts": easy}, timeout=60)
    assert [p["served_by"] for p in answer.json()["predictions"]] == [CHAMPION] * 10
