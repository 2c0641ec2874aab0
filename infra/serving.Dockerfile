# The serving image: `refit serve` on the champion, CPU only.
#   docker build -f infra/serving.Dockerfile -t refit-serving:0.1.0 .
#   docker run -p 127.0.0.1:8000:8000 -e REFIT_MLFLOW_TRACKING_URI=... -e REFIT_STORE=s3 ... refit-serving:0.1.0
# Kubernetes: infra/k8s/serving/ (readiness on /readyz, liveness on /healthz).
FROM python:3.11.11-slim-bookworm
WORKDIR /opt/refit
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1 \
    MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false \
    REFIT_HOME=/var/lib/refit REFIT_SERVE_HOST=0.0.0.0 REFIT_SERVE_PORT=8000
# The CPU build first, so the project's torch==2.13.0 pin is already met (no CUDA wheels).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY refit ./refit
COPY flows ./flows
COPY tasks ./tasks
COPY registry ./registry
COPY serving ./serving
RUN pip install . \
    && useradd --system --home-dir /var/lib/refit --create-home refit
USER refit
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
# SIGTERM: uvicorn stops accepting, answers what it holds, then the request log is flushed.
STOPSIGNAL SIGTERM
ENTRYPOINT ["refit", "serve"]
