"""A hotfix's labelled file by path, file:// or s3:// URI (the S3 one on the moto server)."""

from __future__ import annotations

import uuid

import pandas as pd
import pytest

from refit.errors import RefitError
from refit.settings import Settings
from refit.store import S3Store
from tasks.ingest import read_labelled_file

@pytest.fixture(autouse=True)
def embedded():
    """These read files as an embedded run does: the session's temporary Prefect API (started by another test,
    if at all) must not make them look like a run on a Prefect server, whose allowed label sources are narrower."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield


ROWS = pd.DataFrame({"text": ["book a flight", "what's my balance"], "label": ["book_flight", "balance"]})


def test_local_path_and_file_uri(tmp_path):
    path = tmp_path / "fixes.csv"
    ROWS.to_csv(path, index=False)
    settings = Settings(home=tmp_path / "home")
    pd.testing.assert_frame_equal(read_labelled_file(str(path), settings), ROWS)
    pd.testing.assert_frame_equal(read_labelled_file(path.as_uri(), settings), ROWS)


def test_s3_uri_is_read_through_the_configured_endpoint(tmp_path, s3_endpoint, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the fetched copy goes
    (tmp_path / "tmp").mkdir()
    bucket = f"hotfix-{uuid.uuid4().hex[:8]}"
    store = S3Store(bucket, endpoint_url=s3_endpoint)
    store.ensure_bucket()
    store.put_parquet("tickets/T-42/fixes.parquet", ROWS)
    settings = Settings(home=tmp_path / "home", s3_endpoint_url=s3_endpoint)
    got = read_labelled_file(f"s3://{bucket}/tickets/T-42/fixes.parquet", settings)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), ROWS)
    assert list((tmp_path / "tmp").iterdir()) == []  # the fetched copy is gone once read
    with pytest.raises(RefitError, match="does not exist"):
        read_labelled_file(f"s3://{bucket}/tickets/T-42/missing.csv", settings)


def test_unknown_scheme_and_empty_labels_are_named(tmp_path):
    """Unknown labels are read (the update's new-label policy decides on them); an empty one is an error."""
    settings = Settings(home=tmp_path / "home")
    with pytest.raises(RefitError, match="only local paths, file:// and s3://"):
        read_labelled_file("https://example.com/fixes.csv", settings)
    path = tmp_path / "fixes.csv"
    ROWS.assign(label=["book_flight", "   "]).to_csv(path, index=False)
    with pytest.raises(RefitError, match=r"1 row\(s\) have an empty label \(first at row 2\)"):
        read_labelled_file(str(path), settings)
