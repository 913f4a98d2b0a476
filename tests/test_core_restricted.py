"""Restricted diffusion and the NAWM ADC reference (pipeline.core.restricted) on the synthetic
brain of test_core_segmentation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pipeline.core import restricted as rd
from pipeline.core import segmentation as seg
from pipeline.core.metrics import dice
from test_core_segmentation import ADC_I, SP, _brain, _sphere


def test_segment_restricted_and_shine_through():
    flair, adc, brain, csf = _brain(seed=1)
    trace = np.where(brain, 100.0, 0).astype(np.float32)
    trace[csf] = 20.0
    restr = _sphere((28, 38, 20), 4)
    shine = _sphere((28, 38, 34), 4)
    adc[restr], trace[restr] = 400.0, 200.0
    adc[shine], trace[shine] = 1100.0, 180.0
    t = seg.tissue_model(flair, brain, adc, csf_adc_min_um2_s=2000.0)
    nawm = seg.nawm_mask(t.labels == seg.WM, [restr, shine], erosion_mm=2.0,
                         lesion_margin_mm=3.0, spacing_mm=SP)
    res = rd.segment_restricted(
        trace, adc, brain, nawm, restricted_below=0.75, dwi_hyperintense_ratio=1.15,
        min_lesion_volume_mm3=10.0, csf_adc_min_um2_s=2000.0, spacing_mm=SP,
    )
    assert abs(res.reference_adc.median_um2_s - 800.0) < 10
    assert res.reference_dwi == pytest.approx(100.0)
    assert dice(restr, res.restricted) > 0.95
    assert dice(shine, res.shine_through) > 0.95
    assert not (res.restricted & csf).any() and not (res.shine_through & csf).any()
    assert res.radc.dtype == np.float32 and res.dwi_ratio.dtype == np.float32


def test_segment_restricted_drops_tiny_components():
    flair, adc, brain, csf = _brain(seed=2)
    trace = np.where(brain, 100.0, 0).astype(np.float32)
    dot = _sphere((28, 38, 26), 1)  # 7 voxels
    adc[dot], trace[dot] = 400.0, 200.0
    nawm = brain & ~csf & ~dot
    res = rd.segment_restricted(
        trace, adc, brain, nawm, restricted_below=0.75, dwi_hyperintense_ratio=1.15,
        min_lesion_volume_mm3=10.0, csf_adc_min_um2_s=2000.0, spacing_mm=SP,
    )
    assert res.restricted.sum() == 0


def test_nawm_reference_mask_finds_pure_wm_adc():
    """Partial volume raises ADC near CSF: the reference is the WM mode, not the median."""
    flair, adc, brain, csf = _brain(seed=6)
    restr = _sphere((28, 38, 26), 5)
    adc[restr] = 400.0
    near = ndimage.distance_transform_edt(~csf) < 4
    adc[near & brain & ~csf] += 400.0  # a thick partial-volume rim
    c = seg.csf_mask(flair, brain, adc, csf_adc_min_um2_s=1500.0, csf_flair_max_ratio=0.5)
    deep = seg.deep_parenchyma(brain, c, csf_margin_mm=1.0, surface_margin_mm=1.0, spacing_mm=SP)
    nawm = rd.nawm_reference_mask(adc, deep, [restr], erosion_mm=0.0, lesion_margin_mm=3.0,
                                   trim_sd=2.5, spacing_mm=SP)
    assert not (nawm & restr).any()
    assert abs(np.median(adc[nawm]) - ADC_I["wm"]) < 15
    assert np.median(adc[deep]) > ADC_I["wm"] + 25  # without the mode it would be biased
    res = rd.segment_restricted(
        np.where(brain, 100.0, 0).astype(np.float32) + 100.0 * restr, adc, brain, nawm,
        restricted_below=0.75, dwi_hyperintense_ratio=1.15, min_lesion_volume_mm3=10.0,
        csf_adc_min_um2_s=2000.0, spacing_mm=SP,
    )
    assert dice(restr, res.restricted) > 0.95


def test_nawm_reference_erosion_keeps_the_core_of_a_blurred_white_matter():
    """Candidates whose edge mixes WM with GM (ADC between the two, as after a 3-5 mm DWI
    voxel): the mode trim alone keeps part of that edge, the erosion keeps the WM core."""
    flair, adc, brain, csf = _brain(seed=7, noise=2.0)
    rng = np.random.default_rng(7)
    wm_core = seg.deep_parenchyma(brain, csf, csf_margin_mm=1.0, surface_margin_mm=7.0,
                                  spacing_mm=SP)
    cand = seg.deep_parenchyma(brain, csf, csf_margin_mm=1.0, surface_margin_mm=4.0,
                               spacing_mm=SP)
    edge = cand & ~wm_core
    adc = (np.full(adc.shape, ADC_I["wm"]) + rng.normal(0, 40, adc.shape)).astype(np.float32)
    adc[edge] += rng.uniform(0, 150, int(edge.sum())).astype(np.float32)  # partial volume with GM
    restr = _sphere((28, 38, 26), 3)
    adc[restr] = 400.0
    flat = rd.nawm_reference_mask(adc, cand, [restr], erosion_mm=0.0, lesion_margin_mm=3.0,
                                  trim_sd=2.5, spacing_mm=SP)
    eroded = rd.nawm_reference_mask(adc, cand, [restr], erosion_mm=4.0, lesion_margin_mm=3.0,
                                    trim_sd=2.5, spacing_mm=SP)
    assert np.median(adc[flat]) > ADC_I["wm"] + 10
    assert abs(np.median(adc[eroded]) - ADC_I["wm"]) < 5
    assert not (eroded & restr).any() and eroded.sum() > 1000
    # an erosion that leaves nothing (a 2-voxel slab) falls back to the un-eroded candidates
    slab = cand.copy()
    slab[:, :, :24] = slab[:, :, 26:] = False
    kw = dict(lesion_margin_mm=3.0, trim_sd=2.5, spacing_mm=SP)
    assert np.array_equal(rd.nawm_reference_mask(adc, slab, [restr], erosion_mm=4.0, **kw),
                          rd.nawm_reference_mask(adc, slab, [restr], erosion_mm=0.0, **kw))
    assert rd.nawm_reference_mask(adc, slab, [restr], erosion_mm=4.0, **kw).sum() > 100


def test_nawm_reference_of_a_speckled_white_matter_tries_smaller_erosions():
    """Real FLAIRs: the candidates (white matter at most its FLAIR mode) are the darker half of
    noisy white matter, a speckle that the 4 mm erosion wipes out; with ``min_voxels`` the
    reference comes from a smaller erosion, large enough to trust, and is computed only as far
    as needed."""
    flair, adc, brain, csf = _brain(seed=8)
    rng = np.random.default_rng(8)
    wm = seg.deep_parenchyma(brain, csf, csf_margin_mm=1.0, surface_margin_mm=4.0, spacing_mm=SP)
    speckle = wm & (rng.random(wm.shape) < 0.5)
    restr = _sphere((28, 38, 26), 3)
    adc[restr] = 400.0
    kw = dict(lesion_margin_mm=3.0, trim_sd=2.5, spacing_mm=SP)
    assert rd.erosion_radii(4.0, SP) == [4.0, 2.0, 1.0, 0.0]
    tiny = rd.nawm_reference_mask(adc, speckle, [restr], erosion_mm=4.0, **kw)  # >= 10 voxels
    need = rd.voxels_of(2.0, SP)  # 2 mL
    ample = rd.nawm_reference_mask(adc, speckle, [restr], erosion_mm=4.0, min_voxels=need, **kw)
    assert tiny.sum() < need <= ample.sum()
    assert not (ample & restr).any() and not (ample & ~speckle).any()
    assert abs(np.median(adc[ample]) - ADC_I["wm"]) < 15
    # the levels are eroded lazily: a compact candidate set needs only the first
    levels = rd.candidate_erosions(wm, 4.0, SP)
    away = np.ones(wm.shape, bool)
    rd.nawm_reference_from(adc, levels, away, trim_sd=2.5, min_voxels=need)
    assert list(levels._masks) == [0]
    assert rd.voxels_of(0.001, (1.0, 1.0, 1.0)) == 1 and rd.voxels_of(5.0, (2.0, 2.0, 4.0)) == 313

def test_half_contrast_edge_restores_a_blurred_lesion_and_stays_pseudonormal_free():
    """A lesion of rADC 0.55 in tissue of rADC 1.0, blurred like a coarse DWI voxel: the fixed
    cut-off 0.75 cuts inside the half-contrast contour, the edge step restores the volume; the
    grown voxels (rADC >= 0.75) are restricted now, so nothing counts as pseudonormalized."""
    from pipeline.core import dynamics

    truth = _sphere((28, 30, 26), 7)
    radc = np.where(truth, 0.55, 1.0).astype(np.float32)
    radc = ndimage.gaussian_filter(radc, 1.5).astype(np.float32)
    allowed = np.ones(radc.shape, bool)
    cut = radc < 0.75
    grown = rd.grow_to_half_contrast(cut, radc, allowed, ring_mm=(2.0, 6.0), max_mm=2.0,
                                     spacing_mm=SP)
    assert cut.sum() < 0.85 * truth.sum()
    assert abs(grown.sum() / truth.sum() - 1) < 0.05 and dice(truth, grown) > 0.95
    assert (radc[grown & ~cut] >= 0.75).all()
    assert dynamics.pseudonormalized_fraction(grown, radc, 0.75, grown) == 0.0
    assert dynamics.pseudonormalized_fraction(grown, radc, 0.75) > 0.1
    classes = dynamics.voxel_class_image(radc, grown, np.zeros_like(grown), restricted_below=0.75,
                                         elevated_above=1.15, restricted=grown)
    assert (classes[grown] == dynamics.RESTRICTED).all()
    # no contrast (lesion level equals its surround): nothing grows
    flat = np.full(radc.shape, 0.7, np.float32)
    assert np.array_equal(rd.grow_to_half_contrast(truth, flat, allowed, ring_mm=(2.0, 6.0),
                                                   max_mm=2.0, spacing_mm=SP), truth)


def test_half_contrast_edge_is_that_of_the_grid_embedded_in_a_larger_one():
    """grow_to_half_contrast works on the lesions' box: blurred lesions, one cut by the array's
    edge, alone and together, grow exactly as on the same grid inside a larger array of invalid
    (NaN) voxels, where no box is clipped."""
    kw = dict(ring_mm=(2.0, 6.0), max_mm=2.0, spacing_mm=SP)
    pad = 12
    inner = (slice(pad, -pad),) * 3
    for truth in (_sphere((28, 30, 26), 6), _sphere((3, 10, 40), 6),
                  _sphere((28, 30, 26), 6) | _sphere((3, 10, 40), 6)):
        radc = np.where(truth, 0.5, 1.0).astype(np.float32)
        radc = ndimage.gaussian_filter(radc, 1.5).astype(np.float32)
        # a surround brighter beyond 4 mm: the midpoint needs the whole ring, not a clipped one
        radc[ndimage.distance_transform_edt(~truth) > 4] = 2.0
        cut = radc < 0.75
        allowed = np.ones(radc.shape, bool)
        grown = rd.grow_to_half_contrast(cut, radc, allowed, **kw)
        big = rd.grow_to_half_contrast(np.pad(cut, pad), np.pad(radc, pad, constant_values=np.nan),
                                       np.pad(allowed, pad), **kw)
        # the ring's median is the bright surround (2.0): the midpoint (~1.25) lies above every
        # face-neighbour of the cut lesion (at most ~0.86), so all of them are taken
        assert grown[ndimage.binary_dilation(cut) & ~cut].all()
        assert np.array_equal(grown, big[inner]) and not big[~np.pad(allowed, pad)].any()


def _noisy_diffusion(sd_radc, sd_dwi, seed):
    """Trace DWI and ADC of the synthetic brain with multiplicative white-matter-relative noise
    of the given SDs (rADC, DWI ratio), the ADC of test_core_segmentation's tissues."""
    _, adc, brain, csf = _brain(seed=seed)
    rng = np.random.default_rng(seed)
    adc = np.where(brain & ~csf, ADC_I["wm"] * (1 + rng.normal(0, sd_radc, adc.shape)), adc)
    trace = np.where(brain, 100.0 * (1 + rng.normal(0, sd_dwi, adc.shape)), 0.0)
    trace[csf] = 20.0
    nawm = brain & ~csf
    return trace.astype(np.float32), adc.astype(np.float32), brain, nawm


def _blob(center):
    box = np.zeros((56, 60, 52), bool)
    z, y, x = center
    box[z:z + 3, y:y + 3, x:x + 2] = True  # 18 voxels, above min_lesion_volume_mm3
    return box


@pytest.mark.parametrize("core_sd", [0.0, 4.0])
def test_restricted_core_drops_noise_specks_and_keeps_a_lesion(core_sd):
    """At real-scan spreads (NAWM rADC SD 0.12, DWI ratio SD 0.2) specks just past both cut-offs
    (rADC 0.70, DWI ratio 1.3: what noise and ringing reach) are labelled by the cut-offs alone;
    the significant core (4 SD from NAWM on both maps: rADC < 0.52, DWI ratio > 1.8) drops
    them and keeps a lesion with a restricted core (rADC 0.45, DWI ratio 2.0)."""
    trace, adc, brain, nawm = _noisy_diffusion(0.12, 0.2, seed=11)
    lesion = _sphere((28, 38, 20), 4)
    specks = [_blob((20, 20, 30)), _blob((34, 22, 34)), _blob((26, 40, 36))]
    adc[lesion], trace[lesion] = 0.45 * ADC_I["wm"], 200.0
    for s in specks:
        adc[s], trace[s] = 0.70 * ADC_I["wm"], 130.0
    nawm = nawm & ~lesion & ~np.logical_or.reduce(specks)
    res = rd.segment_restricted(
        trace, adc, brain, nawm, restricted_below=0.75, dwi_hyperintense_ratio=1.15,
        min_lesion_volume_mm3=10.0, csf_adc_min_um2_s=2000.0, spacing_mm=SP, core_sd=core_sd)
    lab, _ = ndimage.label(res.restricted, np.ones((3, 3, 3)))
    assert dice(lesion, res.restricted & lesion) > 0.9
    kept = [bool(res.restricted[s].all()) for s in specks]
    if core_sd == 0:
        assert all(kept)
    else:
        assert not any(kept)
        assert set(np.unique(lab[res.restricted])) == set(np.unique(lab[lesion & res.restricted]))


def test_restricted_core_margin_shrinks_with_the_noise():
    """On a clean scan (rADC SD 0.02, DWI ratio SD 0.03, the phantom's order) a faint lesion just
    past both cut-offs (rADC 0.68, DWI ratio 1.3) is kept: 4 SD of this NAWM lie inside the
    cut-offs, which then bind; the margin is in the session's own SDs, not a stricter cut-off."""
    trace, adc, brain, nawm = _noisy_diffusion(0.02, 0.03, seed=12)
    lesion = _sphere((28, 38, 20), 3)
    adc[lesion], trace[lesion] = 0.68 * ADC_I["wm"], 130.0
    res = rd.segment_restricted(
        trace, adc, brain, nawm & ~lesion, restricted_below=0.75, dwi_hyperintense_ratio=1.15,
        min_lesion_volume_mm3=10.0, csf_adc_min_um2_s=2000.0, spacing_mm=SP, core_sd=4.0)
    assert dice(lesion, res.restricted) > 0.9


def test_shine_through_only_inside_the_given_lesions():
    """With ``shine_within`` (the FLAIR lesions) DWI-bright tissue with a normal ADC outside
    it (grey matter-like) is not shine-through; inside it, it is; restricted is unchanged."""
    flair, adc, brain, csf = _brain(seed=1)
    trace = np.where(brain, 100.0, 0).astype(np.float32)
    trace[csf] = 20.0
    restr = _sphere((28, 38, 20), 4)
    lesion = _sphere((28, 38, 34), 4)  # T2 lesion: DWI bright, ADC normal
    gm_like = _sphere((20, 20, 26), 4) & brain & ~csf  # normal tissue, DWI brighter than NAWM
    adc[restr], trace[restr] = 400.0, 200.0
    adc[lesion], trace[lesion] = 1100.0, 180.0
    adc[gm_like], trace[gm_like] = 850.0, 125.0
    nawm = brain & ~csf & ~restr & ~lesion & ~gm_like
    kw = dict(restricted_below=0.75, dwi_hyperintense_ratio=1.15, min_lesion_volume_mm3=10.0,
              csf_adc_min_um2_s=2000.0, spacing_mm=SP)
    anywhere = rd.segment_restricted(trace, adc, brain, nawm, **kw)
    gated = rd.segment_restricted(trace, adc, brain, nawm, shine_within=lesion, **kw)
    assert (anywhere.shine_through & gm_like).sum() > 0.9 * gm_like.sum()
    assert not (gated.shine_through & ~lesion).any()
    assert dice(lesion, gated.shine_through) > 0.95
    assert np.array_equal(gated.restricted, anywhere.restricted)
    with pytest.raises(ValueError, match="shine-through region shape"):
        rd.segment_restricted(trace, adc, brain, nawm, shine_within=lesion[1:], **kw)


def test_edge_reach_is_a_fraction_of_the_native_dwi_voxel():
    """The edge step's reach is restricted_edge_dwi_voxels x the native DWI's in-plane voxel
    (its finest spacing): the clinical 2 x 2 x 4 mm grid and the small 3.4 x 3.4 x 5.5 mm grid
    give two reaches from one setting, and so two masks of a blurred lesion; 0 is off; a bad
    spacing is refused."""
    from pipeline.config import load_config

    cfg = load_config().to_dict()
    assert rd.dwi_inplane_mm((2.0, 2.0, 4.0)) == 2.0
    assert rd.dwi_inplane_mm((5.5, 3.4, 3.6, 1.0)) == 3.4  # 4D: the first three, any order
    with pytest.raises(ValueError, match="native DWI spacing"):
        rd.dwi_inplane_mm((2.0, 0.0, 4.0))
    d = {**cfg["dynamics"], "restricted_edge_dwi_voxels": 0.5}
    clinical = rd.restricted_settings(cfg["segmentation"], d, dwi_inplane=2.0)
    small = rd.restricted_settings(cfg["segmentation"], d, dwi_inplane=3.4)
    assert clinical["edge_mm"] == pytest.approx(1.0) and small["edge_mm"] == pytest.approx(1.7)
    off = rd.restricted_settings(cfg["segmentation"], {**d, "restricted_edge_dwi_voxels": 0.0},
                                 dwi_inplane=float("nan"))
    assert off["edge_mm"] == 0.0
    with pytest.raises(ValueError, match="in-plane voxel"):
        rd.restricted_settings(cfg["segmentation"], d, dwi_inplane=float("nan"))
    # a blurred lesion on a 1 mm grid: the larger native voxel grows it farther
    truth = _sphere((28, 30, 26), 7)
    radc = ndimage.gaussian_filter(np.where(truth, 0.5, 1.4).astype(np.float32), 2.5)
    radc = radc.astype(np.float32)
    cut = radc < 0.75
    allowed = np.ones(radc.shape, bool)
    masks = [rd.grow_to_half_contrast(cut, radc, allowed, ring_mm=(s["edge_mm"], 6.0),
                                      max_mm=s["edge_mm"], spacing_mm=(1.0, 1.0, 1.0))
             for s in (clinical, small)]
    assert cut.sum() < masks[0].sum() < masks[1].sum()
