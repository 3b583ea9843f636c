"""One run: validate, build the diffrax problem, solve, and return a `Trajectory`."""

from __future__ import annotations

import enum
import functools

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from jaxtyping import Array, Float, Int

from ._flows import AbstractFormulation, as_formulation
from ._geometry import Geometry
from ._init import check_assumption_a, check_init
from ._losses import AbstractLoss, as_loss, check_loss_at
from ._validate import _short, as_float_array, check_tolerance, positive_int, positive_scalar


class Status(enum.IntEnum):
    """Outcome of one run (stored as an integer array in a `Trajectory`)."""

    SUCCESS = 0
    MAX_STEPS = 1
    NONFINITE = 2
    EVENT = 3
    FAILED = 4


SAVEABLE = ("u", "grad_Q", "bregman", "conserved", "grad_integral")


class Trajectory(eqx.Module):
    """The result of [`ddln_jax.simulate`][]. Leading batch axes, if any, come first.

    **Fields:**

    - `ts`: save times, shape `(n,)`.
    - `theta`: θ(t), shape `(n, d)`; `loss`: f(θ(t)), shape `(n,)`.
    - `u`: layers u(t), `(n, L, d)`; `grad_Q`: ∇Q(θ(t)), `(n, d)`; `bregman`: D_Q(θ*, θ(t)),
      `(n,)`; `conserved`: u^j(t)² − u^m(t)², `(n, L, d)`; `grad_integral`: ∫₀ᵗ ∇f(θ(s)) ds,
      `(n, d)`. Each is `None` unless asked for in `save=`.
    - `t_final`, `theta_final`, `loss_final`: the end of the run (t1, or the located time of
      the loss threshold when the run stopped there).
    - `status`: a [`ddln_jax.Status`][] code; `num_steps`, `num_accepted_steps`,
      `num_rejected_steps`: solver statistics.

    Save times after `t_final` (a run that stopped early) hold NaN.
    """

    ts: Float[Array, "*batch n"]
    theta: Float[Array, "*batch n d"]
    loss: Float[Array, "*batch n"]
    t_final: Float[Array, "*batch"]
    theta_final: Float[Array, "*batch d"]
    loss_final: Float[Array, "*batch"]
    status: Int[Array, "*batch"]
    num_steps: Int[Array, "*batch"]
    num_accepted_steps: Int[Array, "*batch"]
    num_rejected_steps: Int[Array, "*batch"]
    u: Float[Array, "*batch n L d"] | None = None
    grad_Q: Float[Array, "*batch n d"] | None = None
    bregman: Float[Array, "*batch n"] | None = None
    conserved: Float[Array, "*batch n L d"] | None = None
    grad_integral: Float[Array, "*batch n d"] | None = None
    formulation: str = eqx.field(static=True, default="reduced")
    lane_efficiency: float | None = eqx.field(static=True, default=None)

    @property
    def status_name(self):
        """Status as names (a string, or an array of strings for a batch)."""
        names = np.vectorize(lambda s: Status(int(s)).name.lower())(np.asarray(self.status))
        return str(names) if names.ndim == 0 else names

    @property
    def succeeded(self):
        """True where the run reached t1 or its loss threshold."""
        s = np.asarray(self.status)
        return (s == Status.SUCCESS) | (s == Status.EVENT)

    def conservation_drift(self):
        """max over t of |u^j(t)² − u^m(t)² − (same at t = 0)| (needs `save=('conserved',)`)."""
        if self.conserved is None:
            raise ValueError("run `simulate(..., save=('conserved',))` to record conserved quantities")
        c = self.conserved
        return jnp.nanmax(jnp.abs(c - c[..., :1, :, :]), axis=(-3, -2, -1))


# Consecutive non-finite trial steps (each shrinking dt by 5×) before a run is declared
# non-finite: 40 of them shrink the step by ~1e-28, far past any overflow of a too-large step.
_NONFINITE_STREAK = 40


class _NonfiniteGuard(dfx.AbstractStepSizeController):
    """Wraps an adaptive controller: a non-finite trial step is rejected with dt/5 (the PID
    controller alone would turn dt into NaN), a streak of them ends the run, and the count of
    them is kept so that a failed run can be reported as non-finite."""

    inner: dfx.AbstractStepSizeController

    def wrap(self, direction):
        return _NonfiniteGuard(self.inner.wrap(direction))

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        t_next, state = self.inner.init(terms, t0, t1, y0, dt0, args, func, error_order)
        zero = jnp.array(0, jnp.int32)
        return t_next, (state, zero, zero)

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, state):
        inner_state, streak, total = state
        leaves = jax.tree_util.tree_leaves((y1_candidate, y_error))
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
        keep, next_t0, next_t1, jump, new_state, result = self.inner.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, inner_state
        )
        pick = lambda new, old: jnp.where(finite, new, old) if eqx.is_array(new) else new
        new_state = jax.tree_util.tree_map(pick, new_state, inner_state)
        streak = jnp.where(finite, 0, streak + 1)
        total = total + jnp.where(finite, 0, 1)
        result = dfx.RESULTS.where(streak >= _NONFINITE_STREAK, dfx.RESULTS.dt_min_reached, result)
        return (
            keep & finite,
            jnp.where(finite, next_t0, t0),
            jnp.where(finite, next_t1, t0 + 0.2 * (t1 - t0)),
            jump & finite,
            (new_state, streak, total),
            result,
        )


class _Config(eqx.Module):
    """Everything static about a run (hashable; one compiled program per value)."""

    formulation: AbstractFormulation
    solver: dfx.AbstractSolver
    max_steps: int
    save: tuple[str, ...]
    stop: bool
    progress: bool


def _status(result, final_ok, nonfinite_trials, stop):
    event = result == dfx.RESULTS.event_occurred
    if stop:
        # With explicit steps the only nonlinear solve is the event's root find; it fails to
        # meet its tolerance when the threshold sits at the rounding level of f, yet the
        # crossing was found: still an event, at the time the root finder reached.
        for name in ("nonlinear_max_steps_reached", "nonlinear_divergence"):
            if hasattr(dfx.RESULTS, name):
                event = event | (result == getattr(dfx.RESULTS, name))
    status = jnp.where(
        result == dfx.RESULTS.successful,
        Status.SUCCESS,
        jnp.where(
            event,
            Status.EVENT,
            jnp.where(result == dfx.RESULTS.max_steps_reached, Status.MAX_STEPS, Status.FAILED),
        ),
    )
    failed = (status != Status.SUCCESS) & (status != Status.EVENT)
    # A failed run whose trial steps met a non-finite vector field is put down to that.
    nonfinite = ~final_ok | (failed & (nonfinite_trials > 0))
    return jnp.where(nonfinite, Status.NONFINITE, status).astype(jnp.int32)


def _solve(config: _Config, loss, u0, ts, t1, controller, dt0, target, theta_star):
    """One solve, traceable (vmapped for batches). Validation happens before, in `simulate`."""
    form = config.formulation
    geom = Geometry(u0)
    grad_integral = "grad_integral" in config.save
    y0 = form.initial_state(geom, u0)
    if grad_integral:
        y0 = (y0, jnp.zeros(u0.shape[-1], u0.dtype))

    def core(y):
        return y[0] if grad_integral else y

    def vector_field(t, y, args):
        dy = form.vector_field(t, core(y), args)
        if grad_integral:
            return dy, args[0].grad(form.theta(args[1], y[0]))
        return dy

    if "bregman" in config.save:
        w_star = geom.psi_inv(theta_star)
        phi_star = geom.phi(w_star)

    def save_fn(t, y, args):
        loss_, geom_ = args
        yc = core(y)
        theta = form.theta(geom_, yc)
        out = {"theta": theta, "loss": loss_(theta)}
        needs_w = {"u", "grad_Q", "bregman", "conserved"} & set(config.save)
        if needs_w:
            w = form.reduced(geom_, yc)
        if "u" in config.save or "conserved" in config.save:
            u = form.layers(geom_, yc)
            if "u" in config.save:
                out["u"] = u
            if "conserved" in config.save:
                sq = u**2
                out["conserved"] = sq - jnp.take_along_axis(sq, geom_.m[None], axis=0)
        if "grad_Q" in config.save or "bregman" in config.save:
            phi = yc if form.name == "dual" else geom_.phi(w)
            if "grad_Q" in config.save:
                out["grad_Q"] = phi
            if "bregman" in config.save:
                # Geometry.bregman's formula, reusing w and Φ(w) computed above.
                out["bregman"] = jnp.sum(theta_star * (phi_star - phi) - 0.5 * (w_star - w) * (w_star + w))
        if grad_integral:
            out["grad_integral"] = y[1]
        return out

    guarded = not isinstance(controller, dfx.ConstantStepSize)
    event = None
    if config.stop:

        def cond_fn(t, y, args, **kwargs):
            loss_, geom_ = args
            return loss_(form.theta(geom_, core(y))) - target

        event = dfx.Event(cond_fn, root_finder=optx.Newton(rtol=1e-12, atol=1e-14))

    sol = dfx.diffeqsolve(
        dfx.ODETerm(vector_field),
        config.solver,
        t0=jnp.zeros((), t1.dtype),
        t1=t1,
        dt0=dt0,
        y0=y0,
        args=(loss, geom),
        saveat=dfx.SaveAt(ts=ts, t1=True, fn=save_fn, controller_state=guarded),
        stepsize_controller=_NonfiniteGuard(controller) if guarded else controller,
        event=event,
        max_steps=config.max_steps,
        throw=False,
        progress_meter=dfx.TqdmProgressMeter() if config.progress else dfx.NoProgressMeter(),
    )
    # diffrax packs the saves in time order: the valid `ts` saves, then the final state
    # (t1, the event time, or where max_steps stopped it), then inf padding.
    n = ts.shape[0]
    last = jnp.sum(jnp.isfinite(sol.ts)) - 1
    ys = sol.ys
    final = jax.tree_util.tree_map(lambda x: x[last], ys)
    t_final = sol.ts[last]
    final_ok = jnp.all(jnp.isfinite(final["theta"])) & jnp.isfinite(final["loss"])
    saved = jnp.arange(n) < last
    status = _status(sol.result, final_ok, sol.controller_state[2] if guarded else 0, config.stop)
    if config.stop:
        # A threshold already met at t = 0 stops the run there (diffrax events need a sign
        # change, so the solve above ran on): as the engine does.
        theta0 = form.theta(geom, core(y0))
        at_start = loss(theta0) <= target
        t_final = jnp.where(at_start, 0.0, t_final).astype(t_final.dtype)
        final = {
            "theta": jnp.where(at_start, theta0, final["theta"]),
            "loss": jnp.where(at_start, loss(theta0), final["loss"]),
        }
        saved = jnp.where(at_start, ts <= 0, saved)
        status = jnp.where(at_start, Status.EVENT, status).astype(jnp.int32)

    def mask(x):
        return jnp.where(saved.reshape((-1,) + (1,) * (x.ndim - 1)), x[:n], jnp.nan)

    extras = {k: mask(ys[k]) for k in SAVEABLE if k in ys}
    return Trajectory(
        ts=ts,
        theta=mask(ys["theta"]),
        loss=mask(ys["loss"]),
        t_final=t_final,
        theta_final=final["theta"],
        loss_final=final["loss"],
        status=status,
        num_steps=sol.stats["num_steps"],
        num_accepted_steps=sol.stats["num_accepted_steps"],
        num_rejected_steps=sol.stats["num_rejected_steps"],
        formulation=form.name,
        **extras,
    )


@eqx.filter_jit
def _solve_batched(config, loss, u0, ts, t1, controller, dt0, target, theta_star):
    fn = functools.partial(_solve, config, loss)
    if u0.ndim == 2:
        return fn(u0, ts, t1, controller, dt0, target, theta_star)
    return jax.vmap(fn, in_axes=(0, None, None, None, None, 0, None))(
        u0, ts, t1, controller, dt0, target, theta_star
    )


def _default_tolerances(dtype):
    return (1e-8, 1e-10) if jnp.dtype(dtype).itemsize >= 8 else (1e-5, 1e-7)


def simulate(
    loss,
    u0,
    *,
    t1: float,
    ts=None,
    formulation="reduced",
    solver: dfx.AbstractSolver | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    dt0: float | None = None,
    stepsize_controller: dfx.AbstractStepSizeController | None = None,
    max_steps: int = 65536,
    stop_ratio: float | None = None,
    f_star: float | None = None,
    save=(),
    theta_star=None,
    progress: bool = False,
    lanes: int | None = None,
    devices=None,
) -> Trajectory:
    """Integrate the gradient flow of a deep diagonal linear network from `u0`.

    **Arguments:**

    - `loss`: a loss module ([`ddln_jax.LeastSquares`][], [`ddln_jax.Logistic`][], ...) or any
      jittable callable f(θ) → scalar.
    - `u0`: the layers at t = 0, shape `(L, d)`, or `(B, L, d)` for a batch of inits (solved
      vmapped; every run keeps its own status).
    - `t1`: final time.
    - `ts`: save times in [0, t1], increasing (default: 101 evenly spaced).
    - `formulation`: `"layer"`, `"reduced"` (default, the fast exact path), `"mirror"` or
      `"dual"`; the last two need Assumption A.
    - `solver`: a diffrax solver (default `diffrax.Tsit5()`).
    - `rtol`, `atol`: tolerances of the default PID controller (default 1e-8/1e-10 in float64,
      1e-5/1e-7 in float32); a relative tolerance below what the dtype delivers is refused.
    - `dt0`: initial step (default: chosen by the controller; required for constant steps).
    - `stepsize_controller`: a diffrax controller replacing the PID default (e.g.
      `diffrax.ConstantStepSize()`).
    - `max_steps`: step budget; a run that exhausts it has status `MAX_STEPS`.
    - `stop_ratio`: ε in (0, 1): stop when f(θ) − f* ≤ ε·(f(θ0) − f*), at the exact crossing
      time (a diffrax event with root finding); status `EVENT`.
    - `f_star`: f* for `stop_ratio` (default: `loss.minimum()` when known, else 0).
    - `save`: extra quantities to record at `ts`, any of `"u"`, `"grad_Q"`, `"bregman"`,
      `"conserved"`, `"grad_integral"`.
    - `theta_star`: the reference point of `"bregman"` (D_Q(θ*, θ(t))), shape `(d,)`.
    - `progress`: show a tqdm progress meter.
    - `lanes`: run a batch on the lane-refill engine with this many lanes instead of a plain
      `jax.vmap` (which steps every run until the slowest one ends). Much faster when the runs
      need very different numbers of steps; save times are hit exactly and the loss threshold
      is located on the dense output. Supports the default PID controller and
      `save=("bregman",)`; `Trajectory.lane_efficiency` reports the share of busy lane-steps.
    - `devices`: with `lanes`, the devices to split the batch over (default: the first one).

    **Returns:** a [`ddln_jax.Trajectory`][].
    """
    loss = as_loss(loss)
    if not isinstance(u0, jax.Array) and hasattr(u0, "__array__"):
        u0 = np.asarray(u0)
    u0 = as_float_array("u0", u0, ndim=(2, 3))
    batch = u0.ndim == 3
    for i, ui in enumerate(u0 if batch else [u0]):
        check_init(ui, f"u0[{i}]" if batch else "u0")
    # Work in the wider of the layers' and the loss data's dtypes (mixing them would change
    # the state's dtype inside the solver loop).
    data_dtypes = [x.dtype for x in jax.tree_util.tree_leaves(loss) if eqx.is_inexact_array(x)]
    dtype = jnp.result_type(u0.dtype, *data_dtypes)
    u0 = u0.astype(dtype)
    form = as_formulation(formulation)
    d = u0.shape[-1]
    check_loss_at(loss, u0[..., 0, :] if not batch else u0[0, 0])

    t1 = positive_scalar("t1", t1)
    if ts is None:
        ts = np.linspace(0.0, t1, 101)
    ts = np.asarray(as_float_array("ts", ts, ndim=1))
    if ts.size == 0 or np.any(np.diff(ts) <= 0) or ts[0] < 0 or ts[-1] > t1:
        raise ValueError(f"`ts` must be increasing save times in [0, t1={t1}], got {_short(ts)}")

    if solver is None:
        solver = dfx.Tsit5()
    if not isinstance(solver, dfx.AbstractSolver):
        raise TypeError(f"`solver` must be a diffrax solver, got {_short(solver)}")
    default_rtol, default_atol = _default_tolerances(dtype)
    if stepsize_controller is None:
        rtol = default_rtol if rtol is None else positive_scalar("rtol", rtol)
        atol = default_atol if atol is None else positive_scalar("atol", atol)
        check_tolerance("rtol", rtol, dtype)
        controller = dfx.PIDController(
            rtol=jnp.asarray(rtol, dtype), atol=jnp.asarray(atol, dtype)
        )
    else:
        if not isinstance(stepsize_controller, dfx.AbstractStepSizeController):
            raise TypeError(
                f"`stepsize_controller` must be a diffrax step-size controller, got "
                f"{_short(stepsize_controller)}"
            )
        if rtol is not None or atol is not None:
            raise ValueError("pass `rtol`/`atol` to your `stepsize_controller`, not to simulate")
        controller = stepsize_controller
        if getattr(controller, "rtol", None) is not None:
            check_tolerance("stepsize_controller.rtol", float(controller.rtol), dtype)
    if dt0 is not None:
        dt0 = jnp.asarray(positive_scalar("dt0", dt0), dtype)
    elif isinstance(controller, dfx.ConstantStepSize):
        raise ValueError("`dt0` is required with a constant step size")
    max_steps = positive_int("max_steps", max_steps, maximum=2**31 - 1)

    save = (save,) if isinstance(save, str) else tuple(save)
    unknown = [s for s in save if s not in SAVEABLE]
    if unknown:
        raise ValueError(f"`save` entries must be among {SAVEABLE}, got {unknown}")
    geometric = {"grad_Q", "bregman"} & set(save)
    if form.needs_assumption_a or geometric:
        for i, ui in enumerate(u0 if batch else [u0]):
            report = check_assumption_a(ui)
            if not report.holds:
                why = f"the {form.name!r} formulation" if form.needs_assumption_a else (
                    f"saving {sorted(geometric)}"
                )
                raise ValueError(
                    f"`u0{f'[{i}]' if batch else ''}` violates Assumption A (ties at coordinates "
                    f"{report.tied[:10].tolist()}), which {why} needs: the mirror potential Q is "
                    "not defined on ℝ there. Use formulation='layer' or 'reduced', or perturb "
                    "the init."
                )
    if "bregman" in save:
        if theta_star is None:
            raise ValueError("`theta_star` is required to save 'bregman' (D_Q(θ*, θ(t)))")
        theta_star = as_float_array("theta_star", theta_star, ndim=1).astype(dtype)
        if theta_star.shape != (d,):
            raise ValueError(f"`theta_star` must have shape ({d},), got {theta_star.shape}")
    elif theta_star is not None:
        theta_star = None

    target = jnp.zeros(u0.shape[:-2], dtype)
    if stop_ratio is not None:
        stop_ratio = positive_scalar("stop_ratio", stop_ratio)
        if stop_ratio >= 1:
            raise ValueError(f"`stop_ratio` must be in (0, 1), got {stop_ratio}")
        if f_star is None:
            f_star = loss.minimum() if _concrete_loss(loss) else None
            f_star = 0.0 if f_star is None else f_star
        f0 = jax.vmap(lambda u: loss(jnp.prod(u, axis=0)))(u0.reshape(-1, *u0.shape[-2:]))
        f0 = f0.reshape(u0.shape[:-2])
        target = f_star + stop_ratio * (f0 - f_star)
    if lanes is not None:
        if stepsize_controller is not None or dt0 is not None:
            raise ValueError("`lanes` runs the engine with its own PID controller: drop "
                             "`stepsize_controller`/`dt0`")
        if set(save) - {"bregman"}:
            raise ValueError(f"with `lanes`, `save` may only hold 'bregman', got {list(save)}")
        lanes = positive_int("lanes", lanes)
        return _simulate_on_engine(
            loss, u0, form, solver, lanes, devices, ts, t1, rtol, atol, max_steps, target,
            stop_ratio is not None, theta_star, progress,
        )
    config = _Config(form, solver, max_steps, save, stop_ratio is not None, bool(progress))
    return _solve_batched(
        config, loss, u0, jnp.asarray(ts, dtype), jnp.asarray(t1, dtype), controller, dt0,
        target, theta_star,
    )


def _simulate_on_engine(loss, u0, form, solver, lanes, devices, ts, t1, rtol, atol, max_steps,
                        target, stop, theta_star, progress):
    from tqdm.auto import tqdm

    from ._batch import run_queue
    from ._engine import EngineConfig

    batch = u0.ndim == 3
    U = np.asarray(u0 if batch else u0[None])
    B = U.shape[0]
    devices = list(devices) if devices is not None else jax.devices()[:1]
    config = EngineConfig(
        formulation=form, solver=solver, lanes=min(lanes, max(1, -(-B // len(devices)))),
        n_save=len(ts), stop=stop, bregman=theta_star is not None, round_steps=2000,
    )
    bar = tqdm(total=B, disable=not progress, unit="run")
    seen = [0]

    def on_jobs(n):
        bar.update(n - seen[0])
        seen[0] = n

    try:
        out, stats = run_queue(
            config, loss, U, np.broadcast_to(np.asarray(target), (B,)), ts=ts, t1=t1, rtol=rtol,
            atol=atol, max_steps=max_steps, theta_star=theta_star, devices=devices,
            on_jobs=on_jobs,
        )
    finally:
        bar.close()
    pick = (lambda x: jnp.asarray(x)) if batch else (lambda x: jnp.asarray(x[0]))
    steps = out.steps.astype(np.int32)
    return Trajectory(
        ts=jnp.asarray(ts), theta=pick(out.theta), loss=pick(out.loss),
        t_final=pick(out.t_final), theta_final=pick(out.theta_final),
        loss_final=pick(out.loss_final), status=pick(out.status), num_steps=pick(steps),
        num_accepted_steps=pick(steps - out.rejected), num_rejected_steps=pick(out.rejected),
        bregman=pick(out.bregman) if theta_star is not None else None,
        formulation=form.name, lane_efficiency=float(stats["lane_efficiency"]),
    )


def _concrete_loss(loss: AbstractLoss) -> bool:
    leaves = jax.tree_util.tree_leaves(loss)
    return not any(isinstance(x, jax.core.Tracer) for x in leaves)
