"""Tissue classes, reference regions and FLAIR lesion segmentation (restricted diffusion:
:mod:`pipeline.core.restricted`).

Pure functions on numpy arrays already resampled into one subject space (isotropic, about
1 mm). ``spacing_mm`` is always given in the SAME axis order as the arrays. ADC is in um^2/s.

Method (FLAIR lesions)
----------------------
1. :func:`csf_mask`: CSF incl. partial volume = ADC above ``reference_csf_adc_min_um2_s`` or
   FLAIR below ``csf_flair_max_ratio`` x the parenchymal FLAIR mode. :func:`deep_parenchyma`:
   brain farther than a margin from CSF and from the brain-mask surface.
2. :func:`flair_session_maps`: ``z`` = FLAIR above the normal level (the brighter of the deep
   and outer parenchyma half-sample modes) in units of the deep tissue's lower half-width;
   ``z_gm`` = FLAIR above the outer (cortical) mode in units of that tissue's upper
   half-width (grey-matter safeguard). Modes, unlike class medians, ignore lesion tails and
   partial volume.
3. :func:`hysteresis_series`: seeds above ``z_seed`` and ``gm_z_seed``; growth through voxels
   above ``z_grow`` and ``gm_z_grow`` connected in space or in time (adjacent sessions);
   CSF, ``csf_rim_mm`` around it and ``cortex_rim_mm`` inside the brain surface excluded,
   except that growth continues into that CSF rim where ``z > rim_z_grow`` (periventricular
   lesions keep their part against the ventricle; the rim alone never seeds); no seed within
   ``flair_fov_edge_no_seed_mm`` of the native FLAIR's slab edge (:func:`fov_seed_zone`). Before it,
   :func:`temporally_consistent`: where a voxel's z did not change between consecutive
   sessions (smoothed subtraction within ``change_sd`` robust SDs), those sessions share its
   mean z, so unchanged lesions keep one outline. Each
   lesion then takes its face-neighbours above ``edge_fraction`` of its own level
   (:func:`grow_relative_edge`); enclosed holes filled; components below
   ``min_lesion_volume_mm3`` dropped.
4. NAWM candidates for the ADC reference (:func:`nawm_candidates`; the final mask is
   :func:`pipeline.core.restricted.nawm_reference_mask`): deep parenchyma darker than its
   FLAIR mode, away from lesions, ADC near its mode.

:func:`tissue_model` (3-class FLAIR mixture) is kept as a utility; the lesion method does not
use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.core.boxes import bounding_box
from pipeline.core.distance import edt_mm

CSF, GM, WM = 1, 2, 3  #: labels of :attr:`TissueModel.labels` (0 outside the brain)
MAD_TO_SD = 1.4826  #: MAD of a normal distribution times this is its standard deviation

# Numerical (not scientific) settings of the histogram EM fit.
_EM_BINS = 256
_EM_MAX_ITER = 300
_EM_INIT_QUANTILES = (0.05, 0.40, 0.75)  # initial CSF, WM, GM means (quantiles of brain FLAIR)


def _check_spacing(spacing_mm: tuple[float, ...], ndim: int) -> tuple[float, ...]:
    sp = tuple(float(s) for s in spacing_mm)
    if len(sp) != ndim or not all(np.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing_mm must be {ndim} positive numbers, got {spacing_mm}")
    return sp


def _ball(radius_mm: float, spacing_mm: tuple[float, ...]) -> np.ndarray:
    """Ellipsoidal structuring element of physical radius ``radius_mm``."""
    half = [int(np.floor(radius_mm / s)) for s in spacing_mm]
    grids = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    d2 = sum((g * s) ** 2 for g, s in zip(grids, spacing_mm))
    return d2 <= radius_mm**2 + 1e-9


def remove_small_components(
    mask: np.ndarray, min_volume_mm3: float, spacing_mm: tuple[float, ...], connectivity: int = 3
) -> np.ndarray:
    """Drop connected components smaller than ``min_volume_mm3``.

    ``connectivity`` is the scipy rank (1: faces, 3: faces, edges and corners in 3D).
    """
    mask = np.asarray(mask, bool)
    sp = _check_spacing(spacing_mm, mask.ndim)
    out = np.zeros(mask.shape, bool)
    box = bounding_box(mask)  # components lie inside the mask's bounding box
    if box is None:
        return out
    lab, n = ndimage.label(mask[box], ndimage.generate_binary_structure(mask.ndim, connectivity))
    sizes = np.bincount(lab.ravel()) * float(np.prod(sp))
    keep = sizes >= min_volume_mm3
    keep[0] = False
    out[box] = keep[lab]
    return out


def fill_holes_per_component(mask: np.ndarray) -> np.ndarray:
    """Fill cavities fully enclosed by a lesion (3D), so confluent lesions are not hollow.

    The same as ``scipy.ndimage.binary_fill_holes`` (a cavity: background not face-connected
    to the array's border), found by labelling the background of the mask's bounding box grown
    by one voxel: that shell is background joined to everything outside the box, so the
    background components touching the box's faces are exactly those reaching the border.
    """
    mask = np.asarray(mask, bool)
    out = mask.copy()
    box = bounding_box(mask, 1)
    if box is None:
        return out
    sub = mask[box]
    lab, n = ndimage.label(~sub)  # face connectivity, as binary_fill_holes
    outside = np.zeros(n + 1, bool)
    for axis in range(sub.ndim):
        for end in (0, -1):
            outside[np.unique(np.take(lab, end, axis=axis))] = True
    out[box] = sub | ~outside[lab]  # label 0 (the mask) is kept by ``sub``
    return out


# --------------------------------------------------------------------------- tissue classes


@dataclass(frozen=True)
class TissueModel:
    """Tissue probabilities and hard classes inside the brain mask.

    Probability arrays are float32 and 0 outside the brain; ``labels`` holds :data:`CSF`,
    :data:`GM`, :data:`WM` (0 outside). Means and SDs are those of the FLAIR mixture
    components (FLAIR units), in the order CSF, WM, GM.
    """

    csf: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    labels: np.ndarray
    means: tuple[float, float, float]
    sds: tuple[float, float, float]


def _em_1d(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """3-component 1D Gaussian mixture by EM on a histogram; sorted by mean."""
    lo, hi = np.percentile(values, [0.5, 99.5])
    if not hi > lo:
        raise ValueError("FLAIR inside the brain mask has no contrast (constant intensity)")
    counts, edges = np.histogram(values, _EM_BINS, (lo, hi))
    x = 0.5 * (edges[1:] + edges[:-1])
    w = counts.astype(np.float64)
    mu = np.percentile(values, np.array(_EM_INIT_QUANTILES) * 100.0).astype(np.float64)
    floor = (hi - lo) / _EM_BINS  # an SD cannot shrink below one bin
    sd = np.full(3, (hi - lo) / 12.0)
    pi = np.full(3, 1.0 / 3.0)
    for _ in range(_EM_MAX_ITER):
        ll = -0.5 * ((x[:, None] - mu) / sd) ** 2 - np.log(sd) + np.log(pi)
        ll -= ll.max(axis=1, keepdims=True)
        r = np.exp(ll)
        r /= r.sum(axis=1, keepdims=True)
        rw = r * w[:, None]
        n = rw.sum(axis=0) + 1e-12
        new_mu = (rw * x[:, None]).sum(axis=0) / n
        sd = np.maximum(np.sqrt((rw * (x[:, None] - new_mu) ** 2).sum(axis=0) / n), floor)
        pi = np.maximum(n / n.sum(), 1e-6)
        done = np.allclose(new_mu, mu, atol=1e-4 * (hi - lo))
        mu = new_mu
        if done:
            break
    order = np.argsort(mu)
    return mu[order], sd[order], pi[order]


def tissue_model(
    flair: np.ndarray,
    brain_mask: np.ndarray,
    adc_um2_s: np.ndarray | None = None,
    *,
    csf_adc_min_um2_s: float,
) -> TissueModel:
    """CSF / GM / WM probabilities from FLAIR (and ADC when available); no atlas needed.

    Parameters
    ----------
    flair
        FLAIR image (bias-corrected; any intensity scale).
    brain_mask
        Brain mask on the same grid.
    adc_um2_s
        Optional ADC map (um^2/s) on the same grid. Where finite, ADC above
        ``csf_adc_min_um2_s`` makes a voxel CSF (probability 1); elsewhere the FLAIR mixture
        posterior decides.
    csf_adc_min_um2_s
        ADC above which tissue is CSF (um^2/s).

    Raises
    ------
    ValueError
        On shape mismatch, an empty brain mask or a FLAIR without contrast.
    """
    flair = np.asarray(flair, np.float32)
    brain = np.asarray(brain_mask, bool) & np.isfinite(flair)
    if brain.shape != flair.shape:
        raise ValueError(f"brain mask shape {brain.shape} differs from FLAIR {flair.shape}")
    if brain.sum() < 100:
        raise ValueError("brain mask has fewer than 100 voxels with a finite FLAIR value")
    v = flair[brain].astype(np.float64)
    mu, sd, pi = _em_1d(v)
    ll = -0.5 * ((v[:, None] - mu) / sd) ** 2 - np.log(sd) + np.log(pi)
    ll -= ll.max(axis=1, keepdims=True)
    post = np.exp(ll)
    post /= post.sum(axis=1, keepdims=True)  # columns: CSF, WM, GM
    # Voxels brighter than the GM mean are not CSF or WM by intensity (lesion or GM).
    bright = v > mu[2]
    post[bright] = (0.0, 0.0, 1.0)
    if adc_um2_s is not None:
        adc = np.asarray(adc_um2_s, np.float32)
        if adc.shape != flair.shape:
            raise ValueError(f"ADC shape {adc.shape} differs from FLAIR {flair.shape}")
        a = adc[brain]
        ok = np.isfinite(a)
        is_csf = ok & (a > csf_adc_min_um2_s)
        not_csf = ok & ~is_csf
        post[is_csf] = (1.0, 0.0, 0.0)
        rest = post[not_csf, 1:].sum(axis=1, keepdims=True)
        rest[rest == 0] = 1.0
        post[not_csf] = np.concatenate([np.zeros_like(rest), post[not_csf, 1:] / rest], axis=1)
    out = [np.zeros(flair.shape, np.float32) for _ in range(3)]
    for k in range(3):
        out[k][brain] = post[:, k]
    labels = np.zeros(flair.shape, np.uint8)
    labels[brain] = np.array([CSF, WM, GM], np.uint8)[np.argmax(post, axis=1)]
    return TissueModel(
        csf=out[0], gm=out[2], wm=out[1], labels=labels,
        means=(float(mu[0]), float(mu[1]), float(mu[2])),
        sds=(float(sd[0]), float(sd[1]), float(sd[2])),
    )


def nawm_mask(
    wm_mask: np.ndarray,
    lesion_masks: list[np.ndarray] | tuple[np.ndarray, ...],
    *,
    erosion_mm: float,
    lesion_margin_mm: float,
    spacing_mm: tuple[float, ...],
) -> np.ndarray:
    """Normal-appearing white matter: WM eroded by ``erosion_mm`` and farther than
    ``lesion_margin_mm`` from any voxel of any lesion mask (e.g. FLAIR and restricted masks of
    this and other sessions)."""
    wm = np.asarray(wm_mask, bool)
    sp = _check_spacing(spacing_mm, wm.ndim)
    out = wm
    if erosion_mm > 0:
        out = ndimage.binary_erosion(wm, _ball(erosion_mm, sp), border_value=0)
    lesions = np.zeros(wm.shape, bool)
    for m in lesion_masks:
        m = np.asarray(m, bool)
        if m.shape != wm.shape:
            raise ValueError(f"lesion mask shape {m.shape} differs from WM mask {wm.shape}")
        lesions |= m
    if lesions.any():
        out = out & farther_than(lesions, lesion_margin_mm, sp)
    return out


def farther_than(mask: np.ndarray, distance_mm: float, spacing_mm: tuple[float, ...]) -> np.ndarray:
    """Voxels farther than ``distance_mm`` from every voxel of ``mask`` (bool).

    Same result as thresholding the Euclidean distance transform of the whole volume, computed
    only on the mask's bounding box grown by the distance: every voxel outside that box is
    farther away along one axis alone, and inside it the nearest mask voxel is in the box.
    """
    mask = np.asarray(mask, bool)
    out = np.ones(mask.shape, bool)
    if not mask.any():
        return out
    pad = [int(np.ceil(distance_mm / s)) + 1 for s in spacing_mm]
    box = tuple(
        slice(max(int(idx.min()) - p, 0), min(int(idx.max()) + p + 1, n))
        for idx, p, n in zip(np.nonzero(mask), pad, mask.shape)
    )
    out[box] = edt_mm(~mask[box], spacing_mm) > distance_mm
    return out


# --------------------------------------------------------------------------- FLAIR lesions


@dataclass(frozen=True)
class RobustRef:
    """Robust location and scale of an intensity reference."""

    median: float
    sd: float  #: MAD * 1.4826
    n_voxels: int


def _median_sd(v: np.ndarray) -> tuple[float, float]:
    """Median and MAD-based SD (``MAD_TO_SD`` x MAD) of the values ``v`` (float64)."""
    med = float(np.median(v))
    return med, float(MAD_TO_SD * np.median(np.abs(v - med)))


def robust_reference(image: np.ndarray, mask: np.ndarray) -> RobustRef:
    """Median and MAD-based SD of the finite values of ``image`` inside ``mask``.

    Raises
    ------
    ValueError
        If the mask has no finite voxel or the values have no spread.
    """
    v = np.asarray(image)[np.asarray(mask, bool)]
    v = v[np.isfinite(v)].astype(np.float64)
    if v.size == 0:
        raise ValueError("reference mask holds no voxel with a finite value")
    med, sd = _median_sd(v)
    if not sd > 0:
        raise ValueError("reference voxels have no spread (MAD is 0); cannot normalise")
    return RobustRef(med, sd, int(v.size))


def normalize_flair(flair: np.ndarray, wm_mask: np.ndarray) -> np.ndarray:
    """Robust z-score of FLAIR against white matter: ``(flair - median) / (1.4826 * MAD)``
    over ``wm_mask`` (float32; NaN where FLAIR is not finite)."""
    ref = robust_reference(flair, wm_mask)
    return ((np.asarray(flair, np.float32) - ref.median) / ref.sd).astype(np.float32)


@dataclass(frozen=True)
class FlairMaps:
    """Per-session maps of :func:`flair_session_maps`."""

    z: np.ndarray  #: float32, (FLAIR - normal level) / deep-tissue scale; NaN where not finite
    z_wm: np.ndarray  #: float32, (FLAIR - deep mode) / deep-tissue scale
    domain: np.ndarray  #: bool, where a FLAIR lesion may be
    csf: np.ndarray  #: bool, CSF including partial volume (:func:`csf_mask`)
    deep: np.ndarray  #: bool, deep parenchyma (:func:`deep_parenchyma`)
    deep_ref: RobustRef  #: FLAIR mode and lower half-width of the deep parenchyma
    outer_mode: float  #: FLAIR mode of the outer (cortical) parenchyma (NaN if too small)
    z_gm: np.ndarray  #: float32, (FLAIR - outer mode) / outer upper half-width (grey-matter z)
    #: bool, the CSF rim: non-CSF brain within ``csf_rim_mm`` of CSF (and deeper than
    #: ``cortex_rim_mm``); lesions grown from the domain may enter it (``rim_z_grow``)
    rim: np.ndarray | None = None

    def nawm_candidates(self, flair_z_max: float) -> np.ndarray:
        """Candidate NAWM (bool): deep parenchyma at most ``flair_z_max`` deep-tissue SDs above
        its mode (white matter is the darkest non-CSF tissue on FLAIR, and on a b0)."""
        return self.deep & (self.z_wm <= flair_z_max)


def flair_session_maps(
    flair: np.ndarray,
    brain_mask: np.ndarray,
    adc_um2_s: np.ndarray | None = None,
    *,
    csf_adc_min_um2_s: float,
    csf_flair_max_ratio: float,
    reference_csf_margin_mm: float,
    reference_depth_mm: float,
    cortex_rim_mm: float,
    csf_rim_mm: float,
    spacing_mm: tuple[float, ...],
    threads: int = 1,
) -> FlairMaps:
    """CSF, deep parenchyma, lesion domain and FLAIR z-map of one session.

    The normal-tissue level is the brighter of two half-sample modes (:func:`mode_reference`):
    that of the deep parenchyma (mostly white matter) and that of the outer parenchyma (the
    rest of the non-CSF brain: cortex, partial volume). Grey matter is brighter than white
    matter on FLAIR, so a lesion must stand out against grey matter too; a mode, unlike a class
    median, is the level of the bulk of crisp cortex and is not pulled down by partial volume.
    The scale is the lower half-width of the deep parenchyma (noise plus normal variation),
    which ignores the bright lesion tail. ``z = (FLAIR - level) / scale``.
    ``z_gm = (FLAIR - outer mode) / upper half-width of the outer parenchyma`` measures how far
    a voxel stands above the bright (grey-matter) side of the outer tissue, in units of that
    side's own spread (crisp real cortex is a wide bright tail that a white-matter scale
    under-rates). The domain is the brain minus CSF, minus ``csf_rim_mm`` around CSF and ``cortex_rim_mm``
    inside the brain-mask surface (partial-volume rims, skull-strip edge).
    ``threads``: of the distance transforms (:func:`parenchyma_distances`); same result.
    """
    flair = np.asarray(flair, np.float32)
    brain = np.asarray(brain_mask, bool)
    if brain.shape != flair.shape:
        raise ValueError(f"brain mask shape {brain.shape} differs from FLAIR {flair.shape}")
    sp = _check_spacing(spacing_mm, flair.ndim)
    brain = brain & np.isfinite(flair)
    if np.count_nonzero(brain) < 100:
        raise ValueError("brain mask has fewer than 100 voxels with a finite FLAIR value")
    csf = csf_mask(flair, brain, adc_um2_s, csf_adc_min_um2_s=csf_adc_min_um2_s,
                   csf_flair_max_ratio=csf_flair_max_ratio)
    # both distance maps once: they set the deep reference region and the lesion domain
    distances = parenchyma_distances(brain, csf, sp, threads=threads)
    deep = deep_parenchyma(brain, csf, csf_margin_mm=reference_csf_margin_mm,
                           surface_margin_mm=reference_depth_mm, spacing_mm=sp,
                           distances=distances)
    if np.count_nonzero(deep) < 100:  # tiny or thin brains: all parenchyma
        deep = brain & ~csf
    ref = mode_reference(flair, deep)
    outer = brain & ~csf & ~deep
    outer_mode = half_sample_mode(flair[outer]) if np.count_nonzero(outer) >= 100 else np.nan
    level = max(ref.median, outer_mode) if np.isfinite(outer_mode) else ref.median
    z_wm = ((flair - np.float32(ref.median)) / np.float32(ref.sd)).astype(np.float32)
    z = ((flair - np.float32(level)) / np.float32(ref.sd)).astype(np.float32)
    inside = brain & ~csf & (distances.depth_mm > cortex_rim_mm)
    dom = inside & (distances.to_csf_mm > csf_rim_mm)
    z_gm = z
    if np.isfinite(outer_mode):
        v = flair[outer]
        up = v[v > outer_mode] - outer_mode
        gsd = MAD_TO_SD * float(np.median(up)) if up.size else 0.0
        if gsd > 0:
            z_gm = ((flair - np.float32(outer_mode)) / np.float32(gsd)).astype(np.float32)
    return FlairMaps(z, z_wm, dom, csf, deep, ref, float(outer_mode), z_gm, inside & ~dom)


def joint_step_maps(m: FlairMaps) -> FlairMaps:
    """``m`` with only the fields :func:`hysteresis_series` reads (``z``, ``z_gm``, ``domain``,
    ``rim``): ``z_wm``, ``csf`` and ``deep`` set to None, so a caller holding every session's
    maps for the joint step does not also hold three volumes per session it no longer needs."""
    return dataclasses.replace(m, z_wm=None, csf=None, deep=None)


def fov_seed_zone(fov_edge_mm: np.ndarray | None, no_seed_mm: float) -> np.ndarray | None:
    """Where a FLAIR lesion may seed (bool): farther than ``no_seed_mm`` from the edge of the
    native FLAIR's field of view, given its through-plane distance ``fov_edge_mm`` (mm,
    :func:`pipeline.core.registration.fov_edge_distance`; ``+inf`` where the edge is not known).
    None (seeds anywhere) when ``fov_edge_mm`` is None or ``no_seed_mm`` is 0.

    The end slices of a 2D multi-slice FLAIR are bright as a whole (an acquisition effect:
    benchmarks/results/segmentation.md, session 14 E), and there the medulla, pons and lower
    cerebellum pass the seed gates; growth from seeds elsewhere may still enter the zone.
    """
    if fov_edge_mm is None or not no_seed_mm > 0:
        return None
    with np.errstate(invalid="ignore"):
        return np.asarray(fov_edge_mm) > no_seed_mm


def hysteresis_series(
    maps: list[FlairMaps],
    brain_masks: list[np.ndarray],
    *,
    z_seed: float,
    z_grow: float,
    gm_z_seed: float,
    gm_z_grow: float,
    min_lesion_volume_mm3: float,
    spacing_mm: tuple[float, ...],
    edge_fraction: float = 0.0,
    edge_percentile: float = 90.0,
    rim_z_grow: float = np.inf,
    change_sd: float = np.inf,
    change_smooth_mm: float = 1.0,
    edge_level_all_sessions: bool = False,
    edge_level_floor: float = 1.0,
    seed_zones: list[np.ndarray | None] | None = None,
    workers: int = 1,
) -> list[np.ndarray]:
    """Spatio-temporal hysteresis on the stacked z-maps of :func:`flair_session_maps`.

    Seeds are domain voxels above ``z_seed`` (and ``gm_z_seed`` on the grey-matter z) in any
    session; growth runs through domain voxels above ``z_grow`` (and ``gm_z_grow``) connected in space (26-neighbourhood within a session) or in time (the
    same voxel in the previous or next session). With ``edge_fraction`` > 0 each lesion then
    takes its face-neighbours above that fraction of its own level (:func:`grow_relative_edge`;
    only lesions whose core already reaches ``min_lesion_volume_mm3``; with
    ``edge_level_all_sessions`` its level is its own session's, but at least ``edge_level_floor``
    times the highest over the sessions). Holes enclosed by a lesion are filled and components below ``min_lesion_volume_mm3``
    dropped, per session.

    Longitudinal consistency (``change_sd`` finite): after the seeds are found, the maps go
    through :func:`temporally_consistent` (``change_smooth_mm``), so sessions between which a
    voxel's FLAIR did not change see the same z and z_gm when growing.

    Periventricular rule: growth (never a seed) may also run through the CSF rim
    (:attr:`FlairMaps.rim`) where ``z > rim_z_grow``, so a lesion whose core lies outside the
    rim keeps its part against the ventricle, while the thin bright ependymal rim alone never
    starts a lesion (``inf``: the rim is excluded).

    Field-of-view rule (``seed_zones``, per session a bool mask or None, :func:`fov_seed_zone`):
    a session's seeds lie inside its zone (away from its native FLAIR's slab edge); growth,
    in space and time, is not limited by it.

    ``workers``: threads for the per-session steps (:func:`per_session`); the result does not
    depend on it.
    """
    _check_thresholds(z_seed, z_grow, gm_z_seed, gm_z_grow)
    n = len(maps)
    if n == 0:
        return []
    if seed_zones is not None and len(seed_zones) != n:
        raise ValueError(f"seed_zones: {len(seed_zones)} entries for {n} sessions")
    sp = _check_spacing(spacing_mm, maps[0].z.ndim)
    # Memory: besides the input maps, only bool volumes (seeds, growth mask), the maps' values
    # where a run mean is taken (:class:`RunMeans`) and, for the edge step, one float z-map per
    # session are kept; the consistent maps are made one session at a time.
    shape = (n,) + maps[0].z.shape
    # seeds from each session's own evidence: the mean over sessions judged unchanged must not
    # pull a lesion's peak under z_seed (a slow rise passes the change test)
    seeds = np.empty(shape, bool)

    def seed(t):
        m = maps[t]
        seeds[t] = (_grow_z(m, gm_z_grow, rim_z_grow) > z_seed) & m.domain & (m.z_gm > gm_z_seed)
        if seed_zones is not None and seed_zones[t] is not None:
            seeds[t] &= seed_zones[t]

    per_session(seed, n, workers)
    runs = (unchanged_runs(maps, change_sd=change_sd, smooth_mm=change_smooth_mm, spacing_mm=sp,
                           workers=workers)
            if np.isfinite(change_sd) and n >= 2 else None)
    means = None
    if runs is not None:
        # a mean over sessions is above 0 only where some session's z is: elsewhere the voxel is
        # never grown, never an edge voxel (z > 0) nor part of a lesion's level, so the means
        # are taken only here (the work of a run mean grows with the square of the sessions)
        live = np.zeros(maps[0].z.shape, bool)
        with np.errstate(invalid="ignore"):
            for m in maps:
                live |= m.z > 0
        means = RunMeans([[m.z for m in maps], [m.z_gm for m in maps]], runs, where=live,
                         workers=workers)
        del live
    above = np.empty(shape, bool)  # where lesions may grow: z above z_grow (4D)

    def consistent(t):
        """Fills ``above[t]``; returns session ``t``'s z on its domain for the edge step."""
        m = maps[t]
        if runs is not None:  # temporally_consistent, one session at a time
            z, z_gm = means(t)
            m = dataclasses.replace(m, z=z, z_gm=z_gm)
        above[t] = _grow_z(m, gm_z_grow, rim_z_grow) > z_grow
        return np.where(m.domain, m.z, np.nan) if edge_fraction > 0 else None

    zdom = per_session(consistent, n, workers)
    del runs, means
    st = np.zeros((3,) * 4, bool)
    st[1] = ndimage.generate_binary_structure(3, 3)
    st[0, 1, 1, 1] = st[2, 1, 1, 1] = True
    # the components of `above` (connected in space or time) that hold a seed: propagation
    # from the seeds inside it (a seed no longer above z_grow after the consistency step
    # starts nothing), without a 4D int32 label volume
    seeds &= above
    # growth never leaves `above`: propagate on the box of its voxels over all sessions (the
    # propagation's passes scan the whole array; here ~0.4x of it, the same result)
    grown = np.zeros(shape, bool)
    box = bounding_box(above.any(axis=0))
    if box is not None:
        box = (slice(None),) + box
        grown[box] = ndimage.binary_propagation(seeds[box], structure=st, mask=above[box])
    del seeds, above

    def finish(t):
        m = grown[t]
        if edge_fraction > 0:
            # the size rule judges the hysteresis core: a shell must not lift a speck over it
            m = remove_small_components(m, min_lesion_volume_mm3, sp)
            others = [zdom[u] for u in range(n) if u != t] if edge_level_all_sessions else []
            m = grow_relative_edge(m, zdom[t], fraction=edge_fraction, percentile=edge_percentile,
                                   level_z=others, level_floor=edge_level_floor)
        m = fill_holes_per_component(m) & np.asarray(brain_masks[t], bool)
        return remove_small_components(m, min_lesion_volume_mm3, sp)

    return per_session(finish, n, workers)


def per_session(step: Callable[[int], object], n: int, workers: int = 1) -> list:
    """``[step(0), ..., step(n - 1)]``, run in up to ``workers`` threads (scipy.ndimage and
    numpy release the GIL in their loops). ``step(t)`` must depend only on its own session's
    data and write only its own session's slot of a shared array, so the results do not depend
    on ``workers``."""
    workers = max(1, min(int(workers), n))
    if workers == 1:
        return [step(t) for t in range(n)]
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(step, range(n)))


def unchanged_runs(
    maps: list[FlairMaps], *, change_sd: float, smooth_mm: float, spacing_mm: tuple[float, ...],
    workers: int = 1,
) -> np.ndarray:
    """Per voxel and session, the index of its run of unchanged sessions (int16, sessions
    first): consecutive sessions share a run where their FLAIR did not change.

    The change between sessions t-1 and t is ``z_t - z_(t-1)`` smoothed by a Gaussian of
    ``smooth_mm`` (sigma); it counts as a change where its magnitude exceeds ``change_sd``
    robust SDs (MAD) of that smoothed difference over the voxels where both sessions may hold
    a lesion (mostly unchanged tissue), or where either z is not finite. The test is a
    subtraction image between consecutive sessions, as LST-long and MSSEG-2 methods use.
    ``workers``: threads over the session pairs (:func:`per_session`).
    """
    n = len(maps)
    runs = np.zeros((n,) + maps[0].z.shape, np.int16)
    sigma = [smooth_mm / s for s in spacing_mm]

    def changed(t):
        """bool: where the FLAIR changed between sessions t-1 and t (True: everywhere)."""
        a, b = maps[t - 1].z, maps[t].z
        ok = np.isfinite(a) & np.isfinite(b)
        diff = ndimage.gaussian_filter(np.where(ok, b - a, 0.0).astype(np.float32), sigma)
        both = maps[t - 1].domain & maps[t].domain & ok
        if np.count_nonzero(both) < 100:
            return True
        med, sd = _median_sd(diff[both].astype(np.float64))
        return ~ok | ~(np.abs(diff - med) <= change_sd * sd)

    steps = per_session(lambda k: changed(k + 1), n - 1, workers)
    for t in range(1, n):
        runs[t] = runs[t - 1] + steps[t - 1]
    return runs


def run_average(values: list[np.ndarray], runs: np.ndarray) -> list[np.ndarray]:
    """Each session's ``values`` replaced, voxel by voxel, by their mean over the sessions of
    the same run of :func:`unchanged_runs` (:func:`run_mean` of every session)."""
    means = RunMeans([values], runs)
    return [means(t)[0] for t in range(len(values))]


def run_mean(values: list[np.ndarray], runs: np.ndarray, t: int,
             where: np.ndarray | None = None) -> np.ndarray:
    """Session ``t``'s ``values``, voxel by voxel, averaged over the sessions of its run of
    :func:`unchanged_runs` (finite values only; a voxel not finite in session ``t`` stays as it
    is; float32). With ``where`` (bool), only those voxels are averaged; the others keep session
    ``t``'s value. For several sessions of the same values use :class:`RunMeans`."""
    return RunMeans([values], runs, where)(t)[0]


class RunMeans:
    """:func:`run_mean` of several lists of per-session values (e.g. every session's ``z`` and
    ``z_gm``) sharing one ``runs`` and ``where``, for any session ``t``:
    ``RunMeans(value_lists, runs, where)(t)`` is the list of session ``t``'s means, one per value
    list. Calls for different ``t`` may run in threads; ``workers``: threads over the value
    lists while the means are made (:func:`per_session`).

    ``runs`` must number blocks of consecutive sessions (never decreasing from one session to
    the next, as :func:`unchanged_runs` gives). Every session's means at ``where`` are then
    found at once with work linear in the sessions (a sum over all sessions per session grew
    with their square): a running sum over the sessions restarts where the run changes, and
    each session takes the sum at its run's last session. That sum adds the run's finite
    values in session order starting from 0, as the sum over all sessions adding 0 outside the
    run does, so the means are the same to the bit (the sign of a zero sum aside). Held: per
    session and value list, 4 bytes (float32 mean) per ``where`` voxel.
    """

    def __init__(self, value_lists: list[list[np.ndarray]], runs: np.ndarray,
                 where: np.ndarray | None = None, workers: int = 1):
        if where is None:
            where = np.ones(value_lists[0][0].shape, bool)
        self._lists = value_lists
        self._idx = np.flatnonzero(where)
        at_runs = [np.asarray(r).reshape(-1)[self._idx] for r in runs]
        n = len(at_runs)
        # same[u]: sessions u and u + 1 are in one run
        same = [at_runs[u + 1] == at_runs[u] for u in range(n - 1)]
        if any((at_runs[u + 1] < at_runs[u]).any() for u in range(n - 1)):
            raise ValueError("runs must not decrease from one session to the next")
        del at_runs
        self._means = per_session(lambda k: self._session_means(value_lists[k], same),
                                  len(value_lists), workers)

    def _session_means(self, values: list[np.ndarray], same: list[np.ndarray]) -> list:
        at = [np.asarray(v).reshape(-1)[self._idx] for v in values]
        finite = [np.isfinite(a) for a in at]
        totals, counts = [], []
        for u in range(len(at)):  # running sums, restarted where a run starts
            add = np.where(finite[u], at[u], 0.0)  # float32, added to float64 sums
            if u == 0:
                totals.append(np.zeros(add.shape) + add)
                counts.append(finite[u].astype(np.int16))
            else:
                totals.append(np.where(same[u - 1], totals[u - 1], 0.0) + add)
                counts.append(np.where(same[u - 1], counts[u - 1], 0).astype(np.int16)
                              + finite[u])
        for u in range(len(at) - 2, -1, -1):  # every session: the sum at its run's end
            totals[u] = np.where(same[u], totals[u + 1], totals[u])
            counts[u] = np.where(same[u], counts[u + 1], counts[u])
        with np.errstate(invalid="ignore", divide="ignore"):
            return [np.where(f, total / count, a).astype(np.float32)
                    for f, total, count, a in zip(finite, totals, counts, at)]

    def __call__(self, t: int) -> list[np.ndarray]:
        out = []
        for values, means in zip(self._lists, self._means):
            o = np.array(values[t], np.float32)
            o.reshape(-1)[self._idx] = means[t]
            out.append(o)
        return out


def temporally_consistent(
    maps: list[FlairMaps], *, change_sd: float, smooth_mm: float, spacing_mm: tuple[float, ...]
) -> list[FlairMaps]:
    """``maps`` with ``z`` and ``z_gm`` averaged over each voxel's unchanged sessions
    (:func:`unchanged_runs`, :func:`run_average`): where FLAIR did not change, every session
    sees the same evidence, so an unchanged lesion keeps its outline and noise is averaged down;
    where it changed, each session keeps its own values."""
    if len(maps) < 2:
        return list(maps)
    runs = unchanged_runs(maps, change_sd=change_sd, smooth_mm=smooth_mm, spacing_mm=spacing_mm)
    z = run_average([m.z for m in maps], runs)
    z_gm = run_average([m.z_gm for m in maps], runs)
    return [dataclasses.replace(m, z=zt, z_gm=gt) for m, zt, gt in zip(maps, z, z_gm)]


def _grow_z(m: FlairMaps, gm_z_grow: float, rim_z_grow: float) -> np.ndarray:
    """``z`` where a lesion may grow (domain, or rim above ``rim_z_grow``), else -inf."""
    where = m.domain
    if np.isfinite(rim_z_grow) and m.rim is not None:
        with np.errstate(invalid="ignore"):
            where = where | (m.rim & (m.z > rim_z_grow))
    return np.where(where & np.isfinite(m.z) & (m.z_gm > gm_z_grow), m.z, -np.inf)


def _component_percentile(lab: np.ndarray, n: int, z: np.ndarray, percentile: float) -> np.ndarray:
    """``percentile`` of ``z`` over each labelled component (index 0 unused). NaN sorts above
    every value, so a component with more NaN than ``100 - percentile`` % has a NaN level."""
    mask = lab > 0
    vals = np.where(np.isfinite(z[mask]), z[mask], np.nan)
    ids = lab[mask]
    order = np.lexsort((vals, ids))  # by component, then by z
    vals, ids = vals[order], ids[order]
    start = np.searchsorted(ids, np.arange(1, n + 1))
    count = np.bincount(ids, minlength=n + 1)[1:]
    pos = start + percentile / 100.0 * (count - 1)  # linear interpolation, as numpy.percentile
    lo, hi = np.floor(pos).astype(int), np.ceil(pos).astype(int)
    level = np.zeros(n + 1)
    level[1:] = vals[lo] + (pos - lo) * (vals[hi] - vals[lo])  # NaN sorts last
    return level


def grow_relative_edge(
    mask: np.ndarray, z: np.ndarray, *, fraction: float, percentile: float,
    level_z: list[np.ndarray] | tuple[np.ndarray, ...] = (),
    level_floor: float = 1.0,
) -> np.ndarray:
    """Add to each lesion its face-neighbours whose ``z`` is above ``fraction`` times the
    lesion's own level (the ``percentile`` of ``z`` over the lesion, 26-connected components).

    A fixed grow threshold cuts a faint lesion inside its blurred edge and a bright one outside
    it; a fraction of the lesion's level puts the edge at the same relative height for both
    (the phantom truth is the half-plateau contour, blurred by the acquisition). One voxel deep
    only, so a faint region never spreads through normal tissue. ``z`` is NaN where no lesion
    may be; voxels with ``z <= 0`` are never added.

    ``level_z``: the same z-maps at the subject's other sessions; the level is then the lesion's
    own percentile, but at least ``level_floor`` times the highest percentile of its voxels over
    all sessions (1: that highest), so a lesion still brightening (or fading) has its edge near
    the height its tissue reaches, not at a fraction of a low early peak, while a lesion whose
    own level is already most of that height keeps its own.
    """
    if not 0.0 <= level_floor <= 1.0:
        raise ValueError(f"level_floor must be in [0, 1], got {level_floor}")
    mask = np.asarray(mask, bool)
    out = mask.copy()
    # every lesion and its face-neighbours lie in the mask's bounding box grown by one voxel;
    # labels are numbered in raster order, which the box keeps: the same ids and levels
    box = bounding_box(mask, 1)
    if box is None:
        return out
    sub = mask[box]
    lab, n = ndimage.label(sub, ndimage.generate_binary_structure(mask.ndim, mask.ndim))
    zb = np.asarray(z)[box]
    level = _component_percentile(lab, n, zb, percentile)
    if len(level_z):
        highest = level
        for other in level_z:
            highest = np.fmax(highest, _component_percentile(lab, n, np.asarray(other)[box],
                                                             percentile))
        level = np.fmax(level, level_floor * highest)
    near = ndimage.grey_dilation(lab, footprint=ndimage.generate_binary_structure(mask.ndim, 1))
    with np.errstate(invalid="ignore"):
        add = (near > 0) & ~sub & (zb > 0) & (zb > fraction * level[near])
    out[box] = sub | add
    return out


def _check_thresholds(z_seed: float, z_grow: float, gm_z_seed: float, gm_z_grow: float) -> None:
    if z_grow > z_seed:
        raise ValueError(f"z_grow ({z_grow}) must not exceed z_seed ({z_seed})")
    if gm_z_grow > gm_z_seed:
        raise ValueError(f"gm_z_grow ({gm_z_grow}) must not exceed gm_z_seed ({gm_z_seed})")


def segment_flair_series(
    flairs: list[np.ndarray],
    brain_masks: list[np.ndarray],
    *,
    z_seed: float,
    z_grow: float,
    gm_z_seed: float,
    gm_z_grow: float,
    csf_adc_min_um2_s: float,
    csf_flair_max_ratio: float,
    reference_csf_margin_mm: float,
    reference_depth_mm: float,
    cortex_rim_mm: float,
    csf_rim_mm: float,
    min_lesion_volume_mm3: float,
    spacing_mm: tuple[float, ...],
    adcs_um2_s: list[np.ndarray | None] | None = None,
    maps: list[FlairMaps] | None = None,
    edge_fraction: float = 0.0,
    edge_percentile: float = 90.0,
    rim_z_grow: float = np.inf,
) -> list[np.ndarray]:
    """FLAIR lesions of several sessions of one subject, already in one space (time order).

    Each session is normalised to its own normal tissue (:func:`flair_session_maps`, or the
    precomputed ``maps``), then :func:`hysteresis_series` runs over all sessions: a faint voxel
    at one session is kept when the same lesion is clearly seen at an adjacent session, while
    noise faint at every session is not.

    Parameters
    ----------
    z_seed, z_grow
        Hysteresis thresholds on ``z`` (robust SD of the deep tissue above the normal level).
    gm_z_seed, gm_z_grow
        Seeds / grown voxels must also exceed these on ``z_gm`` (upper half-widths of the outer
        parenchyma above its mode): the grey-matter safeguard.
    csf_adc_min_um2_s, csf_flair_max_ratio
        CSF rules of :func:`csf_mask`.
    reference_csf_margin_mm, reference_depth_mm
        Deep-parenchyma reference region, see :func:`deep_parenchyma` (mm).
    cortex_rim_mm, csf_rim_mm
        Voxels closer than these to the brain-mask surface / to CSF are never lesion (mm).
    min_lesion_volume_mm3
        Smaller connected components (26-connectivity) are dropped (mm^3).
    spacing_mm
        Voxel size, same axis order as the arrays (mm).
    adcs_um2_s
        Optional ADC maps (um^2/s), CSF detection.
    maps
        Precomputed :func:`flair_session_maps` (then the CSF / reference / rim parameters are
        not used again).
    edge_fraction, edge_percentile
        Relative edge step of :func:`grow_relative_edge` (0: off).
    rim_z_grow
        Periventricular rule of :func:`hysteresis_series` (``inf``: off).

    Returns
    -------
    list of numpy.ndarray
        One boolean lesion mask per session.
    """
    _check_thresholds(z_seed, z_grow, gm_z_seed, gm_z_grow)
    n = len(flairs)
    if n == 0:
        return []
    if len(brain_masks) != n:
        raise ValueError(f"{n} FLAIR images but {len(brain_masks)} brain masks")
    adcs = list(adcs_um2_s) if adcs_um2_s is not None else [None] * n
    if len(adcs) != n:
        raise ValueError(f"{n} FLAIR images but {len(adcs)} ADC maps")
    shape = np.shape(flairs[0])
    sp = _check_spacing(spacing_mm, len(shape))
    for f in flairs:
        if np.shape(f) != shape:
            raise ValueError(f"all sessions must share one grid: {np.shape(f)} vs {shape}")
    if maps is None:
        maps = [
            flair_session_maps(
                f, b, a, csf_adc_min_um2_s=csf_adc_min_um2_s,
                csf_flair_max_ratio=csf_flair_max_ratio,
                reference_csf_margin_mm=reference_csf_margin_mm,
                reference_depth_mm=reference_depth_mm, cortex_rim_mm=cortex_rim_mm,
                csf_rim_mm=csf_rim_mm, spacing_mm=sp,
            )
            for f, b, a in zip(flairs, brain_masks, adcs)
        ]
    if len(maps) != n:
        raise ValueError(f"{n} FLAIR images but {len(maps)} session maps")
    brains = [np.asarray(b, bool) & np.isfinite(f) for f, b in zip(flairs, brain_masks)]
    return hysteresis_series(maps, brains, z_seed=z_seed, z_grow=z_grow, gm_z_seed=gm_z_seed,
                             gm_z_grow=gm_z_grow, min_lesion_volume_mm3=min_lesion_volume_mm3,
                             spacing_mm=sp, edge_fraction=edge_fraction,
                             edge_percentile=edge_percentile, rim_z_grow=rim_z_grow)


def segment_flair_lesions(
    flair: np.ndarray,
    brain_mask: np.ndarray,
    *,
    adc_um2_s: np.ndarray | None = None,
    **params,
) -> np.ndarray:
    """FLAIR-hyperintense lesion mask (bool) of one session: :func:`segment_flair_series` of a
    single session (same keyword parameters)."""
    flair = np.asarray(flair, np.float32)
    if np.shape(brain_mask) != flair.shape:
        raise ValueError(f"brain mask shape {np.shape(brain_mask)} differs from FLAIR {flair.shape}")
    return segment_flair_series([flair], [brain_mask], adcs_um2_s=[adc_um2_s], **params)[0]


# --------------------------------------------------------------------------- reference regions


def half_sample_mode(values: np.ndarray) -> float:
    """Half-sample mode (Bickel & Fruehwirth 2006) of the finite values: the centre of the
    densest half, found by repeatedly keeping the shortest interval holding half of the values.

    Robust to a one-sided tail of up to half of the values (lesions are bright on FLAIR; partial
    volume with grey matter and CSF raises ADC), unlike the median.

    Raises
    ------
    ValueError
        If there is no finite value.
    """
    v = np.asarray(values, np.float64).ravel()
    v = np.sort(v[np.isfinite(v)])
    if v.size == 0:
        raise ValueError("half-sample mode of an empty sample")
    while v.size > 3:
        h = (v.size + 1) // 2
        widths = v[h - 1:] - v[: v.size - h + 1]
        i = int(np.argmin(widths))
        v = v[i: i + h]
    return float(np.median(v))


def mode_reference(image: np.ndarray, mask: np.ndarray) -> RobustRef:
    """Location = :func:`half_sample_mode`, scale = 1.4826 * median distance below the mode
    (the lower half-width) of the finite values of ``image`` in ``mask``.

    Both ignore an upper tail (lesions, partial volume), so the normal tissue is described even
    when a large part of the mask is abnormal on one side. ``RobustRef.median`` holds the mode.

    Raises
    ------
    ValueError
        If the mask has no finite voxel or the values below the mode have no spread.
    """
    v = np.asarray(image)[np.asarray(mask, bool)]
    v = v[np.isfinite(v)].astype(np.float64)
    if v.size == 0:
        raise ValueError("reference mask holds no voxel with a finite value")
    mode = half_sample_mode(v)
    below = mode - v[v < mode]
    sd = float(MAD_TO_SD * np.median(below)) if below.size else 0.0
    if not sd > 0:
        raise ValueError("reference voxels have no spread below the mode; cannot normalise")
    return RobustRef(mode, sd, int(v.size))


def csf_mask(
    flair: np.ndarray,
    brain_mask: np.ndarray,
    adc_um2_s: np.ndarray | None = None,
    *,
    csf_adc_min_um2_s: float,
    csf_flair_max_ratio: float,
) -> np.ndarray:
    """CSF including partial-volume CSF, inside the brain mask (bool).

    A voxel is CSF when its ADC is above ``csf_adc_min_um2_s`` or not finite (when an ADC is
    given), or when its FLAIR is below ``csf_flair_max_ratio`` times the half-sample mode of the
    FLAIR of the remaining brain (suppressed CSF is dark on FLAIR).
    """
    flair = np.asarray(flair, np.float32)
    brain = np.asarray(brain_mask, bool) & np.isfinite(flair)
    if brain.shape != flair.shape:
        raise ValueError(f"brain mask shape {brain.shape} differs from FLAIR {flair.shape}")
    csf = np.zeros(flair.shape, bool)
    if adc_um2_s is not None:
        adc = np.asarray(adc_um2_s, np.float32)
        if adc.shape != flair.shape:
            raise ValueError(f"ADC shape {adc.shape} differs from FLAIR {flair.shape}")
        csf = brain & ~(np.isfinite(adc) & (adc <= csf_adc_min_um2_s))
    rest = brain & ~csf
    if not rest.any():
        return csf
    level = half_sample_mode(flair[rest])
    return csf | (rest & (flair < csf_flair_max_ratio * level))


@dataclass(frozen=True)
class ParenchymaDistances:
    """Euclidean distances (mm, float64) used by :func:`deep_parenchyma` and the lesion domain."""

    #: distance to the nearest CSF voxel (inf everywhere without CSF); NaN outside the box of
    #: brain and CSF grown by one voxel (see :func:`parenchyma_distances`)
    to_csf_mm: np.ndarray
    depth_mm: np.ndarray  #: distance to the nearest voxel outside the brain mask (0 outside)


def analysis_box(brains: list[np.ndarray], spacing_mm: tuple[float, ...],
                 smooth_mm: float) -> tuple[slice, ...]:
    """The part of the subject-space grid the segmentation needs: the bounding box of every
    session's brain mask, grown by the reach of the joint step's change smoothing (a Gaussian
    of ``smooth_mm``, truncated at 4 sigma as scipy does) plus 2 voxels, clipped to the grid;
    the whole grid when no session has a brain voxel.

    Every segmentation output lies inside the brain masks and depends only on voxels within
    that reach of them: the per-session maps and the restricted passes read brain voxels (the
    distance maps are exact on any box holding the brain with one voxel to spare, see
    :func:`parenchyma_distances`), the consistency step's smoothed differences read voxels up
    to the Gaussian's radius away, and the edge growth and hole filling one voxel. The outputs
    are therefore those of the whole grid, at ~half its cost.
    """
    union = np.logical_or.reduce([np.asarray(b, bool) for b in brains])
    reach = [int(4.0 * smooth_mm / s + 0.5) + 2 if np.isfinite(smooth_mm) else 2
             for s in spacing_mm]
    box = bounding_box(union, reach)
    return box if box is not None else tuple(slice(0, n) for n in union.shape)


def parenchyma_distances(
    brain_mask: np.ndarray, csf: np.ndarray, spacing_mm: tuple[float, ...], threads: int = 1
) -> ParenchymaDistances:
    """Distance to CSF and depth inside the brain mask (two Euclidean distance transforms, the
    costly step of :func:`flair_session_maps`: computed once per session and shared).

    Both transforms run on the bounding box of brain and CSF grown by one voxel, which holds
    every CSF voxel and a shell of non-brain voxels all round: for a voxel in the box, moving a
    voxel outside the box onto the box's edge (clamping each index) brings it no farther, so
    the nearest CSF / non-brain voxel is found inside the box and both distances are those of
    the whole volume. Outside the box the depth is 0 (not brain) and the distance to CSF is
    left NaN (not computed: every caller reads it inside the brain mask). ``threads``: of each
    transform (:func:`pipeline.core.distance.edt_mm`); the same distances for any number.
    """
    brain = np.asarray(brain_mask, bool)
    csf = np.asarray(csf, bool)
    sp = _check_spacing(spacing_mm, brain.ndim)
    if csf.shape != brain.shape:
        raise ValueError(f"CSF mask shape {csf.shape} differs from brain mask {brain.shape}")
    depth = np.zeros(brain.shape)
    to_csf = np.full(brain.shape, np.inf if not csf.any() else np.nan)
    box = bounding_box(brain | csf, 1)
    if box is not None:
        depth[box] = edt_mm(brain[box], sp, threads)
        if csf.any():
            to_csf[box] = edt_mm(~csf[box], sp, threads)
    return ParenchymaDistances(to_csf, depth)


def deep_parenchyma(
    brain_mask: np.ndarray,
    csf: np.ndarray,
    *,
    csf_margin_mm: float,
    surface_margin_mm: float,
    spacing_mm: tuple[float, ...],
    distances: ParenchymaDistances | None = None,
) -> np.ndarray:
    """Brain voxels farther than ``csf_margin_mm`` from CSF and deeper than
    ``surface_margin_mm`` inside the brain mask: away from the partial-volume rims of
    ventricles, sulci and cortex, i.e. mostly white matter (and deep grey nuclei).
    ``distances``: :func:`parenchyma_distances` of the same masks, when already computed."""
    brain = np.asarray(brain_mask, bool)
    csf = np.asarray(csf, bool)
    if distances is None:
        distances = parenchyma_distances(brain, csf, spacing_mm)
    return (brain & ~csf & (distances.to_csf_mm > csf_margin_mm)
            & (distances.depth_mm > surface_margin_mm))


def nawm_candidates(
    flair: np.ndarray,
    brain_mask: np.ndarray,
    adc_um2_s: np.ndarray | None = None,
    *,
    csf_adc_min_um2_s: float,
    csf_flair_max_ratio: float,
    csf_margin_mm: float,
    depth_mm: float,
    flair_z_max: float,
    spacing_mm: tuple[float, ...],
) -> np.ndarray:
    """Candidate normal-appearing white matter of one session (bool), without any class model.

    Deep parenchyma (:func:`deep_parenchyma` around :func:`csf_mask`) whose FLAIR is at most
    ``flair_z_max`` robust SDs above the FLAIR mode of the deep parenchyma
    (:func:`mode_reference`): white matter is the darkest non-CSF tissue on FLAIR, lesions and
    grey matter are brighter. Falls back to all non-CSF brain when the deep region is tiny.
    """
    flair = np.asarray(flair, np.float32)
    sp = _check_spacing(spacing_mm, flair.ndim)
    brain = np.asarray(brain_mask, bool) & np.isfinite(flair)
    csf = csf_mask(flair, brain, adc_um2_s, csf_adc_min_um2_s=csf_adc_min_um2_s,
                   csf_flair_max_ratio=csf_flair_max_ratio)
    deep = deep_parenchyma(brain, csf, csf_margin_mm=csf_margin_mm, surface_margin_mm=depth_mm,
                           spacing_mm=sp)
    if np.count_nonzero(deep) < 100:  # tiny or thin brains: all parenchyma
        deep = brain & ~csf
    if not deep.any():
        return deep
    ref = mode_reference(flair, deep)
    return deep & (flair <= ref.median + flair_z_max * ref.sd)
