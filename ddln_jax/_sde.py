"""The stochastic gradient flow of minibatch SGD on the layers (least squares), with diffrax.

SGD with step η and minibatch size b on F(u) = f(∏_j u^j) takes u_{k+1} = u_k − η ∇F_B(u_k),
whose noise ∇F_B − ∇F has mean 0 and covariance J(u)ᵀ Σ(θ) J(u), J the Jacobian of θ(u) and
Σ(θ) = Cov(∇f_B(θ)). Its first-order diffusion model (Li, Tai and E, 2017) is the Itô SDE

    du = −∇F(u) dt + √η · J(u)ᵀ Σ(θ)^{1/2} dW,

on the time axis t = kη. For least squares, ∇f_i(θ) = x_i r_i with r = Xθ − y, and

    Σ = c²/b · [ (1/n) Xᵀ diag(r²) X − ∇f ∇fᵀ ] = M Mᵀ,  M = c/√(b n) · Xᵀ diag(r) (I − 11ᵀ/n),

an n × n-driven square root (I − 11ᵀ/n is a projection), with c² = 1 for rows drawn with
replacement and c² = (n − b)/(n − 1) for b distinct rows. So W is n-dimensional, simulated by
`diffrax.VirtualBrownianTree`, and the diffusion is a matrix-free `lineax` operator.
"""

from __future__ import annotations

import functools
import math
import numbers

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

from ._discrete import Training, _check_key, _others, layer_grad
from ._init import check_init
from ._losses import LeastSquares
from ._solution import NONFINITE, SUCCESS, status_item
from ._validate import _short, as_float_array, positive_int, positive_scalar

__all__ = ["sgd_sde", "sgd_noise_factor"]


def sgd_noise_factor(n: int, batch_size: int, replace: bool = True) -> float:
    """c²/b: the covariance of a minibatch mean of b of n per-sample gradients is (c²/b)·Cov_i
    with c² = 1 (rows with replacement) or (n − b)/(n − 1) (distinct rows)."""
    if replace:
        return 1.0 / batch_size
    return (n - batch_size) / ((n - 1) * batch_size) if n > 1 else 0.0


class _Diffusion(eqx.Module):
    loss: LeastSquares
    scale: float

    def __call__(self, t, u, args):
        # u: (P, L, d) paths; the Brownian increment z: (P, n).
        X, y = self.loss.X, self.loss.y
        r = jnp.prod(u, axis=-2) @ X.T - y[None]  # (P, n)
        P = jax.vmap(_others)(u)
        scale = self.scale

        def mv(z):
            # J(u)ᵀ M z: the projection removes the mean gradient from the per-sample ones.
            v = (r * (z - jnp.mean(z, axis=-1, keepdims=True))) @ X  # (P, d)
            return P * (scale * v)[:, None, :]

        return lx.FunctionLinearOperator(
            mv, jax.ShapeDtypeStruct((u.shape[0], y.shape[0]), y.dtype)
        )


def _batched_loss(loss, u):
    return jnp.sum(jax.vmap(loss)(jnp.prod(u, axis=-2).reshape(-1, u.shape[-1])))


@functools.partial(jax.jit, static_argnames=("solver", "num_steps"))
def _sde_compiled(loss, u0, key, ts, dt, scale, *, solver, num_steps):
    """All paths and inits in one solve: state (*batch, L, d), Brownian motion (*batch, n).

    One tree of that shape is bisected once per evaluation for every path, where a vmap
    over per-path trees would run a batched while loop per path (measured ~10× slower).
    """
    n = loss.y.shape[0]
    t1 = ts[-1]
    batch = u0.shape[:-2]
    flat = u0.reshape(-1, *u0.shape[-2:])
    bm = dfx.VirtualBrownianTree(0.0, t1, tol=dt / 2, shape=(flat.shape[0], n), key=key)
    grad = jax.vmap(lambda u: -layer_grad(loss, u))
    diffusion = _Diffusion(loss, scale)
    terms = dfx.MultiTerm(
        dfx.ODETerm(lambda t, u, args: grad(u)),
        dfx.ControlTerm(diffusion, bm),
    )
    sol = dfx.diffeqsolve(
        terms, solver, 0.0, t1, dt, flat, saveat=dfx.SaveAt(ts=ts),
        stepsize_controller=dfx.ConstantStepSize(), max_steps=num_steps, throw=False,
    )
    us = jnp.moveaxis(sol.ys, 0, 1)  # (P, n_save, L, d)
    finite = jnp.all(jnp.isfinite(us), axis=(-2, -1))
    ok = (sol.result == dfx.RESULTS.successful) & finite[:, -1]
    us = jnp.where(finite[..., None, None], us, jnp.nan)
    thetas = jnp.prod(us, axis=-2)
    losses = jax.vmap(jax.vmap(loss))(thetas)
    m = jnp.argmin(flat**2, axis=-2)  # (P, d)
    sq = us**2
    sq_m = jnp.take_along_axis(sq, m[:, None, None, :], axis=-2)
    gaps = sq - sq_m
    # The last finite save is the end of a path that blew up.
    last = jnp.max(jnp.where(finite, jnp.arange(ts.shape[0]), 0), axis=1)
    u_final = us[jnp.arange(us.shape[0]), last]
    t_final = ts[last]
    status = jnp.where(ok, SUCCESS, NONFINITE).astype(jnp.int32)
    out = (thetas, losses, gaps, us, u_final, t_final, status)
    return jax.tree_util.tree_map(lambda x: x.reshape(*batch, *x.shape[1:]), out)


def sgd_sde(
    loss: LeastSquares,
    u0,
    *,
    learning_rate: float,
    batch_size: int,
    t1: float,
    key,
    num_paths: int | None = None,
    ts=None,
    replace: bool = True,
    dt: float | None = None,
    solver: dfx.AbstractSolver | None = None,
    save=(),
) -> Training:
    """Integrate the stochastic gradient flow that models minibatch SGD on the layers.

    **Arguments:**

    - `loss`: a [`ddln_jax.LeastSquares`][] (its rows are the samples).
    - `u0`: the layers at t = 0, shape `(L, d)` or `(B, L, d)`.
    - `learning_rate`: the SGD step η it models (the noise scales with √η).
    - `batch_size`: the SGD minibatch size b, in [1, n].
    - `t1`: final time (t = kη is SGD's step k).
    - `key`: a PRNG key for the Brownian motion.
    - `num_paths`: number of independent Brownian paths (a leading path axis); `None`: one.
    - `ts`: save times in [0, t1], increasing (default 101 evenly spaced).
    - `replace`: the sampling modelled: rows with replacement (`True`) or b distinct rows.
    - `dt`: the constant step (default η/4).
    - `solver`: a diffrax SDE solver (default `diffrax.Euler()`, Euler–Maruyama, Itô);
      `diffrax.ItoMilstein()` also fits (Itô).
    - `save`: `("u",)` keeps the layers at the save times.

    **Returns:** a [`ddln_jax.Training`][] with axes (path, init) when batched; `step` holds
    the save times in SGD steps, round(t/η); `status` is `nonfinite` where the path blew up.
    """
    if not isinstance(loss, LeastSquares):
        raise TypeError(f"`loss` must be a ddln_jax.LeastSquares (the SDE's noise is that of "
                        f"least-squares minibatches), got {type(loss).__name__}")
    u0 = as_float_array("u0", u0, ndim=(2, 3))
    for i, ui in enumerate(u0 if u0.ndim == 3 else [u0]):
        check_init(ui, f"u0[{i}]" if u0.ndim == 3 else "u0")
    if u0.shape[-1] != loss.dim:
        raise ValueError(f"`loss` expects θ of dimension {loss.dim}, but `u0` has d = "
                         f"{u0.shape[-1]} coordinates")
    eta = positive_scalar("learning_rate", learning_rate)
    t1 = positive_scalar("t1", t1)
    n = loss.X.shape[0]
    if isinstance(batch_size, bool) or not isinstance(batch_size, (numbers.Integral, np.integer)):
        raise TypeError(f"`batch_size` must be an integer, got {_short(batch_size)}")
    if not 1 <= int(batch_size) <= n:
        raise ValueError(f"`batch_size` must be an integer in [1, n = {n}] (the number of "
                         f"samples), got {int(batch_size)}")
    if key is None:
        raise ValueError("`key` is required: it drives the Brownian motion")
    keys, batched_key = _check_key(key)
    if batched_key:
        raise ValueError(f"`key` must be one PRNG key (use `num_paths` for many paths), got a "
                         f"batch of shape {keys.shape}")
    if num_paths is not None:
        num_paths = positive_int("num_paths", num_paths)
    ts = np.linspace(0.0, t1, 101) if ts is None else np.asarray(ts, np.float64)
    if ts.ndim != 1 or ts.size < 1 or np.any(np.diff(ts) <= 0) or ts[0] < 0 or ts[-1] > t1 * (
            1 + 1e-12):
        raise ValueError(f"`ts` must be increasing times in [0, t1 = {t1}], got {_short(ts)}")
    dt = eta / 4 if dt is None else positive_scalar("dt", dt)
    solver = dfx.Euler() if solver is None else solver
    if not isinstance(solver, dfx.AbstractSolver):
        raise TypeError(f"`solver` must be a diffrax solver, got {_short(solver)}")
    num_steps = math.ceil(ts[-1] / dt) + 16
    scale = math.sqrt(eta * sgd_noise_factor(n, int(batch_size), replace) / n)
    u_all = u0 if num_paths is None else jnp.broadcast_to(u0, (num_paths, *u0.shape))
    thetas, losses, gaps, us, u_final, t_final, status = _sde_compiled(
        loss, u_all, keys, jnp.asarray(ts, u0.dtype), jnp.asarray(dt, u0.dtype), scale,
        solver=solver, num_steps=num_steps,
    )
    batch = status.shape
    save = (save,) if isinstance(save, str) else tuple(save)
    return Training(
        ts=jnp.broadcast_to(jnp.asarray(ts, u0.dtype), (*batch, len(ts))),
        step=jnp.asarray(np.rint(ts / eta).astype(np.int64)),
        theta=thetas, loss=losses, conserved=gaps,
        t_final=t_final, theta_final=jnp.prod(u_final, axis=-2),
        loss_final=jax.vmap(loss)(jnp.prod(u_final, axis=-2).reshape(-1, u0.shape[-1])).reshape(
            batch),
        u_final=u_final, status=status_item(status),
        diverged_step=jnp.where(status == SUCCESS, -1, jnp.rint(t_final / eta)).astype(int),
        learning_rate=jnp.full(batch, eta, u0.dtype),
        u=us if "u" in save else None,
        method=f"SGD SDE (b = {int(batch_size)}, {type(solver).__name__})",
    )
