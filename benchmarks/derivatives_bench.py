"""Cost of exact derivatives (issue: derivatives of outcomes), on the workload W1.

- Forward mode on the lane engine: d θ_final / d α (and the time to ε) for a sweep of B runs,
  against the time of the same sweep without derivatives (target ≤ 3× on CPU).
- Reverse mode through one W1 run (`jax.grad` of f(θ(T)) with respect to α through diffrax's
  checkpointed adjoint): time and peak memory of the compiled program as XLA reports it,
  against the size of one state (memory a user would expect: O(√steps) states).

    PYTHONPATH=. python benchmarks/derivatives_bench.py --B 64 --lanes 16
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import baselines as bl  # noqa: E402

import ddln_jax as dj  # noqa: E402


def _timed(fn, repeat=2):
    fn()  # compile
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        jax.tree_util.tree_map(lambda x: x.block_until_ready() if isinstance(x, jax.Array) else x, out)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bl.workload_args(p)
    p.add_argument("--lanes", type=int, default=16)
    p.add_argument("--stop-ratio", type=float, default=1e-4)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    work = bl.w1(a.B, a.seed, a.n, a.d, a.L, T=a.T)
    U = jnp.asarray(work.u0)
    dU = U / jnp.asarray(work.alphas)[:, None, None]
    kw = dict(t1=work.T, ts=work.ts, rtol=bl.RTOL, atol=bl.ATOL, stop_ratio=a.stop_ratio,
              lanes=a.lanes)
    t_plain, tr = _timed(lambda: dj.simulate(work.loss, U, **kw))
    t_jvp, (tr2, dtr) = _timed(lambda: dj.simulate_jvp(work.loss, U, dU, **kw))
    assert np.array_equal(np.asarray(tr.status_name), np.asarray(tr2.status_name))

    # Reverse mode through one run: f(θ(T)) as a function of α.
    v = U[0] / work.alphas[0]
    loss = work.loss

    def final_loss(alpha):
        return dj.simulate(loss, alpha * v, t1=work.T, rtol=bl.RTOL, atol=bl.ATOL).loss_final

    grad = jax.jit(jax.grad(final_loss))
    compiled = grad.lower(float(work.alphas[0])).compile()
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    t_grad, g = _timed(lambda: grad(float(work.alphas[0])))
    t_fwd, _ = _timed(lambda: jax.jit(final_loss)(float(work.alphas[0])))
    steps = int(dj.simulate(loss, U[0], t1=work.T, rtol=bl.RTOL, atol=bl.ATOL).num_steps)
    state_bytes = work.u0.shape[-1] * 8
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": __import__("os").cpu_count(), "jax_backend": jax.default_backend(),
                    "jax": jax.__version__},
        "workload": {"B": a.B, "n": a.n, "d": a.d, "L": a.L, "T": a.T, "lanes": a.lanes,
                     "stop_ratio": a.stop_ratio},
        "forward_mode_engine": {
            "sweep_s": t_plain, "sweep_with_dtheta_dalpha_s": t_jvp, "ratio": t_jvp / t_plain,
            "target_ratio": 3.0,
        },
        "reverse_mode_one_run": {
            "forward_s": t_fwd, "grad_s": t_grad, "ratio": t_grad / t_fwd, "steps": steps,
            "xla_temp_bytes": temp, "state_bytes": state_bytes,
            "temp_in_states": (temp / state_bytes) if temp else None,
            "grad": float(g),
        },
    }
    print(json.dumps(result, indent=2))
    out = Path(a.json or Path(__file__).parent / "results" / f"derivatives_bench_{jax.default_backend()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
