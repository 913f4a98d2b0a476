"""Brain masks and bias-field correction of one image."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits

from pipeline.core import preprocess as core_pre
from pipeline.interfaces.base import read, save


class _PrepareImageInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="scalar 3D image (FLAIR or b0)")
    params = traits.Dict(mandatory=True, desc="the [preprocessing] section of the configuration")
    bias_correct = traits.Bool(True, usedefault=True, desc="run N4 inside the brain mask")
    n_threads = traits.Int(1, usedefault=True, desc="ITK threads")


class _PrepareImageOutputSpec(TraitedSpec):
    out_file = File(desc="bias-corrected image (or the input as float32)")
    mask = File(desc="brain mask (uint8)")


class PrepareImage(SimpleInterface):
    """Brain mask and (optionally) N4 bias-field correction of one image."""

    input_spec = _PrepareImageInputSpec
    output_spec = _PrepareImageOutputSpec

    def _run_interface(self, runtime):
        p = self.inputs.params
        image = sitk.Cast(read(self.inputs.in_file), sitk.sitkFloat32)
        mask = core_pre.brain_mask(
            image, closing_mm=p["brain_mask_closing_mm"], erosion_mm=p["brain_mask_erosion_mm"],
            smoothing_mm=p["brain_mask_smoothing_mm"], threshold_method=p["brain_mask_threshold"],
        )
        if self.inputs.bias_correct:
            image, _ = core_pre.n4_bias_correct(
                image,
                mask,
                shrink_factor=p["n4_shrink_factor"],
                iterations=p["n4_iterations"],
                convergence=p["n4_convergence"],
                spline_distance_mm=p["n4_spline_distance_mm"],
                n_threads=self.inputs.n_threads,
            )
        self._results["out_file"] = save(image, runtime, "preproc.nii.gz")
        self._results["mask"] = save(mask, runtime, "brainmask.nii.gz", dtype=np.uint8)
        return runtime
