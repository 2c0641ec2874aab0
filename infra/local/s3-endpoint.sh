#!/usr/bin/env bash
# A throwaway S3 endpoint on 127.0.0.1 for trying `refit demo --store s3`.
# moto keeps everything in memory: it is for trying and testing, never for data
# you want to keep (use MinIO from infra/compose.yaml for that).
#   infra/local/s3-endpoint.sh 9000 &
#   REFIT_S3_ENDPOINT_URL=http://127.0.0.1:9000 AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x refit demo --store s3
set -euo pipefail
port="${1:-9000}"
here="$(cd "$(dirname "$0")/../.." && pwd)"
exec "${here}/.venv/bin/python" -m moto.server -H 127.0.0.1 -p "${port}"
