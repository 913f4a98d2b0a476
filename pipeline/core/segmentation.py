"""Tissue classes, FLAIR lesion and restricted-diffusion segmentation.

Pure functions on numpy arrays already resampled into one subject space (isotropic, about
1 mm). ``spacing_mm`` is always given in the SAME axis order as the arrays. ADC is in um^2/s.

Method (FLAIR lesions)
----------------------
1. :func:`tissue_model`: a 3-class Gaussian mixture (CSF < WM < GM on FLAIR) is fitted by EM to
   the FLAIR histogram inside the brain mask; posteriors give CSF / WM / GM probabilities.
   When an ADC map is given, a voxel with ADC above ``csf_adc_min_um2_s`` is CSF (this also
   catches CSF that FLAIR failed to suppress); elsewhere the FLAIR posterior decides.
2. :func:`normalize_flair`: robust z against normal-appearing WM (median, MAD * 1.4826). The
   median/MAD ignore up to half the reference voxels, so lesions inside the WM class do not
   shift the reference; one refinement pass recomputes it with the found lesions (plus a margin)
   removed (:func:`nawm_mask`).
3. :func:`segment_flair_lesions`: hysteresis - seeds at z > ``z_seed``, grown through connected
   voxels at z > ``z_grow``. A voxel must be hyperintense against BOTH normal WM and normal GM
   (z is the smaller of the two robust z-scores), otherwise the cortex, which is brighter than WM
   on FLAIR, would be labelled. CSF (probability > ``max_csf_prob``) and a rim of
   ``cortex_rim_mm`` inside the brain-mask surface (skull-strip edge, cortex) are excluded; holes
   enclosed by a lesion are filled; components below ``min_lesion_volume_mm3`` are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.filters import apply_hysteresis_threshold

from pipeline.core import dynamics

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
    lab, n = ndimage.label(mask, ndimage.generate_binary_structure(mask.ndim, connectivity))
    if n == 0:
        return mask.copy()
    sizes = np.bincount(lab.ravel()) * float(np.prod(sp))
    keep = sizes >= min_volume_mm3
    keep[0] = False
    return keep[lab]


def fill_holes_per_component(mask: np.ndarray) -> np.ndarray:
    """Fill cavities fully enclosed by a lesion (3D), so confluent lesions are not hollow."""
    return ndimage.binary_fill_holes(np.asarray(mask, bool))


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
        dist = ndimage.distance_transform_edt(~lesions, sampling=sp)
        out = out & (dist > lesion_margin_mm)
    return out


# --------------------------------------------------------------------------- FLAIR lesions


@dataclass(frozen=True)
class RobustRef:
    """Robust location and scale of an intensity reference."""

    median: float
    sd: float  #: MAD * 1.4826
    n_voxels: int


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
    med = float(np.median(v))
    sd = float(MAD_TO_SD * np.median(np.abs(v - med)))
    if not sd > 0:
        raise ValueError("reference voxels have no spread (MAD is 0); cannot normalise")
    return RobustRef(med, sd, int(v.size))


def normalize_flair(flair: np.ndarray, wm_mask: np.ndarray) -> np.ndarray:
    """Robust z-score of FLAIR against white matter: ``(flair - median) / (1.4826 * MAD)``
    over ``wm_mask`` (float32; NaN where FLAIR is not finite)."""
    ref = robust_reference(flair, wm_mask)
    return ((np.asarray(flair, np.float32) - ref.median) / ref.sd).astype(np.float32)


def _lesion_z(
    flair: np.ndarray, wm_ref_mask: np.ndarray, gm_ref_mask: np.ndarray | None
) -> np.ndarray:
    """Smaller of the robust z-scores against WM and (if available) GM."""
    z = normalize_flair(flair, wm_ref_mask)
    if gm_ref_mask is not None and np.count_nonzero(gm_ref_mask) >= 10:
        try:
            z = np.minimum(z, normalize_flair(flair, gm_ref_mask))
        except ValueError:
            pass
    return z


def _domain(
    brain: np.ndarray,
    csf_prob: np.ndarray | None,
    max_csf_prob: float,
    cortex_rim_mm: float,
    sp: tuple[float, ...],
) -> np.ndarray:
    """Where FLAIR lesions may be: brain, not CSF, not within the rim inside the brain surface."""
    dom = brain.copy()
    if csf_prob is not None:
        dom &= ~(np.asarray(csf_prob) > max_csf_prob)
    if cortex_rim_mm > 0:
        dom &= ndimage.distance_transform_edt(brain, sampling=sp) > cortex_rim_mm
    return dom


def _hysteresis(z: np.ndarray, domain: np.ndarray, z_seed: float, z_grow: float) -> np.ndarray:
    zz = np.where(domain & np.isfinite(z), z, -np.inf)
    # apply_hysteresis_threshold uses strict '>' for both thresholds, as documented here.
    return apply_hysteresis_threshold(zz, z_grow, z_seed)


def segment_flair_lesions(
    flair: np.ndarray,
    brain_mask: np.ndarray,
    *,
    z_seed: float,
    z_grow: float,
    max_csf_prob: float,
    cortex_rim_mm: float,
    min_lesion_volume_mm3: float,
    nawm_erosion_mm: float,
    nawm_lesion_margin_mm: float,
    spacing_mm: tuple[float, ...],
    csf_adc_min_um2_s: float,
    adc_um2_s: np.ndarray | None = None,
    tissue: TissueModel | None = None,
) -> np.ndarray:
    """FLAIR-hyperintense lesion mask (bool), see the module docstring for the method.

    Parameters
    ----------
    flair, brain_mask
        FLAIR (bias-corrected) and brain mask on one grid.
    z_seed, z_grow
        Hysteresis thresholds in robust SD units (``z_grow <= z_seed``).
    max_csf_prob
        Voxels with a CSF probability above this are never lesion.
    cortex_rim_mm
        Voxels closer than this to the outside of the brain mask are never lesion (mm).
    min_lesion_volume_mm3
        Smaller connected components (26-connectivity) are dropped (mm^3).
    nawm_erosion_mm, nawm_lesion_margin_mm
        Erosion of the WM reference and its distance from found lesions in the refinement
        pass (mm), see :func:`nawm_mask`.
    spacing_mm
        Voxel size, same axis order as the arrays (mm).
    csf_adc_min_um2_s
        ADC above which a voxel is CSF, used when ``adc_um2_s`` is given (um^2/s).
    adc_um2_s
        Optional ADC map (um^2/s) on the same grid.
    tissue
        A precomputed :func:`tissue_model` (computed here when None).
    """
    flair = np.asarray(flair, np.float32)
    brain = np.asarray(brain_mask, bool)
    if brain.shape != flair.shape:
        raise ValueError(f"brain mask shape {brain.shape} differs from FLAIR {flair.shape}")
    if z_grow > z_seed:
        raise ValueError(f"z_grow ({z_grow}) must not exceed z_seed ({z_seed})")
    sp = _check_spacing(spacing_mm, flair.ndim)
    brain &= np.isfinite(flair)
    if tissue is None:
        tissue = tissue_model(flair, brain, adc_um2_s, csf_adc_min_um2_s=csf_adc_min_um2_s)
    dom = _domain(brain, tissue.csf, max_csf_prob, cortex_rim_mm, sp)
    wm = tissue.labels == WM
    gm = tissue.labels == GM
    mask = np.zeros(flair.shape, bool)
    for _ in range(2):  # first pass, then one pass with lesions removed from the references
        ref_wm = nawm_mask(wm, [mask], erosion_mm=0.0, lesion_margin_mm=nawm_lesion_margin_mm,
                           spacing_mm=sp)
        if nawm_erosion_mm > 0:
            eroded = nawm_mask(ref_wm, [], erosion_mm=nawm_erosion_mm, lesion_margin_mm=0.0,
                               spacing_mm=sp)
            if np.count_nonzero(eroded) >= 100:
                ref_wm = eroded
        ref_gm = gm & ~ndimage.binary_dilation(mask, iterations=2) if mask.any() else gm
        z = _lesion_z(flair, ref_wm, ref_gm)
        mask = _hysteresis(z, dom, z_seed, z_grow)
        mask = fill_holes_per_component(mask) & brain
        mask = remove_small_components(mask, min_lesion_volume_mm3, sp)
    return mask


def segment_flair_series(
    flairs: list[np.ndarray],
    brain_masks: list[np.ndarray],
    *,
    z_seed: float,
    z_grow: float,
    max_csf_prob: float,
    cortex_rim_mm: float,
    min_lesion_volume_mm3: float,
    nawm_erosion_mm: float,
    nawm_lesion_margin_mm: float,
    spacing_mm: tuple[float, ...],
    csf_adc_min_um2_s: float,
    adcs_um2_s: list[np.ndarray | None] | None = None,
) -> list[np.ndarray]:
    """FLAIR lesions of several sessions of one subject, already in one space.

    Each session is first segmented on its own (:func:`segment_flair_lesions`), which fixes its
    own tissue model and WM/GM references (each session normalised to its own NAWM). Then a
    spatio-temporal hysteresis is run on the stacked lesion z-maps: seeds are voxels above
    ``z_seed`` in any session; growth runs through voxels above ``z_grow`` connected in space
    (26-neighbourhood within a session) or in time (the same voxel in the previous or next
    session). So a faint (z between ``z_grow`` and ``z_seed``) voxel at one session is kept when
    the same lesion is clearly seen at an adjacent session, while noise that is faint at every
    session is not. Domain exclusions, hole filling and the minimum size are applied per
    session. Sessions are given in time order.

    Returns
    -------
    list of numpy.ndarray
        One boolean lesion mask per session.
    """
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
    zs, doms, brains = [], [], []
    for flair, brain, adc in zip(flairs, brain_masks, adcs):
        flair = np.asarray(flair, np.float32)
        if flair.shape != shape:
            raise ValueError(f"all sessions must share one grid: {flair.shape} vs {shape}")
        brain = np.asarray(brain, bool) & np.isfinite(flair)
        tissue = tissue_model(flair, brain, adc, csf_adc_min_um2_s=csf_adc_min_um2_s)
        single = segment_flair_lesions(
            flair, brain, z_seed=z_seed, z_grow=z_grow, max_csf_prob=max_csf_prob,
            cortex_rim_mm=cortex_rim_mm, min_lesion_volume_mm3=min_lesion_volume_mm3,
            nawm_erosion_mm=nawm_erosion_mm, nawm_lesion_margin_mm=nawm_lesion_margin_mm,
            spacing_mm=sp, csf_adc_min_um2_s=csf_adc_min_um2_s, tissue=tissue,
        )
        ref_wm = nawm_mask(tissue.labels == WM, [single], erosion_mm=nawm_erosion_mm,
                           lesion_margin_mm=nawm_lesion_margin_mm, spacing_mm=sp)
        if np.count_nonzero(ref_wm) < 100:
            ref_wm = (tissue.labels == WM) & ~single
        ref_gm = (tissue.labels == GM) & ~single
        zs.append(_lesion_z(flair, ref_wm, ref_gm))
        doms.append(_domain(brain, tissue.csf, max_csf_prob, cortex_rim_mm, sp))
        brains.append(brain)
    z4 = np.stack([np.where(d & np.isfinite(z), z, -np.inf) for z, d in zip(zs, doms)])
    st = np.zeros((3,) * 4, bool)
    st[1] = ndimage.generate_binary_structure(3, 3)
    st[0, 1, 1, 1] = st[2, 1, 1, 1] = True
    lab, nlab = ndimage.label(z4 > z_grow, st)
    seeded = np.zeros(nlab + 1, bool)
    seeded[np.unique(lab[z4 > z_seed])] = True
    seeded[0] = False
    grown = seeded[lab]
    out = []
    for t in range(n):
        m = fill_holes_per_component(grown[t]) & brains[t]
        out.append(remove_small_components(m, min_lesion_volume_mm3, sp))
    return out


# --------------------------------------------------------------------------- NAWM ADC reference


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


def deep_parenchyma(
    brain_mask: np.ndarray,
    csf: np.ndarray,
    *,
    csf_margin_mm: float,
    surface_margin_mm: float,
    spacing_mm: tuple[float, ...],
) -> np.ndarray:
    """Brain voxels farther than ``csf_margin_mm`` from CSF and deeper than
    ``surface_margin_mm`` inside the brain mask: away from the partial-volume rims of
    ventricles, sulci and cortex, i.e. mostly white matter (and deep grey nuclei)."""
    brain = np.asarray(brain_mask, bool)
    csf = np.asarray(csf, bool)
    sp = _check_spacing(spacing_mm, brain.ndim)
    out = brain & ~csf
    if csf.any():
        out &= ndimage.distance_transform_edt(~csf, sampling=sp) > csf_margin_mm
    if surface_margin_mm > 0:
        out &= ndimage.distance_transform_edt(brain, sampling=sp) > surface_margin_mm
    return out


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


def nawm_reference_mask(
    adc_um2_s: np.ndarray,
    candidates: np.ndarray,
    lesion_masks: list[np.ndarray] | tuple[np.ndarray, ...],
    *,
    lesion_margin_mm: float,
    trim_sd: float,
    spacing_mm: tuple[float, ...],
) -> np.ndarray:
    """Normal-appearing WM for the ADC reference (bool).

    ``candidates`` (e.g. :func:`nawm_candidates`) farther than ``lesion_margin_mm`` from every
    lesion, keeping voxels whose ADC lies within ``trim_sd`` lower half-widths of the ADC
    half-sample mode (:func:`mode_reference`). Partial volume with GM and CSF only raises ADC, so
    the mode of deep tissue is pure WM and the symmetric trim centres the mask's median on it.
    """
    adc = np.asarray(adc_um2_s, np.float32)
    sp = _check_spacing(spacing_mm, adc.ndim)
    cand = np.asarray(candidates, bool)
    if cand.shape != adc.shape:
        raise ValueError(f"candidate mask shape {cand.shape} differs from ADC {adc.shape}")
    ok = np.isfinite(adc) & (adc > 0)
    kept = nawm_mask(cand, lesion_masks, erosion_mm=0.0, lesion_margin_mm=lesion_margin_mm,
                     spacing_mm=sp) & ok
    if np.count_nonzero(kept) < 10:
        kept = cand & ok
    if not kept.any():
        return kept
    ref = mode_reference(adc, kept)
    return kept & (np.abs(adc - np.float32(ref.median)) <= trim_sd * ref.sd)


# --------------------------------------------------------------------------- restricted diffusion


@dataclass(frozen=True)
class RestrictedResult:
    """Output of :func:`segment_restricted`."""

    restricted: np.ndarray  #: bool, DWI hyperintense and rADC below the cut-off
    shine_through: np.ndarray  #: bool, DWI hyperintense with rADC at or above the cut-off
    reference_adc: dynamics.ReferenceADC  #: NAWM ADC summary (um^2/s)
    reference_dwi: float  #: NAWM median trace DWI (scanner units)
    dwi_ratio: np.ndarray  #: float32, trace / reference_dwi (NaN outside the brain)
    radc: np.ndarray  #: float32, ADC / reference ADC (NaN outside the brain or invalid ADC)


def segment_restricted(
    trace_dwi: np.ndarray,
    adc_um2_s: np.ndarray,
    brain_mask: np.ndarray,
    nawm: np.ndarray,
    *,
    restricted_below: float,
    dwi_hyperintense_ratio: float,
    min_lesion_volume_mm3: float,
    csf_adc_min_um2_s: float,
    spacing_mm: tuple[float, ...],
) -> RestrictedResult:
    """Restricted-diffusion and T2 shine-through masks.

    ``dwi_ratio = trace / median(trace in NAWM)``; ``radc`` from
    :func:`pipeline.core.dynamics.relative_adc` against
    :func:`pipeline.core.dynamics.reference_adc`; classes from
    :func:`pipeline.core.dynamics.diffusion_classes`. Voxels outside the brain, with an invalid
    ADC (NaN or <= 0) or CSF-like ADC (> ``csf_adc_min_um2_s``) are never labelled; components
    smaller than ``min_lesion_volume_mm3`` (26-connectivity) are dropped from each mask.

    Raises
    ------
    ValueError
        On shape mismatch, or when NAWM holds no voxel with a valid ADC / positive trace.
    """
    trace = np.asarray(trace_dwi, np.float32)
    adc = np.asarray(adc_um2_s, np.float32)
    brain = np.asarray(brain_mask, bool)
    nawm = np.asarray(nawm, bool)
    for name, a in (("ADC", adc), ("brain mask", brain), ("NAWM", nawm)):
        if a.shape != trace.shape:
            raise ValueError(f"{name} shape {a.shape} differs from trace DWI {trace.shape}")
    sp = _check_spacing(spacing_mm, trace.ndim)
    ref_adc = dynamics.reference_adc(adc, nawm & brain)
    tv = trace[nawm & brain]
    tv = tv[np.isfinite(tv) & (tv > 0)]
    if tv.size == 0:
        raise ValueError("no normal-appearing white-matter voxel with a positive trace DWI")
    ref_dwi = float(np.median(tv))
    valid = brain & np.isfinite(adc) & (adc > 0) & (adc <= csf_adc_min_um2_s)
    dwi_ratio = np.where(brain, trace / np.float32(ref_dwi), np.nan).astype(np.float32)
    radc = np.where(valid, dynamics.relative_adc(adc, ref_adc.median_um2_s), np.nan)
    radc = radc.astype(np.float32)
    restricted, shine = dynamics.diffusion_classes(
        dwi_ratio, radc, restricted_below, dwi_hyperintense_ratio
    )
    restricted = remove_small_components(restricted & valid, min_lesion_volume_mm3, sp)
    shine = remove_small_components(shine & valid, min_lesion_volume_mm3, sp)
    return RestrictedResult(restricted, shine, ref_adc, ref_dwi, dwi_ratio, radc)
