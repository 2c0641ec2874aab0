"""Deploy: write the champion's reference snapshot and move the aliases.

Promotion is guarded: ``champion`` moves only if it still points at the
version the gate compared against. The old champion becomes ``previous``,
which is where rollback returns to.
"""

from __future__ import annotations

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from refit import modeling
from refit.store import ObjectStore
from registry import versions

REFERENCE_SAMPLE_ROWS = 1000


def reference_prefix(model_name: str, version: int) -> str:
    return f"reference/model={model_name}/version={version}/"


@task(name="write-reference", cache_policy=NO_CACHE)
def write_reference(store: ObjectStore, model_name: str, version: int, model, tokenizer,
                    pool: pd.DataFrame, trained_on: pd.DataFrame, seed: int = 0) -> str:
    """Snapshot what drift is measured against, and what later updates replay.

    ``sample.parquet``: up to 1,000 rows of what the version was trained on,
    with its own predictions. ``pool.parquet``: every labelled row the
    lineage has learned so far, the replay source for the next update.
    """
    sample = trained_on.sample(n=min(REFERENCE_SAMPLE_ROWS, len(trained_on)), random_state=seed)
    predicted, confidence = modeling.predict(model, tokenizer, sample["text"].tolist())
    snapshot = pd.DataFrame({"text": sample["text"].to_numpy(), "label": sample["label"].to_numpy(),
                             "predicted_label": predicted, "confidence": confidence.astype(float)})
    prefix = reference_prefix(model_name, version)
    store.put_parquet(prefix + "pool.parquet", pool[["text", "label"]].reset_index(drop=True))
    store.put_parquet(prefix + "sample.parquet", snapshot)
    return store.uri(prefix)


def read_reference(store: ObjectStore, model_name: str, version: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The version's (sample, pool) snapshot."""
    prefix = reference_prefix(model_name, version)
    return store.get_parquet(prefix + "sample.parquet"), store.get_parquet(prefix + "pool.parquet")


@task(name="promote", cache_policy=NO_CACHE)
def promote(model_name: str, version: int, expected_champion: int | None) -> int | None:
    """Move ``champion`` to ``version`` (guarded); returns the old champion."""
    previous = versions.promote(model_name, version, expected_champion)
    versions.set_tags(model_name, version, {"refit.deployed": "champion"})
    return previous
