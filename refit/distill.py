"""Distillation into a linear model: multinomial logistic regression on a teacher's probabilities.

One row per text, its target the teacher's distribution (cut to its top
labels). The objective is sklearn's ``LogisticRegression`` with
``sample_weight`` on each text repeated once per target label: the same
optimum. But each step multiplies the features once instead of once per
label, in float32, and the solver is a plain L-BFGS (``lbfgs``), without
the bound handling of L-BFGS-B, which costs more than the objective on a
student's million parameters. Measurements: docs/cascade.md.
"""

from __future__ import annotations

import numpy as np

MAX_STEPS = 40
# Stop earlier once the gradient is this small, per unit of the objective's weight (c x target mass): sklearn's
# LogisticRegression stops at tol=1e-4 on the gradient of its objective, which is ours divided by that weight.
GTOL = 1e-4
LINE_SEARCH_TRIES = 20  # step halvings before a direction is given up


def soft_targets(teacher: np.ndarray, top_k: int, floor: float = 1e-3) -> np.ndarray:
    """The teacher's probabilities cut to each row's ``top_k`` labels; probabilities at or below ``floor`` dropped."""
    teacher = np.asarray(teacher, dtype=np.float64)
    if top_k < teacher.shape[1]:
        cut = -np.partition(-teacher, top_k - 1, axis=1)[:, top_k - 1 : top_k]
        teacher = np.where(teacher >= cut, teacher, 0.0)
    return np.where(teacher > floor, teacher, 0.0)


def fit_soft_logistic(features, targets: np.ndarray, c: float, max_steps: int = MAX_STEPS, tol: float = GTOL,
                      dense: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit ``softmax(features @ coef.T + intercept)`` to ``targets`` (rows: texts, columns: labels).

    Minimises ``0.5 * |coef|^2 + c * sum_i sum_k targets[i, k] * -log p_k(x_i)``
    (the intercept is not penalised) by L-BFGS, for at most ``max_steps``
    steps or until no gradient entry exceeds ``tol`` times ``c`` times the
    targets' total mass. Labels no row targets are left out of the fit.
    ``dense`` (rows x columns): more features, kept as a dense block (a
    product with BLAS, not a sparse matrix of full rows); its columns follow
    the sparse ones in ``coef``.

    Returns ``(labels, coef, intercept)``: the column indices fitted, and
    their weights (``len(labels)`` x features) and intercepts.
    """
    targets = np.asarray(targets)
    labels = np.flatnonzero(targets.sum(axis=0) > 0)
    width = features.shape[1] + (0 if dense is None else dense.shape[1])
    if features.shape[0] == 0 or len(labels) == 0:
        return labels, np.zeros((len(labels), width), dtype=np.float32), np.zeros(len(labels), np.float32)
    p = targets[:, labels].astype(np.float32)
    x = features.astype(np.float32).tocsr()
    xt = x.T.tocsr()
    d = np.zeros((x.shape[0], 0), np.float32) if dense is None else np.ascontiguousarray(dense, dtype=np.float32)
    dims, k, weights = x.shape[1], len(labels), width * len(labels)
    mass = p.sum(axis=1, keepdims=True)

    def loss_and_gradient(theta: np.ndarray) -> tuple[float, np.ndarray]:
        coef = theta[:weights].astype(np.float32).reshape(width, k)
        logits = np.asarray(x @ coef[:dims]) + d @ coef[dims:] + theta[weights:].astype(np.float32)
        logits -= logits.max(axis=1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        loss = -float((p * log_p).sum(dtype=np.float64))
        d_logits = np.exp(log_p) * mass - p
        grad_coef = np.concatenate([np.asarray(xt @ d_logits), d.T @ d_logits]).astype(np.float64).ravel()
        gradient = np.concatenate([c * grad_coef + theta[:weights], c * d_logits.sum(axis=0, dtype=np.float64)])
        return c * loss + 0.5 * float(theta[:weights] @ theta[:weights]), gradient

    theta = lbfgs(loss_and_gradient, np.zeros(weights + k), max_steps, gtol=tol * c * float(mass.sum()))
    coef = theta[:weights].reshape(width, k).T.astype(np.float32)
    return labels, np.ascontiguousarray(coef), theta[weights:].astype(np.float32)


def lbfgs(fun, x0: np.ndarray, max_steps: int, gtol: float, memory: int = 10, ftol: float = 1e-9) -> np.ndarray:
    """Minimise ``fun`` (returns value and gradient) by L-BFGS with a backtracking (Armijo) line search.

    Stops after ``max_steps`` steps, when the gradient's largest entry is at
    most ``gtol``, when a step lowers the value by a relative ``ftol`` or
    less, or when no step along the steepest descent lowers it. The search
    directions are kept in float32: each step is a few passes over the
    parameters.
    """
    x = np.asarray(x0, dtype=np.float64).copy()
    value, gradient = fun(x)
    steps: list[tuple[np.ndarray, np.ndarray, float]] = []  # (s, y, 1 / y.s), oldest first
    for _ in range(max_steps):
        if np.abs(gradient).max() <= gtol:
            break
        found = _line_search(fun, x, value, gradient, steps)
        if found is None and steps:  # the memory's direction failed: once more along the steepest descent
            steps.clear()
            found = _line_search(fun, x, value, gradient, steps)
        if found is None:
            break
        moved, new_value, new_gradient = found
        s, y = (moved - x).astype(np.float32), (new_gradient - gradient).astype(np.float32)
        sy = float(s @ y)
        if sy > 1e-10:
            steps.append((s, y, 1.0 / sy))
            del steps[:-memory]
        done = value - new_value <= ftol * max(abs(value), abs(new_value), 1.0)
        x, value, gradient = moved, new_value, new_gradient
        if done:
            break
    return x


def _line_search(fun, x: np.ndarray, value: float, gradient: np.ndarray, steps: list,
                 tries: int = LINE_SEARCH_TRIES) -> tuple[np.ndarray, float, np.ndarray] | None:
    """A point along the L-BFGS direction that lowers ``value`` enough (Armijo), halving the step; None if none."""
    direction = -_two_loop(gradient.astype(np.float32), steps)
    slope = float(direction @ gradient)
    if slope >= 0:  # not a descent direction: start the memory again
        steps.clear()
        direction, slope = -gradient.astype(np.float32), -float(gradient @ gradient)
    size = 1.0 if steps else min(1.0, 1.0 / float(np.linalg.norm(gradient)))
    for _ in range(tries):
        moved = x + size * direction
        new_value, new_gradient = fun(moved)
        if new_value <= value + 1e-4 * size * slope:
            return moved, new_value, new_gradient
        size *= 0.5
    return None


def _two_loop(gradient: np.ndarray, steps: list[tuple[np.ndarray, np.ndarray, float]]) -> np.ndarray:
    """The inverse-Hessian estimate of the kept steps applied to ``gradient`` (L-BFGS's two-loop recursion)."""
    q = gradient.copy()
    alphas = []
    for s, y, rho in reversed(steps):
        alpha = rho * float(s @ q)
        q -= alpha * y
        alphas.append(alpha)
    if steps:
        s, y, _ = steps[-1]
        q *= float(s @ y) / float(y @ y)
    for (s, y, rho), alpha in zip(steps, reversed(alphas)):
        q += (alpha - rho * float(y @ q)) * s
    return q
