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


def _objective(features, targets, c, labels, coef, intercept) -> float:
    logits = np.asarray(features @ coef.T, dtype=np.float64) + intercept
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return 0.5 * float((coef.astype(np.float64) ** 2).sum()) - c * float((targets[:, labels] * log_p).sum())


def test_lbfgs_solves_a_quadratic_as_quasi_newton_does():
    """A strictly convex quadratic in 30 dimensions: L-BFGS reaches its minimum in a few dozen steps, where
    steepest descent (or a broken two-loop recursion) is still far off."""
    from refit.distill import lbfgs

    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(30, 30)))[0]
    a = basis @ np.diag(np.geomspace(1.0, 300.0, 30)) @ basis.T
    b = rng.normal(size=30)
    solution = lbfgs(lambda x: (0.5 * x @ a @ x - b @ x, a @ x - b), np.zeros(30), max_steps=80, gtol=1e-9, ftol=0.0)
    np.testing.assert_allclose(solution, np.linalg.solve(a, b), atol=1e-4)


def test_forty_steps_reach_at_least_the_objective_of_scipys_l_bfgs_b():
    from scipy.optimize import minimize

    features, teacher = _problem(seed=3, rows=600, dims=300, labels=12)
    targets = soft_targets(teacher, top_k=3)
    c = 20.0
    labels, coef, intercept = fit_soft_logistic(features, targets, c, max_steps=40, tol=0.0)
    ours = _objective(features, targets, c, labels, coef, intercept)

    dims, k = features.shape[1], len(labels)

    def scipy_objective(theta):
        w, b0 = theta[: dims * k].reshape(k, dims), theta[dims * k :]
        logits = np.asarray(features @ w.T) + b0
        logits -= logits.max(axis=1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        d = np.exp(log_p) * targets[:, labels].sum(axis=1, keepdims=True) - targets[:, labels]
        value = 0.5 * float((w ** 2).sum()) - c * float((targets[:, labels] * log_p).sum())
        return value, np.concatenate([(c * np.asarray(features.T @ d).T + w).ravel(), c * d.sum(axis=0)])

    theirs = minimize(scipy_objective, np.zeros(dims * k + k), jac=True, method="L-BFGS-B",
                      options={"maxiter": 40, "maxfun": 80}).fun
    start = _objective(features, targets, c, labels, np.zeros_like(coef), np.zeros_like(intercept))
    assert ours <= theirs + 1e-3 * (start - theirs), (ours, theirs, start)


def test_a_dense_block_is_the_same_fit_as_its_columns_after_the_sparse_ones():
    from scipy.sparse import hstack

    features, teacher = _problem(seed=4, rows=200, dims=40, labels=4)
    dense = np.random.default_rng(4).normal(size=(200, 6)).astype(np.float32)
    targets = soft_targets(teacher, 3)
    split = fit_soft_logistic(features, targets, c=5.0, dense=dense)
    stacked = fit_soft_logistic(hstack([features, csr_matrix(dense)], format="csr"), targets, c=5.0)
    assert split[1].shape == (4, 46)
    for ours, theirs in zip(split, stacked):
        np.testing.assert_allclose(ours, theirs, atol=1e-4)
