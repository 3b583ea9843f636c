"""Discrete training benchmark: 8 learning rates × 64 inits × 10⁴ GD steps on W1.

W1 (benchmarks/baselines.py: least squares n = 100, d = 1000, X ~ N(0, 1), L = 3, Gaussian inits
with α log-spaced in [0.3, 1]) trained by gradient descent on the layers, compared as:

| name | what it is |
|---|---|
| `compiled` | `ddln_jax.train`: every learning rate × init × step in one jitted `lax.scan` |
| `jax_loop_batched` | a Python loop over steps of one jitted optax update on all lanes at once |
| `jax_loop_per_run` | the practitioners' loop: one run at a time, a jitted optax update per step |
| `torch_loop_per_run` | the same in PyTorch (`torch.optim.SGD`, autograd), one run at a time |
| `torch_loop_batched` | PyTorch, all lanes in one tensor, a Python loop over steps |
| `numpy_batched` | NumPy, all lanes at once, hand-written layer gradients |

The baselines run `--baseline-steps` steps (default 10⁴; less for a quick look) and, for the
per-run loops, `--per-run` runs; their times are extrapolated linearly to the full workload
(`time_full_s`), which is exact up to noise since every step costs the same. `cpu_s` is the
process CPU time (all threads) of the same section: on a shared, oversubscribed machine it
measures the work done where wall time measures the share of the CPU received. Accuracy: the
max relative difference of θ against the compiled call at the same step (`rel_diff`).

Run: `python benchmarks/train_bench.py [--small] [--json PATH]` (default JSON:
benchmarks/results/train_bench_cpu.json; with --small only where --json says).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import w1  # noqa: E402

import ddln_jax as dj  # noqa: E402
from ddln_jax._discrete import layer_grad  # noqa: E402


def rel_diff(theta, ref) -> float:
    """max over lanes of ‖θ − θ_ref‖ / ‖θ_ref‖ (NaN propagates: a failure is never hidden)."""
    theta, ref = np.asarray(theta, np.float64), np.asarray(ref, np.float64)
    err = np.linalg.norm(theta - ref, axis=-1)
    return float(np.max(err / np.maximum(np.linalg.norm(ref, axis=-1), 1e-300)))


def compiled(work, lrs, steps, check_step):
    """`ddln_jax.train` on all (lr, init) lanes; θ saved at `check_step` and at the end."""
    u0 = jnp.asarray(work.u0)
    saves = np.unique([0, check_step, steps])
    # Run lengths are traced: a 2-step run with as many saves compiles the same program.
    t0 = time.perf_counter()
    warm = dj.train(work.loss, u0, optax.sgd, steps=2, learning_rate=lrs,
                    saves=np.arange(len(saves)) * (2 // max(len(saves) - 1, 1)))
    jax.block_until_ready(warm.theta)
    first = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    res = dj.train(work.loss, u0, optax.sgd, steps=steps, learning_rate=lrs, saves=saves)
    jax.block_until_ready(res.theta)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    k = int(np.flatnonzero(saves == check_step)[0])
    return {
        "name": "compiled", "time_s": elapsed, "time_full_s": elapsed, "cpu_s": cpu,
        "cpu_full_s": cpu,
        "compile_s": first, "steps_run": steps, "lanes_run": res.theta.shape[0] *
        res.theta.shape[1],
        "status_counts": {str(n): int(c) for n, c in zip(*np.unique(res.status_name,
                                                                     return_counts=True))},
    }, np.asarray(res.theta[:, :, k]), res


def _jax_update(loss):
    opt = optax.inject_hyperparams(optax.sgd, hyperparam_dtype=jnp.float64)(learning_rate=0.0)

    def init(u, lr):
        s = opt.init(u)
        return s._replace(hyperparams={**s.hyperparams, "learning_rate": lr})

    def step(u, s):
        upd, s = opt.update(layer_grad(loss, u), s, u)
        return optax.apply_updates(u, upd), s

    return init, step


def jax_loop_batched(work, lrs, steps):
    init, step = _jax_update(work.loss)
    vinit = jax.jit(jax.vmap(jax.vmap(init, (0, None)), (None, 0)))
    vstep = jax.jit(jax.vmap(jax.vmap(step)))
    u = jnp.broadcast_to(jnp.asarray(work.u0), (len(lrs), *work.u0.shape))
    s = vinit(jnp.asarray(work.u0), jnp.asarray(lrs))
    jax.block_until_ready(vstep(u, s))  # compile
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        u, s = vstep(u, s)
    u = jax.block_until_ready(u)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"name": "jax_loop_batched", "time_s": elapsed, "cpu_s": cpu, "steps_run": steps,
            "lanes_run": len(lrs) * work.B}, np.asarray(jnp.prod(u, axis=-2))


def jax_loop_per_run(work, lrs, steps, runs):
    init, step = _jax_update(work.loss)
    jinit, jstep = jax.jit(init), jax.jit(step)
    thetas, elapsed, cpu = [], 0.0, 0.0
    for (i, j) in runs:
        u = jnp.asarray(work.u0[j])
        s = jinit(u, jnp.asarray(lrs[i]))
        jax.block_until_ready(jstep(u, s))  # compile (once) / warm
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            u, s = jstep(u, s)
        u = jax.block_until_ready(u)
        elapsed += time.perf_counter() - t0
        cpu += time.process_time() - c0
        thetas.append(np.asarray(jnp.prod(u, axis=0)))
    return {"name": "jax_loop_per_run", "time_s": elapsed, "cpu_s": cpu, "steps_run": steps,
            "lanes_run": len(runs)}, np.array(thetas)


def torch_unavailable() -> str | None:
    try:
        import torch  # noqa: F401
    except ImportError as e:
        return f"torch not installed ({e}); `pip install torch` (the `bench` extra)"
    return None


_TORCH_THREADS = 1


def _torch_setup():
    import torch

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(_TORCH_THREADS)
    torch.set_flush_denormal(True)  # as XLA's CPU runtime does
    return torch


def torch_loop_per_run(work, lrs, steps, runs):
    """One run at a time: `torch.optim.SGD` on the layers, loss.backward() every step."""
    torch = _torch_setup()
    X = torch.tensor(work.X)
    y = torch.tensor(work.y)
    n = X.shape[0]
    thetas, elapsed, cpu = [], 0.0, 0.0
    for (i, j) in runs:
        u = torch.tensor(work.u0[j], requires_grad=True)
        opt = torch.optim.SGD([u], lr=float(lrs[i]))
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            r = X @ torch.prod(u, dim=0) - y
            loss = 0.5 * (r @ r) / n
            loss.backward()
            opt.step()
        elapsed += time.perf_counter() - t0
        cpu += time.process_time() - c0
        thetas.append(torch.prod(u.detach(), dim=0).numpy())
    return {"name": "torch_loop_per_run", "time_s": elapsed, "cpu_s": cpu, "steps_run": steps,
            "lanes_run": len(runs), "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads()}, np.array(thetas)


def torch_loop_batched(work, lrs, steps):
    """All lanes in one (R, B, L, d) tensor; per-lane step sizes; autograd every step."""
    torch = _torch_setup()
    X = torch.tensor(work.X)
    y = torch.tensor(work.y)
    n = X.shape[0]
    lr = torch.tensor(lrs)[:, None, None, None]
    u = torch.tensor(np.broadcast_to(work.u0, (len(lrs), *work.u0.shape)).copy(),
                     requires_grad=True)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        r = torch.prod(u, dim=-2) @ X.T - y
        loss = 0.5 * (r * r).sum() / n  # lanes are independent: the sum separates
        (g,) = torch.autograd.grad(loss, u)
        with torch.no_grad():
            u -= lr * g
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"name": "torch_loop_batched", "time_s": elapsed, "cpu_s": cpu, "steps_run": steps,
            "lanes_run": len(lrs) * work.B}, torch.prod(u.detach(), dim=-2).numpy()


def numpy_batched(work, lrs, steps):
    X, y = work.X, work.y
    n = X.shape[0]
    lr = np.asarray(lrs)[:, None, None, None]
    u = np.broadcast_to(work.u0, (len(lrs), *work.u0.shape)).copy()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        theta = np.prod(u, axis=-2)
        g = ((theta @ X.T - y) @ X) / n
        ones = np.ones_like(u[..., :1, :])
        pre = np.cumprod(np.concatenate([ones, u[..., :-1, :]], axis=-2), axis=-2)
        suf = np.cumprod(np.concatenate([ones, u[..., :0:-1, :]], axis=-2), axis=-2)[..., ::-1, :]
        u = u - lr * (pre * suf) * g[..., None, :]
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"name": "numpy_batched", "time_s": elapsed, "cpu_s": cpu, "steps_run": steps,
            "lanes_run": len(lrs) * work.B}, np.prod(u, axis=-2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true",
                   help="quick run: 2 learning rates × 8 inits × 500 steps, d = 200")
    p.add_argument("--R", type=int, default=8, help="learning rates")
    p.add_argument("--B", type=int, default=64, help="inits")
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--d", type=int, default=1000)
    p.add_argument("--baseline-steps", type=int, default=None,
                   help="steps of each baseline (default: all); times are extrapolated")
    p.add_argument("--per-run", type=int, default=4, help="runs timed in the per-run loops")
    p.add_argument("--lr-range", type=float, nargs=2, default=(1e-4, 1e-3))
    p.add_argument("--skip", nargs="*", default=[],
                   choices=["jax_loop_batched", "jax_loop_per_run", "torch_loop_per_run",
                            "torch_loop_batched", "numpy_batched"])
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on this shared 2-core machine two "
                   "threads measured 30× slower per step, OpenMP barriers under contention)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    global _TORCH_THREADS
    _TORCH_THREADS = a.torch_threads
    if a.small:
        a.R, a.B, a.steps, a.d = 2, 8, 500, 200
    jax.config.update("jax_enable_x64", True)
    work = w1(a.B, d=a.d)
    lrs = np.geomspace(*a.lr_range, a.R)
    base_steps = a.baseline_steps or a.steps
    if not 1 <= base_steps <= a.steps:
        raise SystemExit(f"--baseline-steps must lie in [1, {a.steps}]")
    lanes = a.R * a.B
    # Per-run lanes spread over the grid: (lr index, init index).
    rng = np.random.default_rng(0)
    runs = [(int(i), int(j)) for i, j in zip(rng.integers(0, a.R, a.per_run),
                                             rng.integers(0, a.B, a.per_run))]

    row, ref, res = compiled(work, lrs, a.steps, base_steps)
    print(f"compiled: {row['time_s']:.2f} s (+{row['compile_s']:.1f} s compile)",
          file=sys.stderr, flush=True)
    stable = np.asarray(dj.stable_learning_rate(work.loss, jnp.asarray(work.u0)))
    rows = [row]
    ref_runs = np.array([ref[i, j] for i, j in runs])
    tasks = {
        "jax_loop_batched": lambda: jax_loop_batched(work, lrs, base_steps),
        "jax_loop_per_run": lambda: jax_loop_per_run(work, lrs, base_steps, runs),
        "torch_loop_per_run": lambda: torch_loop_per_run(work, lrs, base_steps, runs),
        "torch_loop_batched": lambda: torch_loop_batched(work, lrs, base_steps),
        "numpy_batched": lambda: numpy_batched(work, lrs, base_steps),
    }
    path = a.json or (None if a.small else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", "train_bench_cpu.json"))

    def result():
        return {
        "workload": {**work.describe(), "learning_rates": lrs.tolist(), "steps": a.steps,
                     "lanes": lanes, "baseline_steps": base_steps, "per_run_lanes": runs,
                     "stable_learning_rate_min": float(stable.min()),
                     "stable_learning_rate_median": float(np.median(stable))},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "note": "2-core CPU shared with other jobs",
                    "load_average_1min": os.getloadavg()[0],
                    "jax_version": jax.__version__, "jax_backend": jax.default_backend()},
        "results": rows,
        }

    def write():
        # After every row: a run cut short still leaves what it measured.
        if path:
            with open(path, "w") as f:
                f.write(json.dumps(result(), indent=1) + "\n")

    write()
    for name, fn in tasks.items():
        if name in a.skip:
            continue
        if name.startswith("torch") and torch_unavailable():
            rows.append({"name": name, "skipped": torch_unavailable()})
            continue
        r, theta = fn()
        scale = (a.steps / r["steps_run"]) * (lanes / r["lanes_run"])
        r["time_full_s"] = r["time_s"] * scale
        r["cpu_full_s"] = r["cpu_s"] * scale
        r["cpu_speedup_of_compiled"] = r["cpu_full_s"] / row["cpu_s"]
        r["rel_diff"] = rel_diff(theta, ref_runs if name.endswith("per_run") else ref)
        r["speedup_of_compiled"] = r["time_full_s"] / row["time_s"]
        rows.append(r)
        print(f"{name}: {r['time_s']:.2f} s for {r['lanes_run']} lanes × {r['steps_run']} "
              f"steps → {r['time_full_s']:.1f} s full, rel diff {r['rel_diff']:.2e}",
              file=sys.stderr, flush=True)
        write()
    print(json.dumps(result(), indent=1))


if __name__ == "__main__":
    main()
