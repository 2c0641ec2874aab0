"""`refit adopt` end to end: a checkpoint made outside refit becomes champion v1 as it is.

The packaged MiniLM is fine-tuned briefly with plain transformers and saved
with ``save_pretrained``; ``refit adopt --model`` registers it, and its golden
accuracy must equal the checkpoint's own, measured without refit. Bad input
ends in one line and exit 2 with nothing registered or written.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.e2e  # it trains a checkpoint, adopts, updates and serves it: the e2e tier
REFIT = [sys.executable, "-m", "refit.cli"]
INTENTS = ["balance", "transfer", "alarm", "weather", "flip_coin", "timer", "translate", "book_flight"]


def run_cli(args: list[str], env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(REFIT + args, env=env, capture_output=True, text=True, timeout=timeout)


def _own_accuracy(checkpoint: Path, frame: pd.DataFrame) -> float:
    """The checkpoint's accuracy with plain transformers, as its team would measure it."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    hits = []
    with torch.no_grad():
        for start in range(0, len(frame), 64):
            part = frame.iloc[start : start + 64]
            logits = model(**tokenizer(part["text"].tolist(), padding=True, truncation=True, return_tensors="pt")).logits
            hits += [model.config.id2label[int(i)] == label for i, label in zip(logits.argmax(-1), part["label"])]
    return float(np.mean(hits))


@pytest.fixture(scope="module")
def team(tmp_path_factory, data_dir):
    """What a team brings: a classifier fine-tuned outside refit, its training data and a golden set."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from refit import modeling
    from refit.data import load_clinc150

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("team")
    clinc = load_clinc150(data_dir)
    train = clinc[(clinc["split"] == "train") & clinc["label"].isin(INTENTS)].groupby("label").head(40)
    golden = clinc[(clinc["split"] == "test") & clinc["label"].isin(INTENTS)].groupby("label").head(20)
    train[["text", "label"]].to_csv(root / "train.csv", index=False)
    golden[["text", "label"]].rename(columns={"label": "intent"}).to_parquet(root / "golden-intent.parquet")
    golden[["text", "label"]].to_parquet(root / "golden.parquet")

    torch.manual_seed(0)
    base = modeling.packaged_base_path()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(INTENTS), id2label=dict(enumerate(INTENTS)), label2id={l: i for i, l in enumerate(INTENTS)})
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    ids = torch.tensor(train["label"].map(INTENTS.index).to_numpy())
    model.train()
    for _ in range(2):
        order = torch.randperm(len(train))
        for start in range(0, len(train), 16):
            pick = order[start : start + 16]
            features = tokenizer(train["text"].iloc[pick.numpy()].tolist(), padding=True, return_tensors="pt")
            model(**features, labels=ids[pick]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    checkpoint = root / "checkpoint"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    return root, checkpoint, _own_accuracy(checkpoint, golden[["text", "label"]])


def _env(home: Path, data_dir: Path) -> dict[str, str]:
    return os.environ | {"REFIT_HOME": str(home), "REFIT_DATA_DIR": str(data_dir), "REFIT_TORCH_THREADS": "1"}


def _files(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file() and "prefect" not in p.parts)


def test_adopted_checkpoint_is_v1_as_it_is(team, tmp_path, data_dir):
    root, checkpoint, own = team
    assert own > 0.5  # the brief fine-tune learned something: the comparison below means something
    home = tmp_path / "home"
    proc = run_cli(["adopt", "--model", str(checkpoint), "--train", str(root / "train.csv"), "--golden",
                    str(root / "golden.parquet"), "--model-name", "support-intents", "--json"], _env(home, data_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"model_name", "version", "labels", "golden_accuracy", "golden_rows", "base_model"} <= result.keys()
    assert (result["model_name"], result["version"], result["labels"], result["golden_rows"]) == (
        "support-intents", 1, len(INTENTS), 20 * len(INTENTS))
    assert result["base_model"] == str(checkpoint.resolve())
    assert abs(result["golden_accuracy"] - own) <= 0.01, (result["golden_accuracy"], own)

    from mlflow import MlflowClient

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    try:
        client = MlflowClient()
        tags = client.get_model_version("support-intents", "1").tags
        champion = client.get_model_version_by_alias("support-intents", "champion").version
    finally:
        mlflow.set_tracking_uri(None)
    weights = hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()
    assert tags["refit.adopted_from"] == str(checkpoint.resolve())
    assert tags["refit.adopted_weights_sha256"] == weights
    assert tags["refit.base_model_uri"].endswith("/base") and tags["refit.kind"] == "adopt"
    assert str(champion) == "1"
    store = home / "store"
    assert (store / "evaluation" / "model=support-intents" / "golden" / "current.json").is_file()
    assert (store / "reference" / "model=support-intents" / "version=1" / "pool.parquet").is_file()

    # Bad input into the same home: one line, exit 2, nothing registered or written.
    before = _files(home)
    bad = root / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "empty.csv").write_text("")
    golden_unknown = pd.read_parquet(root / "golden.parquet")
    golden_unknown.loc[0, "label"] = "cancel_reservation"
    golden_unknown.to_csv(bad / "golden-unknown.csv", index=False)
    cases = {
        "no label column": ["--train", str(root / "train.csv"), "--golden", str(root / "golden-intent.parquet")],
        "empty file": ["--train", str(bad / "empty.csv")],
        "golden label": ["--train", str(root / "train.csv"), "--golden", str(bad / "golden-unknown.csv"),
                         "--model", str(checkpoint)],
        "not sequence classification": ["--train", str(root / "train.csv"), "--model",
                                        str(checkpoint.parent / "not-a-classifier")],
    }
    (checkpoint.parent / "not-a-classifier").mkdir(exist_ok=True)
    config = json.loads((checkpoint / "config.json").read_text()) | {"architectures": ["BertModel"]}
    (checkpoint.parent / "not-a-classifier" / "config.json").write_text(json.dumps(config))
    for why, args in cases.items():
        proc = run_cli(["adopt", *args, "--model-name", "other", "--json"], _env(home, data_dir), timeout=300)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and proc.stdout == "", (why, proc.stdout, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (why, proc.stderr)
        assert _files(home) == before, why
    # A fresh home stays unwritten: not even REFIT_HOME is made.
    proc = run_cli(["adopt", "--train", str(bad / "empty.csv")], _env(tmp_path / "untouched", data_dir), timeout=300)
    assert proc.returncode == 2 and not (tmp_path / "untouched").exists()


NEW_INTENTS = ["pay_bill", "oil_change_how", "recipe", "restaurant_reviews"]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else "server exited"
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError("the server never became ready")


def test_adopted_model_is_served_labelled_monitored_and_updated(team, tmp_path, data_dir):
    """A team's first hour: adopt, serve, traffic, labels in both ways, drift, an update, v2 answering."""
    import socket
    from datetime import datetime, timedelta, timezone

    import httpx

    from refit.data import load_clinc150

    root, checkpoint, _ = team
    home, name = tmp_path / "home", "support-intents"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (tmp_path / "direct.yaml").write_text(
        "mode: direct\ncanary_share: 1.0\nwindow_seconds: 5\nmin_requests: 5\ncheck_every_seconds: 1\n"
        "watch_seconds: 5\nguards:\n  max_error_rate_increase: 0.01\n  max_latency_p95_ratio: 100.0\n"
        "  min_confidence_ratio: 0.0\n  max_cost_per_1k_ratio: 100.0\n")
    env = _env(home, data_dir) | {
        "REFIT_SERVE_PORT": str(port), "REFIT_SERVE_URL": f"http://127.0.0.1:{port}",
        "REFIT_SERVE_ADMIN_TOKEN": "admin-secret", "REFIT_SERVE_FEEDBACK_TOKEN": "feedback-secret",
        "REFIT_SERVE_POLL_SECONDS": "2", "REFIT_SERVE_ROLLOUT_POLICY": str(tmp_path / "direct.yaml")}
    proc = run_cli(["adopt", "--model", str(checkpoint), "--train", str(root / "train.csv"), "--golden",
                    str(root / "golden.parquet"), "--model-name", name, "--json"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    server = subprocess.Popen(REFIT + ["serve", "--model-name", name], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, server)
        # Traffic drifts: most requests are intents the adopted model was never trained on.
        clinc = load_clinc150(data_dir)
        val = clinc[clinc["split"] == "val"]
        window = pd.concat([val[val["label"].isin(INTENTS)].groupby("label").head(15),
                            clinc[(clinc["split"] == "train") & clinc["label"].isin(NEW_INTENTS)]
                            .groupby("label").head(70)]).sample(frac=1.0, random_state=0)
        started = datetime.now(timezone.utc) - timedelta(seconds=5)
        answered = []
        for start in range(0, len(window), 8):
            part = window.iloc[start : start + 8]
            reply = httpx.post(url + "/predict", json={"texts": part["text"].tolist()}, timeout=60)
            assert reply.status_code == 200, reply.text
            answered += [(p["request_id"], label) for p, label in zip(reply.json()["predictions"], part["label"])]
        assert httpx.get(url + "/readyz").json()["model_version"] == 1

        # Labels in: half through /feedback (ids still buffered in the server), half through `refit labels import`.
        half = len(answered) // 2
        feedback = httpx.post(url + "/feedback", headers={"Authorization": "Bearer feedback-secret"}, timeout=60,
                              json={"labels": [{"request_id": i, "label": l} for i, l in answered[:half]]}).json()
        assert (feedback["accepted"], feedback["quarantined"]) == (half, 0)
        flushed = httpx.post(url + "/admin/flush", headers={"Authorization": "Bearer admin-secret"}, timeout=60)
        assert flushed.status_code == 200
        pd.DataFrame(answered[half:], columns=["request_id", "label"]).to_csv(tmp_path / "labels.csv", index=False)
        imported = run_cli(["labels", "import", str(tmp_path / "labels.csv"), "--model-name", name, "--json"], env)
        assert imported.returncode == 0, imported.stderr[-2000:]
        assert json.loads(imported.stdout.strip().splitlines()[-1])["accepted"] == len(answered) - half

        ended = datetime.now(timezone.utc) + timedelta(seconds=1)
        hours = str((ended - started).total_seconds() / 3600)
        # Drift, then the update, in one command: without a Prefect server `--update` runs what the event would start.
        check = run_cli(["monitor", "--model-name", name, "--window-end", ended.isoformat(), "--window-hours", hours,
                         "--update", "--json"], env)
        assert check.returncode == 0, check.stderr[-3000:]
        verdict = json.loads(check.stdout.strip().splitlines()[-1])
        assert verdict["drift_detected"] and verdict["action"] == "update", verdict
        result = verdict["update"]
        assert result["promoted"] and result["version"] == 2, result["verdict"]
        assert result["new_labels"] == len(NEW_INTENTS)

        import time

        deadline = time.monotonic() + 120  # deploy told the server; a direct swap
        while time.monotonic() < deadline and httpx.get(url + "/readyz").json().get("model_version") != 2:
            time.sleep(1)
        texts = clinc[(clinc["split"] == "test") & clinc["label"].isin(NEW_INTENTS)].groupby("label").head(10)
        reply = httpx.post(url + "/predict", json={"texts": texts["text"].tolist()}, timeout=60).json()
        assert {p["model_version"] for p in reply["predictions"]} == {2}
        # v2 answers intents v1 could never output (v1 scores 0 on them): at least half of these held-out texts.
        hits = [p["label"] == label for p, label in zip(reply["predictions"], texts["label"])]
        assert sum(hits) >= 20, sum(hits)
    finally:
        server.terminate()
        server.wait(timeout=60)
