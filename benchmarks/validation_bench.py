"""Cost of validating a batch of inits at `simulate`'s boundary (target: B = 2000 in ≤ 0.1 s).

Times the checks `simulate` runs before compiling — shapes, finiteness, and for the mirror and
dual formulations the computability of every coordinate's geometry — on B Gaussian inits of
W1's size (L = 3, d = 1000), without solving anything.

    PYTHONPATH=. python benchmarks/validation_bench.py
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np


def main():
    jax.config.update("jax_enable_x64", True)
    from ddln_jax._init import check_init
    from ddln_jax._simulate import _check_geometry

    B, L, d = 2000, 3, 1000
    U = np.random.default_rng(0).standard_normal((B, L, d)) * 0.5
    check_init(U, batch=True)  # warm-up
    rows = {}
    for name, fn in {
        "shapes_and_finiteness": lambda: check_init(U, batch=True),
        "geometry_of_every_coordinate": lambda: _check_geometry(U, "the mirror formulation"),
    }.items():
        best = np.inf
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        rows[name] = best
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "jax_backend": jax.default_backend()},
        "B": B, "L": L, "d": d, "seconds": rows, "total_s": sum(rows.values()), "target_s": 0.1,
    }
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / f"validation_bench_{jax.default_backend()}.json"
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
