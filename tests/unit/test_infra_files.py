"""The files that run refit beyond one machine parse and point at things that exist.

Docker and Kubernetes are not available to the tests, so these checks are what
keeps infra/ honest: every Dockerfile, image, entry point, CLI command, flow
function, flow parameter, work pool and setting name the files mention must be
real in this checkout, and the versions they pin must be the ones pyproject
pins.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
# Read by refit but not Settings fields: where prefect.yaml's pull step starts runs, and the YAML file name.
NOT_SETTINGS = {"REFIT_PROJECT_DIR", "REFIT_CONFIG"}


def _pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return dict(dep.split("==", 1) for dep in project["dependencies"] if "==" in dep)


def _compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def _prefect_yaml() -> dict:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def _refit_env_names(text: str) -> set[str]:
    return set(re.findall(r"\bREFIT_[A-Z0-9_]+", text))


def _cli_commands() -> set[str]:
    import typer

    from refit.cli import app

    return set(typer.main.get_command(app).commands)


def test_compose_builds_from_dockerfiles_that_exist_and_runs_real_commands():
    services = _compose()["services"]
    assert {"postgres", "minio", "prefect-server", "worker", "mlflow", "serving"} <= set(services)
    built = {}
    for name, service in services.items():
        if "build" in service:
            dockerfile = (INFRA / service["build"]["context"] / service["build"]["dockerfile"]).resolve()
            assert dockerfile.is_file(), (name, dockerfile)
            built[service.get("image")] = dockerfile
    # serving runs the image the worker builds, with a command the refit CLI has.
    assert services["serving"]["image"] in built
    assert services["serving"]["command"][0] in _cli_commands()
    worker = services["worker"]["entrypoint"]
    assert worker[:3] == ["prefect", "worker", "start"]
    pool = worker[worker.index("--pool") + 1]
    assert {d["work_pool"]["name"] for d in _prefect_yaml()["deployments"]} == {pool}
    for name, service in services.items():
        for dep in service.get("depends_on", []):
            assert dep in services, (name, dep)
    assert (INFRA / "local" / "postgres-init.sql").is_file()


def test_images_pin_the_versions_pyproject_pins():
    pins, services = _pins(), _compose()["services"]
    assert services["prefect-server"]["image"].startswith(f"prefecthq/prefect:{pins['prefect']}-")
    # MLflow runs the pinned official image plus its drivers, built (infra/mlflow.Dockerfile), not installed at start.
    assert services["mlflow"]["build"]["dockerfile"] == "infra/mlflow.Dockerfile"
    assert services["mlflow"]["image"] == f"refit-mlflow:{pins['mlflow']}"
    mlflow_dockerfile = (INFRA / "mlflow.Dockerfile").read_text()
    assert f"FROM ghcr.io/mlflow/mlflow:v{pins['mlflow']}\n" in mlflow_dockerfile
    assert f"boto3=={pins['boto3']}" in mlflow_dockerfile
    helm = INFRA / "k8s" / "helm"
    server = yaml.safe_load((helm / "prefect-server-values.yaml").read_text())
    worker = yaml.safe_load((helm / "prefect-worker-values.yaml").read_text())
    assert server["server"]["image"]["prefectTag"].startswith(pins["prefect"] + "-")
    assert worker["worker"]["image"]["prefectTag"].startswith(pins["prefect"] + "-")
    assert worker["worker"]["image"]["prefectTag"].endswith("-kubernetes")  # the Kubernetes worker lives there
    (deployment, service) = yaml.safe_load_all((INFRA / "k8s" / "mlflow.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == services["mlflow"]["image"]
    assert container["command"] == ["mlflow", "server"] and "--serve-artifacts" in container["args"]
    assert any(a.startswith("s3://") for a in container["args"])
    assert "MLFLOW_BACKEND_STORE_URI" in (INFRA / "k8s" / "mlflow.yaml").read_text()  # from the Secret, by env
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_dockerfile_copies_what_exists_and_enters_the_refit_script():
    text = (INFRA / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert 'ENTRYPOINT ["refit"]' in text and "refit" in scripts
    assert "REFIT_PROJECT_DIR=/opt/refit" in text and "WORKDIR /opt/refit" in text


def test_every_refit_variable_in_infra_is_a_setting():
    from refit.settings import Settings

    fields = {f"REFIT_{name.upper()}" for name in Settings.model_fields}
    files = [INFRA / "compose.yaml", ROOT / "prefect.yaml", *sorted((INFRA / "k8s").rglob("*.y*ml")),
             *sorted((INFRA / "k8s").rglob("*.json")), *sorted((INFRA / "local").glob("*"))]
    for path in files:
        unknown = _refit_env_names(path.read_text()) - fields - NOT_SETTINGS
        assert not unknown, (path.relative_to(ROOT), sorted(unknown))


def test_prefect_yaml_names_real_flows_and_their_parameters():
    config = _prefect_yaml()
    assert config["prefect-version"] == _pins()["prefect"]
    names = {d["name"] for d in config["deployments"]}
    assert names == {"monitor", "update", "hotfix", "rollback"}
    for deployment in config["deployments"]:
        path, function = deployment["entrypoint"].split(":")
        assert (ROOT / path).is_file(), path
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), function)
        assert hasattr(flow, "fn") and hasattr(flow, "name"), f"{deployment['entrypoint']} is not a Prefect flow"
        accepted = set(inspect.signature(flow.fn).parameters)
        given = set(deployment.get("parameters") or {})
        for trigger in deployment.get("triggers", []):
            given |= set(trigger.get("parameters", {}))
        assert given <= accepted, (deployment["name"], sorted(given - accepted))
    by_name = {d["name"]: d for d in config["deployments"]}
    assert by_name["monitor"]["schedules"][0]["cron"] == "0 * * * *"
    drift, arrived = by_name["update"]["triggers"]
    from refit.events import LABELS_EVENT
    from tasks.monitor import DRIFT_EVENT

    assert drift["expect"] == [DRIFT_EVENT]
    assert set(drift["parameters"]) == {"model_name", "episode_id", "drift_run_id"}
    assert arrived["expect"] == [LABELS_EVENT]  # the update counts the open episode's labels, or waits
    assert set(arrived["parameters"]) == {"model_name"}
    # Concurrency is per model, taken inside the flows; a deployment-wide limit would make models queue on each other.
    assert not any("concurrency_limit" in d for d in by_name.values())
    for flow_file, slot in (("monitor", "refit-monitor-"), ("update", "refit-update-"), ("rollback", "refit-rollback-")):
        assert f'one_at_a_time(f"{slot}{{' in (ROOT / "flows" / f"{flow_file}.py").read_text()


def test_kubernetes_worker_and_job_template_fit_together():
    helm = INFRA / "k8s" / "helm"
    worker = yaml.safe_load((helm / "prefect-worker-values.yaml").read_text())["worker"]
    assert worker["config"]["type"] == "kubernetes"
    assert worker["config"]["workPool"] in {d["work_pool"]["name"] for d in _prefect_yaml()["deployments"]}
    assert worker["apiConfig"] == "selfHostedServer"
    assert worker["selfHostedServerApiConfig"]["apiUrl"].endswith(":4200/api")
    template = json.loads((helm / "training-job-template.json").read_text())
    declared = set(template["variables"]["properties"])
    used = set(re.findall(r"{{\s*(\w+)\s*}}", json.dumps(template["job_configuration"])))
    assert used <= declared, sorted(used - declared)
    variables = template["variables"]["properties"]
    assert variables["gpu"]["default"] == 0
    assert variables["image"]["default"] == _compose()["services"]["worker"]["image"]
    (container,) = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu }}"
    # The helm commands in the comments name files that exist.
    for values in helm.glob("*.yaml"):
        for mentioned in re.findall(r"infra/k8s/[\w./-]+", values.read_text()):
            assert (ROOT / mentioned).exists(), (values.name, mentioned)


def test_local_scripts_are_executable():
    script = INFRA / "local" / "s3-endpoint.sh"
    assert script.is_file() and os.access(script, os.X_OK)


def test_every_worker_sends_heartbeats_that_the_zombie_automation_watches():
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger

    from refit.stack import WORKER_ENV, ZOMBIE_AUTOMATION

    automation = AutomationCore.model_validate(yaml.safe_load(ZOMBIE_AUTOMATION.read_text()))
    assert isinstance(automation.trigger, EventTrigger) and automation.trigger.posture == "Proactive"
    assert automation.trigger.after == {"prefect.flow-run.heartbeat"}
    (action,) = automation.actions
    assert isinstance(action, ChangeFlowRunState) and action.state == "CRASHED"
    # Every place flow runs start sends heartbeats often enough for the automation's window.
    frequencies = {
        "refit stack": WORKER_ENV,
        "compose": _compose()["services"]["worker"]["environment"],
        "kubernetes job": json.loads((INFRA / "k8s" / "helm" / "training-job-template.json").read_text())
        ["variables"]["properties"]["env"]["default"],
    }
    for where, env in frequencies.items():
        frequency = int(env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"])
        assert 30 <= frequency <= automation.trigger.within.total_seconds() / 2, where
    assert "crash-zombies.yaml" in (INFRA / "k8s" / "helm" / "prefect-worker-values.yaml").read_text()


def _infra_texts() -> dict[str, str]:
    files = [INFRA / "compose.yaml", *sorted((INFRA / "k8s").rglob("*.y*ml")), *sorted((INFRA / "k8s").rglob("*.json")),
             *sorted(INFRA.glob("*Dockerfile"))]
    return {str(p.relative_to(ROOT)): p.read_text() for p in files}


def _images() -> dict[str, str]:
    """Every image a container runs or a Dockerfile builds on, by where it is named."""
    found = {}
    for name, text in _infra_texts().items():
        for image in re.findall(r"^[ \t]*(?:-[ \t]*)?image:[ \t]*\"?([^\s\"#]+)", text, re.MULTILINE):
            found[f"{name}: {image}"] = image
        for image in re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE):
            found[f"{name}: {image}"] = image
        for image in re.findall(r'"image":\s*{[^}]*"default":\s*"([^"]+)"', text):
            found[f"{name}: {image}"] = image
    return found


def test_every_image_is_pinned_to_a_version():
    """No ``latest``, no bare name, no major-only tag of a third-party image: what runs is what was tested."""
    images = _images()
    assert len(images) >= 8, images
    for where, image in images.items():
        assert ":" in image.rsplit("/", 1)[-1], f"{where} has no tag"
        tag = image.rsplit(":", 1)[1]
        assert tag != "latest" and "latest" not in tag, where
        assert re.search(r"\d+\.\d+|RELEASE\.\d{4}", tag), f"{where}: {tag} is not a version"


def test_secrets_have_no_defaults_in_compose():
    """A password, key or token is required (``${VAR:?...}``): compose refuses to start without it, instead of
    starting with a well-known default such as ``change-me``."""
    text = (INFRA / "compose.yaml").read_text()
    assert "change-me" not in text
    references = re.findall(r"\$\{(\w+)(:?[-?])?([^}]*)\}", text)
    secrets = [(name, op) for name, op, _ in references
               if re.search(r"PASSWORD|SECRET|TOKEN|ROOT_USER|ACCESS_KEY|AUTH_STRING", name)]
    assert {name for name, _ in secrets} >= {"POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
                                             "REFIT_SERVE_ADMIN_TOKEN", "PREFECT_API_AUTH_STRING"}
    assert all(op == ":?" for _, op in secrets), secrets
    compose = _compose()
    for service in compose["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|TOKEN|AUTH_STRING", key):
                assert str(value).startswith("${") and ":?" in str(value), key


def test_nothing_is_installed_when_a_container_starts():
    """Installs happen in Dockerfiles (pinned, at build time); no command or argument of a running container
    installs anything."""
    for name, text in _infra_texts().items():
        if name.endswith("Dockerfile"):
            continue
        assert not re.search(r"pip3? install|apt-get install|uv pip", text), name


def test_serving_keeps_its_spilled_request_log_on_a_volume():
    serving = _compose()["services"]["serving"]
    spill = serving["environment"]["REFIT_SERVE_LOG_SPILL_DIR"]
    assert any(v.endswith(":" + spill) for v in serving["volumes"])
    deployment = yaml.safe_load((INFRA / "k8s" / "serving" / "deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert any(m["mountPath"] == env["REFIT_SERVE_LOG_SPILL_DIR"] for m in container["volumeMounts"])
