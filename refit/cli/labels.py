"""``refit labels ...``: labels in from your labelling process."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from refit.errors import RefitError
from refit.events import LABELS_EVENT
from refit.cli.common import JsonOption, ModelNameOption, StoreOption, _emit, _prepare, err, labels_app


@labels_app.command("import")
def labels_import(file: Annotated[Path, typer.Argument(help="CSV/Parquet/JSON(L) with request_id,label (labels of "
                                                         "served requests) and/or text,label (never served).")],
                  model_name: ModelNameOption = None, store: StoreOption = None, as_json: JsonOption = False) -> None:
    """Import labels: each row checked (request id in the request log, label not empty, no duplicate).

    Refused rows go to quarantine with the reason; accepted + quarantined = rows in the file. A label the
    model does not know is accepted: the next update's new-label policy decides on it.

    Example: refit labels import corrections.csv --model-name support-intents --json
    """
    settings = _prepare(store, model_name)
    from refit.data import read_table
    from refit.labels import check_source, import_labels
    from refit.store import open_store

    check_source(str(file), settings.allowed_label_sources())
    rows = read_table(file)
    if rows.empty:
        raise RefitError(f"{file} has no rows")
    result = import_labels(open_store(settings), settings.model_name, rows, source=f"import:{file.name}")
    event = _announce(settings.model_name, result.accepted + result.earlier.kept)
    _emit(result.to_dict() | {"model_name": settings.model_name, "event": event}, as_json,
          f"Labels for {settings.model_name}")


def _announce(model_name: str, labels: int, seconds: float = 15.0) -> str:
    """Tell the Prefect API that ``labels`` were kept (``refit.labels.arrived``), when PREFECT_API_URL names one.

    Returns what became of the event, in words; an API that does not take it
    is a warning on stderr, never a failed import: the labels are kept.
    """
    import os
    import time

    if labels <= 0:
        return "not sent: no label kept"
    if not os.environ.get("PREFECT_API_URL"):
        return "not sent: PREFECT_API_URL is not set"
    from prefect.client.orchestration import get_client
    from prefect.events import emit_event
    from prefect.events.filters import EventFilter, EventIDFilter
    from prefect.events.worker import EventsWorker

    try:
        event = emit_event(LABELS_EVENT, resource={"prefect.resource.id": f"refit.model.{model_name}"},
                           payload={"model_name": model_name, "labels": labels})
        # The client only queues the event, and its thread logs a refused connection: read it back by id.
        EventsWorker.drain_all(timeout=seconds)
        deadline = time.monotonic() + seconds
        with get_client(sync_client=True) as client:
            while event is not None:
                if client.read_events(EventFilter(id=EventIDFilter(id=[event.id])), limit=1).events:
                    return "sent"
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        why = "the Prefect API did not store it"
    except Exception as exc:  # noqa: BLE001 - the events client and an API that does not answer alike
        why = f"{type(exc).__name__}: {exc}"
    err.print(f"[yellow]warning:[/] {LABELS_EVENT} not sent ({escape(why)}); the labels are kept; a later "
              "event or the monitor's next check can start the update", highlight=False,
              soft_wrap=True)
    return f"not sent: {why}"


@labels_app.command("request")
def labels_request(budget: Annotated[int, typer.Option("--budget", help="How many texts to ask people to label.")],
                   model_name: ModelNameOption = None,
                   out: Annotated[Optional[Path], typer.Option(
                       "--out", help="CSV to write (default REFIT_HOME/label-requests/<model>-<time>.csv).")] = None,
                   store: StoreOption = None, as_json: JsonOption = False) -> None:
    """Ask for labels where they matter: served texts of the open drift episode, for people to label.

    Picks texts the model was unsure of, spread over the episode's clusters (the drift encoder's embeddings),
    clusters unlike the champion's reference first, so a new intent gets its first examples early. Texts
    already labelled or asked for are never asked for again. Writes request_id, text, predicted_label,
    confidence, cluster; label the file and bring it back with `refit labels import`.

    Example: refit labels request --model-name support-intents --budget 50 --json
    """
    settings = _prepare(store, model_name)
    from refit.store import open_store
    from registry.tracking import configure
    from tasks.label_requests import request_labels

    if budget < 1:
        raise RefitError(f"--budget must be at least 1 label, not {budget}")
    result = request_labels(open_store(settings), configure(settings), settings.model_name, budget,
                            settings.home_dir, out)
    if result.note and not as_json:
        err.print(escape(result.note), highlight=False, soft_wrap=True)
    _emit(result.to_dict(), as_json, f"Labels requested for {settings.model_name}")
