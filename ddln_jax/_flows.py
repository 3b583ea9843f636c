"""Vector fields of the DDLN gradient flow in four formulations (same θ(t)).

| formulation | state | θ from the state |
|---|---|---|
| `LayerFlow` | u, shape (L, d) | ∏_j u^j |
| `ReducedFlow` | w = σ·u^m, shape (d,) | ψ(w) |
| `MirrorFlow` | θ, shape (d,) | θ |
| `DualFlow` | η = ∇Q(θ), shape (d,) | ∇Q*(η) |

Each is a final `eqx.Module`; `vector_field(t, y, args)` has the `diffrax.ODETerm` signature
with `args = (loss, geometry)`.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp

from ._geometry import Geometry, _prod_sqrt


def layer_products_except(u):
    """∏_{k≠j} u^k for every j, by prefix/suffix products (never θ/u^j: u^j may be 0)."""
    ones = jnp.ones_like(u[:1])
    prefix = jnp.concatenate([ones, jnp.cumprod(u[:-1], axis=0)], axis=0)
    suffix = jnp.concatenate([jnp.cumprod(u[:0:-1], axis=0)[::-1], ones], axis=0)
    return prefix * suffix


class AbstractFormulation(eqx.Module):
    """One way of writing the flow: a state, its θ, its w and its vector field."""

    name: eqx.AbstractClassVar[str]
    needs_assumption_a: eqx.AbstractClassVar[bool]

    def geometry(self, u0) -> Geometry:
        """The geometry object the vector field needs (built once per run from the init; a
        concrete init without a computable potential is refused only where it is needed)."""
        return Geometry(u0, require_assumption_a=self.needs_assumption_a)

    @abc.abstractmethod
    def initial_state(self, geom: Geometry, u0):
        """The state at t = 0 from the layers."""

    @abc.abstractmethod
    def theta(self, geom: Geometry, y):
        """θ from the state."""

    @abc.abstractmethod
    def reduced(self, geom: Geometry, y):
        """The signed smallest layer w from the state."""

    @abc.abstractmethod
    def layers(self, geom: Geometry, y):
        """The layers u from the state."""

    @abc.abstractmethod
    def vector_field(self, t, y, args):
        """dy/dt; `args = (loss, geometry)`."""

    def sensitivity(self, geom: Geometry, y):
        """|y|·|dθ/dy| per coordinate: how far θ moves when the state is rounded (relative
        error eps); None where θ keeps the state's relative precision (layers, w, θ)."""
        return None


class LayerFlow(AbstractFormulation):
    """u̇^j = −(∏_{k≠j} u^k) ⊙ ∇f(θ): the ground truth, valid for any init."""

    name: ClassVar[str] = "layer"
    needs_assumption_a: ClassVar[bool] = False

    def initial_state(self, geom, u0):
        return u0

    def theta(self, geom, y):
        return jnp.prod(y, axis=0)

    def reduced(self, geom, y):
        return geom.reduce(y)

    def layers(self, geom, y):
        return y

    def vector_field(self, t, y, args):
        loss, _ = args
        return -layer_products_except(y) * loss.grad(jnp.prod(y, axis=0))[None]


class ReducedFlow(AbstractFormulation):
    """ẇ = −∏_j √(w² + δ_j) · ∇f(ψ(w)): exact, d-dimensional, valid for any init."""

    name: ClassVar[str] = "reduced"
    needs_assumption_a: ClassVar[bool] = False

    def initial_state(self, geom, u0):
        return geom.reduce(u0)

    def theta(self, geom, y):
        return geom.psi(y)

    def reduced(self, geom, y):
        return y

    def layers(self, geom, y):
        return geom.layers(self.reduced(geom, y))

    def vector_field(self, t, y, args):
        loss, geom = args
        return -_prod_sqrt(y, geom.delta) * loss.grad(geom.psi(y))


class MirrorFlow(AbstractFormulation):
    """θ̇ = −g(θ) ⊙ ∇f(θ), with g from ψ⁻¹ (needs Assumption A)."""

    name: ClassVar[str] = "mirror"
    needs_assumption_a: ClassVar[bool] = True

    def initial_state(self, geom, u0):
        return jnp.prod(u0, axis=0)

    def theta(self, geom, y):
        return y

    def reduced(self, geom, y):
        return geom.psi_inv(y)

    def layers(self, geom, y):
        return geom.layers(self.reduced(geom, y))

    def vector_field(self, t, y, args):
        loss, geom = args
        return -geom.metric(y) * loss.grad(y)


class DualFlow(AbstractFormulation):
    """η̇ = −∇f(∇Q*(η)) for η = ∇Q(θ) (needs Assumption A)."""

    name: ClassVar[str] = "dual"
    needs_assumption_a: ClassVar[bool] = True

    def initial_state(self, geom, u0):
        return geom.phi(geom.reduce(u0))

    def theta(self, geom, y):
        return geom.grad_Q_star(y)

    def reduced(self, geom, y):
        return geom.phi_inv(y)

    def layers(self, geom, y):
        return geom.layers(self.reduced(geom, y))

    def vector_field(self, t, y, args):
        loss, geom = args
        return -loss.grad(geom.grad_Q_star(y))

    def sensitivity(self, geom, y):
        # dθ/dη = g: near a box face |η| ≈ Φ(∞) is huge while θ = O(1).
        return jnp.abs(y) * geom.metric_w(geom.phi_inv(y))


FORMULATIONS: dict[str, type[AbstractFormulation]] = {
    cls.name: cls for cls in (LayerFlow, ReducedFlow, MirrorFlow, DualFlow)
}


def as_formulation(formulation) -> AbstractFormulation:
    if isinstance(formulation, AbstractFormulation):
        return formulation
    if isinstance(formulation, str) and formulation in FORMULATIONS:
        return FORMULATIONS[formulation]()
    raise ValueError(
        f"`formulation` must be one of {sorted(FORMULATIONS)} or a formulation instance, "
        f"got {formulation!r}"
    )
