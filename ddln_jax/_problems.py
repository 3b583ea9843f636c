"""Problem generators for sweeps: planted sparse regression, logistic, or user data."""

from __future__ import annotations

import dataclasses

import numpy as np

from ._losses import AbstractLoss, LeastSquares, Logistic


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem draw: data, the planted θ*, and the loss built from them."""

    X: np.ndarray
    y: np.ndarray
    theta_star: np.ndarray  # planted solution (NaN for user data)
    theta_min: np.ndarray  # a minimizer of f (NaN where f has none, as separable logistic)
    kind: str

    def loss(self) -> AbstractLoss:
        return Logistic(self.X, self.y) if self.kind == "logistic" else LeastSquares(self.X, self.y)


def sparse_theta(rng, d, sparsity):
    theta = np.zeros(d)
    idx = rng.choice(d, size=sparsity, replace=False)
    theta[idx] = rng.uniform(1.0, 2.0, size=sparsity) * rng.choice([-1.0, 1.0], size=sparsity)
    return theta


def make_problem(spec, seed: int) -> Problem:
    """Draw problem `seed` of a `ProblemSpec` (NumPy, deterministic in the seed).

    Sparse regression: X has N(0, 1) entries, θ* has `sparsity` nonzeros of magnitude in
    [1, 2] with random signs, y = Xθ* + noise·N(0, 1). Logistic: y = sign(Xθ* + noise·N(0, 1)).
    """
    if spec.kind == "data":
        with np.load(spec.path) as z:
            X, y = np.asarray(z["X"], np.float64), np.asarray(z["y"], np.float64)
        nan = np.full(X.shape[1], np.nan)
        sol = np.linalg.lstsq(X, y, rcond=None)[0]
        return Problem(X, y, nan, sol, "data")
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(spec.n, spec.d))
    theta = sparse_theta(rng, spec.d, spec.sparsity)
    noise = spec.noise * rng.normal(size=spec.n)
    if spec.kind == "logistic":
        y = np.where(X @ theta + noise >= 0, 1.0, -1.0)
        return Problem(X, y, theta, np.full(spec.d, np.nan), "logistic")
    y = X @ theta + noise
    # θ* minimizes f when there is no noise; otherwise take the minimum-norm minimizer.
    theta_min = theta if spec.noise == 0 else np.linalg.lstsq(X, y, rcond=None)[0]
    return Problem(X, y, theta, theta_min, "sparse_regression")
