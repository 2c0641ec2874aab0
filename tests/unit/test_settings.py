"""Settings: REFIT_ environment variables, strict values, and a light import."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from refit.settings import PROJECT_ROOT, Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("REFIT_"):
            monkeypatch.delenv(key)


def test_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.store == "local"
    assert settings.home_dir == tmp_path / ".refit"
    assert settings.local_store_root == tmp_path / ".refit" / "store"
    assert settings.tracking_uri == f"sqlite:///{tmp_path / '.refit' / 'mlflow.db'}"
    assert settings.artifact_location == (tmp_path / ".refit" / "mlflow-artifacts").as_uri()
    assert not (tmp_path / ".refit").exists()  # reading settings creates nothing


def test_environment_variables_are_read(tmp_path, monkeypatch):
    monkeypatch.setenv("REFIT_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("REFIT_MODEL_NAME", "my-model")
    monkeypatch.setenv("REFIT_STORE", "s3")
    monkeypatch.setenv("REFIT_S3_BUCKET", "bkt")
    monkeypatch.setenv("REFIT_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("REFIT_MONTHLY_BUDGET_USD", "3.5")
    monkeypatch.setenv("REFIT_TORCH_THREADS", "2")
    settings = Settings()
    assert settings.home_dir == tmp_path / "h"
    assert settings.model_name == "my-model"
    assert settings.store == "s3" and settings.s3_bucket == "bkt"
    assert settings.s3_endpoint_url == "http://127.0.0.1:9000"
    assert settings.monthly_budget_usd == 3.5 and settings.torch_threads == 2
    assert Settings(model_name="explicit").model_name == "explicit"  # arguments win over the environment


def test_refit_env_fixture(refit_env, tmp_path, data_dir):
    assert refit_env.home_dir == tmp_path / "home"
    assert refit_env.data_dir == data_dir


def test_unknown_store_is_rejected(monkeypatch):
    with pytest.raises(ValidationError, match="store"):
        Settings(store="gcs")
    monkeypatch.setenv("REFIT_STORE", "ftp")
    with pytest.raises(ValidationError, match="store"):
        Settings()


def test_unknown_field_and_bad_number_are_rejected(monkeypatch):
    with pytest.raises(ValidationError, match="stroe"):
        Settings(stroe="s3")
    monkeypatch.setenv("REFIT_MONTHLY_BUDGET_USD", "lots")
    with pytest.raises(ValidationError, match="monthly_budget_usd"):
        Settings()


def test_settings_are_frozen():
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.store = "s3"


def test_s3_artifact_location():
    assert Settings(store="s3", s3_bucket="bkt").artifact_location == "s3://bkt/mlflow-artifacts"
    assert Settings(store="s3", s3_bucket="bkt", s3_prefix="/team/a/").artifact_location == \
        "s3://bkt/team/a/mlflow-artifacts"
    assert Settings(mlflow_tracking_uri="http://127.0.0.1:5000").tracking_uri == "http://127.0.0.1:5000"


def test_apply_environment_exports_the_s3_endpoint(monkeypatch):
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://before.invalid")
    Settings(store="s3", s3_endpoint_url="http://127.0.0.1:9999").apply_environment()
    assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:9999"
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def _python(code: str, env: dict[str, str] | None = None) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("REFIT_")} | (env or {})
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=clean,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_importing_refit_and_the_cli_loads_nothing_heavy():
    out = _python("import refit.cli, sys; print([m for m in ('prefect','torch','mlflow') if m in sys.modules])")
    assert out == "[]"
    core = ("import refit, refit.settings, refit.store, refit.data, refit.scenario, refit.policy, refit.cost, "
            "refit.requestlog, sys; print([m for m in ('prefect','torch','mlflow') if m in sys.modules])")
    assert _python(core) == "[]"


def test_yaml_config_file(tmp_path):
    config = tmp_path / "refit.yaml"
    config.write_text("model_name: from-yaml\nmonthly_budget_usd: 7\n")
    code = "from refit.settings import Settings; s = Settings(); print(s.model_name, s.monthly_budget_usd)"
    assert _python(code, {"REFIT_CONFIG": str(config)}) == "from-yaml 7.0"
    # the environment wins over the file
    assert _python(code, {"REFIT_CONFIG": str(config), "REFIT_MODEL_NAME": "from-env"}) == "from-env 7.0"


def test_yaml_config_file_set_after_import(tmp_path, monkeypatch):
    config = tmp_path / "refit.yaml"
    config.write_text("model_name: from-yaml\n")
    monkeypatch.setenv("REFIT_CONFIG", str(config))
    assert Settings().model_name == "from-yaml"


@pytest.mark.parametrize("name", ["a/b", "../up", "x y", "-lead", ""])
def test_a_model_name_that_is_not_one_path_segment_is_refused_naming_the_setting(monkeypatch, name):
    from refit.settings import settings_error

    monkeypatch.setenv("REFIT_MODEL_NAME", name)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert settings_error(info.value).startswith("REFIT_MODEL_NAME: ")


def test_good_model_names_pass(monkeypatch):
    for name in ("intent-classifier", "Support_Bot.v2", "a"):
        monkeypatch.setenv("REFIT_MODEL_NAME", name)
        assert Settings().model_name == name
