"""Write a phantom BIDS dataset with its complete ground truth.

Layout (``sub-XX``, ``ses-YY``; see ``pipeline/simulate/README.md`` for every file)::

    OUT/dataset_description.json, README, participants.tsv/.json
    OUT/sub-XX/sub-XX_sessions.tsv                     session_id, acq_time
    OUT/sub-XX/ses-YY/anat/sub-XX_ses-YY_FLAIR.nii.gz  (+ .json)
    OUT/sub-XX/ses-YY/dwi/sub-XX_ses-YY_dwi.nii.gz     (+ .bval, .bvec, .json)
    OUT/sub-XX/ses-YY/dwi/sub-XX_ses-YY_ADC.nii.gz     scanner ADC, unit varies by subject
    OUT/derivatives/truth/...                          ground truth (BIDS derivative)

Transform convention (ITK/fMRIPrep): ``from-truth_to-FLAIR_mode-image_xfm.txt`` is the ITK
transform that resamples an image in truth space onto the FLAIR grid; as a point map it takes
a point of the FLAIR (scanner) physical space, LPS mm, to the truth space.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from pipeline import __version__
from pipeline.config import Config, load_config
from pipeline.core import dynamics
from pipeline.core.columns import (
    EVENT_COLUMNS,
    LESION_COLUMNS,
    LESION_SUMMARY_COLUMNS,
    SESSION_COLUMNS,
)
from pipeline.core.tracking import track_lesions
from pipeline.simulate import acquisition as acq
from pipeline.simulate.anatomy import subject_anatomy
from pipeline.simulate.geometry import euler_transform, random_rigid, ras_affine, to_sitk
from pipeline.simulate.lesions import LESION_MODELS
from pipeline.simulate.writer import (
    write_json,
    write_nifti,
    write_text,
    write_transform,
    write_tsv,
)

#: Cohorts: the lesion model of subject 1, 2, ... (cycled).
PRESETS: dict[str, tuple[str, ...]] = {
    "seed-case": ("seed-case",),
    "control": ("control",),
    "ms-like": ("ms-like",),
    "mixed": ("seed-case", "ms-like", "control"),
    "sample": ("seed-case", "control"),
}
DEFAULT_DAYS = (0.0, 3.0, 8.0, 45.0)
MAX_POSE_DEG, MAX_POSE_MM = 10.0, 10.0
MAX_FLAIR_DWI_DEG, MAX_FLAIR_DWI_MM = 2.0, 2.0
WM_ADC_TEXTURE = 0.03  # smooth +-3 % variation of normal WM ADC
NAWM_MIN_WM = 0.9


def _label(i: int) -> str:
    return f"{i:02d}"


def _ml(anat_affine: np.ndarray) -> float:
    return float(abs(np.linalg.det(anat_affine[:3, :3]))) / 1000.0


def _nawm(anatomy, lesion_any: np.ndarray, margin_mm: float) -> np.ndarray:
    far = ndimage.distance_transform_edt(~lesion_any) * anatomy.spacing >= margin_mm
    return (anatomy.wm >= NAWM_MIN_WM) & far


def simulate_dataset(
    out_dir: Path | str,
    *,
    preset: str = "seed-case",
    n_subjects: int = 1,
    seed: int = 0,
    grid: str = "clinical",
    days: tuple[float, ...] | None = None,
    config: Config | None = None,
    epi_distortion_mm: float = 0.0,
) -> list[str]:
    """Write a phantom BIDS dataset and its ground truth into ``out_dir``.

    Parameters
    ----------
    out_dir : path
        Output directory; must not exist or be empty.
    preset : str
        One of :data:`PRESETS`: ``seed-case``, ``control``, ``ms-like``, ``mixed`` (cycling
        seed-case, ms-like, control) or ``sample`` (seed-case, control: the sample_data).
    n_subjects : int
        Number of subjects (labels 01, 02, ...).
    seed : int
        Random seed; the same seed writes byte-identical files.
    grid : {"clinical", "small"}
        Native grids and truth grid (1 mm or 2 mm).
    days : tuple of float, optional
        Session days (strictly increasing, first 0); default 0, 3, 8, 45.
    config : Config, optional
        Pipeline configuration whose thresholds define the truth masks; default
        :func:`pipeline.config.load_config`.
    epi_distortion_mm : float
        Largest EPI-like shift of the DWI along its phase-encode axis (mm); 0 (default) = none.
        The shift of each session is written to the truth as ``*_desc-epishift_dwimap`` and the
        DWI truth masks follow it; the truth transforms stay the rigid poses.

    Returns
    -------
    list of str
        Subject labels written (without ``sub-``).

    Raises
    ------
    ValueError
        On a non-empty ``out_dir``, an unknown preset or grid, or invalid days.
    """
    out = Path(out_dir)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if grid not in acq.GRIDS:
        raise ValueError(f"unknown grid {grid!r}; choose one of {sorted(acq.GRIDS)}")
    if n_subjects < 1:
        raise ValueError("n_subjects must be at least 1")
    if not 0.0 <= epi_distortion_mm <= 10.0:
        raise ValueError(f"epi_distortion_mm must be within 0-10 mm, got {epi_distortion_mm}")
    days = tuple(float(d) for d in (DEFAULT_DAYS if days is None else days))
    if not days or days[0] != 0 or np.any(np.diff(days) <= 0):
        raise ValueError(f"days must start at 0 and increase strictly, got {days}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output directory {out} exists and is not empty; refusing to overwrite")
    config = config or load_config()
    out.mkdir(parents=True, exist_ok=True)
    models = PRESETS[preset]
    labels = [_label(i + 1) for i in range(n_subjects)]
    rows = []
    for i, sub in enumerate(labels):
        model = models[i % len(models)]
        unit = acq.ADC_UNITS[i % len(acq.ADC_UNITS)]
        _simulate_subject(out, sub, model, unit, seed, i, grid, days, config, epi_distortion_mm)
        rows.append({"participant_id": f"sub-{sub}", "group": model})
    _write_dataset_files(out, preset, seed, grid, days, pd.DataFrame(rows))
    return labels


def _write_dataset_files(out, preset, seed, grid, days, participants) -> None:
    generated = [{"Name": "lesionlapse simulate", "Version": __version__}]
    write_json(out / "dataset_description.json", {
        "Name": f"lesionlapse phantom ({preset}, grid {grid}, seed {seed})",
        "BIDSVersion": "1.10.0",
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["lesionlapse developers"],
        "GeneratedBy": generated,
    })
    write_text(out / "README", (
        f"Synthetic serial brain MRI made by `lesionlapse simulate --preset {preset} "
        f"--grid {grid} --seed {seed}` (sessions at days {list(days)}).\n"
        "Anatomy from the MNI152 2009a tissue maps shipped with nilearn. Ground truth in "
        "derivatives/truth.\n"
    ))
    write_tsv(out / "participants.tsv", participants)
    write_json(out / "participants.json", {
        "participant_id": {"Description": "Subject label"},
        "group": {"Description": "Phantom lesion model",
                  "Levels": {"seed-case": "daratumumab leukoencephalopathy (seed case)",
                             "ms-like": "MS-like FLAIR lesions", "control": "no lesions"}},
    })
    truth = out / "derivatives" / "truth"
    write_json(truth / "dataset_description.json", {
        "Name": "lesionlapse phantom ground truth",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": generated,
        "SourceDatasets": [{"URL": "bids::"}],
    })


def _sidecars(grid: str) -> dict[str, dict]:
    common = {"Manufacturer": "lesionlapse phantom", "MagneticFieldStrength": 3.0,
              "MRAcquisitionType": "2D"}
    flair_sp = acq.GRIDS[grid]["flair"][1]
    dwi_sp = acq.GRIDS[grid]["dwi"][1]
    dwi = {**common, "RepetitionTime": 5.0, "EchoTime": 0.08, "SliceThickness": dwi_sp[2],
           "PhaseEncodingDirection": "j", "TotalReadoutTime": 0.05}
    return {
        "flair": {**common, "RepetitionTime": 9.0, "EchoTime": 0.12, "InversionTime": 2.5,
                  "SliceThickness": flair_sp[2]},
        "dwi": dwi,
        "adc": {**dwi, "ImageType": ["DERIVED", "PRIMARY", "ADC"]},
    }


def _simulate_subject(
    out: Path, sub: str, model: str, unit: str, seed: int, index: int, grid: str,
    days: tuple[float, ...], config: Config, epi_distortion_mm: float = 0.0,
) -> None:
    streams = np.random.SeedSequence([seed, index]).spawn(5)
    rng_anat, rng_les, rng_pose, rng_acq, rng_misc = (np.random.default_rng(s) for s in streams)
    anatomy = subject_anatomy(grid, rng_anat)
    affine = anatomy.affine
    texture = ndimage.gaussian_filter(
        rng_anat.standard_normal(anatomy.shape).astype(np.float32), 5.0 / anatomy.spacing
    )
    texture = (1.0 + WM_ADC_TEXTURE * texture / max(float(texture.std()), 1e-6)).astype(
        np.float32
    )
    lesions = LESION_MODELS[model](anatomy, rng_les)
    vox_ml = _ml(affine)
    ref_img = to_sitk(anatomy.wm, affine)
    centroid = np.asarray(np.nonzero(anatomy.brain), float).mean(axis=1)
    center_lps = np.asarray(ref_img.TransformContinuousIndexToPhysicalPoint(
        [float(c) for c in centroid]))
    dyn, seg = config.dynamics, config.segmentation
    sessions = [_label(k + 1) for k in range(len(days))]
    base = dt.datetime(2024, 1, 8, 8, 0, 0) + dt.timedelta(
        days=int(rng_misc.integers(0, 300)), minutes=int(rng_misc.integers(0, 600)))
    sidecars = _sidecars(grid)
    n_dir = acq.GRIDS[grid]["n_directions"]
    truth_root = out / "derivatives" / "truth" / f"sub-{sub}"

    flair_masks, restricted_masks, adcs, radcs, poses_meta, rows = [], [], [], [], [], []
    shine_masks: list[np.ndarray] = []
    poses = []
    ever = np.zeros(anatomy.shape, bool)
    for k, (ses, day) in enumerate(zip(sessions, days)):
        state = lesions.state(day, k, len(days))
        truth = acq.truth_images(anatomy, state, texture)
        flair_mask = state.flair_mask(anatomy)
        affected = flair_mask | (state.radc < 0.98) | (state.t2 > 0.05)
        nawm = _nawm(anatomy, affected, dyn.nawm_lesion_margin_mm)
        ref = dynamics.reference_adc(truth.adc_um2_s, nawm)
        radc = dynamics.relative_adc(truth.adc_um2_s, ref.median_um2_s)
        dwi_ratio = truth.dwi / np.float32(np.median(truth.dwi[nawm]))
        restricted, shine = dynamics.diffusion_classes(
            dwi_ratio, radc, dyn.restricted_below, seg.dwi_hyperintense_ratio)
        ever |= restricted
        row = {"session": ses, "day": day}
        row.update(dynamics.session_summary(
            flair_lesion=flair_mask, restricted=restricted, shine_through=shine,
            ever_restricted=ever, adc_um2_s=truth.adc_um2_s, radc=radc, reference=ref,
            voxel_volume_ml=vox_ml, restricted_below=dyn.restricted_below,
            elevated_above=dyn.elevated_above, core_depth_mm=dyn.radc_core_depth_mm,
            spacing_mm=(anatomy.spacing,) * 3))
        rows.append(row)
        flair_masks.append(flair_mask)
        restricted_masks.append(restricted)
        shine_masks.append(shine)
        adcs.append(truth.adc_um2_s)
        radcs.append(radc)

        # --- acquisition -------------------------------------------------------------------
        rot, trans = random_rigid(rng_pose, MAX_POSE_DEG, MAX_POSE_MM)
        drot, dtrans = random_rigid(rng_pose, MAX_FLAIR_DWI_DEG, MAX_FLAIR_DWI_MM)
        # DWI point -> FLAIR-scanner point (delta) -> truth point (session pose)
        rot_dwi, trans_dwi = rot @ drot, rot @ dtrans + trans
        pose_flair = acq.Pose(euler_transform(rot, trans, center_lps),
                              acq.native_grid("flair", grid, center_lps, rng_pose))
        dwi_grid = acq.native_grid("dwi", grid, center_lps, rng_pose)
        shift = None
        if epi_distortion_mm > 0:  # own random stream: the undistorted phantom stays the same
            shift = acq.epi_shift(dwi_grid, epi_distortion_mm,
                                  np.random.default_rng([seed, index, k, 7]))
        pose_dwi = acq.Pose(euler_transform(rot_dwi, trans_dwi, center_lps), dwi_grid, shift)
        poses.append((pose_flair, pose_dwi))
        flair = acq.acquire_flair(truth, affine, pose_flair, rng_acq)
        dwi, bvals, bvecs = acq.acquire_dwi(truth, affine, pose_dwi, n_dir, rng_acq)
        adc = acq.scanner_adc(dwi, bvals, unit)
        aff_f, aff_d = ras_affine(pose_flair.grid), ras_affine(pose_dwi.grid)
        prefix = f"sub-{sub}_ses-{ses}"
        sdir = out / f"sub-{sub}" / f"ses-{ses}"
        write_nifti(sdir / "anat" / f"{prefix}_FLAIR.nii.gz", flair, aff_f)
        write_json(sdir / "anat" / f"{prefix}_FLAIR.json", sidecars["flair"])
        write_nifti(sdir / "dwi" / f"{prefix}_dwi.nii.gz", dwi, aff_d)
        write_text(sdir / "dwi" / f"{prefix}_dwi.bval", " ".join(f"{b:g}" for b in bvals) + "\n")
        write_text(sdir / "dwi" / f"{prefix}_dwi.bvec", "".join(
            " ".join(f"{v:.6f}" for v in r) + "\n" for r in bvecs))
        write_json(sdir / "dwi" / f"{prefix}_dwi.json", sidecars["dwi"])
        write_nifti(sdir / "dwi" / f"{prefix}_ADC.nii.gz", adc, aff_d)
        write_json(sdir / "dwi" / f"{prefix}_ADC.json", sidecars["adc"])
        tdir = truth_root / f"ses-{ses}"
        write_transform(tdir / "anat" / f"{prefix}_from-truth_to-FLAIR_mode-image_xfm.txt",
                        pose_flair.transform)
        write_transform(tdir / "dwi" / f"{prefix}_from-truth_to-DWI_mode-image_xfm.txt",
                        pose_dwi.transform)
        write_nifti(tdir / "anat" / f"{prefix}_desc-brain_mask.nii.gz",
                    acq.native_mask(anatomy.brain, affine, pose_flair).astype(np.uint8), aff_f)
        write_nifti(tdir / "dwi" / f"{prefix}_desc-brain_mask.nii.gz",
                    acq.native_mask(anatomy.brain, affine, pose_dwi).astype(np.uint8), aff_d)
        if shift is not None:
            write_nifti(tdir / "dwi" / f"{prefix}_desc-epishift_dwimap.nii.gz", shift, aff_d)
        write_nifti(tdir / "dwi" / f"{prefix}_space-truth_desc-true_rADC.nii.gz",
                    np.rint(np.nan_to_num(radc, nan=0.0) * 1000).astype(np.int16), affine,
                    slope=0.001)
        poses_meta.append({
            "session": ses, "day": day,
            "acq_time": (base + dt.timedelta(days=day)).isoformat(timespec="seconds"),
            "flair_rotation_deg": float(np.rad2deg(np.arccos(np.clip((np.trace(rot) - 1) / 2,
                                                                     -1, 1)))),
            "flair_translation_mm": float(np.linalg.norm(trans)),
            "flair_to_dwi_rotation_deg": float(np.rad2deg(np.arccos(np.clip(
                (np.trace(drot) - 1) / 2, -1, 1)))),
            "flair_to_dwi_translation_mm": float(np.linalg.norm(dtrans)),
            "reference_adc_um2_s": ref.median_um2_s,
        })
        if shift is not None:
            poses_meta[-1]["dwi_epi_max_shift_mm"] = float(np.abs(shift).max())

    write_tsv(out / f"sub-{sub}" / f"sub-{sub}_sessions.tsv", pd.DataFrame({
        "session_id": [f"ses-{s}" for s in sessions],
        "acq_time": [p["acq_time"] for p in poses_meta],
    }))

    # --- lesion identities, events and per-lesion tables (core functions on the truth) ---
    trk = config.tracking
    lesion_tables, event_tables = [], []
    for kind, masks in (("flair", flair_masks), ("restricted", restricted_masks)):
        result = track_lesions(
            masks, days, connectivity=trk.connectivity,
            min_overlap_voxels=trk.min_overlap_voxels,
            shift_tolerance_voxels=trk.shift_tolerance_voxels,
            enlarging_relative=trk.enlarging_relative,
            enlarging_absolute_ml=trk.enlarging_absolute_ml,
            fragment_ratio=trk.fragment_ratio, voxel_volume_ml=vox_ml, sessions=sessions)
        ev = result.events.copy()
        ev.insert(1, "kind", kind)
        event_tables.append(ev)
        lesion_tables.append(dynamics.lesion_table(
            result.dseg, kind=kind, adc_um2_s=adcs, radc=radcs, restricted=restricted_masks,
            shine_through=shine_masks, days=days, sessions=sessions, voxel_volume_ml=vox_ml,
            restricted_below=dyn.restricted_below, elevated_above=dyn.elevated_above,
            core_depth_mm=dyn.radc_core_depth_mm, spacing_mm=(anatomy.spacing,) * 3))
        folder = "anat" if kind == "flair" else "dwi"
        for k, ses in enumerate(sessions):
            prefix = f"sub-{sub}_ses-{ses}"
            tdir = truth_root / f"ses-{ses}" / folder
            pose = poses[k][0 if kind == "flair" else 1]
            aff_n = ras_affine(pose.grid)
            native = acq.native_mask(masks[k], affine, pose)
            write_nifti(tdir / f"{prefix}_label-lesion_desc-{kind}_mask.nii.gz",
                        native.astype(np.uint8), aff_n)
            write_nifti(tdir / f"{prefix}_space-truth_label-lesion_desc-{kind}_mask.nii.gz",
                        masks[k].astype(np.uint8), affine)
            write_nifti(tdir / f"{prefix}_desc-{kind}lesions_dseg.nii.gz",
                        acq.native_labels(result.dseg[k], native, affine, pose), aff_n)
            write_nifti(tdir / f"{prefix}_space-truth_desc-{kind}lesions_dseg.nii.gz",
                        result.dseg[k].astype(np.int16), affine)

    sessions_df = pd.DataFrame(rows, columns=list(SESSION_COLUMNS))
    write_tsv(truth_root / f"sub-{sub}_desc-sessions_timeseries.tsv", sessions_df)
    write_json(truth_root / f"sub-{sub}_desc-sessions_timeseries.json", SESSION_COLUMNS)
    lesion_df = pd.concat(lesion_tables, ignore_index=True)
    write_tsv(truth_root / f"sub-{sub}_desc-lesions_timeseries.tsv", lesion_df)
    write_json(truth_root / f"sub-{sub}_desc-lesions_timeseries.json", LESION_COLUMNS)
    summary = dynamics.lesion_summary(lesion_df, cutoff=dyn.restricted_below)
    write_tsv(truth_root / f"sub-{sub}_desc-lesions_summary.tsv", summary)
    write_json(truth_root / f"sub-{sub}_desc-lesions_summary.json", LESION_SUMMARY_COLUMNS)
    events = pd.concat(event_tables, ignore_index=True)
    write_tsv(truth_root / f"sub-{sub}_desc-events.tsv", events)
    write_json(truth_root / f"sub-{sub}_desc-events.json",
               {**EVENT_COLUMNS, "kind": LESION_COLUMNS["kind"]})
    adir = truth_root / "anat"
    for name in ("gm", "wm", "csf"):
        write_nifti(adir / f"sub-{sub}_space-truth_label-{name.upper()}_probseg.nii.gz",
                    np.rint(getattr(anatomy, name) * 250).astype(np.uint8), affine, slope=0.004)
    write_nifti(adir / f"sub-{sub}_space-truth_desc-brain_mask.nii.gz",
                anatomy.brain.astype(np.uint8), affine)
    write_json(truth_root / f"sub-{sub}_desc-simulation.json", {
        "subject": sub, "preset": model, "seed": seed, "subject_index": index, "grid": grid,
        "adc_unit": unit,
        "adc_unit_meaning": {"mm2_s": "mm^2/s (float)", "1e-3mm2_s": "1e-3 mm^2/s (float)",
                             "um2_s": "1e-6 mm^2/s (integer)"}[unit],
        "days": list(days), "sessions": poses_meta,
        "truth_voxel_mm": anatomy.spacing,
        "tissue_adc_um2_s": acq.ADC_UM2_S,
        "flair_snr_wm": acq.FLAIR_SNR, "dwi_b1000_snr_wm": acq.DWI_B1000_SNR,
        "thresholds": {"restricted_below": dyn.restricted_below,
                       "dwi_hyperintense_ratio": seg.dwi_hyperintense_ratio,
                       "flair_mask": "lesion FLAIR signal >= 50% of plateau and WM fraction >= 0.5"},
        "designed_lesions": list(getattr(lesions, "design", ())),
        "transform_convention": (
            "from-truth_to-X_mode-image_xfm.txt resamples a truth-space image onto grid X; as a "
            "point map it takes X's physical points (LPS mm) to truth space"),
    })
    json.dumps(poses_meta)  # fail early on anything unserialisable
