"""Brain masks and bias-field correction of one image."""

from __future__ import annotations

import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    isdefined, traits)

from pipeline.core import preprocess as core_pre
from pipeline.core import registration as core_reg
from pipeline.interfaces.base import out_path, read, save


class _PrepareImageInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="scalar 3D image (FLAIR or b0)")
    params = traits.Dict(mandatory=True, desc="the [preprocessing] section of the configuration")
    bias_correct = traits.Bool(True, usedefault=True, desc="run N4 inside the brain mask")
    trace = File(exists=True, desc="with a b0 as in_file: the trace DWI of the same series, "
                 "divided by the b0's bias field (core.preprocess.prepare_dwi)")
    n_threads = traits.Int(1, usedefault=True, desc="ITK threads")
    registration = traits.Dict(desc="the [registration] section of the configuration: also "
                               "write the registration pyramid of the image and mask")


class _PrepareImageOutputSpec(TraitedSpec):
    out_file = File(desc="bias-corrected image (or the input as float32)")
    mask = File(desc="brain mask (uint8)")
    trace_out = File(desc="with `trace`: the trace DWI divided by the same bias field (float32)")
    pyramid = File(desc="with `registration`: the registration pyramid of out_file and mask "
                   "(core.registration.save_pyramid), for every registration of the image")


class PrepareImage(SimpleInterface):
    """Brain mask and (optionally) N4 bias-field correction of one image; given a b0 and its
    ``trace``, the trace is divided by the b0's field too."""

    input_spec = _PrepareImageInputSpec
    output_spec = _PrepareImageOutputSpec

    def _run_interface(self, runtime):
        if isdefined(self.inputs.trace):
            image, trace, mask = core_pre.prepare_dwi(
                read(self.inputs.in_file), read(self.inputs.trace), self.inputs.params,
                bias_correct=self.inputs.bias_correct, n_threads=self.inputs.n_threads)
            self._results["trace_out"] = save(trace, runtime, "trace.nii.gz")
        else:
            image, mask = core_pre.prepare_image(
                read(self.inputs.in_file), self.inputs.params,
                bias_correct=self.inputs.bias_correct, n_threads=self.inputs.n_threads)
        self._results["out_file"] = save(image, runtime, "preproc.nii.gz")
        self._results["mask"] = save(mask, runtime, "brainmask.nii.gz", dtype=np.uint8)
        if self.inputs.registration:
            # built from the files as the registrations read them (the header's geometry):
            # each registration of the image (DWI -> FLAIR, to the first session) reads the
            # pyramid instead of building it (bit-identical)
            keys = {k: v for k, v in self.inputs.registration.items()
                    if k in core_reg.PYRAMID_PARAMETERS}
            pyramid = core_reg.registration_pyramid(read(self._results["out_file"]),
                                                    read(self._results["mask"]), **keys)
            self._results["pyramid"] = str(core_reg.save_pyramid(
                pyramid, out_path(runtime, "pyramid.npz")))
        return runtime
