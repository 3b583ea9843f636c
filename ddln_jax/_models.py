"""Models: the product network θ = ∏_j u^j and the signed network θ = θ⁺ − θ⁻ (docs/math.md, "Signed models").

A model says what the layers are (their shape), how θ is made from them, and which
formulations of the gradient flow exist. The signed model θ = ∏_j u^{+j} − ∏_j u^{−j} is the
model of most of the literature (Woodworth et al. 2020: w₊^L − w₋^L; Vaskevicius et al.,
Pesme et al., Even et al.: u⊙u − v⊙v; Azulay et al.: u⁺⊙v⁺ − u⁻⊙v⁻). Its layers are an
array of shape `(2, L, d)`, index 0 being the + half. It is the product model on 2d
coordinates with design [X, −X], so each half keeps its own conserved gaps and geometry, and
θ follows a mirror flow on ℝ^d with R*(η) = Q⁺*(η) + Q⁻*(c − η) (see `SignedGeometry`).

With tied layers (one vector w± per half raised to the power L) the trajectory is that of L
untied equal layers with time scaled by L (ẇ = −L w^{L−1}∇f against u̇ = −u^{L−1}∇f): a
tied model takes inits with equal layers in each half and runs the untied flow L times faster.

| formulation | state | θ from the state |
|---|---|---|
| `SignedLayerFlow` | u, shape (2, L, d) | ∏_j u^{+j} − ∏_j u^{−j} |
| `SignedReducedFlow` | (w⁺, w⁻), shape (2, d) | ψ⁺(w⁺) − ψ⁻(w⁻) |
| `SignedMirrorFlow` | θ, shape (d,) | θ |
| `SignedDualFlow` | η = ∇R(θ) = ∇Q⁺(θ⁺), shape (d,) | ∇R*(η) |
"""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._flows import AbstractFormulation, as_formulation, layer_products_except
from ._geometry import (
    Geometry,
    SignedGeometry,
    _prod_sqrt,
    check_signed_geometry,
)
from ._implicit_bias import _check_signed_data, _row_space
from ._init import check_init as _check_product_layers
from ._losses import as_loss
from ._small_init import EscapePrediction
from ._validate import as_float_array, is_tracer, positive_int, positive_scalar

# ---------------------------------------------------------------------------------------------
# Formulations of the signed flow. `args = (loss, SignedGeometry)`.


def _scale(form, geom, dy):
    """Tied layers: the untied flow of equal layers, L times faster."""
    return dy * geom.depth if form.tied else dy


class SignedLayerFlow(AbstractFormulation):
    """u̇^{±j} = ∓(∏_{k≠j} u^{±k}) ⊙ ∇f(θ): the ground truth, valid for any init."""

    tied: bool = eqx.field(static=True, default=False)
    name: ClassVar[str] = "layer"
    needs_assumption_a: ClassVar[bool] = False

    def geometry(self, u0) -> SignedGeometry:
        return SignedGeometry(u0, require_assumption_a=False)

    def initial_state(self, geom, u0):
        return jnp.asarray(u0)

    def theta(self, geom, y):
        return jnp.prod(y[0], axis=0) - jnp.prod(y[1], axis=0)

    def reduced(self, geom, y):
        return geom.reduce(y)

    def layers(self, geom, y):
        return y

    def vector_field(self, t, y, args):
        loss, geom = args
        grad = loss.grad(self.theta(geom, y))
        dy = jnp.stack([-layer_products_except(y[0]) * grad[None], layer_products_except(y[1]) * grad[None]])
        return _scale(self, geom, dy)


class SignedReducedFlow(AbstractFormulation):
    """ẇ^± = ∓∏_j √((w^±)² + δ^±_j) · ∇f(ψ⁺(w⁺) − ψ⁻(w⁻)): exact, 2d-dimensional, any init."""

    tied: bool = eqx.field(static=True, default=False)
    name: ClassVar[str] = "reduced"
    needs_assumption_a: ClassVar[bool] = False

    def geometry(self, u0) -> SignedGeometry:
        return SignedGeometry(u0, require_assumption_a=False)

    def initial_state(self, geom, u0):
        return geom.reduce(jnp.asarray(u0))

    def theta(self, geom, y):
        return geom.psi(y)

    def reduced(self, geom, y):
        return y

    def layers(self, geom, y):
        return geom.layers(y)

    def vector_field(self, t, y, args):
        loss, geom = args
        grad = loss.grad(geom.psi(y))
        speed = _prod_sqrt(jnp.concatenate([y[0], y[1]]), geom.halves.delta)
        d = geom.d
        dy = jnp.stack([-speed[:d] * grad, speed[d:] * grad])
        return _scale(self, geom, dy)


class SignedMirrorFlow(AbstractFormulation):
    """θ̇ = −(g⁺(θ⁺) + g⁻(θ⁻)) ⊙ ∇f(θ), θ± from θ by a monotone root find per coordinate."""

    tied: bool = eqx.field(static=True, default=False)
    name: ClassVar[str] = "mirror"
    needs_assumption_a: ClassVar[bool] = True

    def geometry(self, u0) -> SignedGeometry:
        return SignedGeometry(u0)

    def initial_state(self, geom, u0):
        u0 = jnp.asarray(u0)
        return jnp.prod(u0[0], axis=0) - jnp.prod(u0[1], axis=0)

    def theta(self, geom, y):
        return y

    def reduced(self, geom, y):
        return geom.reduced_of_theta(y)

    def layers(self, geom, y):
        return geom.layers(self.reduced(geom, y))

    def vector_field(self, t, y, args):
        loss, geom = args
        return _scale(self, geom, -geom.metric(y) * loss.grad(y))


class SignedDualFlow(AbstractFormulation):
    """η̇ = −∇f(∇R*(η)) for η = ∇R(θ) = ∇Q⁺(θ⁺): d-dimensional, no root find."""

    tied: bool = eqx.field(static=True, default=False)
    name: ClassVar[str] = "dual"
    needs_assumption_a: ClassVar[bool] = True

    def geometry(self, u0) -> SignedGeometry:
        return SignedGeometry(u0)

    def initial_state(self, geom, u0):
        return geom.eta0

    def theta(self, geom, y):
        return geom.grad_R_star(y)

    def reduced(self, geom, y):
        return geom.reduced_of_eta(y)

    def layers(self, geom, y):
        return geom.layers(self.reduced(geom, y))

    def vector_field(self, t, y, args):
        loss, geom = args
        return _scale(self, geom, -loss.grad(geom.grad_R_star(y)))

    def sensitivity(self, geom, y):
        return jnp.abs(y) * geom.metric_eta(y)  # dθ/dη = g⁺ + g⁻


SIGNED_FORMULATIONS: dict[str, type[AbstractFormulation]] = {
    cls.name: cls for cls in (SignedLayerFlow, SignedReducedFlow, SignedMirrorFlow, SignedDualFlow)
}


# ---------------------------------------------------------------------------------------------
# Models.


class AbstractModel(eqx.Module):
    """What the layers are and how θ is made from them."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The model's name in specs and datasets."""

    @abc.abstractmethod
    def check_init(self, u0, name: str = "u0"):
        """Validate concrete layers (one init or a batch); returns a float array."""

    @abc.abstractmethod
    def formulation(self, formulation) -> AbstractFormulation:
        """The formulation instance for `"layer"`, `"reduced"`, `"mirror"` or `"dual"`."""

    @abc.abstractmethod
    def theta(self, u):
        """θ from layers (any leading batch axes)."""

    @abc.abstractmethod
    def time_factor(self, u0) -> int:
        """How much faster than the untied flow of the same layers this model runs (1, or L
        for tied layers)."""


class ProductModel(AbstractModel):
    """θ = u¹ ⊙ … ⊙ u^L; layers of shape `(L, d)` (a batch: `(B, L, d)`)."""

    @property
    def name(self) -> str:
        return "product"

    def check_init(self, u0, name: str = "u0"):
        if not isinstance(u0, jax.Array) and hasattr(u0, "__array__"):
            u0 = np.asarray(u0)
        return _check_product_layers(u0, name, batch=True)

    def formulation(self, formulation) -> AbstractFormulation:
        form = as_formulation(formulation)
        if type(form) in SIGNED_FORMULATIONS.values():
            raise ValueError(f"{type(form).__name__} belongs to the signed model, not the product model")
        return form

    def theta(self, u):
        return jnp.prod(u, axis=-2)

    def time_factor(self, u0) -> int:
        return 1


class SignedModel(AbstractModel):
    """θ = ∏_j u^{+j} − ∏_j u^{−j}; layers of shape `(2, L, d)` (a batch: `(B, 2, L, d)`),
    index 0 the + half.

    **Fields:**

    - `tied`: one vector per half raised to the power L (Woodworth et al.'s w₊^L − w₋^L). The
      init must then have equal layers in each half (L copies of w±(0)); the flow is that of
      the untied equal layers with time scaled by L.
    """

    tied: bool = eqx.field(static=True, default=False)

    @property
    def name(self) -> str:
        return "signed_tied" if self.tied else "signed"

    def check_init(self, u0, name: str = "u0"):
        if not isinstance(u0, jax.Array) and hasattr(u0, "__array__"):
            u0 = np.asarray(u0)
        expected = "(2, L, d) or (B, 2, L, d) (index 0 = the + half)"
        if isinstance(u0, (np.ndarray, jax.Array)) and (np.ndim(u0) not in (3, 4) or np.shape(u0)[-3] != 2):
            raise ValueError(
                f"`{name}` of the {self.name} model must have shape {expected}, got shape "
                f"{tuple(np.shape(u0))}"
            )
        u0 = as_float_array(name, u0, ndim=(3, 4))
        if u0.shape[-3] != 2:
            raise ValueError(f"`{name}` of the {self.name} model must have shape {expected}, got shape {tuple(u0.shape)}")
        if u0.shape[-2] < 1 or u0.shape[-1] < 1 or (u0.ndim == 4 and u0.shape[0] < 1):
            raise ValueError(f"`{name}` must have B, L, d ≥ 1 (shape {expected}), got shape {tuple(u0.shape)}")
        if self.tied and not is_tracer(u0):
            un = np.asarray(u0)
            unequal = np.any(un != un[..., :1, :], axis=-2)
            if np.any(unequal):
                at = [tuple(int(i) for i in w) for w in np.argwhere(unequal)[:10]]
                raise ValueError(
                    f"`{name}` of the tied signed model must have equal layers in each half "
                    f"(L copies of w±(0)); they differ at {'(init, half, coordinate)' if un.ndim == 4 else '(half, coordinate)'} {at}"
                )
        return u0

    def formulation(self, formulation) -> AbstractFormulation:
        if isinstance(formulation, AbstractFormulation):
            if type(formulation) not in SIGNED_FORMULATIONS.values():
                raise ValueError(f"{type(formulation).__name__} is not a formulation of the signed model; use one of {sorted(SIGNED_FORMULATIONS)}")
            if formulation.tied != self.tied:
                raise ValueError(f"the formulation has tied={formulation.tied} but the model tied={self.tied}")
            return formulation
        if isinstance(formulation, str) and formulation in SIGNED_FORMULATIONS:
            return SIGNED_FORMULATIONS[formulation](tied=self.tied)
        raise ValueError(
            f"`formulation` must be one of {sorted(SIGNED_FORMULATIONS)} or a signed formulation "
            f"instance, got {formulation!r}"
        )

    def theta(self, u):
        return jnp.prod(u[..., 0, :, :], axis=-2) - jnp.prod(u[..., 1, :, :], axis=-2)

    def time_factor(self, u0) -> int:
        return int(np.shape(u0)[-2]) if self.tied else 1

    def as_product(self, u0):
        """The equivalent product problem: layers `(L, 2d)` = [+ half | − half] (batched),
        for the design [X, −X]."""
        return jnp.concatenate([u0[..., 0, :, :], u0[..., 1, :, :]], axis=-1)


MODELS = {"product": ProductModel(), "signed": SignedModel(), "signed_tied": SignedModel(tied=True)}


def as_model(model) -> AbstractModel:
    """`"product"`, `"signed"`, `"signed_tied"` or a model instance."""
    if isinstance(model, AbstractModel):
        return model
    if isinstance(model, str) and model in MODELS:
        return MODELS[model]
    raise ValueError(f"`model` must be one of {sorted(MODELS)} or a model instance, got {model!r}")


# ---------------------------------------------------------------------------------------------
# Inits of the signed model, shape (2, L, d).


def _dims(L, d):
    return positive_int("L", L), positive_int("d", d)


def woodworth_init(L: int, d: int, alpha: float, *, dtype=None) -> Float[Array, "2 L d"]:
    """Woodworth et al.'s init w±(0) = α: every layer of both halves equal to α (θ0 = 0).

    Balanced halves: each half lives on a half-line (θ± > 0), and the model's potential is
    Woodworth's Q_α^L (docs/math.md, "Signed models"). Usable with the tied and the untied signed model.

    **Returns:** an array of shape `(2, L, d)`.
    """
    L, d = _dims(L, d)
    alpha = positive_scalar("alpha", alpha)
    return jnp.full((2, L, d), alpha, dtype=dtype or jnp.result_type(float))


def shape_scale_init(L: int, d: int, alpha: float, shape: float = 1.0, *, dtype=None) -> Float[Array, "2 L d"]:
    """Azulay et al.'s shape–scale init, both halves equal (θ0 = 0): u^{±1} = shape·α,
    u^{±j} = α for j ≥ 2.

    For L = 2 this is u⁺ = u⁻ = u₀ = shape·α, v⁺ = v⁻ = v₀ = α: the limit depends on
    u₀² + v₀² = α²(1 + shape²) only (docs/math.md, "Signed models"). `shape = 1` is Woodworth's init. For L ≥ 3,
    shape > 1 ties the L − 1 smallest layers while the first is larger (a partial tie: the
    layer and reduced formulations only); shape < 1 gives every half-coordinate a unique
    smallest layer.

    **Returns:** an array of shape `(2, L, d)`.
    """
    L, d = _dims(L, d)
    alpha = positive_scalar("alpha", alpha)
    shape = positive_scalar("shape", shape)
    u = jnp.full((2, L, d), alpha, dtype=dtype or jnp.result_type(float))
    return u.at[:, 0].multiply(shape)


def signed_gaussian_init(key, L: int, d: int, alpha: float, *, dtype=None) -> Float[Array, "2 L d"]:
    """Both halves with independent N(0, α²) layers.

    **Returns:** an array of shape `(2, L, d)`.
    """
    L, d = _dims(L, d)
    alpha = positive_scalar("alpha", alpha)
    return alpha * jax.random.normal(key, (2, L, d), dtype=dtype or jnp.result_type(float))


# ---------------------------------------------------------------------------------------------
# Where the signed flow ends on least squares, and how long it sits at the saddle.

def signed_small_init_limit(X, y, u0) -> np.ndarray:
    """The α → 0 limit of the signed implicit bias along the ray of inits α·`u0`: a weighted-ℓ1
    minimal interpolator (an LP, solved with HiGHS and polished on its support).

    On 2d half-coordinates k (the product problem on [X, −X]), for L ≥ 3, D_Q(Θ, Θ0) =
    Σ_k w±_k |Θ_k| + O(α^{L−2} relative): w±_k = Φ_k(∞) ∓ ∇Q(Θ0)_k for a unique smallest layer,
    the distance α^{−(L−2)}/(L − 2)-like to the face on the growing side of a half-line (the
    other side is closed: balanced halves keep their sign), so the limit is
    argmin {Σ_k w_k|Θ_k| : [X, −X]Θ = y} mapped to θ = Θ⁺ − Θ⁻. For Woodworth's init (all
    weights equal, halves ≥ 0) this is the minimum-ℓ1 interpolator. For L = 2 every weight is
    log(1/α) + O(1): plain ℓ1 (with the half-lines' sign constraints), approached only
    logarithmically. For L = 1 the flow is θ̇ = −2∇f: the ℓ2 projection of θ0.

    **Arguments:**

    - `X`, `y`: interpolating least-squares data, shapes `(n, d)` and `(n,)`.
    - `u0`: the direction of the ray, shape `(2, L, d)`.

    **Returns:** θ as a float64 NumPy array of shape `(d,)`.
    """
    from scipy.optimize import linprog


    X, y, u0 = _check_signed_data(X, y, u0)
    if u0.ndim != 3:
        raise ValueError(f"`u0` must be one init of shape (2, L, d), got shape {tuple(u0.shape)}")
    check_signed_geometry(u0, "u0", "the small-init limit")
    Xn, yn = np.asarray(X, np.float64), np.asarray(y, np.float64)
    _row_space(Xn, yn)
    n, d = Xn.shape
    L = u0.shape[1]
    U0 = np.concatenate([np.asarray(u0[0]), np.asarray(u0[1])], axis=-1)
    if L == 1:
        theta0 = U0[0, :d] - U0[0, d:]
        return theta0 + np.linalg.lstsq(Xn, yn - Xn @ theta0, rcond=None)[0]
    geom = Geometry(U0)
    tied, frozen = np.asarray(geom.tied), np.asarray(geom.frozen)
    w0 = np.asarray(geom.w0)
    if L == 2:
        wp = np.ones(2 * d)
        wm = np.ones(2 * d)
    else:
        lo, hi = (np.asarray(x, np.float64) for x in geom.eta_bounds)
        eta0 = np.asarray(geom.phi(geom.w0), np.float64)
        wp, wm = hi - eta0, eta0 - lo  # distances to the faces η = ±Φ(∞) (inf: closed side)
    # Closed sides: half-lines keep the sign of w0; frozen coordinates stay at 0.
    up_ok = ~frozen & ~(tied & (w0 < 0))
    down_ok = ~frozen & ~(tied & (w0 > 0))
    scale = np.max(np.concatenate([wp[up_ok], wm[down_ok], [1.0]]))
    cost = np.concatenate([np.where(up_ok, wp, 0.0), np.where(down_ok, wm, 0.0)]) / scale
    bounds = [(0, None if ok else 0) for ok in np.concatenate([up_ok, down_ok])]
    Xd = np.hstack([Xn, -Xn])
    res = linprog(cost, A_eq=np.hstack([Xd, -Xd]), b_eq=yn, bounds=bounds, method="highs",
                  options={"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10})
    if res.status != 0:
        raise RuntimeError(f"HiGHS failed on the weighted-ℓ1 LP of the signed model: {res.message}")
    Theta = res.x[: 2 * d] - res.x[2 * d :]
    support = np.abs(Theta) > 1e-9 * max(np.max(np.abs(Theta)), 1e-300)
    Xs = Xd[:, support]
    if support.any() and np.linalg.matrix_rank(Xs) == support.sum():
        ts, *_ = np.linalg.lstsq(Xs, yn, rcond=None)
        if np.all(np.sign(ts) == np.sign(Theta[support])):
            polished = np.zeros(2 * d)
            polished[support] = ts
            if np.linalg.norm(Xd @ polished - yn) <= np.linalg.norm(Xd @ Theta - yn):
                Theta = polished
    return Theta[:d] - Theta[d:]


def signed_kernel_limit(X, y, u0) -> Float[Array, " d"]:
    """The linearized ("kernel", large-α) limit of the signed flow:
    argmin {Σ_i (θ_i − θ0_i)²/g_i : Xθ = y}, g = g⁺(θ0⁺) + g⁻(θ0⁻), i.e.
    θ0 + G Xᵀ(X G Xᵀ)⁺(y − Xθ0). For inits with θ0 = 0 and uniform g (Woodworth's, the
    shape–scale init) it is the minimum-ℓ2 interpolator, which the flow's limit approaches at
    distance O(α^{−2L}) as α → ∞. Jittable (no checks on traced input).

    **Arguments:** `X`, `y` (shapes `(n, d)`, `(n,)`), `u0` (shape `(2, L, d)`).

    **Returns:** θ, shape `(d,)`.
    """
    if not any(is_tracer(a) for a in (X, y, u0)):
        X, y, u0 = _check_signed_data(X, y, u0)
        if u0.ndim != 3:
            raise ValueError(f"`u0` must be one init of shape (2, L, d), got shape {tuple(u0.shape)}")
    geom = SignedGeometry(u0, require_assumption_a=False)
    h = geom.halves
    G = geom.metric_w(geom._split(h.w0))
    theta0 = geom.theta0()
    K = (X * G[None]) @ X.T
    return theta0 + G * (X.T @ (jnp.linalg.pinv(K, hermitian=True) @ (y - X @ theta0)))


def signed_escape_time(loss, u0):
    """Predicted time a small signed init sits at the saddle before its first coordinate escapes.

    Near the init the gradient is frozen at ∇f(θ0), so η = ∇R(θ) moves as η0 − t∇f(θ0), and θ_i
    stays small until η_i reaches the end of the domain of R* it is driven to (for L ≥ 3 a
    face: the half θ⁺ or θ⁻ that grows blows up there): t_i = (η_max,i − η0_i)/|∂_i f| when
    ∂_i f < 0, (η0_i − η_min,i)/|∂_i f| when ∂_i f > 0. The relative error is O(α^{L−2}).
    For L = 2 the domain is unbounded; a driven half becomes of order one when its ∇Q
    reaches ∇Q(±1): t_i is that distance over |∂_i f| (≈ log(1/α)/|∂_i f| for Woodworth's
    init, with an O(1/log(1/α)) relative error). +inf where ∂_i f(θ0) = 0 or where the
    driven side is closed (a half-line shrinking to 0). Works under `jax.jit`/`jax.vmap`.

    **Arguments:**

    - `loss`: a ddln_jax loss (or a callable f(θ)).
    - `u0`: a small init, shape `(2, L, d)` with L ≥ 2.

    **Returns:** an [`ddln_jax.EscapePrediction`][] (times per coordinate, first, coordinate).
    """

    loss = as_loss(loss)
    if not is_tracer(u0):
        u0 = SignedModel().check_init(u0)
        if u0.ndim != 3:
            raise ValueError(f"`u0` must be one init of shape (2, L, d), got shape {tuple(u0.shape)}")
        if u0.shape[1] < 2:
            raise ValueError("`u0` has L = 1: plain gradient flow, with no saddle at 0 to escape from")
        check_signed_geometry(u0, "u0", "the escape prediction")
    return _escape_jit(loss, u0)


@eqx.filter_jit
def _escape_jit(loss, u0):

    geom = SignedGeometry(u0, require_assumption_a=False)
    d = geom.d
    theta0 = geom.theta0()
    grad = loss.grad(theta0)
    speed = jnp.abs(grad)
    eta0 = geom.eta0
    if u0.shape[1] >= 3:
        lo, hi = geom.eta_bounds
        distance = jnp.where(grad < 0, hi - eta0, eta0 - lo)
    else:
        # L = 2: η where a driven half reaches magnitude 1. θ up (∂f < 0): θ⁺ rises to +1
        # (η = ∇Q⁺(1)) or θ⁻ falls to −1 (η = c − ∇Q⁻(−1)), whichever comes first.
        h = geom.halves
        ones = jnp.ones(2 * d, u0.dtype)
        up, down = h.phi(h.psi_inv(ones)), h.phi(h.psi_inv(-ones))
        eta_up = jnp.minimum(up[:d], geom.c - down[d:])
        eta_dn = jnp.maximum(down[:d], geom.c - up[d:])
        distance = jnp.where(grad < 0, eta_up - eta0, eta0 - eta_dn)
        distance = jnp.where(distance > 0, distance, jnp.nan)
    times = jnp.where(speed > 0, distance / jnp.where(speed > 0, speed, 1.0), jnp.inf)
    k = jnp.argmin(jnp.where(jnp.isnan(times), jnp.inf, times))
    return EscapePrediction(times=times, first=times[k], coordinate=k)


def _sign_of(x):
    return jnp.where(x < 0, -1.0, 1.0).astype(x.dtype)
