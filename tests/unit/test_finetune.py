"""Fine-tune: assembling a leak-free training set with replay, and a tiny real training run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from refit.cost import Rates
from refit.data import text_hash, text_hashes
from refit.errors import RefitError
from tasks.finetune import Recipe, assemble, fine_tune, load_update_policy, train_adapter


def pool_frame(labels: int = 4, per_label: int = 50) -> pd.DataFrame:
    names = [f"label{j}" for j in range(labels)]
    return pd.DataFrame({"text": [f"old {j} {i}" for j in range(labels) for i in range(per_label)],
                         "label": [names[j] for j in range(labels) for _ in range(per_label)]})


def new_frame(n: int = 40) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"new text {i}" for i in range(n)], "label": [f"label{i % 4}" for i in range(n)],
                         "request_id": [f"r{i}" for i in range(n)]})


def test_shipped_update_policy_loads():
    policy, path = load_update_policy()
    assert path.name == "update.yaml"
    assert policy.replay_ratio >= 0 and policy.bootstrap.start == "fresh"
    assert [r.name for r in policy.ladder] == ["head", "top-layers", "full-retrain"]
    # cheapest first (the head alone on cached features), the full retrain last
    assert policy.ladder[0].frozen_layers == 6 and policy.ladder[-1].start == "fresh"


def test_assemble_dedupes_and_drops_evaluation_texts():
    new = new_frame(10)
    dupes = pd.DataFrame({"text": ["new text 1", "  NEW TEXT 2 ", "new text 3"], "label": ["label1", "label2", "label0"]})
    new = pd.concat([new, dupes], ignore_index=True)
    eval_texts = text_hashes(["New Text 4", "new text 5", "not in the training data"])
    out = assemble(new, pool_frame(), eval_texts, replay_ratio=0.0, seed=0)
    assert out.duplicates_dropped == 3
    assert out.leaked_dropped == 2
    assert out.new_rows == 10 - 2 == len(out.frame)
    assert out.replay_rows == 0
    assert not set(out.frame["text"].map(text_hash)) & eval_texts
    assert set(out.frame["text"]) == {f"new text {i}" for i in range(10)} - {"new text 4", "new text 5"}
    assert list(out.frame.columns) == ["text", "label", "origin"]
    assert set(out.frame["origin"]) == {"new"}
    # the first of each duplicate wins
    assert out.frame.set_index("text").loc["new text 3", "label"] == "label3"


def test_assemble_replay_is_sized_by_ratio_and_stratified():
    pool = pool_frame(labels=4, per_label=50)
    pool.loc[:149, "label"] = ["label0"] * 100 + ["label1"] * 50  # shares 100/50/25/25 of 200
    pool.loc[150:, "label"] = ["label2"] * 25 + ["label3"] * 25
    out = assemble(new_frame(40), pool, set(), replay_ratio=1.5, seed=0)
    replay = out.frame[out.frame["origin"] == "replay"]
    assert out.new_rows == 40 and out.replay_rows == len(replay)
    assert len(replay) == pytest.approx(60, abs=4)
    counts = replay["label"].value_counts()
    assert counts["label0"] == pytest.approx(30, abs=1)
    assert counts["label1"] == pytest.approx(15, abs=1)
    assert counts["label2"] == pytest.approx(7.5, abs=1) and counts["label3"] == pytest.approx(7.5, abs=1)
    assert set(replay["text"]) <= set(pool["text"])
    assert not replay["text"].duplicated().any()
    assert len(out.frame) == out.new_rows + out.replay_rows


def test_assemble_replay_never_repeats_new_texts_and_is_capped_by_the_pool():
    pool = pd.DataFrame({"text": ["New Text 1", "old a", "old b"], "label": ["label1", "label0", "label2"]})
    out = assemble(new_frame(10), pool, set(), replay_ratio=5.0, seed=0)
    replay = out.frame[out.frame["origin"] == "replay"]
    assert sorted(replay["text"]) == ["old a", "old b"]  # the pool's copy of a new text is not replayed
    assert out.replay_rows == 2


def test_assemble_is_deterministic_for_a_seed():
    a = assemble(new_frame(), pool_frame(), set(), 1.0, seed=0)
    b = assemble(new_frame(), pool_frame(), set(), 1.0, seed=0)
    c = assemble(new_frame(), pool_frame(), set(), 1.0, seed=1)
    pd.testing.assert_frame_equal(a.frame, b.frame)
    assert a.fingerprint == b.fingerprint
    assert not a.frame.equals(c.frame) and a.fingerprint != c.fingerprint


def test_assemble_with_nothing_left_raises():
    new = new_frame(3)
    with pytest.raises(RefitError, match="no labelled examples left"):
        assemble(new, pool_frame(), text_hashes(new["text"]), 1.0, seed=0)


def test_replay_pool_rows_in_evaluation_sets_are_not_trained_on():
    pool = pool_frame(labels=2, per_label=5)
    eval_texts = text_hashes(pool["text"].iloc[:3])
    out = assemble(new_frame(10), pool, eval_texts, replay_ratio=10.0, seed=0)
    assert not set(out.frame["text"].map(text_hash)) & eval_texts


def test_replay_ratio_holds_when_there_are_more_labels_than_replay_rows():
    out = assemble(new_frame(5), pool_frame(labels=50, per_label=4), set(), replay_ratio=1.0, seed=0)
    assert out.replay_rows <= 2 * 5


# --- a tiny real training run: 3 labels, 12 texts, 1 epoch -----------------------------------

LABELS = ["greeting", "weather", "balance"]
TEXTS = ["hello there", "hi friend", "good morning", "hey you",
         "is it raining", "will it snow", "how hot is it", "weather tomorrow",
         "my balance", "money in my account", "how much cash do i have", "account balance please"]
LABEL_IDS = [0] * 4 + [1] * 4 + [2] * 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch

    from refit import modeling

    torch.set_num_threads(1)
    model = modeling.new_model(LABELS, modeling.LoraSpec(rank=2, alpha=4), seed=0)
    tokenizer = modeling.load_tokenizer()
    steps = []
    stats = modeling.train(model, tokenizer, TEXTS, LABEL_IDS, epochs=1, learning_rate=1e-3, batch_size=4,
                           on_step=lambda step, total, loss: steps.append((step, total, loss)))
    adapter_dir = modeling.save_model(model, tmp_path_factory.mktemp("adapter") / "a")
    return model, tokenizer, stats, steps, adapter_dir


def test_tiny_training_reports_its_work(tiny):
    _, _, stats, steps, _ = tiny
    assert stats.examples_seen == 12 and stats.steps == 3
    assert stats.tokens_seen > 12
    assert np.isfinite(stats.final_loss)
    assert [s[:2] for s in steps] == [(1, 3), (2, 3), (3, 3)]


def test_saved_adapter_is_safetensors_and_labels_only(tiny):
    _, _, _, _, adapter_dir = tiny
    names = {p.name for p in adapter_dir.rglob("*") if p.is_file()}
    assert {"adapter_model.safetensors", "labels.json", "adapter_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pkl", ".pt", ".pth", ".pickle"))]
    assert json.loads((adapter_dir / "labels.json").read_text()) == LABELS


def test_reloaded_adapter_predicts_like_the_trained_model(tiny):
    from refit import modeling

    model, tokenizer, _, _, adapter_dir = tiny
    loaded = modeling.load_model(adapter_dir)
    assert modeling.model_labels(loaded) == LABELS
    probe = ["hello", "is it sunny", "what is my balance", ""]
    labels, confidence = modeling.predict(loaded, tokenizer, probe)
    assert len(labels) == 4 and set(labels) <= set(LABELS)
    assert ((confidence > 0) & (confidence <= 1)).all()
    np.testing.assert_allclose(modeling.predict_proba(loaded, tokenizer, probe),
                               modeling.predict_proba(model, tokenizer, probe), atol=1e-5)
    assert modeling.predict(loaded, tokenizer, []) == ([], pytest.approx(np.zeros(0)))


def test_train_adapter_warm_start_and_unknown_labels(tiny):
    from refit import modeling

    *_, adapter_dir = tiny
    recipe = Recipe(epochs=1, learning_rate=1e-3, batch_size=8)
    frame = pd.DataFrame({"text": TEXTS[:8], "label": [LABELS[i] for i in LABEL_IDS[:8]]})
    trained = train_adapter(frame, recipe, Rates(0.048, 2.5), warm_start=adapter_dir)
    try:
        assert trained.steps == 1
        assert trained.cost.examples_seen == 8 and trained.cost.cpu_seconds > 0 and trained.cost.usd > 0
        assert modeling.read_labels(trained.adapter_dir) == LABELS
    finally:
        shutil.rmtree(trained.adapter_dir, ignore_errors=True)
    with pytest.raises(RefitError, match="labels unknown to the model"):
        train_adapter(frame.assign(label="not-a-label"), recipe, Rates(0.048, 2.5), warm_start=adapter_dir)


def test_fine_tune_task_plain_function_runs_without_prefect(tiny):
    *_, adapter_dir = tiny
    frame = pd.DataFrame({"text": TEXTS[:4], "label": [LABELS[i] for i in LABEL_IDS[:4]]})
    trained = fine_tune.fn(frame, Recipe(epochs=1, learning_rate=1e-3, batch_size=4), Rates(0.048, 2.5),
                           warm_start=adapter_dir)
    assert trained.steps == 1


def _weights(adapter_dir):
    from safetensors.numpy import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


@pytest.mark.parametrize("frozen", [6, 4])
def test_frozen_layers_keep_the_champions_weights(tiny, frozen):
    *_, adapter_dir = tiny
    recipe = Recipe(epochs=2, learning_rate=1e-2, batch_size=4, frozen_layers=frozen)
    frame = pd.DataFrame({"text": TEXTS, "label": [LABELS[i] for i in LABEL_IDS]})
    trained = train_adapter(frame, recipe, Rates(0.048, 2.5), warm_start=adapter_dir)
    try:
        before, after = _weights(adapter_dir), _weights(trained.adapter_dir)
        assert before.keys() == after.keys()
        changed = {k for k in before if not np.array_equal(before[k], after[k])}
        layer = lambda k: int(k.split(".layer.")[1].split(".")[0]) if ".layer." in k else None  # noqa: E731
        assert any("classifier" in k for k in changed) and any("pooler" in k for k in changed)
        assert {layer(k) for k in changed if layer(k) is not None} == set(range(frozen, 6))
        assert trained.steps == 2 * 3  # 12 rows in batches of 4, two epochs over the cached batches
    finally:
        shutil.rmtree(trained.adapter_dir, ignore_errors=True)


def test_distillation_holds_replay_rows_to_the_champions_answers(tiny):
    from refit import modeling

    _, tokenizer, _, _, adapter_dir = tiny
    champion = modeling.predict_proba(modeling.load_model(adapter_dir), tokenizer, TEXTS)
    # Every label wrong, every row replay: the labels pull away from the champion, distillation pulls back.
    wrong = pd.DataFrame({"text": TEXTS, "label": [LABELS[(i + 1) % 3] for i in LABEL_IDS], "origin": "replay"})
    drift = {}
    for weight in (0.0, 1.0):
        recipe = Recipe(epochs=10, learning_rate=5e-3, batch_size=4, frozen_layers=6, distill_weight=weight)
        trained = train_adapter(wrong, recipe, Rates(0.048, 2.5), warm_start=adapter_dir)
        try:
            after = modeling.predict_proba(modeling.load_model(trained.adapter_dir), tokenizer, TEXTS)
        finally:
            shutil.rmtree(trained.adapter_dir, ignore_errors=True)
        drift[weight] = float(np.abs(after - champion).sum(axis=1).mean())
    assert drift[1.0] < 0.5 * drift[0.0], drift


def test_work_tokens_price_cached_passes_by_depth():
    warm_head = Recipe(epochs=10, learning_rate=1e-3, frozen_layers=6)
    warm_all = Recipe(epochs=3, learning_rate=1e-3, frozen_layers=0)
    fresh = Recipe(start="fresh", epochs=1, learning_rate=1e-3)
    assert warm_head.work_tokens(600) == pytest.approx(200)  # the cached forward pass only
    assert warm_all.work_tokens(600) == pytest.approx(200 + 3 * 600)
    assert fresh.work_tokens(600) == 600


def test_only_a_shortfall_in_improvement_escalates():
    from tasks.finetune import escalates

    policy, _ = load_update_policy()
    assert escalates(["fresh_accuracy_gain"], policy)
    assert escalates(["fresh_accuracy_gain", "fresh_gain_lower_bound"], policy)
    assert not escalates(["golden_accuracy_loss"], policy)  # a poisoned update stops at the first rung
    assert not escalates(["fresh_accuracy_gain", "worst_slice_loss (golden/banking)"], policy)
    assert not escalates([], policy)  # passed: nothing to escalate
