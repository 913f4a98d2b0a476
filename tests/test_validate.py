"""validate_subject checks the sessions side by side: same warnings, same first error."""

from __future__ import annotations

import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import pipeline.validate as validate
from pipeline.bids import SessionInputs, SubjectInputs
from pipeline.config import load_config
from pipeline.io import InputError

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
SHAPE = (20, 20, 10)


def _flair(path: Path, nan_background: bool = False) -> Path:
    ii, jj, kk = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    data = np.where(ii**2 + jj**2 + kk**2 < 0.7, 100.0, 0.0)
    data += np.random.default_rng(0).normal(0, 1, SHAPE)
    if nan_background:
        data[0, 0, 0] = np.nan  # repaired and reported as a warning
    nib.save(nib.Nifti1Image(data.astype(np.float32), AFFINE), str(path))
    return path


def _subject(tmp_path: Path, kinds: list[str]) -> SubjectInputs:
    sessions = []
    for k, kind in enumerate(kinds):
        path = tmp_path / f"s{k}_FLAIR.nii.gz"
        if kind == "truncated":
            _flair(path)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        elif kind == "empty":
            path.write_bytes(b"")
        else:
            _flair(path, nan_background=kind == "nan")
        sessions.append(SessionInputs(subject="01", session=f"s{k}", day=float(k), flair=path))
    return SubjectInputs(subject="01", sessions=tuple(sessions))


@pytest.mark.parametrize("nprocs", [1, 3])
def test_first_bad_session_in_order_raises(tmp_path, nprocs):
    # sessions 1 and 2 are both bad: the error is session 1's whichever check ends first
    config = load_config().replace("resources", nprocs=nprocs)
    subject = _subject(tmp_path, ["good", "truncated", "empty"])
    with pytest.raises(InputError, match="truncated or corrupt") as err:
        validate.validate_subject(subject, config)
    assert "s1_FLAIR.nii.gz" in str(err.value)


def test_sessions_checked_on_threads_with_the_same_warnings(tmp_path, monkeypatch):
    subject = _subject(tmp_path, ["nan", "good", "nan", "nan"])
    serial = validate.validate_subject(subject, load_config().replace("resources", nprocs=1))
    threads = set()
    check = validate.validate_session
    both = threading.Barrier(2, timeout=30)  # the first two sessions are checked at once

    def recording(ses, *args, **kwargs):
        threads.add(threading.get_ident())
        if ses.session in ("s0", "s1"):
            both.wait()
        return check(ses, *args, **kwargs)

    monkeypatch.setattr(validate, "validate_session", recording)
    parallel = validate.validate_subject(subject, load_config().replace("resources", nprocs=2))
    assert len(threads) == 2 and threading.get_ident() not in threads
    assert parallel == serial
    assert [w.split(":")[0] for w in serial] == ["ses-s0", "ses-s2", "ses-s3"]
