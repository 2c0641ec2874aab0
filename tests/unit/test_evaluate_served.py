"""The gate's figures come from the model as `refit serve` runs it: merged, on ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from refit import modeling
from refit.cost import Rates
from tasks.evaluate import score_models, served


def test_candidates_are_scored_as_served(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    labels = ["balance", "transfer", "oos"]
    adapter = modeling.save_model(modeling.new_model(labels, modeling.LoraSpec(), seed=1), tmp_path / "a")
    texts = ["what is my balance", "send 20 dollars to sam", "tell me a joke", "how much money is left"]
    sets = {"fresh": pd.DataFrame({"text": texts, "label": ["balance", "transfer", "oos", "balance"]}),
            "golden": pd.DataFrame({"text": texts[:2], "label": ["balance", "transfer"], "group": "banking"})}

    monkeypatch.setenv("REFIT_SERVE_RUNTIME", "onnx")
    [model] = served({"m": adapter}).values()
    assert model.runtime == "onnx"  # what `refit serve` answers with, not the unmerged peft model
    peft = modeling.predict(modeling.load_model(adapter), modeling.load_tokenizer(), texts)
    got = model.predict(texts)
    assert got[0] == peft[0]
    np.testing.assert_allclose(got[1], peft[1], atol=1e-4)

    scored = score_models({"champion": adapter}, sets, Rates(0.048, 2.5))["champion"]
    assert scored.cpu_seconds_per_1k > 0 and scored.latency_ms_p95 > 0
    assert scored.slices["fresh"].rows == 4 and set(scored.groups) == {"golden/banking"}
    expected = np.mean([p == t for p, t in zip(peft[0], sets["fresh"]["label"])])
    assert scored.slices["fresh"].accuracy == expected

    monkeypatch.setenv("REFIT_SERVE_RUNTIME", "torch")
    assert next(iter(served({"m": adapter}).values())).runtime == "torch"


def test_bulk_scoring_on_several_workers_matches_one(tmp_path):
    """``probabilities_of`` runs batches side by side on the one session: same numbers, same order, as one worker."""
    torch.set_num_threads(1)
    labels = ["balance", "transfer", "oos"]
    adapter = modeling.save_model(modeling.new_model(labels, modeling.LoraSpec(), seed=2), tmp_path / "a")
    [model] = served({"m": adapter}, runtime="onnx").values()
    texts = [f"{'please ' * (i % 9)}what is my balance number {i}" for i in range(150)]  # 5 batches, mixed lengths

    alone = model.probabilities_of(texts, workers=1)
    together = model.probabilities_of(texts, workers=3)

    assert model.runtime == "onnx" and alone.shape == (150, 3)
    np.testing.assert_allclose(together, alone, atol=1e-6)
    np.testing.assert_allclose(alone[7], model.probabilities([texts[7]])[0], atol=1e-5)  # each row is its own text
    assert model.predict(texts, workers=2)[0] == model.predict(texts)[0]
