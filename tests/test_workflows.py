"""Workflow construction on a skeleton dataset, without running anything (fmriprep style)."""

from __future__ import annotations

import pytest

from conftest import make_skeleton
from pipeline.bids import discover
from pipeline.config import load_config
from pipeline.reports.node import report_views_node, subject_report_node
from pipeline.workflows.base import init_session_wf, init_subject_wf


@pytest.mark.parametrize("n_sessions", [1, 2, 4])
def test_subject_workflow_expands(tmp_path, n_sessions):
    sessions = [f"day{d}" for d in (0, 3, 8, 45)[:n_sessions]]
    (subject,) = discover(make_skeleton(tmp_path / "bids", sessions=sessions))
    wf = init_subject_wf(subject=subject, config=load_config(), staging_dir=tmp_path / "stage",
                         report=subject_report_node, report_views=report_views_node)
    graph = wf._create_flat_graph()
    names = {node.fullname.split(".", 1)[1] for node in graph.nodes}
    for ses in sessions:
        for node in ("load", "prep_flair", "prep_dwi", "dwi_to_flair"):
            assert f"ses_{ses}_wf.{node}" in names
        assert f"resample_{ses}" in names
    for node in ("subject_space", "segment", "track", "native_masks", "compress_resampled",
                 "compress_segmented", "write_derivatives", "subject_report", "report_views"):
        assert node in names
    # every mandatory input of every node is connected or set
    for node in graph.nodes:
        connected = {dest for _, _, data in graph.in_edges(node, data=True)
                     for _, dest in data["connect"]}
        for name, trait in node.inputs.traits(mandatory=True).items():
            value = getattr(node.inputs, name)
            assert name in connected or value is not None and str(value) != "<undefined>", (
                f"{node.fullname}.{name} is mandatory but neither set nor connected")
    # the report node (a Function: no mandatory inputs) gets every file the derivatives are
    # made from, and its function's own inputs
    from pipeline.interfaces.outputs import _SubjectFilesInputSpec

    (report,) = [node for node in graph.nodes if node.name == "subject_report"]
    connected = {dest for _, _, data in graph.in_edges(report, data=True)
                 for _, dest in data["connect"]}
    spec = set(_SubjectFilesInputSpec().copyable_trait_names())
    assert connected == spec - {"subject", "labels", "day_source", "config"} | {"views"}
    for name in ("subject", "labels", "day_source", "config"):
        assert str(getattr(report.inputs, name)) != "<undefined>", name
    # the report's slices are taken beside tracking: from the images and masks, not the ids
    (views,) = [node for node in graph.nodes if node.name == "report_views"]
    sources = {src.name for src, _ in graph.in_edges(views)}
    assert "track" not in sources and "segment" in sources
    assert {dest for _, _, data in graph.in_edges(views, data=True)
            for _, dest in data["connect"]} == {"flair", "trace", "adc", "brain_mask",
                                                "flair_lesion", "restricted"}
    for name in ("subject", "labels", "days"):
        assert str(getattr(views.inputs, name)) != "<undefined>", name
    without = init_subject_wf(subject=subject, config=load_config(),
                              staging_dir=tmp_path / "stage", report=subject_report_node)
    assert without.get_node("report_views") is None
    assert init_subject_wf(subject=subject, config=load_config(),
                           staging_dir=tmp_path / "stage").get_node("subject_report") is None


def test_report_chain_first_after_segment(tmp_path):
    """MultiProc gives free processors to ready nodes in the order Nipype numbers them (the
    topological sort of the expanded graph, as in Workflow.run): when the segment node ends,
    the two chains to the run's last node (track and report_views, both before
    subject_report) come before native_masks and the compression, which feed only
    write_derivatives."""
    from copy import deepcopy

    from nipype.pipeline.engine.utils import generate_expanded_graph, topological_sort

    (subject,) = discover(make_skeleton(tmp_path / "bids", sessions=["day0", "day3", "day8"]))
    wf = init_subject_wf(subject=subject, config=load_config(), staging_dir=tmp_path / "stage",
                         report=subject_report_node, report_views=report_views_node)
    procs, _ = topological_sort(generate_expanded_graph(deepcopy(wf._create_flat_graph())))
    order = [node.name for node in procs]
    for late in ("native_masks", "compress_segmented"):
        assert order.index("track") < order.index(late)
        assert order.index("report_views") < order.index(late)


def test_affine_dwi_to_flair_from_config(tmp_path):
    (subject,) = discover(make_skeleton(tmp_path / "bids", sessions=["day0"]))
    config = load_config().replace("registration", dwi_to_flair="affine")
    wf = init_session_wf(session=subject.sessions[0], config=config)
    assert wf.get_node("dwi_to_flair").inputs.transform_type == "affine"


def test_flair_only_session_workflow(tmp_path):
    (subject,) = discover(make_skeleton(tmp_path / "bids", sessions=["day0"],
                                        files=("anat/{p}_FLAIR.nii.gz",)))
    wf = init_session_wf(session=subject.sessions[0], config=load_config())
    assert wf.get_node("dwi_to_flair") is None and wf.get_node("prep_flair") is not None


@pytest.mark.parametrize(("nprocs", "threads", "workers"), [(2, 1, 2), (4, 2, 2), (2, 2, 1), (8, 1, 4)])
def test_subject_space_workers_fill_the_processes(tmp_path, nprocs, threads, workers):
    # the subject space is a barrier node: its registrations run on every MultiProc process
    # (nprocs // omp_nthreads workers, at most one per session) and it reserves them
    (subject,) = discover(make_skeleton(tmp_path / "bids", sessions=["day0", "day3", "day8", "day45"]))
    config = load_config().replace("resources", nprocs=nprocs, omp_nthreads=threads)
    node = init_subject_wf(subject=subject, config=config,
                           staging_dir=tmp_path / "stage").get_node("subject_space")
    assert node.inputs.n_workers == workers
    assert node.inputs.n_threads == threads
    assert node.n_procs == workers * threads


def test_dwi_step_gets_its_own_sampling_strategy():
    # the DWI -> FLAIR step samples at random, the cross-session steps on a jittered grid
    # (benchmarks/results/registration.md); both reach register_rigid as sampling_strategy
    from pipeline.interfaces.registration import registration_kwargs

    params = load_config().replace("registration", sampling_strategy="regular",
                                   dwi_sampling_strategy="random").to_dict()["registration"]
    assert registration_kwargs(params)["sampling_strategy"] == "regular"
    assert registration_kwargs(params, dwi=True)["sampling_strategy"] == "random"
    assert "dwi_sampling_strategy" not in registration_kwargs(params, dwi=True)


@pytest.mark.parametrize("without_flair", [False, True])
def test_b0_resampled_only_for_sessions_without_flair(tmp_path, without_flair):
    # the subject-space b0 only sets the reference regions of a session without FLAIR: with a
    # FLAIR in every session no b0 is resampled and the segment node gets none
    root = make_skeleton(tmp_path / "bids", sessions=["day0", "day3"])
    if without_flair:
        (root / "sub-01" / "ses-day3" / "anat" / "sub-01_ses-day3_FLAIR.nii.gz").unlink()
    (subject,) = discover(root)
    wf = init_subject_wf(subject=subject, config=load_config(), staging_dir=tmp_path / "stage",
                         report=subject_report_node)
    graph = wf._create_flat_graph()

    def inputs_of(name):
        node = next(n for n in graph.nodes if n.fullname.endswith(f".{name}"))
        return {dest for _, _, data in graph.in_edges(node, data=True)
                for _, dest in data["connect"]}

    for ses in ("day0", "day3"):
        assert ("b0" in inputs_of(f"resample_{ses}")) == without_flair
        assert {"flair", "trace", "adc"} <= inputs_of(f"resample_{ses}")
    assert ("b0" in inputs_of("segment")) == without_flair
    assert {"flair", "brain_mask", "trace", "adc"} <= inputs_of("segment")


@pytest.mark.parametrize("without_flair", [False, True])
def test_registrations_to_the_first_session_run_in_the_sessions(tmp_path, without_flair):
    # step 1 of the subject space (each later session to the first) is a node of each later
    # session, fed by the first session's anatomical reference and its own (the b0 without a
    # FLAIR), so that MultiProc runs it beside the other sessions' preprocessing; the
    # subject_space node takes the results in session order
    sessions = ["day0", "day3", "day8"]
    root = make_skeleton(tmp_path / "bids", sessions=sessions)
    if without_flair:
        (root / "sub-01" / "ses-day8" / "anat" / "sub-01_ses-day8_FLAIR.nii.gz").unlink()
    (subject,) = discover(root)
    from nipype.pipeline.engine.utils import generate_expanded_graph

    # the graph that runs: without the identity (inputnode/outputnode) nodes
    graph = generate_expanded_graph(init_subject_wf(
        subject=subject, config=load_config(), staging_dir=tmp_path / "stage")._create_flat_graph())
    nodes = {node.fullname.split(".", 1)[1]: node for node in graph.nodes}
    assert "ses_day0_wf.to_first" not in nodes

    def sources(name):
        return {(src.fullname.split(".", 1)[1], out, dest)
                for src, _, data in graph.in_edges(nodes[name], data=True)
                for out, dest in data["connect"]}

    for ses in sessions[1:]:
        own = "prep_dwi" if without_flair and ses == "day8" else "prep_flair"
        assert sources(f"ses_{ses}_wf.to_first") == {
            ("ses_day0_wf.prep_flair", "out_file", "first"),
            ("ses_day0_wf.prep_flair", "mask", "first_mask"),
            ("ses_day0_wf.prep_flair", "pyramid", "first_pyramid"),
            (f"ses_{ses}_wf.{own}", "out_file", "in_file"),
            (f"ses_{ses}_wf.{own}", "mask", "mask"),
            (f"ses_{ses}_wf.{own}", "pyramid", "pyramid")}
    # each anatomical image's registration pyramid is built once, by its preprocessing node,
    # and read by its DWI -> FLAIR registration (the FLAIR is the fixed image) too
    registration = load_config().to_dict()["registration"]
    for ses in sessions:
        # the b0's bias field divides the trace too ([preprocessing] dwi_bias_correct): the
        # resampled trace (and b0) are prep_dwi's, the ADC is LoadSession's
        assert nodes[f"ses_{ses}_wf.prep_dwi"].inputs.bias_correct is True
        assert (f"ses_{ses}_wf.load", "trace", "trace") in sources(f"ses_{ses}_wf.prep_dwi")
        into = {dest: (src, out) for src, out, dest in sources(f"resample_{ses}")}
        assert into["trace"] == (f"ses_{ses}_wf.prep_dwi", "trace_out")
        assert into["adc"] == (f"ses_{ses}_wf.load", "adc")
        own = "prep_dwi" if without_flair and ses == "day8" else "prep_flair"
        assert nodes[f"ses_{ses}_wf.{own}"].inputs.registration == registration
        if own == "prep_flair":
            assert not nodes[f"ses_{ses}_wf.prep_dwi"].inputs.registration
            assert (f"ses_{ses}_wf.prep_flair", "pyramid", "fixed_pyramid") in sources(
                f"ses_{ses}_wf.dwi_to_flair")
    into_space = {dest: src for src, _, dest in sources("subject_space")}
    assert into_space["to_first_xfms"] == "merge_to_first_xfm"
    assert into_space["to_first_results"] == "merge_to_first_result"
    for field in ("xfm", "result"):
        assert sources(f"merge_to_first_{field}") == {
            (f"ses_{ses}_wf.to_first", "transform" if field == "xfm" else "result", f"in{i}")
            for i, ses in enumerate(sessions[1:], start=1)}


def test_each_resample_node_gets_its_sessions_subject_transform(tmp_path):
    # the session's transform is picked from subject_space's list on the edge itself (a
    # connection function), without a bookkeeping node between the two
    from nipype.pipeline.engine.utils import evaluate_connect_function, generate_expanded_graph

    sessions = ["day0", "day3", "day8"]
    (subject,) = discover(make_skeleton(tmp_path / "bids", sessions=sessions))
    graph = generate_expanded_graph(init_subject_wf(
        subject=subject, config=load_config(), staging_dir=tmp_path / "stage")._create_flat_graph())
    nodes = {node.fullname.split(".", 1)[1]: node for node in graph.nodes}
    assert not [name for name in nodes if name.startswith("select_")]
    transforms = [f"xfm_{i:02d}.txt" for i in range(len(sessions))]
    for i, ses in enumerate(sessions):
        (edge,) = [data["connect"] for src, _, data in graph.in_edges(nodes[f"resample_{ses}"],
                                                                        data=True)
                   if src.name == "subject_space"]
        picked = {dest: (evaluate_connect_function(out[1], out[2], transforms)
                         if isinstance(out, tuple) else out) for out, dest in edge}
        assert picked == {"subject_xfm": transforms[i], "reference": "reference"}


def test_item_takes_a_one_item_output_as_its_item():
    """The subject space's transforms reach each resample node through ``_item``; Nipype hands
    a one-session subject's one-item list over as the path itself (not its first character)."""
    from pipeline.workflows.base import _item

    assert _item(["xfm_00.txt", "xfm_01.txt"], 1) == "xfm_01.txt"
    assert _item("/work/xfm_00.txt", 0) == "/work/xfm_00.txt"
    with pytest.raises(IndexError):
        _item("/work/xfm_00.txt", 1)


@pytest.mark.parametrize("no_seed_mm", [15.0, 0.0])
def test_fov_edge_reaches_the_segment_node(tmp_path, no_seed_mm):
    # each resample node writes its FLAIR's slab edge in the subject space (told which grids
    # have one), the segment node gets them in session order; with the rule off nothing is made
    root = make_skeleton(tmp_path / "bids", sessions=["day0", "day3", "day8"])
    (subject,) = discover(root)
    config = load_config().replace("segmentation", flair_fov_edge_no_seed_mm=no_seed_mm,
                                   flair_fov_edge_min_slice_mm=2.5, flair_fov_edge_ends="both")
    wf = init_subject_wf(subject=subject, config=config, staging_dir=tmp_path / "stage")
    graph = wf._create_flat_graph()
    nodes = {n.fullname.split(".", 1)[1]: n for n in graph.nodes}
    into_segment = {dest: src.name for src, _, data in graph.in_edges(nodes["segment"], data=True)
                    for _, dest in data["connect"]}
    if not no_seed_mm:
        assert "flair_fov_edge" not in into_segment and "merge_std_flair_fov_edge" not in nodes
        assert str(nodes["resample_day0"].inputs.fov_min_slice_mm) == "<undefined>"
        return
    assert into_segment["flair_fov_edge"] == "merge_std_flair_fov_edge"
    for i, ses in enumerate(("day0", "day3", "day8"), start=1):
        assert nodes[f"resample_{ses}"].inputs.fov_min_slice_mm == 2.5
        assert nodes[f"resample_{ses}"].inputs.fov_ends == "both"
        (edge,) = [data["connect"] for src, _, data
                   in graph.in_edges(nodes["merge_std_flair_fov_edge"], data=True)
                   if src is nodes[f"resample_{ses}"]]
        assert edge == [("flair_fov_edge", f"in{i}")]


def test_native_dwi_voxel_reaches_the_segment_node(tmp_path):
    # each resample node reads its native trace's in-plane voxel; the segment node gets them in
    # session order (the reach of its restricted edge step)
    root = make_skeleton(tmp_path / "bids", sessions=["day0", "day3", "day8"])
    (subject,) = discover(root)
    wf = init_subject_wf(subject=subject, config=load_config(), staging_dir=tmp_path / "stage")
    graph = wf._create_flat_graph()
    nodes = {n.fullname.split(".", 1)[1]: n for n in graph.nodes}
    into_segment = {dest: src.name for src, _, data in graph.in_edges(nodes["segment"], data=True)
                    for _, dest in data["connect"]}
    assert into_segment["dwi_inplane_mm"] == "merge_dwi_inplane"
    for i, ses in enumerate(("day0", "day3", "day8"), start=1):
        (edge,) = [data["connect"] for src, _, data
                   in graph.in_edges(nodes["merge_dwi_inplane"], data=True)
                   if src is nodes[f"resample_{ses}"]]
        assert edge == [("dwi_inplane_mm", f"in{i}")]
