"""Load one session: FLAIR, DWI (4D with bval/bvec, scanner trace) and ADC, in canonical units.

Sessions may lack a contrast (FLAIR-only, DWI/ADC-only). :class:`LoadSession` then writes
all-NaN placeholder images for the missing contrast on the grid of the present one, and marks
them in its report (``missing``), so that every per-session list of the subject workflow keeps
one entry per session. :class:`pipeline.interfaces.segmentation.SegmentSessions` segments such
subjects: placeholder contrasts yield empty lesion masks, an all-NaN rADC and a NaN NAWM
reference (n/a in tables).
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from pipeline.bids import read_json
from pipeline.core import dwi as core_dwi
from pipeline.interfaces.base import array, like, out_path, read, save, save_json
from pipeline.io import InputError, load_series, load_volume, nib_to_sitk, read_bvals_bvecs


class _LoadSessionInputSpec(BaseInterfaceInputSpec):
    flair = File(exists=True, desc="FLAIR image")
    dwi = File(exists=True, desc="4D DWI series")
    bval = File(exists=True, desc="b-values of the DWI series")
    bvec = File(exists=True, desc="b-vectors of the DWI series")
    adc = File(exists=True, desc="scanner ADC map")
    trace = File(exists=True, desc="scanner trace-weighted DWI")
    trace_sidecar = File(exists=True, desc="JSON sidecar of the trace image")
    params = traits.Dict(mandatory=True, desc="the [inputs] section of the configuration")


class _LoadSessionOutputSpec(TraitedSpec):
    flair = File(desc="FLAIR, float32, native grid")
    b0 = File(desc="mean b0 (or S0 reconstructed from trace and ADC), native DWI grid")
    trace = File(desc="trace-weighted DWI at the highest b-value, native DWI grid")
    adc = File(desc="ADC in um^2/s, native DWI grid")
    report = File(desc="JSON: sources, ADC unit detection, warnings, computed-vs-scanner ADC")
    identity_xfm = File(desc="identity ITK transform (DWI->FLAIR of a single-contrast session)")
    skipped_qc = File(desc="JSON registration QC record of a registration not run")
    has_flair = traits.Bool(desc="the session has a FLAIR (else `flair` is an all-NaN placeholder)")
    has_dwi = traits.Bool(desc="the session has diffusion (else b0/trace/adc are placeholders)")


class LoadSession(SimpleInterface):
    """Validate and load a session's images; ADC in um^2/s with its unit detection reported."""

    input_spec = _LoadSessionInputSpec
    output_spec = _LoadSessionOutputSpec

    def _run_interface(self, runtime):
        p = self.inputs.params
        report: dict = {"warnings": []}
        ins = self.inputs
        if ins.flair:
            flair = load_volume(ins.flair, kind="FLAIR")
            report["warnings"] += flair.warnings
            report["flair_affine_source"] = flair.affine_source
            self._results["flair"] = save(flair.image, runtime, "flair.nii.gz")

        b0 = trace = computed_adc = ref = None
        b_value = None
        if ins.dwi:
            data, affine, source, warns = load_series(ins.dwi, kind="DWI")
            report["warnings"] += warns
            report["dwi_affine_source"] = source
            bvals, _ = read_bvals_bvecs(ins.bval or None, ins.bvec or None, data.shape[3], ins.dwi)
            try:
                b0 = core_dwi.mean_b0(data, bvals, p["b0_threshold_s_mm2"])
                trace, b_value = core_dwi.trace_dwi(
                    data, bvals, p["b0_threshold_s_mm2"], shell_tolerance=p["shell_tolerance"]
                )
            except ValueError as exc:
                raise InputError(f"{ins.dwi}: {exc}") from None
            ref = nib_to_sitk(b0, affine)
            b0, trace = ref, like(array(nib_to_sitk(trace, affine)), ref)
            computed_adc = core_dwi.adc_from_signals(
                array(b0), array(trace), b_value, adc_max_um2_s=p["adc_max_um2_s"]
            )
            report["dwi_b_value_s_mm2"] = b_value
            report["dwi_volumes"] = int(data.shape[3])
        elif ins.trace:
            loaded = load_volume(ins.trace, kind="trace DWI")
            report["warnings"] += loaded.warnings
            trace = ref = loaded.image
            sidecar = read_json(ins.trace_sidecar) if ins.trace_sidecar else {}
            b_value = float(sidecar.get("DiffusionBValue", sidecar.get("bValue", p["trace_b_value_s_mm2"])))
            report["dwi_b_value_s_mm2"] = b_value
            report["trace_b_value_source"] = "sidecar" if "DiffusionBValue" in sidecar or "bValue" in sidecar else "config"

        adc = None
        if ins.adc:
            loaded = load_volume(ins.adc, kind="ADC")
            report["warnings"] += loaded.warnings
            values = array(loaded.image)
            if p["adc_unit"] == "auto":
                unit, _, why = core_dwi.detect_adc_unit(
                    values[values > 0], p["adc_plausible_min_um2_s"], p["adc_plausible_max_um2_s"]
                )
                report["adc_unit_detection"] = why
            else:
                unit = p["adc_unit"]
                report["adc_unit_detection"] = f"unit set by configuration inputs.adc_unit = {unit!r}"
            converted, n_negative = core_dwi.convert_adc(values, unit)
            if n_negative:
                report["warnings"].append(f"{ins.adc}: {n_negative} negative ADC voxels set to 0")
            report["adc_unit"] = unit
            report["adc_source"] = "scanner"
            if ref is None:
                ref = loaded.image
            elif loaded.image.GetSize() != ref.GetSize():
                raise InputError(
                    f"{ins.adc}: the ADC map's grid {loaded.image.GetSize()} differs from the DWI "
                    f"grid {ref.GetSize()}; export the ADC map that belongs to this DWI series"
                )
            adc = converted
            if computed_adc is not None:
                report["computed_vs_scanner_adc"] = _compare(computed_adc, adc, p["adc_max_um2_s"])
        elif computed_adc is not None:
            adc = computed_adc
            report["adc_source"] = "computed"

        if adc is not None:
            self._results["adc"] = save(like(adc.astype(np.float32), ref), runtime, "adc.nii.gz")
        if trace is not None:
            self._results["trace"] = save(like(array(trace), ref), runtime, "trace.nii.gz")
            if b0 is None and adc is not None:
                # S0 from the monoexponential model when the export has no b0 (trace + ADC only)
                s0 = array(trace) * np.exp(b_value * adc * 1e-6)
                b0 = like(s0.astype(np.float32), ref)
                report["b0_source"] = "reconstructed from trace and ADC"
        elif adc is not None:
            report["warnings"].append("no DWI or trace image: restricted diffusion uses ADC only")
        if b0 is not None:
            self._results["b0"] = save(b0, runtime, "b0.nii.gz")
        self._placeholders(runtime, report)
        self._results["report"] = save_json(report, runtime, "load_report.json")
        return runtime

    def _placeholders(self, runtime, report: dict) -> None:
        """All-NaN images for a missing contrast, on the grid of the present one."""
        res = self._results
        has_flair = "flair" in res
        has_dwi = all(k in res for k in ("b0", "trace", "adc"))
        if not has_flair and not has_dwi:
            raise InputError(
                f"{self.inputs.dwi or self.inputs.trace or self.inputs.adc or 'session'}: no "
                "FLAIR and no usable diffusion (4D DWI, or trace with ADC): nothing to process"
            )
        missing = []
        if not has_flair:
            grid = read(res["b0"])
            res["flair"] = save(_nan_like(grid), runtime, "flair_missing.nii.gz")
            missing.append("FLAIR")
        if not has_dwi:
            grid = read(res["flair"])
            for name in ("b0", "trace", "adc"):
                res[name] = save(_nan_like(grid), runtime, f"{name}_missing.nii.gz")
            missing.append("DWI")
        report["missing"] = missing
        if missing:
            report["warnings"].append(
                f"no {' or '.join(missing)} in this session: all-NaN placeholder images stand in "
                "for it; its lesion masks are empty and its measures NaN"
            )
        res["has_flair"], res["has_dwi"] = has_flair, has_dwi
        path = out_path(runtime, "identity_xfm.txt")
        sitk.WriteTransform(sitk.Euler3DTransform(), path)
        res["identity_xfm"] = path
        res["skipped_qc"] = save_json(
            {"registration": "DWI to FLAIR not run: the session lacks "
             + ("FLAIR" if not has_flair else "DWI" if not has_dwi else "nothing"),
             "final_metric": None, "similarity_after": None, "rotation_deg": 0.0,
             "translation_mm": 0.0}, runtime, "skipped_qc.json")


def _nan_like(grid: sitk.Image) -> sitk.Image:
    img = sitk.Image(grid.GetSize(), sitk.sitkFloat32)
    img.CopyInformation(grid)
    return like(np.full(array(img).shape, np.nan, np.float32), grid)


def _compare(computed: np.ndarray, scanner: np.ndarray, adc_max_um2_s: float) -> dict:
    both = (computed > 0) & (scanner > 0) & (scanner < adc_max_um2_s)
    if not both.any():
        return {"n_voxels": 0}
    diff = computed[both] - scanner[both]
    ratio = float(np.median(computed[both]) / np.median(scanner[both]))
    return {
        "n_voxels": int(both.sum()),
        "median_difference_um2_s": float(np.median(diff)),
        "median_abs_difference_um2_s": float(np.median(np.abs(diff))),
        "median_ratio_computed_to_scanner": ratio if math.isfinite(ratio) else None,
    }
