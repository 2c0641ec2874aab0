"""Encoder states kept from the served pass stand in for the head rung's forward pass, and only when they match."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from refit import modeling
from refit.runtime.encoder_states import EncoderStates, fingerprint
from refit.store import LocalStore
from tasks.evaluate import load_served_models

LABELS = ["balance", "transfer", "weather", "oos"]


@pytest.fixture(scope="module")
def rows(data_dir):
    data = json.loads((data_dir / "data_full.json").read_text())
    picked = [(text, label) for text, label in data["train"] if label in LABELS[:3]]
    random.Random(0).shuffle(picked)
    return picked[:240]


@pytest.fixture()
def adapter(tmp_path):
    """A champion whose LoRA matrices are not zero, so merged weights (served) differ from the base."""
    torch.manual_seed(3)
    model = modeling.new_model(LABELS, modeling.LoraSpec(), seed=3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return modeling.save_model(model, tmp_path / "v1")


def _pass_states(adapter_dir, texts) -> torch.Tensor:
    """The training side's states: the unmerged PEFT model's last layer at the first position, in torch."""
    model, tokenizer = modeling.load_model(adapter_dir), modeling.load_tokenizer(adapter_dir)
    features = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**features, output_hidden_states=True).hidden_states[-1][:, 0]


def test_the_served_pass_returns_the_states_training_computes(adapter, rows):
    torch.set_num_threads(1)
    [champion] = load_served_models({"champion": adapter}, runtime="onnx").values()
    texts = [text for text, _ in rows[:70]]
    proba, states = champion.probabilities_and_states(texts, workers=2)
    assert champion.runtime == "onnx" and states.shape == (70, 384)
    np.testing.assert_allclose(proba, champion.probabilities_of(texts), atol=1e-6)
    expected = _pass_states(adapter, texts)
    assert float((torch.from_numpy(states) - expected).abs().max()) <= modeling.STATE_TOLERANCE * float(
        expected.abs().max())


def _train(adapter_dir, rows, known=None):
    model = modeling.load_model(adapter_dir, trainable=True)
    texts, labels = [t for t, _ in rows], [LABELS.index(label) for _, label in rows]
    stats = modeling.train_upper(model, modeling.load_tokenizer(adapter_dir), texts, labels, frozen_layers=6,
                                 epochs=4, learning_rate=0.02, batch_size=16, seed=0, known=known,
                                 distill=[i % 2 == 0 for i in range(len(texts))], distill_weight=0.3)
    return model, stats


def test_the_head_rung_skips_the_pass_for_kept_rows_and_learns_the_same(adapter, rows, tmp_path, caplog):
    torch.set_num_threads(1)
    [champion] = load_served_models({"champion": adapter}, runtime="onnx").values()
    store = LocalStore(tmp_path / "store")
    kept_texts = [text for text, _ in rows[:160]]  # the pool the cascade build ran on; rows[160:] are new
    _, states = champion.probabilities_and_states(kept_texts)
    assert EncoderStates.of(store, "m", adapter).save(kept_texts, states) == 160

    known = EncoderStates.of(store, "m", adapter).lookup([text for text, _ in rows])
    assert sum(k is not None for k in known) == 160
    plain, plain_stats = _train(adapter, rows)
    with caplog.at_level(logging.INFO, logger="refit.modeling"):
        reused, reused_stats = _train(adapter, rows, known)
    assert "not used" not in caplog.text

    tokenizer = modeling.load_tokenizer(adapter)
    lengths = [len(ids) for ids in tokenizer([t for t, _ in rows])["input_ids"]]
    probes = sorted(range(160))[:: 160 // modeling.STATE_PROBES][: modeling.STATE_PROBES]
    assert plain_stats.tokens_seen == sum(lengths)
    # The pass ran on the 80 new rows and the probes only.
    assert reused_stats.tokens_seen == sum(lengths[160:]) + sum(lengths[i] for i in probes)
    assert reused_stats.examples_seen == plain_stats.examples_seen
    assert (plain_stats.reused_states, reused_stats.reused_states) == (0, 160 - len(probes))
    texts = [t for t, _ in rows]
    same = np.mean(np.array(modeling.predict(plain, tokenizer, texts)[0]) ==
                   np.array(modeling.predict(reused, tokenizer, texts)[0]))
    assert same >= 0.95, same
    gold = [label for _, label in rows]
    assert np.mean(np.array(modeling.predict(reused, tokenizer, texts)[0]) == np.array(gold)) >= 0.8


def test_states_that_do_not_match_the_encoder_are_not_used(adapter, rows, caplog):
    torch.set_num_threads(1)
    wrong = [np.random.default_rng(i).normal(size=384).astype(np.float32) for i in range(len(rows))]
    with caplog.at_level(logging.INFO, logger="refit.modeling"):
        _, stats = _train(adapter, rows, wrong)
    tokenizer = modeling.load_tokenizer(adapter)
    assert "kept encoder states not used" in caplog.text and stats.reused_states == 0
    assert stats.tokens_seen == sum(len(ids) for ids in tokenizer([t for t, _ in rows])["input_ids"])


def test_kept_states_are_for_the_head_rung_only(adapter, rows):
    """With encoder layers to train, the kept states (the last layer's) are not what the pass needs."""
    model = modeling.load_model(adapter, trainable=True)
    texts, labels = [t for t, _ in rows[:40]], [LABELS.index(label) for _, label in rows[:40]]
    wrong = [np.zeros(384, np.float32)] * len(texts)
    stats = modeling.train_upper(model, modeling.load_tokenizer(adapter), texts, labels, frozen_layers=4, epochs=1,
                                 learning_rate=0.01, batch_size=16, known=wrong)
    tokenizer = modeling.load_tokenizer(adapter)
    assert stats.tokens_seen == 2 * sum(len(ids) for ids in tokenizer(texts)["input_ids"])  # pass + one epoch above


def test_the_fingerprint_follows_the_encoder_not_the_head(adapter, tmp_path):
    grown = modeling.grow_head(adapter, ["new_intent"], tmp_path / "grown")
    assert fingerprint(grown) == fingerprint(adapter)
    model = modeling.load_model(adapter, trainable=True)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_A" in n).add_(0.01)
    assert fingerprint(modeling.save_model(model, tmp_path / "v2")) != fingerprint(adapter)


def test_the_store_keeps_the_newest_rows_and_a_bad_file_is_a_miss(tmp_path, monkeypatch, caplog):
    import refit.runtime.encoder_states as encoder_states

    monkeypatch.setattr(encoder_states, "MAX_ROWS", 3)
    kept = EncoderStates(LocalStore(tmp_path), "m", "abc")
    assert kept.load() == {}
    vectors = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert kept.save(["a", "b", "c"], vectors[:3]) == 3
    assert kept.save(["d", "a"], vectors[[3, 0]] + 100) == 3  # b dropped: oldest; a renewed
    got = kept.lookup(["a", "b", "c", "d", "A"])
    assert got[1] is None and got[4] is None  # exact text: "A" is not "a"
    np.testing.assert_array_equal(got[0], vectors[0] + 100)
    np.testing.assert_array_equal(got[2], vectors[2])
    with pytest.raises(ValueError, match="2 texts but 1 states"):
        kept.save(["x", "y"], vectors[:1])

    kept.store.put_bytes(kept.key, b"not an npz file")
    with caplog.at_level(logging.WARNING, logger="refit.runtime.encoder_states"):
        assert kept.load() == {}
    assert "unreadable" in caplog.text


def test_only_the_newest_encoders_are_kept(tmp_path, monkeypatch):
    import refit.runtime.encoder_states as encoder_states

    monkeypatch.setattr(encoder_states, "KEEP_ENCODERS", 2)
    store = LocalStore(tmp_path)
    for encoder in ("e1", "e2", "e1", "e3"):  # e1 rewritten after e2: e2 is the oldest when e3 arrives
        EncoderStates(store, "m", encoder).save(["a"], np.ones((1, 2), np.float32))
    EncoderStates(store, "other", "e9").save(["a"], np.ones((1, 2), np.float32))
    names = sorted(key.rsplit("/", 1)[1] for key in store.list("cache/model=m/"))
    assert names == ["e1.npz", "e3.npz", "index.json"]
    assert store.exists("cache/model=other/encoder-states/e9.npz")  # another model's are its own


def test_saves_at_once_lose_no_rows_and_no_encoder(tmp_path, monkeypatch):
    """Builds that save at the same moment (two promotions, an adopt beside an update) each keep what they wrote."""
    from concurrent.futures import ThreadPoolExecutor

    import refit.runtime.encoder_states as encoder_states

    monkeypatch.setattr(encoder_states, "KEEP_ENCODERS", 10)
    store = LocalStore(tmp_path)

    def save(worker: int) -> None:
        for round_ in range(4):
            texts = [f"w{worker} r{round_} t{i}" for i in range(3)]
            EncoderStates(store, "m", "shared").save(texts, np.full((3, 2), worker, np.float32))
            EncoderStates(store, "m", f"own-{worker}").save(texts, np.ones((3, 2), np.float32))

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(save, range(6)))
    kept = EncoderStates(store, "m", "shared").load()
    assert len(kept) == 6 * 4 * 3
    index = json.loads(store.get_bytes("cache/model=m/encoder-states/index.json"))
    assert sorted(index) == sorted(["shared", *(f"own-{w}" for w in range(6))])
    files = {key.rsplit("/", 1)[1] for key in store.list("cache/model=m/encoder-states/")} - {"index.json"}
    assert files == {f"{encoder}.npz" for encoder in index}  # no file outlives its place in the index


def _new_head(adapter_dir, out_dir, seed: int = 5):
    """A head-rung update of ``adapter_dir``: the same encoder, the pooler and classifier moved."""
    model = modeling.load_model(adapter_dir, trainable=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_" not in name:  # the head's trainable copies
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return modeling.save_model(model, out_dir)


class Counting:
    """A served model that counts the texts its whole pass ran on."""

    def __init__(self, model):
        self.inner, self.ran = model, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def probabilities_and_states(self, texts, workers=1):
        self.ran.extend(texts)
        return self.inner.probabilities_and_states(texts, workers=workers)


def test_a_new_head_on_kept_states_answers_as_its_own_served_pass(adapter, rows, tmp_path, caplog):
    """After a head-only update the champion's answers on kept texts are its head on the states, not a pass."""
    from refit.runtime.encoder_states import outputs_of

    torch.set_num_threads(1)
    updated = _new_head(adapter, tmp_path / "v2")
    assert fingerprint(updated) == fingerprint(adapter)
    [old] = load_served_models({"v1": adapter}, runtime="onnx").values()
    kept_texts = [text for text, _ in rows[:160]]
    store = LocalStore(tmp_path / "store")
    EncoderStates.of(store, "m", adapter).save(kept_texts, old.probabilities_and_states(kept_texts)[1])

    [new] = load_served_models({"v2": updated}, runtime="onnx").values()
    texts = [text for text, _ in rows[:200]]  # 160 kept, 40 new
    counting = Counting(new)
    with caplog.at_level(logging.INFO, logger="refit.runtime.encoder_states"):
        got = outputs_of(counting, texts, EncoderStates.of(store, "m", updated).load(), workers=2)
    proba, states = new.probabilities_and_states(texts)

    assert "not used" not in caplog.text
    assert got.reused == 160 - modeling.STATE_PROBES
    assert len(counting.ran) == 40 + modeling.STATE_PROBES and set(texts[160:]) <= set(counting.ran)
    np.testing.assert_allclose(got.probabilities, proba, atol=1e-4)
    np.testing.assert_allclose(got.states, states, atol=1e-4)
    assert (got.probabilities.argmax(axis=1) == proba.argmax(axis=1)).all()
    assert not np.allclose(proba, old.probabilities_of(texts), atol=1e-3)  # the head did change


def test_states_of_another_encoder_are_not_used_by_the_served_model(adapter, rows, tmp_path, caplog):
    from refit.runtime.encoder_states import outputs_of, state_key

    torch.set_num_threads(1)
    [model] = load_served_models({"v1": adapter}, runtime="onnx").values()
    texts = [text for text, _ in rows[:60]]
    wrong = {state_key(t): np.random.default_rng(i).normal(size=384).astype(np.float32) for i, t in enumerate(texts)}
    counting = Counting(model)
    with caplog.at_level(logging.INFO, logger="refit.runtime.encoder_states"):
        got = outputs_of(counting, texts, wrong)
    assert "kept encoder states not used (kept states differ" in caplog.text
    assert got.reused == 0 and got.why_not and sorted(counting.ran) == sorted(texts)
    np.testing.assert_allclose(got.probabilities, model.probabilities_of(texts), atol=1e-5)


def test_the_fingerprint_does_not_depend_on_the_order_peft_wrote_its_target_modules(adapter, tmp_path):
    """peft writes target_modules from a set: another process may list them in another order, same encoder."""
    import shutil

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert len(config["target_modules"]) > 1
    other = Path(shutil.copytree(adapter, tmp_path / "same-encoder"))
    config["target_modules"] = list(reversed(config["target_modules"]))
    (other / "adapter_config.json").write_text(json.dumps(config))
    assert fingerprint(other) == fingerprint(adapter)


def test_a_head_update_keeps_the_states_it_computed_for_its_new_rows(adapter, rows, tmp_path):
    """The new version's passes (its cascade's teacher, later updates) read them: its encoder is the champion's."""
    import pandas as pd

    from refit.cost import Rates
    from refit.runtime.encoder_states import outputs_of
    from tasks.finetune import load_update_policy, train_adapter

    torch.set_num_threads(1)
    [champion] = load_served_models({"champion": adapter}, runtime="onnx").values()
    store = LocalStore(tmp_path / "store")
    texts = [text for text, _ in rows]
    EncoderStates.of(store, "m", adapter).save(texts[:160], champion.probabilities_and_states(texts[:160])[1])
    frame = pd.DataFrame({"text": texts, "label": [label for _, label in rows],
                          "origin": ["replay"] * 160 + ["new"] * 80})
    head = next(recipe for recipe in load_update_policy()[0].ladder if recipe.name == "head")
    trained = train_adapter(frame, head, Rates(0.1, 1.0), warm_start=adapter,
                            states=EncoderStates.of(store, "m", adapter))

    kept = EncoderStates.of(store, "m", trained.adapter_dir).load()
    assert len(kept) == 240  # the 80 new rows' states beside the 160 kept before
    [new] = load_served_models({"new": trained.adapter_dir}, runtime="onnx").values()
    out = outputs_of(new, texts, kept)
    assert out.reused == 240 - modeling.STATE_PROBES and not out.why_not
    np.testing.assert_allclose(out.probabilities, new.probabilities_of(texts), atol=1e-4)
    served = new.probabilities_and_states(texts[160:])[1]
    np.testing.assert_allclose(out.states[160:], served, atol=modeling.STATE_TOLERANCE * float(np.abs(served).max()))


def test_keep_is_a_cache_write_a_failure_is_logged_not_raised(tmp_path, caplog):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the store's root should be")
    states = EncoderStates(LocalStore(blocked), "m", encoder="e")
    with pytest.raises(Exception):
        states.save(["a text"], np.zeros((1, 4), np.float32))
    with caplog.at_level(logging.ERROR):
        assert states.keep(["a text"], np.zeros((1, 4), np.float32)) == 0
    assert "encoder states e not kept" in caplog.text
    assert EncoderStates(LocalStore(tmp_path / "ok"), "m", encoder="e").keep(["a text"], np.ones((1, 4))) == 1
