"""Registration: DWI -> FLAIR within a session, the unbiased subject space, resampling once."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import SimpleITK as sitk
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

from pipeline.core import registration as core_reg
from pipeline.core import restricted as core_rd
from pipeline.interfaces.base import load_json, out_path, read, save, save_json
from pipeline.io import read_spacing

# [registration] keys that are not parameters of core.registration.register_rigid
_NOT_REGISTER_RIGID = {
    "dwi_to_flair", "template_iterations", "output_spacing_mm", "max_rotation_deg",
    "max_translation_mm", "template_spacing_mm", "subject_space_margin_mm",
    "dwi_sampling_strategy", "dwi_symmetric", "to_first_symmetric",
}


def registration_kwargs(params: dict, dwi: bool = False, to_first: bool = False) -> dict:
    """Optimizer/metric keywords of core.registration.register_rigid from [registration];
    ``dwi``: for the within-session DWI -> FLAIR step (its own sampling strategy and
    symmetric pass: ``dwi_sampling_strategy``, ``dwi_symmetric``); ``to_first``: for step 1 of
    the subject space (:class:`RegisterToFirst`: ``to_first_symmetric``, see
    core.registration.step1_symmetric)."""
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in params.items()
          if k not in _NOT_REGISTER_RIGID}
    if dwi and "dwi_sampling_strategy" in params:
        kw["sampling_strategy"] = params["dwi_sampling_strategy"]
    if dwi and "dwi_symmetric" in params:
        kw["symmetric"] = params["dwi_symmetric"]
    if to_first and "to_first_symmetric" in params:
        kw["symmetric"] = core_reg.step1_symmetric(
            params.get("symmetric", True), params["to_first_symmetric"],
            params["template_iterations"])
    return kw


def _pyramid(path) -> core_reg.Pyramid | None:
    """A registration pyramid file (optional input) read, or None."""
    return core_reg.load_pyramid(path) if isdefined(path) and path else None


def _qc_record(result, name: str) -> dict:
    return {
        "registration": name,
        "final_metric": result.final_metric,
        "similarity_after": result.similarity_after,
        "rotation_deg": result.rotation_deg,
        "translation_mm": result.translation_mm,
    }


class _RegisterImagesInputSpec(BaseInterfaceInputSpec):
    fixed = File(exists=True, mandatory=True, desc="fixed image (FLAIR)")
    moving = File(exists=True, mandatory=True, desc="moving image (b0 or trace)")
    fixed_mask = File(exists=True, desc="brain mask of the fixed image")
    moving_mask = File(exists=True, desc="brain mask of the moving image")
    fixed_pyramid = File(exists=True, desc="registration pyramid of the fixed image and mask "
                         "(PrepareImage's), read instead of built")
    transform_type = traits.Enum("rigid", "affine", usedefault=True)
    params = traits.Dict(mandatory=True, desc="the [registration] section of the configuration")
    n_threads = traits.Int(1, usedefault=True)
    name = traits.Str("dwi-to-flair", usedefault=True, desc="label used in QC messages")


class _RegisterImagesOutputSpec(TraitedSpec):
    transform = File(desc="ITK transform: resamples the moving image onto the fixed grid")
    qc = File(desc="JSON with the final metric, similarity and transform size")


class RegisterImages(SimpleInterface):
    """Register ``moving`` to ``fixed`` (mutual information, multi-resolution) with QC limits."""

    input_spec = _RegisterImagesInputSpec
    output_spec = _RegisterImagesOutputSpec

    def _run_interface(self, runtime):
        p = self.inputs.params
        mask = lambda f: read(f) if isdefined(f) and f else None  # noqa: E731
        result = core_reg.register_rigid(
            read(self.inputs.fixed),
            read(self.inputs.moving),
            fixed_mask=mask(self.inputs.fixed_mask),
            moving_mask=mask(self.inputs.moving_mask),
            fixed_pyramid=_pyramid(self.inputs.fixed_pyramid),
            transform_type=self.inputs.transform_type,
            n_threads=self.inputs.n_threads,
            **registration_kwargs(p, dwi=True),
        )
        qc = _qc_record(result, self.inputs.name)
        self._results["qc"] = save_json(qc, runtime, "qc.json")
        core_reg.qc_check(
            result, max_rotation_deg=p["max_rotation_deg"], max_translation_mm=p["max_translation_mm"],
            what=self.inputs.name,
        )
        path = out_path(runtime, "xfm.txt")
        sitk.WriteTransform(result.transform, path)
        self._results["transform"] = path
        return runtime


class _RegisterToFirstInputSpec(BaseInterfaceInputSpec):
    first = File(exists=True, mandatory=True, desc="the first session's anatomical image")
    first_mask = File(exists=True, desc="its brain mask")
    in_file = File(exists=True, mandatory=True, desc="this session's anatomical image")
    mask = File(exists=True, desc="its brain mask")
    first_pyramid = File(exists=True, desc="registration pyramid of the first session's image "
                         "and mask (PrepareImage's), read instead of built")
    pyramid = File(exists=True, desc="this session's, likewise")
    params = traits.Dict(mandatory=True, desc="the [registration] section of the configuration")
    n_threads = traits.Int(1, usedefault=True, desc="ITK threads of the registration")


class _RegisterToFirstOutputSpec(TraitedSpec):
    transform = File(desc="ITK transform mapping first-session points to this session's points")
    result = File(desc="JSON with the rest of the registration result (metric, similarity, ...)")


class RegisterToFirst(SimpleInterface):
    """Step 1 of the subject space for one later session: its anatomical image registered to
    the first session's (:func:`pipeline.core.registration.register_to_first`), so that the
    step runs beside the other sessions' preprocessing; :class:`SubjectSpace` takes it up."""

    input_spec = _RegisterToFirstInputSpec
    output_spec = _RegisterToFirstOutputSpec

    def _run_interface(self, runtime):
        mask = lambda f: read(f) if isdefined(f) and f else None  # noqa: E731
        result = core_reg.register_to_first(
            read(self.inputs.first), read(self.inputs.in_file),
            mask(self.inputs.first_mask), mask(self.inputs.mask),
            first_pyramid=_pyramid(self.inputs.first_pyramid),
            pyramid=_pyramid(self.inputs.pyramid),
            n_threads=self.inputs.n_threads,
            **registration_kwargs(self.inputs.params, to_first=True),
        )
        # an ITK text transform file reads back bit-identical (17 significant digits), JSON
        # floats too: SubjectSpace continues exactly as if it had registered the pair itself
        path = out_path(runtime, "xfm.txt")
        core_reg.write_transform(result.transform, path)
        self._results["transform"] = path
        self._results["result"] = save_json(
            {f.name: getattr(result, f.name) for f in fields(result) if f.name != "transform"},
            runtime, "result.json")
        return runtime


def _read_result(transform: str, record: str) -> core_reg.RegistrationResult:
    """A :class:`RegisterToFirst` result read back from its two files."""
    return core_reg.RegistrationResult(transform=core_reg.read_transform(transform),
                                       **load_json(record))


class _SubjectSpaceInputSpec(BaseInterfaceInputSpec):
    in_files = InputMultiObject(File(exists=True), mandatory=True, desc="one anatomical image per session")
    masks = InputMultiObject(File(exists=True), desc="brain masks, one per session")
    labels = traits.List(traits.Str, mandatory=True, desc="session labels (for QC messages)")
    params = traits.Dict(mandatory=True, desc="the [registration] section of the configuration")
    n_threads = traits.Int(1, usedefault=True, desc="ITK threads of each registration")
    n_workers = traits.Int(1, usedefault=True, nohash=True,
                           desc="registrations run at once (same result: not hashed)")
    to_first_xfms = InputMultiObject(
        File(exists=True), desc="RegisterToFirst transforms of the sessions after the first "
        "(in order); without them the node registers them to the first session itself")
    to_first_results = InputMultiObject(File(exists=True),
                                        desc="the matching RegisterToFirst result files")
    pyramids = InputMultiObject(
        File(exists=True), desc="per session: core.registration.save_pyramid file of in_files "
        "and masks (the sessions' anat_pyramid), used by the registrations instead of "
        "building the pyramids again")


class _SubjectSpaceOutputSpec(TraitedSpec):
    transforms = OutputMultiObject(File(), desc="per session: resamples the session onto the subject space")
    reference = File(desc="empty image defining the subject-space grid")
    qc = File(desc="JSON list of per-session registration QC")


class SubjectSpace(SimpleInterface):
    """Rigidly align all sessions in one within-subject space that favours none of them."""

    input_spec = _SubjectSpaceInputSpec
    output_spec = _SubjectSpaceOutputSpec

    def _run_interface(self, runtime):
        p = self.inputs.params
        images = [read(f) for f in self.inputs.in_files]
        masks = [read(f) for f in self.inputs.masks] if self.inputs.masks else None
        to_first = None
        if isdefined(self.inputs.to_first_xfms):
            results = self.inputs.to_first_results
            if not isdefined(results) or len(results) != len(self.inputs.to_first_xfms):
                raise ValueError("to_first_xfms and to_first_results must pair up")
            to_first = [_read_result(x, r) for x, r in zip(self.inputs.to_first_xfms, results)]
        pyramids = ([core_reg.load_pyramid(f) for f in self.inputs.pyramids]
                    if isdefined(self.inputs.pyramids) else None)
        transforms, reference, qc = core_reg.build_subject_space(
            images,
            masks,
            spacing_mm=p["output_spacing_mm"],
            template_iterations=p["template_iterations"],
            template_spacing_mm=p["template_spacing_mm"],
            margin_mm=p["subject_space_margin_mm"],
            n_threads=self.inputs.n_threads,
            n_workers=self.inputs.n_workers,
            to_first=to_first,
            pyramids=pyramids,
            to_first_symmetric=p.get("to_first_symmetric"),
            **registration_kwargs(p),
        )
        records = []
        for label, result in zip(self.inputs.labels, qc):
            records.append(_qc_record(result, f"ses-{label} to subject space"))
        self._results["qc"] = save_json(records, runtime, "qc.json")
        for label, result in zip(self.inputs.labels, qc):
            core_reg.qc_check(
                result, max_rotation_deg=p["max_rotation_deg"],
                max_translation_mm=p["max_translation_mm"], what=f"ses-{label} to subject space",
            )
        paths = []
        for i, t in enumerate(transforms):
            path = out_path(runtime, f"xfm_{i:02d}.txt")
            sitk.WriteTransform(t, path)
            paths.append(path)
        self._results["transforms"] = paths
        self._results["reference"] = save(reference, runtime, "reference.nii.gz", dtype=np.uint8)
        return runtime


class _ResampleSessionInputSpec(BaseInterfaceInputSpec):
    reference = File(exists=True, mandatory=True, desc="subject-space grid")
    subject_xfm = File(exists=True, desc="resamples this session's FLAIR space onto the subject space")
    dwi_to_flair = File(exists=True, desc="resamples the DWI grid onto the FLAIR")
    flair = File(exists=True)
    flair_mask = File(exists=True)
    b0 = File(exists=True)
    trace = File(exists=True)
    adc = File(exists=True)
    dwi_mask = File(exists=True)
    fov_min_slice_mm = traits.Float(
        desc="also write flair_fov_edge: the FLAIR slab's edge is known when its grid's unique "
        "largest spacing is at least this (mm; [segmentation] flair_fov_edge_min_slice_mm)")
    fov_ends = traits.Enum("inferior", "both", usedefault=True,
                           desc="the slab's inferior end (axial slabs only) or both ends "
                           "([segmentation] flair_fov_edge_ends)")


class _ResampleSessionOutputSpec(TraitedSpec):
    flair = File()
    brain_mask = File()
    b0 = File()
    trace = File()
    adc = File()
    dwi_inplane_mm = traits.Float(desc="the native trace DWI's in-plane voxel (mm, "
                                  "core.restricted.dwi_inplane_mm; of the placeholder's grid in "
                                  "a session without DWI, which the segment node does not read)")
    flair_fov_edge = File(desc="float32, subject space: through-plane distance (mm) to the "
                          "native FLAIR's slab edge (fov_ends), 0 beyond it, +inf where not known "
                          "(core.registration.fov_edge_distance; of the placeholder's grid in "
                          "a session without FLAIR, which the segment node does not read)")


class ResampleSession(SimpleInterface):
    """Resample every image of a session once, onto the subject space, with composed transforms."""

    input_spec = _ResampleSessionInputSpec
    output_spec = _ResampleSessionOutputSpec

    def _run_interface(self, runtime):
        ins = self.inputs
        reference = read(ins.reference)
        chain = [sitk.ReadTransform(ins.subject_xfm)] if isdefined(ins.subject_xfm) else []
        # ITK composite order (core.registration.resample_to_reference): last applied first
        dwi_chain = ([sitk.ReadTransform(ins.dwi_to_flair)] if isdefined(ins.dwi_to_flair) else []) + chain

        def resample(source, transforms, name, interpolator="linear", dtype=np.float32):
            img = core_reg.resample_to_reference(
                read(source) if isinstance(source, str) else source, reference, transforms,
                interpolator=interpolator
            )
            self._results[name] = save(img, runtime, f"{name}.nii.gz", dtype=dtype)

        if isdefined(ins.flair):
            flair = read(ins.flair)
            resample(flair, chain, "flair", "bspline")
            resample(ins.flair_mask, chain, "brain_mask", "nearest", np.uint8)
            if isdefined(ins.fov_min_slice_mm):
                fov = core_reg.fov_edge_distance(flair, reference, chain,
                                                 min_slice_mm=ins.fov_min_slice_mm,
                                                 ends=ins.fov_ends)
                self._results["flair_fov_edge"] = save(fov, runtime, "flair_fov_edge.nii.gz")
        elif isdefined(ins.dwi_mask):
            resample(ins.dwi_mask, dwi_chain, "brain_mask", "nearest", np.uint8)
        if isdefined(ins.trace):  # the header only: the blur the restricted edge step undoes
            self._results["dwi_inplane_mm"] = core_rd.dwi_inplane_mm(read_spacing(ins.trace))
        for name in ("b0", "trace", "adc"):
            if isdefined(getattr(ins, name)):
                resample(getattr(ins, name), dwi_chain, name)
        return runtime
