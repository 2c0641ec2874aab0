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
