"""Restricted diffusion: the NAWM ADC reference region, rADC, and the restricted and
T2-shine-through masks of one session in the subject space.

Same conventions as :mod:`pipeline.core.segmentation` (arrays in one isotropic subject space,
``spacing_mm`` in array axis order, ADC in um^2/s). Classes come from
:func:`pipeline.core.dynamics.diffusion_classes`, the one place of the cut-offs' formula.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.core import dynamics
from pipeline.core.boxes import bounding_box
from pipeline.core.distance import edt_mm
from pipeline.core.segmentation import (
    _check_spacing,
    _median_sd,
    farther_than,
    mode_reference,
    nawm_mask,
    remove_small_components,
)


#: Fewest voxels a NAWM reference region may hold before a smaller erosion is tried.
MIN_NAWM_VOXELS = 10


def nawm_reference_mask(
    adc_um2_s: np.ndarray,
    candidates: np.ndarray,
    lesion_masks: list[np.ndarray] | tuple[np.ndarray, ...],
    *,
    erosion_mm: float,
    lesion_margin_mm: float,
    trim_sd: float,
    spacing_mm: tuple[float, ...],
    min_voxels: int = MIN_NAWM_VOXELS,
) -> np.ndarray:
    """Normal-appearing WM for the ADC reference (bool).

    ``candidates`` (e.g. :func:`nawm_candidates`) eroded by ``erosion_mm`` and farther than
    ``lesion_margin_mm`` from every lesion, keeping voxels whose ADC lies within ``trim_sd``
    lower half-widths of the ADC half-sample mode (:func:`mode_reference`). Partial volume with
    GM and CSF only raises ADC; the candidates' edges are where it lives (phantom: candidates
    62 % truth WM, 4 mm inside 94 %), so the erosion keeps the core of the white matter and the
    symmetric trim centres the mask's median on its mode. Without the erosion the reference read
    +6.6 % vs the phantom's true NAWM ADC, with it +1.4 % (20 subjects, 33 sessions with
    lesions). When the erosion leaves fewer than ``min_voxels`` (and at least 10) lesion-free
    voxels, smaller erosions are tried in turn (:func:`erosion_radii`); see
    :func:`nawm_reference_from` for the last resorts.
    """
    adc = np.asarray(adc_um2_s, np.float32)
    sp = _check_spacing(spacing_mm, adc.ndim)
    cand = np.asarray(candidates, bool)
    if cand.shape != adc.shape:
        raise ValueError(f"candidate mask shape {cand.shape} differs from ADC {adc.shape}")
    return nawm_reference_from(adc, candidate_erosions(cand, erosion_mm, sp),
                               lesion_free(lesion_masks, cand.shape, lesion_margin_mm, sp),
                               trim_sd=trim_sd, min_voxels=min_voxels)


def voxels_of(volume_ml: float, spacing_mm: tuple[float, ...]) -> int:
    """Whole voxels of ``spacing_mm`` (mm) that hold at least ``volume_ml`` (mL)."""
    return int(np.ceil(volume_ml * 1000.0 / float(np.prod(spacing_mm)) - 1e-9))


def erosion_radii(erosion_mm: float, spacing_mm: tuple[float, ...]) -> list[float]:
    """Erosion radii (mm) :func:`nawm_reference_from` tries in turn: ``erosion_mm``, halved
    while it is at least the finest voxel spacing, then 0 (e.g. 4, 2, 1, 0 mm at 1 mm)."""
    radii, r = [], float(erosion_mm)
    while r > 0 and r >= min(spacing_mm):
        radii.append(r)
        r /= 2
    return radii + [0.0]


class CandidateErosions(Sequence):
    """The candidate masks :func:`nawm_reference_from` tries in turn, eroded by each of
    :func:`erosion_radii` (:func:`pipeline.core.segmentation.nawm_mask`; the last entry is
    not eroded). Each is computed when first asked for and kept: most scans need only the
    first, and a session's two reference passes share them (they do not depend on the
    lesions)."""

    def __init__(self, candidates: np.ndarray, erosion_mm: float,
                 spacing_mm: tuple[float, ...]):
        self._candidates = np.asarray(candidates, bool)
        self._spacing = tuple(spacing_mm)
        self.radii_mm = erosion_radii(erosion_mm, self._spacing)
        self._masks: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.radii_mm)

    def __getitem__(self, k: int) -> np.ndarray:
        k = range(len(self))[k]  # negative indices, IndexError past the end
        if k not in self._masks:
            self._masks[k] = nawm_mask(self._candidates, [], erosion_mm=self.radii_mm[k],
                                       lesion_margin_mm=0.0, spacing_mm=self._spacing)
        return self._masks[k]


def candidate_erosions(candidates: np.ndarray, erosion_mm: float,
                       spacing_mm: tuple[float, ...]) -> CandidateErosions:
    """The candidates eroded by ``erosion_mm`` and then by ever smaller radii down to none
    (:class:`CandidateErosions`), for :func:`nawm_reference_from`."""
    return CandidateErosions(candidates, erosion_mm, spacing_mm)


def lesion_free(lesion_masks: list[np.ndarray] | tuple[np.ndarray, ...], shape: tuple[int, ...],
                margin_mm: float, spacing_mm: tuple[float, ...]) -> np.ndarray:
    """Voxels farther than ``margin_mm`` from every voxel of every lesion mask (bool; all True
    without a lesion voxel), the lesion rule of :func:`pipeline.core.segmentation.nawm_mask`.
    It does not depend on the session, so one pass computes it once for every session."""
    lesions = np.zeros(shape, bool)
    for m in lesion_masks:
        m = np.asarray(m, bool)
        if m.shape != lesions.shape:
            raise ValueError(f"lesion mask shape {m.shape} differs from the candidates {shape}")
        lesions |= m
    return farther_than(lesions, margin_mm, spacing_mm)


def nawm_reference_from(adc_um2_s: np.ndarray, erosions: Sequence[np.ndarray],
                        away: np.ndarray, *, trim_sd: float,
                        min_voxels: int = MIN_NAWM_VOXELS) -> np.ndarray:
    """:func:`nawm_reference_mask` from its parts: the :func:`candidate_erosions` of the
    session and the :func:`lesion_free` voxels.

    The region is the most eroded candidate mask that keeps at least ``min_voxels`` (never
    fewer than :data:`MIN_NAWM_VOXELS`) lesion-free voxels with a valid ADC. Real scans need
    the smaller erosions: their white matter's FLAIR-darkest half is a fine speckle that a 4 mm
    erosion wipes out (0.2-0.7 mL left on five real FLAIRs, 25-40 mL on the phantom). When no
    erosion keeps that many, the un-eroded lesion-free candidates, and when those hold fewer than
    :data:`MIN_NAWM_VOXELS`, the un-eroded candidates (the lesion margin dropped)."""
    adc = np.asarray(adc_um2_s, np.float32)
    ok = np.isfinite(adc) & (adc > 0)
    need = max(int(min_voxels), MIN_NAWM_VOXELS)
    for eroded in erosions:  # most eroded first
        kept = eroded & away & ok
        if np.count_nonzero(kept) >= need:
            break
    else:
        if np.count_nonzero(kept) < MIN_NAWM_VOXELS:
            kept = erosions[-1] & ok
    if not kept.any():
        return kept
    ref = mode_reference(adc, kept)
    return kept & (np.abs(adc - np.float32(ref.median)) <= trim_sd * ref.sd)


@dataclass(frozen=True)
class RestrictedResult:
    """Output of :func:`segment_restricted`."""

    restricted: np.ndarray  #: bool, DWI hyperintense and rADC below the cut-off
    #: bool, DWI hyperintense with rADC at or above the cut-off (inside ``shine_within``)
    shine_through: np.ndarray
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
    edge_mm: float = 0.0,
    edge_ring_mm: float = 6.0,
    core_sd: float = 0.0,
    shine_within: np.ndarray | None = None,
) -> RestrictedResult:
    """Restricted-diffusion and T2 shine-through masks.

    ``dwi_ratio = trace / median(trace in NAWM)``; ``radc`` from
    :func:`pipeline.core.dynamics.relative_adc` against
    :func:`pipeline.core.dynamics.reference_adc`; classes from
    :func:`pipeline.core.dynamics.diffusion_classes`. Voxels outside the brain, with an invalid
    ADC (NaN or <= 0) or CSF-like ADC (> ``csf_adc_min_um2_s``) are never labelled; components
    smaller than ``min_lesion_volume_mm3`` (26-connectivity) are dropped from each mask. With
    ``core_sd > 0`` a restricted component is kept only when it holds a voxel of
    :func:`significant_core` (hysteresis): the cut-offs keep their clinical meaning for the
    extent, the core is what the noise of normal tissue does not produce. With
    ``edge_mm > 0`` each restricted lesion then grows by :func:`grow_to_half_contrast` (ring
    ``edge_mm`` to ``edge_ring_mm``) into DWI-hyperintense valid voxels, which leave the
    shine-through mask.

    T2 shine-through is a finding of abnormal tissue: a lesion bright on DWI because of its long
    T2, with normal or raised ADC. With ``shine_within`` (the session's FLAIR lesions, the
    T2-hyperintense tissue) only those voxels can be shine-through; normal tissue that the
    NAWM-relative DWI cut-off also passes (grey matter, which is brighter than white matter on a
    b = 1000 trace, and the NAWM's own upper tail) is not. None: every DWI-hyperintense voxel
    that is not restricted (real healthy DWI, dwi_philips_real, b0 bias field divided out: 153 mL
    of a 1048 mL brain, 95 mL of it outer (cortical) parenchyma, 46 mL inside the NAWM
    reference itself).

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
    # float32 already (a Python NaN does not widen float32): no copy
    dwi_ratio = np.where(brain, trace / np.float32(ref_dwi), np.nan).astype(np.float32,
                                                                             copy=False)
    radc = np.where(valid, dynamics.relative_adc(adc, ref_adc.median_um2_s), np.nan)
    radc = radc.astype(np.float32, copy=False)
    restricted, shine = dynamics.diffusion_classes(
        dwi_ratio, radc, restricted_below, dwi_hyperintense_ratio
    )
    restricted = remove_small_components(restricted & valid, min_lesion_volume_mm3, sp)
    if core_sd > 0:
        core = significant_core(dwi_ratio, radc, nawm & brain, restricted_below=restricted_below,
                                dwi_hyperintense_ratio=dwi_hyperintense_ratio, core_sd=core_sd)
        restricted = components_touching(restricted, core)
    if edge_mm > 0:
        restricted = grow_to_half_contrast(
            restricted, radc, (restricted | shine) & valid, ring_mm=(edge_mm, edge_ring_mm),
            max_mm=edge_mm, spacing_mm=sp)
    shine = shine & valid & ~restricted
    if shine_within is not None:
        within = np.asarray(shine_within, bool)
        if within.shape != trace.shape:
            raise ValueError(f"shine-through region shape {within.shape} differs from trace DWI "
                             f"{trace.shape}")
        shine &= within
    shine = remove_small_components(shine, min_lesion_volume_mm3, sp)
    return RestrictedResult(restricted, shine, ref_adc, ref_dwi, dwi_ratio, radc)


def dwi_inplane_mm(spacing_mm) -> float:
    """In-plane voxel size (mm) of a native DWI grid: the smaller of its two finer spacings,
    i.e. its finest (the first three values of a 4D grid's spacing; any axis order).

    Raises
    ------
    ValueError
        When fewer than three spacings are given or one is not a positive number.
    """
    sp = [float(s) for s in tuple(spacing_mm)[:3]]
    if len(sp) != 3 or not all(np.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"native DWI spacing must be three positive numbers (mm), got "
                         f"{spacing_mm}")
    return sorted(sp)[0]


def edge_reach_mm(edge_dwi_voxels: float, dwi_inplane: float) -> float:
    """Reach (mm) of the restricted edge step (:func:`grow_to_half_contrast`): ``edge_dwi_voxels``
    x the native DWI's in-plane voxel ``dwi_inplane`` (mm, :func:`dwi_inplane_mm`). The step
    recovers the partial-volume blur of the native DWI voxel, whose reach scales with that
    voxel (0 = off)."""
    if not edge_dwi_voxels > 0:
        return 0.0
    if not (np.isfinite(dwi_inplane) and dwi_inplane > 0):
        raise ValueError(f"native DWI in-plane voxel must be a positive number (mm), got "
                         f"{dwi_inplane}")
    return float(edge_dwi_voxels) * float(dwi_inplane)


def restricted_settings(segmentation: dict, dynamics: dict, *, dwi_inplane: float) -> dict:
    """The keywords of :func:`segment_restricted` from the ``[segmentation]`` and ``[dynamics]``
    settings (dicts of the config's keys) and the session's native DWI in-plane voxel
    ``dwi_inplane`` (mm, :func:`dwi_inplane_mm`): the one place that maps the config onto the
    rule."""
    return {"restricted_below": dynamics["restricted_below"],
            "dwi_hyperintense_ratio": segmentation["dwi_hyperintense_ratio"],
            "min_lesion_volume_mm3": segmentation["min_lesion_volume_mm3"],
            "csf_adc_min_um2_s": segmentation["csf_adc_min_um2_s"],
            "edge_mm": edge_reach_mm(dynamics["restricted_edge_dwi_voxels"], dwi_inplane),
            "edge_ring_mm": dynamics["restricted_edge_ring_mm"],
            "core_sd": dynamics["restricted_core_sd"]}


def significant_core(dwi_ratio: np.ndarray, radc: np.ndarray, nawm: np.ndarray, *,
                     restricted_below: float, dwi_hyperintense_ratio: float,
                     core_sd: float) -> np.ndarray:
    """Voxels restricted beyond what normal tissue's spread explains (bool).

    rADC below ``min(restricted_below, m_r - core_sd * sd_r)`` AND DWI ratio above
    ``max(dwi_hyperintense_ratio, m_d + core_sd * sd_d)``, with ``m_*`` the medians and ``sd_*``
    the MAD-based SDs (those of :func:`pipeline.core.segmentation.robust_reference`) of rADC and
    DWI ratio over ``nawm``: the voxel is beyond the clinical cut-offs AND ``core_sd`` SDs of
    normal white matter away from it on both maps. A multiple-comparison bound: a brain holds
    ~1e5 independent DWI voxels (~1.2 L of 2 x 2 x 4 mm), and a NAWM voxel passes one map's 4 SD
    bound with probability Phi(-4) = 3e-5 under Gaussian noise, both maps (independent noise)
    ~1e-9. The spreads are
    the session's own (noise, bias field, b0/DWI misalignment): on a clean scan
    (phantom small grid: sd_r 0.04, 1 - 4 x 0.04 = 0.84 > 0.75) the cut-offs bind and nothing
    changes. Real healthy DWI (dwi_philips_real, 2 mm): sd_r 0.116 and sd_d 0.193 put the fixed
    cut-offs only 2.2 and 0.8 SD beyond NAWM.
    """
    r = np.asarray(radc, np.float32)
    d = np.asarray(dwi_ratio, np.float32)
    m = np.asarray(nawm, bool)
    rv, dv = r[m], d[m]
    rv, dv = rv[np.isfinite(rv)], dv[np.isfinite(dv)]
    if rv.size == 0 or dv.size == 0:
        raise ValueError("no normal-appearing white-matter voxel with a finite rADC and DWI "
                         "ratio for the restricted core's noise scale")
    (m_r, sd_r), (m_d, sd_d) = (_median_sd(v.astype(np.float64)) for v in (rv, dv))
    r_max = min(restricted_below, m_r - core_sd * sd_r)
    d_min = max(dwi_hyperintense_ratio, m_d + core_sd * sd_d)
    with np.errstate(invalid="ignore"):
        return (r < r_max) & (d > d_min)


def components_touching(mask: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The 26-connected components of ``mask`` that hold at least one ``seeds`` voxel (bool)."""
    mask = np.asarray(mask, bool)
    lab, n = ndimage.label(mask, ndimage.generate_binary_structure(mask.ndim, 3))
    if n == 0:
        return mask.copy()
    hit = np.zeros(n + 1, bool)
    hit[lab[mask & np.asarray(seeds, bool)]] = True
    hit[0] = False
    return hit[lab]


def grow_to_half_contrast(
    mask: np.ndarray,
    radc: np.ndarray,
    allowed: np.ndarray,
    *,
    ring_mm: tuple[float, float],
    max_mm: float,
    spacing_mm: tuple[float, ...],
) -> np.ndarray:
    """Grow each restricted lesion to the half-contrast contour of its rADC (bool).

    A DWI voxel (phantom small grid 3.4 x 3.4 x 5.5 mm) straddling the lesion edge reads
    ``f * core + (1 - f) * surround``; it holds at least half lesion (the truth's own
    partial-volume rule) when its rADC is below ``(core + surround) / 2``, which is above a
    fixed cut-off whenever the core lies well below it. Per 26-connected component: core = its
    median rADC, surround = the median rADC in the ring ``ring_mm`` (inner, outer) outside it;
    the component takes face-neighbours in ``allowed`` with rADC below that midpoint, up to
    ``max_mm`` from its first extent. A component whose midpoint is not above its core (no
    contrast) is left as is.
    """
    mask = np.asarray(mask, bool)
    sp = _check_spacing(spacing_mm, mask.ndim)
    out = mask.copy()
    pad = [int(np.ceil(ring_mm[1] / s)) + 1 for s in sp]
    # every component's box grown by ``pad`` lies in the mask's bounding box grown by ``pad``
    # (both clipped to the array), and labels are numbered in raster order, which the box
    # keeps: the same components, boxes and results as on the whole grid, at the box's cost
    area = bounding_box(mask, pad)
    if area is None:
        return out
    lab, n = ndimage.label(mask[area], ndimage.generate_binary_structure(mask.ndim, 3))
    radc = np.asarray(radc, np.float32)[area]
    allowed = np.asarray(allowed, bool)[area] & np.isfinite(radc)
    sub = out[area]  # a view: lesions grow into ``out``
    face = ndimage.generate_binary_structure(mask.ndim, 1)
    steps = max(1, int(round(max_mm / min(sp))))
    for i, box in enumerate(ndimage.find_objects(lab), start=1):
        box = tuple(slice(max(b.start - p, 0), min(b.stop + p, dim))
                    for b, p, dim in zip(box, pad, lab.shape))
        comp = lab[box] == i
        r = radc[box]
        dist = edt_mm(~comp, sp)
        ring = (dist > ring_mm[0]) & (dist <= ring_mm[1]) & (lab[box] == 0) & np.isfinite(r)
        inside = comp & np.isfinite(r)
        if not ring.any() or not inside.any():
            continue
        mid = 0.5 * (float(np.median(r[inside])) + float(np.median(r[ring])))
        ok = allowed[box] & (r < mid) & (dist <= max_mm)
        grown = ndimage.binary_dilation(comp, face, iterations=steps, mask=ok | comp)
        sub[box] |= grown
    return out
