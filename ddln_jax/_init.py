"""Initialization schemes for the layers, and the check of Assumption A.

One network's layers are an array `u` of shape `(L, d)`; θ = u[0] ⊙ … ⊙ u[L-1].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._validate import _short, as_float_array, check_traced, is_tracer, positive_int, real_scalar


def _check_dims(L, d):
    return positive_int("L", L), positive_int("d", d)


def gaussian_init(key, L: int, d: int, alpha: float, *, dtype=None) -> Float[Array, "L d"]:
    """Layers with independent N(0, α²) entries.

    **Arguments:**

    - `key`: a `jax.random` key.
    - `L`, `d`: depth and width.
    - `alpha`: the scale α > 0.
    - `dtype`: floating dtype (default: JAX's default float, float64 under x64).

    **Returns:** an array of shape `(L, d)`.
    """
    L, d = _check_dims(L, d)
    dtype = dtype or jnp.result_type(float)
    alpha = real_scalar("alpha", alpha, dtype, positive=True)
    return alpha * jax.random.normal(key, (L, d), dtype=dtype)


def balanced_init(L: int, d: int, alpha: float, *, dtype=None) -> Float[Array, "L d"]:
    """Every layer equal to α (violates Assumption A when L ≥ 2: all layers tie)."""
    L, d = _check_dims(L, d)
    dtype = dtype or jnp.result_type(float)
    alpha = real_scalar("alpha", alpha, dtype, positive=True)
    return jnp.full((L, d), 1.0, dtype=dtype) * alpha


def zero_first_init(L: int, d: int, alpha: float, *, dtype=None) -> Float[Array, "L d"]:
    """u¹ = 0 and u^j = α for j ≥ 2, so θ0 = 0 and δ_j = α² (docs/math.md, "Mirror flow and potential")."""
    L, d = _check_dims(L, d)
    dtype = dtype or jnp.result_type(float)
    alpha = real_scalar("alpha", alpha, dtype, positive=True)
    u = jnp.full((L, d), 1.0, dtype=dtype) * alpha
    return u.at[0].set(0.0)


def layered_init(scales, d: int, *, key=None, dtype=None) -> Float[Array, "L d"]:
    """Per-layer scales: u^j = scales[j] (constant rows), or scales[j]·N(0, 1) with a key.

    **Arguments:**

    - `scales`: sequence of L positive layer scales (L = len(scales)).
    - `d`: width.
    - `key`: optional `jax.random` key; without it every row is constant.

    **Returns:** an array of shape `(L, d)`.
    """
    scales = as_float_array("scales", scales, ndim=1)
    if scales.shape[0] < 1:
        raise ValueError("`scales` must hold at least one layer scale, got an empty sequence")
    scales = check_traced(
        scales, jnp.any(scales <= 0),
        f"`scales` must be > 0, got {_short(scales) if is_tracer(scales) else np.asarray(scales).tolist()}",
    )
    d = positive_int("d", d)
    dtype = dtype or scales.dtype
    scales = scales.astype(dtype)
    if key is None:
        return jnp.broadcast_to(scales[:, None], (scales.shape[0], d))
    return scales[:, None] * jax.random.normal(key, (scales.shape[0], d), dtype=dtype)


# The named schemes of a sweep spec (`[init] scheme = ...`), next to their definitions.
INIT_SCHEMES = {
    "gaussian": gaussian_init,
    "zero_first": zero_first_init,
    "balanced": balanced_init,
}


def check_init(u0, name: str = "u0", *, batch: bool = False) -> Float[Array, "*B L d"]:
    """Validate layers: shape (L, d) (or (B, L, d) with `batch`) with L, d ≥ 1 (B ≥ 1), finite."""
    u0 = as_float_array(name, u0, ndim=(2, 3) if batch else 2)
    what = "(L, d) or (B, L, d)" if batch else "(L, d)"
    if u0.shape[-2] < 1:
        raise ValueError(f"`{name}` must have L ≥ 1 layers (shape {what}), got shape {u0.shape}")
    if u0.shape[-1] < 1:
        raise ValueError(f"`{name}` must have d ≥ 1 coordinates, got shape {u0.shape}")
    if u0.ndim == 3 and u0.shape[0] < 1:
        raise ValueError(f"`{name}` must hold at least one init (shape (B, L, d)), got shape {u0.shape}")
    return u0


def smallest_gap(u0) -> Float[Array, "*B d"]:
    """Per coordinate, the gap between the two smallest u^j_i² (+inf for L = 1); batched."""
    xp = jnp if is_tracer(u0) else np  # NumPy on concrete values, also inside a trace
    if u0.shape[-2] == 1:
        return xp.full(u0.shape[:-2] + u0.shape[-1:], np.inf, u0.dtype)
    sq = xp.sort(xp.asarray(u0) ** 2, axis=-2)
    return sq[..., 1, :] - sq[..., 0, :]


def require_assumption_a(u0, name: str, why: str):
    """`u0` unchanged, or a clear error when some coordinate's smallest layer is tied (or its
    gap underflows to a subnormal number, where the geometry loses all precision)."""
    gap = smallest_gap(u0)
    tiny = jnp.finfo(u0.dtype).tiny
    bad = gap < tiny
    if is_tracer(bad):
        return check_traced(u0, jnp.any(bad), f"`{name}` violates Assumption A, which {why} needs")
    bad = np.asarray(bad)
    if bad.any():
        where = np.argwhere(bad)[:10]
        at = [tuple(int(i) for i in w) for w in where]
        raise ValueError(
            f"`{name}` violates Assumption A (the smallest |u^j_i| is tied, or the gap between the "
            f"two smallest is below {tiny:.1e}, at {'(init, coordinate)' if bad.ndim == 2 else 'coordinates'} "
            f"{at}), which {why} needs: the mirror potential Q is not defined on ℝ there. Use "
            "formulation='layer' or 'reduced', or perturb the init."
        )
    return u0


@dataclasses.dataclass(frozen=True)
class AssumptionA:
    """Result of [`ddln_jax.check_assumption_a`][].

    - `holds`: whether every coordinate has a unique smallest layer.
    - `tied`: indices of the coordinates where the smallest |u^j_i| is attained twice or more.
    - `min_gap`: per coordinate, the smallest δ_{j,i} = u^j_i² − u^m_i² over j ≠ m (0 at a tie;
      +inf when L = 1).
    """

    holds: bool
    tied: np.ndarray
    min_gap: np.ndarray

    def __repr__(self):
        if self.holds:
            return f"AssumptionA(holds=True, min gap={float(np.min(self.min_gap)):.3g})"
        return f"AssumptionA(holds=False, tied coordinates={self.tied.tolist()})"


def check_assumption_a(u0, *, rtol: float = 0.0) -> AssumptionA:
    """Check Assumption A: in each coordinate the smallest |u^j_i(0)| is attained once.

    **Arguments:**

    - `u0`: layers, shape `(L, d)`.
    - `rtol`: count a coordinate as tied when its smallest gap δ is ≤ rtol·max_j u^j_i²
      (default 0: exact ties only).

    **Returns:** an [`ddln_jax.AssumptionA`][] report.
    """
    u0 = np.asarray(check_init(u0))
    L, d = u0.shape
    if L == 1:
        return AssumptionA(True, np.zeros(0, dtype=int), np.full(d, np.inf))
    gap = np.asarray(smallest_gap(u0))
    tied = np.flatnonzero(gap <= rtol * np.max(u0**2, axis=0))
    return AssumptionA(bool(tied.size == 0), tied, gap)
