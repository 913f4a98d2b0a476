"""Checking a subject's inputs before any work, with messages that name the file and the fix."""

from __future__ import annotations

from pipeline.bids import SubjectInputs
from pipeline.io import InputError, load_nifti


def validate_subject(subject: SubjectInputs) -> list[str]:
    """Open every input file's header (and gzip stream) before any work.

    Raises :class:`InputError` naming the file; returns warnings.
    """
    warnings: list[str] = []
    for ses in subject.sessions:
        checks = [(ses.flair, "FLAIR", 3), (ses.dwi, "DWI", 4), (ses.adc, "ADC", 3),
                  (ses.trace, "trace DWI", 3)]
        for path, kind, ndim in checks:
            if path is not None:
                warnings += load_nifti(path, kind=kind, ndim=ndim)[2]
        if ses.dwi is not None and (ses.bval is None or ses.bvec is None):
            missing = ".bval" if ses.bval is None else ".bvec"
            raise InputError(f"{ses.dwi}: no {missing} file beside the 4D DWI. Put the "
                             "b-values/b-vectors from the conversion next to it with the same name.")
    return warnings
