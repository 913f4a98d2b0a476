"""HTML reports: figures and warnings on small synthetic derivatives (fast), then the reports of a
sample_data run as a person sees them, rendered by headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import colour_count

from pipeline.reports.data import events_of_kind, growing_ids, load_subject
from pipeline.reports.embed import figure_png
from pipeline.reports.group import write_group_report
from pipeline.reports.mosaic import (EXISTING_COLOUR, GROWING_COLOUR, lesion_slice,
                                     plot_mosaic)
from pipeline.reports.qc import collect_warnings, methods_paragraphs
from pipeline.reports.subject import write_subject_report
from pipeline.reports.trajectories import mean_ci_by_day

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists()
                                        else None)
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--disable-dev-shm-usage",
                  "--window-size=1400,3000", "--enable-logging=stderr", "--v=0")
CONFIG = {"dynamics": {"restricted_below": 0.75, "elevated_above": 1.15,
                       "nawm_min_volume_ml": 5.0},
          "registration": {"max_rotation_deg": 20.0, "max_translation_mm": 40.0}}


# ---------------------------------------------------------------- synthetic derivatives


def _save(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def _session_images(sub_dir: Path, ses: str, lesions: list[tuple[int, slice]]) -> None:
    """A 32x32x12 'head': bright FLAIR/DWI and dark ADC in the lesions, on slice 6."""
    shape = (32, 32, 12)
    rng = np.random.default_rng(ord(ses[-1]))
    brain = np.zeros(shape, np.uint8)
    brain[4:28, 4:28, 2:10] = 1
    dseg = np.zeros(shape, np.int16)
    for lesion_id, rows in lesions:
        dseg[rows, 10:18, 5:8] = lesion_id
    base = brain * (100 + rng.normal(0, 5, shape))
    p = f"sub-01_ses-{ses}"
    _save(sub_dir / f"ses-{ses}/anat/{p}_space-subject_desc-preproc_FLAIR.nii.gz",
          (base + 150 * (dseg > 0)).astype(np.float32))
    _save(sub_dir / f"ses-{ses}/dwi/{p}_space-subject_desc-trace_dwi.nii.gz",
          (base + 120 * (dseg > 0)).astype(np.float32))
    adc = (8 * base - 400 * (dseg > 0)).astype(np.float32)
    adc[:, 2:5, 4:8] = np.nan  # undefined ADC (the readers keep NaN)
    _save(sub_dir / f"ses-{ses}/dwi/{p}_space-subject_ADC.nii.gz", adc)
    _save(sub_dir / f"ses-{ses}/anat/{p}_space-subject_desc-brain_mask.nii.gz", brain)
    _save(sub_dir / f"ses-{ses}/anat/{p}_space-subject_desc-flair_dseg.nii.gz", dseg)
    _save(sub_dir / f"ses-{ses}/dwi/{p}_space-subject_desc-restricted_dseg.nii.gz", dseg)


def _tsv(path: Path, rows: list[dict]) -> None:
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False, na_rep="n/a")


def _tables(sub_dir: Path) -> None:
    _tsv(sub_dir / "sub-01_desc-sessions_timeseries.tsv", [
        {"session": "a", "day": 0, "flair_volume_ml": 0.2, "restricted_volume_ml": 0.2,
         "radc_mean_restricted": 0.6, "pseudonormalized_fraction": 0.0, "nawm_volume_ml": 31.0},
        {"session": "b", "day": 5, "flair_volume_ml": 0.5, "restricted_volume_ml": 0.4,
         "radc_mean_restricted": 0.8, "pseudonormalized_fraction": 0.5, "nawm_volume_ml": 0.45}])
    events = [{"lesion_id": 1, "kind": kind, "from_session": "a", "to_session": "b",
               "from_day": 0, "to_day": 5, "event": "stable"} for kind in ("flair", "restricted")]
    events += [{"lesion_id": 2, "kind": kind, "from_session": "a", "to_session": "b",
                "from_day": 0, "to_day": 5, "event": "new"} for kind in ("flair", "restricted")]
    _tsv(sub_dir / "sub-01_desc-events.tsv", events)
    _tsv(sub_dir / "sub-01_desc-lesions_timeseries.tsv", [
        {"lesion_id": i, "kind": k, "session": s, "day": d, "present": True, "volume_ml": 0.1,
         "radc_mean_initial": 0.6 + 0.04 * d}
        for i in (1, 2) for k in ("flair", "restricted") for s, d in (("a", 0), ("b", 5))])


def _qc(sub_dir: Path, rotation: float = 3.0) -> None:
    record = {"final_metric": -0.5, "similarity_after": 0.9, "rotation_deg": rotation,
              "translation_mm": 2.0}
    qc = {"subject_space": [record, record], "dwi_to_flair": [record, record],
          "inputs": {"a": {"adc_unit_detection": "ADC unit detected as mm2_s", "warnings": []},
                     "b": {"adc_unit_detection": "ADC unit ambiguous",
                           "warnings": ["ADC unit ambiguous: assumed um2_s"]}},
          "config": CONFIG, "version": "9.9.9"}
    (sub_dir / "sub-01_desc-qc_report.json").write_text(json.dumps(qc))


@pytest.fixture()
def fake_output(tmp_path) -> Path:
    """OUTPUT_DIR with sub-01: sessions a (day 0, lesion 1) and b (day 5, lesion 1 + new 2)."""
    sub_dir = tmp_path / "out" / "sub-01"
    _session_images(sub_dir, "a", [(1, slice(6, 12))])
    _session_images(sub_dir, "b", [(1, slice(6, 12)), (2, slice(18, 24))])
    _tables(sub_dir)
    _qc(sub_dir)
    return tmp_path / "out"


def _rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)]) / 255


def _colour_pixels(png: np.ndarray, colour: str, tol: float = 0.12) -> int:
    return int((np.abs(png[..., :3] - _rgb(colour)).max(axis=-1) < tol).sum())


def _row_crops(fig, png: np.ndarray, n_rows: int) -> list[np.ndarray]:
    """The pixels of each mosaic row (all of its axes), from the axes' window extents."""
    height = png.shape[0]
    crops = []
    for r in range(n_rows):
        boxes = [ax.get_window_extent() for ax in fig.axes[3 * r:3 * r + 3]]
        y0, y1 = min(b.y0 for b in boxes), max(b.y1 for b in boxes)
        crops.append(png[int(height - y1):int(height - y0)])
    return crops


# ---------------------------------------------------------------- fast tests


def test_growing_ids_per_kind(fake_output):
    events = load_subject(fake_output, "01").tables["events"]
    assert growing_ids(events_of_kind(events, "flair"), "b") == {2}
    assert growing_ids(events_of_kind(events, "restricted"), "a") == set()


@pytest.mark.parametrize("fraction", [0.5, 0.01, 1.0])
def test_mask_centre_is_scipys_centre_of_mass(fraction):
    from scipy import ndimage

    from pipeline.reports.mosaic import mask_centre

    mask = np.random.default_rng(3).random((31, 40, 23)) < fraction
    mask[3, 5, 7] = True  # never empty
    assert mask_centre(mask) == tuple(float(c) for c in ndimage.center_of_mass(mask))


def test_lesion_slice_has_most_lesion():
    a, b = np.zeros((4, 4, 6)), np.zeros((4, 4, 6))
    a[0, 0, 1] = b[:2, :2, 4] = 1
    assert lesion_slice([a, b]) == 4
    assert lesion_slice([None, np.zeros((4, 4, 6))]) == 3


def test_report_png_has_the_pixels_of_the_default_encoding(fake_output):
    """The report's PNG level (embed.PNG_LEVEL) changes the bytes, never the picture."""
    fig = plot_mosaic(load_subject(fake_output, "01"))
    ours = figure_png(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, facecolor=fig.get_facecolor())  # Pillow's level
    buffer.seek(0)
    np.testing.assert_array_equal(mpimg.imread(io.BytesIO(ours)), mpimg.imread(buffer))


def test_mosaic_marks_new_lesion_in_orange(fake_output):
    fig = plot_mosaic(load_subject(fake_output, "01"))
    png = mpimg.imread(io.BytesIO(figure_png(fig)))
    first, second = _row_crops(fig, png, 2)
    assert fig.lesion_slice in (5, 6, 7)
    assert _colour_pixels(first, EXISTING_COLOUR) > 0
    assert _colour_pixels(first, GROWING_COLOUR) == 0, "day 0 has no new lesion"
    assert _colour_pixels(second, GROWING_COLOUR) > 0, "the new lesion 2 is not orange"
    assert _colour_pixels(second, EXISTING_COLOUR) > 0, "the stable lesion 1 is not blue"


def test_warnings_name_units_qc_and_missing_contrasts(fake_output):
    sub_dir = fake_output / "sub-01"
    _qc(sub_dir, rotation=25.0)
    (sub_dir / "ses-b/dwi/sub-01_ses-b_space-subject_desc-trace_dwi.nii.gz").unlink()
    text = "\n".join(collect_warnings(load_subject(fake_output, "01")))
    assert "ses-b: ADC unit ambiguous" in text
    assert "rotation 25.0 deg exceeds" in text
    assert "ses-b: no DWI" in text
    assert "ses-a: no DWI" not in text
    # a NAWM reference below [dynamics] nawm_min_volume_ml is named, an ample one is not
    assert "ses-b: the NAWM ADC reference holds only 0.45 mL" in text
    assert "ses-a: the NAWM" not in text


def test_methods_quote_the_recorded_config(fake_output):
    text = " ".join(methods_paragraphs(load_subject(fake_output, "01")))
    assert "lesionlapse 9.9.9" in text and "rADC below 0.75" in text and "1.15" in text
    assert "SimpleITK" in text and "nipype" in text and "numpy" in text


def test_mean_ci_by_day():
    table = pd.DataFrame({"subject": ["1", "2", "1"], "day": [0, 0, 3], "v": [1.0, 3.0, 5.0]})
    ci = mean_ci_by_day(table, "v").set_index("day")
    assert ci.loc[0, "mean"] == 2.0 and ci.loc[0, "n"] == 2
    assert ci.loc[0, "ci_high"] - 2.0 == pytest.approx(12.706, abs=1e-3)  # t(0.975, 1) * 1
    assert np.isnan(ci.loc[3, "ci_low"])


def _images(html: str) -> list[np.ndarray]:
    """Decode every <img>; fail on a non-embedded, undecodable or empty one."""
    images = []
    for src in re.findall(r"<img[^>]*\bsrc=\"([^\"]*)\"", html):
        assert src.startswith("data:image/png;base64,"), f"image not embedded: {src[:60]}"
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert raw, "zero-size image"
        images.append(mpimg.imread(io.BytesIO(raw)))
    return images


def _assert_self_contained(html: str) -> None:
    assert not re.search(r"(src|href)=\"(https?:)?//", html), "external resource"
    assert "<link" not in html and "<script" not in html and "url(" not in html


def _assert_not_blank(image: np.ndarray, what: str) -> None:
    assert image.size > 0, f"{what}: zero size"
    colours = colour_count(image)
    assert colours > 8, f"{what}: an empty figure ({colours} colours)"


def test_subject_report_self_contained(fake_output):
    html = write_subject_report(fake_output, "sub-01").read_text()
    _assert_self_contained(html)
    images = _images(html)
    assert len(images) == 4  # mosaic, trajectories, lesion histories, registration QC
    for i, image in enumerate(images):
        _assert_not_blank(image, f"image {i}")
    assert "ADC unit ambiguous" in html and "could not be drawn" not in html


def test_subject_report_without_images_or_qc(tmp_path):
    sub_dir = tmp_path / "sub-07"
    sub_dir.mkdir()
    _tables(sub_dir)
    (sub_dir / "sub-01_desc-events.tsv").rename(sub_dir / "sub-07_desc-events.tsv")
    html = write_subject_report(tmp_path, "07").read_text()
    assert "No images found" in html and "no QC report" in html


def test_damaged_image_becomes_a_warning(fake_output):
    flair = fake_output / "sub-01/ses-b/anat/sub-01_ses-b_space-subject_desc-preproc_FLAIR.nii.gz"
    flair.write_bytes(b"not a nifti")
    html = write_subject_report(fake_output, "01").read_text()
    assert "the images could not be drawn" in html and "Lesion events per interval" in html


def test_trajectory_failure_in_the_drawing_child_becomes_a_warning(fake_output, monkeypatch):
    """The trajectories are drawn in a forked child beside the images: its failure comes back
    as a warning of the page, after the images' own, and the images are still drawn."""
    import pipeline.reports.subject as subject_report

    def broken(*args, **kwargs):
        raise KeyError("radc_mean_restricted")

    monkeypatch.setattr(subject_report, "subject_trajectories", broken)  # the fork inherits it
    html = write_subject_report(fake_output, "01").read_text()
    assert "the trajectories could not be drawn (KeyError: " in html  # quotes HTML-escaped
    assert len(_images(html)) == 2  # mosaic and registration QC
    assert "the images could not be drawn" not in html


def test_group_report_shows_failures(fake_output):
    logs = fake_output / "logs"
    logs.mkdir()
    _tsv(logs / "run_summary.tsv", [
        {"subject": "01", "status": "ok", "duration_s": 12.5, "error": ""},
        {"subject": "02", "status": "failed", "duration_s": 3.0, "error": "FLAIR unreadable"}])
    html = write_group_report(fake_output).read_text()
    _assert_self_contained(html)
    assert "FLAIR unreadable" in html and 'class="failed"' in html and "1 of 2" in html
    for image in _images(html):
        _assert_not_blank(image, "group figure")


# ---------------------------------------------------------------- headless Chromium


def render_in_chromium(html: Path, screenshot: Path) -> list[str]:
    """Screenshot ``html`` in headless Chromium; return the page's console messages."""
    with tempfile.TemporaryDirectory(prefix="lesionlapse-chromium-") as profile:
        cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
               f"--screenshot={screenshot}", html.resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert screenshot.exists(), f"no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (scripts/install_system_deps.sh installs the "
    "Debian packages chromium and chromium-driver when run as root)")


@needs_chromium
def test_chromium_catches_javascript_errors(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><p>x</p><script>undefined_function();</script></body></html>")
    messages = render_in_chromium(page, tmp_path / "broken.png")
    assert any("undefined_function" in m for m in messages)


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report_screenshots")
    print(f"report screenshots in {folder}")
    return folder


def _seed_case(repo: Path) -> str:
    participants = pd.read_csv(repo / "sample_data" / "participants.tsv", sep="\t")
    return participants.loc[participants.group == "seed-case", "participant_id"].iloc[0][4:]


def test_seed_case_mosaic_has_four_days_with_contours(sample_output, repo):
    subject = load_subject(sample_output, _seed_case(repo))
    assert [s.day for s in subject.sessions] == [0, 3, 8, 45]
    fig = plot_mosaic(subject)
    png = mpimg.imread(io.BytesIO(figure_png(fig)))
    for session, row in zip(subject.sessions, _row_crops(fig, png, 4)):
        drawn = _colour_pixels(row, EXISTING_COLOUR) + _colour_pixels(row, GROWING_COLOUR)
        assert drawn > 20, f"no lesion contour on day {session.day:g}"


def test_reports_only_rewrites_the_report(sample_output, repo):
    from pipeline.cli import main

    sub = _seed_case(repo)
    report = sample_output / f"sub-{sub}.html"
    before = report.stat().st_mtime_ns if report.exists() else 0
    time.sleep(0.01)
    status = main([str(repo / "sample_data"), str(sample_output), "participant",
                   "--participant-label", sub, "--reports-only"])
    assert status == 0
    assert report.stat().st_mtime_ns > before


def _pages() -> list[str]:
    participants = Path(__file__).resolve().parents[1] / "sample_data" / "participants.tsv"
    table = pd.read_csv(participants, sep="\t", dtype=str) if participants.exists() else None
    subjects = [] if table is None else [f"{p}.html" for p in table.participant_id]
    return subjects + ["group.html"]


@needs_chromium
@pytest.mark.parametrize("page", _pages())
def test_report_in_chromium(page, sample_output, screenshots):
    """Every report, as a person sees it: no console message, every figure drawn."""
    html = sample_output / page
    assert html.exists(), f"{page} was not written by the run"
    shot = screenshots / f"{html.stem}.png"
    console = render_in_chromium(html, shot)
    assert not console, f"console messages (JavaScript errors?): {console}"
    _assert_not_blank(mpimg.imread(shot), f"screenshot of {html.name}")
    text = html.read_text()
    _assert_self_contained(text)
    images = _images(text)
    assert images, f"{html.name} has no figure"
    for i, image in enumerate(images):
        _assert_not_blank(image, f"{html.name} image {i}")


def test_report_reads_uncompressed_sources_of_the_same_size(fake_output, tmp_path):
    # the participant run hands the report the work-dir image of each gzipped derivative:
    # used when its size is the derivative's uncompressed size, else the derivative is read
    import gzip

    rel = "sub-01/ses-a/anat/sub-01_ses-a_space-subject_desc-preproc_FLAIR.nii.gz"
    work = tmp_path / "work_flair.nii"
    work.write_bytes(gzip.decompress((fake_output / rel).read_bytes()))
    bad = tmp_path / "short.nii"
    bad.write_bytes(work.read_bytes()[:-4])
    plain = load_subject(fake_output, "01")
    subject = load_subject(fake_output, "01", {rel: str(work)})
    session = next(s for s in subject.sessions if s.label == "a")
    assert session.sources == {"flair": work}
    np.testing.assert_array_equal(session.load("flair"),
                                  next(s for s in plain.sessions if s.label == "a").load("flair"))
    assert next(s for s in load_subject(fake_output, "01", {rel: str(bad)}).sessions
                if s.label == "a").sources == {}
    assert next(s for s in load_subject(fake_output, "01", {rel: str(tmp_path / "gone.nii")})
                .sessions if s.label == "a").sources == {}


def test_report_images_are_derivatives_written_from_the_work_files():
    # the report node finds each work-dir image under the derivative name WriteDerivatives
    # gives it: every image the report shows must be one of those names
    from pipeline.interfaces.outputs import SUBJECT_SPACE_IMAGES, subject_space_derivative
    from pipeline.reports.data import IMAGES

    written = {subject_space_derivative("01", "a", field) for field in SUBJECT_SPACE_IMAGES}
    assert len(written) == len(SUBJECT_SPACE_IMAGES)
    for key, (datatype, tail) in IMAGES.items():
        assert f"sub-01/ses-a/{datatype}/sub-01_ses-a_{tail}" in written, key


def test_report_reads_work_images_of_derivatives_not_written_yet(fake_output, tmp_path):
    # while the derivatives are written, the report node reads the work-dir image of a
    # derivative (by its name) that is not there yet; a written derivative is read as usual
    import gzip

    rel = "sub-01/ses-a/anat/sub-01_ses-a_space-subject_desc-preproc_FLAIR.nii.gz"
    work = tmp_path / "work_flair.nii"
    work.write_bytes(gzip.decompress((fake_output / rel).read_bytes()))
    expected = next(s for s in load_subject(fake_output, "01").sessions
                    if s.label == "a").load("flair")
    other = "sub-01/ses-b/anat/sub-01_ses-b_space-subject_desc-preproc_FLAIR.nii.gz"
    (fake_output / rel).unlink()
    subject = load_subject(fake_output, "01", images={rel: str(work), other: "/nowhere.nii"})
    a, b = (next(s for s in subject.sessions if s.label == x) for x in ("a", "b"))
    assert a.paths["flair"] == work and b.paths["flair"] == fake_output / other
    np.testing.assert_array_equal(a.load("flair"), expected)
    assert load_subject(fake_output, "01").sessions[0].paths["flair"] is None


def _work_images(fake_output: Path, work: Path) -> dict[str, list[str]]:
    """The fake subject's images as uncompressed work-dir files, as the report_views node gets
    them (lesion masks: the lesion-id images > 0, as the segmentation writes them)."""
    fields = {"flair": "flair", "trace": "dwi", "adc": "adc", "brain_mask": "brain"}
    files: dict[str, list[str]] = {}
    for ses in ("a", "b"):
        session = next(s for s in load_subject(fake_output, "01").sessions if s.label == ses)
        for field, key in fields.items():
            path = work / f"{field}_{ses}.nii"
            nib.save(nib.load(str(session.paths[key])), str(path))
            files.setdefault(field, []).append(str(path))
        for field, kind in (("flair_lesion", "flair"), ("restricted", "restricted")):
            ids = session.load(f"{kind}_dseg", dtype=None)
            path = work / f"{field}_{ses}.nii"
            nib.save(nib.Nifti1Image((ids > 0).astype(np.uint8), np.eye(4)), str(path))
            files.setdefault(field, []).append(str(path))
    return files


def _undated(html: str) -> str:
    return re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", "DATE", html)


def test_report_from_prepared_views_is_the_report_drawn_at_once(fake_output, tmp_path):
    # the report_views node extracts the slices (axial slice chosen from the lesion masks) and
    # draws the QC figure before tracking; the report node adds the lesion ids' contours
    # (lesion 2 is new: orange only if the ids, not the masks, are drawn): the same page
    from pipeline.reports.subject import PROBLEM_FILE, VIEWS_FILE, write_work_views

    work = tmp_path / "work"
    work.mkdir()
    files = _work_images(fake_output, work)
    views = write_work_views(tmp_path / "views", subject="01", labels=["a", "b"],
                             days=[0.0, 5.0], **files)
    assert (views / VIEWS_FILE).exists() and not (views / PROBLEM_FILE).exists()
    drawn = write_subject_report(fake_output, "01").read_text()
    prepared = write_subject_report(fake_output, "01", prepared=views).read_text()
    assert "could not be drawn" not in prepared
    assert _undated(prepared) == _undated(drawn)


def test_prepared_views_of_a_damaged_image_become_a_warning(fake_output, tmp_path):
    from pipeline.reports.subject import PROBLEM_FILE, write_work_views

    work = tmp_path / "work"
    work.mkdir()
    files = _work_images(fake_output, work)
    Path(files["flair"][1]).write_bytes(b"not a nifti")
    views = write_work_views(tmp_path / "views", subject="01", labels=["a", "b"],
                             days=[0.0, 5.0], **files)
    assert (views / PROBLEM_FILE).exists()
    html = write_subject_report(fake_output, "01", prepared=views).read_text()
    assert "the images could not be drawn" in html and "Lesion events per interval" in html
    assert len(_images(html)) == 2  # the trajectories only
