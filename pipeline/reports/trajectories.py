"""Plots over days: a subject's volumes and rADC, lesion histories, cohort trajectories.

Every function draws on a given matplotlib Axes (or makes its own Figure) so the HTML reports and
the notebooks share the same pictures. Missing columns or empty tables give an axes that says so
instead of an error.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

VOLUME_LINES = (("flair_volume_ml", "FLAIR lesion", "-", "#1f77b4"),
                ("restricted_volume_ml", "restricted diffusion", "-", "#d62728"),
                ("ever_restricted_volume_ml", "ever restricted", "--", "#d62728"))
# the core (a reader's ROI, clear of the DWI-blurred rim) first: it is the lesion's own rADC
RADC_LINES = (("radc_mean_restricted_core", "restricted lesion core", "#8b0000"),
              ("radc_mean_restricted", "restricted lesion", "#d62728"),
              ("radc_mean_ever_restricted", "ever-restricted tissue", "#9467bd"),
              ("radc_mean_flair", "FLAIR lesion", "#1f77b4"))


def _empty(ax: Axes, message: str) -> Axes:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def _has(table: pd.DataFrame | None, *columns: str) -> bool:
    return table is not None and not table.empty and set(columns) <= set(table.columns)


def pseudonormal_band(ax: Axes, config: dict) -> None:
    """Shade the rADC pseudonormal band [restricted_below, elevated_above] of the config."""
    dynamics = (config or {}).get("dynamics", {})
    low, high = dynamics.get("restricted_below"), dynamics.get("elevated_above")
    if low is not None and high is not None:
        ax.axhspan(low, high, color="#2ca02c", alpha=0.15, lw=0,
                   label=f"pseudonormal band {low:g}-{high:g}")
        ax.axhline(low, color="#2ca02c", lw=0.8, ls=":")
    ax.axhline(1.0, color="0.5", lw=0.6)


def plot_volumes(sessions: pd.DataFrame, ax: Axes) -> Axes:
    """FLAIR, restricted and ever-restricted volume (mL) against day."""
    if not _has(sessions, "day"):
        return _empty(ax, "no session table")
    for column, label, style, colour in VOLUME_LINES:
        if column in sessions.columns:
            ax.plot(sessions["day"], sessions[column], style, marker="o", color=colour,
                    label=label)
    ax.set_xlabel("day")
    ax.set_ylabel("volume (mL)")
    ax.set_title("Lesion volume")
    ax.legend(fontsize=8)
    return ax


def plot_radc(sessions: pd.DataFrame, config: dict, ax: Axes) -> Axes:
    """Mean rADC in the lesions against day, with the pseudonormal band shaded."""
    if not _has(sessions, "day"):
        return _empty(ax, "no session table")
    lines = [line for line in RADC_LINES
             if line[0] in sessions.columns and sessions[line[0]].notna().any()]
    if not lines:
        return _empty(ax, "no lesion: no lesion rADC")
    pseudonormal_band(ax, config)
    for column, label, colour in lines:
        ax.plot(sessions["day"], sessions[column], marker="o", color=colour, label=label)
    ax.set_xlabel("day")
    ax.set_ylabel("rADC (ADC / NAWM ADC)")
    ax.set_title("rADC in the lesions")
    ax.legend(fontsize=8)
    return ax


def plot_pseudonormalized(sessions: pd.DataFrame, ax: Axes) -> Axes:
    """Fraction of ever-restricted tissue no longer restricted, against day."""
    if (not _has(sessions, "day", "pseudonormalized_fraction")
            or sessions["pseudonormalized_fraction"].isna().all()):
        return _empty(ax, "no restricted tissue: no pseudonormalized fraction")
    ax.plot(sessions["day"], sessions["pseudonormalized_fraction"], marker="o", color="#2ca02c")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("day")
    ax.set_ylabel("fraction")
    ax.set_title("Pseudonormalized fraction")
    return ax


def subject_trajectories(sessions: pd.DataFrame, config: dict) -> Figure:
    """Volumes, rADC with the pseudonormal band and the pseudonormalized fraction, side by side."""
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    ax_vol, ax_radc, ax_frac = fig.subplots(1, 3)
    plot_volumes(sessions, ax_vol)
    plot_radc(sessions, config, ax_radc)
    plot_pseudonormalized(sessions, ax_frac)
    return fig


def plot_lesion_histories(lesions: pd.DataFrame, kind: str, column: str, ax: Axes,
                          config: dict | None = None, max_lines: int = 20) -> Axes:
    """One line per lesion id of ``kind``: ``column`` against day (largest lesions first).

    Parameters
    ----------
    lesions : pandas.DataFrame
        The lesions timeseries table.
    kind : str
        'flair' or 'restricted'.
    column : str
        e.g. 'volume_ml' or 'radc_mean_initial'.
    ax : Axes
        Where to draw.
    config : dict, optional
        When given and ``column`` is an rADC, the pseudonormal band is shaded.
    max_lines : int
        Only the largest lesions are drawn (legibility).
    """
    if lesions is None or not {"lesion_id", "kind", "day", column} <= set(lesions.columns):
        return _empty(ax, "no lesion table")
    rows = lesions[lesions["kind"] == kind]
    if rows.empty:
        return _empty(ax, f"no {kind} lesions")
    if column.startswith("radc") and config is not None:
        pseudonormal_band(ax, config)
    size = rows.groupby("lesion_id")["volume_ml"].max() if "volume_ml" in rows else None
    ids = (size.sort_values(ascending=False).index if size is not None
           else rows["lesion_id"].unique())[:max_lines]
    for lesion_id in ids:
        one = rows[rows["lesion_id"] == lesion_id].sort_values("day")
        if "present" in one.columns and column == "volume_ml":
            one = one[one["present"].astype(str).str.lower().isin(("true", "1"))]
        ax.plot(one["day"], one[column], marker="o", ms=3, lw=1, label=f"{lesion_id}")
    ax.set_xlabel("day")
    ax.set_ylabel(column)
    ax.set_title(f"{kind} lesions: {column}")
    if 0 < len(ids) <= 12:
        ax.legend(title="lesion id", fontsize=7, ncol=2)
    return ax


def lesion_histories(lesions: pd.DataFrame, config: dict) -> Figure:
    """Per-lesion volume (FLAIR) and rADC of the initially occupied tissue (restricted)."""
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    ax_flair, ax_restricted, ax_radc = fig.subplots(1, 3)
    plot_lesion_histories(lesions, "flair", "volume_ml", ax_flair)
    plot_lesion_histories(lesions, "restricted", "volume_ml", ax_restricted)
    plot_lesion_histories(lesions, "restricted", "radc_mean_initial", ax_radc, config)
    return fig


def plot_cohort(sessions: pd.DataFrame, column: str, ax: Axes, label: str | None = None) -> Axes:
    """Spaghetti plot: one line per subject of ``column`` against day."""
    if not _has(sessions, "subject", "day", column):
        return _empty(ax, f"no {column} in the group table")
    for subject, rows in sessions.groupby("subject", sort=True):
        rows = rows.sort_values("day")
        ax.plot(rows["day"], rows[column], marker="o", ms=3, lw=1.2, label=f"sub-{subject}")
    ax.set_xlabel("day")
    ax.set_ylabel(label or column)
    ax.set_title(label or column)
    if sessions["subject"].nunique() <= 12:
        ax.legend(fontsize=7)
    return ax


def mean_ci_by_day(sessions: pd.DataFrame, column: str, confidence: float = 0.95) -> pd.DataFrame:
    """Mean, count and t-based confidence interval of ``column`` per day across subjects.

    Returns
    -------
    pandas.DataFrame
        Columns day, n, mean, sd, ci_low, ci_high (the CI is n/a for a single subject).
    """
    from scipy import stats

    grouped = sessions.dropna(subset=[column]).groupby("day")[column]
    table = grouped.agg(n="count", mean="mean", sd="std").reset_index()
    half = stats.t.ppf(0.5 + confidence / 2, np.maximum(table["n"] - 1, 1)) * table["sd"]
    half = half / np.sqrt(table["n"])
    half[table["n"] < 2] = np.nan
    return table.assign(ci_low=table["mean"] - half, ci_high=table["mean"] + half)


def plot_mean_ci(sessions: pd.DataFrame, column: str, ax: Axes, label: str | None = None) -> Axes:
    """Mean across subjects per day with its 95 % confidence interval (shaded)."""
    if not _has(sessions, "day", column):
        return _empty(ax, f"no {column} in the group table")
    table = mean_ci_by_day(sessions, column)
    ax.plot(table["day"], table["mean"], marker="o", color="k", label="mean")
    ax.fill_between(table["day"], table["ci_low"], table["ci_high"], color="0.6", alpha=0.4,
                    label="95 % CI")
    ax.set_xlabel("day")
    ax.set_ylabel(label or column)
    ax.set_title(f"{label or column}\nmean and 95 % CI", fontsize=10)
    ax.legend(fontsize=7)
    return ax


COHORT_PANELS = (("flair_volume_ml", "FLAIR lesion volume (mL)"),
                 ("restricted_volume_ml", "restricted volume (mL)"),
                 ("radc_mean_ever_restricted", "rADC of ever-restricted tissue"))


def cohort_trajectories(sessions: pd.DataFrame, config: dict | None = None) -> Figure:
    """One spaghetti panel per COHORT_PANELS column (band shaded on the rADC panel)."""
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    for ax, (column, label) in zip(fig.subplots(1, len(COHORT_PANELS)), COHORT_PANELS):
        if column.startswith("radc") and config:
            pseudonormal_band(ax, config)
        plot_cohort(sessions, column, ax, label)
    return fig
