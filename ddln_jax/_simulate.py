"""One run: validate, build the diffrax problem, solve, and return a `Trajectory`."""

from __future__ import annotations

import functools

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._batch import run_queue
from ._controller import PredictiveController
from ._engine import EngineConfig, state_scale
from ._flows import AbstractFormulation
from ._geometry import geometry_problems
from ._init import check_init
from ._losses import as_loss, check_loss_at, is_concrete
from ._models import SignedModel, as_model
from ._solution import (
    EVENT,
    SAVEABLE,
    NonfiniteGuard,
    Trajectory,
    carries_accuracy,
    decide_status,
    event_root_finder,
    status_item,
)
from ._solvers import AbstractRosenbrock, Auto, FlowField
from ._validate import (
    _short,
    as_float_array,
    check_size,
    check_tolerances,
    check_traced,
    positive_int,
    positive_scalar,
    real_scalar,
)


class _Config(eqx.Module):
    """Everything static about a run (hashable; one compiled program per value)."""

    formulation: AbstractFormulation
    solver: dfx.AbstractSolver
    max_steps: int
    save: tuple[str, ...]
    stop: bool
    progress: bool
    throw: bool
    adjoint: dfx.AbstractAdjoint
    batch: bool


def _status(result, final_ok, nonfinite_trials, stop, accurate=True):
    event = result == dfx.RESULTS.event_occurred
    if stop:
        # With explicit steps the only nonlinear solve is the event's root find; it fails to
        # meet its tolerance when the threshold sits at the rounding level of f, yet the
        # crossing was found: still an event, at the time the root finder reached.
        for name in ("nonlinear_max_steps_reached", "nonlinear_divergence"):
            if hasattr(dfx.RESULTS, name):
                event = event | (result == getattr(dfx.RESULTS, name))
    reached = result == dfx.RESULTS.successful
    max_steps = result == dfx.RESULTS.max_steps_reached
    return decide_status(
        reached_end=reached, event=event, max_steps=max_steps,
        failed=~(reached | event | max_steps), nonfinite_trials=nonfinite_trials,
        final_ok=final_ok, accurate=accurate,
    )


def _solve(config: _Config, loss, u0, ts, t1, controller, dt0, target, theta_star):
    """One solve, traceable (vmapped for batches). Validation happens before, in `simulate`.

    The solver sees the state in scaled variables z = y / scale (`FlowField`), so that its
    absolute tolerance is relative to each coordinate's natural scale."""
    form = config.formulation
    geom = form.geometry(u0)
    field = FlowField(form, state_scale(form, geom, u0))
    grad_integral = "grad_integral" in config.save
    z0 = field.from_state(form.initial_state(geom, u0))
    if grad_integral:
        z0 = (z0, jnp.zeros(geom.d, u0.dtype))

    def state(z):
        return field.to_state(z[0] if grad_integral else z)

    if grad_integral:

        def vector_field(t, z, args):
            return field(t, z[0], args), args[0].grad(form.theta(args[1], field.to_state(z[0])))

    else:
        vector_field = field  # the stiff solvers read its Jacobian's structure

    def save_fn(t, z, args):
        loss_, geom_ = args
        y = state(z)
        theta = form.theta(geom_, y)
        out = {"theta": theta, "loss": loss_(theta)}
        if "u" in config.save or "conserved" in config.save:
            u = form.layers(geom_, y)
            if "u" in config.save:
                out["u"] = u
            if "conserved" in config.save:
                out["conserved"] = geom_.gaps(u)
        if "grad_Q" in config.save:
            out["grad_Q"] = y if form.name == "dual" else geom_.grad_Q(theta)
        if "bregman" in config.save:
            out["bregman"] = geom_.bregman(theta_star, theta)
        if grad_integral:
            out["grad_integral"] = z[1]
        sens = form.sensitivity(geom_, y)
        if sens is not None:
            out["sensitivity"] = jnp.max(sens)
        return out

    # Only adaptive controllers can reject a non-finite trial step and retry.
    guarded = isinstance(controller, dfx.AbstractAdaptiveStepSizeController)
    event = None
    if config.stop:

        def cond_fn(t, y, args, **kwargs):  # diffrax passes the (scaled) state as `y`
            loss_, geom_ = args
            # In the default float dtype: diffrax's root find pairs the value with a Python
            # 0.0 in a `lax.cond`, so a float32 run under jax_enable_x64 failed to trace.
            value = loss_(form.theta(geom_, state(y))) - target
            return value.astype(jnp.result_type(float))

        event = dfx.Event(cond_fn, root_finder=event_root_finder())

    sol = dfx.diffeqsolve(
        dfx.ODETerm(vector_field),
        config.solver,
        t0=jnp.zeros((), t1.dtype),
        t1=t1,
        dt0=dt0,
        y0=z0,
        args=(loss, geom),
        saveat=dfx.SaveAt(ts=ts, t1=True, fn=save_fn, controller_state=guarded),
        stepsize_controller=NonfiniteGuard(controller) if guarded else controller,
        event=event,
        max_steps=config.max_steps,
        adjoint=config.adjoint,
        throw=config.throw,
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
    accurate = True
    rtol = getattr(controller, "rtol", None)
    if "sensitivity" in ys and rtol is not None:
        steps = sol.stats["num_accepted_steps"]
        accurate = carries_accuracy(final["sensitivity"], final["theta"], steps, rtol)
    status = _status(sol.result, final_ok, sol.controller_state[2] if guarded else 0, config.stop,
                     accurate)
    if config.stop:
        # A threshold already met at t = 0 stops the run there (diffrax events need a sign
        # change, so the solve above ran on): as the engine does.
        theta0 = form.theta(geom, state(z0))
        at_start = loss(theta0) <= target
        t_final = jnp.where(at_start, 0.0, t_final).astype(t_final.dtype)
        final = {
            "theta": jnp.where(at_start, theta0, final["theta"]),
            "loss": jnp.where(at_start, loss(theta0), final["loss"]),
        }
        saved = jnp.where(at_start, ts <= 0, saved)
        status = jnp.where(at_start, EVENT, status).astype(jnp.int32)

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
        status=status_item(status),
        num_steps=jnp.asarray(sol.stats["num_steps"], jnp.int32),
        num_accepted_steps=jnp.asarray(sol.stats["num_accepted_steps"], jnp.int32),
        num_rejected_steps=jnp.asarray(sol.stats["num_rejected_steps"], jnp.int32),
        formulation=form.name,
        **extras,
    )


@eqx.filter_jit
def _solve_batched(config, loss, u0, ts, t1, controller, dt0, target, theta_star):
    fn = functools.partial(_solve, config, loss)
    if not config.batch:
        traj = fn(u0, ts, t1, controller, dt0, target, theta_star)
        one = jnp.ones((), ts.dtype)
        return eqx.tree_at(lambda t: t.stats, traj, {"lane_efficiency": one})
    traj = jax.vmap(fn, in_axes=(0, None, None, None, None, 0, None))(
        u0, ts, t1, controller, dt0, target, theta_star
    )
    # A vmapped solve steps every run until the slowest one ends.
    steps = traj.num_steps.astype(ts.dtype)
    eff = jnp.sum(steps) / jnp.maximum(steps.size * jnp.max(steps), 1)
    return eqx.tree_at(lambda t: t.stats, traj,
                       {"lane_efficiency": jnp.broadcast_to(eff, steps.shape)})


def _check_geometry(u0, why: str, layer_ndim: int = 2) -> None:
    """Refuse, before compiling, inits whose mirror geometry cannot be computed (balanced
    coordinates are fine: they have the half-line geometry). The check is coordinatewise, so
    a batch (and the two halves of a signed network) is checked in one call on its
    coordinates laid side by side."""
    U = np.asarray(u0)
    L, d = U.shape[-2:]
    lead = U.shape[:-2]  # batch axes, and the half axis of a signed network
    flat = U.reshape(-1, L, d).transpose(1, 0, 2).reshape(L, -1)
    problems = geometry_problems(flat)
    if problems:
        reason, idx = next(iter(problems.items()))
        where = [tuple(int(k) for k in np.unravel_index(int(i), lead + (d,))) for i in idx[:5]]
        names = (("init",) if U.ndim > layer_ndim else ()) + (("half",) if layer_ndim == 3 else ())
        at = (f"({', '.join(names + ('coordinate',))}) {where}" if names
              else f"coordinates {[w[0] for w in where]}")
        raise ValueError(
            f"`u0` has no computable mirror geometry ({reason.replace('_', ' ')} at {at}), "
            f"which {why} needs. Use formulation='layer' or 'reduced', or perturb the init."
        )


def _default_tolerances(dtype):
    return (1e-8, 1e-10) if jnp.dtype(dtype).itemsize >= 8 else (1e-5, 1e-7)



def simulate(
    loss,
    u0,
    *,
    t1,
    ts=None,
    formulation="reduced",
    model="product",
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
    adjoint: dfx.AbstractAdjoint | None = None,
    throw: bool = False,
    progress: bool = False,
    lanes: int | None = None,
    devices=None,
    _tangent=None,
) -> Trajectory:
    """Integrate the gradient flow of a deep diagonal linear network from `u0`.

    A pure function of its array arguments: it works under `jax.jit`/`eqx.filter_jit`,
    `jax.vmap` and `jax.grad` (reverse mode through diffrax's `adjoint`). Inputs are checked
    eagerly when they are concrete, and with `eqx.error_if` when traced.

    **Arguments:**

    - `loss`: a loss module ([`ddln_jax.LeastSquares`][], [`ddln_jax.Logistic`][], ...) or any
      jittable callable f(θ) → scalar.
    - `u0`: the layers at t = 0, shape `(L, d)`, or `(B, L, d)` for a batch of inits (solved
      vmapped; every run keeps its own status). For the signed model: `(2, L, d)` (index 0 the
      + half) or `(B, 2, L, d)`.
    - `t1`: final time.
    - `ts`: save times in [0, t1], increasing (default: 101 evenly spaced).
    - `formulation`: `"layer"`, `"reduced"` (default, the fast exact path), `"mirror"` or
      `"dual"`; the last two need a computable mirror geometry (Assumption A, or balanced
      coordinates with their half-line geometry).
    - `model`: `"product"` (θ = ∏_j u^j, default), `"signed"` (θ = θ⁺ − θ⁻) or
      `"signed_tied"` (θ = w₊^L − w₋^L), or a model instance ([`ddln_jax.SignedModel`][]).
    - `solver`: a diffrax solver (default [`ddln_jax.Auto`][]: explicit Tsitouras 5(4) steps
      while the flow is not stiff, the Rosenbrock method [`ddln_jax.Rodas5P`][] with a
      structured linear solve once it is, as small initializations make it); any diffrax
      solver works, implicit ones included.
    - `rtol`, `atol`: tolerances of the default controller ([`ddln_jax.PredictiveController`][]:
      diffrax's PID controller that also shrinks the step after an accepted one when the error
      grows along the solution; default 1e-8/1e-10 in float64,
      1e-5/1e-7 in float32); a relative tolerance below what the dtype delivers, or ≥ 1, is
      refused. The state is integrated in variables scaled by its natural scale
      ([`ddln_jax.natural_scale`][]), so `atol` is relative to the init's scale in every
      coordinate: the accuracy does not depend on α.
    - `dt0`: initial step (default: chosen by the controller; required for constant steps).
    - `stepsize_controller`: any diffrax controller replacing the default (e.g.
      `diffrax.ConstantStepSize()`); adaptive ones are wrapped in a guard that rejects
      non-finite trial steps and keeps their tolerances.
    - `max_steps`: step budget; a run that exhausts it has status `Status.max_steps`.
    - `stop_ratio`: ε in (0, 1): stop when f(θ) − f* ≤ ε·(f(θ0) − f*), at the exact crossing
      time (a diffrax event with root finding); status `Status.event`.
    - `f_star`: f* for `stop_ratio` (default: `loss.minimum()` when known, else 0).
    - `save`: extra quantities to record at `ts`, any of `"u"`, `"grad_Q"`, `"bregman"`,
      `"conserved"`, `"grad_integral"`.
    - `theta_star`: the reference point of `"bregman"` (D_Q(θ*, θ(t))), shape `(d,)`.
    - `adjoint`: a diffrax adjoint for reverse mode (default
      `diffrax.RecursiveCheckpointAdjoint()`, memory O(√max_steps · state); pass
      `diffrax.RecursiveCheckpointAdjoint(checkpoints=k)` to bound memory at k states, or
      `diffrax.BacksolveAdjoint()` for O(1) memory at the price of a backward solve).
    - `throw`: raise on a failed run instead of returning its status (diffrax's `throw`).
    - `progress`: show a tqdm progress meter.
    - `lanes`: run a batch on the lane-refill engine with this many lanes instead of a plain
      `jax.vmap` (which steps every run until the slowest one ends). Much faster when the runs
      need very different numbers of steps. Host-driven (a queue), so not under `jax.jit`;
      supports the default controller and `save=("bregman",)`. The result has the same
      structure, shapes and dtypes as the vmapped one; `stats["lane_efficiency"]` reports the
      share of busy lane-steps.
    - `devices`: with `lanes`, the devices to split the batch over (default: the first one).

    **Returns:** a [`ddln_jax.Trajectory`][].
    """
    loss = as_loss(loss)
    model = as_model(model)
    if not isinstance(u0, jax.Array) and hasattr(u0, "__array__"):
        u0 = np.asarray(u0)
    signed = isinstance(model, SignedModel)
    u0 = model.check_init(u0, "u0") if signed else check_init(u0, "u0", batch=True)
    layer_ndim = 3 if signed else 2
    layer_shape = u0.shape[-layer_ndim:]
    batch = u0.ndim == layer_ndim + 1
    # Work in the wider of the layers' and the loss data's dtypes (mixing them would change
    # the state's dtype inside the solver loop).
    data_dtypes = [x.dtype for x in jax.tree_util.tree_leaves(loss) if eqx.is_inexact_array(x)]
    dtype = jnp.result_type(u0.dtype, *data_dtypes)
    u0 = u0.astype(dtype)
    form = model.formulation(formulation)
    L, d = u0.shape[-2:]
    B = u0.shape[0] if batch else 1
    check_loss_at(loss, jax.ShapeDtypeStruct((d,), dtype))
    concrete = is_concrete(u0, loss)

    t1 = real_scalar("t1", t1, dtype, positive=True)
    if ts is None:
        ts = jnp.linspace(0.0, 1.0, 101, dtype=dtype) * t1
    else:
        ts = as_float_array("ts", ts, ndim=1).astype(dtype)
        if ts.shape[0] == 0:
            raise ValueError("`ts` must hold at least one save time, got an empty array")
        bad = (jnp.any(jnp.diff(ts) <= 0) | (ts[0] < 0) | (ts[-1] > t1))
        t1_text = "t1" if isinstance(t1, jax.core.Tracer) else f"t1={float(t1)}"
        shown = (np.asarray(ts).tolist() if not isinstance(ts, jax.core.Tracer) and ts.size <= 8
                 else _short(ts))
        ts = check_traced(ts, bad, f"`ts` must be increasing save times in [0, {t1_text}], got {shown}")
    save = (save,) if isinstance(save, str) else tuple(save)
    unknown = [s for s in save if s not in SAVEABLE]
    if unknown:
        raise ValueError(f"`save` entries must be among {SAVEABLE}, got {unknown}")
    check_size(B, ts.shape[0], L * (2 if signed else 1), d, save, dtype)

    if solver is None:
        solver = Auto()
    if not isinstance(solver, dfx.AbstractSolver):
        raise TypeError(f"`solver` must be a diffrax solver, got {_short(solver)}")
    default_rtol, default_atol = _default_tolerances(dtype)
    if stepsize_controller is None:
        rtol = default_rtol if rtol is None else rtol
        atol = default_atol if atol is None else atol
        rtol, atol = check_tolerances(rtol, atol, dtype)
        controller = PredictiveController(rtol=rtol, atol=atol)
    else:
        if not isinstance(stepsize_controller, dfx.AbstractStepSizeController):
            raise TypeError(
                f"`stepsize_controller` must be a diffrax step-size controller, got "
                f"{_short(stepsize_controller)}"
            )
        if rtol is not None or atol is not None:
            raise ValueError("pass `rtol`/`atol` to your `stepsize_controller`, not to simulate")
        controller = stepsize_controller
        if isinstance(controller, dfx.AbstractAdaptiveStepSizeController):
            check_tolerances(controller.rtol, controller.atol, dtype, prefix="stepsize_controller.")
    if dt0 is not None:
        dt0 = real_scalar("dt0", dt0, dtype, positive=True)
    elif isinstance(controller, dfx.ConstantStepSize):
        raise ValueError("`dt0` is required with a constant step size")
    max_steps = positive_int("max_steps", max_steps, maximum=2**31 - 1)
    if adjoint is None:
        adjoint = dfx.RecursiveCheckpointAdjoint()
    if not isinstance(adjoint, dfx.AbstractAdjoint):
        raise TypeError(f"`adjoint` must be a diffrax adjoint, got {_short(adjoint)}")

    geometric = {"grad_Q", "bregman"} & set(save)
    if (form.needs_assumption_a or geometric) and concrete:
        why = (
            f"the {form.name!r} formulation" if form.needs_assumption_a
            else f"saving {sorted(geometric)}"
        )
        _check_geometry(u0, why, layer_ndim)
    if "bregman" in save:
        if theta_star is None:
            raise ValueError("`theta_star` is required to save 'bregman' (D_Q(θ*, θ(t)))")
        theta_star = as_float_array("theta_star", theta_star, ndim=1).astype(dtype)
        if theta_star.shape != (d,):
            raise ValueError(f"`theta_star` must have shape ({d},), got {theta_star.shape}")
    else:
        theta_star = None

    target = jnp.zeros(u0.shape[:-layer_ndim], dtype)
    if stop_ratio is not None:
        stop_ratio = positive_scalar("stop_ratio", stop_ratio)
        if stop_ratio >= 1:
            raise ValueError(f"`stop_ratio` must be in (0, 1), got {stop_ratio}")
        if f_star is None:
            f_star = loss.minimum() if concrete else None
            f_star = 0.0 if f_star is None else f_star
        f_star = real_scalar("f_star", f_star, dtype)
        f0 = jax.vmap(lambda u: loss(model.theta(u)))(u0.reshape(-1, *layer_shape))
        target = f_star + stop_ratio * (f0.reshape(u0.shape[:-layer_ndim]) - f_star)
    elif f_star is not None:
        real_scalar("f_star", f_star, dtype)
    if lanes is not None:
        if not concrete or isinstance(t1, jax.core.Tracer):
            raise TypeError(
                "`lanes` runs a host-driven queue of runs: call it outside `jax.jit`/`jax.vmap` "
                "(or drop `lanes` to get a plain, traceable vmap)"
            )
        if stepsize_controller is not None or dt0 is not None:
            raise ValueError("`lanes` runs the engine with its own step-size controller: drop "
                             "`stepsize_controller`/`dt0`")
        if set(save) - {"bregman"}:
            raise ValueError(f"with `lanes`, `save` may only hold 'bregman', got {list(save)}")
        lanes = positive_int("lanes", lanes)
        tangent = None
        if _tangent is not None:
            du0 = jnp.asarray(_tangent, dtype)
            dtarget = jnp.zeros(u0.shape[:-layer_ndim], dtype)
            if stop_ratio is not None:  # the threshold moves with f(θ0)
                f0 = lambda u: jax.vmap(lambda v: loss(model.theta(v)))(u.reshape(-1, *layer_shape))
                df0 = jax.jvp(f0, (u0,), (du0,))[1].reshape(u0.shape[:-layer_ndim])
                dtarget = stop_ratio * df0
            tangent = (du0, dtarget)
        return _simulate_on_engine(
            loss, u0, form, solver, lanes, devices, np.asarray(ts), t1, rtol, atol, max_steps,
            target, stop_ratio is not None, theta_star, progress, tangent, batch,
        )
    config = _Config(
        form, solver, max_steps, save, stop_ratio is not None, bool(progress), bool(throw),
        adjoint, batch,
    )
    return _solve_batched(config, loss, u0, ts, t1, controller, dt0, target, theta_star)


def _simulate_on_engine(loss, u0, form, solver, lanes, devices, ts, t1, rtol, atol, max_steps,
                        target, stop, theta_star, progress, tangent, batch):

    U = np.asarray(u0 if batch else u0[None])
    B = U.shape[0]
    devices = list(devices) if devices is not None else jax.devices()[:1]
    config = EngineConfig(
        formulation=form, solver=solver, lanes=min(lanes, max(1, -(-B // len(devices)))),
        n_save=len(ts), stop=stop, bregman=theta_star is not None, round_steps=2000,
    )
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=B, unit="run")
    else:
        bar = None
    seen = [0]

    def on_jobs(n):
        if bar is not None:
            bar.update(n - seen[0])
        seen[0] = n

    if tangent is not None:
        du0, dtarget = tangent
        tangent = (np.asarray(du0).reshape(U.shape), np.broadcast_to(np.asarray(dtarget), (B,)))
    try:
        res = run_queue(
            config, loss, U, np.broadcast_to(np.asarray(target), (B,)), ts=ts, t1=float(t1),
            rtol=float(rtol), atol=float(atol), max_steps=max_steps, theta_star=theta_star,
            devices=devices, on_jobs=on_jobs, tangent=tangent,
        )
    finally:
        if bar is not None:
            bar.close()
    out, stats = (res[0], res[2]) if tangent is not None else res
    traj = _engine_trajectory(out, stats, form, ts, U.dtype, batch, theta_star is not None)
    if tangent is None:
        return traj
    dout = res[1]
    pick = (lambda x: jnp.asarray(x)) if batch else (lambda x: jnp.asarray(x[0]))
    d = {"theta": dout.theta, "loss": dout.loss, "t_final": dout.t_final,
         "theta_final": dout.theta_final, "loss_final": dout.loss_final, "bregman": dout.bregman}
    # Where the run recorded nothing (saves after a stop), the derivative is NaN too.
    d = {k: jnp.where(jnp.isnan(getattr(traj, k)), jnp.nan, pick(v))
         if getattr(traj, k) is not None else pick(v) for k, v in d.items()}
    return traj, _tangent_of(traj, d)


def _tangent_of(traj: Trajectory, floats: dict) -> Trajectory:
    """A tangent `Trajectory`: the given float fields, zeros for the other float fields (save
    times, stats), float0 for the integer ones (as `jax.jvp` returns them)."""
    zero = lambda x: (jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.inexact)
                      else np.zeros(x.shape, jax.dtypes.float0))
    out = jax.tree_util.tree_map(zero, traj)
    names = [k for k, v in floats.items() if getattr(traj, k) is not None]
    return eqx.tree_at(lambda t: [getattr(t, k) for k in names], out, [floats[k] for k in names])


def _engine_trajectory(out, stats, form, ts, dtype, batch, bregman) -> Trajectory:
    B = out.t_final.shape[0]
    pick = (lambda x: jnp.asarray(x)) if batch else (lambda x: jnp.asarray(x[0]))
    steps = out.steps.astype(np.int32)
    rejected = out.rejected.astype(np.int32)
    return Trajectory(
        ts=pick(np.broadcast_to(np.asarray(ts, dtype), (B, len(ts)))),
        theta=pick(out.theta), loss=pick(out.loss),
        t_final=pick(out.t_final), theta_final=pick(out.theta_final),
        loss_final=pick(out.loss_final), status=status_item(pick(out.status)),
        num_steps=pick(steps), num_accepted_steps=pick(steps - rejected),
        num_rejected_steps=pick(rejected),
        bregman=pick(out.bregman) if bregman else None,
        stats={"lane_efficiency": pick(np.full(B, stats["lane_efficiency"], dtype))},
        formulation=form.name,
    )


def simulate_jvp(loss, u0, du0, **kwargs) -> tuple[Trajectory, Trajectory]:
    """Forward-mode sensitivities of a run (or a batch) along a direction `du0` in init space.

    For u0 = α·v (any scheme that scales with α), the derivative with respect to α is the
    direction `du0 = u0 / α`. Everything `simulate` records is differentiated: θ(t), f(θ(t)),
    θ_final, the final time — for a run stopped at the loss threshold, the derivative of the
    time to ε, by the implicit function theorem at the located event — and the threshold
    itself moves with f(θ0).

    **Arguments:**

    - `loss`, `u0`, `**kwargs`: as for [`ddln_jax.simulate`][].
    - `du0`: the tangent direction, the shape of `u0`.

    **Returns:** `(trajectory, tangent)`: the tangent is a `Trajectory` whose float fields hold
    the directional derivatives (integer fields are `float0`, as `jax.jvp` returns them).
    Without `lanes` this is `jax.jvp` of `simulate`; with `lanes` the lane engine runs in
    forward mode (its while loop carries the tangents), and the two agree run by run.
    """
    lanes = kwargs.pop("lanes", None)
    if lanes is not None and not isinstance(kwargs.get("solver", Auto()), (Auto, AbstractRosenbrock)):
        # diffrax's Runge–Kutta steps carry a custom VJP, which forward mode cannot enter.
        raise ValueError(
            "forward mode on the lane engine (`lanes=`) supports the `Auto`, `Rodas4` and "
            f"`Rodas5P` solvers, got {type(kwargs['solver']).__name__}; drop `lanes` to use "
            "another solver"
        )
    du0 = as_float_array("du0", du0)
    if np.shape(du0) != np.shape(u0):
        raise ValueError(f"`du0` must have the shape of `u0` {np.shape(u0)}, got {np.shape(du0)}")
    if lanes is None:
        u0 = jnp.asarray(u0)
        # Reverse-mode adjoints are custom VJPs, which forward mode cannot go through.
        kwargs.setdefault("adjoint", dfx.ForwardMode())
        return jax.jvp(lambda u: simulate(loss, u, **kwargs), (u0,), (du0.astype(u0.dtype),))
    # The engine path: validate through `simulate` itself (it returns the engine's inputs).
    return simulate(loss, u0, lanes=lanes, _tangent=du0, **kwargs)
