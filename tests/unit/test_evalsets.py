"""What an update is judged on: the fresh holdout of its own labels, and the golden suite that grows."""

from __future__ import annotations

import pandas as pd
import pytest

from refit.data import fingerprint, text_hash, text_keys
from refit.errors import RefitError
from refit.evalsets import read_golden, split_fresh, suite_with_fresh, write_golden
from refit.store import LocalStore
from tasks.finetune import load_update_policy, prepare_update


def labelled(per_label: dict[str, int], start: str = "2026-01-01") -> pd.DataFrame:
    rows = [(f"{label} request {i}", label, pd.Timestamp(start, tz="UTC") + pd.Timedelta(minutes=i))
            for label, n in per_label.items() for i in range(n)]
    return pd.DataFrame(rows, columns=["text", "label", "timestamp"]).sample(frac=1.0, random_state=0)


def test_fresh_holdout_is_stratified_and_takes_the_newest_rows():
    new = labelled({"a": 40, "b": 20, "c": 8, "d": 1})
    train, fresh = split_fresh(new, 0.25)
    assert fresh["label"].value_counts().to_dict() == {"a": 10, "b": 5, "c": 2}  # a single row trains
    assert len(train) + len(fresh) == len(new)
    for label, part in fresh.groupby("label"):
        kept = train[train["label"] == label]
        assert part["timestamp"].min() > kept["timestamp"].max(), label  # the newest are held out
    assert not set(train["text"]) & set(fresh["text"])


def test_fresh_holdout_without_timestamps_is_seeded():
    new = labelled({"a": 30, "b": 30}).drop(columns="timestamp")
    first, again = split_fresh(new, 0.2, seed=3)[1], split_fresh(new, 0.2, seed=3)[1]
    assert first.equals(again) and len(first) == 12
    assert not split_fresh(new, 0.2, seed=4)[1].equals(first)


def test_duplicate_texts_cannot_straddle_the_split():
    new = labelled({"a": 20})
    twins = new.assign(text=new["text"].str.upper() + "  ")  # the same texts, as the leakage guard normalises them
    train, fresh = split_fresh(pd.concat([new, twins]), 0.25)
    assert len(train) + len(fresh) == 20
    keys = lambda f: set(text_keys(f["text"]))  # noqa: E731
    assert not keys(train) & keys(fresh)


def test_no_fresh_text_is_ever_trained_on():
    policy, _ = load_update_policy()
    new = labelled({"a": 60, "b": 60, "c": 60})
    golden = labelled({"a": 10, "b": 10}).drop(columns="timestamp").assign(group="g")
    # The replay pool holds copies of fresh and golden texts (an earlier update saw them): none may be trained on.
    pool = pd.concat([new.sample(30, random_state=1), golden.head(5), labelled({"z": 50})])[["text", "label"]]
    data = prepare_update(new, pool, golden, ["a", "b", "c", "z"], [], policy, "test")
    trained = set(data.training.frame["text"].map(text_hash))
    assert data.fresh["text"].map(text_hash).isin(trained).sum() == 0
    assert golden["text"].map(text_hash).isin(trained).sum() == 0
    # golden's texts ("a request 0".."b request 9") also arrived as new rows: dropped from training, not held out
    assert data.training.leaked_dropped == 20
    assert data.training.new_rows + data.training.leaked_dropped == len(new) - len(data.fresh)


def test_rows_an_earlier_update_held_out_are_judged_on_again_and_never_trained_on():
    policy, _ = load_update_policy()
    new = labelled({"a": 40, "b": 40})
    earlier = labelled({"a": 12, "b": 8}, "2025-12-01").assign(text=lambda f: "earlier " + f["text"])
    again = earlier.head(3)  # three of them were labelled again since: still not trained on
    golden = labelled({"z": 10}).drop(columns="timestamp").assign(group="g")
    arrived = pd.concat([new, again])
    own = split_fresh(arrived, policy.fresh_holdout_share)[1]
    data = prepare_update(arrived, new.head(0), golden, ["a", "b", "z"], [], policy, "test", judged_too=earlier)
    expected = set(text_keys(own["text"])) | set(text_keys(earlier["text"]))  # its own holdout, and the earlier one
    assert set(text_keys(data.fresh["text"])) == expected and len(data.fresh) == len(expected)
    trained = set(text_keys(data.training.frame["text"]))
    assert not trained & set(text_keys(earlier["text"]))
    assert not trained & set(text_keys(data.fresh["text"]))


def test_too_few_fresh_rows_wait_for_labels():
    policy, _ = load_update_policy()
    new = labelled({label: 4 for label in "abcdefghijklmn"})  # 56 rows, 1 fresh per label: 14 < min_fresh_rows
    with pytest.raises(RefitError, match="min_fresh_rows"):
        prepare_update(new, new.head(0), labelled({"a": 3}), list("abcdefghijklmn"), [], policy, "window")


def test_golden_suite_is_versioned_with_fingerprints(tmp_path):
    store = LocalStore(tmp_path)
    first = write_golden(store, "m", labelled({"a": 5, "b": 5}).drop(columns="timestamp").assign(group="g1"))
    assert (first.version, first.rows) == (1, 10)
    assert first.fingerprint == fingerprint(first.frame) and read_golden(store, "m").fingerprint == first.fingerprint
    second = write_golden(store, "m", suite_with_fresh(first, labelled({"c": 4}, "2026-02-01"), max_per_label=100))
    assert second.version == 2 and second.rows == 14 and second.fingerprint != first.fingerprint
    assert read_golden(store, "m").version == 2
    assert read_golden(store, "m", version=1).fingerprint == first.fingerprint  # the old version is kept
    assert second.tags()["refit.golden_fingerprint"] == second.fingerprint
    with pytest.raises(RefitError, match="bootstrap"):
        read_golden(store, "other")


def test_golden_grows_capped_per_label_oldest_first(tmp_path):
    store = LocalStore(tmp_path)
    golden = write_golden(store, "m", pd.DataFrame({"text": [f"old {i}" for i in range(6)], "label": ["a"] * 6,
                                                    "group": ["banking"] * 6}))
    fresh = pd.DataFrame({"text": ["new 1", "new 2", "new 3", "old 0", "brand new"],
                          "label": ["a", "a", "a", "a", "z"]})
    out = suite_with_fresh(golden, fresh, max_per_label=5)
    a = out[out["label"] == "a"]
    assert len(a) == 5 and set(a["text"]) == {"new 1", "new 2", "new 3", "old 4", "old 5"}  # old 0..3 dropped
    assert (a.loc[a["text"].str.startswith("new"), "added"] == 2).all()
    assert a["group"].eq("banking").all()  # a fresh row takes its label's group in the suite
    assert out.loc[out["label"] == "z", "group"].tolist() == ["ungrouped"]


def test_per_label_replay_gives_small_labels_their_share():
    from refit.data import per_label_sample

    pool = pd.concat([pd.DataFrame({"text": [f"{label} {i}" for i in range(n)], "label": label})
                      for label, n in (("old", 1000), ("older", 800), ("new_a", 6), ("new_b", 20))])
    picked = per_label_sample(pool, 100, seed=0)
    counts = picked["label"].value_counts().to_dict()
    assert len(picked) == 100 and counts["new_a"] == 6  # all it has
    assert counts["new_b"] == 20 and abs(counts["old"] - counts["older"]) <= 1  # the rest shared evenly
    assert per_label_sample(pool, 100, seed=0).equals(picked)
    assert len(per_label_sample(pool, 5000, seed=0)) == len(pool)
