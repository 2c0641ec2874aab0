"""Which texts a label request picks (``tasks.label_requests.choose``), on planted embeddings: no encoder, no store."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from refit.errors import RefitError
from refit.policy import load_yaml_model
from tasks.label_requests import REQUEST_COLUMNS, LabelPolicy, allocate, choose, cluster_count, kmeans, \
    load_label_policy

DIM = 48


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def around(direction: np.ndarray, n: int, rng, spread: float = 0.25) -> np.ndarray:
    return unit(direction + spread * rng.standard_normal((n, DIM)) / np.sqrt(DIM))


@pytest.fixture
def planted():
    """Four familiar topics (in the reference, answered confidently) and one new topic the model is unsure of."""
    rng = np.random.default_rng(7)
    axes = np.eye(DIM)
    reference = np.vstack([around(axes[t], 60, rng) for t in range(4)])
    familiar = np.vstack([around(axes[t], 50, rng) for t in range(4)])
    new = around(axes[10], 30, rng)
    rows = pd.DataFrame({
        "request_id": [f"old-{i}" for i in range(len(familiar))] + [f"new-{i}" for i in range(len(new))],
        "text": [f"familiar text {i}" for i in range(len(familiar))] + [f"new text {i}" for i in range(len(new))],
        "predicted_label": "balance",
        "confidence": np.r_[rng.uniform(0.6, 0.99, len(familiar)), rng.uniform(0.2, 0.5, len(new))]})
    return rows, np.vstack([familiar, new]), reference


def test_new_unsure_clusters_are_numbered_first_listed_first_and_get_more_than_an_even_share(planted):
    rows, vectors, reference = planted
    choice = choose(rows, vectors, reference, budget=25, seed=0)
    picks = choice.picks
    assert list(picks.columns) == REQUEST_COLUMNS
    assert len(picks) == 25 and picks["request_id"].is_unique
    clusters = choice.clusters
    new = clusters[clusters["new"]]
    assert len(new) >= 1 and list(new["cluster"]) == list(range(len(new)))  # numbered first
    # the new clusters hold the planted topic (a familiar outlier may join one), and their texts open the list
    from_new = picks[picks["cluster"].isin(new["cluster"])]
    assert from_new["request_id"].str.startswith("new-").mean() >= 0.9
    assert picks["request_id"].head(5).str.startswith("new-").all()
    assert list(picks.index[picks["cluster"].isin(new["cluster"])]) == list(range(len(from_new)))
    # 30 of 230 candidates (13%), yet over a fifth of the budget: unsure and unlike the reference
    assert len(from_new) > 25 / 5
    # spread: every cluster got a text, and within a cluster the least confident come first
    assert (clusters["picked"] >= 1).all() and clusters["picked"].sum() == 25
    for _, group in picks.groupby("cluster"):
        assert group["confidence"].is_monotonic_increasing
    assert picks["cluster"].is_monotonic_increasing


def test_a_new_cluster_gives_a_first_example_of_each_of_its_parts():
    """Three new intents close together: whichever clusters they fall in, each gets a text before any gets two."""
    rng = np.random.default_rng(11)
    axes = np.eye(DIM)
    reference = np.vstack([around(axes[t], 60, rng) for t in range(4)])
    familiar = np.vstack([around(axes[t], 40, rng) for t in range(4)])
    base = axes[20] + axes[21]
    intents = [around(base + 0.9 * axes[30 + i], 25, rng, spread=0.15) for i in range(3)]
    vectors = np.vstack([familiar, *intents])
    owner = ["familiar"] * len(familiar) + [f"intent-{i}" for i in range(3) for _ in range(25)]
    unsure = np.concatenate([rng.uniform(0.20 + 0.1 * i, 0.25 + 0.1 * i, 25) for i in range(3)])  # intent-0 least
    rows = pd.DataFrame({"request_id": [f"r{i:03d}" for i in range(len(vectors))],
                         "text": [f"t{i}" for i in range(len(vectors))], "predicted_label": "balance",
                         "confidence": np.r_[rng.uniform(0.7, 0.99, len(familiar)), unsure]})
    choice = choose(rows, vectors, reference, budget=8, seed=0)
    picked = [owner[int(r[1:])] for r in choice.picks["request_id"]]
    assert {f"intent-{i}" for i in range(3)} <= set(picked)


def test_without_a_reference_uncertainty_still_leads(planted):
    rows, vectors, _ = planted
    choice = choose(rows, vectors, None, budget=25, seed=0)
    assert not choice.clusters["new"].any() and len(choice.picks) == 25
    unsure = choice.clusters.sort_values("uncertainty").iloc[-1]
    members = choice.picks[choice.picks["cluster"] == unsure["cluster"]]
    assert members["request_id"].str.startswith("new-").all() and unsure["picked"] == choice.clusters["picked"].max()


def test_a_budget_past_the_candidates_takes_them_all_once(planted):
    rows, vectors, reference = planted
    choice = choose(rows.head(7), vectors[:7], reference, budget=50)
    assert sorted(choice.picks["request_id"]) == sorted(rows.head(7)["request_id"])


def test_the_same_seed_picks_the_same_texts(planted):
    rows, vectors, reference = planted
    first, again = (choose(rows, vectors, reference, budget=16, seed=3).picks for _ in range(2))
    pd.testing.assert_frame_equal(first, again)


def test_kmeans_finds_planted_groups_and_never_leaves_one_empty():
    rng = np.random.default_rng(0)
    axes = np.eye(DIM)
    vectors = np.vstack([around(axes[t], 40, rng, spread=0.1) for t in range(3)])
    assign = kmeans(vectors, 3, seed=0)
    groups = [set(assign[i * 40:(i + 1) * 40]) for i in range(3)]
    assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 3
    assert sorted(set(kmeans(vectors[:2], 5))) == [0, 1]  # more clusters than rows: one row each


@pytest.mark.parametrize(("weights", "sizes", "budget", "expected"), [
    ([1.0, 1.0, 1.0], [10, 10, 10], 2, [1, 1, 0]),      # fewer texts than clusters: the first clusters, one each
    ([8.0, 1.0, 1.0], [10, 10, 10], 12, [10, 1, 1]),    # one each, then by weight
    ([3.0, 2.0, 2.0], [10, 10, 10], 5, [2, 2, 1]),
    ([8.0, 1.0, 1.0], [3, 10, 10], 12, [3, 5, 4]),      # a cluster's share is capped at its size
    ([1.0, 1.0], [2, 3], 40, [2, 3]),                   # a budget past every candidate
])
def test_allocate(weights, sizes, budget, expected):
    assert allocate(np.array(weights), np.array(sizes), budget).tolist() == expected


def test_k_is_half_the_budget():
    assert [cluster_count(b, 1000) for b in (1, 4, 10, 50, 200, 10_000)] == [2, 2, 5, 25, 64, 64]
    assert cluster_count(50, 3) == 3 and cluster_count(50, 1) == 1


def test_the_label_price_is_a_strict_policy(tmp_path):
    policy, path = load_label_policy()
    assert path.name == "labels.yaml" and 0 < policy.label_usd < 1
    (tmp_path / "typo.yaml").write_text("label_usd: 0.05\nlabel_used: 1\n")
    with pytest.raises(RefitError, match="label_used"):
        load_yaml_model(LabelPolicy, tmp_path / "typo.yaml")
    (tmp_path / "negative.yaml").write_text("label_usd: -0.01\n")
    with pytest.raises(RefitError, match="label_usd"):
        load_yaml_model(LabelPolicy, tmp_path / "negative.yaml")
