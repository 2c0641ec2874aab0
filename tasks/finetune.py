"""Fine-tune: assemble the training set, train a LoRA adapter, meter the cost.

An update warm-starts from the champion's adapter and trains on the new
labelled examples plus a replay sample of what the champion already knew, so
it learns the shift without forgetting. Bootstrap trains the first adapter
from the base model.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from refit import modeling
from refit.cost import Meter, Rates, TrainingCost
from refit.data import per_label_sample, stratified_sample, text_hash, text_hashes, text_keys
from refit.runtime.encoder_states import EncoderStates
from refit.errors import RefitError
from refit.policy import StrictModel, load_policy

FORWARD_SHARE = 1 / 3  # a forward pass costs about a third of forward + backward


class Recipe(StrictModel):
    """How one training run is done.

    ``start: warm`` continues the champion's adapter on new data plus replay;
    ``start: fresh`` trains a new adapter over the base on everything learned
    so far (the full retrain). ``frozen_layers`` lowest encoder layers are not
    trained on a warm start: their output is computed once and cached, so each
    epoch pays only for the layers above (6 of 6 frozen trains the head alone).
    """

    name: str = "recipe"
    start: Literal["warm", "fresh"] = "warm"
    rank: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    epochs: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    batch_size: int = Field(32, ge=1)
    frozen_layers: int = Field(0, ge=0, le=6)
    distill_weight: float = Field(0.0, ge=0, le=1, description="Weight of the champion's soft targets on replay rows.")
    min_new_rows: int = Field(0, ge=0, description="An update with fewer new labelled rows skips this rung: a full "
                                                   "retrain on a few dozen labels costs much and gains nothing.")

    def work_tokens(self, tokens: int, layers: int = 6) -> float:
        """Training work in full-depth token passes (forward + backward), for estimates and the ledger.

        A warm start pays one forward pass over everything (about a third of
        a training pass) and then, per epoch, the unfrozen share of the depth.
        """
        if self.start == "fresh":
            return float(tokens * self.epochs)
        return tokens * (FORWARD_SHARE + self.epochs * (layers - self.frozen_layers) / layers)


class UpdatePolicy(StrictModel):
    """The training side of an update: the escalation ladder, replay and the cost estimate."""

    bootstrap: Recipe
    ladder: list[Recipe] = Field(min_length=1, description="Tried in order until the gate passes or money runs out.")
    escalate_on: list[str] = Field(
        default_factory=lambda: ["fresh_accuracy_gain", "fresh_gain_lower_bound"],
        description="Gate rules whose failure sends the update up the ladder; any other failure ends it.")
    replay_ratio: float = Field(ge=0, description="Replay rows per new labelled row.")
    min_replay_rows: int = Field(0, ge=0, description="Replay at least this many rows, however few labels arrived: "
                                                      "a few dozen new rows alone pull the head off what it knew.")
    min_new_examples: int = Field(ge=1)
    fresh_holdout_share: float = Field(
        gt=0, lt=1, description="Share of an update's new labelled rows held out (newest first, per label) as "
                                "the fresh set that judges its improvement; never trained on.")
    min_fresh_rows: int = Field(ge=1, description="Fewer fresh rows than this: wait for labels instead of training.")
    min_examples_per_new_label: int = Field(
        ge=1, description="Rows a label the champion does not know needs before its head grows to learn it.")
    golden_max_per_label: int = Field(
        ge=1, description="Cap per label of the golden suite as fresh holdouts join it (oldest dropped first).")
    new_label_replay_ratio: float = Field(
        ge=0, description="Replay rows per new row in an update that teaches new or young labels: old regions "
                          "need more defending when new classes compete for them.")
    # An update that teaches new or young labels also replays every label alike (refit.data.per_label_sample),
    # not in proportion to the pool: labels learned in earlier shifts have few rows there and were being forgotten.
    new_label_distill_weight: float = Field(
        ge=0, le=1, description="In an update that teaches new or young labels, the least weight of the "
                                "champion's soft outputs on replay rows (warm rungs).")
    new_label_min_steps: int = Field(
        0, ge=0, description="In an update that teaches new or young labels, the head rung (all layers frozen) "
                             "trains at least this many steps, in more epochs: a few rows are otherwise a few "
                             "steps.")
    pseudo_label_margin: float | None = Field(
        None, ge=0, le=2, description="Unlabelled texts of the update's traffic join training under a new or "
                                      "young label when it is their nearest label (sentence embeddings against each "
                                      "label's mean) by at least this much cosine; None: never.")
    pseudo_labels_per_label: int = Field(20, ge=0, description="The most unlabelled texts one new label takes.")
    young_label_rows: int = Field(
        0, ge=0, description="A label the champion learned from fewer labelled rows than this is still young: an "
                             "update with new rows of it trains it as it trains a new label (per-label replay, "
                             "distillation, the head rung's least steps, pseudo-labels); 0: never.")
    max_label_mix_shift: float | None = Field(
        None, gt=0, le=1, description="Delayed labels whose mix is this far (total variation) from the model's "
                                      "predictions on the same requests are refused whole; None: not checked.")
    cpu_seconds_per_work_token: float = Field(gt=0, description="Prior for estimates until an update was measured.")


def escalates(failed_rules: list[str], policy: UpdatePolicy) -> bool:
    """Whether a refused attempt should be followed by the next rung.

    Only a shortfall in improvement is worth more training. A failed guard
    (golden or slice regression, cost, latency) says the data or the model is
    wrong, and a bigger recipe would only pay more to learn it.
    """
    return bool(failed_rules) and all(name in policy.escalate_on for name in failed_rules)


def load_update_policy(name_or_path: str = "update") -> tuple[UpdatePolicy, Path]:
    return load_policy(UpdatePolicy, name_or_path)


@dataclass(frozen=True)
class TrainingSet:
    frame: pd.DataFrame
    new_rows: int
    replay_rows: int
    duplicates_dropped: int
    leaked_dropped: int
    fingerprint: str
    pseudo_rows: int = 0  # unlabelled texts trained under the label they were given (origin "pseudo")


def assemble(new: pd.DataFrame, replay_pool: pd.DataFrame, eval_texts: set[str], replay_ratio: float,
             seed: int, per_label: bool = False, pseudo: pd.DataFrame | None = None,
             min_replay: int = 0) -> TrainingSet:
    """New labelled rows plus a label-stratified replay sample, deduplicated and leak-free.

    Any row whose text is in an evaluation set is dropped (leakage guard by
    text hash), so the gate never scores a model on what it was trained on.
    ``pseudo``: unlabelled texts with the label they were given
    (:func:`pseudo_labels`), trained as ``origin == "pseudo"``; they count
    with the new rows when the replay is sized, and never displace one.
    """
    from datasets import Dataset

    new = new[["text", "label"]]
    key = text_keys(new["text"])
    deduped = new[~key.duplicated()]
    duplicates = len(new) - len(deduped)
    leaked = deduped["text"].map(text_hash).isin(eval_texts)
    clean = deduped[~leaked]
    if clean.empty:
        raise RefitError("no labelled examples left after removing duplicates and evaluation texts")

    taken = set(key)
    extra = pseudo[["text", "label"]] if pseudo is not None else new.iloc[:0]
    extra_key = text_keys(extra["text"])
    extra = extra[~extra_key.isin(taken) & ~extra_key.duplicated() & ~extra["text"].map(text_hash).isin(eval_texts)]
    taken |= set(text_keys(extra["text"]))
    pool = replay_pool[["text", "label"]]
    pool = pool[~text_keys(pool["text"]).isin(taken) & ~pool["text"].map(text_hash).isin(eval_texts)]
    size = min(len(pool), max(min_replay, round((len(clean) + len(extra)) * replay_ratio)))
    replay = per_label_sample(pool, size, seed) if per_label else stratified_sample(pool, size, seed)
    frame = pd.concat([clean.assign(origin="new"), extra.assign(origin="pseudo"), replay.assign(origin="replay")],
                      ignore_index=True)
    dataset = Dataset.from_pandas(frame, preserve_index=False)
    return TrainingSet(frame, len(clean), len(replay), duplicates, int(leaked.sum()), dataset._fingerprint,
                       len(extra))


@dataclass(frozen=True)
class UpdateData:
    """What one update trains on and is judged on.

    ``training``: the new rows left after the fresh holdout, plus replay.
    ``sets``: ``fresh`` (the holdout) and ``golden`` (the regression suite).
    ``labels``: the champion's labels plus ``learned``, the new ones this
    update teaches (its head grows by them). ``young``: labels the champion
    knows from a few rows that this update has new rows of; they train as
    new labels do, without growing the head.
    """

    training: TrainingSet
    sets: dict[str, pd.DataFrame]
    eval_texts: set[str]
    labels: list[str]
    learned: list[str]
    train_rows: pd.DataFrame | None = None  # the labelled rows left to train on after the holdout
    seed: int = 0
    pseudo_cost: TrainingCost | None = None  # the pass that gave unlabelled texts their labels
    young: tuple[str, ...] = ()

    @property
    def teaching(self) -> list[str]:
        """The labels this update teaches from a few rows: the new ones, then the young ones."""
        return list(self.learned) + [label for label in self.young if label not in self.learned]

    @property
    def fresh(self) -> pd.DataFrame:
        return self.sets["fresh"]

    def recipe(self, recipe: Recipe, policy: UpdatePolicy) -> Recipe:
        """The rung as this update runs it: a warm rung that teaches new or young labels also distils.

        So does one that teaches a young label. Its head rung also trains at
        least ``new_label_min_steps`` steps: on a few dozen rows five epochs
        are a handful of steps, too few to move a new label's row far, and
        each step costs one cached vector per row.
        """
        if not self.teaching or recipe.start != "warm":
            return recipe
        update: dict = {"distill_weight": max(recipe.distill_weight, policy.new_label_distill_weight)}
        if recipe.frozen_layers == modeling.POLICY_DEPTH and policy.new_label_min_steps:
            per_epoch = math.ceil(len(self.training.frame) / recipe.batch_size)
            update["epochs"] = max(recipe.epochs, math.ceil(policy.new_label_min_steps / per_epoch))
        return recipe.model_copy(update=update)


def prepare_update(new: pd.DataFrame, pool: pd.DataFrame, golden: pd.DataFrame, known_labels: list[str],
                   learned: list[str], policy: UpdatePolicy, source: str, seed: int = 0,
                   judged_too: pd.DataFrame | None = None) -> UpdateData:
    """Hold out the fresh set, then assemble the training set without any evaluation text.

    ``judged_too``: labelled rows an earlier update held out (never trained
    on) that join the fresh set, so the gate judges the gain on them as well;
    a text among them never trains here either.

    Raises:
        RefitError: too few labelled rows, or too few fresh rows to judge on: wait for labels.
    """
    from refit.evalsets import split_fresh

    if len(new) < policy.min_new_examples:
        raise RefitError(f"only {len(new)} labelled examples in {source}; policy needs {policy.min_new_examples}")
    train_rows, fresh = split_fresh(new, policy.fresh_holdout_share, seed)
    if len(fresh) < policy.min_fresh_rows:
        raise RefitError(f"only {len(fresh)} fresh rows held out of {len(new)} labelled examples in {source}; "
                         f"policy needs min_fresh_rows={policy.min_fresh_rows}: wait for more labels")
    if judged_too is not None and len(judged_too):
        earlier = judged_too[~text_keys(judged_too["text"]).isin(set(text_keys(fresh["text"])))]
        fresh = pd.concat([fresh, earlier[[c for c in fresh.columns if c in earlier.columns]]], ignore_index=True)
        train_rows = train_rows[~text_keys(train_rows["text"]).isin(set(text_keys(earlier["text"])))]
    sets = {"fresh": fresh, "golden": golden}
    eval_texts = text_hashes(pd.concat([fresh["text"], golden["text"]]))
    young = young_labels(train_rows, pool, known_labels, policy.young_label_rows)
    teaching = bool(learned) or bool(young)
    replay_ratio = policy.new_label_replay_ratio if teaching else policy.replay_ratio
    training = assemble(train_rows, pool, eval_texts, replay_ratio, seed, per_label=teaching,
                        min_replay=policy.min_replay_rows)
    return UpdateData(training, sets, eval_texts, list(known_labels) + [l for l in learned if l not in known_labels],
                      list(learned), train_rows, seed, young=young)


def young_labels(rows: pd.DataFrame, pool: pd.DataFrame, known_labels: list[str], below: int) -> tuple[str, ...]:
    """Labels of ``rows`` the champion knows from fewer than ``below`` labelled rows of its ``pool``.

    A known label with no row in the pool (an adopted model's) learned
    elsewhere, from rows refit never saw: it is not young.
    """
    if below <= 0 or rows.empty or pool.empty:
        return ()
    counts = pool.drop_duplicates("text")["label"].value_counts()
    known = set(known_labels)
    return tuple(label for label in dict.fromkeys(rows["label"])
                 if label in known and 0 < counts.get(label, 0) < below)


def pseudo_labels(champion_dir: Path, labelled: pd.DataFrame, unlabelled: Sequence[str], learned: Sequence[str],
                  exclude: set[str], margin: float, per_label: int) -> pd.DataFrame:
    """Unlabelled texts given a new label where it is clearly their nearest label (``text``, ``label``, ``margin``).

    Each label's prototype is the mean sentence embedding
    (:func:`refit.modeling.sentence_embeddings`, through the champion's
    encoder) of its rows in ``labelled`` (the update's training rows: new
    labels' labelled rows, the known labels' rows and replay). An unlabelled
    text takes the label of its nearest prototype when that is one of
    ``learned`` and beats the second nearest by ``margin`` in cosine; each
    label keeps its ``per_label`` clearest texts. Texts already labelled or in
    ``exclude`` (hashes of evaluation texts) are never given a label: the
    gate still judges only rows never trained on.
    """
    candidates = pd.Series(list(unlabelled), dtype=object).astype(str)
    keys = text_keys(candidates)
    keep = ~keys.duplicated() & ~keys.isin(set(text_keys(labelled["text"]))) & ~candidates.map(text_hash).isin(exclude)
    candidates = candidates[keep.to_numpy()].reset_index(drop=True)
    wanted = [label for label in dict.fromkeys(learned) if label in set(labelled["label"])]
    empty = pd.DataFrame({"text": pd.Series(dtype=object), "label": pd.Series(dtype=object),
                          "margin": pd.Series(dtype=float)})
    if candidates.empty or not wanted or per_label == 0 or labelled["label"].nunique() < 2:
        return empty
    model, tokenizer = modeling.load_model(champion_dir), modeling.load_tokenizer(champion_dir)
    embedded = modeling.sentence_embeddings(model, tokenizer, labelled["text"].tolist() + candidates.tolist())
    mine, theirs = embedded[: len(labelled)], embedded[len(labelled):]
    names = sorted(set(labelled["label"]))
    at = labelled["label"].to_numpy()
    prototypes = np.stack([mine[at == name].mean(axis=0) for name in names])
    prototypes /= np.maximum(np.linalg.norm(prototypes, axis=1, keepdims=True), 1e-12)
    scores = theirs @ prototypes.T
    order = np.argsort(-scores, axis=1)
    rows = np.arange(len(scores))
    found = pd.DataFrame({"text": candidates, "label": np.array(names, dtype=object)[order[:, 0]],
                          "margin": scores[rows, order[:, 0]] - scores[rows, order[:, 1]]})
    found = found[found["label"].isin(wanted) & (found["margin"] >= margin)]
    found = found.sort_values("margin", ascending=False, kind="stable").groupby("label", sort=False).head(per_label)
    return found.reset_index(drop=True) if len(found) else empty


def add_pseudo_labels(data: UpdateData, pool: pd.DataFrame, champion_dir: Path, unlabelled: Sequence[str],
                      policy: UpdatePolicy, rates: Rates) -> UpdateData:
    """``data`` with unlabelled texts of the update's traffic trained under the new or young labels they clearly are.

    Only in an update that teaches new or young labels
    (``UpdateData.teaching``), and only where the policy sets
    ``pseudo_label_margin``: such a label with a few labelled rows then trains
    on the texts nearest to them as well (:func:`pseudo_labels`). The replay
    grows with them. The pass is metered: ``pseudo_cost`` is part of the
    update's cost. Fresh and golden texts are never given a label.
    """
    import dataclasses

    import torch

    if (policy.pseudo_label_margin is None or not data.teaching or data.train_rows is None
            or not len(unlabelled)):
        return data
    labelled = data.training.frame[data.training.frame["origin"] != "pseudo"][["text", "label"]]
    with Meter(on_gpu=torch.cuda.is_available()) as meter:
        found = pseudo_labels(champion_dir, labelled, unlabelled, data.teaching, data.eval_texts,
                              policy.pseudo_label_margin, policy.pseudo_labels_per_label)
    cost = TrainingCost.from_meter(meter, rates, len(labelled) + len(unlabelled), 0)
    if found.empty:
        return dataclasses.replace(data, pseudo_cost=cost)
    training = assemble(data.train_rows, pool, data.eval_texts, policy.new_label_replay_ratio, data.seed,
                        min_replay=policy.min_replay_rows,
                        per_label=True, pseudo=found)
    return dataclasses.replace(data, training=training, pseudo_cost=cost)


def full_retrain_frame(pool: pd.DataFrame, training: TrainingSet, eval_texts: set[str]) -> pd.DataFrame:
    """Everything learned so far (the champion's pool plus the new rows), leak-free: a full retrain's data."""
    known = pool[~pool["text"].map(text_hash).isin(eval_texts)][["text", "label"]]
    new = training.frame[training.frame["origin"] == "new"][["text", "label"]]
    return pd.concat([known, new], ignore_index=True)


@dataclass(frozen=True)
class Trained:
    adapter_dir: Path
    cost: TrainingCost
    steps: int
    final_loss: float
    reused_states: int = 0  # training rows whose kept encoder states stood in for the forward pass


def train_adapter(frame: pd.DataFrame, recipe: Recipe, rates: Rates, *, labels: list[str] | None = None,
                  warm_start: Path | None = None, seed: int = 0, on_step=None,
                  base: modeling.BaseRef | None = None, states: EncoderStates | None = None) -> Trained:
    """Train from the champion's adapter (``warm_start``) or a fresh one over ``base``.

    ``base`` defaults to the configured base (``REFIT_BASE_MODEL``); an update
    passes its champion's, so a full retrain of an adopted model starts over
    the adopted checkpoint, with its tokenizer. On a warm start, rows with
    ``origin == "replay"`` are distilled toward the champion's own outputs when
    the recipe gives them a weight. ``states``: the starting encoder's kept
    states (``refit.runtime.encoder_states``); a warm start with every layer frozen
    skips the forward pass of the rows found there (read inside the meter).
    """
    import torch

    tokenizer = modeling.load_tokenizer(warm_start) if warm_start is not None else modeling.load_tokenizer(base=base)
    if warm_start is not None:
        model = modeling.load_model(warm_start, trainable=True)
    else:
        model = modeling.new_model(labels, modeling.LoraSpec(rank=recipe.rank, alpha=recipe.alpha), seed=seed,
                                   base=base)
    label_ids = {label: i for i, label in enumerate(modeling.model_labels(model))}
    unknown = sorted(set(frame["label"]) - set(label_ids))
    if unknown:
        raise RefitError(f"labels unknown to the model: {unknown[:5]}")
    texts, targets = frame["text"].tolist(), frame["label"].map(label_ids).tolist()
    with Meter(on_gpu=torch.cuda.is_available()) as meter:
        if warm_start is not None:
            replay = (frame["origin"] == "replay").tolist() if "origin" in frame.columns else None
            known = (states.lookup(texts) if states is not None and recipe.frozen_layers == modeling.POLICY_DEPTH
                     else None)
            stats = modeling.train_upper(model, tokenizer, texts, targets, frozen_layers=recipe.frozen_layers,
                                         epochs=recipe.epochs, learning_rate=recipe.learning_rate,
                                         batch_size=recipe.batch_size, seed=seed, distill=replay,
                                         distill_weight=recipe.distill_weight, on_step=on_step, known=known,
                                         return_states=states is not None)
        else:
            stats = modeling.train(model, tokenizer, texts, targets, epochs=recipe.epochs,
                                   learning_rate=recipe.learning_rate, batch_size=recipe.batch_size, seed=seed,
                                   on_step=on_step)
        if states is not None and stats.computed_states:  # the encoder did not change: the cascade reads them
            rows = sorted(stats.computed_states)
            states.keep([texts[i] for i in rows], np.stack([stats.computed_states[i] for i in rows]))
    out = Path(tempfile.mkdtemp(prefix="refit-adapter-"))
    modeling.save_model(model, out)
    return Trained(out, TrainingCost.from_meter(meter, rates, stats.examples_seen, stats.tokens_seen),
                   stats.steps, stats.final_loss, stats.reused_states)


def count_tokens(texts: list[str], tokenizer=None) -> int:
    """Tokens the model would see for ``texts`` (truncated as in training)."""
    tokenizer = tokenizer or modeling.load_tokenizer()
    return sum(len(ids) for ids in tokenizer(texts, truncation=True, max_length=modeling.MAX_LENGTH)["input_ids"])


def _progress_logger(label: str):
    """Log training progress at every tenth of the run through Prefect's logger."""
    import logging

    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        logger = get_run_logger()
    except MissingContextError:  # called as a plain function, outside a flow
        logger = logging.getLogger(__name__)
    marks: set[int] = set()

    def on_step(step: int, total: int, loss: float) -> None:
        tenth = step * 10 // total
        if tenth not in marks:
            marks.add(tenth)
            logger.info("%s: step %d/%d (%d%%), loss %.3f", label, step, total, tenth * 10, loss)

    return on_step


@task(name="fine-tune", cache_policy=NO_CACHE)
def fine_tune(frame: pd.DataFrame, recipe: Recipe, rates: Rates, labels: list[str] | None = None,
              warm_start: Path | None = None, seed: int = 0, base: modeling.BaseRef | None = None,
              states: EncoderStates | None = None) -> Trained:
    return train_adapter(frame, recipe, rates, labels=labels, warm_start=warm_start, seed=seed,
                         on_step=_progress_logger("fine-tune"), base=base, states=states)
