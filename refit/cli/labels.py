"""``refit labels ...``: labels in from your labelling process."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from refit.errors import RefitError
from refit.cli.common import JsonOption, ModelNameOption, StoreOption, _emit, _prepare, labels_app



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
    _emit(result.to_dict() | {"model_name": settings.model_name}, as_json, f"Labels for {settings.model_name}")
