# %% [markdown]
# # 02 · The mirror geometry of an initialization
#
# Along the gradient flow of a deep diagonal network the gaps $\delta_j = (u^j)^2 - (u^m)^2$
# (with $u^m$ the smallest layer of each coordinate) are conserved, and $\theta$ follows a
# **mirror flow** $\tfrac{d}{dt}\nabla Q(\theta) = -\nabla f(\theta)$ whose potential $Q$ depends
# on the initialization only through those gaps (docs/math.md, "Mirror flow and potential").
# Per coordinate $\nabla Q = \Phi\circ\psi^{-1}$ with $\theta = \psi(w) = w\prod_j\sqrt{w^2+\delta_j}$,
# $\Phi(w) = \int_0^w \prod_j (r^2+\delta_j)^{-1/2}\,dr$, and the metric is $g = 1/Q''$.
#
# **Claims checked below.** (i) $L = 1$ is plain gradient flow ($Q = \tfrac12\theta^2$); (ii)
# $L = 2$ gives the hyperbolic entropy; (iii) for $L \ge 3$ the dual variable lives in a box
# $(-\Phi(\infty), \Phi(\infty))$, with $\Phi(\infty) = c_L\alpha^{-(L-2)}$ for the zero-first init;
# (iv) $\nabla Q$ and $\nabla Q^*$ are inverse (Legendre), $\nabla Q = $ `jax.grad(Q)` and
# $\nabla^2 Q = 1/g$; (v) Assumption A (a unique smallest layer) is what makes $Q$ finite on
# $\mathbb R$; balanced inits live on a half-line with $g = L|\theta|^{2-2/L}$.

# %%
import jax

jax.config.update("jax_enable_x64", True)
import time

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from scipy.special import ellipk

import ddln_jax as dj

FULL = False  # True: finer grids (meant for an accelerator)
N = 2001 if FULL else 201  # grid points per curve
T0 = time.perf_counter()
depths = [1, 2, 3, 4, 5]
grid = jnp.linspace(-3.0, 3.0, N)
H = 1e-5  # finite-difference step


def column(scales, d=1):
    """One init coordinate (its layers' values), repeated d times: shape (L, d)."""
    return jnp.tile(jnp.asarray(scales, dtype=jnp.float64)[:, None], (1, d))


@jax.jit
def maps(geom, theta):
    """Q, ∇Q, g and the identities to check, on a grid of θ for a one-coordinate geometry."""

    def at(t):
        t1 = t[None]
        eta = geom.grad_Q(t1)
        return {
            "Q": geom.Q(t1),
            "Q_star": geom.Q_star(eta),
            "grad_Q": eta[0],
            "g": geom.metric(t1)[0],
            "back": geom.grad_Q_star(eta)[0],  # ∇Q*(∇Q(θ))
        }

    return jax.vmap(at)(theta)

# %% [markdown]
# ## Q, ∇Q and g for L = 1 … 5 and three init shapes
# Three shapes of one coordinate's layers: **zero-first** ($u^1 = 0$, the others α = 1: every
# gap is 1), **spread** (layers 0.3, 0.6, 0.9, …: distinct gaps) and **one small** (one layer 0.1,
# the others 1).

# %%
shapes = {
    "zero-first": lambda L: [0.0] + [1.0] * (L - 1),
    "spread": lambda L: [0.3 * (j + 1) for j in range(L)],
    "one small": lambda L: [0.1] + [1.0] * (L - 1),
}
out = {}
for name, shape in shapes.items():
    for L in depths:
        geom = dj.Geometry(column(shape(L)))
        out[name, L] = {k: np.asarray(v) for k, v in maps(geom, grid).items()}
        # ∇Q at θ ± h, for a central difference of ∇Q (same grid size: no new compile)
        out[name, L]["fd"] = (np.asarray(maps(geom, grid + H)["grad_Q"])
                              - np.asarray(maps(geom, grid - H)["grad_Q"])) / (2 * H)
        out[name, L]["geom"] = geom

fig, axes = plt.subplots(3, 3, figsize=(12, 9), sharex=True)
for c, name in enumerate(shapes):
    for L in depths:
        o = out[name, L]
        for r, key in enumerate(["Q", "grad_Q", "g"]):
            axes[r, c].plot(grid, o[key], label=f"L={L}")
    axes[0, c].set_title(name)
    axes[1, c].set_ylim(-4, 4)
    axes[2, c].set_yscale("log")
    axes[2, c].set_xlabel("θ")
for r, lab in enumerate(["Q(θ)", "∇Q(θ)", "g(θ) = 1/Q''(θ)"]):
    axes[r, 0].set_ylabel(lab)
axes[0, 0].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# **Check (iv), for every shape and depth:** $\nabla Q^*(\nabla Q(\theta)) = \theta$, the Fenchel
# equality $Q(\theta) + Q^*(\nabla Q(\theta)) = \theta\,\nabla Q(\theta)$ holds, both to $10^{-10}$ (ψ⁻¹ and Φ⁻¹ are
# Newton solves, Φ a quadrature accurate to ~1e-12); $\tfrac{d}{d\theta}\nabla Q = 1/g$ by finite
# differences on every curve, and exactly by `jax.grad` (with `jax.grad(Q)` $= \nabla Q$) at depth 4.

# %%
th = np.asarray(grid)
worst = {"legendre": 0.0, "fenchel": 0.0, "hessian": 0.0}
for o in out.values():
    worst["legendre"] = max(worst["legendre"], np.max(np.abs(o["back"] - grid)) / 3.0)
    worst["fenchel"] = max(worst["fenchel"], np.max(np.abs(o["Q"] + o["Q_star"] - th * o["grad_Q"])
                                                     / np.maximum(np.abs(o["Q"]), 1)))
    # d∇Q/dθ by a central difference (step 1e-5: error ~1e-10 + rounding ~1e-11/1e-5), times g, is 1
    worst["hessian"] = max(worst["hessian"], np.max(np.abs(o["fd"] * o["g"] - 1)))
print({k: f"{v:.1e}" for k, v in worst.items()})
assert worst["legendre"] <= 1e-10 and worst["fenchel"] <= 1e-10, worst
assert worst["hessian"] <= 1e-6, worst  # the finite difference's own error
# and exactly, by automatic differentiation, at depth 4 (spread): jax.grad(Q) = ∇Q, ∇(∇Q) = 1/g
geom4 = out["spread", 4]["geom"]
tt = jnp.linspace(-2.0, 2.0, 9)
auto = jax.vmap(jax.grad(lambda t: geom4.Q(t[None])))(tt)
dgrad_auto = jax.vmap(jax.grad(lambda t: geom4.grad_Q(t[None])[0]))(tt)
err_auto = float(jnp.max(jnp.abs(auto - jax.vmap(lambda t: geom4.grad_Q(t[None])[0])(tt))))
err_hess = float(jnp.max(jnp.abs(dgrad_auto * jax.vmap(lambda t: geom4.metric(t[None])[0])(tt) - 1)))
print(f"L=4 autodiff: |jax.grad(Q) − ∇Q| = {err_auto:.1e}, |∇Q'·g − 1| = {err_hess:.1e}")
assert err_auto <= 1e-12 and err_hess <= 1e-10

# %% [markdown]
# ## Closed forms: L = 1 and L = 2
# For $L = 1$, $g = 1$ and $Q = \tfrac12\theta^2$. For $L = 2$ with one gap
# $\delta = |u^1(0)^2 - u^2(0)^2|$: $g = \sqrt{\delta^2 + 4\theta^2}$,
# $\nabla Q = \tfrac12\operatorname{asinh}(2\theta/\delta)$ and
# $Q = \tfrac12[\theta\operatorname{asinh}(2\theta/\delta) - \sqrt{\theta^2+\delta^2/4}] + \delta/4$,
# the hyperbolic entropy of Woodworth et al. Asserted to $10^{-12}$ relative on every shape.

# %%
th = np.asarray(grid)
for name, shape in shapes.items():
    o1, o2 = out[name, 1], out[name, 2]
    assert np.allclose(o1["Q"], 0.5 * th**2, rtol=1e-12, atol=1e-14)
    assert np.allclose(o1["grad_Q"], th, rtol=1e-12, atol=1e-14)
    assert np.allclose(o1["g"], 1.0, rtol=1e-12)
    a, b = shape(2)
    delta = abs(a**2 - b**2)
    Q2 = 0.5 * (th * np.arcsinh(2 * th / delta) - np.sqrt(th**2 + delta**2 / 4)) + delta / 4
    err = {
        "Q": np.max(np.abs(o2["Q"] - Q2) / np.maximum(np.abs(Q2), 1e-3)),
        "∇Q": np.max(np.abs(o2["grad_Q"] - 0.5 * np.arcsinh(2 * th / delta))
                     / np.maximum(np.abs(o2["grad_Q"]), 1e-3)),
        "g": np.max(np.abs(o2["g"] / np.sqrt(delta**2 + 4 * th**2) - 1)),
    }
    print(f"L=2, {name:10s} δ={delta:.2f}: " + ", ".join(f"{k} err {v:.1e}" for k, v in err.items()))
    assert all(v <= 1e-12 for v in err.values()), (name, err)

# %% [markdown]
# ## The dual box for L ≥ 3
# For $L \ge 3$, $\Phi(\infty) = \int_0^\infty \prod_j(r^2+\delta_j)^{-1/2}dr$ is finite, so
# $\eta = \nabla Q(\theta)$ stays in $(-\Phi(\infty), \Phi(\infty))$ however large θ grows: the
# mirror map saturates. For the zero-first init (every gap α²) it is $c_L\alpha^{-(L-2)}$ with
# $c_L = \tfrac{\sqrt\pi}{2}\Gamma(\tfrac{L-2}{2})/\Gamma(\tfrac{L-1}{2})$ ($c_3 = \pi/2$, $c_4 = 1$);
# for $L = 3$ with gaps $a^2 > b^2$ it is the complete elliptic integral $K(1 - b^2/a^2)/a$.
# So smaller inits have a larger box (the dual variable must travel further: slower escape).

# %%
big = jnp.geomspace(1e-2, 1e6, N)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for L in [3, 4, 5]:
    geom = out["spread", L]["geom"]
    eta = np.asarray(maps(geom, big)["grad_Q"])
    box = float(geom.phi_inf[0])
    axes[0].semilogx(big, eta / box, label=f"L={L}, Φ(∞)={box:.3f}")
    assert np.all(eta < box) and eta[-1] > 0.99 * box  # inside the box, and it saturates
axes[0].axhline(1, color="k", lw=0.7)
axes[0].set(xlabel="θ", ylabel="∇Q(θ) / Φ(∞)", title="spread init: ∇Q saturates at the box face")
axes[0].legend()

alphas = np.geomspace(0.05, 2.0, 9)
for L in [3, 4, 5]:
    # one column per α: Φ(∞) is coordinatewise, so one call gives all nine
    boxes = np.asarray(dj.phi_inf(jnp.concatenate([dj.zero_first_init(L, 1, a) for a in alphas], axis=1)))
    pred = dj.phi_inf_constant(L) * alphas ** (-(L - 2))
    axes[1].loglog(alphas, boxes, "o", label=f"L={L}")
    axes[1].loglog(alphas, pred, "k-", lw=0.7)
    rel = np.max(np.abs(boxes / pred - 1))
    print(f"zero-first, L={L}: c_L={dj.phi_inf_constant(L):.6f}, max rel. error of c_L α^-(L-2): {rel:.1e}")
    assert rel <= 1e-10
axes[1].set(xlabel="α", ylabel="Φ(∞)", title="zero-first: Φ(∞) = c_L α^{-(L-2)} (lines)")
axes[1].legend()
fig.tight_layout()
plt.show()

assert abs(dj.phi_inf_constant(3) - np.pi / 2) <= 1e-14 and abs(dj.phi_inf_constant(4) - 1) <= 1e-14
geom3 = out["spread", 3]["geom"]
g0 = np.sort(np.asarray(geom3.delta[:, 0]))  # the two gaps b² < a²
K = ellipk(1 - g0[0] / g0[1]) / np.sqrt(g0[1])
print(f"L=3 spread: Φ(∞) = {float(geom3.phi_inf[0]):.15f}, K(1 - b²/a²)/a = {K:.15f}")
assert abs(float(geom3.phi_inf[0]) / K - 1) <= 1e-12
# the same box from the standalone function
assert np.allclose(dj.phi_inf(column(shapes["spread"](4))), out["spread", 4]["geom"].phi_inf, rtol=1e-14)
assert abs(float(dj.Geometry(dj.zero_first_init(3, 1, 0.1)).phi_inf[0]) - np.pi / 2 / 0.1) <= 1e-12 * np.pi / 0.2
# and no box for L ≤ 2
assert np.all(np.isinf(np.asarray(out["spread", 2]["geom"].phi_inf)))

# %% [markdown]
# ## Assumption A, ties and balanced inits
# Assumption A asks for a unique smallest layer in every coordinate. Gaussian inits satisfy it
# almost surely; the balanced init $|u^j| = \alpha$ ties every layer in every coordinate; a tie
# of the two smallest layers with a larger third one (L ≥ 3) has no potential at all and is refused.

# %%
ku = jax.random.PRNGKey(1)
rep_gauss = dj.check_assumption_a(dj.gaussian_init(ku, 3, 8, 0.5))
rep_bal = dj.check_assumption_a(dj.balanced_init(3, 8, 0.5))
u_tie = dj.layered_init([0.5, 0.5, 1.0], 8)
rep_tie = dj.check_assumption_a(u_tie)
print("gaussian:", rep_gauss.holds, "| balanced:", rep_bal.holds, "tied", np.asarray(rep_bal.tied).tolist(),
      "| two smallest tied:", rep_tie.holds)
assert rep_gauss.holds and not rep_bal.holds and not rep_tie.holds
assert len(rep_bal.tied) == 8
try:
    dj.Geometry(u_tie)
    raise AssertionError("a tie of the two smallest layers below a third must be refused")
except ValueError as e:
    print("refused:", str(e)[:160], "…")

# %% [markdown]
# **Balanced inits: the half-line geometry.** With every gap 0, θ keeps the sign of θ0, and the
# geometry is anchored at the init: $\nabla Q(\theta_0) = 0$, $g = L|\theta|^{2-2/L}$ and, for
# θ, θ0 > 0, $\nabla Q(\theta) = \tfrac12\log(\theta/\theta_0)$ ($L = 2$) or
# $(\theta_0^{-(L-2)/L} - \theta^{-(L-2)/L})/(L-2)$ ($L \ge 3$), bounded above: the box has one face.

# %%
alpha = 0.5
half = jnp.geomspace(1e-3, 1e3, N)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for L in [2, 3, 4, 5]:
    geom = dj.Geometry(dj.balanced_init(L, 1, alpha))
    th0 = alpha**L
    o = {k: np.asarray(v) for k, v in maps(geom, half).items()}
    h = np.asarray(half)
    g_pred = L * h ** (2 - 2 / L)
    eta_pred = 0.5 * np.log(h / th0) if L == 2 else (th0 ** (-(L - 2) / L) - h ** (-(L - 2) / L)) / (L - 2)
    err_g = np.max(np.abs(o["g"] / g_pred - 1))
    err_eta = np.max(np.abs(o["grad_Q"] - eta_pred) / np.maximum(np.abs(eta_pred), 1))
    err_back = np.max(np.abs(o["back"] / h - 1))
    print(f"balanced L={L}: g err {err_g:.1e}, ∇Q err {err_eta:.1e}, ∇Q*(∇Q) err {err_back:.1e}")
    assert err_g <= 1e-12 and err_eta <= 1e-10 and err_back <= 1e-10
    axes[0].loglog(h, o["g"], label=f"L={L}")
    axes[1].semilogx(h, o["grad_Q"], label=f"L={L}")
    assert abs(float(geom.grad_Q(jnp.array([th0]))[0])) <= 1e-12  # anchored at θ0
axes[0].set(xlabel="θ", ylabel="g(θ)", title="balanced: g = L θ^{2-2/L}")
axes[1].axvline(alpha**3, color="0.5", lw=0.6)
axes[1].set(xlabel="θ", ylabel="∇Q(θ)", title="balanced: ∇Q anchored at θ0 = α^L")
axes[0].legend()
fig.tight_layout()
plt.show()

# %%
print(f"notebook compute time: {time.perf_counter() - T0:.1f} s")
