"""New labels from a few rows: a head row started from its examples, pseudo-labels from unlabelled traffic, and a
policy that lets a trickle of labels be learned and judged, never on a row it trained on."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from refit import modeling
from refit.cost import Rates
from refit.data import text_hash
from refit.errors import RefitError
from refit.store import LocalStore
from tasks.finetune import (Recipe, add_pseudo_labels, assemble, load_update_policy, prepare_update, pseudo_labels,
                            train_adapter)
from tasks.ingest import admit_new_labels

KNOWN = ["balance", "transfer"]
BANKING = pd.DataFrame({
    "text": ["what is my balance", "how much money do i have", "check my balance", "balance of my checking account",
             "how much is left in savings", "send money to mom", "transfer 50 dollars", "move cash to savings",
             "wire funds to my landlord", "pay jane back 20 dollars"],
    "label": ["balance"] * 5 + ["transfer"] * 5})
CRYPTO = ["buy some bitcoin", "sell my ethereum", "what is the bitcoin price", "open a crypto wallet",
          "send bitcoin to a friend", "how much ethereum do i own", "convert my bitcoin to dollars",
          "is it a good day to buy crypto", "price of dogecoin today", "trade my litecoin for bitcoin"]
RATES = Rates(0.048, 2.5)


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """A champion that knows balance and transfer (its head trained a little on them)."""
    torch.set_num_threads(1)
    first = modeling.save_model(modeling.new_model(KNOWN, modeling.LoraSpec(), seed=0),
                                tmp_path_factory.mktemp("blank") / "adapter")
    head = Recipe(name="head", start="warm", frozen_layers=6, epochs=20, learning_rate=0.01, batch_size=8)
    return train_adapter(BANKING, head, RATES, warm_start=first, seed=0).adapter_dir


def examples(crypto: int = 4) -> pd.DataFrame:
    """An update's training frame: a few crypto rows, the known labels' rows beside them."""
    return pd.concat([pd.DataFrame({"text": CRYPTO[:crypto], "label": "crypto"}), BANKING], ignore_index=True)


def head_rows(adapter_dir) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = load_file(str(adapter_dir / modeling.ADAPTER_WEIGHTS))
    weight = next(v for k, v in tensors.items() if k.endswith("classifier.weight"))
    bias = next(v for k, v in tensors.items() if k.endswith("classifier.bias"))
    return weight, bias


def test_a_new_label_starts_where_its_examples_are(champion, tmp_path):
    frame = examples(4)
    grown = modeling.grow_head(champion, ["crypto"], tmp_path / "grown", examples=frame)
    assert json.loads((grown / modeling.LABELS_FILE).read_text()) == KNOWN + ["crypto"]
    features, _ = modeling.head_features(modeling.load_model(champion), modeling.load_tokenizer(champion),
                                         frame["text"].tolist())
    crypto = (frame["label"] == "crypto").to_numpy()
    toward = features[crypto].mean(axis=0) - features[~crypto].mean(axis=0)
    (old_w, old_b), (w, b) = head_rows(champion), head_rows(grown)
    row = w[2].numpy()
    # It points from the champion's average input to its examples' mean (a blank row points nowhere) ...
    assert float(row @ toward) / (np.linalg.norm(row) * np.linalg.norm(toward)) > 0.999
    # ... on the old rows' scale, and the old rows are untouched.
    assert float(w[2].norm()) == pytest.approx(float(old_w.norm(dim=1).mean()), rel=1e-4)
    torch.testing.assert_close(w[:2], old_w)
    torch.testing.assert_close(b[:2], old_b)

    _, logits = modeling.head_features(modeling.load_model(grown), modeling.load_tokenizer(grown),
                                       frame["text"].tolist())
    # Competitive where its examples are: on them, its logit ties on average with the champion's best one;
    # behind where they are not: lower on the known labels' rows than on its own.
    assert logits[crypto, 2].mean() == pytest.approx(logits[crypto, :2].max(axis=1).mean(), abs=1e-3)
    assert logits[~crypto, 2].mean() < logits[crypto, 2].mean() - 0.5
    blank = modeling.grow_head(champion, ["crypto"], tmp_path / "blank")
    _, blank_logits = modeling.head_features(modeling.load_model(blank), modeling.load_tokenizer(blank),
                                             frame["text"].tolist())
    assert np.ptp(blank_logits[:, 2]) < 1e-5  # a blank row gives every text the same logit

    # The old labels answer as before: renormalised over them, the champion's probabilities.
    texts = BANKING["text"].tolist()
    before = modeling.predict_proba(modeling.load_model(champion), modeling.load_tokenizer(champion), texts)
    after = modeling.predict_proba(modeling.load_model(grown), modeling.load_tokenizer(grown), texts)
    np.testing.assert_allclose(after[:, :2] / after[:, :2].sum(axis=1, keepdims=True), before, atol=1e-5)


def test_without_examples_or_readable_features_a_new_label_starts_blank(champion, tmp_path, monkeypatch):
    old_w, old_b = head_rows(champion)
    # "pets" has no rows in the examples: a blank row beside crypto's prototype.
    grown = modeling.grow_head(champion, ["crypto", "pets"], tmp_path / "grown", examples=examples(4))
    w, b = head_rows(grown)
    assert float(w[2].abs().sum()) > 0 and float(w[3].abs().sum()) == 0
    assert float(b[3]) == pytest.approx(float(old_b.mean()))

    def unreadable(*args, **kwargs):
        raise RefitError("the logits layer reads inputs of shape (2, 3, 32), not one per text")

    monkeypatch.setattr(modeling, "head_features", unreadable)
    fallback = modeling.grow_head(champion, ["crypto"], tmp_path / "fallback", examples=examples(4))
    w, b = head_rows(fallback)
    assert float(w[2].abs().sum()) == 0 and float(b[2]) == pytest.approx(float(old_b.mean()))


def test_a_dense_head_family_gets_its_prototype_in_the_output_layer(tmp_path):
    from tests.unit.test_families import FRAME, LABELS, build_checkpoint

    checkpoint = build_checkpoint("roberta", tmp_path / "roberta")
    v1 = modeling.save_model(modeling.adopt_checkpoint(checkpoint, modeling.LoraSpec()), tmp_path / "v1")
    frame = pd.concat([FRAME, pd.DataFrame({"text": CRYPTO[:4], "label": "crypto"})], ignore_index=True)
    grown = modeling.grow_head(v1, ["crypto"], tmp_path / "grown", examples=frame)
    tensors = load_file(str(grown / modeling.ADAPTER_WEIGHTS))
    out = next(v for k, v in tensors.items() if k.endswith("out_proj.weight"))
    dense = next(v for k, v in tensors.items() if k.endswith("dense.weight") and "classifier" in k)
    assert out.shape[0] == len(LABELS) + 1 and float(out[-1].abs().sum()) > 0
    assert dense.shape[0] == dense.shape[1]  # the layer before the logits is not grown
    model = modeling.load_model(grown)
    assert modeling.model_labels(model) == LABELS + ["crypto"]


def trickle(new_rows: dict[str, int], known_rows: int = 24) -> pd.DataFrame:
    """About 80 labelled rows: a few per new label, and single rows of known labels, in arrival order."""
    rows = [(f"{label} question {i}", label) for label, n in new_rows.items() for i in range(n)]
    rows += [(f"known question {i}", KNOWN[i % 2]) for i in range(known_rows)]
    frame = pd.DataFrame(rows, columns=["text", "label"]).sample(frac=1.0, random_state=0)
    return frame.assign(timestamp=pd.Timestamp("2026-01-01", tz="UTC")
                        + pd.to_timedelta(np.arange(len(frame)), unit="min"))


def test_a_trickle_of_labels_is_learned_and_judged(tmp_path):
    policy, _ = load_update_policy()
    counts = {f"new{j}": 1 + j % 3 for j in range(27)}  # 1, 2 or 3 rows for each of 27 new labels: 54 rows
    arrived = trickle(counts)
    admitted = admit_new_labels(LocalStore(tmp_path), "m", arrived, KNOWN, policy.min_examples_per_new_label)
    assert admitted.learned == sorted(counts) and admitted.waiting == 0  # one row is enough to start learning
    pool = trickle({}, 40).drop(columns="timestamp").assign(text=lambda f: "old " + f["text"])
    golden = trickle({}, 10).drop(columns="timestamp").assign(text=lambda f: "gold " + f["text"])
    data = prepare_update(admitted.rows, pool, golden, KNOWN, admitted.learned, policy, "window")
    fresh = data.fresh["label"].value_counts()
    # A new label with two or three rows gives its newest to the fresh set; one with a single row trains on it.
    assert {label: int(fresh.get(label, 0)) for label in counts} == {label: int(n >= 2) for label, n in counts.items()}
    assert len(data.fresh) >= policy.min_fresh_rows
    trained = data.training.frame
    assert set(trained.loc[trained["origin"] == "new", "label"]) >= set(counts)
    assert not set(data.fresh["text"].map(text_hash)) & set(trained["text"].map(text_hash))


def test_too_few_fresh_rows_still_wait():
    policy, _ = load_update_policy()
    new = trickle({}, 60)  # 60 rows of two known labels hold out 16 fresh rows: enough
    prepare_update(new, new.head(0), trickle({}, 4).assign(text=lambda f: "gold " + f["text"]), KNOWN, [], policy, "w")
    few = trickle({f"k{j}": 5 for j in range(12)}, 0)  # 60 rows, one fresh row per label: 12
    with pytest.raises(RefitError, match="min_fresh_rows"):
        prepare_update(few, few.head(0), trickle({}, 4), [f"k{j}" for j in range(12)], [], policy, "window")


def test_the_head_rung_of_an_update_that_grows_the_head_takes_enough_steps():
    policy, _ = load_update_policy()
    new = trickle({"new0": 3, "new1": 3}, 60)
    pool = trickle({}, 40).drop(columns="timestamp").assign(text=lambda f: "old " + f["text"])
    head, top = policy.ladder[0], policy.ladder[1]
    grows = prepare_update(new, pool, trickle({}, 4).assign(text=lambda f: "gold " + f["text"]), KNOWN,
                           ["new0", "new1"], policy, "w")
    steps = lambda recipe: recipe.epochs * -(-len(grows.training.frame) // recipe.batch_size)  # noqa: E731
    assert steps(grows.recipe(head, policy)) >= policy.new_label_min_steps > steps(head)
    assert grows.recipe(top, policy).epochs == top.epochs  # a rung that trains encoder layers pays per step
    plain = prepare_update(new[~new["label"].str.startswith("new")], pool, trickle({}, 4).assign(
        text=lambda f: "gold " + f["text"]), KNOWN, [], policy, "w")
    assert plain.recipe(head, policy) == head


def test_a_label_learned_from_a_handful_of_rows_trains_as_a_new_one(champion):
    policy, _ = load_update_policy()
    young = policy.young_label_rows
    assert young > 1
    # The champion learned "crypto" from fewer rows than young_label_rows, "balance" and "transfer" from plenty.
    pool = pd.concat([trickle({}, 40).drop(columns="timestamp").assign(text=lambda f: "old " + f["text"]),
                      pd.DataFrame({"text": CRYPTO[:young - 1], "label": "crypto"})], ignore_index=True)
    new = pd.concat([pd.DataFrame({"text": CRYPTO[young - 1:], "label": "crypto"}), trickle({}, 60)],
                    ignore_index=True)
    new = new.assign(timestamp=pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(np.arange(len(new)), unit="min"))
    golden = trickle({}, 4).assign(text=lambda f: "gold " + f["text"])
    data = prepare_update(new, pool, golden, KNOWN + ["crypto"], [], policy, "w")
    assert data.young == ("crypto",) and data.learned == [] and data.teaching == ["crypto"]
    head = policy.ladder[0]
    steps = data.recipe(head, policy).epochs * -(-len(data.training.frame) // head.batch_size)
    assert steps >= policy.new_label_min_steps
    assert data.recipe(head, policy).distill_weight >= policy.new_label_distill_weight
    # Its look-alikes in unlabelled traffic are lent its label, as a new label's are; the head does not grow.
    traffic = ["crypto wallet fees", "buy more ether", "sell half of my bitcoin", "how much money do i have"]
    lent = add_pseudo_labels(data, pool, champion, traffic, policy.model_copy(update={"pseudo_label_margin": 0.0}),
                             RATES)
    assert lent.training.pseudo_rows > 0
    assert set(lent.training.frame.loc[lent.training.frame["origin"] == "pseudo", "label"]) == {"crypto"}
    assert lent.labels == KNOWN + ["crypto"]
    # With as many rows as young_label_rows it is simply known; 0 switches young labels off.
    grown = pd.concat([pool, pd.DataFrame({"text": ["one more crypto row"], "label": "crypto"})], ignore_index=True)
    assert prepare_update(new, grown, golden, KNOWN + ["crypto"], [], policy, "w").young == ()
    # A label the pool has no row of was learned elsewhere (an adopted model's): not young either.
    assert prepare_update(new, pool[pool["label"] != "crypto"], golden, KNOWN + ["crypto"], [], policy, "w").young == ()
    off = policy.model_copy(update={"young_label_rows": 0})
    assert prepare_update(new, pool, golden, KNOWN + ["crypto"], [], off, "w").recipe(head, policy) == head


def test_pseudo_rows_count_with_new_rows_and_never_repeat_evaluation_texts():
    new = pd.DataFrame({"text": ["n1", "n2"], "label": ["crypto", "crypto"]})
    pseudo = pd.DataFrame({"text": ["p1", "P1 ", "n1", "fresh text"], "label": ["crypto"] * 4})
    pool = pd.DataFrame({"text": [f"old {i}" for i in range(20)] + ["p1"], "label": ["balance"] * 21})
    out = assemble(new, pool, {text_hash("fresh text")}, replay_ratio=2.0, seed=0, per_label=True, pseudo=pseudo)
    assert out.new_rows == 2 and out.pseudo_rows == 1  # duplicates, a labelled text and an evaluation text left out
    assert out.replay_rows == 6 and "p1" not in set(out.frame.loc[out.frame["origin"] == "replay", "text"])
    assert list(out.frame["origin"].value_counts().sort_index().items()) == [("new", 2), ("pseudo", 1), ("replay", 6)]


def test_unlabelled_texts_take_a_new_label_only_where_it_is_clearly_theirs(champion):
    labelled = examples(3)
    unlabelled = CRYPTO[3:] + ["how much money is in my checking account", "send 30 dollars to my sister"]
    found = pseudo_labels(champion, labelled, unlabelled + CRYPTO[:3] + ["fresh: buy dogecoin now"], ["crypto"],
                          {text_hash("fresh: buy dogecoin now")}, margin=0.0, per_label=40)
    assert set(found["label"]) == {"crypto"}
    assert set(found["text"]) <= set(CRYPTO[3:])  # neither banking texts, labelled texts nor the evaluation text
    assert len(found) >= 5
    assert len(pseudo_labels(champion, labelled, unlabelled, ["crypto"], set(), margin=0.0, per_label=2)) == 2
    assert pseudo_labels(champion, labelled, unlabelled, ["crypto"], set(), margin=2.0, per_label=40).empty


def test_no_fresh_or_golden_row_is_ever_trained_on_with_pseudo_labels(champion):
    policy, _ = load_update_policy()
    crypto = pd.DataFrame({"text": CRYPTO[:8], "label": "crypto"})
    known = pd.concat([BANKING, pd.DataFrame({"text": [f"known question {i}" for i in range(50)],
                                               "label": [KNOWN[i % 2] for i in range(50)]})], ignore_index=True)
    new = pd.concat([crypto, known], ignore_index=True)
    new = new.assign(timestamp=pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(np.arange(len(new)), unit="min"))
    golden = pd.DataFrame({"text": ["sell all my bitcoin", "what is my savings balance"], "label": ["crypto", "balance"],
                           "group": "g"})
    pool = BANKING.assign(text="old " + BANKING["text"])
    data = prepare_update(new, pool, golden, KNOWN, ["crypto"], policy, "window")
    # The window's traffic holds every labelled text (fresh ones too), the golden texts and texts never labelled.
    traffic = new["text"].tolist() + golden["text"].tolist() + CRYPTO[8:] + ["crypto wallet fees", "buy more ether"]
    with_pseudo = add_pseudo_labels(data, pool, champion, traffic, policy, RATES)
    frame = with_pseudo.training.frame
    assert with_pseudo.training.pseudo_rows > 0 and with_pseudo.pseudo_cost.cpu_seconds > 0
    assert set(frame.loc[frame["origin"] == "pseudo", "label"]) == {"crypto"}
    trained = set(frame["text"].map(text_hash))
    assert not set(with_pseudo.fresh["text"].map(text_hash)) & trained
    assert not set(golden["text"].map(text_hash)) & trained
    assert with_pseudo.training.replay_rows >= data.training.replay_rows
    off = policy.model_copy(update={"pseudo_label_margin": None})
    assert add_pseudo_labels(data, pool, champion, traffic, off, RATES) is data
