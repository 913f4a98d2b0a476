"""Masks back on the native grids, and the BIDS derivatives of one subject."""

from __future__ import annotations

import io
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import SimpleITK as sitk
from isal import isal_zlib
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from pipeline import __version__, software_versions
from pipeline.bids import derivative_name
from pipeline.core import columns, dynamics
from pipeline.core import registration as core_reg
from pipeline.interfaces.base import out_path, read
from pipeline.io import atomic_path, read_array, write_array

#: ISA-L compression level of the derivative .nii.gz files (0-3; 1: about as small as zlib's
#: level 1 at a sixth of its CPU, see _gzip_nifti; 0 is 34 % larger, 3 four times slower)
ISAL_LEVEL = 1
#: bytes read and compressed per call (see _gzip_nifti)
_GZIP_CHUNK = 1 << 22


class _NativeMasksInputSpec(BaseInterfaceInputSpec):
    flair_lesion = InputMultiObject(File(exists=True), mandatory=True, desc="subject space")
    restricted = InputMultiObject(File(exists=True), mandatory=True, desc="subject space")
    subject_xfms = InputMultiObject(File(exists=True), mandatory=True)
    dwi_to_flair = InputMultiObject(File(exists=True), mandatory=True)
    native_flair = InputMultiObject(File(exists=True), mandatory=True, desc="native FLAIR grids")
    native_dwi = InputMultiObject(File(exists=True), mandatory=True, desc="native DWI grids")


class _NativeMasksOutputSpec(TraitedSpec):
    flair_lesion = OutputMultiObject(File(), desc="FLAIR lesion masks on the native FLAIR grids")
    restricted = OutputMultiObject(File(), desc="restricted masks on the native DWI grids")


def _to_native(mask_file: str, grid_file: str, transforms: list[sitk.Transform], dst: str) -> str:
    """Resample a subject-space mask onto a native grid (linear, then >= 0.5: keeps volume)
    and write it (uint8) to ``dst``. (resample_to_reference interpolates a float32 copy.)"""
    frac = core_reg.resample_to_reference(read(mask_file), read(grid_file), transforms,
                                          interpolator="linear")
    return str(write_array(sitk.GetArrayViewFromImage(frac) >= 0.5, frac, Path(dst), np.uint8))


class NativeMasks(SimpleInterface):
    """Write the lesion masks back onto each session's native FLAIR and DWI grids."""

    input_spec = _NativeMasksInputSpec
    output_spec = _NativeMasksOutputSpec

    def _run_interface(self, runtime):
        ins = self.inputs
        flair_out, restricted_out = [], []
        for i, (xfm, d2f) in enumerate(zip(ins.subject_xfms, ins.dwi_to_flair)):
            # native point -> subject point: invert the chain; ITK order, last applied first
            to_subject = core_reg.invert_transform(sitk.ReadTransform(xfm))
            flair_to_dwi_inv = core_reg.invert_transform(sitk.ReadTransform(d2f))
            flair_out.append(_to_native(
                ins.flair_lesion[i], ins.native_flair[i], [to_subject],
                out_path(runtime, f"flair_lesion_native_{i:02d}.nii")))
            restricted_out.append(_to_native(
                ins.restricted[i], ins.native_dwi[i], [to_subject, flair_to_dwi_inv],
                out_path(runtime, f"restricted_native_{i:02d}.nii")))
        self._results["flair_lesion"] = flair_out
        self._results["restricted"] = restricted_out
        return runtime


class _CompressImagesInputSpec(BaseInterfaceInputSpec):
    in_files = InputMultiObject(File(exists=True), mandatory=True,
                                desc="uncompressed work-dir images (.nii)")
    part = traits.Int(0, usedefault=True, desc="compress the files i with i % parts == part")
    parts = traits.Int(1, usedefault=True, desc="nodes sharing in_files (one core each)")


class _CompressImagesOutputSpec(TraitedSpec):
    compressed = File(desc="JSON: each input image (resolved path) -> its .nii.gz copy")


class CompressImages(SimpleInterface):
    """Gzip work-dir images ahead of :class:`WriteDerivatives`, the same bytes it would write.

    The derivatives that do not depend on tracking (subject-space FLAIR, trace, ADC, rADC,
    brain and lesion masks) are compressed in workers ahead of it (the resampled images beside
    the segment node, its outputs beside the track node), instead of in the main process after
    it. ``parts`` nodes may share a list (one core each).
    """

    input_spec = _CompressImagesInputSpec
    output_spec = _CompressImagesOutputSpec

    def _run_interface(self, runtime):
        mapping = {}
        part, parts = self.inputs.part, self.inputs.parts
        if not 0 <= part < parts:
            raise ValueError(f"part {part} of {parts}: expected 0 <= part < parts")
        for i, src in enumerate(self.inputs.in_files):
            if i % parts != part:
                continue
            src = Path(src).resolve()
            if src.suffix != ".nii":
                raise ValueError(f"{src}: not an uncompressed NIfTI (.nii) work-dir image")
            dst = Path(out_path(runtime, f"{i:03d}_{src.name}.gz"))
            _gzip_nifti(src, dst)
            mapping[str(src)] = str(dst)
        self._results["compressed"] = out_path(runtime, "compressed.json")
        Path(self._results["compressed"]).write_text(json.dumps(mapping, indent=1))
        return runtime


_files = lambda desc: InputMultiObject(File(exists=True), mandatory=True, desc=desc)  # noqa: E731


class _SubjectFilesInputSpec(BaseInterfaceInputSpec):
    """What both the derivatives and the report are made from (the workflow hands the same
    files to the report, :func:`pipeline.reports.subject.write_work_report`)."""

    subject = traits.Str(mandatory=True)
    labels = traits.List(traits.Str, mandatory=True)
    day_source = traits.Str("sessions.tsv", usedefault=True)
    config = traits.Dict(mandatory=True)
    flair = _files("FLAIR, subject space")
    trace = _files("trace DWI, subject space")
    adc = _files("ADC (um^2/s), subject space")
    radc = _files("rADC, subject space")
    brain_mask = _files("brain masks, subject space")
    flair_lesion = _files("FLAIR lesion masks, subject space")
    restricted = _files("restricted masks, subject space")
    flair_dseg = _files("FLAIR lesion ids, subject space")
    restricted_dseg = _files("restricted lesion ids, subject space")
    diffusion_dseg = _files("diffusion voxel classes of the lesion tissue, subject space")
    subject_space_qc = File(exists=True, mandatory=True)
    dwi_to_flair_qc = _files("DWI -> FLAIR QC JSONs")
    load_reports = _files("loading reports")
    sessions_table = File(exists=True, mandatory=True)
    lesions_table = File(exists=True, mandatory=True)
    events_table = File(exists=True, mandatory=True)
    lineage_table = File(exists=True, mandatory=True)
    summary_table = File(exists=True, mandatory=True)


class _WriteDerivativesInputSpec(_SubjectFilesInputSpec):
    out_dir = traits.Str(mandatory=True, desc="staging folder of this subject's derivatives")
    days = traits.List(traits.Float, mandatory=True)
    n_threads = traits.Int(1, usedefault=True, desc="threads compressing the images")
    shine_through = _files("T2 shine-through masks, subject space")
    native_flair_lesion = _files("FLAIR lesion masks, native FLAIR grid")
    native_restricted = _files("restricted masks, native DWI grid")
    subject_xfms = _files("session FLAIR -> subject transforms")
    dwi_to_flair = _files("DWI -> FLAIR transforms")
    compressed = InputMultiObject(File(exists=True),
                                  desc="CompressImages' JSONs: images already gzipped (copied)")


# input field -> (datatype, suffix, desc, label) of its subject-space derivative, one per session
SUBJECT_SPACE_IMAGES = {
    "flair": ("anat", "FLAIR", "preproc", None),
    "trace": ("dwi", "dwi", "trace", None),
    "adc": ("dwi", "ADC", None, None),
    "radc": ("dwi", "ADC", "relative", None),
    "brain_mask": ("anat", "mask", "brain", None),
    "flair_lesion": ("anat", "mask", "flair", "lesion"),
    "restricted": ("dwi", "mask", "restricted", "lesion"),
    "shine_through": ("dwi", "mask", "dwi", "shinethrough"),
    "flair_dseg": ("anat", "dseg", "flair", None),
    "restricted_dseg": ("dwi", "dseg", "restricted", None),
    "diffusion_dseg": ("dwi", "dseg", "diffusionclass", None),
}


def subject_space_derivative(subject: str, session: str, field: str) -> str:
    """Path, relative to OUTPUT_DIR, of the derivative :class:`WriteDerivatives` writes from
    the input ``field`` (see :data:`SUBJECT_SPACE_IMAGES`) of one session."""
    datatype, suffix, desc, label = SUBJECT_SPACE_IMAGES[field]
    name = derivative_name(subject, session, suffix, space="subject", label=label, desc=desc)
    return f"sub-{subject}/ses-{session}/{datatype}/{name}"


#: written by WriteDerivatives into its node folder (see its ``sources`` output)
SOURCES_FILE = "derivative_sources.json"


class _WriteDerivativesOutputSpec(TraitedSpec):
    out_dir = traits.Str(desc="the staging folder, complete")
    sources = File(desc=f"JSON ({SOURCES_FILE}): derivative path relative to the staging "
                   "folder -> the uncompressed work-dir image it was gzipped from")


# file name after "sub-X_" and the column descriptions of each table
_TABLES = {
    "sessions_table": ("desc-sessions_timeseries.tsv", columns.SESSION_COLUMNS),
    "lesions_table": ("desc-lesions_timeseries.tsv", columns.LESION_COLUMNS),
    "events_table": ("desc-events.tsv", columns.EVENT_COLUMNS),
    "lineage_table": ("desc-lineage.tsv", columns.LINEAGE_COLUMNS),
    "summary_table": ("desc-lesions_summary.tsv", columns.LESION_SUMMARY_COLUMNS),
}


class WriteDerivatives(SimpleInterface):
    """Copy a subject's results into BIDS-derivative names with JSON sidecars.

    Writes into ``out_dir`` (a staging folder); the caller publishes it atomically.
    """

    input_spec = _WriteDerivativesInputSpec
    output_spec = _WriteDerivativesOutputSpec

    def _run_interface(self, runtime):
        ins = self.inputs
        root = Path(ins.out_dir)
        if root.exists():
            shutil.rmtree(root)
        sub = ins.subject
        subj_dir = root / f"sub-{sub}"
        copies: list[tuple[str, Path]] = []  # (work-dir file, derivative), run in threads below
        space_ref = f"sub-{sub}/anat/" + derivative_name(sub, None, "mask", space="subject", desc="brain")
        union = None
        for i, ses in enumerate(ins.labels):
            m = read_array(ins.brain_mask[i]) > 0
            union = m if union is None else union | m
        write_array(union, read(ins.brain_mask[0]), root / space_ref, dtype=np.uint8)
        _sidecar(root / space_ref, {"Description": "Union of the sessions' brain masks; defines the "
                                    "subject space grid", "Type": "Brain", "SpatialReference": space_ref})

        common = {"SpatialReference": space_ref}
        for i, ses in enumerate(ins.labels):
            day = {"Day": ins.days[i]}

            def put(field, meta):
                """The subject-space image ``field`` of this session, with its sidecar."""
                dst = root / subject_space_derivative(sub, ses, field)
                copies.append((getattr(ins, field)[i], dst))
                _sidecar(dst, {**common, **day, **meta})
                return dst

            def put_native(src, datatype, meta, *, desc):
                dst = subj_dir / f"ses-{ses}" / datatype / derivative_name(
                    sub, ses, "mask", space=None, label="lesion", desc=desc)
                copies.append((src, dst))
                _sidecar(dst, {**day, **meta})

            put("flair", {"Description": "Bias-corrected FLAIR", "SkullStripped": False})
            trace = put("trace", {"Description": "Trace-weighted DWI", "SkullStripped": False})
            # one trace volume (no direction); BIDS inheritance: sub-X_ses-Y_dwi.bval applies
            b_value = _b_value(ins.load_reports[i])
            stem = trace.parent / derivative_name(sub, ses, "dwi", ext="")
            _write_text(stem.with_suffix(".bval"), f"{b_value:g}\n")
            _write_text(stem.with_suffix(".bvec"), "0\n0\n0\n")
            put("adc", {"Description": "Apparent diffusion coefficient", "Units": "um^2/s",
                        "SkullStripped": False})
            put("radc", {"Description": "ADC relative to normal-appearing white matter (rADC)",
                         "Units": "ratio", "SkullStripped": False})
            put("brain_mask", {"Type": "Brain"})
            put("flair_lesion", {"Type": "Lesion", "Description": "FLAIR lesion"})
            put("restricted", {"Type": "Lesion", "Description": "Restricted diffusion"})
            put("shine_through", {"Type": "ROI",
                                  "Description": "T2 shine-through (DWI bright, ADC not low)"})
            for kind in ("flair", "restricted"):
                dst = put(f"{kind}_dseg", {"Description": f"Persistent {kind} lesion ids"})
                _dseg_lut(getattr(ins, f"{kind}_dseg")[i], dst)
            dyn = ins.config["dynamics"]
            dst = put("diffusion_dseg", {
                "Description": "Diffusion class of every voxel of the lesion tissue (FLAIR lesion "
                "and every voxel restricted at this or an earlier session); 0 elsewhere",
                "Labels": {str(k): f"{name}: {text}" for k, (name, text)
                           in dynamics.VOXEL_CLASS_LABELS.items()},
                "RestrictedBelow": dyn["restricted_below"], "ElevatedAbove": dyn["elevated_above"],
            })
            _write_lut(dst, [(k, name) for k, (name, _) in dynamics.VOXEL_CLASS_LABELS.items()])
            put_native(ins.native_flair_lesion[i], "anat",
                       {"Type": "Lesion", "Description": "FLAIR lesion on the native FLAIR grid"},
                       desc="flair")
            put_native(ins.native_restricted[i], "dwi",
                       {"Type": "Lesion", "Description": "Restricted diffusion on the native DWI grid"},
                       desc="restricted")
            xfm_dir = subj_dir / f"ses-{ses}" / "anat"
            copies.append((ins.subject_xfms[i], xfm_dir / derivative_name(
                sub, ses, "xfm", extra={"from": "FLAIR", "to": "subject", "mode": "image"}, ext=".txt")))
            copies.append((ins.dwi_to_flair[i], subj_dir / f"ses-{ses}" / "dwi" / derivative_name(
                sub, ses, "xfm", extra={"from": "DWI", "to": "FLAIR", "mode": "image"}, ext=".txt")))
        # images CompressImages already gzipped are copied; gzip releases the GIL: the others
        # are compressed in parallel
        ready = {}
        for mapping in (ins.compressed if isdefined(ins.compressed) else []):
            ready.update(_load(mapping))

        def copy(job):
            src, dst = job
            done = ready.get(str(Path(src).resolve()))
            if done is not None and dst.name.endswith(".nii.gz"):
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(done, dst)
            else:
                copy_to_derivative(src, dst)

        with ThreadPoolExecutor(max(1, ins.n_threads)) as pool:
            list(pool.map(copy, copies))
        # the uncompressed work-dir image of each gzipped derivative: the subject report,
        # written right after the run, reads these instead of decompressing the derivatives
        sources = {str(dst.relative_to(root)): str(Path(src).resolve()) for src, dst in copies
                   if dst.name.endswith(".nii.gz") and not str(src).endswith(".gz")}
        self._results["sources"] = out_path(runtime, SOURCES_FILE)
        _write_text(Path(self._results["sources"]), json.dumps(sources, indent=1))

        for field, (name, cols) in _TABLES.items():
            dst = subj_dir / f"sub-{sub}_{name}"
            copy_to_derivative(getattr(ins, field), dst)
            _write_text(dst.with_suffix(".json"), json.dumps(_describe(getattr(ins, field), cols), indent=2))

        _write_text(subj_dir / f"sub-{sub}_{QC_REPORT}", qc_report_text(ins))
        self._results["out_dir"] = str(root)
        return runtime


QC_REPORT = "desc-qc_report.json"


def qc_report_text(ins) -> str:
    """The subject's QC report (sub-X_desc-qc_report.json) from the inputs of
    :class:`WriteDerivatives` (or anything with the same fields: the report drawn beside it,
    :func:`pipeline.reports.subject.write_work_report`, writes the same QC report)."""
    qc = {
        "subject_space": _load(ins.subject_space_qc),
        "dwi_to_flair": [_load(f) for f in ins.dwi_to_flair_qc],
        "inputs": {ses: _load(f) for ses, f in zip(ins.labels, ins.load_reports)},
        "day_source": ins.day_source,
        "config": ins.config,
        "version": __version__,
        "software": software_versions(),
    }
    return json.dumps(qc, indent=2)


def _load(path: str):
    return json.loads(Path(path).read_text())


def _b_value(report: str) -> float:
    return float(_load(report).get("dwi_b_value_s_mm2", 1000.0))


def copy_to_derivative(src: str, dst: Path) -> None:
    """Copy a work-dir file to its derivative name, gzip-compressing a ``.nii`` into a
    ``.nii.gz`` (work-dir images are uncompressed, see :func:`pipeline.interfaces.base.save`)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.name.endswith(".nii.gz") and not str(src).endswith(".gz"):
        _gzip_nifti(Path(src), dst)
    else:
        shutil.copyfile(src, dst)


def _gzip_nifti(src: Path, dst: Path) -> None:
    """Write ``src`` (an uncompressed NIfTI) gzip-compressed to ``dst``.

    ISA-L's deflate (the ``isal`` package) at :data:`ISAL_LEVEL`: on the 32 clinical
    subject-space volumes of a 4-session subject (671 MB: FLAIR, trace, ADC, rADC, masks) it
    takes 1.0 s of CPU where zlib level 1 with its run-length strategy took 6.5 s, for files
    0.8 % larger in all (259.3 vs 257.2 MB; the rADC, NaN outside the brain, 3 % smaller).
    The stream is ordinary gzip (RFC 1952, header mtime 0): any reader (gzip, zlib, nibabel,
    ITK) gets the same bytes back.
    """
    compressor = isal_zlib.compressobj(ISAL_LEVEL, isal_zlib.DEFLATED, 31)  # 31: gzip wrapper
    # isal releases the GIL per call: the pool's threads compress in parallel. The file is read
    # chunk by chunk into one reused buffer, not whole: a whole-file bytes object (34 MB for a
    # clinical float volume) and a copy of every chunk cost fresh pages, faulted in by the
    # kernel (system CPU) for each file; the compressor gets the same chunks, so the same bytes.
    buffer = bytearray(_GZIP_CHUNK)
    view = memoryview(buffer)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        n = fin.readinto(buffer)
        _check_complete(buffer[:min(n, 348)], os.fstat(fin.fileno()).st_size, src)
        while n:
            fout.write(compressor.compress(view[:n]))
            n = fin.readinto(buffer)
        fout.write(compressor.flush())


def _check_complete(head: bytes, size: int, path: Path) -> None:
    """Refuse an uncompressed NIfTI file (its first bytes, its size) shorter than its header
    says."""
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(head[:348])))
    n = int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    if int(header.get_data_offset()) + n > size:
        raise ValueError(f"{path}: NIfTI file shorter than its header says")


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _sidecar(image: Path, meta: dict) -> None:
    _write_text(image.with_name(image.name.replace(".nii.gz", ".json")),
                json.dumps({"GeneratedBy": [{"Name": "lesionlapse", "Version": __version__}], **meta},
                           indent=2, sort_keys=True))


def _dseg_lut(dseg_file: str, dst: Path) -> None:
    labels = read_array(dseg_file)
    ids = np.unique(labels[labels > 0])  # a few thousand voxels: no sort of the whole volume
    _write_lut(dst, [(int(i), f"lesion-{i}") for i in ids])


def _write_lut(dst: Path, labels: list[tuple[int, str]]) -> None:
    """The BIDS ``dseg.tsv`` look-up table (``index``, ``name``) beside a dseg image."""
    lut = pd.DataFrame({"index": [i for i, _ in labels], "name": [n for _, n in labels]},
                       columns=["index", "name"])
    with atomic_path(dst.with_name(dst.name.replace(".nii.gz", ".tsv"))) as tmp:
        lut.to_csv(tmp, sep="\t", index=False)


def _describe(table: str, cols: dict) -> dict:
    """JSON sidecar of a TSV: the description of each column present (unknown ones flagged)."""
    header = pd.read_csv(table, sep="\t", nrows=0).columns
    cols = {"kind": columns.LESION_COLUMNS["kind"], **cols}  # added when FLAIR/restricted join
    return {c: cols.get(c, {"Description": "(undocumented column)"}) for c in header}
