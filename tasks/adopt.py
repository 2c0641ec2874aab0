"""Adopt: make champion v1 from what a team already has: its data, its golden set, and maybe its own model.

Everything the user gave is read and checked before anything is written
(:func:`prepare_adoption`), so bad input ends in one line and leaves the
registry and the store as they were. With a checkpoint, v1 is that model as
it is: its weights become the base (stored once as an artifact of the adopt
run, so any machine can find it again) and v1's adapter starts at zero, so v1
answers exactly as the checkpoint does. Without one, v1 is trained from the
configured base with the bootstrap recipe.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from refit import modeling
from refit.data import read_table, text_keys
from refit.errors import RefitError

GOLDEN_SHARE = 0.15  # of --train, held out per label as the golden set when none is given
BASE_ARTIFACT = "base"  # the adopted checkpoint's copy in the adopt run's artifacts


@dataclass(frozen=True)
class Adoption:
    """What an adoption starts from, checked.

    ``train``: the replay pool (and v1's training data without a
    checkpoint), never sharing a text with ``golden``. ``labels``: what v1
    answers: the checkpoint's labels, else those of ``train``.
    """

    train: pd.DataFrame
    golden: pd.DataFrame
    labels: list[str]
    checkpoint: Path | None
    train_source: str
    golden_source: str


def read_labelled(path: Path, text_column: str, label_column: str, what: str) -> pd.DataFrame:
    """``text``, ``label`` (and ``group`` where the file has one) from a CSV, Parquet or JSON(L) file.

    Raises:
        RefitError: no such file, an empty file, a missing column, or rows with an empty text or label.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise RefitError(f"{what} file {path} is empty")
    frame = read_table(path)
    if frame.empty:
        raise RefitError(f"{what} file {path} is empty")
    columns = ", ".join(map(str, frame.columns))
    for option, column in (("--text-column", text_column), ("--label-column", label_column)):
        if column not in frame.columns:
            kind = "text" if option == "--text-column" else "label"
            raise RefitError(f"{what} file {path} has no {kind} column {column!r} (columns: {columns}; "
                             f"choose one with {option})")
    out = pd.DataFrame({"text": frame[text_column], "label": frame[label_column]})
    empty = out["text"].isna() | out["label"].isna() | (out["text"].astype(str).str.strip() == "") \
        | (out["label"].astype(str).str.strip() == "")
    if empty.any():
        raise RefitError(f"{what} file {path}: {int(empty.sum())} of {len(out)} rows have an empty "
                         f"{text_column!r} or {label_column!r}")
    out = out.astype(str)
    if "group" in frame.columns and "group" not in (text_column, label_column):
        out["group"] = frame["group"].astype(str)
    return out.reset_index(drop=True)


def hold_out_golden(train: pd.DataFrame, share: float = GOLDEN_SHARE, seed: int = 0
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows to keep, golden set): ``share`` of each label's distinct texts held out, never trained on.

    A text and its repeats stay on one side; a label with a single distinct
    text stays in training.
    """
    key = text_keys(train["text"])
    firsts = train.assign(_key=key).drop_duplicates("_key")
    rng = np.random.default_rng(seed)
    held: set[str] = set()
    for _, part in firsts.groupby("label", sort=True):
        n = int(np.floor(len(part) * share + 0.5)) if len(part) > 1 else 0
        held.update(part["_key"].to_numpy()[rng.permutation(len(part))[:n]])
    golden = key.isin(held)
    if not golden.any():
        raise RefitError(f"{len(train)} training rows are too few to hold out a golden set ({share:.0%} per "
                         "label); give one with --golden")
    return train[~golden].reset_index(drop=True), train[golden].reset_index(drop=True)


def checkpoint_labels(checkpoint: Path) -> list[str]:
    """The labels a sequence-classification checkpoint answers, after checking refit can serve and adapt it.

    Raises:
        RefitError: not a sequence-classification checkpoint, no safetensors weights, no tokenizer, or an
            architecture whose layers and attention refit cannot find.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    config = modeling.check_classifier_checkpoint(checkpoint)
    try:
        AutoTokenizer.from_pretrained(checkpoint)
    except Exception as exc:  # transformers raises OSError, ValueError and more for a missing tokenizer
        raise RefitError(f"{checkpoint} has no tokenizer refit can load: {str(exc).splitlines()[0]}") from None
    with torch.device("meta"):  # the structure only: no memory, no weights read
        modeling.anatomy(AutoModelForSequenceClassification.from_config(config))
    return [str(config.id2label[i]) for i in range(len(config.id2label))]


def prepare_adoption(train_path: Path, golden_path: Path | None = None, model_path: Path | None = None,
                     text_column: str = "text", label_column: str = "label", seed: int = 0) -> Adoption:
    """Read and check everything an adoption needs; writes nothing.

    Raises:
        RefitError: any input refit cannot adopt, with the reason in one line.
    """
    train = read_labelled(train_path, text_column, label_column, "training")
    checkpoint = Path(model_path).expanduser().resolve() if model_path else None
    labels = checkpoint_labels(checkpoint) if checkpoint else None
    if golden_path:
        golden = read_labelled(golden_path, text_column, label_column, "golden")
        train = train[~text_keys(train["text"]).isin(set(text_keys(golden["text"])))].reset_index(drop=True)
        if train.empty:
            raise RefitError(f"every text of {train_path} is also in the golden file {golden_path}")
        golden_source = str(Path(golden_path).resolve())
    else:
        train, golden = hold_out_golden(train, GOLDEN_SHARE, seed)
        golden_source = f"{GOLDEN_SHARE:.0%} of {Path(train_path).resolve()} per label, held out"
    if labels is not None:
        for frame, what in ((golden, "golden"), (train, "training")):
            unknown = sorted(set(frame["label"]) - set(labels))
            if unknown:
                raise RefitError(f"{what} labels the model cannot output: {', '.join(unknown[:5])}"
                                 f"{' ...' if len(unknown) > 5 else ''} ({len(unknown)}; the model's "
                                 f"{len(labels)} labels: {', '.join(labels[:5])}{' ...' if len(labels) > 5 else ''})")
    else:
        labels = sorted(set(train["label"]))
        unknown = sorted(set(golden["label"]) - set(labels))
        if unknown:
            raise RefitError(f"golden labels the model cannot output (no training rows): {', '.join(unknown[:5])}"
                             f"{' ...' if len(unknown) > 5 else ''}")
    return Adoption(train, golden, labels, checkpoint, str(Path(train_path).resolve()), golden_source)


def unfinished_adoption(model_name: str) -> list[int]:
    """The versions of adopts that stopped after registering and never made a champion: a re-run replaces them.

    Adopt makes a new model, so any other state is refused: a champion (the
    adopt finished), a version not made by adopt, or an adopt of this model
    still running (its run RUNNING in a process that lives). A version
    already tagged abandoned is not counted. Found by tags, not by the
    command line it was run with, so the re-run may give other files.

    Raises:
        RefitError: the model is in use, or another adopt of it is running.
    """
    from mlflow import MlflowClient

    from registry import versions

    found = MlflowClient().search_model_versions(f"name = '{model_name}'")
    champion = versions.alias_version(model_name, versions.CHAMPION)
    if champion is not None or any(v.tags.get("refit.kind") != "adopt" for v in found):
        raise RefitError(f"model {model_name} already has versions in the registry"
                         f"{f' (champion v{champion})' if champion is not None else ''}; adopt makes v1 of a new "
                         "model: choose another --model-name")
    left = [v for v in found if not v.tags.get("refit.deployed", "").startswith("abandoned")]
    for version in left:
        running = _live_adopt_run(version.run_id)
        if running:
            raise RefitError(f"an adopt of {model_name} is still running ({running}, v{version.version} registered): "
                             "wait for it to finish, or stop it and run adopt again")
    return sorted(int(v.version) for v in left)


def _live_adopt_run(run_id: str | None) -> str | None:
    """The run, described, if it is RUNNING in a process that still lives (or on another host); None if it stopped.

    A RUNNING run with no process recorded is taken as stopped: an adopt
    that ends normally closes its run, so only a killed one stays RUNNING.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from refit import processes

    if not run_id:
        return None
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        return None
    process = run.data.tags.get("refit.process", "")
    if run.info.status != "RUNNING" or not process or processes.gone(process) is True:
        return None
    return f"run {run_id} in process {process}"


def retire_unfinished(model_name: str, numbers: list[int], run_id: str) -> None:
    """Tag each stopped adopt's version abandoned, replaced by ``run_id``, and close its run if left RUNNING."""
    from mlflow import MlflowClient

    from registry import versions

    client = MlflowClient()
    for number in numbers:
        versions.set_tags(model_name, number, {"refit.deployed": "abandoned: an adopt stopped after registering "
                                                                 f"it; replaced by adopt run {run_id}"})
        stopped = client.get_model_version(model_name, str(number)).run_id
        if stopped and stopped != run_id and client.get_run(stopped).info.status == "RUNNING":
            client.set_tag(stopped, "refit.abandoned", f"stopped after registering v{number}; closed by {run_id}")
            client.set_terminated(stopped, status="KILLED")


@task(name="adopt-checkpoint", cache_policy=NO_CACHE)
def adopted_adapter(checkpoint: Path, rank: int, alpha: int, seed: int = 0) -> Path:
    """v1's adapter over the checkpoint: zero LoRA weights and the checkpoint's own head, so v1 is the checkpoint."""
    model = modeling.adopt_checkpoint(checkpoint, modeling.LoraSpec(rank=rank, alpha=alpha), seed=seed)
    return modeling.save_model(model, Path(tempfile.mkdtemp(prefix="refit-adopted-")))


@task(name="publish-base", cache_policy=NO_CACHE)
def publish_base(adapter_dir: Path) -> modeling.BaseRef:
    """Store the adapter's base in the active MLflow run, unless it is the packaged one, and point the adapter at it.

    The checkpoint's files (weights in safetensors, config, tokenizer; never
    a pickle) become the run's ``base/`` artifacts, and the adapter's
    ``base.json`` records their URI and weights hash: every later adapter of
    this lineage copies that record, and loading it on any machine with access
    to the tracking server's artifacts downloads the base once into the cache.
    """
    import mlflow

    base = modeling.base_of(adapter_dir)
    if base.kind != "path":
        return base
    directory = Path(base.location)
    for path in sorted(directory.iterdir()):
        if path.is_file() and not modeling.is_pickled(path) and not path.name.startswith("."):
            mlflow.log_artifact(str(path), BASE_ARTIFACT)
    published = modeling.BaseRef("artifact", mlflow.get_artifact_uri(BASE_ARTIFACT), base.sha256, base.model_type,
                                 base.source or base.location)
    modeling.write_base(adapter_dir, published)
    return published


def golden_quality(adapter_dir: Path, golden: pd.DataFrame, runtime: str):
    """v1 on the golden set as ``refit serve`` runs it (merged, ONNX or torch), with its own tokenizer.

    Returns the set's metrics and the runtime that served.
    """
    from refit.runtime.served import from_adapter
    from tasks.evaluate import quality

    served = from_adapter(adapter_dir, 1, tokenizer=modeling.load_tokenizer(adapter_dir), runtime=runtime)
    slices, groups, _ = quality(served, {"golden": golden})
    return slices["golden"], groups, served.runtime


def lineage_tags(adoption: Adoption, base: modeling.BaseRef) -> dict[str, str]:
    """Where v1 came from, on its version page."""
    from refit.data import fingerprint
    from registry.tracking import code_revision

    adopted = adoption.checkpoint is not None
    return {
        "refit.kind": "adopt",
        "refit.parent_version": "none",
        "refit.adopted_from": str(adoption.checkpoint) if adopted else "none (trained from the base model)",
        "refit.adopted_weights_sha256": base.sha256 if adopted else "none",
        "refit.base_model_sha256": base.sha256[:16],
        "refit.base_model_uri": base.location or base.kind,
        "refit.base_model_type": base.model_type,
        "refit.data_source": adoption.train_source,
        "refit.train_data_fingerprint": fingerprint(adoption.train[["text", "label"]]),
        "refit.golden_source": adoption.golden_source,
        "refit.code_revision": code_revision(),
    }


def first_adapter(adoption, recipe, ctx) -> tuple[Path, object | None]:
    """Version 1's adapter and its training cost: the adopted checkpoint as it is (no cost), or one trained on the
    team's rows from the configured base with the bootstrap recipe."""
    from tasks.finetune import fine_tune

    if adoption.checkpoint is not None:
        return adopted_adapter(adoption.checkpoint, recipe.rank, recipe.alpha, ctx.settings.seed), None
    trained = fine_tune(adoption.train, recipe, ctx.rates, labels=adoption.labels, seed=ctx.settings.seed)
    return trained.adapter_dir, trained.cost


def log_golden_quality(quality, groups: dict, cost) -> None:
    """Version 1's golden-suite scores, whole and per group, on the adopt run."""
    import mlflow

    mlflow.log_metrics({"golden_accuracy": quality.accuracy, "golden_macro_f1": quality.macro_f1,
                        **(cost.metrics() if cost else {})}
                       | {f"golden_{g.split('/', 1)[1]}_accuracy": m.accuracy for g, m in groups.items()})


def adopted_version_tags(adoption, base, golden, policy_path, quality, cost) -> dict[str, str]:
    """What the adopted version's page in the MLflow UI says: its lineage, its golden suite, and no gate."""
    from refit.policy import file_hash

    return lineage_tags(adoption, base) | golden.tags() | {
        "refit.policy_hash": file_hash(policy_path),
        "refit.gate_verdict": "adopted (no gate)",
        "refit.update_cost_usd": cost.usd if cost else 0.0,
        "refit.golden_accuracy": round(quality.accuracy, 4),
        "refit.labels": str(len(adoption.labels)),
    }


def adoption_result(name: str, version: int, adoption, base, quality, golden, runtime: str, run_id: str,
                    reference_uri: str, cost) -> dict:
    """What ``refit adopt --json`` prints and the adopt run keeps as ``adopt.json``."""
    return {"model_name": name, "version": version, "labels": len(adoption.labels),
            "golden_accuracy": quality.accuracy, "golden_rows": golden.rows,
            "base_model": str(adoption.checkpoint) if adoption.checkpoint else base.describe(),
            "base_model_sha256": base.sha256, "base_model_uri": base.location or base.kind,
            "adopted": adoption.checkpoint is not None, "train_rows": len(adoption.train),
            "golden_version": golden.version, "runtime": runtime, "run_id": run_id,
            "reference_uri": reference_uri, "train_cost_usd": cost.usd if cost else 0.0}
