"""Checking a subject's inputs before any work, with messages that name the file and the fix.

:func:`validate_subject` reads every input image completely (not only its header), so that a
truncated file, a 2D or 4D image of the wrong kind, NaN voxels in the head, a DWI without
usable b-values, an ADC map of unknown unit or a FLAIR and DWI that do not overlap are refused
before any registration starts. Nothing is written and no input file is changed; what is
repaired on the fly (background NaN set to 0, negative ADC clipped) is returned as warnings.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.bids import SAME_DAY_OFFSET_DAYS, SessionInputs, SubjectInputs, read_json
from pipeline.core import dwi as core_dwi
from pipeline.io import (
    InputError,
    head_mask,
    load_nifti,
    load_series,
    load_volume,
    read_bvals_bvecs,
)

#: Minimum overlap of the FLAIR and DWI fields of view, as a fraction of the smaller one.
MIN_FOV_OVERLAP = 0.05
#: An ADC map with more negative values than this fraction of its non-zero voxels is refused.
MAX_NEGATIVE_ADC_FRACTION = 0.1


def _world_box(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world bounding box (RAS, mm) of a voxel grid."""
    corners = np.array([[i, j, k] for i in (-0.5, shape[0] - 0.5) for j in (-0.5, shape[1] - 0.5)
                        for k in (-0.5, shape[2] - 0.5)])
    world = corners @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    return world.min(axis=0), world.max(axis=0)


def fov_overlap(affine_a, shape_a, affine_b, shape_b) -> float:
    """Overlap of two fields of view as a fraction of the smaller bounding box (0..1)."""
    lo_a, hi_a = _world_box(affine_a, shape_a)
    lo_b, hi_b = _world_box(affine_b, shape_b)
    inter = np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0, None).prod()
    smaller = min((hi_a - lo_a).prod(), (hi_b - lo_b).prod())
    return float(inter / smaller) if smaller > 0 else 0.0


def _run_config(config):
    """The run's configuration, or the default one when none is given."""
    if config is None:
        from pipeline.config import load_config

        config = load_config()
    return config


def check_session_files(ses: SessionInputs) -> None:
    """Refuse sessions whose set of files cannot be processed (before opening any image)."""
    where = f"sub-{ses.subject}/ses-{ses.session}"
    if ses.flair is None and not ses.has_diffusion:
        raise InputError(
            f"{where}: no FLAIR (anat/*_FLAIR.nii.gz), DWI (dwi/*_dwi.nii.gz), trace or ADC "
            "image found. Add the images or leave the session out with --session-label."
        )
    if ses.dwi is not None and (ses.bval is None or ses.bvec is None):
        missing = ".bval" if ses.bval is None else ".bvec"
        raise InputError(
            f"{ses.dwi}: the 4D DWI has no {missing} file beside it. Put the b-values/b-vectors "
            "from the conversion (dcm2niix writes them) next to the image with the same name."
        )
    if ses.dwi is None and ses.trace is not None and ses.adc is None:
        raise InputError(
            f"{ses.trace}: a scanner trace image without its ADC map (dwi/*_ADC.nii.gz) and "
            "without a 4D DWI. Add the scanner ADC map of the same series, or the 4D DWI with "
            "its .bval/.bvec."
        )
    if ses.dwi is None and ses.trace is None and ses.adc is not None:
        raise InputError(
            f"{ses.adc}: an ADC map without a trace-weighted DWI (dwi/*_trace.nii.gz) or a 4D "
            "DWI. Restricted diffusion needs both a bright DWI and a low ADC: add the trace "
            "image of the same series, or remove the ADC map to process the session as "
            "FLAIR-only."
        )


def _check_adc(path: Path, params: dict, warnings: list[str], *, detect_unit: bool) -> None:
    loaded = load_volume(path, kind="ADC")
    warnings += loaded.warnings
    import SimpleITK as sitk

    values = sitk.GetArrayViewFromImage(loaded.image)
    nonzero = values[values != 0]
    n_neg = int(np.count_nonzero(nonzero < 0))
    if nonzero.size and n_neg > MAX_NEGATIVE_ADC_FRACTION * nonzero.size:
        raise InputError(
            f"{path}: {n_neg} of {nonzero.size} non-zero ADC values are negative. An ADC map "
            "holds no negative values: this is probably not an ADC map, or its data type or "
            "scaling (scl_slope/scl_inter) is wrong. Export the ADC map again."
        )
    if n_neg:
        warnings.append(f"{path.name}: {n_neg} negative ADC voxels will be set to 0")
    if detect_unit and params["adc_unit"] == "auto":
        try:
            core_dwi.detect_adc_unit(values[values > 0], params["adc_plausible_min_um2_s"],
                                     params["adc_plausible_max_um2_s"])
        except core_dwi.AdcUnitError as exc:
            raise InputError(f"{path}: {exc}") from None


def _check_dwi(ses: SessionInputs, params: dict, warnings: list[str]):
    data, affine, _, warns = load_series(ses.dwi, kind="DWI")
    warnings += warns
    bvals, _ = read_bvals_bvecs(ses.bval, ses.bvec, data.shape[3], ses.dwi)
    thr = params["b0_threshold_s_mm2"]
    if not np.any(bvals <= thr):
        raise InputError(
            f"{ses.dwi}: no b0 volume in {ses.bval.name} (all b > {thr:g} s/mm^2: "
            f"{sorted(set(bvals.tolist()))}). lesionlapse needs a b0 and a b>0 shell: use the "
            "series exported with its b0, or set inputs.b0_threshold_s_mm2 if the scanner's "
            "'b0' has a small non-zero b-value."
        )
    if not np.any(bvals > thr):
        raise InputError(
            f"{ses.dwi}: no diffusion-weighted volume in {ses.bval.name} (all b <= {thr:g} "
            "s/mm^2). Export the full DWI series (b0 and b=1000), not only its b0 volumes."
        )
    try:
        core_dwi.trace_dwi(data[:2, :2, :2], bvals, thr, shell_tolerance=params["shell_tolerance"])
    except ValueError as exc:
        raise InputError(f"{ses.dwi}: {exc}") from None
    return affine, data.shape[:3]


def validate_session(ses: SessionInputs, params: dict, *, detect_unit: bool = True) -> list[str]:
    """Open and check every image of one session; return warnings, raise :class:`InputError`."""
    check_session_files(ses)
    warnings: list[str] = []
    grids: dict[str, tuple[np.ndarray, tuple[int, ...], Path]] = {}
    if ses.flair is not None:
        img = load_volume(ses.flair, kind="FLAIR")
        warnings += img.warnings
        nimg = load_nifti(ses.flair, kind="FLAIR", ndim=3)[0]
        grids["FLAIR"] = (nimg.affine, nimg.shape[:3], ses.flair)
    if ses.dwi is not None:
        affine, shape = _check_dwi(ses, params, warnings)
        grids["DWI"] = (affine, shape, ses.dwi)
    if ses.trace is not None:
        warnings += load_volume(ses.trace, kind="trace DWI").warnings
        nimg = load_nifti(ses.trace, kind="trace DWI", ndim=3)[0]
        grids.setdefault("DWI", (nimg.affine, nimg.shape[:3], ses.trace))
        if ses.trace_sidecar is not None:
            read_json(ses.trace_sidecar)
    if ses.adc is not None:
        _check_adc(ses.adc, params, warnings, detect_unit=detect_unit)
        nimg = load_nifti(ses.adc, kind="ADC", ndim=3)[0]
        if "DWI" in grids and tuple(nimg.shape[:3]) != tuple(grids["DWI"][1]):
            raise InputError(
                f"{ses.adc}: the ADC map's grid {tuple(nimg.shape[:3])} differs from the DWI grid "
                f"{tuple(grids['DWI'][1])} of {grids['DWI'][2].name}. Export the ADC map that "
                "belongs to this DWI series."
            )
    if "FLAIR" in grids and "DWI" in grids:
        (fa, fs, fp), (da, ds, dp) = grids["FLAIR"], grids["DWI"]
        overlap = fov_overlap(fa, fs, da, ds)
        if overlap < MIN_FOV_OVERLAP:
            raise InputError(
                f"{dp} and {fp} do not overlap in space ({overlap:.0%} of the smaller field of "
                "view is shared; the headers place them apart). They are probably from "
                "different patients or sessions, or one header's origin is wrong: check both "
                "files (e.g. overlay them in a viewer) and re-export the wrong one."
            )
    return [f"ses-{ses.session}: {w}" for w in warnings]


def validate_subject(subject: SubjectInputs, config=None) -> list[str]:
    """Check every input file of a subject before any work.

    Parameters
    ----------
    subject
        The subject's sessions, from :func:`pipeline.bids.discover`.
    config
        The run's configuration. ADC units are auto-detected (and an ambiguous ADC refused)
        only when it is given, so that a run with ``inputs.adc_unit`` set is not refused.

    Returns
    -------
    list of str
        Warnings (repairs made while loading, sessions on the same day, ...).

    Raises
    ------
    InputError
        Naming the file, what is wrong and what to do (the first session, in session order,
        with a bad input: the same error as checking the sessions one by one).

    The sessions are checked side by side on ``resources.nprocs`` threads: most of the time is
    spent decompressing and converting the images (zlib and numpy release the GIL), on one
    core before any node of the run can start.
    """
    run_config = _run_config(config)  # loaded once: the default config is read from disk
    params = run_config.to_dict()["inputs"]
    workers = max(1, min(len(subject.sessions), run_config.resources.nprocs))
    warnings: list[str] = []
    with ThreadPoolExecutor(workers) as pool:
        checks = [pool.submit(validate_session, ses, params, detect_unit=config is not None)
                  for ses in subject.sessions]
        try:
            for check in checks:  # in session order: the first bad session raises
                warnings += check.result()
        finally:
            for check in checks:  # a bad session: the sessions not yet started are not opened
                check.cancel()
    for a, b in zip(subject.sessions, subject.sessions[1:]):
        if b.day <= a.day:
            warnings.append(
                f"ses-{a.session} and ses-{b.session} are on the same day ({a.day:g}); "
                "tracking orders them by label and separates them by "
                f"{SAME_DAY_OFFSET_DAYS:g} day"
            )
    return warnings


__all__ = ["validate_subject", "validate_session", "check_session_files", "fov_overlap",
           "head_mask"]
