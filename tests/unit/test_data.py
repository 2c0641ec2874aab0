"""Loading labelled text: CLINC150 from disk and any table file, hashing and fingerprints."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from refit import data
from refit.errors import RefitError


@pytest.fixture(scope="module")
def clinc(data_dir) -> pd.DataFrame:
    return data.load_clinc150(data_dir)


def test_clinc150_shape(clinc, data_dir):
    assert list(clinc.columns) == data.COLUMNS
    labels = set(clinc["label"])
    assert len(labels) == 151 and data.OOS in labels
    raw = json.loads((data_dir / "data_full.json").read_text())
    assert len(clinc) == sum(len(v) for v in raw.values())
    assert clinc["split"].value_counts().to_dict() == {
        "train": len(raw["train"]) + len(raw["oos_train"]),
        "test": len(raw["test"]) + len(raw["oos_test"]),
        "val": len(raw["val"]) + len(raw["oos_val"]),
    }


def test_clinc150_groups_are_domains(clinc, data_dir):
    domains = json.loads((data_dir / "domains.json").read_text())
    assert set(clinc["group"]) == set(domains) | {data.OOS}
    assert clinc.groupby("label")["group"].nunique().max() == 1  # a label lives in one group
    assert set(clinc.loc[clinc["label"] == data.OOS, "group"]) == {data.OOS}
    some_domain, some_labels = next(iter(domains.items()))
    assert set(clinc.loc[clinc["group"] == some_domain, "label"]) == set(some_labels)
    # every intent has examples in every split
    assert (clinc.groupby("label")["split"].nunique() == 3).all()


def test_clinc150_missing_directory_names_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(RefitError, match="does not exist") as info:
        data.load_clinc150(missing)
    assert str(missing) in str(info.value)


def test_clinc150_missing_file_names_it(tmp_path):
    (tmp_path / "data_full.json").write_text("{}")
    with pytest.raises(RefitError) as info:
        data.load_clinc150(tmp_path)
    assert str(tmp_path) in str(info.value) and "domains.json" in str(info.value)


TABLE = pd.DataFrame({
    "utterance": ["book a flight", "what is my balance", "play a song", "set an alarm", "cancel my card"],
    "intent": ["travel", "balance", "music", "alarm", "card"],
    "part": ["train", "validation", "test", "train", "train"],
    "domain": ["t", "b", "m", "u", "b"],
})


def _write(frame: pd.DataFrame, path):
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_json(path, orient="records", lines=True)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_load_table_with_custom_columns(tmp_path, suffix):
    path = _write(TABLE, tmp_path / f"table{suffix}")
    out = data.load_table(path, text_column="utterance", label_column="intent",
                          split_column="part", group_column="domain")
    assert list(out.columns) == data.COLUMNS
    assert out["text"].tolist() == TABLE["utterance"].tolist()
    assert out["label"].tolist() == TABLE["intent"].tolist()
    assert out["split"].tolist() == ["train", "val", "test", "train", "train"]  # validation -> val
    assert out["group"].tolist() == TABLE["domain"].tolist()


def test_load_table_defaults_hash_split_and_label_groups(tmp_path):
    path = _write(TABLE.rename(columns={"utterance": "text", "intent": "label"}), tmp_path / "t.csv")
    out = data.load_table(path)
    assert out["group"].tolist() == out["label"].tolist()
    assert out["split"].tolist() == [data._hash_split(t) for t in out["text"]]
    assert set(out["split"]) <= {"train", "val", "test"}


@pytest.mark.parametrize("missing", ["text_column", "label_column", "split_column", "group_column"])
def test_load_table_missing_column_is_named(tmp_path, missing):
    path = _write(TABLE, tmp_path / "t.csv")
    columns = {"text_column": "utterance", "label_column": "intent", "split_column": "part", "group_column": "domain"}
    columns[missing] = "nope"
    with pytest.raises(RefitError, match="no column 'nope'") as info:
        data.load_table(path, **columns)
    assert "utterance" in str(info.value)  # lists the columns there are


def test_load_table_missing_file_and_bad_type(tmp_path):
    with pytest.raises(RefitError, match="does not exist"):
        data.load_table(tmp_path / "missing.csv")
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(RefitError, match="unsupported file type"):
        data.load_table(tmp_path / "t.xlsx")


def test_hash_split_is_deterministic_and_roughly_70_15_15():
    texts = [f"utterance number {i}" for i in range(3000)]
    first = [data._hash_split(t) for t in texts]
    assert first == [data._hash_split(t) for t in texts]
    shares = pd.Series(first).value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.70, abs=0.04)
    assert shares["val"] == pytest.approx(0.15, abs=0.03)
    assert shares["test"] == pytest.approx(0.15, abs=0.03)
    # the same text never lands in two splits, whatever else is in the file
    assert data._hash_split("book a flight") == data._hash_split("book a flight")


def test_fingerprint_is_order_independent_and_content_sensitive():
    frame = pd.DataFrame({"text": ["a", "b", "c"], "label": ["x", "y", "z"], "split": ["train"] * 3})
    fp = data.fingerprint(frame)
    assert len(fp) == 16
    assert data.fingerprint(frame.iloc[::-1]) == fp
    assert data.fingerprint(frame.iloc[[1, 2, 0]].reset_index(drop=True)) == fp
    assert data.fingerprint(frame.assign(split="test")) == fp  # only text and label count by default
    changed = frame.copy()
    changed.loc[1, "label"] = "x"
    assert data.fingerprint(changed) != fp
    assert data.fingerprint(frame.iloc[:2]) != fp
    assert data.fingerprint(frame.assign(split="test"), ["text", "label", "split"]) != data.fingerprint(
        frame, ["text", "label", "split"])


def test_text_hash_normalises_case_and_whitespace():
    assert data.text_hash("  Book A Flight ") == data.text_hash("book a flight")
    assert data.text_hash("book a flight") != data.text_hash("book a flights")
    assert data.text_hashes(["A", "a ", "b"]) == {data.text_hash("a"), data.text_hash("b")}


def test_load_table_missing_cells_are_not_the_text_nan(tmp_path):
    path = tmp_path / "holes.csv"
    path.write_text("text,label\nhello,greet\n,greet\nbye,\n")
    try:
        out = data.load_table(path)
    except RefitError:
        return  # refusing the file is a fine answer too
    assert "nan" not in out["text"].tolist()
    assert "nan" not in out["label"].tolist()
