"""Problem generators for sweeps: planted sparse regression, logistic, user data, or a loss
given in memory (`kind = "custom"`). Host-side NumPy, deterministic in the seed."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from ._losses import AbstractLoss, LeastSquares, Logistic

# The problem kinds of a sweep spec (`[problem] kind`), defined below.
PROBLEM_KINDS = ("sparse_regression", "logistic", "data", "custom")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem draw: data, the planted θ*, and the loss built from them.

    `X`, `y` are None for a custom loss that holds no data matrix.
    """

    X: np.ndarray | None
    y: np.ndarray | None
    theta_star: np.ndarray  # planted solution (NaN for user data)
    theta_min: np.ndarray  # a minimizer of f (NaN where f has none or it is unknown)
    kind: str
    custom_loss: AbstractLoss | None = None

    def loss(self) -> AbstractLoss:
        if self.custom_loss is not None:
            return self.custom_loss
        return Logistic(self.X, self.y) if self.kind == "logistic" else LeastSquares(self.X, self.y)

    @property
    def dim(self) -> int:
        return int(self.theta_min.shape[0])


def sparse_theta(rng, d, sparsity):
    theta = np.zeros(d)
    idx = rng.choice(d, size=sparsity, replace=False)
    theta[idx] = rng.uniform(1.0, 2.0, size=sparsity) * rng.choice([-1.0, 1.0], size=sparsity)
    return theta


def load_data(path) -> tuple[np.ndarray, np.ndarray]:
    """X (n, d) and y (n,) from an `.npz` file, checked: real, finite, X not all zero.

    **Raises:** `ValueError` with a one-line reason.
    """
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"cannot read {str(path)!r} ({e})") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{str(path)!r} is not an .npz archive (save X and y with numpy.savez)")
    with z:
        missing = [k for k in ("X", "y") if k not in z.files]
        if missing:
            raise ValueError(f"{str(path)!r} has no array {missing[0]!r} (it holds {z.files})")
        try:
            X, y = np.asarray(z["X"]), np.asarray(z["y"])
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"cannot read X and y from {str(path)!r} ({e})") from e
    for name, a in (("X", X), ("y", y)):
        if np.iscomplexobj(a):
            raise ValueError(f"{name} in {str(path)!r} is complex; the losses are real")
        if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            raise ValueError(f"{name} in {str(path)!r} must hold real numbers, got dtype {a.dtype}")
    X, y = X.astype(np.float64), y.astype(np.float64)
    if X.ndim != 2 or X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"X in {str(path)!r} must have shape (n, d) with n, d ≥ 1, got {X.shape}")
    if y.shape != (X.shape[0],):
        raise ValueError(f"y in {str(path)!r} must have shape ({X.shape[0]},), got {y.shape}")
    if not (np.all(np.isfinite(X)) and np.all(np.isfinite(y))):
        raise ValueError(f"X and y in {str(path)!r} must be finite")
    if not np.any(X):
        raise ValueError(f"X in {str(path)!r} is all zero: the loss would not depend on θ")
    return X, y


def data_digest(X: np.ndarray, y: np.ndarray) -> str:
    """A hash of the data's values and shapes (not of where the file lies)."""
    h = hashlib.sha256()
    for a in (X, y):
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a, np.float64).tobytes())
    return h.hexdigest()


def make_problem(spec, seed: int, *, loss: AbstractLoss | None = None, d: int | None = None) -> Problem:
    """Draw problem `seed` of a `ProblemSpec` (NumPy, deterministic in the seed).

    Sparse regression: X has N(0, 1) entries, θ* has `sparsity` nonzeros of magnitude in
    [1, 2] with random signs, y = Xθ* + noise·N(0, 1). Logistic: y = sign(Xθ* + noise·N(0, 1)).
    Data: X and y from the `.npz` file. Custom: the given `loss` (dimension `d`).
    """
    if spec.kind == "custom":
        return custom_problem(loss, d)
    if spec.kind == "data":
        X, y = load_data(spec.path)
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


def custom_problem(loss: AbstractLoss, d: int) -> Problem:
    """A problem around a loss given in memory: its data (if it has `X` and `y`), and for least
    squares the minimum-norm minimizer (the comparison point of D_Q)."""
    X = getattr(loss, "X", None)
    y = getattr(loss, "y", None)
    X = None if X is None else np.asarray(X, np.float64)
    y = None if y is None else np.asarray(y, np.float64)
    nan = np.full(d, np.nan)
    theta_min = nan
    if isinstance(loss, LeastSquares):
        theta_min = np.linalg.lstsq(X, y, rcond=None)[0]
    return Problem(X, y, nan, theta_min, "custom", custom_loss=loss)
