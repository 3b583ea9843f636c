"""Models: the product network θ = ∏_j u^j and the signed network θ = θ⁺ − θ⁻ (MATH.md §8).

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

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._flows import AbstractFormulation, as_formulation, layer_products_except
from ._geometry import Geometry, SignedGeometry, _prod_sqrt, geometry_problems, _problem_message
from ._init import check_init as _check_product_layers
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
        dy = jnp.stack([-layer_products_except(y[0]) * grad, layer_products_except(y[1]) * grad])
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


SIGNED_FORMULATIONS: dict[str, type[AbstractFormulation]] = {
    cls.name: cls for cls in (SignedLayerFlow, SignedReducedFlow, SignedMirrorFlow, SignedDualFlow)
}


# ---------------------------------------------------------------------------------------------
# Models.


class AbstractModel(eqx.Module):
    """What the layers are and how θ is made from them."""

    @property
    def name(self) -> str:
        raise NotImplementedError

    def check_init(self, u0, name: str = "u0"):
        """Validate concrete layers (one init or a batch); returns a float array."""
        raise NotImplementedError

    def formulation(self, formulation) -> AbstractFormulation:
        """The formulation instance for `"layer"`, `"reduced"`, `"mirror"` or `"dual"`."""
        raise NotImplementedError

    def theta(self, u):
        """θ from layers (any leading batch axes)."""
        raise NotImplementedError

    def time_factor(self, u0) -> int:
        """How much faster than the untied flow of the same layers this model runs (1, or L
        for tied layers)."""
        return 1


class ProductModel(AbstractModel):
    """θ = u¹ ⊙ … ⊙ u^L; layers of shape `(L, d)` (a batch: `(B, L, d)`)."""

    @property
    def name(self) -> str:
        return "product"

    def check_init(self, u0, name: str = "u0"):
        if not isinstance(u0, jax.Array) and hasattr(u0, "__array__"):
            u0 = np.asarray(u0)
        u0 = as_float_array(name, u0, ndim=(2, 3))
        for i, ui in enumerate(u0 if u0.ndim == 3 else [u0]):
            _check_product_layers(ui, f"{name}[{i}]" if u0.ndim == 3 else name)
        if u0.ndim == 3 and u0.shape[0] < 1:
            raise ValueError(f"`{name}` must hold at least one init, got shape {u0.shape}")
        return u0

    def formulation(self, formulation) -> AbstractFormulation:
        form = as_formulation(formulation)
        if type(form) in SIGNED_FORMULATIONS.values():
            raise ValueError(f"{type(form).__name__} belongs to the signed model, not the product model")
        return form

    def theta(self, u):
        return jnp.prod(u, axis=-2)


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
    Woodworth's Q_α^L (MATH.md §8). Usable with the tied and the untied signed model.

    **Returns:** an array of shape `(2, L, d)`.
    """
    L, d = _dims(L, d)
    alpha = positive_scalar("alpha", alpha)
    return jnp.full((2, L, d), alpha, dtype=dtype or jnp.result_type(float))


def shape_scale_init(L: int, d: int, alpha: float, shape: float = 1.0, *, dtype=None) -> Float[Array, "2 L d"]:
    """Azulay et al.'s shape–scale init, both halves equal (θ0 = 0): u^{±1} = shape·α,
    u^{±j} = α for j ≥ 2.

    For L = 2 this is u⁺ = u⁻ = u₀ = shape·α, v⁺ = v⁻ = v₀ = α: the limit depends on
    u₀² + v₀² = α²(1 + shape²) only (MATH.md §8). `shape = 1` is Woodworth's init. For L ≥ 3,
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


def check_signed_geometry(u0, name: str = "u0", why: str = "the mirror geometry"):
    """`u0` (shape `(2, L, d)` or `(B, 2, L, d)`) unchanged, or a clear `ValueError` when a
    half-coordinate has no computable potential (see [`ddln_jax.geometry_problems`][])."""
    un = np.asarray(u0)
    for i, ui in enumerate(un if un.ndim == 4 else [un]):
        stacked = np.concatenate([ui[0], ui[1]], axis=-1)
        problems = geometry_problems(stacked)
        if problems:
            d = ui.shape[-1]
            problems = {k: np.unique(v % d) for k, v in problems.items()}
            label = f"{name}[{i}]" if un.ndim == 4 else name
            raise ValueError(_problem_message(label, problems) + f" ({why} needs it)")
    return u0
