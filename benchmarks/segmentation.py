"""Benchmark: FLAIR lesion and restricted-diffusion segmentation against two baselines.

One run scores the project and two baselines computed on the same images:

* **project**: ``pipeline.core.segmentation`` with the ``[segmentation]`` defaults
  (FLAIR: :func:`flair_session_maps` per session + :func:`hysteresis_series` over the
  sessions; restricted: the pipeline's own masks);
* **baseline FLAIR z**: FLAIR global z-score inside the brain mask,
  ``(FLAIR - mean) / SD > --baseline-z`` (a plain FLAIR z-score threshold, issue #5);
* **baseline ADC**: absolute ``ADC < 620 um^2/s`` inside the brain mask.

Both baselines drop components below ``segmentation.min_lesion_volume_mm3`` like the project.

Restricted diffusion also gets a reference row, not a method: **ceiling: truth at the DWI
grid** (:func:`dwi_grid_ceiling`), the truth mask as the DWI acquisition grid can hold it (a DWI
voxel is lesion when at least half of it is, the truth's own rule), mapped back to the truth
grid: the Dice a perfect voxel classifier at the DWI resolution would reach.

Cases (``--cases``, comma-separated):

* ``phantom``: ``lesionlapse simulate --preset mixed`` (seed case, MS-like, control), the
  ``lesionlapse`` CLI run on it (or ``--pipeline-out`` derivatives); FLAIR is segmented again
  from the pipeline's subject-space images with the current code (``--resegment``, default;
  with each native FLAIR's slab edge mapped by the pipeline's from-FLAIR_to-subject transform,
  :func:`fov_edge`, as the resample node does) or read from the pipeline's masks; every mask
  is mapped into the truth space (nearest neighbour, the pipeline's and the phantom's
  transforms) and scored per session, per preset (pooled) and for false positives in controls;
  lesions whose truth volume does not change keep their volume;
* ``real-mni``: the real 1 mm MS FLAIR of ``ms_flair_mni`` and its 3-rater consensus mask
  (brain = FLAIR > 0; no ADC): Dice, HD95, AVD, lesion-wise F1 (runs in seconds, for iterating);
* ``real-long``: the two real MS pairs of ``ms_flair_longitudinal``: both raw FLAIRs prepared
  as the pipeline's ``prep_flair`` node does (:func:`prepare_like_pipeline`: its brain mask and
  N4 bias correction, ``[preprocessing]``), resampled into the common space with the reference
  affines, segmented jointly (two sessions) inside the data set's brain mask, and (the project
  once more) inside the pipeline's own brain mask of each raw FLAIR (nearest neighbour), i.e.
  what a user of the pipeline gets; no seed near either raw FLAIR's slab edge (:func:`fov_edge`
  with the reference affine; ``real-mni`` is skull-stripped MNI, its FOV unknown: no zone);
  the change = voxels lesion at exactly one time point;
  scored against the manual change mask (recall of change voxels, false-positive change
  volume outside it, lesion-wise recall);
* ``real-dwi``: the real healthy volunteer's DWI of ``dwi_philips_real`` (no lesion): restricted
  and shine-through volume of the project's rule (with the NAWM reference of the brain's ADC
  mode, and with the NAWM a DWI-only session gets in the pipeline) and of the ADC baseline on its
  native grid (:func:`healthy_dwi_masks`), i.e. their false positives on real noise and real
  grey matter.

Usage::

    python benchmarks/segmentation.py                       # everything, 20 phantom subjects
    python benchmarks/segmentation.py --cases real-mni      # seconds
    python benchmarks/segmentation.py --cases real-dwi      # seconds
    python benchmarks/segmentation.py --cases phantom --subjects 3 --workdir /tmp/seg
    python benchmarks/segmentation.py --pipeline-out OUT    # existing pipeline derivatives

Writes ``benchmarks/results/segmentation.md`` (``--out``) with the command, machine and load.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common as C
from benchmarks.tracking import run_pipeline, simulate
from pipeline.config import Config, load_config
from pipeline.core import dwi as core_dwi
from pipeline.core import metrics as M
from pipeline.core import preprocess as core_pre
from pipeline.core import registration as core_reg
from pipeline.core import restricted as rd
from pipeline.core import segmentation as seg
from pipeline.io import nib_to_sitk

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
ADC_BASELINE_UM2_S = 620.0  #: absolute ADC threshold of the restricted-diffusion baseline
CEILING = "ceiling: truth at the DWI grid"  #: method label of :func:`dwi_grid_ceiling` rows
CEILING_SAMPLE_MM = 1.5  #: sub-sample spacing (at most) of a DWI voxel for its lesion fraction
CASES = ("phantom", "real-mni", "real-long", "real-dwi")
TARGETS = {
    "phantom FLAIR Dice (pooled, lesion subjects)": ">= 0.90",
    "phantom restricted Dice (pooled, seed case)": ">= 0.90",
    "phantom FLAIR lesion F1 (pooled)": ">= 0.90",
    "phantom FLAIR AVD": "<= 10 %",
    "phantom control false positives per session": "< 0.5 mL",
    "phantom unchanged lesions, volume spread over sessions": "<= 5 %",
    "real MS FLAIR Dice": ">= 0.65, above both baselines",
    "real MS FLAIR lesion F1": ">= 0.6, above both baselines",
}


# --------------------------------------------------------------------------------------------
# segmenters


def flair_project(flairs: list[np.ndarray], brains: list[np.ndarray],
                  adcs: list[np.ndarray | None], spacing: tuple[float, ...],
                  config: Config,
                  fov_edges: list[np.ndarray | None] | None = None) -> list[np.ndarray]:
    """The project's FLAIR lesions: the calls of ``interfaces.segmentation.SegmentSessions``.

    ``fov_edges``: per session the through-plane distance (mm) to the native FLAIR's slab edge
    on the arrays' grid (:func:`fov_edge`), as the pipeline's resample node writes it; None:
    the field of view is not known (no no-seed zone)."""
    s = config.segmentation
    zones = (None if fov_edges is None else
             [seg.fov_seed_zone(f, s.flair_fov_edge_no_seed_mm) for f in fov_edges])
    maps = [seg.flair_session_maps(
        f, b, a, csf_adc_min_um2_s=s.reference_csf_adc_min_um2_s,
        csf_flair_max_ratio=s.csf_flair_max_ratio,
        reference_csf_margin_mm=s.reference_csf_margin_mm,
        reference_depth_mm=s.reference_depth_mm, cortex_rim_mm=s.cortex_rim_mm,
        csf_rim_mm=s.csf_rim_mm, spacing_mm=spacing) for f, b, a in zip(flairs, brains, adcs)]
    return seg.hysteresis_series(
        maps, brains, z_seed=s.flair_z_seed, z_grow=s.flair_z_grow, gm_z_seed=s.flair_gm_z_seed,
        gm_z_grow=s.flair_gm_z_grow, min_lesion_volume_mm3=s.min_lesion_volume_mm3,
        spacing_mm=spacing, edge_fraction=s.flair_edge_fraction,
        edge_percentile=s.flair_edge_percentile, rim_z_grow=s.flair_rim_z_grow,
        change_sd=s.flair_change_sd, change_smooth_mm=s.flair_change_smooth_mm,
        edge_level_all_sessions=s.flair_edge_level_all_sessions,
        edge_level_floor=s.flair_edge_level_floor, seed_zones=zones)


def fov_edge(native: sitk.Image, reference: sitk.Image, transform: sitk.Transform,
             config: Config) -> np.ndarray:
    """Through-plane distance (mm, array z, y, x) from each voxel of ``reference`` to the slab
    edge of the native FLAIR ``native`` (``transform``: reference points to native points), as
    the pipeline's ``ResampleSession`` computes it (``core.registration.fov_edge_distance``)."""
    return sitk.GetArrayFromImage(core_reg.fov_edge_distance(
        native, reference, transform,
        min_slice_mm=config.segmentation.flair_fov_edge_min_slice_mm,
        ends=config.segmentation.flair_fov_edge_ends))


def flair_baseline(flair: np.ndarray, brain: np.ndarray, z: float, min_mm3: float,
                   spacing: tuple[float, ...]) -> np.ndarray:
    """FLAIR global z-score threshold inside the brain mask."""
    v = flair[brain & np.isfinite(flair)].astype(np.float64)
    zmap = (flair - v.mean()) / v.std()
    return seg.remove_small_components(brain & (zmap > z), min_mm3, spacing)


def adc_baseline(adc: np.ndarray, brain: np.ndarray, min_mm3: float,
                 spacing: tuple[float, ...]) -> np.ndarray:
    """Absolute ADC < 620 um^2/s inside the brain mask (valid ADC only)."""
    ok = brain & np.isfinite(adc) & (adc > 0)
    return seg.remove_small_components(ok & (adc < ADC_BASELINE_UM2_S), min_mm3, spacing)


def dwi_grid_ceiling(truth: np.ndarray, truth_affine: np.ndarray, dwi_affine: np.ndarray,
                     dwi_shape: tuple[int, ...]) -> np.ndarray:
    """``truth`` (bool, on the grid of ``truth_affine``) as the DWI grid can hold it, back on
    the truth grid (bool).

    Each DWI voxel's lesion fraction is the mean of the truth (linear interpolation) at
    sub-samples at most ``CEILING_SAMPLE_MM`` apart; a DWI voxel is lesion when the fraction is
    at least 0.5 (the phantom truth's half-volume rule); every truth voxel then takes the value
    of the DWI voxel holding its centre. The nominal acquisition grid of the header is used, so
    simulated head motion is not followed: the ceiling is a statistical partial-volume bound,
    not the exact grid of each session.
    """
    zooms = np.sqrt((np.asarray(dwi_affine)[:3, :3] ** 2).sum(0))
    sub = [max(int(np.ceil(z / CEILING_SAMPLE_MM)), 1) for z in zooms]
    axes = [np.arange(n * k) / k - 0.5 + 0.5 / k for n, k in zip(dwi_shape, sub)]
    grid = np.meshgrid(*axes, indexing="ij")
    pts = np.stack([g.ravel() for g in grid] + [np.ones(grid[0].size)])
    vox = (np.linalg.inv(truth_affine) @ dwi_affine @ pts)[:3]
    vals = ndimage.map_coordinates(np.asarray(truth, np.float32), vox, order=1, cval=0.0)
    shape6 = [v for n, k in zip(dwi_shape, sub) for v in (n, k)]
    dwi_mask = vals.reshape(shape6).mean(axis=(1, 3, 5)) >= 0.5
    idx = np.indices(np.shape(truth)).reshape(3, -1)
    back = (np.linalg.inv(dwi_affine) @ truth_affine @ np.vstack([idx, np.ones(idx.shape[1])]))[:3]
    return ndimage.map_coordinates(dwi_mask.astype(np.uint8), back, order=0,
                                   cval=0).reshape(np.shape(truth)) > 0


def scores(truth: np.ndarray, pred: np.ndarray, spacing: tuple[float, ...]) -> dict:
    """Challenge metrics of one mask pair (``pipeline.core.metrics``)."""
    det = M.lesion_wise_detection(truth, pred)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return {"dice": M.dice(truth, pred), "hd95_mm": M.hausdorff95(truth, pred, spacing),
            "avd_pct": M.absolute_volume_difference_percent(truth, pred),
            "recall": det.recall, "precision": det.precision, "f1": det.f1,
            "n_truth": det.n_truth, "n_pred": det.n_pred,
            "truth_ml": truth.sum() * voxel_ml, "pred_ml": pred.sum() * voxel_ml,
            "fp_ml": np.count_nonzero(pred & ~truth) * voxel_ml,
            "tp_vox": int(np.count_nonzero(truth & pred)), "t_vox": int(truth.sum()),
            "p_vox": int(pred.sum())}


# --------------------------------------------------------------------------------------------
# real-mni


def patient_dirs(name: str) -> list[Path]:
    """The ``patient*`` folders of the real data set ``DATA / name``.

    Raises
    ------
    SystemExit
        Naming the folder, when it does not exist or holds no ``patient*`` folder (a benchmark
        run from a snapshot without ``../shared/data`` next to it).
    """
    root = DATA / name
    dirs = sorted(d for d in root.glob("patient*") if d.is_dir())
    if not dirs:
        what = "holds no patient* folder" if root.is_dir() else "does not exist"
        raise SystemExit(f"real data folder {root} {what}: the real cases need "
                         f"<repo>/../shared/data/{name} (from a snapshot under /tmp: the "
                         "symlink /tmp/shared -> /work/shared), or leave them out of --cases")
    return dirs


def real_mni(config: Config, baseline_z: float) -> pd.DataFrame:
    rows = []
    for pdir in patient_dirs("ms_flair_mni"):
        img = nib.load(str(pdir / "FLAIR_brain_MNI.nii.gz"))
        flair = np.asarray(img.dataobj, np.float32)
        truth = np.asarray(nib.load(str(pdir / "lesion_consensus_MNI.nii.gz")).dataobj) > 0
        spacing = tuple(float(x) for x in img.header.get_zooms()[:3])
        brain = flair > 0
        min_mm3 = config.segmentation.min_lesion_volume_mm3
        t0 = time.perf_counter()
        proj = flair_project([flair], [brain], [None], spacing, config)[0]
        sec = time.perf_counter() - t0
        base = flair_baseline(flair, brain, baseline_z, min_mm3, spacing)
        for method, pred in (("project", proj), (f"baseline FLAIR z > {baseline_z:g}", base)):
            rows.append({"case": pdir.name, "method": method, **scores(truth, pred, spacing),
                         "seconds": sec if method == "project" else np.nan})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# real-dwi


def healthy_dwi_masks(dwi4d: np.ndarray, bvals: np.ndarray, affine: np.ndarray,
                      config: Config) -> dict:
    """Restricted masks of one DWI series without FLAIR, on its own grid (arrays z, y, x).

    trace, b0 and ADC as the pipeline's session node computes them (``[inputs]``); brain =
    the brain mask of the mean b0, and b0 and trace bias-corrected, as the pipeline's
    ``prep_dwi`` node does (:func:`pipeline.core.preprocess.prepare_dwi`,
    ``[preprocessing] dwi_bias_correct``); NAWM
    reference = :func:`pipeline.core.restricted.nawm_reference_from` on the brain voxels with a
    valid, not CSF-like ADC (``reference_csf_adc_min_um2_s``), eroded by ``nawm_erosion_mm``
    (or less, ``nawm_min_volume_ml``):
    without a FLAIR it is the pipeline's NAWM without the FLAIR's deep-parenchyma and
    FLAIR-mode conditions (so it may hold grey matter whose ADC lies near the mode). Returns
    ``brain``, ``project`` (:class:`pipeline.core.restricted.RestrictedResult`),
    ``dwi_only`` (the same with the NAWM a session without FLAIR gets in the pipeline's segment
    node: :meth:`pipeline.core.segmentation.FlairMaps.nawm_candidates` of the b0's maps),
    ``baseline`` (:func:`adc_baseline` mask) and ``spacing`` (mm, array order). The
    volunteer has no FLAIR: both project results are computed without the FLAIR-lesion gate of
    shine-through (``shine_within``), i.e. their ``shine_through`` is every DWI-bright voxel that
    is not restricted; :func:`real_dwi` reports what the pipeline would call shine-through.
    """
    inp, s, d = config.inputs, config.segmentation, config.dynamics
    b0 = core_dwi.mean_b0(dwi4d, bvals, inp.b0_threshold_s_mm2)
    trace, b_value = core_dwi.trace_dwi(dwi4d, bvals, inp.b0_threshold_s_mm2,
                                        shell_tolerance=inp.shell_tolerance)
    adc = core_dwi.adc_from_signals(b0, trace, b_value, adc_max_um2_s=inp.adc_max_um2_s)
    ref = nib_to_sitk(np.asarray(b0, np.float32), affine)
    cfg = config.to_dict()
    b0_img, trace_img, mask = core_pre.prepare_dwi(
        ref, nib_to_sitk(np.asarray(trace, np.float32), affine), cfg["preprocessing"],
        bias_correct=config.preprocessing.dwi_bias_correct)
    brain = sitk.GetArrayFromImage(mask) > 0
    b0, trace = (sitk.GetArrayFromImage(i) for i in (b0_img, trace_img))  # z, y, x
    adc = np.ascontiguousarray(np.asarray(adc, np.float32).T)
    spacing = _zyx_spacing(ref)
    maps = seg.flair_session_maps(
        b0, brain, adc,
        csf_adc_min_um2_s=s.reference_csf_adc_min_um2_s, csf_flair_max_ratio=s.csf_flair_max_ratio,
        reference_csf_margin_mm=s.reference_csf_margin_mm, reference_depth_mm=s.reference_depth_mm,
        cortex_rim_mm=s.cortex_rim_mm, csf_rim_mm=s.csf_rim_mm, spacing_mm=spacing)
    results = {}
    for key, cand in (
            ("project", brain & np.isfinite(adc) & (adc > 0)
             & (adc < s.reference_csf_adc_min_um2_s)),
            ("dwi_only", maps.nawm_candidates(s.nawm_flair_z_max))):
        nawm = rd.nawm_reference_from(
            adc, rd.candidate_erosions(cand, d.nawm_erosion_mm, spacing),
            np.ones(brain.shape, bool), trim_sd=s.nawm_adc_trim_sd,
            min_voxels=rd.voxels_of(d.nawm_min_volume_ml, spacing))
        results[key] = rd.segment_restricted(
            trace, adc, brain, nawm, spacing_mm=spacing,
            **rd.restricted_settings(cfg["segmentation"], cfg["dynamics"],
                                     dwi_inplane=rd.dwi_inplane_mm(spacing)))
    baseline = adc_baseline(adc, brain, s.min_lesion_volume_mm3, spacing)
    return {"brain": brain, **results, "baseline": baseline, "spacing": spacing}


def _components(mask: np.ndarray, voxel_ml: float) -> tuple[int, float]:
    """Number of 26-connected components and the largest one's volume (mL)."""
    lab, n = ndimage.label(mask, ndimage.generate_binary_structure(3, 3))
    sizes = np.bincount(lab.ravel())[1:]
    return int(n), float(sizes.max() * voxel_ml) if n else 0.0


def real_dwi(config: Config) -> pd.DataFrame:
    """False positives on a healthy volunteer's real DWI (:func:`healthy_dwi_masks`)."""
    folder = DATA / "dwi_philips_real"
    nii = folder / "DTI_Biobank_2mm_MB3S2_EPI_701.nii.gz"
    bval = folder / "DTI_Biobank_2mm_MB3S2_EPI_701.bval"
    if not nii.exists() or not bval.exists():
        raise SystemExit(f"real-dwi: {nii} or {bval} not found (snapshots under /tmp need the "
                         "symlink /tmp/shared -> /work/shared), or leave it out of --cases")
    img = nib.load(str(nii))
    res = healthy_dwi_masks(np.asarray(img.dataobj, np.float32), np.loadtxt(bval), img.affine,
                            config)
    voxel_ml = float(np.prod(res["spacing"])) / 1000.0
    gate = config.dynamics.shine_through_in_flair_lesion
    rows = []
    for method, key in (("project", "project"),
                        ("project, NAWM of a DWI-only session (from the b0)", "dwi_only"),
                        (f"baseline ADC < {ADC_BASELINE_UM2_S:g}", "baseline")):
        proj = res[key] if key != "baseline" else None
        mask = proj.restricted if proj is not None else res["baseline"]
        n, largest = _components(mask, voxel_ml)
        rows.append({"case": nii.name, "method": method,
                     "brain_ml": float(res["brain"].sum() * voxel_ml),
                     "restricted_ml": float(mask.sum() * voxel_ml), "components": n,
                     "largest_ml": largest,
                     # the pipeline's shine-through: inside the FLAIR lesions
                     # ([dynamics] shine_through_in_flair_lesion); the volunteer has no
                     # FLAIR: none with a FLAIR free of lesions, n/a in a DWI-only session
                     "shine_through_ml": (
                         np.nan if proj is None or (key == "dwi_only" and gate)
                         else 0.0 if gate else float(proj.shine_through.sum() * voxel_ml)),
                     "dwi_bright_not_restricted_ml": (float(proj.shine_through.sum() * voxel_ml)
                                                      if proj is not None else np.nan),
                     "nawm_adc_um2_s": (proj.reference_adc.median_um2_s
                                        if proj is not None else np.nan),
                     "nawm_ml": (proj.reference_adc.n_voxels * voxel_ml
                                 if proj is not None else np.nan)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# real-long


def _zyx_spacing(img: sitk.Image) -> tuple[float, ...]:
    return tuple(float(s) for s in reversed(img.GetSpacing()))


def prepare_like_pipeline(image: sitk.Image, config: Config) -> tuple[sitk.Image, sitk.Image]:
    """``image`` bias-corrected as the pipeline's ``prep_flair`` node
    (``interfaces.preprocess.PrepareImage``) does it: N4 fitted inside the pipeline's own brain
    mask, with the ``[preprocessing]`` settings (float32); returns it and that brain mask.

    The raw FLAIRs of ``ms_flair_longitudinal`` are not bias-corrected; segmenting them without
    this step scores an input the pipeline never segments: patient01's bias field widens the
    outer parenchyma's upper half-width (the grey-matter z scale) to 2.0x the deep tissue's
    half-width at study 2 (0.86x after N4), so no voxel passed the grey-matter seed gate.
    """
    return core_pre.prepare_image(image, config.to_dict()["preprocessing"])


def real_long(config: Config, baseline_z: float) -> pd.DataFrame:
    rows = []
    for pdir in patient_dirs("ms_flair_longitudinal"):
        ref = sitk.ReadImage(str(pdir / "gt_lesion_change_common_space.nii.gz"))
        truth = sitk.GetArrayFromImage(ref) > 0
        brain = sitk.GetArrayFromImage(sitk.ReadImage(
            str(pdir / "brainmask_common_space.nii.gz"))) > 0
        spacing = _zyx_spacing(ref)
        flairs, own, fovs = [], [], []
        for k in (1, 2):
            raw, mask = prepare_like_pipeline(
                sitk.ReadImage(str(pdir / f"study{k}_FLAIR_raw.nii.gz")), config)
            tx = sitk.ReadTransform(str(pdir / f"study{k}_FLAIR_to_common_space.txt"))
            flairs.append(sitk.GetArrayFromImage(
                sitk.Resample(raw, ref, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)))
            fovs.append(fov_edge(raw, ref, tx, config))  # the raw scan's slab edge
            own.append(sitk.GetArrayFromImage(
                sitk.Resample(mask, ref, tx, sitk.sitkNearestNeighbor, 0)) > 0)
        brains = [brain & (f > 0) for f in flairs]
        # the pipeline's own brain mask: what a user gets (the data set's mask is a tighter
        # brain outline at patient03 and ends a few slices short of the raw scans' coverage)
        own = [m & (f > 0) for m, f in zip(own, flairs)]
        min_mm3 = config.segmentation.min_lesion_volume_mm3
        t0 = time.perf_counter()
        proj = flair_project(flairs, brains, [None, None], spacing, config, fovs)
        sec = time.perf_counter() - t0
        base = [flair_baseline(f, b, baseline_z, min_mm3, spacing) for f, b in zip(flairs, brains)]
        t0 = time.perf_counter()
        proj_own = flair_project(flairs, own, [None, None], spacing, config, fovs)
        sec_own = time.perf_counter() - t0
        vox = float(np.prod(spacing))
        for method, mask_name, (m1, m2), s in (
                ("project", "data set", proj, sec),
                (f"baseline FLAIR z > {baseline_z:g}", "data set", base, np.nan),
                ("project", "pipeline", proj_own, sec_own)):
            b1, b2 = (brains if mask_name == "data set" else own)
            change = m1 ^ m2
            cd = M.change_detection(truth, change, vox)
            rows.append({"case": pdir.name, "method": method, "brain_mask": mask_name,
                         "brain_ml_t1": b1.sum() * vox / 1000.0,
                         "brain_ml_t2": b2.sum() * vox / 1000.0,
                         "change_voxel_recall": cd.voxel_recall,
                         "change_lesion_recall": cd.lesion_recall,
                         "fp_change_ml": cd.false_positive_volume_mm3 / 1000.0,
                         "truth_change_ml": truth.sum() * vox / 1000.0,
                         "pred_change_ml": change.sum() * vox / 1000.0,
                         # the truth change the method misses, by why: lesion at both time
                         # points, or at neither
                         "missed_both_ml": np.count_nonzero(truth & m1 & m2) * vox / 1000.0,
                         "missed_neither_ml": np.count_nonzero(truth & ~m1 & ~m2) * vox / 1000.0,
                         "lesion_ml_t1": m1.sum() * vox / 1000.0,
                         "lesion_ml_t2": m2.sum() * vox / 1000.0,
                         "seconds": s})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# phantom


@dataclass
class SubjectImages:
    """The pipeline's subject-space images of one session (arrays z, y, x)."""

    flair: np.ndarray
    brain: np.ndarray
    adc: np.ndarray
    flair_mask: np.ndarray
    restricted_mask: np.ndarray
    reference: sitk.Image


def _read(out: Path, sub: str, ses: str, pattern: str) -> sitk.Image:
    return sitk.ReadImage(str(C.pipeline_file(out, sub, ses, pattern)))


def subject_images(out: Path, sub: str, ses: str) -> SubjectImages:
    flair = _read(out, sub, ses, "*_space-subject_desc-preproc_FLAIR.nii.gz")
    arr = lambda img: sitk.GetArrayFromImage(img)
    return SubjectImages(
        flair=arr(flair).astype(np.float32),
        brain=arr(_read(out, sub, ses, "*_space-subject_desc-brain_mask.nii.gz")) > 0,
        adc=arr(_read(out, sub, ses, "*_space-subject_ADC.nii.gz")).astype(np.float32),
        flair_mask=arr(_read(out, sub, ses,
                             "*_space-subject_label-lesion_desc-flair_mask.nii.gz")) > 0,
        restricted_mask=arr(_read(out, sub, ses,
                                  "*_space-subject_label-lesion_desc-restricted_mask.nii.gz")) > 0,
        reference=flair)


def _to_truth(mask: np.ndarray, like: sitk.Image, truth_ref: sitk.Image,
              transform: sitk.Transform) -> np.ndarray:
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.CopyInformation(like)
    return C.to_truth_space(img, truth_ref, transform,
                            interpolator=sitk.sitkNearestNeighbor) > 0


def phantom_subject(out: Path, truth: C.Truth, config: Config, baseline_z: float,
                    resegment: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-session scores and unchanged-lesion volumes of one phantom subject."""
    s = config.segmentation
    imgs = [subject_images(out, truth.sub, ses) for ses in truth.sessions]
    spacing = _zyx_spacing(imgs[0].reference)
    if resegment:
        # the native FLAIRs' slab edges in the subject space, as the resample node writes them
        # (None: a session without FLAIR, whose FOV the segment node does not read)
        anat = truth.root.parents[2] / f"sub-{truth.sub}"
        fovs = []
        for ses, im in zip(truth.sessions, imgs):
            native = anat / f"ses-{ses}" / "anat" / f"sub-{truth.sub}_ses-{ses}_FLAIR.nii.gz"
            fovs.append(fov_edge(
                sitk.ReadImage(str(native)), im.reference, core_reg.read_transform(
                    C.pipeline_file(out, truth.sub, ses,
                                    "*_from-FLAIR_to-subject_mode-image_xfm.txt")), config)
                if native.exists() else None)
        flair_proj = flair_project([i.flair for i in imgs], [i.brain for i in imgs],
                                   [i.adc for i in imgs], spacing, config, fovs)
    else:
        flair_proj = [i.flair_mask for i in imgs]
    truth_spacing = tuple(float(x) for x in nib.affines.voxel_sizes(truth.affine))
    rows, mapped = [], {"project": []}
    for k, (ses, im) in enumerate(zip(truth.sessions, imgs)):
        tx = C.truth_to_subject(out, truth, ses)
        ref = sitk.ReadImage(str(truth.image(ses)))
        preds = {
            ("flair", "project"): flair_proj[k],
            ("flair", "baseline"): flair_baseline(im.flair, im.brain, baseline_z,
                                                  s.min_lesion_volume_mm3, spacing),
            ("restricted", "project"): im.restricted_mask,
            ("restricted", "baseline"): adc_baseline(im.adc, im.brain, s.min_lesion_volume_mm3,
                                                     spacing),
        }
        bids_dwi = truth.root.parents[2] / f"sub-{truth.sub}" / f"ses-{ses}" / "dwi"
        adc_raw = nib.load(str(bids_dwi / f"sub-{truth.sub}_ses-{ses}_ADC.nii.gz"))
        for (kind, method), pred in preds.items():
            p = _to_truth(pred, im.reference, ref, tx)
            if (kind, method) == ("flair", "project"):
                mapped["project"].append(p)
            rows.append({"subject": truth.sub, "preset": truth.preset, "session": ses,
                         "day": truth.days[k], "kind": kind, "method": method,
                         **scores(truth.masks[kind][k], p, truth_spacing)})
        t = truth.masks["restricted"][k]
        ceiling = (dwi_grid_ceiling(t, truth.affine, adc_raw.affine, adc_raw.shape[:3])
                   if t.any() else np.zeros_like(t))
        rows.append({"subject": truth.sub, "preset": truth.preset, "session": ses,
                     "day": truth.days[k], "kind": "restricted", "method": CEILING,
                     **scores(t, ceiling, truth_spacing)})
    return pd.DataFrame(rows), unchanged_volumes(truth, mapped["project"])


def unchanged_volumes(truth: C.Truth, pred: list[np.ndarray]) -> pd.DataFrame:
    """FLAIR truth lesions whose truth volume is the same at every session they exist in
    (at least two): the predicted volume inside the lesion's truth region (dilated by 2 voxels,
    not touching another truth lesion) per session; spread = (max - min) / mean."""
    from scipy import ndimage

    lt = truth.tables["lesions_timeseries"]
    lt = lt[(lt["kind"] == "flair")] if "kind" in lt else lt
    vol_col = next(c for c in ("volume_ml", "flair_volume_ml") if c in lt)
    rows = []
    for lid, g in lt.groupby("lesion_id"):
        v = g[vol_col].to_numpy(float)
        v = v[v > 0]
        if v.size < 2 or (v.max() - v.min()) > 1e-9:
            continue
        vols = []
        for k in range(len(truth.sessions)):
            dseg = truth.dseg["flair"][k]
            region = dseg == lid
            if not region.any():
                continue
            grown = ndimage.binary_dilation(region, iterations=2)
            others = ndimage.binary_dilation((dseg > 0) & ~region, iterations=2)
            vols.append(np.count_nonzero(pred[k] & grown & ~others) * truth.voxel_ml)
        if len(vols) >= 2 and np.mean(vols) > 0:
            rows.append({"subject": truth.sub, "lesion_id": int(lid), "truth_ml": float(v[0]),
                         "sessions": len(vols), "min_ml": min(vols), "max_ml": max(vols),
                         "spread_pct": (max(vols) - min(vols)) / np.mean(vols) * 100.0})
    return pd.DataFrame(rows)


def pooled(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Dice over pooled voxels, mean lesion F1 / AVD, false positives per session."""
    out = []
    for key, g in df.groupby(by):
        key = key if isinstance(key, tuple) else (key,)
        has = g[g["t_vox"] > 0]
        out.append({**dict(zip(by, key)), "sessions": len(g),
                    "dice_pooled": (2 * has["tp_vox"].sum() / (has["t_vox"].sum() +
                                                                has["p_vox"].sum())
                                    if len(has) else np.nan),
                    "dice_mean": has["dice"].mean() if len(has) else np.nan,
                    "f1_mean": has["f1"].mean() if len(has) else np.nan,
                    "avd_pct_mean": has["avd_pct"].mean() if len(has) else np.nan,
                    "hd95_mm_mean": has["hd95_mm"].mean() if len(has) else np.nan,
                    "fp_ml_mean": g["fp_ml"].mean(), "fp_ml_max": g["fp_ml"].max()})
    return pd.DataFrame(out)


def phantom(args, config: Config) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    work = args.workdir.resolve()
    bids, deriv = work / "bids", work / "out"
    work.mkdir(parents=True, exist_ok=True)
    info: dict = {}
    simulate(bids, args.subjects, args.seed, args.grid, "mixed")
    subs = C.subjects(bids)
    if args.only:
        subs = [s for s in subs if s in args.only.split(",")]
    if args.pipeline_out:
        deriv = args.pipeline_out.resolve()
    else:
        info["pipeline seconds"] = run_pipeline(bids, deriv, work / "work", args.nprocs, subs)
    parts, stable, failed = [], [], []
    for sub in subs:
        truth = C.load_truth(bids, sub)
        try:
            a, b = phantom_subject(deriv, truth, config, args.baseline_z, args.resegment)
        except (FileNotFoundError, RuntimeError) as exc:
            failed.append(f"sub-{sub}: {exc}")
            continue
        parts.append(a)
        stable.append(b)
        print(f"  sub-{sub} ({truth.preset}) scored", flush=True)
    info["failed"] = failed
    info["presets"] = (pd.concat(parts).drop_duplicates("subject")["preset"].value_counts()
                       if parts else pd.Series(dtype=int))
    return (pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(),
            pd.concat(stable, ignore_index=True) if stable else pd.DataFrame(), info)


# --------------------------------------------------------------------------------------------
# report


def summary(ph: pd.DataFrame | None, st: pd.DataFrame | None,
            mni: pd.DataFrame | None) -> pd.DataFrame:
    rows = {}

    def put(name, project, baseline):
        rows[name] = {"target": TARGETS[name], "project": project, "baseline": baseline}

    fmt = lambda x, nd=3: "n/a" if x is None or not np.isfinite(x) else f"{x:.{nd}g}"
    if ph is not None and len(ph):
        les = ph[ph["preset"] != "control"]
        get = lambda kind, meth, col, sel=les: pooled(
            sel[(sel["kind"] == kind) & (sel["method"] == meth)], ["kind"])[col].iloc[0]
        if len(les):  # a control-only run (--only) has no lesion to score
            put("phantom FLAIR Dice (pooled, lesion subjects)",
                fmt(get("flair", "project", "dice_pooled")),
                fmt(get("flair", "baseline", "dice_pooled")))
            seed_case = ph[ph["preset"] == "seed-case"]
            if len(seed_case):
                put("phantom restricted Dice (pooled, seed case)",
                    fmt(get("restricted", "project", "dice_pooled", seed_case))
                    + f" ({CEILING}: {fmt(get('restricted', CEILING, 'dice_pooled', seed_case))})",
                    fmt(get("restricted", "baseline", "dice_pooled", seed_case)))
            put("phantom FLAIR lesion F1 (pooled)", fmt(get("flair", "project", "f1_mean")),
                fmt(get("flair", "baseline", "f1_mean")))
            put("phantom FLAIR AVD", fmt(get("flair", "project", "avd_pct_mean")) + " %",
                fmt(get("flair", "baseline", "avd_pct_mean")) + " %")
        ctl = ph[ph["preset"] == "control"]
        if len(ctl):
            def fp(meth):
                c = ctl[ctl["method"] == meth].groupby(["subject", "session"])["pred_ml"].sum()
                return f"max {c.max():.3g} mL, mean {c.mean():.3g} mL (FLAIR + restricted)"
            put("phantom control false positives per session", fp("project"), fp("baseline"))
    if st is not None and len(st):
        put("phantom unchanged lesions, volume spread over sessions",
            f"median {st['spread_pct'].median():.3g} %, {np.mean(st['spread_pct'] <= 5) * 100:.0f} "
            f"% of {len(st)} within 5 %", "n/a")
    if mni is not None and len(mni):
        proj = mni[mni["method"] == "project"].iloc[0]
        base = mni[mni["method"] != "project"].iloc[0]
        put("real MS FLAIR Dice", fmt(proj["dice"]), fmt(base["dice"]))
        put("real MS FLAIR lesion F1", fmt(proj["f1"]), fmt(base["f1"]))
    return pd.DataFrame(rows).T


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated subset of {', '.join(CASES)}")
    p.add_argument("--subjects", type=int, default=20, help="phantom subjects (default 20)")
    p.add_argument("--only", default=None, metavar="LABELS",
                   help="score only these phantom subjects (comma-separated labels, e.g. 01,02)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default="small", choices=("small", "clinical"))
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lesionlapse-bench-segmentation"))
    p.add_argument("--nprocs", type=int, default=2)
    p.add_argument("--pipeline-out", type=Path, default=None, metavar="DIR",
                   help="score existing pipeline derivatives of the same phantom instead of "
                        "running the CLI")
    p.add_argument("--no-resegment", dest="resegment", action="store_false",
                   help="score the pipeline's written FLAIR masks instead of segmenting the "
                        "pipeline's subject-space FLAIR again with the current code")
    p.add_argument("--baseline-z", type=float, default=2.0,
                   help="FLAIR global z-score threshold of the baseline (default 2.0)")
    p.add_argument("--config", type=Path, default=None, metavar="TOML",
                   help="overlay this TOML on configs/default.toml (parameter studies)")
    p.add_argument("--commit", default=None,
                   help="source commit to record when run from a git-archive export")
    p.add_argument("--out", type=Path,
                   default=REPO / "benchmarks" / "results" / "segmentation.md")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = set(cases) - set(CASES)
    if bad:
        p.error(f"unknown case(s) {sorted(bad)}; choose from {CASES}")
    config = load_config(args.config)
    machine = C.machine_info(args.commit)
    timings, ph, st, mni, lon, info, rdwi = {}, None, None, None, None, {}, None
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 30)
    if "real-mni" in cases:
        t0 = time.perf_counter()
        mni = real_mni(config, args.baseline_z)
        timings["real-mni"] = time.perf_counter() - t0
        print(mni.drop(columns=["tp_vox", "t_vox", "p_vox"]).round(3).to_string(index=False))
    if "real-long" in cases:
        t0 = time.perf_counter()
        lon = real_long(config, args.baseline_z)
        timings["real-long"] = time.perf_counter() - t0
        print(lon.round(3).to_string(index=False))
    if "real-dwi" in cases:
        t0 = time.perf_counter()
        rdwi = real_dwi(config)
        timings["real-dwi"] = time.perf_counter() - t0
        print(rdwi.round(3).to_string(index=False))
    if "phantom" in cases:
        t0 = time.perf_counter()
        ph, st, info = phantom(args, config)
        timings["phantom"] = time.perf_counter() - t0
        if len(ph):
            print(pooled(ph, ["preset", "kind", "method"]).round(3).to_string(index=False))
    table = summary(ph, st, mni)
    print(table.to_string())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(args, machine, timings, table, ph, st, mni, lon, info, rdwi))
    print(f"wrote {args.out}")
    return 0


def report(args, machine, timings, table, ph, st, mni, lon, info, rdwi=None) -> str:
    cmd = "python benchmarks/segmentation.py " + " ".join(sys.argv[1:])
    lines = [
        "# Segmentation benchmark", "",
        "Generated by `benchmarks/segmentation.py`; do not edit by hand.", "",
        "Command:", "", "```", cmd.strip(), "```", "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in machine.items()), "",
        "Timings: " + "; ".join(f"{k} {v:.0f} s" for k, v in timings.items()), "",
        (f"Baselines: FLAIR global z-score > {args.baseline_z:g} inside the brain mask; "
        f"ADC < {ADC_BASELINE_UM2_S:g} um^2/s inside the brain mask; both drop components "
        "below `segmentation.min_lesion_volume_mm3`."), "",
        "## Summary", "", C.markdown(table.rename_axis("metric")), "",
    ]
    if mni is not None:
        lines += ["## Real MS FLAIR (ms_flair_mni, consensus of 3 raters)", "",
                  ("Brain = FLAIR > 0 (skull-stripped); no ADC. Lesion-wise detection: "
                  "26-connected components, >= 1 voxel overlap."), "",
                  C.markdown(mni.drop(columns=["tp_vox", "t_vox", "p_vox"]), index=False), ""]
    if lon is not None:
        lines += ["## Real MS change (ms_flair_longitudinal)", "",
                  ("Both raw FLAIRs bias-corrected as the pipeline's prep_flair node does (its "
                   "brain mask, N4 with the [preprocessing] settings), resampled into the common "
                   "space with the reference affines, segmented inside the data set's brain mask "
                   "(brain_mask 'data set') and, the project, inside the pipeline's own brain "
                   "mask of each raw FLAIR (brain_mask 'pipeline': what a user gets); "
                  "predicted change = lesion at exactly one of the two time points (the manual "
                  "mask covers appearing and regressing voxels); the missed truth change is split "
                  "into voxels called lesion at both time points (missed_both_ml) and at neither "
                  "(missed_neither_ml)."), "",
                  C.markdown(lon, index=False), ""]
    if rdwi is not None:
        lines += ["## Real healthy DWI (dwi_philips_real): false positives", "",
                  ("A volunteer without lesions (12 volumes at b = 1000 s/mm^2, 2 mm, a 64 mm "
                   "slab): every restricted voxel is a false positive. trace / ADC as the "
                   "pipeline computes them, brain = the pipeline's brain mask of the mean b0, "
                   "native grid; no FLAIR, so the NAWM reference is the eroded brain's ADC mode "
                   "(`healthy_dwi_masks`); the second project row takes the NAWM a session "
                   "without FLAIR gets in the pipeline (its b0's darkest deep tissue), i.e. what "
                   "a user of a DWI-only session gets. b0 and trace bias-corrected as `prep_dwi` "
                   "does (`[preprocessing] dwi_bias_correct`). dwi_bright_not_restricted_ml: "
                   "DWI ratio above `dwi_hyperintense_ratio` with rADC not restricted, anywhere "
                   "in the brain; shine_through_ml: what the pipeline reports, those voxels "
                   "inside the FLAIR lesions (`[dynamics] shine_through_in_flair_lesion`): 0 "
                   "with a lesion-free FLAIR, n/a without FLAIR."), "",
                  C.markdown(rdwi, index=False), ""]
    if ph is not None and len(ph):
        presets = ", ".join(f"{k}: {v}" for k, v in info["presets"].items())
        lines += ["## Phantom", "",
                  f"`lesionlapse simulate --preset mixed --subjects {args.subjects} --seed "
                  f"{args.seed} --grid {args.grid}`, scored: {presets}; the pipeline's subject-space "
                  "images and masks mapped into the truth space (nearest neighbour). FLAIR "
                  + ("segmented again from the pipeline's subject-space FLAIR with the current "
                     "code." if args.resegment else "masks as the pipeline wrote them.")
                  + (f" Pipeline run: {sum(info['pipeline seconds'].values()):.0f} s for "
                     f"{len(info['pipeline seconds'])} subject(s)."
                     if "pipeline seconds" in info else ""), ""]
        if info.get("failed"):
            lines += ["Not scored: " + "; ".join(info["failed"]), ""]
        lines += [("Pooled per preset (Dice over pooled voxels of sessions with lesions; means "
                  "over those sessions; false positives = predicted volume outside the truth "
                  "per session, mL):"), "",
                  C.markdown(pooled(ph, ["preset", "kind", "method"]), index=False), "",
                  "Per session (lesion subjects, mean over subjects):", "",
                  C.markdown(pooled(ph, ["preset", "session", "kind", "method"]), index=False),
                  ""]
    if st is not None and len(st):
        lines += ["Unchanged truth lesions (project FLAIR), volume spread over sessions:", "",
                  C.markdown(st.describe().T[["count", "mean", "50%", "max"]]), ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
