"""Property-based fuzzing (hypothesis) of every input surface refit reads without a server.

Surfaces: policy YAML (gate, update, cascade, drift, rollout), scenario YAML
and what ``build`` makes of it, label files (``refit labels import``),
hotfix label files (``tasks.ingest.read_labelled_file``), request-log
windows as the monitor reads them from ``inference/`` partitions, the
``/predict`` and ``/feedback`` body parsers, and the CLI (in-process through
``refit.cli.main``, plus a few real subprocesses).

The contract for each: no traceback. A user's mistake is a ``RefitError``
(one line; the CLI prints ``error: ...`` and exits 2) or a ``BadRequest``
(4xx); nothing is half-written (a refused file leaves the store as it was);
rows in = rows kept + rows quarantined, each quarantined row with a reason.
Each bug fuzzing found is pinned as an ``@example``. Runs are derandomized,
so CI sees the same cases every time; each test counts its cases in the
``fuzz_cases`` fixture, printed as ``fuzz cases: <surface>=<n>`` at the end.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import subprocess
import sys
import tempfile
from datetime import date, datetime, timezone
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from refit.errors import RefitError
from refit.policy import POLICY_DIR, load_policy
from refit.store import LocalStore

settings.register_profile(
    "refit-fuzz", deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
FUZZ = settings.get_profile("refit-fuzz")


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message.strip() and "\n" not in message, f"not one line: {message!r}"
    return message


def keys_under(store: LocalStore) -> set[str]:
    return set(store.list(""))


# -- policy and scenario YAML -------------------------------------------------------------------------------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12), st.dates())
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


def _paths(tree, prefix=()):
    """Every key path into nested dicts and lists."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        yield prefix + (key,)
        yield from _paths(value, prefix + (key,))


@st.composite
def mutated(draw, base: dict):
    """A shipped document with 1 to 3 edits: a value replaced, a key dropped or an unknown key added."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths)) if paths else ()
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        op = draw(st.sampled_from(["replace", "replace", "drop", "add"]))
        if op == "add" or not path:
            target = parent if isinstance(parent, dict) else doc
            target[draw(st.text(min_size=1, max_size=10))] = draw(VALUES)
        elif op == "drop":
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(VALUES)
    return doc


def yaml_documents(base: dict):
    return st.one_of(mutated(base).map(lambda d: yaml.safe_dump(d, allow_unicode=True).encode()),
                     st.text(max_size=200).map(str.encode), st.binary(max_size=200),
                     VALUES.map(lambda v: yaml.safe_dump(v).encode()))


def policy_models() -> dict:
    from serving.guards import RolloutPolicy
    from tasks.cascade import CascadePolicy
    from tasks.drift import DriftPolicy
    from tasks.finetune import UpdatePolicy
    from tasks.gate import GatePolicy

    return {"gate": GatePolicy, "update": UpdatePolicy, "cascade": CascadePolicy, "drift": DriftPolicy,
            "rollout": RolloutPolicy}


@pytest.mark.parametrize("kind", ["gate", "update", "cascade", "drift", "rollout"])
def test_a_policy_file_loads_or_is_refused_in_one_line(kind, tmp_path, fuzz_cases):
    model = policy_models()[kind]
    path = tmp_path / f"{kind}.yaml"
    shipped = yaml.safe_load((POLICY_DIR / f"{kind}.yaml").read_text())

    @settings(FUZZ, max_examples=80)
    @given(yaml_documents(shipped))
    @example(b"min_fresh_improvement: \xff\n")  # was UnicodeDecodeError
    @example(b"[" * 5000 + b"]" * 5000)  # was RecursionError
    @example(yaml.safe_dump(shipped | {next(iter(shipped)): float("nan")}).encode())  # NaN was accepted
    def check(document: bytes) -> None:
        fuzz_cases[f"policy_yaml.{kind}"] += 1
        path.write_bytes(document)
        try:
            policy, _ = load_policy(model, path)
        except RefitError as exc:
            assert str(path) in one_line(exc)
            return
        assert isinstance(policy, model)
        json.dumps(policy.model_dump(mode="json"), allow_nan=False)  # every number finite

    check()
    assert load_policy(model, kind)[0] == model.model_validate(shipped)  # the shipped file still loads


def test_a_policy_name_or_path_resolves_or_is_refused(fuzz_cases):
    from tasks.gate import GatePolicy

    @settings(FUZZ, max_examples=100)
    @given(st.text(max_size=40) | st.text(max_size=20).map(lambda t: t + ".yaml"))
    @example("a\x00b.yaml")
    @example("../policies/gate")
    def check(name: str) -> None:
        fuzz_cases["policy_name"] += 1
        try:
            policy, path = load_policy(GatePolicy, name)
        except RefitError as exc:
            one_line(exc)
            return
        assert path.is_file() and isinstance(policy, GatePolicy)

    check()


def test_a_scenario_file_loads_or_is_refused_in_one_line(tmp_path, fuzz_cases):
    from refit.scenario import SCENARIO_DIR, Scenario, load_scenario

    path = tmp_path / "scenario.yaml"
    bases = [yaml.safe_load(p.read_text()) for p in sorted(SCENARIO_DIR.glob("*.yaml"))]

    @settings(FUZZ, max_examples=150)
    @given(st.sampled_from(bases).flatmap(yaml_documents))
    @example(b"name: x\nseed: -1\n")
    def check(document: bytes) -> None:
        fuzz_cases["scenario_yaml"] += 1
        path.write_bytes(document)
        try:
            scenario, _ = load_scenario(path)
        except RefitError as exc:
            assert str(path) in one_line(exc)
            return
        assert isinstance(scenario, Scenario) and scenario.shift_list()

    check()


GROUPS = ["g0", "g1", "g2", "g3", "g4"]


def synthetic_data() -> pd.DataFrame:
    """Five groups of two labels each, with train, val and test rows: small enough to build hundreds of times."""
    rows = [(f"{group} {label} {split} {i}", f"{group}_{label}", split, group)
            for group in GROUPS for label in ("a", "b")
            for split, n in (("train", 6), ("val", 3), ("test", 3)) for i in range(n)]
    return pd.DataFrame(rows, columns=["text", "label", "split", "group"])


group_lists = st.lists(st.sampled_from(GROUPS + ["nowhere"]), max_size=3)
fraction = st.floats(0.001, 1)
spec = st.fixed_dictionaries({
    "name": st.from_regex(r"[A-Za-z0-9_.-]{1,6}", fullmatch=True), "groups": group_lists.filter(bool),
    "rows": st.integers(1, 300), "share": fraction, "labelled_share": fraction})
# Valid by construction (the schema is fuzzed above, with mutated files): what build makes of any scenario that
# parses, with groups that overlap, are empty, or name no group of the data.
scenario_dicts = st.fixed_dictionaries({
    "name": st.just("fuzz"), "seed": st.integers(0, 2**31 - 1),
    "source": st.just({"kind": "clinc150"}),
    "reference": st.fixed_dictionaries({"groups": group_lists},
                                       optional={"sparse_groups": group_lists | st.none(),
                                                 "max_per_label": st.integers(1, 10) | st.none(),
                                                 "sparse_per_label": st.integers(0, 6)}),
    "shifts": st.lists(spec, min_size=1, max_size=3, unique_by=lambda s: s["name"]),
    "windows": st.fixed_dictionaries({"no_drift_rows": st.integers(1, 100)}),
    "evaluation": st.fixed_dictionaries({"golden_max_rows": st.integers(1, 50),
                                         "shifted_max_rows": st.integers(1, 50)}),
    "hotfix": st.fixed_dictionaries({"rows": st.integers(1, 50)}),
})


def test_build_cuts_any_valid_scenario_or_names_the_problem(tmp_path, fuzz_cases):
    """A scenario that parses is built, or refused with a RefitError: never a traceback from pandas or numpy."""
    from refit.scenario import Scenario, build

    frame = synthetic_data()
    path = tmp_path / "scenario.yaml"

    @settings(FUZZ, max_examples=120)
    @given(scenario_dicts)
    @example({"name": "fuzz", "seed": 2**33, "source": {"kind": "clinc150"}, "reference": {"groups": ["g0"]},
              "shifts": [{"name": "s", "groups": ["g1"], "rows": 10, "share": 0.5, "labelled_share": 0.5}],
              "windows": {"no_drift_rows": 5}, "evaluation": {"golden_max_rows": 5, "shifted_max_rows": 5},
              "hotfix": {"rows": 2}})  # pandas' random_state took no seed beyond 2**32 - 1
    def check(doc: dict) -> None:
        fuzz_cases["scenario_build"] += 1
        path.write_text(yaml.safe_dump(doc))
        from refit.policy import load_yaml_model

        try:
            scenario = load_yaml_model(Scenario, path)
        except RefitError as exc:
            one_line(exc)
            return
        try:
            built = build(scenario, frame)
        except RefitError as exc:
            one_line(exc)
            return
        fuzz_cases["scenario_build.built"] += 1
        assert len(built.shifts) == len(scenario.shift_list())
        assert set(built.train["group"]) <= set(GROUPS)
        test_texts = set(frame.loc[frame["split"] == "test", "text"])
        assert not test_texts & set(built.train["text"])  # a test text is never trained on

    check()


# -- label files: `refit labels import` and the hotfix reader -------------------------------------------------------

KNOWN_IDS = ["r1", "r2", "r3"]  # r1, r2 served (r2 already labelled); r3 never served
cell = st.one_of(st.sampled_from(KNOWN_IDS + ["", " ", "oos"]), st.text(max_size=8), st.none(),
                 st.integers(-3, 3), st.floats(allow_nan=True))
COLUMN_NAMES = ["request_id", "text", "label", "note", "[/x]"]


@st.composite
def label_files(draw):
    """(suffix, bytes): a table of label rows in some format, or bytes that may not be a table at all."""
    suffix = draw(st.sampled_from([".csv", ".json", ".jsonl", ".parquet"]))
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from([".csv", ".json", ".jsonl", ".parquet", ".txt"])), draw(st.binary(max_size=64))
    columns = draw(st.lists(st.sampled_from(COLUMN_NAMES), unique=True, max_size=4))
    n = draw(st.integers(0, 8))
    data = {}
    for column in columns:
        if suffix == ".parquet":  # one type per column: pyarrow writes no mixed object columns
            kind = draw(st.sampled_from(["str", "int", "float"]))
            values = {"str": st.one_of(st.none(), st.sampled_from(KNOWN_IDS + ["", "  "]), st.text(max_size=8)),
                      "int": st.integers(-3, 3), "float": st.floats(allow_nan=True)}[kind]
            data[column] = draw(st.lists(values, min_size=n, max_size=n))
        else:
            data[column] = draw(st.lists(cell, min_size=n, max_size=n))
    frame = pd.DataFrame(data, index=range(n))
    buffer = io.BytesIO()
    if suffix == ".csv":
        frame.to_csv(buffer, index=False)
    elif suffix == ".json":
        frame.to_json(buffer, orient="records")
    elif suffix == ".jsonl":
        frame.to_json(buffer, orient="records", lines=True)
    else:
        frame.to_parquet(buffer)
    return suffix, buffer.getvalue()


def seeded_store(root: Path) -> LocalStore:
    """A store whose request log served r1 and r2 today, r2 already labelled."""
    from refit import requestlog

    store = LocalStore(root)
    now = datetime.now(timezone.utc)
    requestlog.write_inference(store, "m", pd.DataFrame({
        "request_id": ["r1", "r2"], "timestamp": [now, now], "text": ["one", "two"], "predicted_label": ["a", "b"],
        "confidence": [0.9, 0.8], "model_version": ["1", "1"]}))
    requestlog.write_labels(store, "m", pd.DataFrame({"request_id": ["r2"], "label": ["b"], "source": ["seed"]}))
    return store


def rows_under(store: LocalStore, prefix: str, before: set[str]) -> int:
    return sum(len(store.get_parquet(k)) for k in store.list(prefix) if k not in before)


def test_a_label_file_is_imported_whole_or_refused_whole(tmp_path, fuzz_cases):
    """`refit labels import`'s path: read, check, write; accepted + quarantined = rows, every write accounted for."""
    from refit.data import read_table
    from refit.labels import import_labels

    @settings(FUZZ, max_examples=150)
    @given(label_files())
    @example((".json", b'[{"label": "x", "text": "h\\ud800i"}]'))
    def check(file: tuple[str, bytes]) -> None:
        fuzz_cases["label_file"] += 1
        root = Path(tempfile.mkdtemp(dir=tmp_path))
        path = root / f"labels{file[0]}"
        path.write_bytes(file[1])
        store = seeded_store(root / "store")
        before = keys_under(store)
        try:
            rows = read_table(path)
            if rows.empty:
                raise RefitError(f"{path} has no rows")
            result = import_labels(store, "m", rows, source=f"import:{path.name}")
        except RefitError as exc:
            one_line(exc)
            assert keys_under(store) == before, "a refused file left something in the store"
            return
        assert result.rows == len(rows) == result.accepted + result.waiting + result.quarantined
        assert sum(result.reasons.values()) == result.quarantined
        assert rows_under(store, "labels/model=m/date=", before) + rows_under(store, "examples/", before) == \
            result.accepted
        assert rows_under(store, "labels/model=m/pending/", before) == result.waiting
        quarantined = [store.get_parquet(k) for k in store.list("quarantine/") if k not in before]
        assert sum(len(q) for q in quarantined) == result.quarantined
        assert all((q["reason"].str.len() > 0).all() for q in quarantined)
        stored = pd.concat([store.get_parquet(k) for k in store.list("labels/model=m/date=") if k not in before] or
                           [pd.DataFrame(columns=["request_id", "label"])])
        assert set(stored["request_id"]) <= {"r1"}  # only a served id not labelled before
        assert not stored["label"].str.strip().eq("").any()

    check()


def test_a_hotfix_file_gives_text_and_label_rows_or_one_line(tmp_path, fuzz_cases):
    from refit.settings import Settings
    from tasks.ingest import read_labelled_file

    settings_ = Settings(home=tmp_path / "home")

    @settings(FUZZ, max_examples=120)
    @given(label_files(), st.sampled_from(["plain", "file-uri", "http", "missing"]))
    def check(file: tuple[str, bytes], how: str) -> None:
        fuzz_cases["hotfix_file"] += 1
        path = Path(tempfile.mkdtemp(dir=tmp_path)) / f"fixes{file[0]}"
        path.write_bytes(file[1])
        uri = {"plain": str(path), "file-uri": path.as_uri(), "http": f"http://example.invalid/{path.name}",
               "missing": str(path) + ".gone"}[how]
        try:
            frame = read_labelled_file(uri, settings_)
        except RefitError as exc:
            one_line(exc)
            return
        assert how in ("plain", "file-uri") and len(frame) > 0
        assert list(frame.columns) == ["text", "label"]
        assert frame["label"].map(lambda v: isinstance(v, str) and v.strip() != "").all()

    check()


# -- request-log windows: what the monitor reads from inference/ partitions ---------------------------------------

DAY = date(2024, 5, 1)
START = datetime(2024, 5, 1, 6, tzinfo=timezone.utc)
END = datetime(2024, 5, 1, 18, tzinfo=timezone.utc)
in_day = st.datetimes(datetime(2024, 5, 1), datetime(2024, 5, 1, 23, 59), timezones=st.just(timezone.utc))
COLUMN_VALUES = {
    "request_id": [st.sampled_from(["a", "b", "c", "d", "", " "]) | st.none(), st.integers(0, 3)],
    "timestamp": [in_day, in_day.map(lambda d: d.isoformat()),
                  st.sampled_from(["garbage", "", "2024-13-45", "1714550400"]) | st.none(), st.integers(0, 10**18)],
    "text": [st.text(max_size=10) | st.none(), st.integers(-(2**63), 2**63 - 1), st.just("x" * 2001)],
    "predicted_label": [st.sampled_from(["a", "b", " "]) | st.none(), st.integers(0, 2)],
    "confidence": [st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4) | st.none()],
    "model_version": [st.sampled_from(["1", "2"])],
    "served_by": [st.sampled_from(["student", "champion"])],
    "extra": [st.text(max_size=3)],
}


@st.composite
def inference_parts(draw):
    """Up to 3 Parquet parts of one day's partition, each with its own columns and column types."""
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        n = draw(st.integers(0, 8))
        columns = [c for c in COLUMN_VALUES if draw(st.integers(0, 9)) > 0]
        if not columns:  # a part with rows but no columns is no Parquet anyone writes
            continue
        part = {}
        for column in columns:
            values = draw(st.sampled_from(COLUMN_VALUES[column]))
            part[column] = draw(st.lists(values, min_size=n, max_size=n))
        parts.append(pd.DataFrame(part, index=range(n)))
    return parts


def _in_window(value) -> bool:
    """The rows the monitor must see: a time in the window, or no time at all (to be quarantined, not dropped)."""
    try:
        ts = pd.to_datetime(value, utc=True, format="mixed")
    except (ValueError, TypeError, OverflowError):
        return True
    return bool(pd.isna(ts) or START <= ts < END)


def test_a_request_log_window_is_measured_or_refused_and_counts_add_up(tmp_path, fuzz_cases):
    from refit import requestlog
    from tasks.validate import validate_window

    @settings(FUZZ, max_examples=150)
    @given(inference_parts(), st.integers(1, 6))
    @example([pd.DataFrame({"request_id": ["a"], "timestamp": ["garbage"], "text": ["x"], "predicted_label": ["y"],
                            "confidence": [0.5], "model_version": ["1"]})], 1)  # was a DateParseError on read
    def check(parts: list[pd.DataFrame], min_rows: int) -> None:
        fuzz_cases["request_log_window"] += 1
        store = LocalStore(tempfile.mkdtemp(dir=tmp_path))
        for i, part in enumerate(parts):
            store.put_parquet(f"inference/model=m/date={DAY.isoformat()}/part-{i}.parquet", part)
        expected = sum(part["timestamp"].map(_in_window).sum() if "timestamp" in part else len(part)
                       for part in parts)
        if not any("timestamp" in part for part in parts):
            expected = sum(len(part) for part in parts)
        window = requestlog.read_inference(store, "m", START, END)
        assert len(window) == expected, "rows were dropped on the way to the monitor"
        before = keys_under(store)
        try:
            validated = validate_window.fn(store, "m", window, min_rows, check_schema=True)
        except RefitError as exc:
            one_line(exc)
            return
        assert validated.rows_in == len(window) == len(validated.kept) + validated.rows_quarantined
        assert sum(validated.reasons.values()) == validated.rows_quarantined
        assert len(validated.kept) >= min_rows
        new = keys_under(store) - before
        assert sum(len(store.get_parquet(k)) for k in new) == validated.rows_quarantined
        kept = validated.kept
        assert kept["text"].map(lambda t: isinstance(t, str) and 0 < len(t.strip()) and len(t) <= 2000).all()
        assert kept["confidence"].map(lambda c: isinstance(c, float) and 0 <= c <= 1).all()
        assert not kept["request_id"].duplicated().any()

    check()


# -- the serving app's body parsers (the same over real HTTP in tests/serving/test_fuzz_http.py) ------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=10)
texts_field = st.lists(st.text(max_size=30) | JSON, max_size=5)
predict_bodies = st.one_of(
    st.binary(max_size=100), JSON.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"texts": texts_field}, optional={"extra": JSON}).map(lambda v: json.dumps(v).encode()))


def test_predict_body_parser_gives_texts_or_a_4xx(fuzz_cases):
    from serving.schema import BadRequest, Limits, parse_texts

    limits = Limits(max_texts=4, max_text_chars=20)

    @settings(FUZZ, max_examples=200)
    @given(predict_bodies)
    @example(b'{"texts": [' + b"1" * 5000 + b"]}")  # was ValueError (int digits limit): a 500
    @example(b"[" * 100_000 + b"]" * 100_000)  # was RecursionError: a 500
    @example(b'{"texts": ["a\\ud800b"]}')  # was accepted, then the tokenizer raised TypeError: a 500
    def check(body: bytes) -> None:
        fuzz_cases["predict_body"] += 1
        try:
            texts = parse_texts(body, limits)
        except BadRequest as exc:
            assert 400 <= exc.status < 500 and one_line(exc)
            return
        assert 1 <= len(texts) <= limits.max_texts
        for text in texts:
            assert isinstance(text, str) and text.strip() and len(text) <= limits.max_text_chars
            text.encode("utf-8")

    check()


feedback_item = st.dictionaries(st.sampled_from(["request_id", "label", "text", "other"]),
                                st.text(max_size=8) | st.none() | JSON, max_size=3)
feedback_bodies = st.one_of(
    st.binary(max_size=80), JSON.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"labels": st.lists(feedback_item, max_size=5)}).map(lambda v: json.dumps(v).encode()))


def test_feedback_body_parser_gives_label_rows_or_a_4xx(fuzz_cases):
    from serving.app import parse_feedback
    from serving.schema import BadRequest

    @settings(FUZZ, max_examples=200)
    @given(feedback_bodies)
    @example(b'{"labels": [{"request_id": "r1", "label": "\\udfff"}]}')  # was written, then Parquet raised: a 500
    @example(b'{"labels": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    def check(body: bytes) -> None:
        fuzz_cases["feedback_body"] += 1
        try:
            frame = parse_feedback(body)
        except BadRequest as exc:
            assert 400 <= exc.status < 500 and one_line(exc)
            return
        assert len(frame) >= 1 and {"label", "request_id", "text"} <= set(frame.columns)
        for value in frame[["label", "request_id", "text"]].to_numpy().ravel():
            assert value is None or (isinstance(value, float) and math.isnan(value)) or isinstance(value, str)
            if isinstance(value, str):
                value.encode("utf-8")  # Parquet and the store take UTF-8 only

    check()


# -- the CLI, in-process -------------------------------------------------------------------------------------------


def run_cli(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """``refit ARGS`` through ``refit.cli.main`` in this process: (exit code, stdout, stderr); os.environ restored."""
    from refit import cli

    saved = dict(os.environ)
    out, err = io.StringIO(), io.StringIO()
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "argv", ["refit", *args])
            try:
                cli.main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return code, out.getvalue(), err.getvalue()


def assert_user_error(code: int, err: str) -> None:
    """Exit 2, no traceback, and the problem on one line (``error: ...``, or click's ``Error``/usage line)."""
    assert code == 2, (code, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    if any(line.startswith("error: ") for line in lines):  # refit's own: one line
        assert len(lines) == 1 and len(lines[0]) > len("error: "), err
    else:  # click's usage error: its panel names the problem
        assert lines and any("Error" in line for line in lines) and any("Usage" in line for line in lines), err


model_names = st.sampled_from(["m", "support-intents", "[/x]", "a b", "ünï"]) | st.text(
    st.characters(blacklist_categories=["Cs", "Cc"]), min_size=1, max_size=8)


def test_cli_labels_import_exits_0_with_counts_or_2_with_one_line(tmp_path, fuzz_cases):
    @settings(FUZZ, max_examples=80)
    @given(label_files(), model_names, st.booleans())
    @example((".csv", b"[/x],note\n1,a\n"), "m", False)  # a column named like rich markup was a MarkupError traceback
    @example((".csv", b"request_id,label\nr1,a\n"), "[/x]", False)  # and so was the model name in the table title
    def check(file: tuple[str, bytes], model_name: str, as_json: bool) -> None:
        fuzz_cases["cli_labels_import"] += 1
        root = Path(tempfile.mkdtemp(dir=tmp_path))
        path = root / f"labels{file[0]}"
        path.write_bytes(file[1])
        args = ["labels", "import", str(path), "--model-name", model_name] + (["--json"] if as_json else [])
        code, out, err = run_cli(args, {"REFIT_HOME": str(root / "home")})
        if code == 0:
            assert "Traceback" not in err
            if as_json:
                result = json.loads(out.strip().splitlines()[-1])
                assert result["accepted"] + result["quarantined"] == result["rows"]
                assert result["model_name"] == model_name
            return
        assert_user_error(code, err)
        assert not list((root / "home" / "store").glob("labels/**/*.parquet")), "a refused file wrote labels"

    check()


def test_cli_drift_exits_2_on_unusable_files_and_policies(tmp_path, fuzz_cases):
    @settings(FUZZ, max_examples=40)
    @given(label_files(), label_files(), st.sampled_from([None, "text", "[/x]", "label"]),
           st.sampled_from(["drift", "nope", "bad.yaml"]))
    def check(reference, current, text_column, policy) -> None:
        fuzz_cases["cli_drift"] += 1
        root = Path(tempfile.mkdtemp(dir=tmp_path))
        (root / "bad.yaml").write_bytes(b"min_window_rows: [\n")
        paths = []
        for name, (suffix, data) in (("reference", reference), ("current", current)):
            paths.append(root / f"{name}{suffix}")
            paths[-1].write_bytes(data)
        args = ["drift", *map(str, paths), "--policy", str(root / policy) if policy.endswith(".yaml") else policy]
        args += ["--text-column", text_column] if text_column else []
        code, out, err = run_cli(args, {"REFIT_HOME": str(root / "home")})
        # At most 8 rows a file: below every policy's min_window_rows, so never a measured verdict.
        assert_user_error(code, err)

    check()


COMMANDS = [["monitor"], ["update"], ["rollback"], ["bootstrap"], ["report"], ["demo"], ["labels", "import", "x.csv"],
            ["adopt", "--train", "x.csv"], ["drift", "a.csv", "b.csv"], ["serve"], ["ui"], ["bench", "drift"],
            ["bench", "update-cost"], ["bench", "cascade"], ["bench", "serve"]]
option_text = st.text(st.characters(blacklist_categories=["Cs", "Cc"]), max_size=12)


@st.composite
def bad_command_lines(draw):
    """A command line that is a user mistake by construction, so none of them starts a flow or a server."""
    command = list(draw(st.sampled_from(COMMANDS)))
    mistake = draw(st.sampled_from(["unknown-option", "store", "not-a-number", "extra-argument"]))
    if mistake == "unknown-option":
        return command + ["--zz" + draw(st.text("abcdefgh-", max_size=6))]
    if mistake == "store" and command[0] in ("monitor", "update", "rollback", "bootstrap", "demo", "labels"):
        store = draw(option_text.filter(lambda s: s not in ("", "local", "s3") and not s.startswith("-")))
        return command + ["--store", store]
    if mistake == "not-a-number":
        option = {"monitor": "--window-hours", "ui": "--port", "serve": "--port"}.get(command[0])
        if option:
            value = draw(option_text.filter(lambda s: not _number(s) and not s.startswith("-")))
            return command + [option, value]
    if command[0] in ("labels", "drift", "adopt", "bench"):
        return command + ["--zz"]
    return command + [draw(option_text.filter(lambda s: s.strip() and not s.startswith("-")))]


def _number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def test_cli_mistakes_exit_2_with_one_line_and_start_nothing(tmp_path, fuzz_cases):
    @settings(FUZZ, max_examples=120)
    @given(bad_command_lines())
    @example(["monitor", "--store", "[/x]"])
    def check(args: list[str]) -> None:
        fuzz_cases["cli_options"] += 1
        home = Path(tempfile.mkdtemp(dir=tmp_path)) / "home"
        code, out, err = run_cli(args, {"REFIT_HOME": str(home)})
        assert_user_error(code, err)
        assert not (home / "prefect").exists() and not (home / "mlflow.db").exists()  # no flow started

    check()


@pytest.mark.parametrize("case", ["bad-utf8-labels", "markup-column", "bad-policy", "bad-store", "unknown-option"])
def test_cli_mistakes_in_a_real_process(case, tmp_path, fuzz_cases):
    """A few of the same cases through a real ``python -m refit.cli``: what a user's shell sees."""
    fuzz_cases["cli_subprocess"] += 1
    labels = tmp_path / "labels.csv"
    labels.write_bytes({"bad-utf8-labels": b"request_id,label\n\xff\xfe,x\n"}.get(case, b"[/x],note\n1,a\n"))
    texts = tmp_path / "texts.csv"
    texts.write_text("text\nbook a flight\nwhat is my balance\n")
    policy = tmp_path / "policy.yaml"
    policy.write_bytes(b"\xff\xfe: [")
    args = {"bad-utf8-labels": ["labels", "import", str(labels)], "markup-column": ["labels", "import", str(labels)],
            "bad-policy": ["drift", str(texts), str(texts), "--policy", str(policy)],
            "bad-store": ["monitor", "--store", "nowhere"], "unknown-option": ["monitor", "--window-hourz", "1"]}[case]
    env = os.environ | {"REFIT_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-m", "refit.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert_user_error(proc.returncode, proc.stderr)
    if case != "unknown-option":
        assert proc.stderr.startswith("error: "), proc.stderr
