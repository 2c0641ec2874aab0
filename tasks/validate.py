"""Validate: check a traffic window before anything measures it.

Bad rows go to ``quarantine/`` with the reason; the counts always add up
(rows in = rows kept + rows quarantined). A window with nothing usable is
rejected with a sentence that says why, not a traceback.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from refit.errors import RefitError
from refit.store import ObjectStore

MAX_TEXT_CHARS = 2000


@dataclass(frozen=True)
class Validated:
    kept: pd.DataFrame
    rows_in: int
    rows_quarantined: int
    reasons: dict[str, int]
    quarantine_uri: str | None


def split_bad_rows(frame: pd.DataFrame, text_column: str = "text") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Separate usable rows from bad ones; bad rows get a ``reason`` column.

    Raises ``RefitError`` for a window that cannot be read at all: no rows,
    or no text column.
    """
    if frame.empty:
        raise RefitError("window is empty: no requests were logged in it")
    if text_column not in frame.columns:
        raise RefitError(f"window has no column {text_column!r} (columns: {', '.join(map(str, frame.columns))})")
    text = frame[text_column]
    reason = pd.Series("", index=frame.index, dtype=object)
    not_str = ~text.map(lambda v: isinstance(v, str))
    reason[not_str] = "text is not a string"
    stripped = text.where(~not_str, "").str.strip()
    reason[(reason == "") & (stripped == "")] = "text is empty"
    reason[(reason == "") & (stripped.str.len() > MAX_TEXT_CHARS)] = f"text longer than {MAX_TEXT_CHARS} characters"
    if "request_id" in frame.columns:
        reason[(reason == "") & frame["request_id"].duplicated()] = "duplicate request_id"
    bad = reason != ""
    quarantined = frame[bad].copy()
    quarantined["reason"] = reason[bad]
    return frame[~bad].reset_index(drop=True), quarantined.reset_index(drop=True)


@task(name="validate-window", cache_policy=NO_CACHE)
def validate_window(store: ObjectStore, model_name: str, frame: pd.DataFrame, min_rows: int,
                    text_column: str = "text") -> Validated:
    """Quarantine bad rows; reject the window if too few good rows remain."""
    kept, bad = split_bad_rows(frame, text_column)
    uri = None
    if len(bad):
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M%S.%f") + "-" + uuid.uuid4().hex[:8]
        bad = bad.astype({c: str for c in bad.columns if bad[c].dtype == object})
        uri = store.put_parquet(f"quarantine/model={model_name}/inference/{stamp}.parquet", bad)
    if len(kept) < min_rows:
        raise RefitError(
            f"window rejected: {len(kept)} usable rows of {len(frame)}, policy needs at least {min_rows}"
            + (f" ({len(bad)} quarantined at {uri})" if uri else "")
        )
    reasons = bad["reason"].value_counts().to_dict() if len(bad) else {}
    return Validated(kept, len(frame), len(bad), reasons, uri)
