"""``refit drift``: two files in, a drift verdict out, the same measurement the monitor makes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from refit.errors import RefitError
from refit.settings import OFFLINE_ENV
from refit.cli.common import JsonOption, app, err


def _read_sides(paths: dict[str, Path], text_column: str) -> dict:
    """Both files as frames; ``RefitError`` for an empty one or one without the text column."""
    from refit.data import read_table

    frames = {side: read_table(path) for side, path in paths.items()}
    for side, frame in frames.items():
        path = paths[side]
        if frame.empty:
            raise RefitError(f"{side} file {path} has no rows")
        if text_column not in frame.columns:
            raise RefitError(f"{side} file {path} has no column {text_column!r} "
                             f"(columns: {', '.join(map(str, frame.columns))}); name it with --text-column")
    return frames


def _columns_to_read(frames: dict, paths: dict[str, Path], text_column: str,
                     optional_columns: dict[str, tuple[str, bool]]) -> tuple[dict[str, str], dict[str, str]]:
    """(the files' column -> refit's name, the signals skipped -> why) for the text and the optional columns.

    A named optional column must be in both files; a default one is used when
    both have it, else its signal is skipped with the reason.
    """
    rename = {text_column: "text"}
    skipped = {}
    for ours, (theirs, named) in optional_columns.items():
        lacking = [side for side, frame in frames.items() if theirs not in frame.columns]
        if theirs in rename:
            if named:
                raise RefitError(f"column {theirs!r} is already read as {rename[theirs]!r}: "
                                 "each column option must name a different column")
            skipped[ours] = f"column {theirs!r} is read as {rename[theirs]!r}"
        elif not lacking:
            rename[theirs] = ours
        elif named:
            side = lacking[0]
            raise RefitError(f"{side} file {paths[side]} has no column "
                             f"{theirs!r} (columns: {', '.join(map(str, frames[side].columns))})")
        else:
            skipped[ours] = f"no column {theirs!r} in the {' and '.join(lacking)} file"
    signal_of = {"predicted_label": "prediction", "confidence": "confidence"}
    return rename, {signal_of[ours]: why for ours, why in skipped.items() if ours in signal_of}


def _drift_files(reference_path: Path, current_path: Path, policy_name: str, text_column: str,
                 optional_columns: dict[str, tuple[str, bool]], embeddings_cache: bool = True) -> dict:
    """Read, validate and measure two files; the verdict as a JSON-ready dict.

    ``optional_columns`` maps refit's name (``predicted_label``, ``confidence``,
    ``label``) to the file's name and whether the user named it: a named
    column must be in both files, a default one is used when both have it.
    With ``embeddings_cache`` the reference's embeddings are read from beside
    it, and written there when missing, stale or short of what this check
    embedded: the reference is the same check after check, the window is not.
    So are the thresholds calibrated from it (``REFERENCE.calibration.json``,
    one entry per window size).
    """
    paths = {"reference": reference_path, "current": current_path}
    frames = _read_sides(paths, text_column)
    rename, skipped = _columns_to_read(frames, paths, text_column, optional_columns)
    # Request ids and timestamps are not measured, but they are validated (duplicates, bad times) where present;
    # a reference's scored_on column says whether its confidences are on rows the champion never trained on.
    checked_only = [c for c in ("request_id", "timestamp", "scored_on")
                    if c not in rename and c not in rename.values()]
    reference, current = (
        frames[side][list(rename) + [c for c in checked_only if c in frames[side].columns]].rename(columns=rename)
        for side in ("reference", "current"))

    # Only what a check needs: tasks.drift and tasks.validate build their Prefect tasks on first use, and
    # Evidently is imported only for its HTML report, which this command does not write.
    from tasks.drift import KeptCalibrations, load_drift_policy, measure_drift
    from tasks.validate import split_bad_inference_rows

    policy, policy_path = load_drift_policy(policy_name)

    reference_kept, reference_bad = split_bad_inference_rows(reference, required=["text"])
    if len(reference_kept) < 2:
        raise RefitError(f"reference file {reference_path} has {len(reference_kept)} usable rows of {len(reference)} "
                         f"({_reasons(reference_bad)}): it needs at least 2")
    kept, bad = split_bad_inference_rows(current, required=["text"])
    if len(kept) < policy.min_window_rows:
        raise RefitError(f"window rejected: {len(kept)} usable rows of {len(current)} in {current_path}, "
                         f"policy needs at least {policy.min_window_rows}"
                         + (f" ({len(bad)} quarantined: {_reasons(bad)})" if len(bad) else ""))
    sidecar = _read_reference_embeddings(reference_path, reference_kept["text"]) if embeddings_cache else None
    calibrations = KeptCalibrations.beside(reference_path) if embeddings_cache else None
    result = measure_drift(reference_kept, kept, policy, report=False, kept=calibrations)
    if sidecar is not None:
        _write_reference_embeddings(reference_kept["text"], *sidecar)
    verdict = result.to_dict() | {
        "rows_checked": len(current),
        "rows_kept": len(kept),
        "rows_quarantined": len(bad),
        "quarantine_reasons": _reasons(bad),
        "reference_rows_dropped": len(reference_bad),
        "reference_drop_reasons": _reasons(reference_bad),
        "signals_skipped": skipped | {name: "disabled in the policy" for name in ("text", "prediction", "confidence")
                                      if not getattr(policy, name).enabled},
        "reference": str(reference_path),
        "current": str(current_path),
        "policy": str(policy_path),
    }
    if "label" in rename.values():
        verdict["labels"] = _label_summary(reference_kept, kept)
    return verdict


def _read_reference_embeddings(reference_path: Path, texts) -> tuple[Path, bytes | None]:
    """The reference's sidecar and its bytes, with its vectors made known to the encoder when they fit."""
    from tasks.drift import embeddings_sidecar, reuse_reference_embeddings

    path = embeddings_sidecar(reference_path)
    payload = path.read_bytes() if path.is_file() else None
    status = reuse_reference_embeddings(payload, texts)
    if status != "read" and payload is not None:
        err.print(f"reference embeddings in {path} are {status}: computing them again", markup=False, highlight=False)
    return path, payload if status == "read" else None


def _write_reference_embeddings(texts, path: Path, payload: bytes | None) -> None:
    """Keep what this check embedded of the reference beside it, for the next check (written whole, then moved)."""
    from tasks.drift import reference_embeddings_payload

    fresh = reference_embeddings_payload(texts, payload)
    if fresh is None:
        return
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        partial.write_bytes(fresh)
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        err.print(f"reference embeddings not kept ({exc}): the next check embeds the reference again",
                  markup=False, highlight=False)


def _reasons(bad) -> dict[str, int]:
    return {str(k): int(v) for k, v in bad["reason"].value_counts().items()} if len(bad) else {}


def _label_summary(reference, current) -> dict:
    """Labelled rows on each side and, with predictions, their accuracy: reported, never part of the verdict."""
    summary = {}
    for side, frame in (("reference", reference), ("current", current)):
        labelled = frame[frame["label"].notna() & (frame["label"].astype(str).str.strip() != "")]
        summary[f"{side}_labelled_rows"] = len(labelled)
        if "predicted_label" in frame.columns and len(labelled):
            hits = labelled["predicted_label"].astype(str) == labelled["label"].astype(str)
            summary[f"{side}_accuracy"] = round(float(hits.mean()), 4)
    return summary


def _signal_table(verdict: dict, title: str) -> Table:
    table = Table(title=title, caption=(
        f"{verdict['rows_checked']} rows checked, {verdict['rows_quarantined']} quarantined, "
        f"{verdict['rows_kept']} measured against {verdict['rows_reference']} reference rows "
        f"(sampling: {verdict['sample_method']})"))
    for column, justify in (("signal", "left"), ("method", "left"), ("value", "right"), ("threshold", "right"),
                            ("drifted", "left")):
        table.add_column(column, justify=justify)
    for name, signal in verdict["signals"].items():
        table.add_row(name, signal["method"], f"{signal['value']:.4f}",
                      f"{'>' if signal['direction'] == 'above' else '<'} {signal['threshold']:.4f}",
                      "[bold red]yes[/]" if signal["drifted"] else "no")
    for name, why in verdict["signals_skipped"].items():
        table.add_row(name, "-", "-", "-", f"skipped: {why}")
    return table


@app.command()
def drift(reference: Annotated[Path, typer.Argument(help="Reference table: .parquet, .csv or .jsonl.")],
          current: Annotated[Path, typer.Argument(help="Window to check, same formats.")],
          as_json: JsonOption = False,
          text_column: Annotated[str, typer.Option(help="Column holding the text.")] = "text",
          prediction_column: Annotated[Optional[str], typer.Option(
              help="Predicted-label column (default: predicted_label, used when both files have it).")] = None,
          confidence_column: Annotated[Optional[str], typer.Option(
              help="Confidence column (default: confidence, used when both files have it).")] = None,
          label_column: Annotated[Optional[str], typer.Option(
              help="True-label column, reported only (default: label, used when both files have it).")] = None,
          policy: Annotated[str, typer.Option(help="Drift policy name or YAML path.")] = "drift",
          embeddings_cache: Annotated[bool, typer.Option(
              help="Keep the reference's embeddings and calibrated thresholds beside it "
                   "(REFERENCE.embeddings.npz, REFERENCE.calibration.json) and reuse them while the reference's "
                   "texts and the encoder are unchanged.")] = True) -> None:
    """Check a window against a reference, with no server: validate it, measure the drift signals, print the verdict.

    The first check of a reference embeds it, calibrates the text signal's
    threshold on quiet windows drawn from it, and keeps both beside it;
    later checks embed only the window. The encoder runs on ONNX Runtime,
    built once from its weights into REFIT_HOME/cache/encoders.

    Example: refit drift reference.parquet window.csv --text-column utterance --json
    """
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    optional = {ours: (given or ours, given is not None) for ours, given in
                (("predicted_label", prediction_column), ("confidence", confidence_column), ("label", label_column))}
    verdict = _drift_files(reference, current, policy, text_column, optional, embeddings_cache)
    heading = (f"Drift check: {'DRIFT' if verdict['drift_detected'] else 'no drift'} "
               f"(severity {verdict['severity']})")
    (err if as_json else Console()).print(_signal_table(verdict, heading))
    if as_json:
        print(json.dumps(verdict, default=str))
