"""Labels the champion never saw: quarantined below their minimum, learned once enough arrived, the head grown."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from refit import modeling
from refit.cost import Rates
from refit.store import LocalStore
from tasks.finetune import Recipe, train_adapter
from tasks.ingest import admit_new_labels, pending_prefix

KNOWN = ["balance", "transfer"]


def rows(label: str, n: int, start: int = 0) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"{label} text {i}" for i in range(start, start + n)], "label": label})


def test_new_label_below_its_minimum_waits_in_quarantine_then_is_learned(tmp_path):
    store = LocalStore(tmp_path)
    first = pd.concat([rows("balance", 30), rows("pet_insurance", 4), rows("crypto", 12)])
    admitted = admit_new_labels(store, "m", first, KNOWN, min_examples=10)
    assert admitted.learned == ["crypto"]
    assert admitted.waiting == 4 and len(admitted.rows) == 42  # rows in = rows kept + rows waiting
    waiting = store.read_parquet_prefix(pending_prefix("m"))
    assert set(waiting["label"]) == {"pet_insurance"}
    assert waiting["reason"].str.contains("min_examples_per_new_label=10").all()
    assert admitted.reasons["pet_insurance"].startswith("new label 'pet_insurance': 4 row(s) so far")

    # Seven more arrive: with the four that waited, eleven distinct texts, enough to learn it.
    second = pd.concat([rows("transfer", 20), rows("pet_insurance", 7, start=4)])
    admitted = admit_new_labels(store, "m", second, KNOWN, min_examples=10)
    assert admitted.learned == ["pet_insurance"]
    assert admitted.from_earlier == 4 and admitted.waiting == 0
    assert sorted(admitted.rows.loc[admitted.rows["label"] == "pet_insurance", "text"]) == sorted(
        f"pet_insurance text {i}" for i in range(11))

    # Once the champion knows the label, what waited is no longer pending.
    later = admit_new_labels(store, "m", rows("balance", 5), KNOWN + ["pet_insurance", "crypto"], min_examples=10)
    assert later.from_earlier == 0 and later.learned == [] and len(later.rows) == 5


def test_a_repeated_batch_does_not_count_twice(tmp_path):
    store = LocalStore(tmp_path)
    batch = rows("crypto", 6)
    assert admit_new_labels(store, "m", batch, KNOWN, min_examples=10).learned == []
    again = admit_new_labels(store, "m", batch, KNOWN, min_examples=10)  # the same six texts: still six
    assert again.learned == [] and again.waiting == 6


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    torch.set_num_threads(1)
    model = modeling.new_model(KNOWN, modeling.LoraSpec(), seed=0)
    return modeling.save_model(model, tmp_path_factory.mktemp("champion") / "adapter")


def test_grown_head_keeps_the_old_labels_and_answers_the_same(champion, tmp_path):
    grown = modeling.grow_head(champion, ["crypto", "balance"], tmp_path / "grown")
    assert json.loads((grown / modeling.LABELS_FILE).read_text()) == KNOWN + ["crypto"]
    tokenizer = modeling.load_tokenizer()
    texts = ["what is my balance", "send money to mom", "buy some bitcoin"]
    before = modeling.predict_proba(modeling.load_model(champion), tokenizer, texts)
    after = modeling.predict_proba(modeling.load_model(grown), tokenizer, texts)
    assert after.shape == (3, 3)
    # The old labels' logits are unchanged: renormalised over them, the answers are the champion's.
    np.testing.assert_allclose(after[:, :2] / after[:, :2].sum(axis=1, keepdims=True), before, atol=1e-5)


def test_a_warm_update_learns_a_new_label(champion, tmp_path):
    crypto = ["buy some bitcoin", "sell my ethereum", "what is the bitcoin price", "open a crypto wallet",
              "send bitcoin to a friend", "is crypto trading safe", "how much ethereum do i own",
              "convert my bitcoin to dollars", "crypto wallet balance please", "best coin to buy today"]
    frame = pd.concat([pd.DataFrame({"text": crypto, "label": "crypto"}),
                       pd.DataFrame({"text": ["what is my balance", "how much money do i have", "check my balance",
                                              "send money to mom", "transfer 50 dollars", "move cash to savings"],
                                     "label": ["balance"] * 3 + ["transfer"] * 3})], ignore_index=True)
    grown = modeling.grow_head(champion, ["crypto"], tmp_path / "grown")
    head = Recipe(name="head", start="warm", frozen_layers=6, epochs=30, learning_rate=0.01, batch_size=8)
    trained = train_adapter(frame, head, Rates(0.048, 2.5), warm_start=grown, seed=0)
    model = modeling.load_model(trained.adapter_dir)
    assert modeling.model_labels(model) == KNOWN + ["crypto"]
    predicted, _ = modeling.predict(model, modeling.load_tokenizer(), crypto)
    assert np.mean([p == "crypto" for p in predicted]) >= 0.8
