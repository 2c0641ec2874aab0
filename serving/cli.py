"""The serving commands, registered on the ``refit`` CLI in ``refit/cli.py``: ``serve`` and ``bench serve``."""

from __future__ import annotations

from typing import Annotated, Optional

import typer


def serve(host: Annotated[Optional[str], typer.Option(help="Address to bind (default REFIT_SERVE_HOST, 127.0.0.1).")] = None,
          port: Annotated[Optional[int], typer.Option(help="Port (default REFIT_SERVE_PORT, 8000).")] = None,
          policy: Annotated[Optional[str], typer.Option(help="Rollout policy name or YAML path.")] = None,
          store: Annotated[Optional[str], typer.Option("--store", help="Object store: local (default) or s3.")] = None,
          ) -> None:
    """Serve the champion over HTTP: /predict, /healthz, /readyz, /metrics, /rollout, /admin/reload.

    Example: REFIT_SERVE_ADMIN_TOKEN=secret refit serve --port 8000
    """
    from refit.cli import _prepare

    settings = _prepare(store)
    import logging

    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")

    from serving.app import create_app

    app = create_app(settings, policy=policy)
    uvicorn.run(app, host=host or settings.serve_host, port=port or settings.serve_port, log_level="info",
                timeout_graceful_shutdown=60, access_log=False)
