"""Matplotlib figures used by the CLI and the notebooks (Agg backend, files on disk)."""

from __future__ import annotations

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_trajectories(trajectories: dict, path=None, *, title: str | None = None):
    """Loss and θ paths of a few runs side by side.

    **Arguments:**

    - `trajectories`: `{label: Trajectory}` (single runs).
    - `path`: where to save the PNG (optional).

    **Returns:** the matplotlib figure.
    """
    plt = _pyplot()
    fig, (ax_loss, ax_theta) = plt.subplots(1, 2, figsize=(10, 3.8))
    styles = ["-", "--", ":", "-."]
    for k, (label, tr) in enumerate(trajectories.items()):
        ts, loss, theta = np.asarray(tr.ts), np.asarray(tr.loss), np.asarray(tr.theta)
        ax_loss.semilogy(ts, loss, styles[k % 4], label=label, lw=2 - 0.4 * k)
        top = np.argsort(-np.nanmax(np.abs(theta), axis=0))[:6]
        for j, i in enumerate(top):
            ax_theta.plot(ts, theta[:, i], styles[k % 4], color=f"C{j}", lw=1.6 - 0.3 * k,
                          label=label if j == 0 else None)
    ax_loss.set(xlabel="t", ylabel="f(θ(t))", title="loss")
    ax_theta.set(xlabel="t", ylabel="θ_i(t)", title="largest coordinates of θ")
    ax_loss.legend()
    ax_theta.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _reached(sub):
    """time-to-ε with runs that ended without reaching ε counted as +inf (so that a median
    over draws is not taken over the fast runs alone); failed runs stay NaN."""
    from ._solution import SUCCESS

    t = sub["time_to_eps"]
    return t.where(sub["status"] != SUCCESS, np.inf)


def _after_stop(sub):
    """loss(t)/f(θ0), with the saves after a run's stop filled by its final (threshold) loss,
    so that medians over draws do not jump when some runs have stopped."""
    rel = sub["loss"] / sub["f0"]
    stopped = sub["time"] > sub["t_final"]
    return rel.where(~stopped, sub["loss_final"] / sub["f0"])


def plot_sweep(ds, out_dir) -> list:
    """The figures of a sweep: loss curves by depth and α, and time-to-ε against α.

    **Arguments:**

    - `ds`: the dataset returned by [`ddln_jax.sweep`][] (or `open_results`).
    - `out_dir`: directory for `loss_curves.png` and `time_to_eps.png`.

    **Returns:** the paths written.
    """
    from pathlib import Path

    import matplotlib.cm as cm

    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    depths = [int(L) for L in ds.depth.values]
    if "alpha" not in ds.dims:  # given inits (`scheme = "custom"`): the init index plays α
        ds = ds.rename({"init": "alpha"})
    alphas = ds.alpha.values
    colors = cm.viridis(np.linspace(0.05, 0.95, len(alphas)))
    other = [d for d in ("problem", "shape", "seed") if d in ds["loss"].dims]
    paths = []

    ts = ds.time.values
    pos = ts[ts > 0]
    # Log-spaced save times get a log time axis.
    log_time = pos.size > 2 and np.allclose(np.diff(np.log(pos)), np.log(pos[1] / pos[0]), rtol=1e-6)
    fig, axes = plt.subplots(1, len(depths), figsize=(4.2 * len(depths), 3.6), sharey=True,
                             squeeze=False)
    for ax, L in zip(axes[0], depths):
        for a, c in zip(alphas, colors):
            sub = ds.sel(depth=L, alpha=a)
            rel = _after_stop(sub).median(dim=other, skipna=True)
            keep = ts > 0 if log_time else slice(None)
            ax.plot(ts[keep], rel.values[keep], color=c, label=f"α={a:.3g}")
        t_end = float(np.nanmax(ds["t_final"].sel(depth=L).values))
        ax.set(title=f"L = {L}", xlabel="t", yscale="log", xscale="log" if log_time else "linear",
               xlim=(pos[0] if log_time else 0, t_end * 1.05))
    axes[0, 0].set_ylabel("f(θ(t)) / f(θ0)  (median over draws)")
    axes[0, -1].legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "loss_curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)

    fig, ax = plt.subplots(figsize=(5, 3.8))
    if "time_to_eps" in ds and np.isfinite(ds.attrs.get("stop_ratio", np.nan)):
        for k, L in enumerate(depths):
            med = _reached(ds.sel(depth=L)).median(dim=other, skipna=True)
            ax.loglog(alphas, med.values, "o-", color=f"C{k}", label=f"L = {L}")
        ax.set(xlabel="α", ylabel=f"time to f ≤ {ds.attrs['stop_ratio']:g}·f(θ0)",
               title="time to ε against init scale (median over draws)")
    else:
        for k, L in enumerate(depths):
            med = ds["loss_final"].sel(depth=L).median(dim=other, skipna=True)
            ax.loglog(alphas, med.values, "o-", color=f"C{k}", label=f"L = {L}")
        ax.set(xlabel="α", ylabel="final loss", title="final loss against init scale")
    ax.legend()
    fig.tight_layout()
    path = out_dir / "time_to_eps.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
    return paths
