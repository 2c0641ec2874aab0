"""Labels in: `refit labels import` and the checks /feedback shares, on both stores (S3: the moto server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from refit import requestlog
from refit.errors import RefitError
from refit.labels import import_labels, read_examples
from refit.store import LocalStore

MODEL = "support"


def served(store, ids: list[str]) -> None:
    now = datetime.now(timezone.utc)
    requestlog.write_inference(store, MODEL, pd.DataFrame({
        "request_id": ids, "timestamp": [now - timedelta(minutes=5)] * len(ids), "text": [f"text of {i}" for i in ids],
        "predicted_label": "balance", "confidence": 0.9, "model_version": "1"}))


BATCH = pd.DataFrame({
    "request_id": ["r1", "r2", "r3", "nope", "r1", None, None, None, "r4"],
    "text": [None, None, None, None, None, "a brand new example", "A brand new example ", None, None],
    "label": ["balance", "crypto", " ", "balance", "transfer", "crypto", "crypto", "balance", "transfer"],
})


def test_each_row_is_accepted_or_quarantined_with_its_reason(store):
    served(store, ["r1", "r2", "r3"])
    result = import_labels(store, MODEL, BATCH, source="test", buffered_ids=["r4"])
    assert result.accepted + result.waiting + result.quarantined == len(BATCH)
    assert result.accepted == 4  # r1, r2 (a label the model does not know: accepted), one example, r4 (buffered)
    assert result.waiting == 1  # "nope": maybe answered by another replica that has not flushed yet
    assert result.reasons == {"label is empty": 1, "duplicate request_id in this batch": 1,
                              "duplicate text in this batch": 1, "neither request_id nor text": 1}
    labels = requestlog.read_labels(store, MODEL)
    assert sorted(labels["request_id"]) == ["r1", "r2", "r4"] and set(labels["source"]) == {"test"}
    now = datetime.now(timezone.utc)
    examples = read_examples(store, MODEL, now - timedelta(minutes=1), now + timedelta(minutes=1))
    assert examples[["text", "label"]].values.tolist() == [["a brand new example", "crypto"]]
    quarantined = store.read_parquet_prefix(f"quarantine/model={MODEL}/labels/")
    assert len(quarantined) == 4 and set(quarantined["reason"]) == set(result.reasons)

    again = import_labels(store, MODEL, pd.DataFrame({"request_id": ["r2"], "label": ["balance"]}), source="test")
    assert (again.accepted, again.reasons) == (0, {"request_id already labelled": 1})


def test_a_batch_without_the_columns_is_one_error(store):
    with pytest.raises(RefitError, match="'label' column"):
        import_labels(store, MODEL, pd.DataFrame({"request_id": ["r1"]}), source="test")
    with pytest.raises(RefitError, match="'request_id' column .* or a 'text' column"):
        import_labels(store, MODEL, pd.DataFrame({"label": ["x"]}), source="test")


def test_an_update_reads_only_the_label_partitions_since_its_window(tmp_path):
    store = LocalStore(tmp_path / "store")
    old = f"labels/model={MODEL}/date=2020-01-01/part-1.parquet"
    store.put_parquet(old, pd.DataFrame({"request_id": ["ancient"], "label": ["x"], "source": ["t"]}))
    requestlog.write_labels(store, MODEL, pd.DataFrame({"request_id": ["fresh"], "label": ["y"], "source": ["t"]}))
    today = datetime.now(timezone.utc).date()
    assert requestlog.read_labels(store, MODEL, since=today)["request_id"].tolist() == ["fresh"]
    assert sorted(requestlog.read_labels(store, MODEL)["request_id"]) == ["ancient", "fresh"]


def test_labels_import_cli(tmp_path, data_dir):
    home = tmp_path / "home"
    env = os.environ | {"REFIT_HOME": str(home), "REFIT_DATA_DIR": str(data_dir)}
    from refit.settings import Settings

    served(LocalStore(Settings(home=home).local_store_root), ["r1", "r2", "r3"])
    path = tmp_path / "corrections.csv"
    BATCH.to_csv(path, index=False)
    proc = subprocess.run([sys.executable, "-m", "refit.cli", "labels", "import", str(path), "--model-name", MODEL,
                           "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["accepted"] + out["waiting"] + out["quarantined"] == len(BATCH) and out["model_name"] == MODEL
    assert (out["accepted"], out["waiting"]) == (3, 2)  # r4 and "nope" wait: in no request log yet
    empty = tmp_path / "empty.csv"
    empty.write_text("request_id,label\n")
    proc = subprocess.run([sys.executable, "-m", "refit.cli", "labels", "import", str(empty)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "has no rows" in proc.stderr and "Traceback" not in proc.stderr
