"""Realism check: the phantom measured like the real scans in ../shared/data.

The same functions (:mod:`pipeline.core.imagestats`) measure a clinical-grid phantom session
and the real Philips DWI / the real MS FLAIR with its consensus lesion mask.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.core import imagestats
from pipeline.simulate import simulate_dataset

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not DATA.is_dir(), reason=f"real data not found at {DATA}"),
]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("realism") / "ds"
    simulate_dataset(out, preset="ms-like", n_subjects=1, seed=3, grid="clinical", days=(0.0,))
    dwi_dir = out / "sub-01" / "ses-01" / "dwi"
    dwi = nib.load(dwi_dir / "sub-01_ses-01_dwi.nii.gz").get_fdata(dtype=np.float32)
    phantom = imagestats.dwi_snr(dwi, np.loadtxt(dwi_dir / "sub-01_ses-01_dwi.bval"))
    truth = out / "derivatives" / "truth" / "sub-01" / "ses-01" / "anat"
    flair = nib.load(out / "sub-01" / "ses-01" / "anat" / "sub-01_ses-01_FLAIR.nii.gz")
    phantom["flair_contrast"] = imagestats.lesion_contrast(
        flair.get_fdata(dtype=np.float32),
        nib.load(truth / "sub-01_ses-01_label-lesion_desc-flair_mask.nii.gz").get_fdata() > 0,
        nib.load(truth / "sub-01_ses-01_desc-brain_mask.nii.gz").get_fdata() > 0,
    )
    real_dir = DATA / "dwi_philips_real"
    real_dwi = nib.load(real_dir / "DTI_Biobank_2mm_MB3S2_EPI_701.nii.gz")
    real = imagestats.dwi_snr(real_dwi.get_fdata(dtype=np.float32),
                              np.loadtxt(real_dir / "DTI_Biobank_2mm_MB3S2_EPI_701.bval"))
    ms = DATA / "ms_flair_mni" / "patient07"
    real_flair = nib.load(ms / "FLAIR_brain_MNI.nii.gz").get_fdata(dtype=np.float32)
    real["flair_contrast"] = imagestats.lesion_contrast(
        real_flair, nib.load(ms / "lesion_consensus_MNI.nii.gz").get_fdata() > 0, real_flair > 0
    )
    return phantom, real


@pytest.mark.parametrize("key", ["wm_adc_um2_s", "snr_b1000", "flair_contrast"])
def test_within_15_percent(measured, key):
    """Issue 2: white-matter ADC, DWI noise level and FLAIR lesion contrast within 15 %."""
    phantom, real = measured
    assert abs(phantom[key] / real[key] - 1) < 0.15, (phantom[key], real[key])


def test_real_dwi_tissue_adc_is_plausible(measured):
    """The measuring code itself: the real volunteer's parenchymal ADC is a normal adult's."""
    _, real = measured
    assert 600 < real["tissue_adc_um2_s"] < 800
    assert 550 < real["wm_adc_um2_s"] < real["tissue_adc_um2_s"]
