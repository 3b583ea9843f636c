"""Saddle-to-saddle dynamics at depth 2 and small scale (docs/math.md, "Saddle
to saddle"): as α → 0, on the clock t̃ = t/log(1/α), the loss is piecewise constant,
with jumps between saddles; the first jump is at t̃ = 1/‖∇f(0)‖∞ (Pesme & Flammarion 2023).

`rescaled_time` and `predict_first_jump` are JAX computations (jit, vmap, grad);
`detect_saddles` is a host-side reading of a finished run.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Scalar

from ._bounds import _single_run
from ._losses import as_loss
from ._validate import check_traced, is_tracer, positive_scalar


def rescaled_time(ts, alpha) -> Float[Array, "..."]:
    """t̃ = t/log(1/α), the clock on which small-α depth-2 flows jump between saddles.

    Works under `jax.jit`, `jax.vmap` and `jax.grad` (a traced α outside (0, 1) is a runtime
    error of the compiled program).

    **Arguments:**

    - `ts`: times (any shape); `alpha`: the init scale, 0 < α < 1.

    **Returns:** the rescaled times, shape of `ts`.
    """
    if is_tracer(alpha):
        alpha = check_traced(alpha, ~((alpha > 0) & (alpha < 1)),
                             "`alpha` must be in (0, 1) for the rescaled time")
    else:
        alpha = positive_scalar("alpha", alpha)
        if alpha >= 1:
            raise ValueError(f"`alpha` must be in (0, 1) for the rescaled time, got {alpha}")
    return jnp.asarray(ts) / jnp.log(1 / alpha)


def predict_first_jump(loss, theta0=None) -> Scalar:
    """The first jump of the saddle-to-saddle dynamics in rescaled time: 1/‖∇f(θ0)‖∞.

    (Pesme & Flammarion 2023, L = 2, α → 0: the coordinate with the largest |∂_i f(0)| is the
    first to reach log(1/α) in η.) Works under `jax.jit`, `jax.vmap` and `jax.grad` (with
    respect to `theta0` and the loss's data, where the largest |∂_i f| is unique).

    **Arguments:**

    - `loss`: a ddln_jax loss (or a callable f(θ)).
    - `theta0`: where the gradient is taken (default 0, the saddle small inits start near).

    **Returns:** the predicted first jump time t̃₁.
    """
    loss = as_loss(loss)
    if theta0 is None:
        if loss.dim is None:
            raise ValueError("`theta0` is required: the loss does not know its dimension")
        theta0 = jnp.zeros(loss.dim)
    return 1 / jnp.max(jnp.abs(loss.grad(jnp.asarray(theta0))))


class SaddleToSaddle(eqx.Module):
    """Plateaus and jumps of a small-α trajectory ([`ddln_jax.detect_saddles`][]).

    **Fields:**

    - `rescaled_ts`: t̃ = t/log(1/α) at the saves; `rate`: −d log(f − f*)/dt̃ between saves.
    - `plateaus`: (k, 2) array of rescaled intervals where the rate stays below `threshold`;
      `plateau_levels`: f − f* at the middle of each plateau.
    - `jumps`: (m, 2) array of rescaled intervals between plateaus; `jump_times`: where
      log(f − f*) crosses the midpoint of the levels on either side.
    - `first_jump`: `jump_times[0]` (NaN when no jump was seen).
    """

    rescaled_ts: np.ndarray
    rate: np.ndarray
    plateaus: np.ndarray
    plateau_levels: np.ndarray
    jumps: np.ndarray
    jump_times: np.ndarray
    first_jump: float


def detect_saddles(
    trajectory,
    alpha,
    *,
    f_star: float = 0.0,
    threshold: float = 1.0,
    min_length: float = 0.05,
    floor: float = 1e-10,
) -> SaddleToSaddle:
    """Find the plateaus and jumps of a small-initialization trajectory in rescaled time.

    As α → 0 the loss is piecewise constant in t̃ = t/log(1/α): on a plateau its log-rate
    −d log(f − f*)/dt̃ is exponentially small, during a jump it is of order log(1/α). Saves
    where the rate is below `threshold` are plateau, the rest jump; plateaus shorter than
    `min_length` are merged into the surrounding jump. Once f − f* is below `floor`·(f(θ0) − f*)
    the run has converged and is not looked at. Host-side (NumPy on a finished run).

    **Arguments:**

    - `trajectory`: one run of [`ddln_jax.simulate`][] with dense saves in t̃ (a few hundred
      per unit).
    - `alpha`: the init scale, 0 < α < 1.
    - `f_star`: f* (default 0, interpolation).
    - `threshold`, `min_length`, `floor`: detection parameters (rescaled units).

    **Returns:** a [`ddln_jax.SaddleToSaddle`][].
    """
    trajectory = _single_run(trajectory)
    threshold = positive_scalar("threshold", threshold)
    min_length = positive_scalar("min_length", min_length, allow_zero=True)
    tt = np.asarray(rescaled_time(np.asarray(trajectory.ts, np.float64), alpha))
    excess = np.asarray(trajectory.loss, np.float64) - f_star
    ok = np.isfinite(excess) & (excess > floor * excess[0])
    last = int(np.argmin(ok)) if not ok.all() else len(ok)
    tt, excess = tt[:last], excess[:last]
    if tt.size < 3:
        raise ValueError("`trajectory` has fewer than 3 usable saves; save more densely")
    log_e = np.log(excess)
    rate = -np.diff(log_e) / np.diff(tt)
    flat = rate < threshold  # per save interval
    # Runs of flat intervals → plateaus (in save indices [a, b]).
    runs, start = [], None
    for i, f in enumerate(flat):
        if f and start is None:
            start = i
        if not f and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(flat)))
    runs = [r for r in runs if tt[r[1]] - tt[r[0]] >= min_length or r[0] == 0]
    plateaus = np.array([(tt[a], tt[b]) for a, b in runs]).reshape(-1, 2)
    levels = np.array([excess[(a + b) // 2] for a, b in runs])
    jumps, jump_times = [], []
    for (a0, b0), nxt in zip(runs, [*runs[1:], None]):
        a1 = nxt[0] if nxt is not None else len(tt) - 1
        if a1 <= b0:
            continue
        jumps.append((tt[b0], tt[a1]))
        lo = np.log(excess[(nxt[0] + nxt[1]) // 2]) if nxt is not None else log_e[a1]
        mid = 0.5 * (np.log(excess[(a0 + b0) // 2]) + lo)
        seg = np.arange(b0, a1 + 1)
        k = seg[np.argmax(log_e[seg] <= mid)] if np.any(log_e[seg] <= mid) else seg[-1]
        if k > 0 and log_e[k - 1] != log_e[k]:
            frac = (log_e[k - 1] - mid) / (log_e[k - 1] - log_e[k])
            jump_times.append(tt[k - 1] + np.clip(frac, 0, 1) * (tt[k] - tt[k - 1]))
        else:
            jump_times.append(tt[k])
    jump_times = np.array(jump_times)
    return SaddleToSaddle(
        rescaled_ts=tt, rate=rate, plateaus=plateaus, plateau_levels=levels,
        jumps=np.array(jumps).reshape(-1, 2), jump_times=jump_times,
        first_jump=float(jump_times[0]) if jump_times.size else math.nan,
    )

