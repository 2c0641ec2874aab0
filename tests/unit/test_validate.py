"""Validation of a traffic window: bad rows quarantined with reasons, counts that add up."""

from __future__ import annotations

import pandas as pd
import pytest

from refit.errors import RefitError
from refit.store import LocalStore
from tasks import validate
from tasks.validate import MAX_TEXT_CHARS, split_bad_rows, validate_window


def window() -> pd.DataFrame:
    return pd.DataFrame({
        "request_id": ["r1", "r2", "r3", "r4", "r5", "r6", "r7", "r1", "r8"],
        "text": ["what is my balance", None, "", "   \t", 42, "x" * (MAX_TEXT_CHARS + 1),
                 "book a flight", "a second request with r1's id", "x" * MAX_TEXT_CHARS],
        "predicted_label": ["balance"] * 9,
    })


EXPECTED_REASONS = {
    "r2": "text is not a string",  # None
    "r3": "text is empty",
    "r4": "text is empty",
    "r5": "text is not a string",  # 42
    "r6": f"text longer than {MAX_TEXT_CHARS} characters",
}


def test_empty_window_is_rejected():
    with pytest.raises(RefitError, match="window is empty"):
        split_bad_rows(pd.DataFrame(columns=["request_id", "text"]))
    with pytest.raises(RefitError, match="window is empty"):
        split_bad_rows(pd.DataFrame())


def test_missing_text_column_is_named():
    frame = pd.DataFrame({"request_id": ["a"], "prompt": ["hi"]})
    with pytest.raises(RefitError, match="no column 'text'") as info:
        split_bad_rows(frame)
    assert "prompt" in str(info.value)
    with pytest.raises(RefitError, match="no column 'utterance'"):
        split_bad_rows(frame.rename(columns={"prompt": "text"}), text_column="utterance")


def test_bad_rows_are_quarantined_with_reasons():
    frame = window()
    kept, bad = split_bad_rows(frame)
    assert len(kept) + len(bad) == len(frame)
    assert kept["request_id"].tolist() == ["r1", "r7", "r8"]
    assert kept["text"].tolist() == ["what is my balance", "book a flight", "x" * MAX_TEXT_CHARS]
    assert list(kept.columns) == list(frame.columns)
    reasons = dict(zip(bad["request_id"] + "@" + bad.index.astype(str), bad["reason"]))
    by_id = {}
    for key, reason in reasons.items():
        by_id.setdefault(key.split("@")[0], []).append(reason)
    assert by_id == {rid: [r] for rid, r in EXPECTED_REASONS.items()} | {"r1": ["duplicate request_id"]}
    assert bad["reason"].value_counts().to_dict() == {
        "text is not a string": 2, "text is empty": 2, f"text longer than {MAX_TEXT_CHARS} characters": 1,
        "duplicate request_id": 1}


def test_clean_window_keeps_everything():
    frame = pd.DataFrame({"request_id": ["a", "b"], "text": ["hello", "there"]})
    kept, bad = split_bad_rows(frame)
    pd.testing.assert_frame_equal(kept, frame)
    assert bad.empty and "reason" in bad.columns


def test_window_without_request_ids_is_checked_for_text_only():
    kept, bad = split_bad_rows(pd.DataFrame({"text": ["same", "same", " "]}))
    assert kept["text"].tolist() == ["same", "same"]
    assert bad["reason"].tolist() == ["text is empty"]


def test_validate_window_writes_the_quarantine(tmp_path):
    store = LocalStore(tmp_path / "store")
    frame = window()
    result = validate_window.fn(store, "m", frame, min_rows=3)
    assert result.rows_in == len(frame) == len(result.kept) + result.rows_quarantined
    assert result.rows_quarantined == 6
    assert sum(result.reasons.values()) == result.rows_quarantined
    assert result.reasons["text is empty"] == 2
    [key] = store.list("quarantine/model=m/")
    assert result.quarantine_uri == store.uri(key)
    stored = store.get_parquet(key)
    assert len(stored) == 6
    assert stored["reason"].value_counts().to_dict() == result.reasons
    assert sorted(stored["request_id"]) == ["r1", "r2", "r3", "r4", "r5", "r6"]


def test_validate_window_clean_writes_nothing(tmp_path):
    store = LocalStore(tmp_path / "store")
    result = validate_window.fn(store, "m", pd.DataFrame({"request_id": ["a"], "text": ["hi"]}), min_rows=1)
    assert result.rows_quarantined == 0 and result.reasons == {} and result.quarantine_uri is None
    assert store.list() == []


def test_validate_window_rejects_when_too_few_rows_remain(tmp_path):
    store = LocalStore(tmp_path / "store")
    with pytest.raises(RefitError, match="window rejected") as info:
        validate_window.fn(store, "m", window(), min_rows=4)
    message = str(info.value)
    assert "3 usable rows of 9" in message and "at least 4" in message
    assert "6 quarantined" in message
    # the bad rows are kept for a person to look at, even though the window was refused
    [key] = store.list("quarantine/")
    assert store.uri(key) in message


class _FrozenClock:
    """Two validations inside one second, as a monitor catching up on windows does."""

    @staticmethod
    def now(tz=None):
        from datetime import datetime, timezone

        return datetime(2026, 3, 1, 12, 0, 0, tzinfo=tz or timezone.utc)


def test_two_windows_in_one_second_keep_both_quarantines(tmp_path, monkeypatch):
    monkeypatch.setattr(validate, "datetime", _FrozenClock)
    store = LocalStore(tmp_path / "store")
    validate_window.fn(store, "m", pd.DataFrame({"request_id": ["a", "b"], "text": ["ok", ""]}), min_rows=1)
    validate_window.fn(store, "m", pd.DataFrame({"request_id": ["c", "d"], "text": ["ok", " "]}), min_rows=1)
    quarantined = store.read_parquet_prefix("quarantine/model=m/")
    assert sorted(quarantined["request_id"]) == ["b", "d"]


# --- request-log windows: schema and types --------------------------------------------------------------

from tasks.validate import (  # noqa: E402
    INFERENCE_REQUIRED,
    check_label_mix,
    label_mix_shift,
    split_bad_inference_rows,
    validate_labels,
)


def served() -> pd.DataFrame:
    """A request-log window with one good row and one row per kind of bad value, in the order checks run."""
    return pd.DataFrame({
        "request_id": ["ok", "t1", "r-none", "r-blank", "ts-bad", "ts-none", "p-none", "p-blank",
                       "c-str", "c-high", "c-neg", "c-none", "ok"],
        "timestamp": ["2026-03-01T12:00:00Z"] * 4 + ["yesterday", None] + ["2026-03-01 12:00:01"] * 7,
        "text": ["fine", ""] + ["fine"] * 11,
        "predicted_label": ["balance"] * 6 + [None, "  "] + ["balance"] * 5,
        "confidence": [0.9] * 8 + ["0.9", 1.5, -0.1, None, 0.5],
        "model_version": "1",
    })


def test_inference_window_rows_with_bad_types_are_quarantined_with_one_reason_each():
    frame = served()
    frame.loc[2, "request_id"] = None
    frame.loc[3, "request_id"] = " "
    kept, bad = split_bad_inference_rows(frame)

    assert len(kept) + len(bad) == len(frame)
    assert kept["request_id"].tolist() == ["ok"]
    assert list(kept.columns) == list(frame.columns)
    assert bad["reason"].tolist() == [
        "text is empty",
        "request_id is missing", "request_id is missing",
        "timestamp is not a time", "timestamp is not a time",
        "predicted_label is missing", "predicted_label is missing",
        "confidence is not a number in [0, 1]", "confidence is not a number in [0, 1]",
        "confidence is not a number in [0, 1]", "confidence is not a number in [0, 1]",
        "duplicate request_id",
    ]


def test_inference_window_accepts_real_timestamps_and_integer_confidence():
    frame = pd.DataFrame({
        "request_id": ["a", "b", "c"],
        "timestamp": pd.to_datetime(["2026-03-01T12:00:00", "2026-03-01T12:00:01", "2026-03-01T12:00:02"], utc=True),
        "text": ["one", "two", "three"],
        "predicted_label": ["x", "y", "x"],
        "confidence": [1, 0, 0.5],
    })
    kept, bad = split_bad_inference_rows(frame)
    assert len(kept) == 3 and bad.empty


def test_inference_window_without_required_columns_is_rejected_naming_them():
    frame = served().drop(columns=["timestamp", "confidence"])
    with pytest.raises(RefitError, match=r"window has no columns 'timestamp', 'confidence' \(columns: request_id"):
        split_bad_inference_rows(frame)
    with pytest.raises(RefitError, match="window is empty"):
        split_bad_inference_rows(pd.DataFrame(columns=INFERENCE_REQUIRED))


def test_a_text_only_file_is_checked_for_what_it_has():
    frame = pd.DataFrame({"text": ["hello", None, "there"], "confidence": [0.5, 0.5, 2.0]})
    kept, bad = split_bad_inference_rows(frame, required=["text"])
    assert kept["text"].tolist() == ["hello"]
    assert bad["reason"].tolist() == ["text is missing", "confidence is not a number in [0, 1]"]
    _, bad = split_bad_inference_rows(pd.DataFrame({"text": [float("nan"), 42, ""]}), required=["text"])
    assert bad["reason"].tolist() == ["text is missing", "text is not a string", "text is empty"]


def test_validate_window_with_schema_check_quarantines_type_errors(tmp_path):
    store = LocalStore(tmp_path / "store")
    frame = served()  # request ids all present here: 10 bad rows
    result = validate_window.fn(store, "m", frame, min_rows=1, check_schema=True)
    assert result.rows_in == len(frame) == len(result.kept) + result.rows_quarantined
    assert result.rows_quarantined == 10 and sum(result.reasons.values()) == 10
    assert result.reasons["confidence is not a number in [0, 1]"] == 4
    stored = store.read_parquet_prefix("quarantine/model=m/")
    assert stored["reason"].value_counts().to_dict() == result.reasons
    # without the schema check the same window is only checked for text and duplicates, as before
    assert validate_window.fn(store, "m", frame, min_rows=1).rows_quarantined == 2


def test_validate_window_with_schema_check_rejects_a_window_missing_a_column(tmp_path):
    store = LocalStore(tmp_path / "store")
    with pytest.raises(RefitError, match="no column 'predicted_label'"):
        validate_window.fn(store, "m", served().drop(columns="predicted_label"), min_rows=1, check_schema=True)
    assert store.list() == []


# --- label feedback ------------------------------------------------------------------------------------

KNOWN = ["balance", "transfer", "oos"]


def test_label_feedback_with_unknown_missing_or_empty_values_is_quarantined():
    labels = pd.DataFrame({
        "request_id": ["a", "b", None, "d", "e", "f", " ", "h"],
        "label": ["balance", "balanse", "transfer", None, "  ", "oos", "balance", "transfer"],
        "source": "delayed-feedback",
    })
    kept, bad = validate_labels(labels, KNOWN)

    assert len(kept) + len(bad) == len(labels)
    assert kept["request_id"].tolist() == ["a", "f", "h"]
    assert list(kept.columns) == list(labels.columns)
    assert dict(zip(bad["request_id"].fillna("<none>"), bad["reason"])) == {
        "b": "label not known to the model",
        "<none>": "request_id is missing",
        "d": "label is empty",
        "e": "label is empty",
        " ": "request_id is missing",
    }


def test_labels_are_compared_as_text_and_an_empty_batch_is_no_error():
    kept, bad = validate_labels(pd.DataFrame({"request_id": [1, 2], "label": [7, 8]}), ["7"])
    assert kept["request_id"].tolist() == [1] and bad["reason"].tolist() == ["label not known to the model"]
    kept, bad = validate_labels(pd.DataFrame(columns=["request_id", "label"]), KNOWN)
    assert kept.empty and bad.empty and "reason" in bad.columns


def test_label_batch_without_its_columns_is_rejected():
    with pytest.raises(RefitError, match="label batch has no column 'label'"):
        validate_labels(pd.DataFrame({"request_id": ["a"], "intent": ["balance"]}), KNOWN)


def test_label_mix_shift_is_the_total_variation_distance():
    assert label_mix_shift(["a", "b", "a", "b"], ["b", "a"]) == 0
    assert label_mix_shift(["a", "a"], ["b"]) == 1
    assert label_mix_shift(["a", "b"], ["a", "a", "a", "a"]) == pytest.approx(0.5)
    # a: .5 -> .25, b: .5 -> .25, c: 0 -> .5
    assert label_mix_shift(pd.Series(["a", "b"]), pd.Series(["a", "b", "c", "c"])) == pytest.approx(0.5)
    assert label_mix_shift([1, 2], ["1", "2"]) == 0
    with pytest.raises(RefitError, match="labels on both sides"):
        label_mix_shift([], ["a"])


def test_label_mix_check_flags_a_poisoned_batch_and_passes_a_fair_one():
    import numpy as np

    from refit.scenario import poison

    rng = np.random.default_rng(0)
    all_labels = [f"intent_{i}" for i in range(40)]
    traffic = all_labels[:20]  # the batch labels traffic of half the intents
    reference = pd.Series(rng.choice(traffic, 2000))
    fair = pd.DataFrame({"label": rng.choice(traffic, 600)})
    poisoned = poison(fair, all_labels, seed=0)  # every label replaced by another one
    targeted = fair.copy()
    targeted.loc[targeted.index[:180], "label"] = "intent_3"  # 30% pushed onto one intent

    ok = check_label_mix(reference, fair["label"], threshold=0.2)
    assert not ok.suspect and ok.shift < 0.15 and "within" in ok.reason
    for bad in (poisoned, targeted):
        verdict = check_label_mix(reference, bad["label"], threshold=0.2)
        assert verdict.suspect and verdict.shift > 0.25, verdict
        assert f"{verdict.shift:.3f}" in verdict.reason and "0.2" in verdict.reason
