"""Workflow builders: one subject's longitudinal lesion workflow.

Builders only wire interfaces; every computation lives in pipeline/core behind the interfaces.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from pipeline.bids import SessionInputs, SubjectInputs, tracking_days
from pipeline.config import Config
from pipeline.interfaces.outputs import CompressImages, NativeMasks, WriteDerivatives
from pipeline.interfaces.preprocess import PrepareImage
from pipeline.interfaces.registration import (RegisterImages, RegisterToFirst, ResampleSession,
                                              SubjectSpace)
from pipeline.interfaces.segmentation import SegmentSessions
from pipeline.interfaces.session import LoadSession
from pipeline.interfaces.tracking import TrackLesions

SESSION_OUTPUTS = ("flair", "flair_mask", "b0", "trace", "adc", "dwi_mask", "dwi_to_flair",
                   "load_report", "reg_qc", "anat", "anat_mask")
RESAMPLED = ("flair", "brain_mask", "b0", "trace", "adc")


def init_session_wf(*, session: SessionInputs, config: Config, name: str = "session_wf",
                    to_first: bool = False, pyramid: bool | None = None):
    """Load and preprocess one session in its native spaces.

    Parameters
    ----------
    session
        The session's input files.
    config
        Pipeline configuration.
    name
        Workflow name.
    to_first
        Also register the session's anatomical reference to the first session's (step 1 of
        the subject space, node ``to_first``), as soon as both are ready, beside the other
        sessions' preprocessing. Needs the inputs ``inputnode.first_anat`` and
        ``inputnode.first_anat_mask`` (the first session's ``anat`` and ``anat_mask``), and
        ``inputnode.first_anat_pyramid`` (its ``anat_pyramid``).
    pyramid
        Build the registration pyramid of the anatomical image once, in its preprocessing node
        (output ``anat_pyramid``), for each of its registrations (DWI -> FLAIR, to the first
        session, and the later sessions' ``to_first`` for the first session) to read instead
        of building it again. ``None``: when this session's own steps register it.

    Outputs
    -------
    flair, flair_mask
        Bias-corrected FLAIR and its brain mask (native FLAIR grid).
    b0, trace, adc, dwi_mask
        Mean b0, trace DWI, ADC (um^2/s) and brain mask (native DWI grid).
    dwi_to_flair
        ITK transform resampling the DWI grid onto the FLAIR.
    anat, anat_mask
        The session's anatomical reference for the subject space (FLAIR, else b0).
    load_report, reg_qc
        JSON reports of loading (units, warnings) and of the DWI->FLAIR registration.
    to_first_xfm, to_first_result
        With ``to_first`` only: the registration to the first session (transform mapping
        first-session points to this session's, and the rest of the result as JSON).
    anat_pyramid
        With ``pyramid`` only: the registration pyramid of ``anat`` and ``anat_mask``.

    A session without FLAIR or without diffusion gives every output all the same: the missing
    images are LoadSession's all-NaN placeholders on the present contrast's grid, its masks
    are the present contrast's brain mask, and ``dwi_to_flair`` is the identity.
    """
    if session.flair is None and not session.has_diffusion:
        raise ValueError(f"ses-{session.session} of sub-{session.subject} has neither FLAIR nor DWI/ADC")
    threads = config.resources.omp_nthreads
    workflow = pe.Workflow(name=name)
    has_flair, has_dwi = session.flair is not None, session.has_diffusion
    if pyramid is None:
        pyramid = to_first or (has_flair and has_dwi)
    fields = (list(SESSION_OUTPUTS) + (["to_first_xfm", "to_first_result"] if to_first else [])
              + (["anat_pyramid"] if pyramid else []))
    outputnode = pe.Node(niu.IdentityInterface(fields=fields), name="outputnode")

    files = {k: str(v) for k in ("flair", "dwi", "bval", "bvec", "adc", "trace", "trace_sidecar")
             if (v := getattr(session, k)) is not None}
    params = config.to_dict()["inputs"]
    load = pe.Node(LoadSession(params=params, **files), name="load", mem_gb=1.0)
    workflow.connect(load, "report", outputnode, "load_report")
    pre = config.to_dict()["preprocessing"]
    # the anatomical image's registration pyramid is built with it (see ``pyramid``)
    anat_registration = {"registration": config.to_dict()["registration"]} if pyramid else {}

    if has_flair:
        prep_flair = pe.Node(PrepareImage(params=pre, n_threads=threads, **anat_registration),
                             name="prep_flair", n_procs=threads, mem_gb=1.0)
        workflow.connect([
            (load, prep_flair, [("flair", "in_file")]),
            (prep_flair, outputnode, [("out_file", "flair"), ("mask", "flair_mask"),
                                      ("out_file", "anat"), ("mask", "anat_mask")]),
        ])
    if has_dwi:
        # the b0's N4 field divides the trace too ([preprocessing] dwi_bias_correct): the ADC
        # (LoadSession's) is unchanged
        prep_dwi = pe.Node(PrepareImage(params=pre,
                                        bias_correct=config.preprocessing.dwi_bias_correct,
                                        n_threads=threads,
                                        **({} if has_flair else anat_registration)),
                           name="prep_dwi", n_procs=threads, mem_gb=0.5)
        workflow.connect([
            (load, prep_dwi, [("b0", "in_file"), ("trace", "trace")]),
            (prep_dwi, outputnode, [("mask", "dwi_mask"), ("out_file", "b0"),
                                    ("trace_out", "trace")]),
        ])
    else:
        # b0/trace (and the FLAIR of a session without one) are LoadSession's all-NaN
        # placeholders when the contrast is missing; masks then come from the present contrast.
        workflow.connect([(load, outputnode, [("b0", "b0"), ("trace", "trace")])])
    workflow.connect(load, "adc", outputnode, "adc")
    if not has_flair:  # DWI/ADC only: the b0 is the anatomical reference
        workflow.connect([
            (load, outputnode, [("flair", "flair")]),
            (prep_dwi, outputnode, [("mask", "flair_mask"), ("out_file", "anat"),
                                    ("mask", "anat_mask")]),
        ])
    if not has_dwi:  # FLAIR only
        workflow.connect(prep_flair, "mask", outputnode, "dwi_mask")
    if has_flair and has_dwi:
        reg = pe.Node(
            RegisterImages(params=config.to_dict()["registration"], n_threads=threads,
                           transform_type=config.registration.dwi_to_flair,
                           name=f"ses-{session.session} DWI to FLAIR"),
            name="dwi_to_flair", n_procs=threads, mem_gb=1.0,
        )
        workflow.connect([
            (prep_flair, reg, [("out_file", "fixed"), ("mask", "fixed_mask")]),
            (prep_dwi, reg, [("out_file", "moving"), ("mask", "moving_mask")]),
            (reg, outputnode, [("transform", "dwi_to_flair"), ("qc", "reg_qc")]),
        ])
        if pyramid:
            workflow.connect(prep_flair, "pyramid", reg, "fixed_pyramid")
    else:  # both images of the session share one grid: the DWI->FLAIR transform is identity
        workflow.connect([
            (load, outputnode, [("identity_xfm", "dwi_to_flair"), ("skipped_qc", "reg_qc")]),
        ])
    anat = prep_flair if has_flair else prep_dwi
    if pyramid:
        workflow.connect(anat, "pyramid", outputnode, "anat_pyramid")
    if to_first:
        inputnode = pe.Node(niu.IdentityInterface(
            fields=["first_anat", "first_anat_mask", "first_anat_pyramid"]), name="inputnode")
        register = pe.Node(
            RegisterToFirst(params=config.to_dict()["registration"], n_threads=threads),
            name="to_first", n_procs=threads, mem_gb=1.0,
        )
        workflow.connect([
            (inputnode, register, [("first_anat", "first"), ("first_anat_mask", "first_mask"),
                                   ("first_anat_pyramid", "first_pyramid")]),
            (anat, register, [("out_file", "in_file"), ("mask", "mask"), ("pyramid", "pyramid")]),
            (register, outputnode, [("transform", "to_first_xfm"), ("result", "to_first_result")]),
        ])
    return workflow


def _merge(name: str, n: int) -> pe.Node:
    return pe.Node(niu.Merge(n), name=name, run_without_submitting=True)


def _item(values, index):
    """``values[index]``: a connection function (Nipype runs it from its source). Nipype hands
    a one-item list output over as the item itself (a one-session subject's transforms): that
    is item 0."""
    if isinstance(values, (list, tuple)):
        return values[index]
    if index != 0:
        raise IndexError(f"item {index} of a single value")
    return values


def init_subject_wf(
    *, subject: SubjectInputs, config: Config, staging_dir: Path, name: str | None = None,
    report: Callable[..., str] | None = None,
    report_views: Callable[..., str] | None = None,
):
    """The whole longitudinal workflow of one subject.

    Parameters
    ----------
    subject
        The subject's sessions (ordered by day).
    config
        Pipeline configuration.
    staging_dir
        Folder the derivatives are written to; the caller moves it into OUTPUT_DIR once the
        workflow has succeeded, so that no half-written subject ever appears there.
    name
        Workflow name (default ``sub_<label>_wf``).
    report
        A function drawing the subject's report into its working directory, given as keyword
        arguments ``subject``, ``labels``, ``day_source``, ``config`` and the files the
        derivatives are made from (the inputs of WriteDerivatives of the same names); it
        returns the report's path. It runs as the node ``subject_report`` (a Nipype
        ``Function``: from its source, in an empty namespace) beside the compression of the
        derivatives. The runner passes :func:`pipeline.reports.node.subject_report_node`;
        None: no report node. (Injected, so that workflows never import the reports.)
    report_views
        With ``report``: a function extracting the report's image slices and drawing its
        registration QC figure into its working directory, given as keyword arguments
        ``subject``, ``labels``, ``days`` and the work-dir images ``flair``, ``trace``,
        ``adc``, ``brain_mask``, ``flair_lesion`` and ``restricted``; it returns that folder,
        which the report function gets as ``views``. It runs as the node ``report_views``
        after the segmentation, beside tracking, so that the report node after tracking
        draws less. The runner passes :func:`pipeline.reports.node.report_views_node`.

    Sessions may lack FLAIR or diffusion (see :func:`init_session_wf`); segmentation and tracking
    are told which (``has_flair``, ``has_dwi``). Sessions on the same day are
    spread 0.001 day apart for tracking (:func:`pipeline.bids.tracking_days`).

    Outputs
    -------
    Derivatives under ``staging_dir`` (see :class:`pipeline.interfaces.outputs.WriteDerivatives`).
    """
    sessions = subject.sessions
    n = len(sessions)
    has_flair = [s.flair is not None for s in sessions]
    has_dwi = [s.has_diffusion for s in sessions]
    # lesion tracking needs strictly increasing days: same-day sessions are set 0.001 day apart
    days = tracking_days([s.day for s in sessions])
    cfg = config.to_dict()
    threads = config.resources.omp_nthreads
    workflow = pe.Workflow(name=name or f"sub_{subject.subject}_wf")

    # the first session's pyramid is read by the later sessions' to_first nodes
    session_wfs = [
        init_session_wf(session=ses, config=config, name=f"ses_{ses.session}_wf", to_first=i > 0,
                        pyramid=True if n > 1 else None)
        for i, ses in enumerate(sessions)
    ]
    merges = {field: _merge(f"merge_{field}", n) for field in SESSION_OUTPUTS}
    for i, swf in enumerate(session_wfs, start=1):
        for field in SESSION_OUTPUTS:
            workflow.connect(swf, f"outputnode.{field}", merges[field], f"in{i}")
    # step 1 of the subject space (each later session registered to the first) runs in the
    # sessions' nodes, as soon as the two images are ready
    to_first = {field: _merge(f"merge_{field}", n - 1)
                for field in ("to_first_xfm", "to_first_result")} if n > 1 else {}
    for i, swf in enumerate(session_wfs[1:], start=1):
        workflow.connect(session_wfs[0], "outputnode.anat", swf, "inputnode.first_anat")
        workflow.connect(session_wfs[0], "outputnode.anat_mask", swf, "inputnode.first_anat_mask")
        workflow.connect(session_wfs[0], "outputnode.anat_pyramid", swf,
                         "inputnode.first_anat_pyramid")
        for field, merge in to_first.items():
            workflow.connect(swf, f"outputnode.{field}", merge, f"in{i}")

    labels = [s.session for s in sessions]
    # the subject space waits for every session and every later node waits for it: its
    # template registrations run side by side on the processes MultiProc would otherwise
    # leave idle
    workers = max(1, min(n, config.resources.nprocs // threads))
    space = pe.Node(
        SubjectSpace(params=cfg["registration"], labels=labels, n_threads=threads,
                     n_workers=workers),
        name="subject_space", n_procs=threads * workers, mem_gb=2.0,
    )
    workflow.connect([
        (merges["anat"], space, [("out", "in_files")]),
        (merges["anat_mask"], space, [("out", "masks")]),
    ])
    if to_first:
        workflow.connect([
            (to_first["to_first_xfm"], space, [("out", "to_first_xfms")]),
            (to_first["to_first_result"], space, [("out", "to_first_results")]),
        ])
        # the template registrations take each session's pyramid too
        pyramids = _merge("merge_anat_pyramid", n)
        for i, swf in enumerate(session_wfs, start=1):
            workflow.connect(swf, "outputnode.anat_pyramid", pyramids, f"in{i}")
        workflow.connect(pyramids, "out", space, "pyramids")

    # the subject-space b0 is read only by the segment node, and only for a session without
    # FLAIR (its reference regions); it is not a derivative: resampled only when needed
    fields = RESAMPLED if not all(has_flair) else tuple(f for f in RESAMPLED if f != "b0")
    resampled = {field: _merge(f"merge_std_{field}", n) for field in fields}
    # the native FLAIR's slab edge in the subject space, for the segment node's no-seed zone
    # (a work file, not a derivative); not made when the rule is off
    fov = config.segmentation.flair_fov_edge_no_seed_mm > 0
    fov_kw = ({"fov_min_slice_mm": config.segmentation.flair_fov_edge_min_slice_mm,
               "fov_ends": config.segmentation.flair_fov_edge_ends} if fov else {})
    fov_edges = _merge("merge_std_flair_fov_edge", n) if fov else None
    # each session's native DWI in-plane voxel: the reach of the restricted edge step
    dwi_inplane = _merge("merge_dwi_inplane", n)
    for i, swf in enumerate(session_wfs):
        resample = pe.Node(ResampleSession(**fov_kw), name=f"resample_{sessions[i].session}",
                           mem_gb=1.0)
        workflow.connect([
            # the session's transform picked from the list on the edge (a connection
            # function), not by a Select node run between the two
            (space, resample, [(("transforms", _item, i), "subject_xfm"),
                               ("reference", "reference")]),
            (swf, resample, [("outputnode.flair", "flair"), ("outputnode.flair_mask", "flair_mask"),
                             ("outputnode.trace", "trace"),
                             ("outputnode.adc", "adc"), ("outputnode.dwi_to_flair", "dwi_to_flair"),
                             ("outputnode.dwi_mask", "dwi_mask")]),
        ])
        if "b0" in fields:
            workflow.connect(swf, "outputnode.b0", resample, "b0")
        for field in fields:
            workflow.connect(resample, field, resampled[field], f"in{i + 1}")
        if fov:
            workflow.connect(resample, "flair_fov_edge", fov_edges, f"in{i + 1}")
        workflow.connect(resample, "dwi_inplane_mm", dwi_inplane, f"in{i + 1}")

    # numpy/scipy run one thread per call: the segment node threads over sessions instead
    seg_workers = max(1, min(n, config.resources.nprocs))
    segment = pe.Node(
        SegmentSessions(segmentation=cfg["segmentation"], dynamics=cfg["dynamics"],
                        labels=labels, has_flair=has_flair, has_dwi=has_dwi,
                        n_workers=seg_workers),
        name="segment", n_procs=seg_workers, mem_gb=2.0,
    )
    for field in fields:
        workflow.connect(resampled[field], "out", segment, field)
    if fov:
        workflow.connect(fov_edges, "out", segment, "flair_fov_edge")
    workflow.connect(dwi_inplane, "out", segment, "dwi_inplane_mm")

    track = pe.Node(
        TrackLesions(tracking=cfg["tracking"], dynamics=cfg["dynamics"], labels=labels,
                     days=days, has_flair=has_flair, has_dwi=has_dwi),
        name="track", mem_gb=2.0,
    )
    workflow.connect([
        (segment, track, [("flair_lesion", "flair_lesion"), ("restricted", "restricted"),
                          ("shine_through", "shine_through"), ("radc", "radc"),
                          ("references", "references")]),
        (resampled["adc"], track, [("out", "adc")]),
    ])

    views = None
    if report is not None and report_views is not None:
        # the slices and the QC figure need no tracking: drawn beside the track node. Made
        # before the nodes below that also wait only for the segment node: MultiProc gives a
        # free processor to the ready node it numbered first (Nipype numbers a node's
        # successors in the order they were connected), and this one starts the report's
        # chain (report_views -> subject_report), the run's last node; native_masks and the
        # compression feed only write_derivatives (benchmarks/results/end_to_end.md,
        # session 14 P)
        view_files = [(resampled[field], [("out", field)])
                      for field in ("flair", "trace", "adc", "brain_mask")]
        view_files.append((segment, [("flair_lesion", "flair_lesion"),
                                     ("restricted", "restricted")]))
        views = pe.Node(
            niu.Function(function=report_views, output_names=["views"],
                         input_names=["subject", "labels", "days",
                                      *(dest for _, pairs in view_files for _, dest in pairs)]),
            name="report_views", mem_gb=1.0, overwrite=True,
        )
        views.inputs.trait_set(subject=subject.subject, labels=labels, days=days)
        workflow.connect([(src, views, pairs) for src, pairs in view_files])

    native = pe.Node(NativeMasks(), name="native_masks", mem_gb=1.0)
    workflow.connect([
        (segment, native, [("flair_lesion", "flair_lesion"), ("restricted", "restricted")]),
        (space, native, [("transforms", "subject_xfms")]),
        (merges["dwi_to_flair"], native, [("out", "dwi_to_flair")]),
        (merges["flair"], native, [("out", "native_flair")]),
        (merges["adc"], native, [("out", "native_dwi")]),
    ])

    # the derivatives that do not wait for tracking are gzipped in workers ahead of it: the
    # resampled images beside the segment node (which starts one worker short), the segment
    # node's beside the track node
    groups = {"resampled": [(resampled[field], "out")
                            for field in ("flair", "trace", "adc", "brain_mask")],
              "segmented": [(segment, field)
                            for field in ("radc", "flair_lesion", "restricted", "shine_through")]}
    compressed = _merge("merge_compressed", len(groups))
    for k, (group, sources) in enumerate(groups.items(), start=1):
        to_compress = pe.Node(niu.Merge(len(sources), ravel_inputs=True),
                              name=f"merge_compress_{group}", run_without_submitting=True)
        for j, (src, field) in enumerate(sources, start=1):
            workflow.connect(src, field, to_compress, f"in{j}")
        compress = pe.Node(CompressImages(), name=f"compress_{group}", mem_gb=0.5)
        workflow.connect(to_compress, "out", compress, "in_files")
        workflow.connect(compress, "compressed", compressed, f"in{k}")

    sink = pe.Node(
        WriteDerivatives(out_dir=str(staging_dir), subject=subject.subject, labels=labels,
                         days=days, config=cfg, day_source=subject.day_source,
                         n_threads=config.resources.nprocs),
        name="write_derivatives", run_without_submitting=True, overwrite=True,
    )
    # what both the derivatives and the report are made from
    subject_files = [
        (resampled["flair"], [("out", "flair")]),
        (resampled["trace"], [("out", "trace")]),
        (resampled["adc"], [("out", "adc")]),
        (resampled["brain_mask"], [("out", "brain_mask")]),
        (segment, [("radc", "radc"), ("flair_lesion", "flair_lesion"),
                   ("restricted", "restricted")]),
        (track, [("flair_dseg", "flair_dseg"), ("restricted_dseg", "restricted_dseg"),
                 ("diffusion_dseg", "diffusion_dseg"),
                 ("sessions_table", "sessions_table"), ("lesions_table", "lesions_table"),
                 ("events_table", "events_table"), ("lineage_table", "lineage_table"),
                 ("summary_table", "summary_table")]),
        (space, [("qc", "subject_space_qc")]),
        (merges["reg_qc"], [("out", "dwi_to_flair_qc")]),
        (merges["load_report"], [("out", "load_reports")]),
    ]
    # Nipype keeps and extends the list it is given: each edge gets its own copy
    workflow.connect([(src, sink, list(pairs)) for src, pairs in subject_files] + [
        (segment, sink, [("shine_through", "shine_through")]),
        (native, sink, [("flair_lesion", "native_flair_lesion"),
                        ("restricted", "native_restricted")]),
        (space, sink, [("transforms", "subject_xfms")]),
        (merges["dwi_to_flair"], sink, [("out", "dwi_to_flair")]),
        (compressed, sink, [("out", "compressed")]),
    ])

    if report is not None:
        # the HTML report is drawn from the same files beside the compression and the
        # derivatives (the runner publishes it); rerun every time, as the report was when
        # written after the run
        fields = [dest for _, pairs in subject_files for _, dest in pairs]
        node = pe.Node(
            niu.Function(function=report, output_names=["report"],
                         input_names=["subject", "labels", "day_source", "config", *fields,
                                      *(["views"] if report_views is not None else [])]),
            name="subject_report", mem_gb=1.0, overwrite=True,
        )
        node.inputs.trait_set(subject=subject.subject, labels=labels, config=cfg,
                              day_source=subject.day_source)
        workflow.connect([(src, node, list(pairs)) for src, pairs in subject_files])
        if views is not None:
            workflow.connect(views, "views", node, "views")
    return workflow
