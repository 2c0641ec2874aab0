"""Secrets are never printed or stored: masked URIs and environments, and what `refit stack` writes and prints."""

from __future__ import annotations

import json

import pytest

from refit.secrets import MASK, is_secret_name, mask_env, mask_uri

CALLER = {"AWS_ACCESS_KEY_ID": "AKIACALLERKEY0000", "AWS_SECRET_ACCESS_KEY": "caller-secret-value",
          "AWS_SESSION_TOKEN": "caller-session-token"}


@pytest.mark.parametrize("uri, masked", [
    ("postgresql://refit:hunter2@db:5432/mlflow", "postgresql://refit:***@db:5432/mlflow"),
    ("postgresql+asyncpg://refit:p%40ss@postgres/prefect", "postgresql+asyncpg://refit:***@postgres/prefect"),
    ("https://user:tok@mlflow.example.com/", "https://user:***@mlflow.example.com/"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:////home/me/.refit/mlflow.db", "sqlite:////home/me/.refit/mlflow.db"),
    ("s3://bucket/key?X-Amz-Signature=abc&x=1", "s3://bucket/key?X-Amz-Signature=***&x=1"),
    ("could not reach mysql://root:pw@10.0.0.1/db: refused", "could not reach mysql://root:***@10.0.0.1/db: refused"),
    (None, None), ("", ""),
])
def test_mask_uri_hides_passwords_and_keeps_the_rest(uri, masked):
    assert mask_uri(uri) == masked


def test_mask_env_masks_secret_names_and_passwords_in_values():
    env = {**CALLER, "REFIT_SERVE_ADMIN_TOKEN": "t0k", "MINIO_ROOT_PASSWORD": "pw", "REFIT_HOME": "/home/me/.refit",
           "REFIT_MLFLOW_TRACKING_URI": "postgresql://refit:hunter2@db/mlflow", "AWS_DEFAULT_REGION": "us-east-1"}
    masked = mask_env(env)
    assert all(masked[k] == MASK for k in (*CALLER, "REFIT_SERVE_ADMIN_TOKEN", "MINIO_ROOT_PASSWORD"))
    assert masked["REFIT_MLFLOW_TRACKING_URI"] == "postgresql://refit:***@db/mlflow"
    assert masked["REFIT_HOME"] == "/home/me/.refit" and masked["AWS_DEFAULT_REGION"] == "us-east-1"
    assert not is_secret_name("PREFECT_API_URL") and is_secret_name("aws_secret_access_key")


@pytest.fixture
def s3_settings(tmp_path, monkeypatch):
    from refit.settings import Settings

    for key, value in CALLER.items():
        monkeypatch.setenv(key, value)
    return Settings(home=tmp_path / "home", store="s3", data_dir=tmp_path)


def _leaks(text: str) -> list[str]:
    return [value for value in CALLER.values() if value in text]


def test_stack_with_s3_keeps_the_callers_keys_out_of_its_plan_and_state(s3_settings):
    """Before, `refit stack up --store s3` copied the caller's AWS keys into stack.json's client env."""
    from refit import stack

    services, client = stack.plan(s3_settings, stack.Ports(), "refit")
    assert _leaks(json.dumps(client)) == [] and not any(stack.is_secret_name(k) for k in client)
    assert "s3" in {s.name for s in services}  # moto: it gets its placeholder keys when it starts, not stored


def test_stack_status_and_env_never_print_a_key(s3_settings, capsys):
    """A stack.json that holds keys (one written before this fix) still never shows them."""
    from refit import stack

    services, client = stack.plan(s3_settings, stack.Ports(), "refit")
    directory = stack.stack_dir(s3_settings)
    directory.mkdir(parents=True)
    state = {"pool": "refit", "ports": stack.Ports().__dict__, "services": [s.__dict__ for s in services],
             "client_env": client | CALLER | {"REFIT_MLFLOW_TRACKING_URI": "postgresql://refit:hunter2@db/mlflow"}}
    (directory / stack.STATE_FILE).write_text(json.dumps(state))

    status = stack.status(s3_settings)
    stack._print_status(status, as_json=True)
    lines = stack.env_lines(s3_settings)
    printed = capsys.readouterr().out + "\n".join(lines)
    assert _leaks(printed) == [] and "hunter2" not in printed
    assert status["env"]["AWS_SECRET_ACCESS_KEY"] == MASK
    # The shell still reaches the stack's own moto endpoint: its placeholders, only where the shell has none.
    assert 'export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-refit}"' in lines
    assert f"export REFIT_S3_ENDPOINT_URL=http://127.0.0.1:{stack.Ports().s3}" in lines


@pytest.mark.parametrize("uri,masked", [
    ("https://ghp_abc123@git.example/org/repo", "https://***@git.example/org/repo"),
    ("postgresql://refit:pa/ss@db:5432/mlflow", "postgresql://refit:***@db:5432/mlflow"),
    ("postgresql://refit:a/b/c@db/x and https://tok@h2", "postgresql://refit:***@db/x and https://***@h2"),
    ("s3://bucket/key@v1", "s3://bucket/key@v1"),  # an "@" in a path is no user part
])
def test_lone_tokens_and_passwords_with_slashes_are_masked(uri, masked):
    assert mask_uri(uri) == masked
