"""The serving commands, registered on the ``refit`` CLI in ``refit/cli.py``: ``serve`` and ``bench serve``."""

from __future__ import annotations

from typing import Annotated, Optional

import typer


def serve(host: Annotated[Optional[str], typer.Option(help="Address to bind (default REFIT_SERVE_HOST, 127.0.0.1).")] = None,
          port: Annotated[Optional[int], typer.Option(help="Port (default REFIT_SERVE_PORT, 8000).")] = None,
          policy: Annotated[Optional[str], typer.Option(help="Rollout policy name or YAML path.")] = None,
          store: Annotated[Optional[str], typer.Option("--store", help="Object store: local (default) or s3.")] = None,
          model_name: Annotated[Optional[str], typer.Option("--model-name", help="Registered model to serve "
                                                            "(default REFIT_MODEL_NAME).")] = None,
          ) -> None:
    """Serve the champion over HTTP: /predict, /healthz, /readyz, /metrics, /rollout, /admin/reload.

    Example: REFIT_SERVE_ADMIN_TOKEN=secret refit serve --port 8000 --model-name support-intents
    """
    from refit.cli.common import _prepare

    settings = _prepare(store, model_name)
    import logging

    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")

    from serving.app import create_app

    app = create_app(settings, policy=policy)
    uvicorn.run(app, host=host or settings.serve_host, port=port or settings.serve_port, log_level="info",
                timeout_graceful_shutdown=60, access_log=False)


def bench_serve(seconds: Annotated[float, typer.Option(min=5, help="Length of the load.")] = 60,
                concurrency: Annotated[int, typer.Option(min=1, help="Client threads, each one request at a time.")] = 8,
                texts_per_request: Annotated[str, typer.Option(help="Texts per request, MIN-MAX.")] = "1-8",
                swap_at: Annotated[float, typer.Option(help="Second at which a copy of the champion is promoted "
                                                            "(a swap under load); negative: none.")] = 15,
                bad_at: Annotated[float, typer.Option(help="Second at which a bad version is promoted; negative: none.")] = 35,
                compare_rounds: Annotated[int, typer.Option(
                    min=0, help="Alternating rounds of server load and transformers.pipeline (0 skips).")] = 3,
                as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line of stdout.")] = False,
                ) -> None:
    """Load-test the real server: latency, throughput, 5xx, request-log rows, swap, automatic rollback, and a
    transformers.pipeline comparison. Registers two bench versions; use a scratch REFIT_HOME.

    Example: REFIT_HOME=/tmp/bench refit bench serve --seconds 60 --concurrency 8
    """
    import json

    from rich.console import Console
    from rich.table import Table

    from refit.cli.common import _prepare
    from refit.errors import RefitError
    from refit.bench.loadtest import run

    settings = _prepare()
    try:
        low, high = (int(x) for x in texts_per_request.split("-"))
        assert 1 <= low <= high <= settings.serve_max_texts
    except (ValueError, AssertionError):
        raise RefitError(f"--texts-per-request must be MIN-MAX within 1-{settings.serve_max_texts}, "
                         f"not {texts_per_request!r}") from None
    err = Console(stderr=True)
    result = run(settings, seconds, concurrency, (low, high), swap_at if swap_at >= 0 else None,
                 bad_at if bad_at >= 0 else None, compare_rounds, progress=lambda message: err.print(f"[dim]{message}[/]"))
    table = Table(title="refit bench serve", show_header=False)
    for key, value in result.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    (err if as_json else Console()).print(table)
    if as_json:
        print(json.dumps(result, default=str))
