"""`refit labels request` on a real home: a local store, SQLite MLflow in tmp_path, the drift encoder's embeddings.

The traffic is CLINC150: ten intents the champion's reference holds, answered
confidently, and two intents it never saw, answered unsure. A drift episode
is opened the way the monitor opens one (``registry.episodes.join_or_open``).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timedelta, timezone

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from refit import requestlog
from refit.data import text_keys
from refit.errors import RefitError
from refit.store import LocalStore
from tasks.label_requests import LEDGER_COLUMNS, REQUEST_COLUMNS, ledger_prefix, request_labels

JSON_KEYS = {"requested", "file", "episode", "clusters", "new_clusters", "unlike_reference", "budget", "candidates",
             "model_name", "since", "ledger", "run_id", "cpu_seconds", "note"}


class Home:
    """One model's traffic, labels, reference and (once ``open_episode`` is called) drift episode."""

    def __init__(self, settings, clinc: pd.DataFrame, model_name: str):
        from registry.tracking import configure

        self.settings, self.model = settings, model_name
        self.store = LocalStore(settings.local_store_root)
        self.experiment_id = configure(settings)
        self.now = datetime.now(timezone.utc)
        intents = sorted(clinc.loc[clinc["label"] != "oos", "label"].unique())
        self.known, self.new = intents[:10], intents[100:102]
        reference = clinc[clinc["label"].isin(self.known) & (clinc["split"] == "train")].groupby("label").head(30)
        self.store.put_parquet(f"reference/model={model_name}/version=1/sample.parquet",
                               reference.assign(predicted_label=reference["label"], confidence=0.95)[
                                   ["text", "label", "predicted_label", "confidence"]])
        rng = np.random.default_rng(0)
        test = clinc[clinc["split"] == "test"]
        familiar = test[test["label"].isin(self.known)].groupby("label").head(20)
        unseen = test[test["label"].isin(self.new)].groupby("label").head(20)
        served = pd.concat([familiar.assign(confidence=rng.uniform(0.8, 0.99, len(familiar))),
                            unseen.assign(confidence=rng.uniform(0.2, 0.45, len(unseen)))], ignore_index=True)
        repeats = served[served["label"].isin(self.new)].head(5)  # the same texts served again
        served = pd.concat([served, repeats], ignore_index=True)
        when = self.now - timedelta(hours=1)
        served["request_id"] = [requestlog.new_request_id(when) for _ in range(len(served))]
        self.label_of = dict(zip(served["request_id"], served["label"]))
        self.new_texts = set(unseen["text"])
        requestlog.write_inference(self.store, model_name, pd.DataFrame({
            "request_id": served["request_id"], "timestamp": when, "text": served["text"],
            "predicted_label": self.known[0], "confidence": served["confidence"], "model_version": "1"}))
        self.served = served
        # Already labelled: two confident rows and one unsure row (its text must not come back through a repeat).
        self.labelled = served["request_id"].iloc[[0, 1, len(familiar)]].tolist()
        requestlog.write_labels(self.store, model_name, pd.DataFrame({"request_id": self.labelled, "label": "x",
                                                                 "source": "test"}))
        self.labelled_text = served["text"].iloc[len(familiar)]

    def open_episode(self):
        from registry.episodes import join_or_open
        from registry.tracking import RUN_TYPE

        check = MlflowClient().create_run(self.experiment_id, tags={RUN_TYPE: "drift-check", "refit.model": self.model})
        start, end = (self.now - timedelta(hours=2)).isoformat(), self.now.isoformat()
        episode, opened = join_or_open(self.experiment_id, self.model, start, end, "high", 1, check.info.run_id)
        assert opened
        return episode

    def request(self, budget: int, **kwargs):
        return request_labels(self.store, self.experiment_id, self.model, budget, self.settings.home_dir, **kwargs)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, data_dir):
    """One REFIT_HOME for the module (creating MLflow's database takes seconds); each test has its own model."""
    from refit.data import load_clinc150
    from refit.settings import Settings

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REFIT_HOME", str(tmp_path_factory.mktemp("label-requests") / "home"))
        mp.setenv("REFIT_DATA_DIR", str(data_dir))
        mp.delenv("REFIT_MODEL_NAME", raising=False)
        yield Settings(), load_clinc150(data_dir)


@pytest.fixture
def home(shared, request):
    settings, clinc = shared
    return Home(settings, clinc, f"support-{request.node.name[5:35].replace('_', '-')}")


def run_cli(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """``refit ARGS`` in this process (as ``python -m refit.cli`` runs it), its environment changes undone after."""
    from refit.cli import main

    before = dict(os.environ)
    monkeypatch.setattr(sys, "argv", ["refit", *args])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        os.environ.clear()
        os.environ.update(before)
    out, err = capsys.readouterr()
    return code, out, err


def test_a_request_asks_for_new_unsure_texts_first_and_never_for_labelled_ones_or_repeats(home):
    episode = home.open_episode()
    result = home.request(12)
    assert (result.requested, result.episode, result.clusters) == (12, episode.id, 6)
    frame = pd.read_csv(result.file)
    assert list(frame.columns) == REQUEST_COLUMNS and len(frame) == 12
    assert result.file.startswith(str(home.settings.home_dir / "label-requests" / f"{home.model}-"))
    assert not set(frame["request_id"]) & set(home.labelled)
    assert home.labelled_text not in set(frame["text"])  # its repeat is not asked for either
    assert text_keys(frame["text"]).is_unique
    # 38 of the 237 candidates are the unseen intents: they open the list, take well over their 16% (two of
    # twelve), and each of the two intents has a first example
    unseen = frame["text"].isin(home.new_texts)
    assert unseen.head(4).all() and unseen.sum() >= 5
    assert set(home.served.loc[home.served["text"].isin(frame.loc[unseen, "text"]), "label"]) == set(home.new)
    assert frame.loc[unseen, "cluster"].eq(0).any() and result.unlike_reference >= 5
    ledger = home.store.read_parquet_prefix(ledger_prefix(home.model))
    assert list(ledger.columns) == LEDGER_COLUMNS and sorted(ledger["request_id"]) == sorted(frame["request_id"])
    assert set(ledger["episode"]) == {episode.id}
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["refit.run_type"] == "label-request" and run.data.tags["refit.episode_id"] == episode.id
    assert run.data.tags["refit.model"] == home.model and run.data.params["budget"] == "12"
    assert run.data.metrics["requested"] == 12 and run.data.metrics["clusters"] == 6
    artifacts = {a.path for a in MlflowClient().list_artifacts(result.run_id)}
    assert artifacts == {"why.md", "label-request"}
    why = mlflow.artifacts.load_text(f"runs:/{result.run_id}/why.md")
    assert "3 already labelled" in why and f"{result.unlike_reference} of the 12 texts are unlike" in why
    # The file comes back with a label column and goes in as it is: every row is a label of a served request.
    from refit.labels import import_labels

    back = import_labels(home.store, home.model, frame.assign(label=frame["request_id"].map(home.label_of)),
                         source="import:request.csv", max_text_chars=2000)
    assert (back.accepted, back.quarantined, back.waiting) == (12, 0, 0)


def test_cli_twice_then_past_the_candidates_then_nothing_left(home, capsys, monkeypatch):
    home.open_episode()
    picked = []
    for _ in range(2):
        code, out, err = run_cli(["labels", "request", "--model-name", home.model, "--budget", "10", "--json"], capsys,
                                 monkeypatch)
        assert code == 0, err
        answer = json.loads(out.strip().splitlines()[-1])
        assert set(answer) == JSON_KEYS and answer["requested"] == 10
        assert list(pd.read_csv(answer["file"]).columns) == REQUEST_COLUMNS
        picked.append(set(pd.read_csv(answer["file"])["request_id"]))
    assert not picked[0] & picked[1]  # the second run asks for other texts
    out_file = home.settings.home_dir / "mine.csv"
    code, out, err = run_cli(["labels", "request", "--model-name", home.model, "--budget", "1000",
                              "--out", str(out_file), "--json"], capsys, monkeypatch)
    rest = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and rest["file"] == str(out_file) and rest["requested"] == rest["candidates"] == 237 - 20
    assert "only 217 candidate texts for a budget of 1000" in rest["note"]
    code, out, err = run_cli(["labels", "request", "--model-name", home.model, "--budget", "5"], capsys, monkeypatch)
    assert code == 0 and "no text of the episode is left" in err
    assert len(home.store.list(ledger_prefix(home.model))) == 3  # the empty request wrote nothing


def test_no_open_episode_or_no_budget_is_one_line_and_writes_nothing(home, capsys, monkeypatch):
    code, out, err = run_cli(["labels", "request", "--model-name", home.model, "--budget", "5"], capsys, monkeypatch)
    assert code == 2 and "has no open drift episode" in err and "Traceback" not in err
    assert not list(home.settings.home_dir.glob(f"label-requests/{home.model}-*"))
    assert home.store.list(ledger_prefix(home.model)) == []
    runs = MlflowClient().search_runs([home.experiment_id], f"tags.`refit.run_type` = 'label-request' and "
                                                            f"tags.`refit.model` = '{home.model}'")
    assert runs == []
    home.open_episode()
    code, out, err = run_cli(["labels", "request", "--model-name", home.model, "--budget", "0"], capsys, monkeypatch)
    assert code == 2 and "at least 1" in err and "Traceback" not in err
    with pytest.raises(RefitError, match="at least 1"):
        home.request(-3)


def test_the_cost_report_prices_labels_beside_compute(home):
    from tasks.report import cost_report, markdown

    home.open_episode()
    home.request(8)
    [page] = cost_report([home.model], home.experiment_id, home.store, cpu_usd_per_hour=0.048, budget_usd=1.0,
                         log=False)
    assert page["labels_arrived_this_month"] == 3 and page["labels_requested_this_month"] == 8
    assert page["label_usd"] == 0.05 and page["label_spend_usd"] == pytest.approx(0.15)
    assert page["label_requested_usd"] == pytest.approx(0.40)
    assert page["spend_with_labels_usd"] == pytest.approx(page["spend_usd"] + 0.15)
    text = markdown([page])
    assert "| labels requested this month | 8 |" in text and "| label spend (USD, arrived) | 0.15 |" in text
