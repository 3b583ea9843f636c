"""The canonical sweep workload (W1) and every baseline the sweep benchmark compares against.

Each baseline is a function of a `Workload` that returns a plain dict (times in seconds, θ at the
save times as a NumPy array of shape `(B, n_save, d)`, step statistics), so that
`benchmarks/sweep_bench.py` can time them side by side in one process:

| function | what it is |
|---|---|
| `reference` | tight-tolerance solve of the reduced flow (Dopri8, rtol 1e-12, atol 1e-14) |
| `plain_vmap` | (b) `jax.vmap` over `diffrax.diffeqsolve`, layer flow, Tsit5, rtol 1e-6, atol 1e-9 |
| `scipy_per_init` | (c) `scipy.integrate.solve_ivp` per init, DOP853, NumPy right-hand side, one core |
| `torchdiffeq_batched` | (d) `torchdiffeq.odeint`, dopri5, state (B, L, d) |
| `gradient_descent` | (e) gradient descent on the layers, step η, batched, `jax.lax.scan` |

float64 is required: the caller turns on `jax_enable_x64` before calling `w1` (the `__main__`
below does); nothing here flips it at import.

Run as a script (`python benchmarks/baselines.py --B 64`) it runs every baseline on W1 and prints
a table, then the JSON of the results, to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import os
import platform
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np

import ddln_jax as dj
from ddln_jax import LayerFlow

# Tolerances of the compared solvers (the reference is far tighter).
RTOL, ATOL = 1e-6, 1e-9
REF_RTOL, REF_ATOL = 1e-12, 1e-14


@dataclasses.dataclass(frozen=True)
class Workload:
    """One instance of the canonical workload: a least-squares problem and B inits.

    **Fields:** `X` `(n, d)`, `y` `(n,)`, `theta_star` `(d,)`, `alphas` `(B,)`, `u0` `(B, L, d)`
    (NumPy float64), `ts` `(n_save,)`, `T` (horizon), `loss` (a `ddln_jax.LeastSquares`).
    """

    X: np.ndarray
    y: np.ndarray
    theta_star: np.ndarray
    alphas: np.ndarray
    u0: np.ndarray
    ts: np.ndarray
    T: float
    loss: dj.LeastSquares

    @property
    def B(self) -> int:
        return self.u0.shape[0]

    @property
    def L(self) -> int:
        return self.u0.shape[1]

    @property
    def d(self) -> int:
        return self.u0.shape[2]

    @property
    def n(self) -> int:
        return self.X.shape[0]

    def describe(self) -> dict:
        return {
            "B": self.B, "L": self.L, "d": self.d, "n": self.n, "T": self.T,
            "n_save": len(self.ts), "alpha_min": float(self.alphas.min()),
            "alpha_max": float(self.alphas.max()),
        }


def _require_x64():
    if not jax.config.jax_enable_x64:
        raise RuntimeError(
            "the benchmark workload is float64: call jax.config.update('jax_enable_x64', True) "
            "before building it"
        )


def w1(
    B: int,
    seed: int = 0,
    n: int = 100,
    d: int = 1000,
    L: int = 3,
    *,
    T: float = 50.0,
    n_save: int = 11,
    k: int = 5,
    alpha_range: tuple[float, float] = (0.3, 1.0),
) -> Workload:
    """The canonical workload W1 (defaults), or a smaller/shorter one for tests.

    Least squares f = (1/2n)‖Xθ − y‖² with X of N(0, 1) entries, θ* with `k` nonzero entries
    of magnitude uniform in [1, 2] and random signs, y = Xθ*; B inits of L layers with N(0, α²)
    entries, α log-spaced over `alpha_range` (one α per init); horizon `T`; `n_save` evenly
    spaced save times in [0, T]. Everything is drawn from `numpy.random.default_rng(seed)`.
    """
    _require_x64()
    if B < 1 or n < 1 or d < 1 or L < 1 or not 1 <= k <= d or n_save < 2 or T <= 0:
        raise ValueError(f"bad workload sizes: B={B}, n={n}, d={d}, L={L}, k={k}, "
                         f"n_save={n_save}, T={T}")
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    theta_star = np.zeros(d)
    support = rng.choice(d, size=k, replace=False)
    theta_star[support] = rng.uniform(1.0, 2.0, k) * rng.choice([-1.0, 1.0], k)
    y = X @ theta_star
    alphas = np.geomspace(alpha_range[0], alpha_range[1], B)
    u0 = alphas[:, None, None] * rng.standard_normal((B, L, d))
    ts = np.linspace(0.0, T, n_save)
    return Workload(X, y, theta_star, alphas, u0, ts, float(T), dj.LeastSquares(X, y))


def accuracy(theta, ref) -> float:
    """max over lanes and save times of ‖θ − θ_ref‖ / ‖θ_ref‖ (shapes `(B, n_save, d)`).

    Rows where θ_ref = 0 count the absolute error ‖θ‖ instead (no division by zero). NaNs
    (a failed run) propagate, so a failure is never hidden.
    """
    theta, ref = np.asarray(theta, np.float64), np.asarray(ref, np.float64)
    if theta.shape != ref.shape:
        raise ValueError(f"shapes differ: theta {theta.shape}, reference {ref.shape}")
    err = np.linalg.norm(theta - ref, axis=-1)
    scale = np.linalg.norm(ref, axis=-1)
    return float(np.max(err / np.where(scale > 0, scale, 1.0)))


def _block(tree):
    return jax.tree_util.tree_map(
        lambda x: x.block_until_ready() if isinstance(x, jax.Array) else x, tree
    )


def _simulate(work: Workload, **kwargs):
    return _block(dj.simulate(work.loss, work.u0, t1=work.T, ts=work.ts, **kwargs))


def _step_stats(traj) -> dict:
    steps = np.asarray(traj.num_steps)
    return {
        "steps": steps.tolist(),
        "steps_mean": float(steps.mean()),
        "steps_min": int(steps.min()),
        "steps_max": int(steps.max()),
        "rejected_total": int(np.asarray(traj.num_rejected_steps).sum()),
        # Σ per-lane steps / (B · max steps): the share of lane-steps doing useful work.
        "lane_efficiency": float(steps.sum() / (steps.size * steps.max())),
    }


def reference(work: Workload, *, max_steps: int = 1 << 20) -> dict:
    """θ at `ts` from a tight-tolerance solve: the reduced flow (exactly the layer flow's θ,
    docs/math.md), `diffrax.Dopri8()`, rtol 1e-12, atol 1e-14, vmapped over the inits.

    **Returns:** dict with `theta` `(B, n_save, d)`, `time_s` (one call, compilation
    included), step statistics. Raises if any run did not succeed.
    """
    t0 = time.perf_counter()
    tr = _simulate(work, formulation="reduced", solver=dfx.Dopri8(), rtol=REF_RTOL,
                   atol=REF_ATOL, max_steps=max_steps)
    elapsed = time.perf_counter() - t0
    if not np.all(tr.succeeded):
        bad = np.flatnonzero(~tr.succeeded)
        raise RuntimeError(f"reference solve failed for inits {bad.tolist()}: "
                           f"{np.asarray(tr.status_name)[bad].tolist()}")
    return {
        "name": "reference", "method": "reduced flow, diffrax Dopri8, rtol 1e-12, atol 1e-14, vmap",
        "theta": np.asarray(tr.theta), "time_s": elapsed, "time_includes_compile": True,
        **_step_stats(tr),
    }


def plain_vmap(work: Workload, *, rtol: float = RTOL, atol: float = ATOL) -> dict:
    """Baseline (b): `jax.vmap` over `diffrax.diffeqsolve` of the layer flow, Tsit5,
    `diffrax.PIDController(rtol, atol)` (what `ddln_jax.simulate` does with a batched `u0`,
    `formulation="layer"` and that solver and controller).

    The first call compiles (its time, minus the second's, is `compile_s`); the second,
    identical call is timed (`time_s`).

    `flush_denormal` (CPU only) flushes subnormal floats to zero during the solve, as XLA's CPU
    runtime does for the JAX baselines; torch's default (off) then is restored. Without it the
    W1 B=64 solve hit subnormal arithmetic and ran 10× slower on a 2-core CPU (383 s vs 39 s).

    **Returns:** dict with `theta`, `time_s`, `compile_s`, `first_call_s`, per-lane `steps`,
    `lane_efficiency` = Σ per-lane steps / (B · max steps), `status`.
    """
    kw = dict(formulation="layer", solver=dfx.Tsit5(),
              stepsize_controller=dfx.PIDController(rtol=rtol, atol=atol))
    t0 = time.perf_counter()
    _simulate(work, **kw)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    tr = _simulate(work, **kw)
    elapsed = time.perf_counter() - t0
    return {
        "name": "plain_vmap", "method": f"layer flow, diffrax Tsit5, PID rtol {rtol:g} atol "
        f"{atol:g}, jax.vmap over diffeqsolve ({jax.default_backend()})",
        "theta": np.asarray(tr.theta), "time_s": elapsed, "first_call_s": first,
        "compile_s": max(first - elapsed, 0.0), "status": np.asarray(tr.status_name).tolist(),
        "all_succeeded": bool(np.all(tr.succeeded)), **_step_stats(tr),
    }


# ----------------------------------------------------------------------------------------------
# (c) SciPy, one init at a time, on one core.
#
# One core is enforced by running the solves in a fresh "spawn" child process that is (1) started
# with OPENBLAS_NUM_THREADS = OMP_NUM_THREADS = MKL_NUM_THREADS = 1 in its environment, so NumPy's
# BLAS starts single-threaded (the variables must be set before NumPy is imported, hence the
# fresh process), and (2) pinned to a single CPU with os.sched_setaffinity (Linux), so nothing in
# it can use a second core. threadpoolctl, when installed, is used as well, to report BLAS threads.
# ----------------------------------------------------------------------------------------------

_ONE_THREAD_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _layer_rhs_numpy(X, y, L, d):
    n = X.shape[0]

    def rhs(t, flat):
        u = flat.reshape(L, d)
        prefix = np.ones_like(u)
        suffix = np.ones_like(u)
        for j in range(1, L):
            prefix[j] = prefix[j - 1] * u[j - 1]
            suffix[L - 1 - j] = suffix[L - j] * u[L - j]
        grad = X.T @ (X @ (prefix[-1] * u[-1]) - y) / n
        return (-(prefix * suffix) * grad).ravel()

    return rhs


def _scipy_solves(X, y, u0, ts, rtol, atol) -> dict:
    """Solve each init in turn with solve_ivp/DOP853 (runs wherever it is called)."""
    from scipy.integrate import DOP853, solve_ivp

    class CountingDOP853(DOP853):
        # One _step_impl call is one accepted step; each attempt costs n_stages evaluations.
        last = None

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.n_accepted = 0
            self.n_attempts = 0
            CountingDOP853.last = self

        def _step_impl(self):
            before = self.nfev
            out = super()._step_impl()
            self.n_accepted += 1
            self.n_attempts += (self.nfev - before) // self.n_stages
            return out

    B, L, d = u0.shape
    rhs = _layer_rhs_numpy(X, y, L, d)
    rhs(0.0, u0[0].ravel())  # warm-up (first BLAS call)
    thetas, times, nfev, accepted, rejected, ok = [], [], [], [], [], []
    t_total = time.perf_counter()
    for b in range(B):
        t0 = time.perf_counter()
        sol = solve_ivp(rhs, (ts[0], ts[-1]), u0[b].ravel(), method=CountingDOP853, t_eval=ts,
                        rtol=rtol, atol=atol)
        solver = CountingDOP853.last
        times.append(time.perf_counter() - t0)
        ok.append(bool(sol.success))
        u = sol.y.T.reshape(-1, L, d)
        theta = np.full((len(ts), d), np.nan)
        theta[: u.shape[0]] = np.prod(u, axis=1)
        thetas.append(theta)
        nfev.append(int(sol.nfev))
        accepted.append(solver.n_accepted)
        rejected.append(solver.n_attempts - solver.n_accepted)
    return {
        "theta": np.stack(thetas), "times": times, "total_s": time.perf_counter() - t_total,
        "nfev": nfev, "accepted": accepted, "rejected": rejected, "success": ok,
    }


def _scipy_child(X, y, u0, ts, rtol, atol) -> dict:
    info = {"env": {k: os.environ.get(k) for k in _ONE_THREAD_ENV}}
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        info["affinity"] = sorted(os.sched_getaffinity(0))
    else:
        info["affinity"] = None
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        limits = contextlib.nullcontext()
        info["threadpoolctl"] = False
    else:
        limits = threadpool_limits(1)
        info["threadpoolctl"] = True
    with limits:
        if info["threadpoolctl"]:
            info["blas_threads"] = [p["num_threads"] for p in threadpool_info()]
        out = _scipy_solves(X, y, u0, ts, rtol, atol)
    out["one_core"] = info
    return out


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def scipy_per_init(
    work: Workload, n_inits: int | None = None, *, rtol: float = RTOL, atol: float = ATOL,
    isolate: bool = True,
) -> dict:
    """Baseline (c): `scipy.integrate.solve_ivp` one init at a time, DOP853, `rtol`, `atol`, of
    the layer flow with a NumPy right-hand side (prefix/suffix products, Xθ, Xᵀr), `t_eval=ts`.

    Runs on the first `n_inits` inits (default all) so that the caller can extrapolate:
    `time_per_init_s · B`. With `isolate=True` (default) the solves run in a fresh process
    pinned to one CPU with single-threaded BLAS (see the comment above); with `False` they run
    here, restricted only by whatever the caller set up (reported in `one_core`). The child is
    started with "spawn", so the caller must be an importable script or module (not `python -`)
    and must keep its work under `if __name__ == "__main__":`.

    **Returns:** dict with `theta` `(n_inits, n_save, d)`, `time_s` (all solves),
    `time_per_init_s` (mean), `time_per_init` (each), `extrapolated_B_s`, `nfev`,
    accepted/rejected step counts per init, `one_core` (how one core was enforced).
    """
    m = work.B if n_inits is None else int(n_inits)
    if not 1 <= m <= work.B:
        raise ValueError(f"n_inits must be in [1, {work.B}], got {n_inits}")
    args = (work.X, work.y, work.u0[:m], work.ts, rtol, atol)
    if isolate:
        # A pool would silently restart a worker that dies at start-up; an executor raises.
        ctx = multiprocessing.get_context("spawn")
        with _env(**dict.fromkeys(_ONE_THREAD_ENV, "1")), ProcessPoolExecutor(
            max_workers=1, mp_context=ctx
        ) as pool:
            out = pool.submit(_scipy_child, *args).result()
    else:
        out = _scipy_solves(*args)
        out["one_core"] = {
            "env": {k: os.environ.get(k) for k in _ONE_THREAD_ENV},
            "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else None, "threadpoolctl": False, "note": "in-process: not restricted here",
        }
    times = np.asarray(out["times"])
    steps = np.asarray(out["accepted"]) + np.asarray(out["rejected"])
    return {
        "name": "scipy_per_init",
        "method": f"layer flow, scipy solve_ivp DOP853, rtol {rtol:g} atol {atol:g}, one init "
        "at a time, NumPy RHS, one core",
        "theta": out["theta"], "n_inits": m, "time_s": float(times.sum()),
        "time_per_init_s": float(times.mean()), "time_per_init": times.tolist(),
        "extrapolated_B_s": float(times.mean() * work.B),
        "nfev": out["nfev"], "accepted": out["accepted"], "rejected": out["rejected"],
        "steps": steps.tolist(), "steps_mean": float(steps.mean()),
        "steps_min": int(steps.min()), "steps_max": int(steps.max()),
        "all_succeeded": bool(all(out["success"])), "one_core": out["one_core"],
    }


def torchdiffeq_unavailable() -> str | None:
    """Why the torchdiffeq baseline cannot run here (`None` when it can)."""
    try:
        import torch  # noqa: F401
        import torchdiffeq  # noqa: F401
    except ImportError as e:
        return f"torch/torchdiffeq not installed ({e}); install the `bench` extra"
    return None


def torchdiffeq_batched(
    work: Workload, *, rtol: float = RTOL, atol: float = ATOL, norm: str = "max_lane_rms",
    device: str | None = None, flush_denormal: bool = True,
) -> dict | None:
    """Baseline (d): `torchdiffeq.odeint`, dopri5, on the layer flow with state `(B, L, d)`,
    float64, `t = ts`, on the GPU when `torch.cuda.is_available()`, else the CPU.

    `norm` picks the error norm of the step-size control:

    - `"max_lane_rms"` (default): max over lanes of each lane's RMS of the scaled error. Each
      lane then meets the same criterion as a per-lane diffrax solve (diffrax's PID controller
      uses the RMS norm of one lane's state), so accuracies compare fairly; all lanes still share
      one step size (the smallest any lane needs), which is inherent to batching in torchdiffeq.
    - `"joint_rms"`: torchdiffeq's default, one RMS over all B·L·d entries: it couples the lanes
      and dilutes a hard lane's error by the easy ones (up to a factor √B), so hard lanes may be
      under-resolved relative to rtol; faster but not the same accuracy contract.

    `flush_denormal` (CPU only) flushes subnormal floats to zero during the solve, as XLA's CPU
    runtime does for the JAX baselines; torch's default (off) then is restored. Without it the
    W1 B=64 solve hit subnormal arithmetic and ran 10× slower on a 2-core CPU (383 s vs 39 s).

    **Returns:** dict with `theta`, `time_s` (the solve, after a tiny warm-up), `nfev`,
    `steps_estimated` ((nfev − 2)/6: dopri5 is FSAL with 6 new evaluations per attempt, plus 2
    at the start), device; or `None` (with a warning saying why) when torch or torchdiffeq is
    not installed (`torchdiffeq_unavailable()` gives the reason).
    """
    reason = torchdiffeq_unavailable()
    if reason is not None:
        warnings.warn(f"torchdiffeq baseline skipped: {reason}", stacklevel=2)
        return None
    import torch
    import torchdiffeq

    if norm not in ("max_lane_rms", "joint_rms"):
        raise ValueError(f"norm must be 'max_lane_rms' or 'joint_rms', got {norm!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    f64 = torch.float64
    X = torch.as_tensor(work.X, dtype=f64, device=dev)
    yv = torch.as_tensor(work.y, dtype=f64, device=dev)
    u0 = torch.as_tensor(work.u0, dtype=f64, device=dev)
    ts = torch.as_tensor(work.ts, dtype=f64, device=dev)
    n = X.shape[0]
    B = u0.shape[0]
    count = [0]

    def rhs(t, u):  # u: (B, L, d)
        count[0] += 1
        ones = torch.ones_like(u[:, :1])
        prefix = torch.cat([ones, torch.cumprod(u[:, :-1], dim=1)], dim=1)
        suffix = torch.cat([torch.flip(torch.cumprod(torch.flip(u[:, 1:], [1]), dim=1), [1]),
                            ones], dim=1)
        theta = prefix[:, -1] * u[:, -1]
        grad = (theta @ X.T - yv) @ X / n  # (B, d)
        return -(prefix * suffix) * grad[:, None, :]

    options = {}
    if norm == "max_lane_rms":
        # torchdiffeq hands the norm the error already divided by atol + rtol·|y|.
        options["norm"] = lambda e: e.reshape(B, -1).pow(2).mean(dim=1).sqrt().max()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    flush = flush_denormal and dev.type == "cpu"
    if flush and not torch.set_flush_denormal(True):
        flush = False  # the CPU does not support it
    try:
        # Warm-up (library loading, CUDA context) on a short horizon; not timed.
        torchdiffeq.odeint(rhs, u0, ts[:2] * 1e-3, rtol=rtol, atol=atol, method="dopri5",
                           options=dict(options))
        sync()
        count[0] = 0
        t0 = time.perf_counter()
        with torch.no_grad():
            sol = torchdiffeq.odeint(rhs, u0, ts, rtol=rtol, atol=atol, method="dopri5",
                                     options=dict(options))
            sync()
        elapsed = time.perf_counter() - t0
    finally:
        if flush:
            torch.set_flush_denormal(False)
    theta = torch.prod(sol, dim=2).permute(1, 0, 2).cpu().numpy()  # (B, n_save, d)
    return {
        "name": "torchdiffeq_batched",
        "method": f"layer flow, torchdiffeq dopri5, rtol {rtol:g} atol {atol:g}, state (B, L, d), "
        f"norm {norm}, {device}",
        "theta": theta, "time_s": elapsed, "nfev": count[0],
        "steps_estimated": (count[0] - 2) / 6, "norm": norm, "device": device,
        "flush_denormal": flush,
        "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
    }


def gradient_descent(work: Workload, eta: float = 1e-3) -> dict:
    """Baseline (e): gradient descent on the layers, u ← u − η·(∏_{k≠j} u^k) ⊙ ∇f(θ), for T/η
    steps, batched over the inits, in one jitted `jax.lax.scan`, recording θ at `ts` (which
    must be evenly spaced at multiples of η).

    **Returns:** dict with `theta` `(B, n_save, d)`, `time_s` (compiled call only),
    `compile_s`, `n_steps`.
    """
    ts = work.ts
    total = round(work.T / eta)
    n_seg = len(ts) - 1
    per_seg = total // n_seg
    if not (np.isclose(total * eta, work.T) and per_seg * n_seg == total
            and np.allclose(ts, eta * per_seg * np.arange(n_seg + 1))):
        raise ValueError(f"T/η and the save interval must be whole numbers of steps (η={eta}, "
                         f"T={work.T}, ts={ts})")
    flow = LayerFlow()
    field = jax.vmap(lambda u, loss: flow.vector_field(0.0, u, (loss, None)), in_axes=(0, None))

    def run(u0, loss):
        def step(u, _):
            return u + eta * field(u, loss), None

        def segment(u, _):
            u, _ = jax.lax.scan(step, u, None, length=per_seg)
            return u, jnp.prod(u, axis=1)

        _, thetas = jax.lax.scan(segment, u0, None, length=n_seg)
        return jnp.concatenate([jnp.prod(u0, axis=1)[None], thetas], axis=0).transpose(1, 0, 2)

    u0 = jnp.asarray(work.u0)
    t0 = time.perf_counter()
    compiled = jax.jit(run).lower(u0, work.loss).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    theta = compiled(u0, work.loss).block_until_ready()
    elapsed = time.perf_counter() - t0
    return {
        "name": "gradient_descent",
        "method": f"gradient descent on the layers, eta {eta:g}, {total} steps, batched lax.scan "
        f"({jax.default_backend()})",
        "theta": np.asarray(theta), "time_s": elapsed, "compile_s": compile_s, "n_steps": total,
        "eta": eta,
    }


# ----------------------------------------------------------------------------------------------
# Script
# ----------------------------------------------------------------------------------------------

def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _table(rows) -> str:
    head = (f"{'baseline':<20} {'time_s':>9} {'for_B_s':>9} {'compile_s':>9} {'steps mean/max':>15}"
            f" {'lane_eff':>8} {'rel_err':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"{r['name']:<20} skipped: {r['skipped']}")
            continue
        steps = r.get("steps_mean"), r.get("steps_max")
        if steps[0] is None and "steps_estimated" in r:
            steps = (r["steps_estimated"], r["steps_estimated"])
        if steps[0] is None and "n_steps" in r:
            steps = (r["n_steps"], r["n_steps"])
        st = "-" if steps[0] is None else f"{steps[0]:.0f}/{steps[1]:.0f}"
        lines.append(
            f"{r['name']:<20} {r['time_s']:>9.3f} {_fmt(r.get('extrapolated_B_s', r['time_s']), '>9.3f')}"
            f" {_fmt(r.get('compile_s'), '>9.2f')} {st:>15} {_fmt(r.get('lane_efficiency'), '>8.3f')}"
            f" {_fmt(r.get('rel_err'), '>9.2e')}"
        )
    return "\n".join(lines)


def workload_args(p: argparse.ArgumentParser) -> None:
    """The command-line options that size W1 (shared with sweep_bench.py)."""
    p.add_argument("--B", type=int, default=64)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--d", type=int, default=1000)
    p.add_argument("--L", type=int, default=3)
    p.add_argument("--T", type=float, default=50.0)
    p.add_argument("--seed", type=int, default=0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    workload_args(p)
    p.add_argument("--scipy-inits", type=int, default=None, help="inits for scipy (default all)")
    p.add_argument("--eta", type=float, default=1e-3)
    p.add_argument("--torch-norm", default="max_lane_rms", choices=["max_lane_rms", "joint_rms"])
    p.add_argument("--torch-keep-denormals", action="store_true",
                   help="run torchdiffeq without flushing subnormals (torch's default)")
    p.add_argument("--skip", nargs="*", default=[],
                   choices=["plain_vmap", "scipy", "torchdiffeq", "gradient_descent"])
    p.add_argument("--json", default=None, help="also write the JSON here")
    a = p.parse_args(argv)

    jax.config.update("jax_enable_x64", True)
    work = w1(a.B, a.seed, a.n, a.d, a.L, T=a.T)
    ref = reference(work)
    print(f"reference: {ref['time_s']:.2f} s, steps mean {ref['steps_mean']:.0f} max "
          f"{ref['steps_max']}", file=sys.stderr, flush=True)
    rows = []
    runs = [
        ("plain_vmap", lambda: plain_vmap(work)),
        ("scipy", lambda: scipy_per_init(work, a.scipy_inits)),
        ("torchdiffeq", lambda: torchdiffeq_batched(work, norm=a.torch_norm,
                                                   flush_denormal=not a.torch_keep_denormals)),
        ("gradient_descent", lambda: gradient_descent(work, a.eta)),
    ]
    for key, fn in runs:
        if key in a.skip:
            continue
        r = fn()
        if r is None:
            r = {"name": key, "skipped": torchdiffeq_unavailable()}
        if r.get("theta") is not None:
            m = r["theta"].shape[0]
            r["rel_err"] = accuracy(r["theta"], ref["theta"][:m])
        rows.append(r)
        print(f"{r['name']}: done", file=sys.stderr, flush=True)
    ref_row = dict(ref, rel_err=None)
    print(_table([ref_row, *rows]))
    result = {
        "workload": work.describe(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "jax_backend": jax.default_backend(),
                    "jax_devices": [str(x) for x in jax.devices()]},
        "results": [{k: v for k, v in r.items() if k != "theta"} for r in [ref, *rows]],
    }
    text = json.dumps(result, indent=1)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
