"""The default step-size controller: diffrax's PID controller with Gustafsson's predictive
correction after accepted steps.

It imports nothing from the rest of the package.
"""

from __future__ import annotations

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp


class PredictiveController(dfx.AbstractAdaptiveStepSizeController):
    """`diffrax.PIDController` whose proposal after an accepted step is also bounded by the
    trend of the last two accepted steps (Gustafsson's predictive controller; Hairer & Wanner,
    *Solving ODEs II*, §IV.8, (8.21), as in RADAU5): after accepted steps n − 1 and n with
    scaled errors e_{n−1}, e_n, the next step is the PID proposal times

        min(1, (h_n / h_{n−1}) · (e_{n−1} / e_n)^{1/k})      (k: the solver's error order).

    Why: where the local error grows along the solution faster than one step's worth (a
    small-init flow leaving a saddle accelerates), a plain controller never proposes a smaller
    step after an accepted one, so every accepted step is followed by a rejected one. Measured
    with `ddln_jax.Auto` on the issue-8 workload (`benchmarks/small_init_bench.py`): 66 → 18
    rejected steps (36 → 30 ms) at n = 100, d = 1000, L = 3, α = 1e-2; 336 → 26 (32 → 18 ms)
    at n = 10, d = 30, L = 4. Where the error changes only as the step does
    (e_n / e_{n−1} ≤ (h_n / h_{n−1})^k), the factor is 1: the PID controller's step.

    `PredictiveController(rtol, atol, **options)`: `options` are `diffrax.PIDController`'s
    (`pcoeff`, `icoeff`, `safety`, `factormin`, `factormax`, `dtmin`, `dtmax`, `norm`, …).
    It is the default of `ddln_jax.simulate` and of the sweep engine.
    """

    pid: dfx.PIDController

    def __init__(self, rtol, atol, **options):
        self.pid = dfx.PIDController(rtol=rtol, atol=atol, **options)

    @property
    def rtol(self):
        return self.pid.rtol

    @property
    def atol(self):
        return self.pid.atol

    @property
    def norm(self):
        return self.pid.norm

    def wrap(self, direction):
        return eqx.tree_at(lambda c: c.pid, self, self.pid.wrap(direction))

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        t_next, state = self.pid.init(terms, t0, t1, y0, dt0, args, func, error_order)
        dtype = jnp.result_type(t_next)
        # The last accepted step and its scaled error; h = 0 means none yet.
        return t_next, (state, jnp.zeros((), dtype), jnp.ones((), dtype))

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, state):
        pid_state, h_prev, err_prev = state
        keep, next_t0, next_t1, jump, pid_state, result = self.pid.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, pid_state
        )
        k = error_order if getattr(self.pid, "error_order", None) is None else self.pid.error_order
        h = jax.lax.stop_gradient(t1 - t0)
        err = jax.lax.stop_gradient(self._scaled_error(y0, y1_candidate, y_error))
        have = (h_prev > 0) & (err > 0) & jnp.isfinite(err)
        trend = (h / jnp.where(have, h_prev, 1.0)) * (
            jnp.where(have, err_prev, 1.0) / jnp.where(have, err, 1.0)
        ) ** (1.0 / k)
        factor = jnp.clip(jnp.where(have, trend, 1.0), self.pid.factormin, 1.0)
        # Only after an accepted step; a step the inner controller clipped to a jump stays put.
        factor = jnp.where(keep & ~jnp.asarray(jump), factor, 1.0)
        dt = (next_t1 - next_t0) * factor
        if self.pid.dtmin is not None:
            dt = jnp.maximum(dt, self.pid.dtmin)
        next_t1 = jnp.where(factor < 1, next_t0 + dt, next_t1)
        h_prev = jnp.where(keep, h, h_prev)
        err_prev = jnp.where(keep & (err > 0) & jnp.isfinite(err), err, err_prev)
        return keep, next_t0, next_t1, jump, (pid_state, h_prev, err_prev), result

    def _scaled_error(self, y0, y1, y_error):
        # The PID controller's error measure, norm(e / (atol + rtol·max(|y0|, |y1|))). Computed
        # again here (one norm per step) rather than read from diffrax's private state layout.
        def scale(a, b, e):
            b = jnp.where(jnp.isnan(b).any(), a, b)
            return e / (self.pid.atol + self.pid.rtol * jnp.maximum(jnp.abs(a), jnp.abs(b)))

        return self.pid.norm(jax.tree_util.tree_map(scale, y0, y1, y_error))
