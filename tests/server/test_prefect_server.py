"""refit on real local servers: `refit stack up`, `prefect deploy --all`, deployments run by hand, by schedule, by event.

What a user does on a Prefect server, end to end: the stack answers, every
deployment of prefect.yaml is registered as designed, the scheduled monitor
finds the drifted window, follows its drift episode until enough labels
arrived, and its event starts the update deployment, which promotes; a second
check while that update runs starts nothing; the hotfix
deployment run with `prefect deployment run` is still gated; and the results
are found in the MLflow tracking server, as a reviewer would find them.
"""

from __future__ import annotations

import json

import pytest

from server import stack_session
from server.stack_session import MODEL, PREFECT, REFIT, TERMINAL

pytestmark = [pytest.mark.server, pytest.mark.timeout(1500)]


def test_stack_up_is_healthy_and_status_says_so(stack):
    assert set(stack.status["services"]) == {"mlflow", "prefect-server", "worker"}
    assert stack.status["running"] is True
    proc = stack.run(REFIT + ["stack", "status", "--json"])
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(s["healthy"] and s["pid"] for s in status["services"].values()), status
    assert all(s["url"].startswith("http://127.0.0.1:") for s in status["services"].values())
    # Everything it keeps is under REFIT_HOME: pid files, logs, both SQLite databases.
    assert {p.name for p in (stack.home / "stack").glob("*.pid")} == {"mlflow.pid", "prefect-server.pid", "worker.pid"}
    assert (stack.home / "mlflow.db").is_file() and (stack.home / "prefect" / "prefect.db").is_file()
    # `up` again is harmless: nothing new is started.
    again = stack.run(REFIT + ["stack", "up", "--json"])
    assert json.loads(again.stdout.strip().splitlines()[-1])["services"] == status["services"]
    env = stack.run(REFIT + ["stack", "env"]).stdout
    assert f"export PREFECT_API_URL={stack.api}" in env


def test_deploy_all_registers_every_deployment_as_designed(stack, deployed):
    assert deployed["version"] == 1
    deployments = {d["name"]: d for d in stack.call("/deployments/filter")}
    assert set(deployments) == {"monitor", "update", "hotfix", "rollback"}
    assert all(d["work_pool_name"] == "refit" for d in deployments.values())
    # prefect.yaml's hourly cron (the scheduled path, when it ran first, deployed its short interval beside it).
    schedules = [s["schedule"] for s in deployments["monitor"]["schedules"]]
    assert [s["cron"] for s in schedules if s.get("cron")] == ["0 * * * *"]
    assert all(s.get("cron") or "scheduled" in stack.cache for s in schedules), schedules
    # Limits are per model (the flows take refit-<flow>-<model>), not per deployment: models never queue on each other.
    assert all(d["global_concurrency_limit"] is None for d in deployments.values())
    automations = {a["name"]: a for a in stack.call("/automations/filter")}
    # `refit stack up` installed the one that marks dead flow runs Crashed; prefect.yaml added the update's triggers.
    assert automations.pop("refit-crash-zombie-flow-runs")["actions"][0]["type"] == "change-flow-run-state"
    by_event = {tuple(a["trigger"]["expect"]): a for a in automations.values()}
    assert set(by_event) == {("refit.drift.detected",), ("refit.labels.arrived",)}, list(automations)
    expected = {"refit.drift.detected": {"model_name", "episode_id", "drift_run_id"},  # the event's episode
                "refit.labels.arrived": {"model_name"}}  # the update finds the model's open episode itself
    for (event,), automation in by_event.items():
        assert automation["trigger"]["match"] == {"prefect.resource.id": "refit.model.*"}
        (action,) = automation["actions"]
        assert action["deployment_id"] == deployments["update"]["id"]
        assert set(action["parameters"]) == expected[event], event  # the event's model
    # The pool is a process pool, made by the worker `refit stack up` started.
    assert stack.call("/work_pools/refit", method="GET")["type"] == "process"


def test_schedule_fires_monitor_whose_event_starts_update_which_promotes(stack, deployed):
    path = stack_session.scheduled_update(stack)
    check, update_run = path["drift_check"], path["update_run"]
    assert check.data.tags["refit.severity"] in ("low", "high")
    assert path["episode_id"] and check.data.tags["refit.episode_id"] == path["episode_id"]
    assert update_run["state_type"] == "COMPLETED", stack.run_logs(update_run["id"])
    # The trigger handed the event's model, its drift episode and the drift run to the update (prefect.yaml).
    assert update_run["parameters"] == {"model_name": MODEL, "episode_id": path["episode_id"],
                                        "drift_run_id": check.info.run_id}
    client = stack.mlflow()
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert int(champion.version) == path["champion_before"] + 1
    assert champion.tags["refit.gate_verdict"] == "passed"
    assert champion.tags["refit.drift_run_id"] == check.info.run_id
    assert champion.tags["refit.parent_version"] == str(path["champion_before"])
    previous = client.get_model_version_by_alias(MODEL, "previous")
    assert int(previous.version) == path["champion_before"]
    run = client.get_run(champion.run_id)
    assert {"gate.html", "gate.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"drift_report.html", "verdict.json"} <= {a.path for a in client.list_artifacts(check.info.run_id)}


def test_a_check_while_the_episodes_update_runs_starts_no_second_update(stack, deployed):
    """The second check ran by hand over the same drifted traffic after the event had started the update,
    which was waiting for the model's update slot: it joins the episode, sees the update's try, and waits."""
    path = stack_session.scheduled_update(stack)
    second, episode = path["second_check"], path["episode_id"]
    assert path["second_monitor_run"]["state_type"] == "COMPLETED", stack.run_logs(path["second_monitor_run"]["id"])
    assert second.info.run_id not in (path["drift_check"].info.run_id, path["waiting_check"].info.run_id)
    assert second.data.tags["refit.window_end"] == path["drift_check"].data.tags["refit.window_end"]
    assert second.data.tags["refit.drift_detected"] == "True"
    assert second.data.tags["refit.episode_id"] == episode  # the same episode, still open then
    assert second.data.tags["refit.action"] == "wait for labels"
    # Nothing new arrived since the update started: the same labels, counted once, and no second event.
    assert second.data.metrics["labelled_rows"] == path["drift_check"].data.metrics["labelled_rows"]
    assert path["update_runs"] == [path["update_run"]["id"]]
    client = stack.mlflow()
    experiment = client.get_experiment_by_name("refit")
    trained = client.search_runs([experiment.experiment_id], "tags.`refit.run_type` = 'update' and "
                                 f"tags.`refit.trigger_key` LIKE '{MODEL}:episode:{episode}:%'")
    assert len(trained) == 1, [r.info.run_id for r in trained]


def _hotfix_file(stack, directory):
    from refit.scenario import poison

    spec, data = stack_session.scenario_data(stack)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "hotfix-poisoned.csv"
    poison(data.hotfix, data.labels, spec.seed)[["text", "label"]].to_csv(path, index=False)
    return path


def test_a_hotfix_file_outside_the_inbox_is_refused_on_a_server(stack, deployed, tmp_path):
    """On a Prefect server a run may read labels only from REFIT_HOME/inbox/ and the store's inbox/ by default."""
    params = {"labels_path": str(_hotfix_file(stack, tmp_path / "elsewhere"))}
    stack.run(PREFECT + ["deployment", "run", "update/hotfix", "--params", json.dumps(params)])
    run = stack.wait_for("the refused hotfix", lambda: [r for r in stack.flow_runs("hotfix")
                                                        if r["parameters"].get("labels_path") == params["labels_path"]],
                         timeout=60)[0]
    run = stack.wait_done(run["id"], timeout=300)
    assert run["state_type"] == "FAILED"
    assert "outside REFIT_LABEL_SOURCES" in run["state"]["message"], run["state"]["message"]


def test_hotfix_deployment_run_by_hand_is_still_gated(stack, deployed, tmp_path):
    client = stack.mlflow()
    champion = client.get_model_version_by_alias(MODEL, "champion").version
    params = {"labels_path": str(_hotfix_file(stack, stack.home / "inbox")),
              "reason": "support saw wrong intents on travel"}
    stack.run(PREFECT + ["deployment", "run", "update/hotfix", "--params", json.dumps(params)])
    run = stack.wait_for("the hotfix run", lambda: [r for r in stack.flow_runs("hotfix")
                                                    if r["parameters"].get("labels_path") == params["labels_path"]],
                         timeout=60)[0]
    run = stack.wait_done(run["id"], timeout=900)
    assert run["state_type"] == "COMPLETED", stack.run_logs(run["id"])
    assert run["parameters"]["labels_path"] == params["labels_path"]
    (hotfix,) = client.search_model_versions(f"name='{MODEL}' and tags.`refit.kind` = 'hotfix'")
    assert hotfix.tags["refit.gate_verdict"] == "refused"
    assert "failed" in hotfix.tags["refit.gate_reasons"]
    assert hotfix.tags["refit.data_source"] == params["labels_path"]
    assert client.get_model_version_by_alias(MODEL, "champion").version == champion
    assert client.get_model_version_by_alias(MODEL, "challenger").version == hotfix.version
    artifacts = {a.path for a in client.list_artifacts(hotfix.run_id)}
    assert {"gate.html", "gate.json"} <= artifacts
    update_run = client.get_run(hotfix.tags["refit.update_run_id"])
    assert update_run.data.tags["refit.reason"] == params["reason"]
    assert hotfix.tags["refit.reason"] == params["reason"]


def test_hotfix_takes_a_reason(stack, deployed):
    assert "reason" in stack.deployment("hotfix")["parameter_openapi_schema"]["properties"]


def test_no_flow_run_is_left_running(stack, deployed):
    runs = stack.call("/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["RUNNING", "PENDING"]}}}})
    assert runs == [], [r["name"] for r in runs]
    assert all(r["state_type"] in TERMINAL | {"SCHEDULED"} for r in stack.call("/flow_runs/filter"))
