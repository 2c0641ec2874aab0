"""Scenarios: the shipped YAML files load, and build() cuts leak-free frames from the real data."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from refit import data, scenario
from refit.data import text_hashes
from refit.errors import RefitError

SHIPPED = ["clinc-shift", "clinc-shift-small"]  # the one-shift form; clinc-three-shifts below


@pytest.fixture(scope="module")
def clinc(data_dir) -> pd.DataFrame:
    return data.load_clinc150(data_dir)


@pytest.fixture(scope="module", params=SHIPPED)
def built(request, clinc):
    sc, _ = scenario.load_scenario(request.param)
    return sc, scenario.build(sc, clinc)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_scenarios_load(name):
    sc, path = scenario.load_scenario(name)
    assert sc.name == name
    assert path == scenario.SCENARIO_DIR / f"{name}.yaml"
    assert sc.source.kind == "clinc150"
    assert not set(sc.reference.groups) & set(sc.shift.groups)


def test_small_scenario_is_smaller():
    full, _ = scenario.load_scenario("clinc-shift")
    small, _ = scenario.load_scenario("clinc-shift-small")
    assert small.windows.shifted_rows < full.windows.shifted_rows
    assert small.evaluation.golden_max_rows < full.evaluation.golden_max_rows
    assert small.reference.max_per_label is not None and full.reference.max_per_label is None


def test_evaluation_sets_come_from_the_test_split_of_their_groups(built, clinc):
    sc, d = built
    test_texts = set(clinc.loc[clinc["split"] == "test", "text"])
    assert set(d.golden["text"]) <= test_texts
    assert set(d.shifted_eval["text"]) <= test_texts
    assert set(d.golden["group"]) == set(sc.reference.groups)
    assert set(d.shifted_eval["group"]) == set(sc.shift.groups)
    assert len(d.golden) > 0 and len(d.shifted_eval) > 0


def test_evaluation_sets_never_overlap_what_is_trained_or_served(built):
    _, d = built
    evaluated = text_hashes(pd.concat([d.golden, d.shifted_eval])["text"])
    for name in ("train", "no_drift_window", "shifted_window", "hotfix"):
        seen = text_hashes(getattr(d, name)["text"])
        assert not evaluated & seen, f"{name} shares {len(evaluated & seen)} texts with the evaluation sets"


def test_train_covers_every_label(built, clinc):
    sc, d = built
    assert d.labels == sorted(clinc["label"].unique()) and len(d.labels) == 151
    assert set(d.train["label"]) == set(d.labels)
    sparse = d.train[~d.train["group"].isin(sc.reference.groups)]
    assert sparse.groupby("label").size().max() <= sc.reference.sparse_per_label
    if sc.reference.max_per_label:
        dense = d.train[d.train["group"].isin(sc.reference.groups)]
        assert dense.groupby("label").size().max() <= sc.reference.max_per_label


def test_windows_have_the_configured_size_and_shift(built):
    sc, d = built
    w = sc.windows
    assert len(d.no_drift_window) == w.no_drift_rows
    assert set(d.no_drift_window["group"]) <= set(sc.reference.groups)
    assert len(d.shifted_window) == w.shifted_rows
    share = d.shifted_window["group"].isin(sc.shift.groups).mean()
    assert share == pytest.approx(w.shifted_share, abs=0.02)
    assert not set(d.no_drift_window["text"]) & set(d.shifted_window["text"])
    assert len(d.hotfix) == sc.hotfix.rows
    assert set(d.hotfix["group"]) <= set(sc.shift.groups)
    assert not set(d.hotfix["text"]) & set(d.shifted_window["text"])


def test_build_is_deterministic(clinc):
    sc, _ = scenario.load_scenario("clinc-shift-small")
    a, b = scenario.build(sc, clinc), scenario.build(sc, clinc)
    for name in ("train", "golden", "shifted_eval", "shifted_window", "hotfix"):
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name))
    other = scenario.build(sc.model_copy(update={"seed": 1}), clinc)
    assert not other.shifted_window["text"].equals(a.shifted_window["text"])


def test_evaluation_sets_respect_their_max_rows(clinc):
    sc, _ = scenario.load_scenario("clinc-shift-small")
    d = scenario.build(sc, clinc)
    assert len(d.golden) <= sc.evaluation.golden_max_rows
    assert len(d.shifted_eval) <= sc.evaluation.shifted_max_rows


def test_unknown_group_is_refused(clinc):
    sc, _ = scenario.load_scenario("clinc-shift-small")
    broken = sc.model_copy(update={"shift": scenario.Shift(groups=["travel", "no_such_domain"])})
    with pytest.raises(RefitError, match="shift shift: groups") as info:
        scenario.build(broken, clinc)
    assert "no_such_domain" in str(info.value)


def _yaml_variant(tmp_path, mutate) -> str:
    raw = yaml.safe_load((scenario.SCENARIO_DIR / "clinc-shift-small.yaml").read_text())
    mutate(raw)
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_unknown_yaml_key_is_named(tmp_path):
    path = _yaml_variant(tmp_path, lambda raw: raw["windows"].update(shifted_shair=0.5))
    with pytest.raises(RefitError, match="windows.shifted_shair"):
        scenario.load_scenario(path)


def test_wrong_value_is_named(tmp_path):
    path = _yaml_variant(tmp_path, lambda raw: raw["windows"].update(shifted_share=1.5))
    with pytest.raises(RefitError, match="windows.shifted_share"):
        scenario.load_scenario(path)


def test_a_path_scenario_loads(tmp_path):
    path = _yaml_variant(tmp_path, lambda raw: raw.update(name="mine"))
    sc, resolved = scenario.load_scenario(path)
    assert sc.name == "mine" and str(resolved) == path


def test_unknown_scenario_name_lists_known_ones():
    with pytest.raises(RefitError) as info:
        scenario.load_scenario("clinc-shfit")
    assert "clinc-shift-small" in str(info.value)


def test_poison_changes_every_label(built):
    _, d = built
    poisoned = scenario.poison(d.hotfix, d.labels, seed=3)
    assert (poisoned["label"] != d.hotfix["label"]).all()
    assert set(poisoned["label"]) <= set(d.labels)
    assert poisoned["text"].tolist() == d.hotfix["text"].tolist()
    assert scenario.poison(d.hotfix, d.labels, seed=3)["label"].tolist() == poisoned["label"].tolist()
    assert d.hotfix["label"].tolist() != poisoned["label"].tolist()  # the input frame is not changed in place
    two = scenario.poison(pd.DataFrame({"text": ["x", "y"], "label": ["a", "b"]}), ["a", "b"], seed=0)
    assert two["label"].tolist() == ["b", "a"]


# --- Several shifts ---------------------------------------------------------------------------------------


def test_the_one_shift_form_is_a_one_element_list():
    sc, _ = scenario.load_scenario("clinc-shift")
    [only] = sc.shift_list()
    assert (only.name, only.groups, only.rows) == ("shift", sc.shift.groups, sc.windows.shifted_rows)
    assert (only.share, only.labelled_share) == (sc.windows.shifted_share, sc.windows.labelled_share)


@pytest.fixture(scope="module")
def three(clinc):
    sc, _ = scenario.load_scenario("clinc-three-shifts")
    return sc, scenario.build(sc, clinc)


def test_three_shifts_bring_labels_v1_never_saw(three):
    sc, d = three
    assert [s.name for s in d.shifts] == [s.name for s in sc.shifts]
    # v1 knows the reference and sparse groups only; the later shifts' groups are new to it.
    assert set(d.train["group"]) == set(sc.reference.groups) | set(sc.reference.sparse_groups)
    assert set(d.labels) == set(d.train["label"])
    sparse = d.train[d.train["group"].isin(sc.reference.sparse_groups)]
    assert sparse["label"].value_counts().max() == sc.reference.sparse_per_label
    first, *later = d.shifts
    assert set(first.window.loc[first.window["group"].isin(first.groups), "label"]) <= set(d.labels)
    for shift in later:
        in_shift = shift.window[shift.window["group"].isin(shift.groups)]
        assert not set(in_shift["label"]) & set(d.labels), shift.name
        assert set(shift.external["group"]) == set(shift.groups)


def test_each_shift_window_has_its_size_and_share_and_never_repeats_another(three, clinc):
    sc, d = three
    test_texts = set(clinc.loc[clinc["split"] == "test", "text"])
    seen: set[str] = set()
    for spec, shift in zip(sc.shifts, d.shifts):
        assert len(shift.window) == spec.rows
        assert shift.window["group"].isin(spec.groups).mean() == pytest.approx(spec.share, abs=0.01)
        shifted_texts = set(shift.window.loc[shift.window["group"].isin(spec.groups), "text"])
        assert not shifted_texts & seen and not shifted_texts & set(d.train["text"])
        seen |= shifted_texts
        assert set(shift.external["text"]) <= test_texts
        assert not text_hashes(shift.external["text"]) & text_hashes(shift.window["text"])


def test_both_shift_forms_at_once_are_refused(tmp_path):
    def both(raw):
        raw["shifts"] = [{"name": "a", "groups": ["travel"], "rows": 100, "share": 0.5, "labelled_share": 0.5}]
    with pytest.raises(RefitError, match="not both"):
        scenario.load_scenario(_yaml_variant(tmp_path, both))


def test_a_shifts_scenario_needs_no_one_shift_keys(tmp_path):
    def only_shifts(raw):
        del raw["shift"]
        for key in ("shifted_rows", "shifted_share", "labelled_share"):
            del raw["windows"][key]
        raw["shifts"] = [{"name": "one", "groups": ["travel"], "rows": 100, "share": 0.5, "labelled_share": 0.5},
                         {"name": "two", "groups": ["meta"], "rows": 100, "share": 0.5, "labelled_share": 0.5}]
    sc, _ = scenario.load_scenario(_yaml_variant(tmp_path, only_shifts))
    assert [s.name for s in sc.shift_list()] == ["one", "two"]


def test_a_user_csv_with_groups_and_several_shifts_builds(tmp_path, clinc):
    """A team's own file: text, label and group columns, no split column; later shifts to groups v1 never saw."""
    domains = ["banking", "home", "travel", "utility", "meta"]
    rows = clinc[clinc["group"].isin(domains)].rename(columns={"group": "product", "text": "utterance",
                                                                "label": "intent"})
    rows[["utterance", "intent", "product"]].to_csv(tmp_path / "tickets.csv", index=False)
    spec = {
        "name": "tickets", "seed": 1,
        "source": {"kind": "file", "path": str(tmp_path / "tickets.csv"), "text_column": "utterance",
                   "label_column": "intent", "group_column": "product"},
        "reference": {"groups": ["banking", "home"], "sparse_groups": ["travel"], "sparse_per_label": 3},
        "shifts": [{"name": "travel", "groups": ["travel"], "rows": 300, "share": 0.6, "labelled_share": 0.5},
                   {"name": "utility", "groups": ["utility"], "rows": 300, "share": 0.6, "labelled_share": 0.5},
                   {"name": "meta", "groups": ["meta"], "rows": 300, "share": 0.6, "labelled_share": 0.5}],
        "windows": {"no_drift_rows": 100},
        "evaluation": {"golden_max_rows": 200, "shifted_max_rows": 100},
        "hotfix": {"rows": 50},
    }
    (tmp_path / "tickets.yaml").write_text(yaml.safe_dump(spec))
    sc, _ = scenario.load_scenario(str(tmp_path / "tickets.yaml"))
    d = scenario.build(sc, scenario.load_source(sc.source, tmp_path))
    assert set(d.train["group"]) == {"banking", "home", "travel"}
    assert [s.name for s in d.shifts] == ["travel", "utility", "meta"]
    for shift in d.shifts[1:]:
        new = set(shift.window.loc[shift.window["group"].isin(shift.groups), "label"])
        assert new and not new & set(d.labels)
    assert all(len(s.window) == 300 and len(s.external) > 0 for s in d.shifts)


def test_a_missing_scenario_or_data_set_is_named_before_anything_is_read(tmp_path, data_dir):
    """What the demo and bootstrap commands check before their flow starts: the loader's own errors, early."""
    with pytest.raises(RefitError, match="no scenario named 'nope'"):
        scenario.load_scenario("nope")
    with pytest.raises(RefitError, match="scenario file .* does not exist"):
        scenario.load_scenario(tmp_path / "nope.yaml")
    spec, _ = scenario.load_scenario("clinc-shift-small")
    scenario.check_source(spec.source, data_dir)  # there: nothing raised
    with pytest.raises(RefitError, match=f"data directory {tmp_path / 'nowhere'} does not exist"):
        scenario.check_source(spec.source, tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "data_full.json").write_text("{}")
    with pytest.raises(RefitError, match="has no domains.json"):
        scenario.check_source(spec.source, tmp_path / "half")
    table = scenario.Source(kind="file", path=str(tmp_path / "intents.csv"))
    with pytest.raises(RefitError, match="intents.csv does not exist"):
        scenario.check_source(table, data_dir)
    pd.DataFrame({"text": ["hi"], "label": ["greet"]}).to_csv(tmp_path / "intents.csv", index=False)
    scenario.check_source(table, data_dir)
