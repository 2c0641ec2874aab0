"""refit.distill: the soft-target logistic regression is sklearn's weighted one, on one row per text."""

from __future__ import annotations

import numpy as np
from scipy.sparse import csr_matrix

from refit.distill import fit_soft_logistic, soft_targets


def _problem(seed: int = 0, rows: int = 120, dims: int = 30, labels: int = 5):
    rng = np.random.default_rng(seed)
    dense = rng.random((rows, dims)) * (rng.random((rows, dims)) < 0.2)
    logits = dense @ rng.normal(size=(dims, labels)) * 3
    teacher = np.exp(logits - logits.max(axis=1, keepdims=True))
    return csr_matrix(dense), teacher / teacher.sum(axis=1, keepdims=True)


def test_soft_targets_keep_each_rows_top_labels_above_the_floor():
    teacher = np.array([[0.5, 0.3, 0.15, 0.05], [0.9995, 0.0004, 0.0001, 0.0]])
    cut = soft_targets(teacher, top_k=2)
    assert cut.tolist() == [[0.5, 0.3, 0.0, 0.0], [0.9995, 0.0, 0.0, 0.0]]


def test_the_fit_is_sklearns_logistic_regression_on_rows_repeated_per_label():
    from sklearn.linear_model import LogisticRegression

    features, teacher = _problem()
    targets = soft_targets(teacher, top_k=3)
    labels, coef, intercept = fit_soft_logistic(features, targets, c=5.0, max_steps=500, tol=1e-10)
    rows, columns = np.nonzero(targets)
    reference = LogisticRegression(C=5.0, max_iter=2000, tol=1e-8).fit(
        features[rows], columns, sample_weight=targets[rows, columns])
    assert labels.tolist() == reference.classes_.tolist()
    ours = np.asarray(features @ coef.T) + intercept
    theirs = reference.decision_function(features)
    probabilities = [np.exp(z - z.max(axis=1, keepdims=True)) for z in (ours, theirs)]
    ours, theirs = (p / p.sum(axis=1, keepdims=True) for p in probabilities)
    assert np.abs(ours - theirs).max() < 1e-3


def test_a_label_no_row_targets_is_left_out():
    features, teacher = _problem(seed=1, labels=4)
    teacher[:, 2] = 0.0
    labels, coef, intercept = fit_soft_logistic(features, teacher, c=1.0, max_steps=20)
    assert labels.tolist() == [0, 1, 3] and coef.shape == (3, features.shape[1]) and intercept.shape == (3,)


def test_the_student_agrees_with_its_teacher_after_the_default_steps():
    features, teacher = _problem(seed=2, rows=400)
    labels, coef, intercept = fit_soft_logistic(features, soft_targets(teacher, 3), c=20.0)
    predicted = labels[(np.asarray(features @ coef.T) + intercept).argmax(axis=1)]
    assert np.mean(predicted == teacher.argmax(axis=1)) > 0.9
