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


def _ffill_time(da):
    """Carry the last value forward along `time` (no bottleneck/numbagg needed)."""
    axis = da.dims.index("time")
    v = np.moveaxis(da.values, axis, -1)
    idx = np.where(np.isnan(v), 0, np.arange(v.shape[-1]))
    idx = np.maximum.accumulate(idx, axis=-1)
    filled = np.take_along_axis(v, idx, axis=-1)
    return da.copy(data=np.moveaxis(filled, -1, axis))


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
    alphas = ds.alpha.values
    colors = cm.viridis(np.linspace(0.05, 0.95, len(alphas)))
    other = [d for d in ("problem", "shape", "seed") if d in ds["loss"].dims]
    paths = []

    fig, axes = plt.subplots(1, len(depths), figsize=(4.2 * len(depths), 3.6), sharey=True,
                             squeeze=False)
    for ax, L in zip(axes[0], depths):
        for a, c in zip(alphas, colors):
            sub = ds.sel(depth=L, alpha=a)
            # A run stopped at its threshold keeps that value afterwards (for the median).
            rel = _ffill_time(sub["loss"] / sub["f0"]).median(dim=other, skipna=True)
            ax.semilogy(ds.time.values, rel.values, color=c, label=f"α={a:.3g}")
        ax.set(title=f"L = {L}", xlabel="t")
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
            med = ds["time_to_eps"].sel(depth=L).median(dim=other, skipna=True)
            ax.loglog(alphas, med.values, "o-", color=f"C{k}", label=f"L = {L}")
        ax.set(xlabel="α", ylabel=f"time to f ≤ {ds.attrs['stop_ratio']:g}·f(θ0)",
               title="time to ε against init scale")
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
