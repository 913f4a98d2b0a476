"""ADC dynamics: relative ADC, voxel classes and pseudonormalization.

Every ADC formula of the project lives here. ADC values are in the canonical unit um^2/s
(1e-6 mm^2/s); rADC is the ratio to the reference ADC of normal-appearing white matter (NAWM).
The phantom's truth tables and the pipeline's measured tables are both computed by these
functions, so that they compare directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage

from pipeline.core.distance import edt_mm

RESTRICTED, PSEUDONORMAL, ELEVATED = 1, 2, 3
SHINE_THROUGH = 4
#: Labels of the voxel-class image (:func:`voxel_class_image`): index -> (name, description).
VOXEL_CLASS_LABELS = {
    RESTRICTED: ("restricted", "rADC below restricted_below"),
    PSEUDONORMAL: ("pseudonormal", "rADC from restricted_below up to elevated_above"),
    ELEVATED: ("elevated", "rADC above elevated_above"),
    SHINE_THROUGH: ("shinethrough", "T2 shine-through: DWI hyperintense, rADC not below "
                    "restricted_below (inside a FLAIR lesion)"),
}


@dataclass(frozen=True)
class ReferenceADC:
    """Robust summary of NAWM ADC (um^2/s)."""

    median_um2_s: float
    iqr_um2_s: float
    n_voxels: int


def reference_adc(adc_um2_s: np.ndarray, nawm_mask: np.ndarray) -> ReferenceADC:
    """Median and interquartile range of ADC over the NAWM mask.

    Raises
    ------
    ValueError
        If the mask holds no voxel with a finite, positive ADC.
    """
    values = adc_um2_s[np.asarray(nawm_mask, bool)]
    values = values[np.isfinite(values) & (values > 0)]
    if values.size == 0:
        raise ValueError("no normal-appearing white-matter voxel with a valid ADC")
    q25, q50, q75 = np.percentile(values, [25, 50, 75])
    return ReferenceADC(float(q50), float(q75 - q25), int(values.size))


def relative_adc(adc_um2_s: np.ndarray, reference_um2_s: float) -> np.ndarray:
    """rADC = ADC / reference ADC of NAWM (float32)."""
    if not reference_um2_s > 0:
        raise ValueError(f"reference ADC must be positive, got {reference_um2_s}")
    return (np.asarray(adc_um2_s, np.float32) / np.float32(reference_um2_s)).astype(np.float32)


def classify_radc(radc: np.ndarray, restricted_below: float, elevated_above: float) -> np.ndarray:
    """Voxel classes: 1 restricted (rADC < restricted_below), 2 pseudonormal, 3 elevated
    (rADC > elevated_above); 0 where rADC is not finite."""
    out = np.full(radc.shape, PSEUDONORMAL, np.uint8)
    out[radc < restricted_below] = RESTRICTED
    out[radc > elevated_above] = ELEVATED
    out[~np.isfinite(radc)] = 0
    return out


def voxel_class_image(
    radc: np.ndarray,
    lesion_tissue: np.ndarray,
    shine_through: np.ndarray,
    *,
    restricted_below: float,
    elevated_above: float,
    restricted: np.ndarray | None = None,
) -> np.ndarray:
    """Diffusion class of every voxel of the lesion tissue (uint8, labels
    :data:`VOXEL_CLASS_LABELS`).

    Inside ``lesion_tissue`` (e.g. FLAIR lesion or ever-restricted): :func:`classify_radc`
    (1 restricted, 2 pseudonormal, 3 elevated). Every ``shine_through`` voxel is 4 (its rADC
    is at or above ``restricted_below`` by definition, so it would otherwise be 2 or 3).
    Every voxel of the segmentation's ``restricted`` mask with a finite rADC is 1, also its
    half-contrast edge whose blurred rADC is at or above the cut-off
    (:func:`pipeline.core.restricted.grow_to_half_contrast`); class 1 may be larger where
    tissue of the lesion has a low rADC without being DWI hyperintense. 0 elsewhere and where
    rADC is not finite.
    """
    radc = np.asarray(radc)
    classes = np.where(
        np.asarray(lesion_tissue, bool), classify_radc(radc, restricted_below, elevated_above), 0
    ).astype(np.uint8)
    classes[np.asarray(shine_through, bool) & np.isfinite(radc)] = SHINE_THROUGH
    if restricted is not None:
        classes[np.asarray(restricted, bool) & np.isfinite(radc)] = RESTRICTED
    return classes


def restricted_mask(radc: np.ndarray, restricted_below: float) -> np.ndarray:
    """Voxels whose rADC is below the restriction cut-off."""
    return np.isfinite(radc) & (radc < restricted_below)


def diffusion_classes(
    dwi_ratio: np.ndarray,
    radc: np.ndarray,
    restricted_below: float,
    dwi_hyperintense_ratio: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Restricted diffusion and T2 shine-through masks.

    ``dwi_ratio`` is the trace DWI divided by the NAWM median trace DWI. Restricted: DWI
    hyperintense AND rADC below the cut-off. Shine-through: DWI hyperintense with rADC at or
    above the cut-off (bright on DWI from T2 prolongation, not from restriction).
    """
    bright = np.isfinite(dwi_ratio) & (dwi_ratio > dwi_hyperintense_ratio)
    low = restricted_mask(radc, restricted_below)
    return bright & low, bright & np.isfinite(radc) & ~low


def lesion_core(mask: np.ndarray, *, depth_mm: float, spacing_mm: tuple[float, ...]) -> np.ndarray:
    """Core of every lesion of ``mask`` (bool): its voxels at least ``depth_mm`` inside.

    Depth of a voxel = distance from its centre to the nearest voxel centre outside the mask,
    less half the finest spacing (so a boundary voxel of a 1 mm grid is 0.5 mm deep, of a 2 mm
    grid 1 mm: the distance to the mask's surface on any grid). Per 26-connected component the
    depth asked is ``min(depth_mm, the component's deepest voxel)``: a lesion thinner than
    twice ``depth_mm`` keeps its medial voxels, so every lesion has a core. This is where a
    reader puts a region of interest: the acquisition's voxel (phantom small grid DWI
    3.4 x 3.4 x 5.5 mm) mixes the outer millimetres of a lesion with the tissue around it.
    """
    mask = np.asarray(mask, bool)
    sp = tuple(float(s) for s in spacing_mm)
    if len(sp) != mask.ndim:
        raise ValueError(f"spacing_mm has {len(sp)} values for a {mask.ndim}D mask")
    out = np.zeros_like(mask)
    if not mask.any():
        return out
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(mask))
    m = mask[box]
    labels, n = ndimage.label(m, ndimage.generate_binary_structure(m.ndim, 3))
    padded = np.pad(m, 1)  # the box's (and array's) border counts as outside
    depth = edt_mm(padded, sp)[(slice(1, -1),) * m.ndim]
    depth = depth - 0.5 * min(sp)
    deepest = np.asarray(ndimage.maximum(depth, labels, np.arange(1, n + 1)), float)
    need = np.concatenate([[np.inf], np.minimum(float(depth_mm), deepest)])
    out[box] = m & (depth >= need[labels] - 1e-6)
    return out


def _not_restricted_now(ever: np.ndarray, restricted_now: np.ndarray | None) -> np.ndarray:
    """Ever-restricted voxels outside this session's restricted mask (all of them without one):
    the only voxels that can count as recovered."""
    return ever if restricted_now is None else ever & ~np.asarray(restricted_now, bool)


def pseudonormalized_fraction(
    ever_restricted: np.ndarray,
    radc_now: np.ndarray,
    restricted_below: float,
    restricted_now: np.ndarray | None = None,
) -> float:
    """Fraction of ever-restricted voxels whose rADC is no longer below the cut-off now.

    ``ever_restricted`` is the union of the restricted masks of this and all earlier sessions.
    Voxels in ``restricted_now`` (this session's restricted mask) never count as recovered: the
    mask's half-contrast edge (:func:`pipeline.core.restricted.grow_to_half_contrast`) holds
    voxels whose blurred rADC is at or above the cut-off. Returns NaN when no voxel was ever
    restricted.
    """
    ever = np.asarray(ever_restricted, bool)
    n = int(ever.sum())
    if n == 0:
        return float("nan")
    values = radc_now[_not_restricted_now(ever, restricted_now)]
    return float(np.count_nonzero(np.isfinite(values) & (values >= restricted_below)) / n)


def recovered_volumes_ml(
    ever_restricted: np.ndarray,
    radc_now: np.ndarray,
    *,
    restricted_below: float,
    elevated_above: float,
    voxel_volume_ml: float,
    restricted_now: np.ndarray | None = None,
) -> tuple[float, float]:
    """Volumes (mL) of the ever-restricted voxels whose rADC class (:func:`classify_radc`) is
    now pseudonormal and elevated, outside ``restricted_now`` (as in
    :func:`pseudonormalized_fraction`); together they are that fraction's numerator."""
    gone = _not_restricted_now(np.asarray(ever_restricted, bool), restricted_now)
    classes = classify_radc(radc_now[gone], restricted_below, elevated_above)
    return (
        float(np.count_nonzero(classes == PSEUDONORMAL) * voxel_volume_ml),
        float(np.count_nonzero(classes == ELEVATED) * voxel_volume_ml),
    )


def masked_mean(values: np.ndarray, mask: np.ndarray) -> float:
    """Mean of finite values in mask; NaN for an empty mask."""
    v = values[np.asarray(mask, bool)]
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def masked_median(values: np.ndarray, mask: np.ndarray) -> float:
    """Median of finite values in mask; NaN for an empty mask."""
    v = values[np.asarray(mask, bool)]
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else float("nan")


def pseudonormalization_day(
    days: np.ndarray, radc: np.ndarray, cutoff: float
) -> tuple[float, bool]:
    """Day on which a restricted lesion's mean rADC first climbs back to ``cutoff``.

    Linear interpolation between the last session below the cut-off (after the nadir) and the
    next session at or above it. Returns ``(day, censored)``: when the cut-off is not reached by
    the last session, the last session's day and ``censored=True``; NaN when the lesion was never
    below the cut-off.
    """
    days = np.asarray(days, float)
    radc = np.asarray(radc, float)
    ok = np.isfinite(radc)
    days, radc = days[ok], radc[ok]
    below = np.flatnonzero(radc < cutoff)
    if below.size == 0:
        return float("nan"), False
    for i in range(below[0], len(radc) - 1):
        if radc[i] < cutoff <= radc[i + 1]:
            t = (cutoff - radc[i]) / (radc[i + 1] - radc[i])
            return float(days[i] + t * (days[i + 1] - days[i])), False
    return float(days[-1]), True


def session_summary(
    *,
    flair_lesion: np.ndarray,
    restricted: np.ndarray,
    shine_through: np.ndarray,
    ever_restricted: np.ndarray,
    adc_um2_s: np.ndarray,
    radc: np.ndarray,
    reference: ReferenceADC,
    voxel_volume_ml: float,
    restricted_below: float,
    elevated_above: float,
    flair_observed: bool = True,
    diffusion_observed: bool = True,
    core_depth_mm: float | None = None,
    spacing_mm: tuple[float, ...] | None = None,
    shine_through_needs_flair: bool = False,
) -> dict[str, float]:
    """One row of the per-session table (columns described in :mod:`pipeline.core.columns`).

    All masks are boolean arrays on the same grid as ``adc_um2_s``/``radc``;
    ``ever_restricted`` is the union of the restricted masks up to and including this session.
    ``radc_mean_restricted_core`` is the mean rADC over :func:`lesion_core` of the restricted
    mask (``core_depth_mm``, grid ``spacing_mm``; NaN when either is not given).
    A session without FLAIR (``flair_observed`` False) has NaN in the FLAIR columns, one
    without diffusion (``diffusion_observed`` False) NaN in every diffusion column: not
    observed, not zero. With ``shine_through_needs_flair`` (shine-through looked for inside the
    FLAIR lesions only) a session without FLAIR has NaN shine-through volume too.
    """
    flair_lesion, restricted = np.asarray(flair_lesion, bool), np.asarray(restricted, bool)
    ever = np.asarray(ever_restricted, bool)
    pseudonormal_ml, elevated_ml = recovered_volumes_ml(
        ever,
        radc,
        restricted_below=restricted_below,
        elevated_above=elevated_above,
        voxel_volume_ml=voxel_volume_ml,
        restricted_now=restricted,
    )
    row = {
        "flair_volume_ml": float(flair_lesion.sum() * voxel_volume_ml),
        "restricted_volume_ml": float(restricted.sum() * voxel_volume_ml),
        "shine_through_volume_ml": float(np.count_nonzero(shine_through) * voxel_volume_ml),
        "ever_restricted_volume_ml": float(ever.sum() * voxel_volume_ml),
        "adc_nawm_um2_s": reference.median_um2_s,
        "adc_nawm_iqr_um2_s": reference.iqr_um2_s,
        "nawm_volume_ml": float(reference.n_voxels * voxel_volume_ml),
        "adc_mean_restricted_um2_s": masked_mean(adc_um2_s, restricted),
        "adc_median_restricted_um2_s": masked_median(adc_um2_s, restricted),
        "radc_mean_restricted": masked_mean(radc, restricted),
        "radc_median_restricted": masked_median(radc, restricted),
        "radc_mean_restricted_core": masked_mean(radc, lesion_core(
            restricted, depth_mm=core_depth_mm, spacing_mm=spacing_mm))
        if core_depth_mm is not None and spacing_mm is not None else float("nan"),
        "radc_mean_flair": masked_mean(radc, flair_lesion),
        "radc_median_flair": masked_median(radc, flair_lesion),
        "radc_mean_ever_restricted": masked_mean(radc, ever),
        "pseudonormalized_fraction": pseudonormalized_fraction(
            ever, radc, restricted_below, restricted),
        "pseudonormal_volume_ml": pseudonormal_ml,
        "elevated_volume_ml": elevated_ml,
    }
    unobserved = (() if flair_observed else FLAIR_SESSION_COLUMNS) + (
        () if diffusion_observed else DIFFUSION_SESSION_COLUMNS
    ) + (("shine_through_volume_ml",) if shine_through_needs_flair and not flair_observed else ())
    return {k: (float("nan") if k in unobserved else v) for k, v in row.items()}


#: Session-table columns that need the FLAIR, and those that need diffusion (NaN without it).
FLAIR_SESSION_COLUMNS = ("flair_volume_ml", "radc_mean_flair", "radc_median_flair")
DIFFUSION_SESSION_COLUMNS = (
    "restricted_volume_ml",
    "shine_through_volume_ml",
    "ever_restricted_volume_ml",
    "adc_nawm_um2_s",
    "adc_nawm_iqr_um2_s",
    "nawm_volume_ml",
    "adc_mean_restricted_um2_s",
    "adc_median_restricted_um2_s",
    "radc_mean_restricted",
    "radc_median_restricted",
    "radc_mean_restricted_core",
    "radc_mean_flair",
    "radc_median_flair",
    "radc_mean_ever_restricted",
    "pseudonormalized_fraction",
    "pseudonormal_volume_ml",
    "elevated_volume_ml",
)


# --- per-lesion ADC analytics over sessions -------------------------------------------------

LESION_KINDS = ("flair", "restricted")


def _union_boxes(boxes: list[tuple[slice, ...]]) -> tuple[slice, ...]:
    """Smallest box holding every box (tuples of slices with explicit start/stop)."""
    return tuple(
        slice(min(b[k].start for b in boxes), max(b[k].stop for b in boxes))
        for k in range(len(boxes[0]))
    )


def lesion_table(
    dseg: list[np.ndarray] | tuple[np.ndarray, ...],
    *,
    kind: str,
    adc_um2_s: list[np.ndarray] | tuple[np.ndarray, ...],
    radc: list[np.ndarray] | tuple[np.ndarray, ...],
    restricted: list[np.ndarray] | tuple[np.ndarray, ...],
    shine_through: list[np.ndarray] | tuple[np.ndarray, ...],
    days: list[float] | tuple[float, ...] | np.ndarray,
    sessions: list | tuple,
    voxel_volume_ml: float,
    restricted_below: float,
    elevated_above: float,
    observed: list[bool] | tuple[bool, ...] | None = None,
    diffusion_observed: list[bool] | tuple[bool, ...] | None = None,
    core_depth_mm: float | None = None,
    spacing_mm: tuple[float, ...] | None = None,
) -> pd.DataFrame:
    """Per-lesion, per-session ADC table (columns: :data:`pipeline.core.columns.LESION_COLUMNS`).

    One row per lesion id and session, from the session the id is first seen to the last
    session of the subject (``present`` is False after the id resolved, merged or split; the
    tissue-following columns keep being measured there).

    Parameters
    ----------
    dseg : sequence of int ndarray
        Per session, persistent lesion ids (0 background), e.g. ``TrackingResult.dseg``.
    kind : {"flair", "restricted"}
        Which lesion masks were tracked; copied into the table.
    adc_um2_s, radc : sequence of float ndarray
        Per session, ADC (um^2/s) and rADC (ratio to NAWM ADC) on the same grid.
    restricted, shine_through : sequence of bool ndarray
        Per session, the restricted-diffusion and T2 shine-through masks.
    days, sessions : sequence
        Day and label of every session.
    voxel_volume_ml : float
        Volume of one voxel (mL).
    restricted_below, elevated_above : float
        rADC cut-offs (ratio) of the voxel classes (:func:`classify_radc`).
    observed : sequence of bool, optional
        Per session, whether the lesion masks of ``kind`` were acquired (default all True).
        At an unobserved session ``observed`` is False, ``present`` False and the columns
        that need the lesion mask are NaN (not 0); ``radc_mean_initial`` is still measured.
    diffusion_observed : sequence of bool, optional
        Per session, whether diffusion was acquired (default all True); without it every ADC
        column is NaN and the ever-restricted union is not updated.
    core_depth_mm, spacing_mm : optional
        Depth (mm) and grid spacing (array axis order) of :func:`lesion_core` for
        ``radc_mean_core``; NaN in that column when either is not given.

    Notes
    -----
    * ``radc_mean_initial``: mean rADC now over the voxels the lesion occupied at its first
      session; follows the tissue through pseudonormalization even after the lesion itself
      (as a restricted lesion) has resolved.
    * ``ever_restricted_volume_ml`` / ``pseudonormalized_fraction``: the lesion's
      ever-restricted voxels are the union over this and earlier sessions of (restricted AND
      this lesion); the fraction is :func:`pseudonormalized_fraction` on them (NaN when none).
    """
    if kind not in LESION_KINDS:
        raise ValueError(f"kind must be one of {LESION_KINDS}, got {kind!r}")
    n_sessions = len(dseg)
    for name, seq in (
        ("adc_um2_s", adc_um2_s),
        ("radc", radc),
        ("restricted", restricted),
        ("shine_through", shine_through),
        ("days", days),
        ("sessions", sessions),
    ):
        if len(seq) != n_sessions:
            raise ValueError(f"{name} has {len(seq)} entries for {n_sessions} sessions")
    seen = [True] * n_sessions if observed is None else [bool(o) for o in observed]
    dwi = (
        [True] * n_sessions if diffusion_observed is None else [bool(o) for o in diffusion_observed]
    )
    if len(seen) != n_sessions or len(dwi) != n_sessions:
        raise ValueError(f"observed flags must have {n_sessions} entries")
    if kind == "restricted":
        seen = [a and b for a, b in zip(seen, dwi)]
    nan = float("nan")
    dseg = [np.asarray(d) for d in dseg]
    n_ids = max((int(d.max(initial=0)) for d in dseg), default=0)
    objects = [ndimage.find_objects(d, max_label=n_ids) for d in dseg]
    rows = []
    for lesion in range(1, n_ids + 1):
        present_at = [s for s in range(n_sessions) if objects[s][lesion - 1] is not None]
        if not present_at:
            continue
        first = present_at[0]
        box = _union_boxes([objects[s][lesion - 1] for s in present_at])
        initial = dseg[first][box] == lesion
        ever = np.zeros(initial.shape, bool)
        for s in range(first, n_sessions):
            here = (dseg[s][box] == lesion) & seen[s]
            adc_s, radc_s = adc_um2_s[s][box], radc[s][box]
            restricted_now = np.asarray(restricted[s][box], bool) & dwi[s]
            restricted_here = here & restricted_now
            ever |= restricted_here
            both = seen[s] and dwi[s]
            recovered = recovered_volumes_ml(
                ever,
                radc_s,
                restricted_below=restricted_below,
                elevated_above=elevated_above,
                voxel_volume_ml=voxel_volume_ml,
                restricted_now=restricted_now,
            )
            rows.append(
                {
                    "lesion_id": lesion,
                    "kind": kind,
                    "session": sessions[s],
                    "day": float(days[s]),
                    "observed": seen[s],
                    "present": bool(here.any()),
                    "volume_ml": float(np.count_nonzero(here) * voxel_volume_ml)
                    if seen[s]
                    else nan,
                    "adc_mean_um2_s": masked_mean(adc_s, here) if dwi[s] else nan,
                    "adc_median_um2_s": masked_median(adc_s, here) if dwi[s] else nan,
                    "radc_mean": masked_mean(radc_s, here) if dwi[s] else nan,
                    "radc_median": masked_median(radc_s, here) if dwi[s] else nan,
                    "radc_mean_core": masked_mean(radc_s, lesion_core(
                        here, depth_mm=core_depth_mm, spacing_mm=spacing_mm))
                    if dwi[s] and core_depth_mm is not None and spacing_mm is not None else nan,
                    "radc_mean_initial": masked_mean(radc_s, initial) if dwi[s] else nan,
                    "restricted_volume_ml": float(
                        np.count_nonzero(restricted_here) * voxel_volume_ml
                    )
                    if both
                    else nan,
                    "shine_through_volume_ml": float(
                        np.count_nonzero(here & np.asarray(shine_through[s][box], bool))
                        * voxel_volume_ml
                    )
                    if both
                    else nan,
                    "ever_restricted_volume_ml": float(np.count_nonzero(ever) * voxel_volume_ml)
                    if both
                    else nan,
                    "pseudonormalized_fraction": pseudonormalized_fraction(
                        ever, radc_s, restricted_below, restricted_now
                    )
                    if dwi[s]
                    else nan,
                    "pseudonormal_volume_ml": recovered[0] if dwi[s] else nan,
                    "elevated_volume_ml": recovered[1] if dwi[s] else nan,
                }
            )
    columns = [
        "lesion_id",
        "kind",
        "session",
        "day",
        "observed",
        "present",
        "volume_ml",
        "adc_mean_um2_s",
        "adc_median_um2_s",
        "radc_mean",
        "radc_median",
        "radc_mean_core",
        "radc_mean_initial",
        "restricted_volume_ml",
        "shine_through_volume_ml",
        "ever_restricted_volume_ml",
        "pseudonormalized_fraction",
        "pseudonormal_volume_ml",
        "elevated_volume_ml",
    ]
    return pd.DataFrame(rows, columns=columns)


def lesion_summary(table: pd.DataFrame, *, cutoff: float) -> pd.DataFrame:
    """One row per lesion of a :func:`lesion_table` (columns: ``LESION_SUMMARY_COLUMNS``).

    Parameters
    ----------
    table : DataFrame
        Output of :func:`lesion_table` (one or several kinds).
    cutoff : float
        rADC cut-off of restriction (ratio), normally ``[dynamics] restricted_below``.

    Notes
    -----
    The nadir and the pseudonormalization day are both taken on ``radc_mean_initial`` (the
    tissue first occupied by the lesion), so they describe one trajectory.
    ``pseudonormalization_day`` is :func:`pseudonormalization_day` over the lesion's sessions
    (interpolated crossing of ``cutoff``; when not reached, the last day with
    ``censored=True``; NaN when never below). ``days_from_first_restriction_to_pseudonormalization``
    counts from the first day with restricted voxels in the lesion (a lower bound when
    censored).
    """
    rows = []
    for (kind, lesion), g in table.sort_values("day").groupby(["kind", "lesion_id"], sort=True):
        present = g[g["present"]]
        days_g = g["day"].to_numpy(float)
        initial = g["radc_mean_initial"].to_numpy(float)
        finite = np.isfinite(initial)
        if finite.any():
            k = int(np.argmin(np.where(finite, initial, np.inf)))
            nadir, nadir_day = float(initial[k]), float(days_g[k])
        else:
            nadir, nadir_day = float("nan"), float("nan")
        pn_day, censored = pseudonormalization_day(days_g, initial, cutoff)
        restricted_days = g.loc[g["restricted_volume_ml"] > 0, "day"]
        first_restriction = float(restricted_days.min()) if len(restricted_days) else float("nan")
        rows.append(
            {
                "lesion_id": int(lesion),
                "kind": kind,
                "first_day": float(present["day"].min()),
                "last_day": float(present["day"].max()),
                "max_volume_ml": float(present["volume_ml"].max()),
                "nadir_radc": nadir,
                "nadir_day": nadir_day,
                "first_restriction_day": first_restriction,
                "pseudonormalization_day": pn_day,
                "censored": bool(censored),
                "days_from_first_restriction_to_pseudonormalization": pn_day - first_restriction,
            }
        )
    columns = [
        "lesion_id",
        "kind",
        "first_day",
        "last_day",
        "max_volume_ml",
        "nadir_radc",
        "nadir_day",
        "first_restriction_day",
        "pseudonormalization_day",
        "censored",
        "days_from_first_restriction_to_pseudonormalization",
    ]
    return pd.DataFrame(rows, columns=columns)
