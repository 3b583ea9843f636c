"""What a run returns: one status type, the `Trajectory`, the non-finite guard, the status
decision and the stop-event root finder, shared by `simulate` and the lane engine.

This is the bottom floor of the package: it imports nothing from the rest of it.
"""

from __future__ import annotations

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from jaxtyping import Array, Float, Int


class Status(eqx.Enumeration):
    """How a run ended (as diffrax's `RESULTS`): `traj.status == Status.success`, `Status[item]`
    gives the message. Stored codes (sweeps, engine buffers) are the items' positions below."""

    success = "reached the final time t1 with the requested accuracy"
    max_steps = "ran out of its step budget (`max_steps`) before the end"
    nonfinite = "the state or the vector field became non-finite"
    event = "stopped where the loss reached the requested threshold (`stop_ratio`)"
    failed = "the solver failed (step size collapsed or a nonlinear solve diverged)"
    inaccurate = "finished, but could not deliver the requested accuracy"


STATUS_NAMES: tuple[str, ...] = (
    "success", "max_steps", "nonfinite", "event", "failed", "inaccurate"
)
SUCCESS, MAX_STEPS, NONFINITE, EVENT, FAILED, INACCURATE = range(len(STATUS_NAMES))


def status_item(codes) -> Status:
    """A `Status` item (of any shape) from integer codes."""
    return eqx.tree_at(lambda s: s._value, Status.success, jnp.asarray(codes, jnp.int32))


def status_codes(status) -> Int[Array, "..."]:
    """Integer codes from a `Status` item (or pass integer codes through)."""
    if hasattr(status, "_value"):  # an eqx.Enumeration item
        return status._value
    return jnp.asarray(status, jnp.int32)


def status_names(status) -> np.ndarray | str:
    """Names of the statuses (a string for one run, an array of strings for a batch)."""
    codes = np.asarray(status_codes(status))
    names = np.asarray(STATUS_NAMES)[codes]
    return str(names) if codes.ndim == 0 else names


def decide_status(*, reached_end, event, max_steps, failed, nonfinite_trials, final_ok,
                  accurate=True):
    """The one status decision of a run, from what the integrator saw (all boolean/int arrays).

    Precedence: a located event, then reaching t1; a run that did neither is max_steps or
    failed, and is put down to a non-finite field when its trial steps met one. A final state
    that is not finite is non-finite whatever ended the run. A run that ended well but whose
    state cannot carry the requested accuracy (`accurate` False, see `carries_accuracy`) is
    inaccurate.
    """
    code = jnp.where(
        event, EVENT,
        jnp.where(reached_end, SUCCESS, jnp.where(max_steps & ~failed, MAX_STEPS, FAILED)),
    )
    ended_badly = (code == MAX_STEPS) | (code == FAILED)
    nonfinite = ~final_ok | (ended_badly & (nonfinite_trials > 0))
    code = jnp.where(~ended_badly & ~jnp.asarray(accurate), INACCURATE, code)
    return jnp.where(nonfinite, NONFINITE, code).astype(jnp.int32)


def carries_accuracy(sensitivity, theta, steps, rtol):
    """Whether the state's representation lets θ carry the requested accuracy (True when the
    formulation's θ keeps the state's relative precision).

    `sensitivity` is |y|·|dθ/dy| per coordinate at the final state (None for formulations whose
    θ keeps the state's relative precision: layers, w, θ). With κ = max sensitivity / ‖θ‖∞,
    the estimate is κ·(1e-3·rtol + steps·eps): the integrator controls y relative to |y|, and
    each step rounds it to eps·|y|. Measured on issue 8's W2 problem (dual formulation, L = 3…5,
    α = 3e-2…1e-3, rtol 1e-8 and 1e-10; benchmarks/results/dual_rounding_cpu.json): the error
    of θ was up to ~1e-3·κ·rtol, plus the rounding part. A run whose estimate exceeds 10·rtol —
    the global error the reduced formulation itself accumulates there at that rtol — is
    reported `inaccurate`: near a box face (L ≥ 3, small inits) |η| ≈ Φ(∞) ∝ α^{−(L−2)}.
    """
    if sensitivity is None:
        return jnp.ones((), bool)
    eps = jnp.finfo(theta.dtype).eps
    scale = jnp.max(jnp.abs(theta))
    kappa = jnp.max(sensitivity) / jnp.where(scale > 0, scale, 1.0)
    return kappa * (1e-3 * rtol + steps * eps) <= 10 * rtol


class _BracketState(eqx.Module):
    lower: jax.Array
    upper: jax.Array
    decreasing: jax.Array
    step: jax.Array
    value: jax.Array


class EventLocator(optx.AbstractRootFinder):
    """Newton's method on a scalar function of time, kept inside the step's bracket
    [lower, upper] (a Newton iterate that leaves the bracket is replaced by bisection).

    The one locator of the loss threshold: diffrax's event in `simulate` and the lane engine
    both use it. It needs no linear solver (lineax's closure conversion fails inside the
    sharded engine), takes the derivative by `jax.jvp`, and stops when the step is below
    `atol + rtol·|t|` or the bracket is that narrow."""

    rtol: float = 1e-12
    atol: float = 1e-14
    norm = staticmethod(jnp.abs)

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        lower = jnp.asarray(options["lower"], f_struct.dtype)
        upper = jnp.asarray(options["upper"], f_struct.dtype)
        f_lo, _ = fn(lower, args)
        f_hi, _ = fn(upper, args)
        inf = jnp.asarray(jnp.inf, f_struct.dtype)
        return _BracketState(lower, upper, f_lo > f_hi, inf, inf)

    def step(self, fn, y, args, options, state, tags):
        (f, aux), (df, _) = jax.jvp(lambda t: fn(t, args), (y,), (jnp.ones_like(y),))
        past = state.decreasing ^ (f > 0)  # y is past the root
        lower = jnp.where(past, state.lower, y)
        upper = jnp.where(past, y, state.upper)
        newton = y - f / df
        inside = jnp.isfinite(newton) & (newton > lower) & (newton < upper)
        new = jnp.where(f == 0, y, jnp.where(inside, newton, 0.5 * (lower + upper)))
        return new, _BracketState(lower, upper, state.decreasing, new - y, f), aux

    def terminate(self, fn, y, args, options, state, tags):
        tol = self.atol + self.rtol * jnp.abs(y)
        done = (jnp.abs(state.step) <= tol) | (state.upper - state.lower <= tol) | (state.value == 0)
        return done, optx.RESULTS.successful

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        return y, aux, {}


def event_root_finder():
    """The root finder that locates the loss threshold inside a step, on both paths."""
    return EventLocator()


# Consecutive non-finite trial steps (each shrinking dt by 5×) before a run is declared
# non-finite: 40 of them shrink the step by ~1e-28, far past any overflow of a too-large step.
NONFINITE_STREAK = 40


def finite_tree(*trees):
    leaves = jax.tree_util.tree_leaves(trees)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def locate_event(interpolation, h, t0, t1):
    """The time in [t0, t1] where the scalar h(t, y(t)) crosses 0, on a step's dense output
    (the procedure diffrax's events use, so both paths locate the threshold alike)."""
    sol = optx.root_find(
        lambda t, _: h(t, interpolation.evaluate(t)),
        event_root_finder(),
        y0=t1,
        options={"lower": t0, "upper": t1},
        throw=False,
    )
    t = jnp.clip(sol.value, t0, t1)
    return t, interpolation.evaluate(t)


SAVEABLE = ("u", "grad_Q", "bregman", "conserved", "grad_integral")


class Trajectory(eqx.Module):
    """The result of [`ddln_jax.simulate`][]. Leading batch axes, if any, come first, on every
    array field (so `traj[k]` is run k, and a vmapped and an engine batch look the same).

    **Fields:**

    - `ts`: save times, shape `(*batch, n)`.
    - `theta`: θ(t), `(*batch, n, d)`; `loss`: f(θ(t)), `(*batch, n)`.
    - `u`: layers u(t), `(*batch, n, L, d)`; `grad_Q`: ∇Q(θ(t)); `bregman`: D_Q(θ*, θ(t));
      `conserved`: u^j(t)² − u^m(t)²; `grad_integral`: ∫₀ᵗ ∇f(θ(s)) ds. Each is `None` unless
      asked for in `save=`.
    - `t_final`, `theta_final`, `loss_final`: the end of the run (t1, or the located time of
      the loss threshold when the run stopped there).
    - `status`: a [`ddln_jax.Status`][] (compare with `Status.success`, ...).
    - `num_steps`, `num_accepted_steps`, `num_rejected_steps`: int32 solver statistics.
    - `stats`: batch statistics, `{"lane_efficiency": busy lane-steps / executed lane-steps}`
      (for a plain vmap, Σ steps / (B · max steps)), repeated on every run of the batch (so a
      batch is a pytree whose every leaf has the batch axes: it indexes and vmaps as one).

    Save times after `t_final` (a run that stopped early) hold NaN.
    """

    ts: Float[Array, "*batch n"]
    theta: Float[Array, "*batch n d"]
    loss: Float[Array, "*batch n"]
    t_final: Float[Array, "*batch"]
    theta_final: Float[Array, "*batch d"]
    loss_final: Float[Array, "*batch"]
    status: Status
    num_steps: Int[Array, "*batch"]
    num_accepted_steps: Int[Array, "*batch"]
    num_rejected_steps: Int[Array, "*batch"]
    u: Float[Array, "*batch n L d"] | None = None
    grad_Q: Float[Array, "*batch n d"] | None = None
    bregman: Float[Array, "*batch n"] | None = None
    conserved: Float[Array, "*batch n L d"] | None = None
    grad_integral: Float[Array, "*batch n d"] | None = None
    stats: dict = eqx.field(default_factory=dict)
    formulation: str = eqx.field(static=True, default="reduced")

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.t_final.shape)

    def __getitem__(self, k):
        """Run(s) `k` of a batch (any NumPy index on the batch axes)."""
        if not self.batch_shape:
            raise IndexError("this Trajectory is a single run; there is no batch axis to index")
        return jax.tree_util.tree_map(lambda x: x[k], self)

    @property
    def status_name(self):
        """Status as names (a string, or an array of strings for a batch)."""
        return status_names(self.status)

    @property
    def succeeded(self):
        """True where the run reached t1 or its loss threshold."""
        s = np.asarray(status_codes(self.status))
        return (s == SUCCESS) | (s == EVENT)

    def conservation_drift(self):
        """max over t of |u^j(t)² − u^m(t)² − (same at t = 0)| (needs `save=('conserved',)`)."""
        if self.conserved is None:
            raise ValueError("run `simulate(..., save=('conserved',))` to record conserved quantities")
        c = self.conserved
        return jnp.nanmax(jnp.abs(c - c[..., :1, :, :]), axis=(-3, -2, -1))


class NonfiniteGuard(dfx.AbstractAdaptiveStepSizeController):
    """Wraps an adaptive controller: a non-finite trial step is rejected with dt/5 (the PID
    controller alone would turn dt into NaN), a streak of them ends the run, and their count
    is kept so that a failed run is reported as non-finite. It is adaptive and exposes the
    inner tolerances, so implicit solvers get them for their nonlinear solves."""

    inner: dfx.AbstractAdaptiveStepSizeController

    @property
    def rtol(self):
        return self.inner.rtol

    @property
    def atol(self):
        return self.inner.atol

    @property
    def norm(self):
        return self.inner.norm

    def wrap(self, direction):
        return NonfiniteGuard(self.inner.wrap(direction))

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        t_next, state = self.inner.init(terms, t0, t1, y0, dt0, args, func, error_order)
        zero = jnp.array(0, jnp.int32)
        return t_next, (state, zero, zero)

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, state):
        inner_state, streak, total = state
        finite = finite_tree(y1_candidate, y_error)
        keep, next_t0, next_t1, jump, new_state, result = self.inner.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, inner_state
        )
        pick = lambda new, old: jnp.where(finite, new, old) if eqx.is_array(new) else new
        new_state = jax.tree_util.tree_map(pick, new_state, inner_state)
        streak = jnp.where(finite, 0, streak + 1)
        total = total + jnp.where(finite, 0, 1)
        result = dfx.RESULTS.where(streak >= NONFINITE_STREAK, dfx.RESULTS.dt_min_reached, result)
        return (
            keep & finite,
            jnp.where(finite, next_t0, t0),
            jnp.where(finite, next_t1, t0 + 0.2 * (t1 - t0)),
            jump & finite,
            (new_state, streak, total),
            result,
        )
