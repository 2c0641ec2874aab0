"""The gate's figures come from the model as `refit serve` runs it: merged, on ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from refit import modeling
from refit.cost import Rates
from tasks.evaluate import load_served_models, score_models


def test_candidates_are_scored_as_served(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    labels = ["balance", "transfer", "oos"]
    adapter = modeling.save_model(modeling.new_model(labels, modeling.LoraSpec(), seed=1), tmp_path / "a")
    texts = ["what is my balance", "send 20 dollars to sam", "tell me a joke", "how much money is left"]
    sets = {"fresh": pd.DataFrame({"text": texts, "label": ["balance", "transfer", "oos", "balance"]}),
            "golden": pd.DataFrame({"text": texts[:2], "label": ["balance", "transfer"], "group": "banking"})}

    monkeypatch.setenv("REFIT_SERVE_RUNTIME", "onnx")
    [model] = load_served_models({"m": adapter}).values()
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
    assert next(iter(load_served_models({"m": adapter}).values())).runtime == "torch"


def test_bulk_scoring_on_several_workers_matches_one(tmp_path):
    """``probabilities_of`` runs batches side by side on the one session: same numbers, same order, as one worker."""
    torch.set_num_threads(1)
    labels = ["balance", "transfer", "oos"]
    adapter = modeling.save_model(modeling.new_model(labels, modeling.LoraSpec(), seed=2), tmp_path / "a")
    [model] = load_served_models({"m": adapter}, runtime="onnx").values()
    texts = [f"{'please ' * (i % 9)}what is my balance number {i}" for i in range(150)]  # 5 batches, mixed lengths

    alone = model.probabilities_of(texts, workers=1)
    together = model.probabilities_of(texts, workers=3)

    assert model.runtime == "onnx" and alone.shape == (150, 3)
    np.testing.assert_allclose(together, alone, atol=1e-6)
    np.testing.assert_allclose(alone[7], model.probabilities([texts[7]])[0], atol=1e-5)  # each row is its own text
    assert model.predict(texts, workers=2)[0] == model.predict(texts)[0]


def _head_update(adapter_dir, out_dir):
    """The same encoder with another head: what the ladder's head rung promotes."""
    model = modeling.load_model(adapter_dir, trainable=True)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_" not in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    return modeling.save_model(model, out_dir)


def test_a_pair_on_one_encoder_runs_it_once_and_kept_states_spare_the_next_evaluation(tmp_path, monkeypatch):
    """Champion and a head-rung challenger: each scored as its own served pass would score it, for less."""
    import tasks.evaluate
    from refit.runtime.encoder_states import EncoderStates
    from refit.store import LocalStore

    torch.set_num_threads(1)
    labels = ["balance", "transfer", "oos"]
    champion = modeling.save_model(modeling.new_model(labels, modeling.LoraSpec(), seed=4), tmp_path / "v1")
    challenger = _head_update(champion, tmp_path / "v2")
    texts = [f"{'please ' * (i % 5)}{w} {i}" for i, w in enumerate(["what is my balance", "send money to sam",
                                                                      "tell me a joke"] * 14)]
    sets = {"golden": pd.DataFrame({"text": texts[:30], "label": [labels[i % 3] for i in range(30)],
                                    "group": ["a", "b"] * 15}),
            "fresh": pd.DataFrame({"text": texts[30:], "label": [labels[i % 2] for i in range(12)]})}
    runs: list[int] = []
    loaded = tasks.evaluate.load_served_models

    def counted(adapter_dirs, runtime=None):
        models = loaded(adapter_dirs, runtime)
        for model in models.values():
            if "probabilities_and_states" not in vars(model):  # loaded models are reused: count each pass once
                inner = model.probabilities_and_states
                object.__setattr__(model, "probabilities_and_states", lambda batch, workers=1, inner=inner:
                                   runs.append(len(batch)) or inner(batch, workers))
        return models

    monkeypatch.setattr(tasks.evaluate, "load_served_models", counted)
    store = LocalStore(tmp_path / "store")
    first = score_models({"champion": champion, "challenger": challenger}, sets, Rates(0.048, 2.5), store, "m")
    # The pair: the challenger's pass over the 42 texts, the champion's over its probes only.
    assert runs == [42, modeling.STATE_PROBES]
    assert len(EncoderStates.of(store, "m", challenger).load()) == 42
    alone = {name: score_models({name: path}, sets, Rates(0.048, 2.5))[name]
             for name, path in {"champion": champion, "challenger": challenger}.items()}
    for name in ("champion", "challenger"):
        for set_name in sets:
            np.testing.assert_array_equal(first[name].correct[set_name], alone[name].correct[set_name])
            assert first[name].slices[set_name].mean_confidence == pytest.approx(
                alone[name].slices[set_name].mean_confidence, abs=1e-5)
        assert first[name].groups.keys() == alone[name].groups.keys()
    assert first["champion"].slices["golden"].accuracy != first["challenger"].slices["golden"].accuracy or \
        first["champion"].slices["golden"].mean_confidence != first["challenger"].slices["golden"].mean_confidence

    runs.clear()
    again = score_models({"champion": champion, "challenger": challenger}, sets, Rates(0.048, 2.5), store, "m")
    assert runs == [modeling.STATE_PROBES] * 2  # every text kept: probes only
    for name in ("champion", "challenger"):
        for set_name in sets:
            np.testing.assert_array_equal(again[name].correct[set_name], first[name].correct[set_name])


def test_an_evaluation_says_what_it_scored_and_a_loaded_model_is_reused(tmp_path):
    from tasks.evaluate import LOADED_MODELS, adapter_digest, set_digest

    torch.set_num_threads(1)
    labels = ["balance", "transfer", "oos"]
    adapters = [modeling.save_model(modeling.new_model(labels, modeling.LoraSpec(), seed=s), tmp_path / f"a{s}")
                for s in range(LOADED_MODELS + 1)]
    frame = pd.DataFrame({"text": ["what is my balance", "send 20 dollars"], "label": ["balance", "transfer"]})
    scored = score_models({"m": adapters[0]}, {"golden": frame}, Rates(0.048, 2.5))["m"]
    assert scored.runtime == load_served_models({"m": adapters[0]})["m"].runtime
    assert scored.adapter_digest == adapter_digest(adapters[0]) != adapter_digest(adapters[1])
    assert scored.set_digests == {"golden": set_digest(frame)} != {"golden": set_digest(frame.iloc[:1])}

    first = load_served_models({"m": adapters[0]})["m"]
    assert load_served_models({"m": adapters[0]})["m"] is first  # the same files: the same served model
    load_served_models({f"m{i}": path for i, path in enumerate(adapters[1:])})  # newer loads push it out
    assert load_served_models({"m": adapters[0]})["m"] is not first


def test_the_reference_snapshot_takes_the_evaluations_answers_and_runs_only_the_rest(tmp_path):
    """``write_reference`` reads what the evaluation answered as served; texts it did not score run the model."""
    from refit.store import LocalStore
    from tasks.deploy import read_reference, write_reference

    torch.set_num_threads(1)
    labels = ["balance", "transfer", "oos"]
    adapter = modeling.save_model(modeling.new_model(labels, modeling.LoraSpec(), seed=3), tmp_path / "a")
    golden = pd.DataFrame({"text": ["what is my balance", "send 20 dollars to sam", "tell me a joke"],
                           "label": ["balance", "transfer", "oos"]})
    scored = score_models({"m": adapter}, {"golden": golden}, Rates(0.048, 2.5))["m"]
    served = load_served_models({"m": adapter})["m"].predict(golden["text"].tolist())
    assert [scored.answers[t][0] for t in golden["text"]] == list(served[0])
    np.testing.assert_allclose([scored.answers[t][1] for t in golden["text"]], served[1], atol=1e-6)

    store = LocalStore(tmp_path / "store")
    # Every sampled text answered: the model is never run (None would fail if it were).
    write_reference.fn(store, "m", 1, None, None, pool=golden, trained_on=golden, answers=scored.answers)
    sample, _ = read_reference(store, "m", 1)
    assert {t: (label, pytest.approx(c)) for t, label, c in
            zip(sample["text"], sample["predicted_label"], sample["confidence"])} == dict(scored.answers)

    # One text the evaluation did not score runs through the model, as before.
    more = pd.concat([golden, pd.DataFrame({"text": ["how much money is left"], "label": ["balance"]})])
    model = modeling.load_model(adapter)
    write_reference.fn(store, "m", 2, model, modeling.load_tokenizer(), pool=more, trained_on=more,
                       answers=scored.answers)
    sample, _ = read_reference(store, "m", 2)
    ran = modeling.predict(model, modeling.load_tokenizer(), ["how much money is left"])
    row = sample.set_index("text").loc["how much money is left"]
    assert row["predicted_label"] == ran[0][0] and row["confidence"] == pytest.approx(float(ran[1][0]))


def test_bulk_batches_group_texts_of_one_token_length_and_pad_little(tmp_path):
    """Bulk scoring pads each batch by at most MAX_PADDING of its tokens, and answers each text as alone."""
    from refit.runtime.served import MAX_PADDING

    torch.set_num_threads(1)
    adapter = modeling.save_model(modeling.new_model(["a", "b"], modeling.LoraSpec(), seed=5), tmp_path / "a")
    [model] = load_served_models({"m": adapter}, runtime="onnx").values()
    texts = [" ".join(["word"] * (1 + (i * 7) % 23)) + f" {i}" for i in range(120)]
    batches = model._batches(texts)
    assert sorted(i for batch in batches for i in batch) == list(range(120))
    lengths = [len(p) for p in model.tokenizer(texts)["input_ids"]]
    for batch in batches:
        own = sum(lengths[i] for i in batch)
        assert len(batch) <= model.batch_size and len(batch) * max(lengths[i] for i in batch) <= (1 + MAX_PADDING) * own
    assert len(batches) < 40  # texts of one length still share a batch
    alone = np.concatenate([model.probabilities([t]) for t in texts])
    np.testing.assert_allclose(model.probabilities_of(texts), alone, atol=1e-5)
    assert model._batches([]) == [] and model.probabilities_of([]).shape == (0, 2)


def test_cost_and_latency_are_metered_with_numpys_blas_on_one_thread():
    """Threads a BLAS product leaves spinning would be billed to whatever the meter times next."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from tasks.evaluate import _one_thread

    def blas_threads() -> set[int]:
        return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}

    with threadpool_limits(limits=2, user_api="blas"):
        assert blas_threads() == {2}
        with _one_thread():
            assert blas_threads() == {1} and torch.get_num_threads() == 1
        assert blas_threads() == {2}
