"""Losses f(θ): pure, jittable functions of the effective parameter θ.

Each loss is an `eqx.Module` (a pytree), so a batch of problems is a vmapped loss.
The constants the theory needs (`smoothness`, `pl_constant`, `minimum`) are computed on
the host from concrete data, in float64 NumPy/SciPy; they are not traceable.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Scalar

from ._validate import as_float_array, is_tracer


class AbstractLoss(eqx.Module):
    """A convex, differentiable loss f of θ ∈ ℝ^d (abstract: every method is defined by each
    final subclass, as equinox's abstract/final pattern asks)."""

    @abc.abstractmethod
    def __call__(self, theta: Float[Array, " d"]) -> Scalar:
        """f(θ)."""

    @abc.abstractmethod
    def grad(self, theta: Float[Array, " d"]) -> Float[Array, " d"]:
        """∇f(θ)."""

    @property
    @abc.abstractmethod
    def dim(self) -> int | None:
        """Dimension d of θ, when the loss knows it."""

    @abc.abstractmethod
    def smoothness(self) -> float | None:
        """Lipschitz constant of ∇f (None when unknown). Host-side: needs concrete data."""

    @abc.abstractmethod
    def pl_constant(self) -> float | None:
        """μ with ½‖∇f‖² ≥ μ (f − f*) on ℝ^d, or None when f has no such constant. Host-side."""

    @abc.abstractmethod
    def minimum(self) -> float | None:
        """f* = inf f (None when unknown). Host-side."""


def _check_data(X, y):
    X = as_float_array("X", X, ndim=2)
    y = as_float_array("y", y, ndim=1)
    if X.shape[0] != y.shape[0]:
        raise ValueError(
            f"`X` and `y` must have the same number of rows, got X of shape {X.shape} and "
            f"y of shape {y.shape}"
        )
    if X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"`X` must have at least one row and one column, got shape {X.shape}")
    return X, y


def _concrete(*arrays):
    if any(is_tracer(a) for a in arrays):
        raise TypeError("this method needs concrete data; call it outside `jax.jit`/`jax.vmap`")
    return [np.asarray(a, dtype=np.float64) for a in arrays]


class LeastSquares(AbstractLoss):
    """f(θ) = (1/2n)‖Xθ − y‖².

    **Arguments:**

    - `X`: design matrix, shape `(n, d)`.
    - `y`: targets, shape `(n,)`.
    """

    X: Float[Array, "n d"]
    y: Float[Array, " n"]

    def __init__(self, X, y):
        self.X, self.y = _check_data(X, y)

    def __call__(self, theta):
        r = self.X @ theta - self.y
        return 0.5 * jnp.mean(r**2)

    def grad(self, theta):
        # r @ X, not X.T @ r: XLA on a CPU copies Xᵀ for a transposed matrix-vector product
        # (2.5 times slower at 100 × 1000). Here and in every Xᵀ· of the solvers.
        return (self.X @ theta - self.y) @ self.X / self.X.shape[0]

    @property
    def dim(self):
        return self.X.shape[1]

    def smoothness(self):
        (X,) = _concrete(self.X)
        return float(np.linalg.norm(X, 2) ** 2 / X.shape[0])

    def pl_constant(self):
        """Smallest positive eigenvalue of XᵀX/n (= λ_min(XXᵀ/n) when rank X = n)."""
        (X,) = _concrete(self.X)
        s = np.linalg.svd(X, compute_uv=False)
        s = s[s > s[0] * max(X.shape) * np.finfo(np.float64).eps]
        return float(s[-1] ** 2 / X.shape[0])

    def minimum(self):
        X, y = _concrete(self.X, self.y)
        sol, *_ = np.linalg.lstsq(X, y, rcond=None)
        return float(0.5 * np.mean((X @ sol - y) ** 2))

    def interpolates(self, rtol: float = 1e-10) -> bool:
        """Whether some θ fits the data exactly (y ∈ range X)."""
        X, y = _concrete(self.X, self.y)
        sol, *_ = np.linalg.lstsq(X, y, rcond=None)
        return bool(np.linalg.norm(X @ sol - y) <= rtol * max(np.linalg.norm(y), 1.0))


class Logistic(AbstractLoss):
    """f(θ) = (1/n) Σ_i log(1 + exp(−y_i ⟨x_i, θ⟩)), labels y_i ∈ {−1, +1}.

    **Arguments:**

    - `X`: features, shape `(n, d)`.
    - `y`: labels in {−1, +1}, shape `(n,)`.
    """

    X: Float[Array, "n d"]
    y: Float[Array, " n"]

    def __init__(self, X, y):
        X, y = _check_data(X, y)
        if not is_tracer(y) and not np.all(np.abs(np.asarray(y)) == 1):
            bad = np.unique(np.asarray(y)[np.abs(np.asarray(y)) != 1])
            raise ValueError(f"`y` must hold labels in {{-1, +1}}, got values {bad[:5].tolist()}")
        self.X, self.y = X, y

    def __call__(self, theta):
        return jnp.mean(jnp.logaddexp(0.0, -self.y * (self.X @ theta)))

    def grad(self, theta):
        margin = self.y * (self.X @ theta)
        return -(self.y * jax.nn.sigmoid(-margin)) @ self.X / self.X.shape[0]

    @property
    def dim(self):
        return self.X.shape[1]

    def smoothness(self):
        (X,) = _concrete(self.X)
        return float(np.linalg.norm(X, 2) ** 2 / (4 * X.shape[0]))

    def pl_constant(self):
        """None: the logistic loss has no global PL constant."""
        return None

    def separable(self) -> bool:
        """Whether some θ has y_i⟨x_i, θ⟩ > 0 for every i (then inf f = 0, not attained)."""
        from scipy.optimize import linprog

        X, y = _concrete(self.X, self.y)
        A = -(y[:, None] * X)
        res = linprog(
            np.zeros(X.shape[1]), A_ub=A, b_ub=-np.ones(len(y)), bounds=(None, None),
            method="highs",
        )
        return res.status == 0

    def minimum(self):
        """0 (an infimum) for separable data, otherwise the attained minimum (Newton)."""
        if self.separable():
            return 0.0
        from scipy.optimize import minimize

        X, y = _concrete(self.X, self.y)
        n = len(y)

        def fun(t):
            m = y * (X @ t)
            return np.mean(np.logaddexp(0.0, -m))

        def jac(t):
            m = y * (X @ t)
            return -X.T @ (y / (1 + np.exp(m))) / n

        def hess(t):
            m = y * (X @ t)
            s = 1 / (1 + np.exp(-m))
            return (X.T * (s * (1 - s))) @ X / n

        res = minimize(fun, np.zeros(X.shape[1]), jac=jac, hess=hess, method="trust-exact",
                       options={"gtol": 1e-12})
        return float(res.fun)


class CallableLoss(AbstractLoss):
    """Any user function f(θ) → scalar; gradients by `jax.grad`.

    **Arguments:**

    - `fn`: a jittable function of θ, shape `(d,)`, returning a scalar. It may be an
      `eqx.Module` holding arrays: they stay leaves of the pytree (traced, differentiable).
    - `dim`: optional d, checked against the layers.
    """

    fn: Callable
    _dim: int | None = eqx.field(static=True, default=None)

    def __call__(self, theta):
        return self.fn(theta)

    def grad(self, theta):
        return jax.grad(self.fn)(theta)

    @property
    def dim(self):
        return self._dim

    def smoothness(self):
        return None

    def pl_constant(self):
        return None

    def minimum(self):
        return None


def as_loss(loss) -> AbstractLoss:
    """Accept a loss module or a plain callable f(θ)."""
    if isinstance(loss, AbstractLoss):
        return loss
    if callable(loss):
        return CallableLoss(loss)
    raise TypeError(
        f"`loss` must be a ddln_jax loss (LeastSquares, Logistic, ...) or a callable f(θ), "
        f"got {type(loss).__name__}"
    )


def is_concrete(*trees) -> bool:
    """Whether no array in `trees` is traced (host-side checks and constants are possible)."""
    return not any(is_tracer(x) for x in jax.tree_util.tree_leaves(trees))


def check_loss_at(loss: AbstractLoss, theta0) -> None:
    """Check, without compiling, that the loss maps θ of shape (d,) to a real scalar."""
    d = theta0.shape[0]
    if loss.dim is not None and loss.dim != d:
        raise ValueError(
            f"`loss` expects θ of dimension {loss.dim}, but `u0` has d = {d} coordinates"
        )
    try:
        out = jax.eval_shape(loss, jax.ShapeDtypeStruct(theta0.shape, theta0.dtype))
    except Exception as e:
        raise TypeError(f"`loss` failed on θ of shape ({d},): {e}") from e
    if not hasattr(out, "shape") or out.shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(
            f"`loss` must return a real scalar for θ of shape ({d},), got "
            f"{getattr(out, 'shape', out)} {getattr(out, 'dtype', '')}"
        )
