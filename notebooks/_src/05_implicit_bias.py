# %% [markdown]
# # 05 · Implicit bias: where the flow ends, from ℓ1 (small α) to ℓ2 (large α)
#
# On interpolating least squares ($y \in \operatorname{range} X$) the flow keeps
# $\nabla Q(\theta(t)) - \nabla Q(\theta_0)$ in $\operatorname{range}(X^\top)$, so its limit is
# the Bregman projection of the init onto the interpolators (docs/math.md, "Implicit bias"):
#
# $$\theta_\infty = \arg\min\{D_Q(\theta, \theta_0) : X\theta = y\}.$$
#
# **Claims.**
# 1. Simulated limits match `dj.implicit_bias_limit` (Newton on the dual) to ≤ 1e-8 relative.
# 2. As α → 0 the limit tends to the minimum-ℓ1 interpolator (`dj.small_init_limit`,
#    `dj.weighted_l1_interpolator`), at distance ∝ α^L for L ≥ 3 and a slow power of α for L = 2.
# 3. As α → ∞ (inits with θ0 = 0) it tends to the minimum-ℓ2 interpolator (`dj.kernel_limit`), at
#    distance ∝ α^{−2L}.
# 4. The signed network θ = w₊² − w₋² from Woodworth's init w±(0) = α ends at the minimizer of
#    Woodworth's closed-form potential, the same point as the product network from the zero-first
#    init at scale 2α.

# %%
import jax

jax.config.update("jax_enable_x64", True)  # the library never flips this for you
import time

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import ddln_jax as dj

FULL = False  # True: the full size (meant for an accelerator)
n, d = (20, 100) if FULL else (4, 8)
B = 6  # inits per batch: every Newton solve below has this batch shape (one compile per depth)
T0 = time.perf_counter()
rng = np.random.default_rng(0)
X = rng.normal(size=(n, d))
theta_planted = np.zeros(d)
theta_planted[[1, 5]] = [1.0, -0.7]
y = X @ theta_planted
loss = dj.LeastSquares(X, y)
TS = np.concatenate([[0.0], np.geomspace(1e-2, 2e3, 60)])


def rel(a, b):
    """Relative distance per init (last axis: coordinates)."""
    return np.linalg.norm(np.asarray(a) - np.asarray(b), axis=-1) / np.linalg.norm(np.asarray(b), axis=-1)


# %% [markdown]
# ## 1. Simulated limits against the Bregman projection
# Six inits at depth 3 (zero-first and Gaussian, scales 0.3 to 1.5), simulated in one batch to
# t = 2000 with tight tolerances (rtol = 1e-12, atol = 1e-14); by then the loss is below 1e-24 of
# its start.

# %%
L = 3
keys = jax.random.split(jax.random.PRNGKey(1), 4)
u0 = jnp.stack([dj.zero_first_init(L, d, 0.3), dj.zero_first_init(L, d, 1.0)]
               + [dj.gaussian_init(k, L, d, s) for k, s in zip(keys, (0.3, 0.6, 1.0, 1.5))])
lim = dj.implicit_bias_limit(X, y, u0)
tr = dj.simulate(loss, u0, t1=TS[-1], ts=TS, rtol=1e-12, atol=1e-14, max_steps=100_000)
err = rel(tr.theta_final, lim.theta)
print("Newton:", lim.status_name, "iterations", np.asarray(lim.iterations))
print("simulation:", tr.status_name, "t_final", np.array2string(np.asarray(tr.t_final), precision=1))
print("‖θ_sim − θ∞‖/‖θ∞‖ =", np.array2string(err, precision=2))

fig, ax = plt.subplots(figsize=(6, 3.6))
for k in range(B):
    dist = rel(tr.theta[k], lim.theta[k])
    ok = np.isfinite(dist)
    ax.loglog(TS[ok][1:], dist[ok][1:], label=["zero-first 0.3", "zero-first 1.0", "gauss 0.3",
                                                "gauss 0.6", "gauss 1.0", "gauss 1.5"][k])
ax.axhline(1e-8, color="k", ls=":", lw=1)
ax.set(xlabel="t", ylabel="‖θ(t) − θ∞‖/‖θ∞‖", title="L = 3: the flow ends at the Bregman projection")
ax.legend(fontsize=7)
fig.tight_layout()

# %% [markdown]
# **Check.** Every run ends with status `success` and a loss below 1e-24 of its start, every
# Newton solve with `success`, and the simulated end point is within 1e-8 (relative) of
# `implicit_bias_limit`, which interpolates.

# %%
assert np.all(tr.status_name == "success") and np.all(lim.status_name == "success")
assert np.all(np.asarray(tr.loss_final) <= 1e-24 * np.asarray(tr.loss[:, 0]))
assert np.all(err <= 1e-8), err
assert np.all(np.asarray(lim.residual) <= 1e-10)

# %% [markdown]
# ## 2. The ℓ1 limit as α → 0, per depth
# For L ≥ 3, $D_Q(\theta, 0) = \Phi(\infty)\|\theta\|_1 + O(1)$ with Φ(∞) = c_L α^{−(L−2)}: the
# limit tends to the minimum-ℓ1 interpolator (for the zero-first init, weights are uniform and
# `dj.small_init_limit` is `dj.weighted_l1_interpolator` with unit weights). For L = 2 the
# weight is only log(1/α), and the approach is much slower.

# %%
l1 = dj.weighted_l1_interpolator(X, y)
# Each depth compiles its own Newton solve (~6 s of CPU): the reduced size shows L = 2 and 3.
DEPTHS = (2, 3, 4) if FULL else (2, 3)
ALPHAS = {2: np.geomspace(1e-1, 1e-16, B), 3: np.geomspace(1e-1, 1e-4, B), 4: np.geomspace(1e-1, 1e-3, B)}
ALPHAS = {L: ALPHAS[L] for L in DEPTHS}
dist_l1 = {}
for L, alphas in ALPHAS.items():
    assert np.allclose(dj.small_init_limit(X, y, dj.zero_first_init(L, d, 0.1)), l1, atol=1e-12)
    res = dj.implicit_bias_limit(X, y, jnp.stack([dj.zero_first_init(L, d, a) for a in alphas]))
    assert np.all(res.status_name == "success"), res.status_name
    dist_l1[L] = np.abs(np.asarray(res.theta) - l1).sum(axis=1)
    slopes = np.diff(np.log(dist_l1[L])) / np.diff(np.log(alphas))
    print(f"L = {L}: ‖θ∞ − θ_ℓ1‖₁ = {np.array2string(dist_l1[L], precision=2)}\n"
          f"       local slopes {np.array2string(slopes, precision=3)}")

fig, ax = plt.subplots(figsize=(6, 3.6))
for L, alphas in ALPHAS.items():
    ax.loglog(alphas, dist_l1[L], "o-", color=f"C{L}", label=f"L = {L}")
    if L >= 3:
        ax.loglog(alphas, dist_l1[L][-1] * (alphas / alphas[-1]) ** L, ":", color=f"C{L}", lw=1)
ax.set(xlabel="α", ylabel="‖θ∞(α) − θ_ℓ1‖₁", title="small α: the minimum-ℓ1 interpolator (dotted: α^L)")
ax.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# **Checks.** The distance decreases monotonically in every depth. For L ≥ 3 its local log–log
# slope rises to L and is L to ±0.05 over the last interval (the correction is O(α)). For L = 2
# it decays as a small power of α (a slope between 0.1 and 0.5, constant to within 0.02 over the last
# three intervals: the entropic term of the potential, weighted 1/log(1/α), moves the limit off
# the LP vertex by an amount exponentially small in log(1/α)); at α = 1e-16 it is still 10⁴ times
# farther from the ℓ1 interpolator than L = 3 at α = 1e-4.

# %%
for L, alphas in ALPHAS.items():
    dist = dist_l1[L]
    assert np.all(np.diff(dist) < 0), (L, dist)
    slopes = np.diff(np.log(dist)) / np.diff(np.log(alphas))
    if L >= 3:
        assert np.all(np.diff(slopes) > -0.01) and abs(slopes[-1] - L) <= 0.05, (L, slopes)
    else:
        assert np.all((slopes[-3:] > 0.1) & (slopes[-3:] < 0.5)), slopes
        assert np.ptp(slopes[-3:]) <= 0.02, slopes
assert dist_l1[2][-1] > 1e4 * dist_l1[3][-1]

# %% [markdown]
# ## 3. The ℓ2 (kernel) regime for large α
# For the zero-first init θ0 = 0 and the metric at the init is uniform, so the linearized limit
# `dj.kernel_limit` is the minimum-ℓ2 interpolator X⁺y. The flow's limit approaches it as α grows.

# %%
l2 = np.linalg.pinv(X) @ y
BIG = np.geomspace(1.0, 16.0, B)
dist_l2 = {}
for L in DEPTHS:
    k = dj.kernel_limit(X, y, dj.zero_first_init(L, d, 2.0))
    assert np.allclose(k, l2, rtol=0, atol=1e-12)
    res = dj.implicit_bias_limit(X, y, jnp.stack([dj.zero_first_init(L, d, a) for a in BIG]))
    assert np.all(res.status_name == "success"), res.status_name
    dist_l2[L] = rel(res.theta, l2)
    slopes = np.diff(np.log(dist_l2[L])) / np.diff(np.log(BIG))
    print(f"L = {L}: ‖θ∞ − X⁺y‖/‖X⁺y‖ = {np.array2string(dist_l2[L], precision=2)}, "
          f"last slope {slopes[-1]:.3f} (predicted −{2 * L})")
    assert abs(slopes[-1] + 2 * L) <= 0.05, (L, slopes)

fig, ax = plt.subplots(figsize=(6, 3.6))
for L in DEPTHS:
    ax.loglog(BIG, dist_l2[L], "o-", color=f"C{L}", label=f"L = {L}")
    ax.loglog(BIG, dist_l2[L][-1] * (BIG / BIG[-1]) ** (-2 * L), ":", color=f"C{L}", lw=1)
ax.set(xlabel="α", ylabel="‖θ∞(α) − X⁺y‖/‖X⁺y‖", title="large α: the minimum-ℓ2 interpolator (dotted: α^−2L)")
ax.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# ## 4. The signed model (Woodworth et al.) next to the product model
# `dj.simulate(..., model="signed")` runs θ = θ⁺ − θ⁻ with layers of shape (2, L, d). Woodworth's
# init sets every layer to α: w±(0) = α, θ0 = 0. At L = 2, θ = w₊² − w₋² and the flow is a mirror
# flow with the closed-form potential
#
# $$Q_\alpha(\theta) = \alpha^2\sum_i \Big(\tfrac{\theta_i}{\alpha^2}\operatorname{arcsinh}
# \tfrac{\theta_i}{2\alpha^2} - \sqrt{4 + \theta_i^2/\alpha^4} + 2\Big),\qquad
# \nabla Q_\alpha(\theta) = \operatorname{arcsinh}\frac{\theta}{2\alpha^2},$$
#
# so its limit is $\theta = 2\alpha^2\sinh(X^\top\lambda)$ with $X\theta = y$. Below, λ comes from
# Newton's method on the dual $\min_\lambda 2\alpha^2\sum_i\cosh((X^\top\lambda)_i) - \lambda\cdot y$,
# written here in NumPy, independently of the library. The product network from the zero-first
# init at scale α' has ∇Q(θ) = ½ arcsinh(2θ/α'²): the same limit when α' = 2α.

# %%
def woodworth_limit(alpha, tol=1e-14):
    lam = np.zeros(n)
    dual = lambda lam: 2 * alpha**2 * np.sum(np.cosh(X.T @ lam)) - lam @ y
    for _ in range(200):
        grad = 2 * alpha**2 * X @ np.sinh(X.T @ lam) - y
        if np.linalg.norm(grad) <= tol * np.linalg.norm(y):
            break
        hess = 2 * alpha**2 * (X * np.cosh(X.T @ lam)) @ X.T
        step, s = np.linalg.solve(hess, grad), 1.0
        with np.errstate(over="ignore"):  # a too-long trial step overflows cosh: halve it
            while dual(lam - s * step) > dual(lam) - 1e-4 * s * (grad @ step):
                s /= 2
        lam = lam - s * step
    return 2 * alpha**2 * np.sinh(X.T @ lam)


WALPHAS = np.geomspace(1e-2, 3.0, B)
u_signed = jnp.stack([jnp.full((2, 2, d), a) for a in WALPHAS])  # w±(0) = α, shape (B, 2, L, d)
trs = dj.simulate(loss, u_signed, model="signed", t1=TS[-1], ts=TS, rtol=1e-12, atol=1e-14,
                  max_steps=100_000)
wood = np.stack([woodworth_limit(a) for a in WALPHAS])
prod = dj.implicit_bias_limit(X, y, jnp.stack([dj.zero_first_init(2, d, 2 * a) for a in WALPHAS]))
err_sim = rel(trs.theta_final, wood)
err_prod = rel(prod.theta, wood)
print("signed simulation:", trs.status_name)
print("signed simulated vs argmin Q_α:         ", np.array2string(err_sim, precision=2))
print("product limit (zero-first, 2α) vs same: ", np.array2string(err_prod, precision=2))

fig, ax = plt.subplots(figsize=(6, 3.6))
ax.loglog(WALPHAS, np.abs(wood - l1).sum(1), "k-", lw=3, alpha=0.3, label="argmin Q_α (closed form)")
ax.loglog(WALPHAS, np.abs(np.asarray(trs.theta_final) - l1).sum(1), "o", label="signed, simulated (w±(0) = α)")
ax.loglog(WALPHAS, np.abs(np.asarray(prod.theta) - l1).sum(1), "x", ms=9, label="product, zero-first 2α (Newton)")
ax.set(xlabel="α", ylabel="‖θ∞ − θ_ℓ1‖₁", title="L = 2: signed and product networks, same potential")
ax.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# **Checks.** The signed runs end with `success` (loss below 1e-24 of its start); their end points and the product model's limits at
# 2α are within 1e-8 of Woodworth's minimizer; that minimizer satisfies the optimality condition
# ∇Q_α(θ) ∈ range(Xᵀ) (to 1e-10, relative) and interpolates.

# %%
assert np.all(trs.status_name == "success") and np.all(prod.status_name == "success")
assert np.all(np.asarray(trs.loss_final) <= 1e-24 * np.asarray(trs.loss[:, 0]))
assert np.all(err_sim <= 1e-8) and np.all(err_prod <= 1e-8), (err_sim, err_prod)
P = np.linalg.pinv(X) @ X  # projector onto range(Xᵀ)
for a, th in zip(WALPHAS, wood):
    eta = np.arcsinh(th / (2 * a**2))
    assert np.linalg.norm(eta - P @ eta) <= 1e-10 * np.linalg.norm(eta)
    assert np.linalg.norm(X @ th - y) <= 1e-12 * np.linalg.norm(y)
print(f"all checks passed in {time.perf_counter() - T0:.1f} s")
