"""Labels asked for where they matter: which served texts of a drift episode people should label first.

An update needs labels of the traffic that drifted, and labels cost money,
so refit asks for few and chooses them (``refit labels request``). The
candidates are the requests served since the open episode began (its own
drifted traffic: an update counts older labels too, but asking about them
would spend the budget on a drift already learned), less any request already labelled (a label
row, a label waiting for its request, or an imported example of the same
text), any already asked for, and repeats of one text. From those it takes
``budget`` texts:

- spread over the episode's content: the candidates are clustered (a seeded
  spherical k-means, k half the budget) in the drift encoder's embedding
  space (``tasks.drift.sentence_embeddings``);
- weighted toward what the update needs: a cluster's texts are worth more
  the less sure the model was of them (one minus the logged
  ``confidence``), the farther the cluster lies from the champion's
  reference sample (mean similarity to the nearest reference texts), and
  the more of it is unlike the reference (less like it than 95% of the
  reference's own texts are). Its share of the budget is that worth times
  its size, and every cluster gets at least one text while the budget lasts;
- a first example of each new intent: the model knows none of a *new*
  cluster's texts (mostly unlike the reference), so how unsure it was of
  each says little. Such a cluster's share is split into as many parts
  (k-means again), and each part gives its most typical text; a familiar
  cluster gives its least confident texts;
- new content first: clusters are numbered by that worth, and the file
  lists them in that order, least confident first within each. A new intent
  gets its first examples at the top of the list, so they come back
  labelled even if the labelling stops half way.

Every request is remembered, one file per request::

    labels/model=<name>/requested/<stamp>.parquet    request_id, episode, cluster, requested_at

and logged as an MLflow run (run type ``label-request``) with the file and a
page saying what was picked and why. ``label_usd`` in
``refit/policies/labels.yaml`` prices the labels (``tasks.report``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from refit.errors import RefitError
from refit.policy import StrictModel, load_policy
from refit.store import ObjectStore

RUN_TYPE_VALUE = "label-request"
REQUEST_COLUMNS = ["request_id", "text", "predicted_label", "confidence", "cluster"]
LEDGER_COLUMNS = ["request_id", "episode", "cluster", "requested_at"]
# Embedding is the request's only real cost (about 2 ms a text on one core): past this many candidates, the
# least confident half of the cap and a seeded draw of the rest are clustered.
MAX_CANDIDATES = 4000
REFERENCE_ROWS = 500  # reference texts embedded to tell new clusters from familiar ones
NEIGHBOURS = 5  # as the drift check's embedding novelty: similarity to the nearest reference texts
NEW_QUANTILE = 0.05  # a cluster is new when its median similarity is below this quantile of the reference's own
MAX_CLUSTERS = 64


class LabelPolicy(StrictModel):
    """What a label costs (``refit/policies/labels.yaml``)."""

    label_usd: float = Field(ge=0, description="Price of one label of one text, in USD.")


def load_label_policy(name_or_path: str | Path = "labels") -> tuple[LabelPolicy, Path]:
    return load_policy(LabelPolicy, name_or_path)


def ledger_prefix(model_name: str) -> str:
    return f"labels/model={model_name}/requested/"


def requested(store: ObjectStore, model_name: str, since: datetime | None = None) -> pd.DataFrame:
    """Every text asked for so far (``LEDGER_COLUMNS``), or only those asked for at ``since`` or later."""
    keys = [k for k in store.list(ledger_prefix(model_name)) if k.endswith(".parquet")]
    if since is not None:  # a file is named by the time of its request: skip older files unread
        first = _stamp(since)[:8]
        keys = [k for k in keys if k.rsplit("/", 1)[-1][:8] >= first]
    frames = [store.get_parquet(k) for k in keys]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in LEDGER_COLUMNS})
    rows = pd.concat(frames, ignore_index=True)
    if since is not None:
        rows = rows[pd.to_datetime(rows["requested_at"], utc=True) >= since]
    return rows.reset_index(drop=True)


def _stamp(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S") + f"{when.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class Candidates:
    """Texts that may be asked for, one row per distinct text, and what was left out and why."""

    rows: pd.DataFrame
    served: int
    labelled: int
    already_requested: int
    duplicates: int


def candidates(store: ObjectStore, model_name: str, since: datetime, until: datetime) -> Candidates:
    """Requests served in ``[since, until)`` that nobody labelled or was asked to label, one per text."""
    from refit import requestlog
    from refit.data import text_hash
    from refit.labels import pending_prefix, read_examples

    served = requestlog.read_inference(store, model_name, since, until)
    served = served[served["request_id"].notna() & served["text"].notna()] if len(served) else served
    if not len(served):
        return Candidates(pd.DataFrame(columns=REQUEST_COLUMNS[:-1] + ["key"]), 0, 0, 0, 0)
    served = served.assign(request_id=served["request_id"].astype(str), text=served["text"].astype(str),
                           confidence=pd.to_numeric(served["confidence"], errors="coerce").fillna(0.0))
    served = served.assign(key=served["text"].map(text_hash))
    ids = set(served["request_id"])
    labelled = set(requestlog.label_pairs(store, model_name, since.date(), ids=ids)["request_id"])
    pending = store.read_parquet_prefix(pending_prefix(model_name))
    if len(pending) and "request_id" in pending.columns:
        labelled |= ids & set(pending["request_id"].astype(str))
    asked = ids & set(requested(store, model_name)["request_id"].astype(str))
    # A text counts once: if any request of it was labelled or asked for, none of its repeats is asked for.
    taken = set(served.loc[served["request_id"].isin(labelled | asked), "key"])
    examples = read_examples(store, model_name, since, until)
    taken |= set(examples["text"].astype(str).map(text_hash)) if len(examples) else set()
    free = served[~served["key"].isin(taken)]
    rows = free.sort_values(["confidence", "request_id"]).drop_duplicates("key", keep="first")
    return Candidates(rows[["request_id", "text", "predicted_label", "confidence", "key"]].reset_index(drop=True),
                      served=len(served), labelled=int(served["request_id"].isin(labelled).sum()),
                      already_requested=int(served["request_id"].isin(asked).sum()),
                      duplicates=len(free) - len(rows))


def cluster_count(budget: int, candidates: int) -> int:
    """k for a request: half the budget (at most ``MAX_CLUSTERS``), at least 2, never more than the candidates."""
    return max(1, min(candidates, MAX_CLUSTERS, max(2, budget // 2)))


def kmeans(vectors: np.ndarray, k: int, seed: int = 0, iterations: int = 30) -> np.ndarray:
    """Spherical k-means (cosine, on L2-normalised rows) with k-means++ seeding: each row's cluster."""
    rng = np.random.default_rng(seed)
    n = len(vectors)
    if k >= n:
        return np.arange(n)
    centres = [vectors[rng.integers(n)]]
    distance = 1.0 - vectors @ centres[0]
    for _ in range(1, k):
        weights = np.clip(distance, 0.0, None) ** 2
        chosen = rng.choice(n, p=weights / weights.sum()) if weights.sum() > 0 else rng.integers(n)
        centres.append(vectors[chosen])
        distance = np.minimum(distance, 1.0 - vectors @ vectors[chosen])
    centres = np.stack(centres)
    assign = np.full(n, -1)
    for _ in range(iterations):
        similarity = vectors @ centres.T
        new = similarity.argmax(axis=1)
        if np.array_equal(new, assign):
            break
        assign = new
        for c in range(k):
            members = vectors[assign == c]
            if len(members):
                total = members.sum(axis=0)
                centres[c] = total / max(float(np.linalg.norm(total)), 1e-12)
            else:  # an empty cluster takes the row its centre explains worst
                worst = int(similarity.max(axis=1).argmin())
                centres[c] = vectors[worst]
                assign[worst] = c
    return assign


def _nearest_mean(similarity: np.ndarray, k: int) -> np.ndarray:
    k = max(1, min(k, similarity.shape[1]))
    return -np.partition(-similarity, k - 1, axis=1)[:, :k].mean(axis=1)


def _spread(members: pd.DataFrame, vectors: np.ndarray, count: int, seed: int) -> pd.DataFrame:
    """``count`` texts of a new cluster, one from each of ``count`` parts of it: each part's most typical text.

    The model knows none of a new cluster's texts, so the least sure of them
    say little; what the update needs is a first example of each intent in
    it, and the parts of the cluster stand for those intents.
    """
    if count <= 0:
        return members.head(0)
    parts = kmeans(vectors, min(count, len(members)), seed)
    typical = np.zeros(len(members))
    for part in np.unique(parts):
        inside = parts == part
        centre = vectors[inside].sum(axis=0)
        typical[inside] = vectors[inside] @ (centre / max(float(np.linalg.norm(centre)), 1e-12))
    ranked = members.assign(part=parts, typical=typical).sort_values(["part", "typical", "request_id"],
                                                                      ascending=[True, False, True], kind="stable")
    firsts = ranked.groupby("part", sort=True).head(1)
    return firsts.sort_values(["confidence", "request_id"], kind="stable").drop(columns=["part", "typical"])


def allocate(weights: np.ndarray, sizes: np.ndarray, budget: int) -> np.ndarray:
    """Texts per cluster: one each while the budget lasts (in the given order), the rest in proportion to
    ``weights`` (Sainte-Lague: each next text to the cluster with the highest weight / (2 x texts + 1)),
    never more than a cluster holds."""
    quota = np.zeros(len(sizes), dtype=int)
    budget = min(budget, int(sizes.sum()))
    for c in np.flatnonzero(sizes > 0)[:budget]:
        quota[c] = 1
    weights = np.maximum(np.asarray(weights, dtype=float), 1e-9)
    for _ in range(budget - int(quota.sum())):
        priority = np.where(quota < sizes, weights / (2 * quota + 1), -1.0)
        quota[int(np.argmax(priority))] += 1
    return quota


@dataclass(frozen=True)
class Choice:
    """The picked rows (``REQUEST_COLUMNS``, in the order to label them), one row per cluster saying why, and how
    many picked texts are unlike the reference."""

    picks: pd.DataFrame
    clusters: pd.DataFrame
    unlike_reference: int


def choose(rows: pd.DataFrame, vectors: np.ndarray, reference: np.ndarray | None, budget: int,
           seed: int = 0) -> Choice:
    """Pick ``budget`` of ``rows`` (request_id, text, predicted_label, confidence; ``vectors`` their embeddings).

    ``reference``: the champion's reference embeddings (None: no reference,
    clusters then differ only by size and uncertainty). A text is *unlike*
    the reference when its mean similarity to its nearest reference texts is
    below what 95% of the reference's own texts have; a cluster is *new* when
    most of its texts are. Clusters are numbered from the one whose texts the
    update needs most: unsure, far from the reference, unlike it.
    """
    k = cluster_count(budget, len(rows))
    assign = kmeans(vectors, k, seed)
    uncertainty = 1.0 - rows["confidence"].to_numpy(dtype=float)
    if reference is not None and len(reference) > 1:
        similarity = _nearest_mean(vectors @ reference.T, NEIGHBOURS)
        own = reference @ reference.T
        np.fill_diagonal(own, -np.inf)
        unlike = similarity < np.quantile(_nearest_mean(own, NEIGHBOURS), NEW_QUANTILE)
    else:
        similarity, unlike = np.ones(len(rows)), np.zeros(len(rows), dtype=bool)
    table = pd.DataFrame({"found": assign, "similarity": similarity, "uncertainty": uncertainty,
                          "unlike": unlike.astype(float)}).groupby("found").agg(
        size=("similarity", "size"), similarity=("similarity", "mean"), uncertainty=("uncertainty", "mean"),
        unlike=("unlike", "mean")).reset_index()
    table["new"] = table["unlike"] > 0.5
    span = float(table["similarity"].max() - table["similarity"].min())
    distance = (table["similarity"].max() - table["similarity"]) / span if span > 1e-9 else 0.0 * table["similarity"]
    # What a text of the cluster is worth to the update: how unsure the model was, times how far the cluster is
    # from the reference (1 to 2 over the clusters) plus the share of it unlike the reference. Clusters are
    # listed by it; their share of the budget is it times their size.
    table["priority"] = (table["uncertainty"] + 0.05) * (1.0 + distance + table["unlike"])
    table["weight"] = table["size"] * table["priority"]
    table = table.sort_values(["priority", "found"], ascending=[False, True]).reset_index(drop=True)
    table["cluster"] = np.arange(len(table))
    table["picked"] = allocate(table["weight"].to_numpy(), table["size"].to_numpy(), budget)
    cluster_of = dict(zip(table["found"], table["cluster"]))
    frame = rows.assign(cluster=[cluster_of[a] for a in assign], unlike=unlike).reset_index(drop=True)
    picks = []
    for row in table.itertuples():
        members = frame[frame["cluster"] == row.cluster]
        if row.new:
            picks.append(_spread(members, vectors[members.index.to_numpy()], int(row.picked), seed))
        else:
            picks.append(members.sort_values(["confidence", "request_id"], kind="stable").head(int(row.picked)))
    chosen = pd.concat(picks, ignore_index=True) if picks else frame.head(0)
    return Choice(chosen[REQUEST_COLUMNS].reset_index(drop=True),
                  table[["cluster", "size", "picked", "uncertainty", "similarity", "unlike", "new"]],
                  int(chosen["unlike"].sum()))


@dataclass(frozen=True)
class LabelRequest:
    """What one request asked for, and where it is written."""

    model_name: str
    episode: str
    budget: int
    requested: int
    candidates: int
    clusters: int
    new_clusters: int
    unlike_reference: int
    file: str | None
    ledger: str | None
    run_id: str | None
    since: str
    note: str
    cpu_seconds: float
    picks: pd.DataFrame = field(repr=False)

    def to_dict(self) -> dict:
        return {"requested": self.requested, "file": self.file, "episode": self.episode,
                "clusters": self.clusters, "new_clusters": self.new_clusters,
                "unlike_reference": self.unlike_reference, "budget": self.budget,
                "candidates": self.candidates, "model_name": self.model_name, "since": self.since,
                "ledger": self.ledger, "run_id": self.run_id, "cpu_seconds": self.cpu_seconds, "note": self.note}


def _reference_vectors(store: ObjectStore, model_name: str, version: int | None, seed: int) -> np.ndarray | None:
    from tasks.drift import sentence_embeddings

    if version is None:
        return None
    key = f"reference/model={model_name}/version={version}/sample.parquet"  # tasks.deploy.reference_prefix
    try:
        sample = store.get_parquet(key)
    except (KeyError, FileNotFoundError):
        return None
    texts = sample["text"].dropna().astype(str).drop_duplicates()
    texts = texts.sample(n=min(REFERENCE_ROWS, len(texts)), random_state=seed) if len(texts) else texts
    return sentence_embeddings(texts.tolist()) if len(texts) else None


def _bounded(rows: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, str]:
    """At most ``MAX_CANDIDATES`` rows: the least confident half of the cap, and a seeded draw of the rest."""
    if len(rows) <= MAX_CANDIDATES:
        return rows, ""
    unsure = rows.nsmallest(MAX_CANDIDATES // 2, "confidence")
    rest = rows.drop(unsure.index)
    drawn = rest.sample(n=MAX_CANDIDATES - len(unsure), random_state=seed)
    return (pd.concat([unsure, drawn]).reset_index(drop=True),
            f"{len(rows):,} candidates: the {len(unsure):,} least confident and {len(drawn):,} drawn from the rest "
            f"were clustered. ")


def _cell(text: str, width: int = 60) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"


def why_markdown(result: LabelRequest, pool: Candidates, choice: Choice, reference: bool, bounded: str) -> str:
    """The request's page: what was left out, how the budget was spread, and a few texts of each cluster."""
    lines = [f"# Labels requested for {result.model_name}: {result.requested} of a budget of {result.budget}",
             "",
             f"Episode `{result.episode}`, requests served since {result.since}: {pool.served:,} served, "
             f"{pool.labelled:,} already labelled, {pool.already_requested:,} asked for before, "
             f"{pool.duplicates:,} repeats of a text; {result.candidates:,} candidates. {bounded}{result.note}",
             "",
             f"The candidates form {result.clusters} clusters in the drift encoder's embedding space. Each cluster's "
             "share grows with its size, with how unsure the model was (1 - confidence) and with its distance from "
             "the champion's reference" + ("" if reference else " (no reference found: distance not used)") +
             "; every cluster gets a text while the budget lasts. A text is *unlike the reference* when it is less "
             "like its nearest reference texts than 95% of the reference's own texts are (a cluster mostly of such "
             "texts is *new*), and that counts too. Clusters are numbered from the one whose texts are worth most "
             "(unsure, far, unlike) and listed in that order, least confident first, so new content is labelled "
             f"first: {result.unlike_reference} of the {result.requested} texts are unlike the reference. A new "
             "cluster's share is split into as many parts of it, each giving its most typical text: a first "
             "example of each intent in it; a familiar cluster gives its least confident texts.",
             "",
             "| cluster | new | candidates | unlike reference | picked | mean confidence | similarity to reference "
             "| first texts |",
             "|---|---|---|---|---|---|---|---|"]
    for row in choice.clusters.itertuples():
        texts = choice.picks.loc[choice.picks["cluster"] == row.cluster, "text"].head(2)
        lines.append(f"| {row.cluster} | {'yes' if row.new else 'no'} | {row.size} | {row.unlike:.0%} | {row.picked} | "
                     f"{1 - row.uncertainty:.2f} | {row.similarity:.3f} | "
                     f"{'; '.join(_cell(t) for t in texts) or '-'} |")
    return "\n".join(lines) + "\n"


def request_labels(store: ObjectStore, experiment_id: str, model_name: str, budget: int, home: Path,
                   out: Path | None = None, *, now: datetime | None = None, seed: int = 0) -> LabelRequest:
    """Ask people to label ``budget`` served texts of the model's open drift episode.

    Writes the texts to a CSV (``out``, default
    ``<home>/label-requests/<model>-<stamp>.csv``; columns ``REQUEST_COLUMNS``),
    remembers them in the store's ledger so no later request asks again, and
    logs a ``label-request`` run. Fewer candidates than the budget: all of
    them are asked for, and ``note`` says so; none: nothing is written.

    Raises:
        RefitError: the budget is below 1, or the model has no open episode.
    """
    import mlflow

    from refit.cost import Meter
    from registry import versions
    from registry.episodes import open_episode
    from registry.tracking import RUN_TYPE
    from tasks.drift import sentence_embeddings
    if budget < 1:
        raise RefitError(f"--budget must be at least 1 label, not {budget}")
    episode = open_episode(experiment_id, model_name)
    if episode is None:
        raise RefitError(f"{model_name} has no open drift episode: labels are requested for the traffic of a "
                         "detected drift (the monitor opens an episode when it finds one)")
    now = now or datetime.now(timezone.utc)
    since = datetime.fromisoformat(episode.start)
    since = since if since.tzinfo else since.replace(tzinfo=timezone.utc)
    with Meter() as meter:
        pool = candidates(store, model_name, since, now)
        rows, bounded = _bounded(pool.rows, seed)
        champion = versions.alias_version(model_name, versions.CHAMPION) or episode.champion or None
        reference = _reference_vectors(store, model_name, champion, seed) if len(rows) else None
        vectors = sentence_embeddings(rows["text"].tolist()) if len(rows) else np.zeros((0, 384), np.float32)
        choice = choose(rows, vectors, reference, budget, seed) if len(rows) else None
    picked = choice.picks if choice is not None else pd.DataFrame(columns=REQUEST_COLUMNS)
    if not len(rows):
        note = "no text of the episode is left to ask for: every served request is labelled or already asked for"
    elif len(picked) < budget:
        note = f"only {len(picked)} candidate texts for a budget of {budget}: all of them are asked for"
    else:
        note = ""
    result = LabelRequest(model_name, episode.id, budget, len(picked), len(pool.rows),
                          0 if choice is None else len(choice.clusters),
                          0 if choice is None else int(choice.clusters["new"].sum()),
                          0 if choice is None else choice.unlike_reference, None, None, None,
                          since.isoformat(), note, round(meter.cpu_seconds, 3), picked)
    if not len(picked):
        return result
    stamp = f"{_stamp(now)}-{uuid.uuid4().hex[:6]}"
    out = Path(out) if out is not None else Path(home) / "label-requests" / f"{model_name}-{stamp}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    picked.to_csv(out, index=False)
    tags = {RUN_TYPE: RUN_TYPE_VALUE, "refit.model": model_name, "refit.episode_id": episode.id}
    try:
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"label request {model_name}", tags=tags) as run:
            mlflow.log_params({"budget": budget, "seed": seed, "since": since.isoformat(),
                               "champion_version": champion})
            mlflow.log_metrics({"requested": result.requested, "clusters": result.clusters,
                                "new_clusters": result.new_clusters, "candidates": result.candidates,
                                "unlike_reference": result.unlike_reference,
                                "cpu_seconds": result.cpu_seconds})
            mlflow.log_artifact(str(out), "label-request")
            mlflow.log_text(why_markdown(result, pool, choice, reference is not None, bounded), "why.md")
            # The ledger last: texts recorded as asked for are never asked for again, so they must be in a file.
            ledger = store.put_parquet(f"{ledger_prefix(model_name)}{stamp}.parquet", pd.DataFrame({
                "request_id": picked["request_id"].astype(str), "episode": episode.id,
                "cluster": picked["cluster"].astype(int), "requested_at": pd.Timestamp(now).tz_convert("UTC")}))
    except BaseException:
        out.unlink(missing_ok=True)  # a request nobody recorded is not handed out
        raise
    return replace(result, file=str(out), ledger=ledger, run_id=run.info.run_id)
