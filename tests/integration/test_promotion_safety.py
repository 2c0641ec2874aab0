"""Promotion, rollback, the lease and adopt under the faults that lost rows, records or the lock.

Real MLflow (SQLite in tmp_path) and the real object stores: the local
directory, and the moto S3 endpoint where a test takes the ``store`` fixture.
A store that fails on purpose is a small wrapper class around a real store,
defined here; nothing of MLflow or S3 is mocked. No test waits on a short
wall-clock margin: renewals are called directly, or awaited with a long
deadline that only a failing test reaches.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from refit import processes
from refit.errors import RefitError
from refit.evalsets import read_golden, suite_versions, write_golden
from refit.faults import FaultInjected
from refit.settings import Settings
from refit.store import LocalStore
from registry import tracking, versions
from registry.rollout import roll_back
from tasks.deploy import promote_with_golden

MODEL = "intent-classifier-safety"


def _registry(tmp_path: Path) -> str:
    return tracking.configure(Settings(home=tmp_path / "home"))


def _version(experiment_id: str, tmp_path: Path, tags: dict[str, str] | None = None, *,
             run_tags: dict[str, str] | None = None, finish: bool = True) -> int:
    """A registered version whose run holds a small ``adapter/``; the run left RUNNING unless ``finish``."""
    adapter = tmp_path / f"adapter-{uuid.uuid4().hex[:6]}"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_text("weights")
    client = MlflowClient()
    run_id = client.create_run(experiment_id, tags=run_tags or {}).info.run_id
    client.log_artifacts(run_id, str(adapter), versions.ADAPTER_DIR)
    if finish:
        client.set_terminated(run_id)
    return versions.register(MODEL, run_id, tags or {})


def _rows(prefix: str, labels: str = "ab", n: int = 3) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"{prefix} {label} {i}" for label in labels for i in range(n)],
                         "label": [label for label in labels for _ in range(n)]})


def _dead_process() -> str:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = processes.identity(child.pid)
    child.kill()
    child.wait()
    return dead


# -- the golden suite ----------------------------------------------------------------------------------------------


def test_a_suite_version_is_never_overwritten(store):
    """Before, ``write_golden(..., k)`` replaced version k: the rows of whoever wrote it first were lost and the
    fingerprint its model version recorded no longer matched any file."""
    first = write_golden(store, MODEL, _rows("base"))
    second = write_golden(store, MODEL, pd.concat([first.frame, _rows("b-fresh").assign(group="g", added=2)]),
                          version=2)
    late = write_golden(store, MODEL, pd.concat([first.frame, _rows("a-fresh")]).assign(added=[1] * 6 + [2] * 6),
                        version=2)  # an update that read version 1 and asks for 2, as the code before did
    assert (first.version, second.version, late.version) == (1, 2, 3)
    assert read_golden(store, MODEL, 2).fingerprint == second.fingerprint
    assert sorted(set(late.frame["added"])) == [1, 3]  # its rows are stamped with the version they joined
    assert write_golden(store, MODEL, late.frame).version == 3  # the same rows again: nothing new is written
    assert suite_versions(store, MODEL) == [1, 2, 3] and read_golden(store, MODEL).version == 3


def _assert_suite_invariants(store, model_name: str) -> None:
    """Every recorded golden fingerprint names a suite version in the store; every promoted fresh set is in the
    newest."""
    newest = set(read_golden(store, model_name).frame["text"])
    for found in MlflowClient().search_model_versions(f"name = '{model_name}'"):
        tags = found.tags
        for prefix in ("refit.golden", "refit.golden_after"):
            if f"{prefix}_version" in tags:
                suite = read_golden(store, model_name, int(tags[f"{prefix}_version"]))
                assert suite.fingerprint == tags[f"{prefix}_fingerprint"], (found.version, prefix)
        if tags.get("refit.deployed") in ("champion", "rolled back"):
            assert set(tags["test.fresh_texts"].split("|")) <= newest, f"v{found.version}'s fresh set is missing"


def test_golden_race_with_a_rollback_between_keeps_every_promoted_fresh_set(tmp_path, store):
    """Updates A and B are judged on suite 1; B is promoted (suite 2) and rolled back; A is promoted after. Before,
    A wrote its suite as "1 + 1" over B's: B's rows were lost and B's recorded fingerprint named nothing."""
    experiment_id = _registry(tmp_path)
    base = write_golden(store, MODEL, _rows("base"))
    v1 = _version(experiment_id, tmp_path, base.tags() | {"refit.deployed": "champion", "test.fresh_texts": "base a 0"})
    versions.promote(MODEL, v1, expected_champion=None)
    fresh = {"A": _rows("a-fresh"), "B": _rows("b-fresh")}
    judged = read_golden(store, MODEL)  # both updates read suite 1 and train meanwhile
    a, b = (_version(experiment_id, tmp_path, judged.tags() | {"test.fresh_texts": "|".join(fresh[k]["text"])})
            for k in "AB")

    after_b = promote_with_golden(store, MODEL, b, v1, fresh["B"], 100, "update B")
    roll_back(MODEL, b, "guard failed", experiment_id=experiment_id, store=store, source="server", restore_to=v1)
    after_a = promote_with_golden(store, MODEL, a, v1, fresh["A"], 100, "update A")

    assert (after_b.version, after_a.version) == (2, 3) and suite_versions(store, MODEL) == [1, 2, 3]
    assert versions.alias_version(MODEL, versions.CHAMPION) == a
    assert set(fresh["B"]["text"]) | set(fresh["A"]["text"]) <= set(after_a.frame["text"])
    _assert_suite_invariants(store, MODEL)


@pytest.mark.parametrize("stop_at", ["update.golden_written", "update.after_promote"])
def test_a_promotion_stopped_anywhere_leaves_no_champion_without_its_fresh_set(tmp_path, monkeypatch, stop_at):
    """Before, the suite grew after the alias moved: a stop at ``update.after_promote`` left the new champion
    with a suite lacking its fresh set. A retry of the whole promotion (Prefect's) reuses the suite it wrote."""
    experiment_id = _registry(tmp_path)
    store = LocalStore(tmp_path / "store")
    base = write_golden(store, MODEL, _rows("base"))
    v1 = _version(experiment_id, tmp_path, base.tags())
    versions.promote(MODEL, v1, expected_champion=None)
    fresh = _rows("fresh")
    v2 = _version(experiment_id, tmp_path, base.tags() | {"test.fresh_texts": "|".join(fresh["text"])})

    monkeypatch.setenv("REFIT_FAULTS", f"{stop_at}=raise")
    with pytest.raises(FaultInjected):
        promote_with_golden(store, MODEL, v2, v1, fresh, 100, "update")
    tags = versions.version_tags(MODEL, v2)
    assert read_golden(store, MODEL, int(tags["refit.golden_after_version"])).fingerprint == \
        tags["refit.golden_after_fingerprint"]
    assert set(fresh["text"]) <= set(read_golden(store, MODEL).frame["text"])
    moved = versions.alias_version(MODEL, versions.CHAMPION) == v2
    assert moved == (stop_at == "update.after_promote")

    monkeypatch.delenv("REFIT_FAULTS")
    again = promote_with_golden(store, MODEL, v2, v1, fresh, 100, "update, retried")
    assert again.version == 2 and suite_versions(store, MODEL) == [1, 2]
    assert versions.alias_version(MODEL, versions.CHAMPION) == v2
    assert versions.version_tags(MODEL, v2)["refit.deployed"] == "champion"
    _assert_suite_invariants(store, MODEL)


def test_the_update_flows_promotion_step_runs_as_a_prefect_task(tmp_path, prefect_harness):
    """What ``flows.update`` calls: the task, inside a transaction, with a store and the fresh rows as arguments."""
    from prefect import flow
    from prefect.transactions import transaction

    from tasks.deploy import promote_update

    experiment_id = _registry(tmp_path)
    store = LocalStore(tmp_path / "store")
    base = write_golden(store, MODEL, _rows("base"))
    v1 = _version(experiment_id, tmp_path, base.tags())
    versions.promote(MODEL, v1, expected_champion=None)
    v2 = _version(experiment_id, tmp_path, base.tags())

    @flow(name="test-promote-update")
    def step() -> int:
        with transaction():
            return promote_update(store, MODEL, v2, v1, _rows("fresh"), 100, "update run").version

    assert step() == 2
    assert versions.alias_version(MODEL, versions.CHAMPION) == v2
    assert versions.version_tags(MODEL, v2)["refit.golden_after_version"] == "2"


# -- rollback ------------------------------------------------------------------------------------------------------


def _champion_2_previous_1(tmp_path: Path) -> str:
    experiment_id = _registry(tmp_path)
    for _ in range(3):
        _version(experiment_id, tmp_path)
    versions.promote(MODEL, 1, expected_champion=None)
    versions.promote(MODEL, 2, expected_champion=1)
    return experiment_id


def _rollback_runs(experiment_id: str) -> list:
    return MlflowClient().search_runs([experiment_id], "tags.`refit.run_type` = 'rollback'")


def test_a_hand_rollback_right_after_a_server_rollback_records_it_once(tmp_path):
    """The hand-run rollback takes the lock the moment the server's rollback releases it. Before, the server's
    record was written after the release: the hand rollback took its intent tag for a stopped rollback,
    recorded it as its own and reported success."""
    experiment_id = _champion_2_previous_1(tmp_path)
    plain = LocalStore(tmp_path / "store")
    hand: list = []

    class HandRollbackAtRelease(LocalStore):
        """The real local store; releasing the server's lock runs the operator's rollback right after."""

        def delete_if(self, key: str, tag: str) -> bool:
            released = super().delete_if(key, tag)
            if key == versions.lock_key(MODEL) and not hand:
                try:
                    hand.append(roll_back(MODEL, None, "operator", experiment_id=experiment_id, store=plain))
                except RefitError as exc:
                    hand.append(exc)
            return released

    server = roll_back(MODEL, 2, "guard failed during canary", experiment_id=experiment_id,
                       store=HandRollbackAtRelease(tmp_path / "store"), source="refit serve (canary guard)",
                       restore_to=1)

    assert isinstance(hand[0], RefitError) and "no previous champion" in str(hand[0])
    assert (server["champion"], server["rolled_back"]) == (1, 2)
    assert versions.alias_version(MODEL, versions.CHAMPION) == 1
    runs = _rollback_runs(experiment_id)
    assert [r.info.run_id for r in runs] == [server["run_id"]]
    assert runs[0].data.tags["refit.rolled_back_by"] == "refit serve (canary guard)"
    assert versions.version_tags(MODEL, 2)["refit.rollback_run_id"] == server["run_id"]


# -- the fence -----------------------------------------------------------------------------------------------------


def test_a_registry_pointed_at_a_new_store_still_promotes_and_rolls_back(tmp_path, store):
    """Before, the counter lived in the store and the high-water mark in MLflow: a new (or restored) store handed
    out numbers below the mark, and every promotion and rollback was refused as stale."""
    experiment_id = _champion_2_previous_1(tmp_path)
    old = LocalStore(tmp_path / "old-store")
    for _ in range(3):  # promotions fenced through the store the registry used before
        with versions.promotion_lock(old, MODEL, "earlier update") as lease:
            lease.fence(MODEL)

    with versions.promotion_lock(store, MODEL, "update after the move") as lease:
        assert lease.number == 1
        assert versions.promote(MODEL, 3, expected_champion=2, lease=lease) == 2
    result = roll_back(MODEL, 3, "guard failed", experiment_id=experiment_id, store=store, source="server",
                       restore_to=2)
    assert result["champion"] == 2 and versions.alias_version(MODEL, versions.CHAMPION) == 2

    versions.forget_fence(store, MODEL, keep_mark=True)  # the counter gone, the mark kept: numbers still climb
    mark, _ = versions.read_fence_mark(store, MODEL)
    with versions.promotion_lock(store, MODEL, "next update") as lease:
        assert mark == 2 and lease.number == mark + 1
        assert versions.promote(MODEL, 3, expected_champion=2, lease=lease) == 2


def test_a_rollback_fenced_out_is_raised_as_lock_busy_and_retried(tmp_path):
    """The server retries a ``LockBusy`` and only logs other refusals ("the champion moved on"). Before, a fenced
    rollback raised a plain ``PromotionConflict``: swallowed, the bad version kept serving."""
    experiment_id = _champion_2_previous_1(tmp_path)

    class LaterHolderSneaksIn(LocalStore):
        """The real local store; once, right after this holder claims its number, a later holder's number is
        recorded as having written the aliases (a paused holder, woken after its lock was broken)."""

        sneaked = False

        def create(self, key: str, data: bytes) -> bool:
            created = super().create(key, data)
            if created and key.startswith(versions.fence_prefix(MODEL)) and not self.sneaked:
                self.sneaked = True
                self.put_bytes(versions.fence_mark_key(MODEL), str(int(key.rsplit("/", 1)[1]) + 5).encode())
            return created

    store = LaterHolderSneaksIn(tmp_path / "store")
    with pytest.raises(versions.LockBusy, match="stale"):
        roll_back(MODEL, 2, "guard failed", experiment_id=experiment_id, store=store, source="server", restore_to=1)
    assert versions.alias_version(MODEL, versions.CHAMPION) == 2 and not _rollback_runs(experiment_id)

    result = roll_back(MODEL, 2, "guard failed", experiment_id=experiment_id, store=store, source="server",
                       restore_to=1)  # the server's retry: a fresh lock, a number above the mark
    assert result["champion"] == 1 and len(_rollback_runs(experiment_id)) == 1


# -- the lease -----------------------------------------------------------------------------------------------------


class Unreliable:
    """A real store (local or moto S3) behind a wrapper that fails on purpose: ``reads_failing`` reads of the lock
    raise before reaching the store; ``replies_lost`` conditional writes reach it and land, and then raise as
    if the answer was lost on the way back."""

    def __init__(self, inner):
        self.inner = inner
        self.reads_failing = 0
        self.replies_lost = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def get_versioned(self, key: str):
        if self.reads_failing and key == versions.lock_key(MODEL):
            self.reads_failing -= 1
            raise ConnectionError("store unreachable (injected)")
        return self.inner.get_versioned(key)

    def replace_if(self, key: str, data: bytes, tag: str) -> bool:
        written = self.inner.replace_if(key, data, tag)
        if self.replies_lost and key == versions.lock_key(MODEL):
            self.replies_lost -= 1
            raise ConnectionError("answer lost (injected)")
        return written


def _renewals(store) -> int:
    import json

    return json.loads(store.get_bytes(versions.lock_key(MODEL)))["renewals"]


def test_a_renewal_whose_read_back_fails_keeps_the_lease(store):
    """Before, the read after the write was outside the ``try``: one store error ended the renewer thread."""
    flaky = Unreliable(store)
    with versions.promotion_lock(flaky, MODEL, "holder", ttl_seconds=3600) as lease:
        flaky.reads_failing = 1
        assert lease.renew() and lease.lost is None
        assert lease.renew() and _renewals(store) == 2
        lease.verify()
    assert not store.list(versions.lock_key(MODEL))  # released: the delete matched the version we wrote


def test_a_renewal_whose_answer_was_lost_is_checked_not_taken_as_lost(store):
    """Before, a renewal that landed but whose answer was lost kept the old version: the next renewal's
    conditional write was refused and the holder declared its own lock broken."""
    flaky = Unreliable(store)
    with versions.promotion_lock(flaky, MODEL, "holder", ttl_seconds=3600) as lease:
        flaky.replies_lost = 1
        assert lease.renew()
        assert lease.renew() and lease.lost is None
        assert _renewals(store) == 2
        lease.verify()
    assert not store.list(versions.lock_key(MODEL))


def test_the_renewer_outlives_store_errors_and_a_broken_lock_is_still_seen(tmp_path):
    store = LocalStore(tmp_path / "store")
    flaky = Unreliable(store)
    with versions.promotion_lock(flaky, MODEL, "holder", ttl_seconds=3600) as lease:
        flaky.reads_failing, flaky.replies_lost = 3, 2
        stop = threading.Event()
        renewer = threading.Thread(target=versions._keep_renewed, args=(lease, 0.01, stop), daemon=True)
        renewer.start()
        deadline = time.monotonic() + 60  # reached only when the renewer died: it renews every 10 ms
        while _renewals(store) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        renewer.join()
        assert _renewals(store) >= 8 and lease.lost is None
        assert flaky.reads_failing == flaky.replies_lost == 0

        store.delete(versions.lock_key(MODEL))  # broken by a waiter, then taken by another holder
        assert store.create(versions.lock_key(MODEL), b'{"holder": "other", "token": "t"}')
        assert not lease.renew() and "other" in lease.lost
        with pytest.raises(versions.LeaseLost):
            lease.fence(MODEL)
    assert store.get_bytes(versions.lock_key(MODEL)) == b'{"holder": "other", "token": "t"}'  # not ours to delete


# -- adopt ---------------------------------------------------------------------------------------------------------


def test_an_adopt_stopped_after_registering_is_replaced_by_the_next(tmp_path):
    """Before, a re-run was refused ("already has versions") and the stopped adopt's version and golden suite
    stayed behind for good."""
    from tasks.adopt import retire_unfinished, unfinished_adoption

    experiment_id = _registry(tmp_path)
    store = LocalStore(tmp_path / "store")
    assert unfinished_adoption(MODEL) == []
    golden = write_golden(store, MODEL, _rows("golden"))
    adopt_run = {tracking.RUN_TYPE: "adopt", "refit.model": MODEL}
    stopped = _version(experiment_id, tmp_path, {"refit.kind": "adopt"} | golden.tags(),
                       run_tags=adopt_run | {"refit.process": _dead_process()}, finish=False)  # killed: left RUNNING

    assert unfinished_adoption(MODEL) == [stopped]
    with mlflow.start_run(experiment_id=experiment_id, tags=adopt_run | {"refit.process": processes.identity()}) as run:
        retire_unfinished(MODEL, [stopped], run.info.run_id)
        again = write_golden(store, MODEL, _rows("golden"))
        assert again.version == golden.version and suite_versions(store, MODEL) == [1]  # nothing left behind
        v2 = versions.register(MODEL, run.info.run_id, {"refit.kind": "adopt"} | again.tags())
        with pytest.raises(RefitError, match="still running"):  # this run's own version: its process lives
            unfinished_adoption(MODEL)
        versions.promote(MODEL, v2, expected_champion=None)
    assert versions.version_tags(MODEL, stopped)["refit.deployed"].startswith("abandoned")
    stopped_run = MlflowClient().get_model_version(MODEL, str(stopped)).run_id
    assert MlflowClient().get_run(stopped_run).info.status == "KILLED"
    with pytest.raises(RefitError, match="champion v2"):  # finished: adopt makes a new model only
        unfinished_adoption(MODEL)


def _tiny_team(root: Path) -> tuple[Path, Path, Path]:
    """A tiny BERT classifier saved as a team would (random weights, the packaged tokenizer), its data, its golden
    set."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from refit import modeling

    labels = ["alarm", "weather", "timer"]
    tokenizer = AutoTokenizer.from_pretrained(modeling.packaged_base_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=len(labels),
                        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    torch.manual_seed(0)
    checkpoint = root / "checkpoint"
    BertForSequenceClassification(config).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    pd.DataFrame([{"text": f"set the {label} please {i}", "label": label} for label in labels for i in range(12)]) \
        .to_csv(root / "train.csv", index=False)
    pd.DataFrame([{"text": f"could you {label} thing {i}", "label": label} for label in labels for i in range(5)]) \
        .to_csv(root / "golden.csv", index=False)
    return checkpoint, root / "train.csv", root / "golden.csv"


def test_adopt_stopped_after_registering_completes_when_run_again(tmp_path, monkeypatch, prefect_harness):
    """The real adopt flow, stopped at ``adopt.after_register`` (a version, no champion), then run again."""
    from flows.adopt import adopt

    checkpoint, train, golden = _tiny_team(tmp_path)
    monkeypatch.setenv("REFIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("REFIT_MODEL_NAME", MODEL)
    monkeypatch.setenv("REFIT_FAULTS", "adopt.after_register=raise")
    with pytest.raises(FaultInjected):
        adopt(str(train), str(golden), str(checkpoint))
    assert versions.alias_version(MODEL, versions.CHAMPION) is None

    monkeypatch.delenv("REFIT_FAULTS")
    result = adopt(str(train), str(golden), str(checkpoint))

    assert result["version"] == 2 and versions.alias_version(MODEL, versions.CHAMPION) == 2
    assert versions.version_tags(MODEL, 1)["refit.deployed"].startswith("abandoned")
    store = LocalStore(tmp_path / "home" / "store")
    assert result["golden_version"] == 1 and suite_versions(store, MODEL) == [1]  # the stopped one's, reused
    assert versions.version_tags(MODEL, 2)["refit.golden_fingerprint"] == read_golden(store, MODEL).fingerprint
