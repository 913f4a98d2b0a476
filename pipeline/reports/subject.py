"""Per-subject HTML report: OUTPUT_DIR/sub-X.html, one self-contained file.

It redraws the case report's Figure 1 from the derivatives (DWI, ADC and FLAIR per session with
the lesions outlined, new or enlarging ones in orange), plots the trajectories, shows the
registration QC, the tables, every warning of the run and a methods paragraph written from the
configuration that was actually used.
"""

from __future__ import annotations

import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

from pipeline import __version__
from pipeline.io import atomic_path
from pipeline.reports.data import TABLES, SubjectDerivatives, load_subject, session_files
from pipeline.reports.embed import (environment, figure_data_uri, figure_png, png_data_uri,
                                    table_html)
from pipeline.reports.mosaic import (extract_views, load_views, plot_mosaic,
                                     plot_registration_qc, save_views, with_lesion_ids)
from pipeline.reports.qc import (collect_warnings, input_notes, methods_paragraphs,
                                 registration_table)
from pipeline.reports.trajectories import lesion_histories, subject_trajectories

TABLE_TITLES = (("sessions", "Sessions over time", True),
                ("events", "Lesion events per interval", False),
                ("lineage", "Lesion lineage", False),
                ("summary", "Lesions: nadir and pseudonormalization", True),
                ("lesions", "Lesions over time", False))

#: what :func:`write_work_views` leaves in its folder for the report (see ``prepared`` below)
VIEWS_FILE = "views.npz"
QC_FIGURE_FILE = "registration_qc.png"
PROBLEM_FILE = "problem.txt"
QC_DPI = 80


def _has_images(subject: SubjectDerivatives) -> bool:
    return any(s.paths.get(k) for s in subject.sessions for k in ("flair", "dwi", "adc"))


def _trajectory_figures(subject: SubjectDerivatives) -> list[dict]:
    sessions, lesions = subject.tables["sessions"], subject.tables["lesions"]
    return [
        {"uri": figure_data_uri(subject_trajectories(sessions, subject.config)),
         "alt": "volume and rADC trajectories",
         "caption": "Left: FLAIR-lesion, restricted and ever-restricted volume. Middle: mean "
                    "rADC (ADC / normal-appearing white matter ADC) in the lesions; the green "
                    "band is the pseudonormal range of the configuration. Right: fraction of the "
                    "ever-restricted tissue whose rADC is no longer below the restriction "
                    "cut-off."},
        {"uri": figure_data_uri(lesion_histories(lesions, subject.config)),
         "alt": "per-lesion histories",
         "caption": "Per lesion id (largest first): FLAIR-lesion and restricted-lesion volume "
                    "while present, and the rADC of the tissue each restricted lesion first "
                    "occupied."},
    ]


def _tables(subject: SubjectDerivatives) -> list[dict]:
    out = []
    for key, title, is_open in TABLE_TITLES:
        frame = subject.tables[key]
        out.append({"title": title, "rows": len(frame), "open": is_open,
                    "file": subject.table_path(key).relative_to(subject.output_dir).as_posix(),
                    "html": table_html(frame)})
    return out


def _image_problem(exc: Exception) -> str:
    return f"the images could not be drawn ({type(exc).__name__}: {exc})"


def _image_figures(subject: SubjectDerivatives, problems: list[str],
                   prepared: Path | None = None) -> dict:
    """Mosaic and registration QC; a failure becomes a warning instead of a lost report.

    ``prepared``: a folder of :func:`write_work_views` (the slices and the QC figure drawn
    before tracking ended): only the mosaic is drawn here. None: everything is."""
    none = {"mosaic": None, "qc_figure": None, "lesion_slice": None}
    if not _has_images(subject):
        return none
    try:
        if prepared is None:
            views = extract_views(subject)
            qc_figure = figure_data_uri(plot_registration_qc(subject, views), dpi=QC_DPI)
        elif (prepared / PROBLEM_FILE).exists():
            problems.append((prepared / PROBLEM_FILE).read_text(encoding="utf-8"))
            return none
        else:
            views = with_lesion_ids(load_views(prepared / VIEWS_FILE), subject)
            qc_figure = png_data_uri((prepared / QC_FIGURE_FILE).read_bytes())
        fig = plot_mosaic(subject, views)
        return {"mosaic": figure_data_uri(fig), "lesion_slice": fig.lesion_slice,
                "qc_figure": qc_figure}
    except Exception as exc:  # a damaged image must not cost the tables and warnings
        problems.append(_image_problem(exc))
        return none


def _plots(subject: SubjectDerivatives) -> tuple[list[dict], list[str]]:
    """The trajectory figures and the problems met drawing them."""
    try:
        return _trajectory_figures(subject), []
    except Exception as exc:  # an odd table must not cost the rest of the report
        return [], [f"the trajectories could not be drawn ({type(exc).__name__}: {exc})"]


def _figures(subject: SubjectDerivatives,
             prepared: Path | None = None) -> tuple[dict, list[dict], list[str]]:
    """The image figures and the trajectory figures, drawn at the same time: the trajectories
    in a forked child (which inherits matplotlib and the loaded tables), the images here.

    matplotlib holds the GIL while it draws, so a thread would not overlap the two; in the
    participant run the report is the last node and the other core is free (~1.5 s of the
    ~4 s). Returns the image figures, the trajectory figures and the problems (images first).
    ``prepared``: see :func:`_image_figures`.
    """
    problems: list[str] = []
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        plotted = pool.submit(_plots, subject)
        images = _image_figures(subject, problems, prepared)
        trajectories, plot_problems = plotted.result()
    return images, trajectories, problems + plot_problems


def render_subject_report(subject: SubjectDerivatives, prepared: Path | None = None) -> str:
    """The HTML text of a subject's report.

    Parameters
    ----------
    subject : SubjectDerivatives
        See :func:`pipeline.reports.data.load_subject`.
    prepared : Path, optional
        The folder of :func:`write_work_views` for this subject: its slices and QC figure
        are used instead of being drawn here (the page is the same).

    Returns
    -------
    str
        A complete HTML document with every image embedded. Figures that cannot be drawn
        are listed among the warnings.
    """
    images, trajectories, problems = _figures(subject, prepared)
    return environment().get_template("subject.html").render(
        subject=subject.subject, version=__version__,
        created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        n_sessions=len(subject.sessions),
        days=", ".join(f"{s.day:g}" for s in subject.sessions),
        warnings=collect_warnings(subject) + problems, trajectories=trajectories,
        registration=table_html(registration_table(subject)),
        inputs=table_html(input_notes(subject)), tables=_tables(subject),
        methods=methods_paragraphs(subject), **images,
    )


def write_subject_report(output_dir: Path, subject: str, sources: dict[str, str] | None = None,
                         images: dict[str, str] | None = None,
                         prepared: Path | None = None) -> Path:
    """Write OUTPUT_DIR/sub-X.html from the subject's derivatives.

    Parameters
    ----------
    output_dir : Path
        The pipeline's OUTPUT_DIR (holding ``sub-X/``).
    subject : str
        Subject label, with or without ``sub-``.
    sources : dict, optional
        Uncompressed copies of the images to read instead (see
        :func:`pipeline.reports.data.load_subject`).
    images : dict, optional
        The work-dir images of derivatives not written yet (see
        :func:`pipeline.reports.data.load_subject`).
    prepared : Path, optional
        See :func:`render_subject_report`.

    Returns
    -------
    Path
        The report written (atomically).
    """
    output_dir = Path(output_dir)
    derivatives = load_subject(output_dir, subject, sources, images)
    html = render_subject_report(derivatives, prepared)
    dst = output_dir / f"sub-{derivatives.subject}.html"
    with atomic_path(dst) as tmp:
        tmp.write_text(html, encoding="utf-8")
        tmp.chmod(0o644)  # a report is for reading (the temporary file is private)
    return dst


def _work_images(subject: str, labels: list[str], files: dict) -> dict[str, str]:
    """Each work-dir image of ``files`` under the derivative name it is being written to (the
    report finds its images by those names, :data:`pipeline.reports.data.IMAGES`)."""
    from pipeline.interfaces.outputs import SUBJECT_SPACE_IMAGES, subject_space_derivative

    return {subject_space_derivative(subject, ses, field): files[field][i]
            for field in SUBJECT_SPACE_IMAGES if field in files
            for i, ses in enumerate(labels)}


def write_work_views(root: Path, *, subject: str, labels: list[str], days: list[float],
                     **files) -> Path:
    """Extract the report's image slices and draw its registration QC figure from the
    work-dir images, before tracking has ended.

    The participant workflow runs this (:func:`pipeline.reports.node.report_views_node`)
    beside the track node; the report node then draws only the mosaic's contours (which need
    the lesion ids and events of tracking), the trajectories and the page
    (:func:`write_work_report` with ``views=root``). The axial slice is chosen from the lesion
    masks, which is the choice from the lesion-id images (see
    :func:`pipeline.reports.mosaic.with_lesion_ids`).

    Parameters
    ----------
    root : Path
        Folder to write in (emptied first): ``views.npz`` (the slices,
        :func:`pipeline.reports.mosaic.save_views`) and ``registration_qc.png``; or
        ``problem.txt`` (the warning the report shows) when the images cannot be drawn;
        nothing when the subject has no image.
    subject, labels, days
        Subject label (without ``sub-``), session labels and their days (in day order; the
        days label the QC figure's rows).
    **files
        Work-dir images (one per session) of the fields of
        :data:`pipeline.interfaces.outputs.SUBJECT_SPACE_IMAGES`: the report's images and
        lesion masks (``flair``, ``trace``, ``adc``, ``brain_mask``, ``flair_lesion``,
        ``restricted``).

    Returns
    -------
    Path
        ``root``.
    """
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    images = _work_images(subject, labels, files)
    sessions = sorted((session_files(root, subject, label, float(day), images=images)
                       for label, day in zip(labels, days)), key=lambda s: s.day)
    derivatives = SubjectDerivatives(subject=subject, output_dir=root, tables={}, qc={},
                                     sessions=sessions)
    if not _has_images(derivatives):
        return root
    try:
        views = extract_views(derivatives)
        save_views(views, root / VIEWS_FILE)
        qc_png = figure_png(plot_registration_qc(derivatives, views), dpi=QC_DPI)
        (root / QC_FIGURE_FILE).write_bytes(qc_png)
    except Exception as exc:  # shown among the report's warnings, as when drawn there
        (root / PROBLEM_FILE).write_text(_image_problem(exc), encoding="utf-8")
    return root


def write_work_report(root: Path, *, subject: str, labels: list[str], day_source: str,
                      config: dict, views: str | None = None, **files) -> Path:
    """Draw a subject's report from the work-dir files its derivatives are written from.

    The participant workflow runs this (:func:`pipeline.reports.node.subject_report_node`)
    while the derivatives are compressed and written, so that the run's last seconds keep
    both cores busy; the page is the one :func:`write_subject_report` draws from the published
    derivatives (only its date differs).

    Parameters
    ----------
    root : Path
        Folder to draw in (emptied first): the tables and the QC report are written under
        ``root/sub-X/`` with their derivative names (the report's links and checks use them),
        the report is ``root/sub-X.html``.
    subject, labels, day_source, config
        Subject label (without ``sub-``), session labels, where the days came from and the
        configuration as a dict.
    views : str, optional
        The folder :func:`write_work_views` drew in for this subject: the report uses its
        slices and QC figure.
    **files
        The subject files of :class:`pipeline.interfaces.outputs.WriteDerivatives` (same
        names): one image per session for the fields of
        :data:`pipeline.interfaces.outputs.SUBJECT_SPACE_IMAGES` the report shows, the tables
        ``<key>_table`` for each key of :data:`pipeline.reports.data.TABLES`, and the QC
        inputs ``subject_space_qc``, ``dwi_to_flair_qc``, ``load_reports``.

    Returns
    -------
    Path
        ``root/sub-X.html``.
    """
    from pipeline.interfaces.outputs import QC_REPORT, qc_report_text

    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    subj_dir = root / f"sub-{subject}"
    subj_dir.mkdir(parents=True)
    for key, name in TABLES.items():
        shutil.copyfile(files[f"{key}_table"], subj_dir / f"sub-{subject}_{name}.tsv")
    qc = SimpleNamespace(labels=labels, day_source=day_source, config=config, **files)
    (subj_dir / f"sub-{subject}_{QC_REPORT}").write_text(qc_report_text(qc))
    return write_subject_report(root, subject, images=_work_images(subject, labels, files),
                                prepared=Path(views) if views else None)
