# The MLflow tracking server: the pinned official image plus the Postgres and S3 drivers, installed when
# the image is built, never when a container starts (nothing unpinned is fetched at run time).
#   docker build -f infra/mlflow.Dockerfile -t refit-mlflow:3.17.2 .
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary==2.9.10 boto3==1.44.8
ENV MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1
