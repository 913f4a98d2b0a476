"""Rigid registration benchmark: lesionlapse (SimpleITK) against ANTsPy and greedy.

One run, the same cases, the same preprocessed inputs (brain mask + N4 for FLAIR, as the
pipeline does) and the same number of threads for every engine. Three kinds of cases:

* ``phantom-flair``: the simulated phantom (``lesionlapse simulate --preset mixed``), every
  later session's FLAIR (moving) against the first session's FLAIR (fixed); truth from
  ``derivatives/truth/.../*_from-truth_to-FLAIR_mode-image_xfm.txt``.
* ``phantom-dwi``: every session's mean b0 (moving) against its FLAIR (fixed), truth from the
  FLAIR and DWI truth transforms.
* ``real-motion``: a real FLAIR (``ms_flair_mni``, 1 mm) moved by known rigid motions (up to
  15 deg and 10 mm), resliced onto a thick-slice clinical grid with Rician noise.
* ``real-ms``: the real MS FLAIR pairs of ``ms_flair_longitudinal`` (study 2 moving, study 1
  fixed); the "error" is the distance to the provided reference affines (not a ground truth).

Per case and engine the target registration error (TRE) is the distance between the
estimated and the true fixed -> moving point maps over brain voxels of the fixed image (mean
and max, mm). The project's inverse consistency (A->B composed with B->A) is measured on the
FLAIR pairs. Writes ``benchmarks/results/registration.md``.

Usage::

    pip install -e '.[benchmarks]'
    python benchmarks/registration.py --subjects 20
    python benchmarks/registration.py --subjects 6 --subject-space 1 2 --out ss.md

``--subject-space N ...`` runs, instead, the project's within-subject space
(``build_subject_space``) on every phantom subject with each number of template iterations:
CPU time and the pairwise TRE of ``T_i o T_j^-1`` (session j -> subject -> session i)
against the truth, over the brain of session j, for every ordered pair of sessions.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

THREADS_ENV = ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS",
               "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _early_threads(argv: list[str]) -> int:
    """Thread count from the command line, set in the environment before ITK is loaded."""
    n = 2
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            n = int(argv[i + 1])
        elif a.startswith("--threads="):
            n = int(a.split("=", 1)[1])
    for k in THREADS_ENV:
        os.environ[k] = str(n)
    return n


_early_threads(sys.argv)

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.core import preprocess as core_pre  # noqa: E402
from pipeline.core import registration as core_reg  # noqa: E402
from pipeline.core.dwi import mean_b0  # noqa: E402
from pipeline.interfaces.registration import registration_kwargs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
FAIL_MM = 2.0  # a pair whose mean TRE exceeds this counts as a failure (mm)


# --------------------------------------------------------------------------------------------
# inputs


@dataclass
class Case:
    kind: str
    name: str
    fixed: sitk.Image
    moving: sitk.Image
    fixed_mask: sitk.Image
    moving_mask: sitk.Image
    truth: sitk.Transform  # fixed points -> moving points
    points: np.ndarray  # brain points of the fixed space (mm) where the TRE is measured
    inverse_consistency: bool = False
    subject: str = ""  # phantom subject label ("" for the real cases)


@dataclass
class Outcome:
    engine: str
    case: Case
    seconds: float
    tre_mean: float
    tre_max: float
    error: str = ""
    ic_mean: float = float("nan")
    extra: dict = field(default_factory=dict)


def _prep(image: sitk.Image, pre: dict, threads: int, n4: bool) -> tuple[sitk.Image, sitk.Image]:
    image = sitk.Cast(image, sitk.sitkFloat32)
    mask = core_pre.brain_mask(
        image, closing_mm=pre["brain_mask_closing_mm"], erosion_mm=pre["brain_mask_erosion_mm"],
        smoothing_mm=pre["brain_mask_smoothing_mm"], threshold_method=pre["brain_mask_threshold"],
    )
    if n4:
        image, _ = core_pre.n4_bias_correct(
            image, mask, shrink_factor=pre["n4_shrink_factor"], iterations=pre["n4_iterations"],
            convergence=pre["n4_convergence"], spline_distance_mm=pre["n4_spline_distance_mm"],
            n_threads=threads,
        )
    return image, mask


def _mask_points(mask: sitk.Image, n: int = 5000) -> np.ndarray:
    return core_reg._mask_points(mask, n)


def _phantom_root(args) -> Path:
    """The phantom's BIDS folder: ``--phantom-bids`` when given, else in the work dir,
    simulated when missing."""
    if args.phantom_bids:
        root = Path(args.phantom_bids)
        if not (root / "derivatives" / "truth").is_dir():
            raise SystemExit(f"--phantom-bids {root}: no derivatives/truth (not a phantom)")
        return root
    root = Path(args.workdir) / f"phantom-{args.grid}-n{args.subjects}-s{args.seed}"
    if not (root / "derivatives" / "truth").is_dir():
        print(f"simulating {args.subjects} subject(s) into {root} ...", flush=True)
        exe = Path(sys.executable).with_name("lesionlapse")
        subprocess.run(
            [str(exe), "simulate", str(root), "--preset", "mixed", "--subjects",
             str(args.subjects), "--seed", str(args.seed), "--grid", args.grid],
            check=True, stdout=subprocess.DEVNULL,
        )
    return root


def phantom_cases(args, pre: dict) -> list[Case]:
    root = _phantom_root(args)
    truth_root = root / "derivatives" / "truth"
    cases: list[Case] = []
    subjects = sorted(p.name for p in root.glob("sub-*") if p.is_dir())
    if args.phantom_bids:
        subjects = subjects[:args.subjects]
    for sub in subjects:
        sessions = sorted(p.name for p in (root / sub).glob("ses-*"))
        flair, fmask, ftruth, fpts = {}, {}, {}, {}
        for ses in sessions:
            anat = root / sub / ses / "anat"
            tdir = truth_root / sub / ses
            img, msk = _prep(sitk.ReadImage(str(anat / f"{sub}_{ses}_FLAIR.nii.gz")), pre,
                             args.threads, n4=True)
            flair[ses], fmask[ses] = img, msk
            ftruth[ses] = core_reg.read_transform(
                tdir / "anat" / f"{sub}_{ses}_from-truth_to-FLAIR_mode-image_xfm.txt")
            fpts[ses] = _mask_points(
                sitk.ReadImage(str(tdir / "anat" / f"{sub}_{ses}_desc-brain_mask.nii.gz")))
            dwi_path = root / sub / ses / "dwi" / f"{sub}_{ses}_dwi.nii.gz"
            if dwi_path.exists():
                dwi = sitk.ReadImage(str(dwi_path))
                arr = sitk.GetArrayFromImage(dwi)  # (t, z, y, x)
                bvals = np.loadtxt(dwi_path.with_name(f"{sub}_{ses}_dwi.bval")).ravel()
                b0a = mean_b0(np.moveaxis(arr, 0, -1), bvals, 50.0)
                b0 = sitk.GetImageFromArray(b0a)
                ref = sitk.Extract(dwi, list(dwi.GetSize()[:3]) + [0], [0, 0, 0, 0])
                b0.CopyInformation(ref)
                b0, b0mask = _prep(b0, pre, args.threads, n4=False)
                dtruth = core_reg.read_transform(
                    tdir / "dwi" / f"{sub}_{ses}_from-truth_to-DWI_mode-image_xfm.txt")
                # FLAIR point x -> truth F(x) -> DWI point D^-1(F(x))
                truth = core_reg.compose_transforms(core_reg.invert_transform(dtruth), ftruth[ses])
                cases.append(Case("phantom-dwi", f"{sub}_{ses}", img, b0, msk, b0mask, truth,
                                  fpts[ses], subject=sub))
        s0 = sessions[0]
        for ses in sessions[1:]:
            truth = core_reg.compose_transforms(core_reg.invert_transform(ftruth[ses]), ftruth[s0])
            cases.append(Case("phantom-flair", f"{sub}_{s0}-{ses}", flair[s0], flair[ses],
                              fmask[s0], fmask[ses], truth, fpts[s0], inverse_consistency=True,
                              subject=sub))
    return cases


def subject_space_rows(args, pre: dict, regp: dict, iterations: list[int]) -> list[dict]:
    """Per phantom subject and number of template iterations: CPU time of
    ``build_subject_space`` and its pairwise TRE against the truth (see the module docstring)."""
    root = _phantom_root(args)
    truth_root = root / "derivatives" / "truth"
    rows = []
    for sub in sorted(p.name for p in root.glob("sub-*") if p.is_dir()):
        sessions = sorted(p.name for p in (root / sub).glob("ses-*"))
        images, masks, truths = [], [], []
        for ses in sessions:
            img, msk = _prep(sitk.ReadImage(str(root / sub / ses / "anat" /
                                                f"{sub}_{ses}_FLAIR.nii.gz")),
                             pre, args.threads, n4=True)
            images.append(img)
            masks.append(msk)
            truths.append(core_reg.read_transform(  # FLAIR point -> truth point
                truth_root / sub / ses / "anat" / f"{sub}_{ses}_from-truth_to-FLAIR_mode-image_xfm.txt"))
        for n_iter in iterations:
            cpu = time.process_time()
            ts, _, _ = core_reg.build_subject_space(
                images, masks, spacing_mm=regp["output_spacing_mm"], template_iterations=n_iter,
                template_spacing_mm=regp["template_spacing_mm"],
                margin_mm=regp["subject_space_margin_mm"], n_threads=args.threads,
                to_first_symmetric=regp.get("to_first_symmetric"), **registration_kwargs(regp))
            cpu = time.process_time() - cpu
            errors = []
            for j in range(len(ts)):
                pts = _mask_points(masks[j], 3000)
                for i in range(len(ts)):
                    if i != j:
                        est = core_reg.compose_transforms(ts[i], core_reg.invert_transform(ts[j]))
                        true = core_reg.compose_transforms(core_reg.invert_transform(truths[i]),
                                                           truths[j])
                        errors.append(core_reg.tre(est, true, pts)[0])
            rows.append({"subject": sub, "template_iterations": n_iter, "cpu_s": cpu,
                         "tre_mean_mm": float(np.mean(errors)),
                         "tre_worst_pair_mm": float(np.max(errors))})
            print(f"{sub} template_iterations={n_iter}: cpu {cpu:.2f} s, pairwise TRE mean "
                  f"{rows[-1]['tre_mean_mm']:.4f} worst {rows[-1]['tre_worst_pair_mm']:.4f} mm",
                  flush=True)
    return rows


def subject_space_report(rows: list[dict], command: str) -> str:
    """Markdown: per number of template iterations, CPU and pairwise TRE over the subjects."""
    by = {}
    for r in rows:
        by.setdefault(r["template_iterations"], []).append(r)
    lines = ["# Within-subject space: template iterations", "", f"Command: `{command}`", "",
             f"Machine: {machine()}", "",
             "| template iterations | subjects | CPU s (sum) | pairwise TRE mean mm | "
             "worst pair mm |", "| --- | --- | --- | --- | --- |"]
    for n_iter, rs in sorted(by.items()):
        lines.append(f"| {n_iter} | {len(rs)} | {sum(r['cpu_s'] for r in rs):.1f} | "
                     f"{np.mean([r['tre_mean_mm'] for r in rs]):.4f} | "
                     f"{max(r['tre_worst_pair_mm'] for r in rs):.4f} |")
    return "\n".join(lines) + "\n"


def _random_rigid(rng: np.random.Generator, center: np.ndarray, max_deg: float,
                  max_mm: float) -> sitk.Transform:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(rng.uniform(0.5, 1.0) * max_deg)
    shift = rng.normal(size=3)
    shift *= rng.uniform(0.5, 1.0) * max_mm / np.linalg.norm(shift)
    t = sitk.VersorRigid3DTransform()
    t.SetCenter(tuple(float(c) for c in center))
    t.SetRotation(tuple(float(a) for a in axis), angle)
    t.SetTranslation(tuple(float(s) for s in shift))
    return core_reg.affine_transform(*core_reg.affine_parameters(t), center)


def real_motion_cases(args, pre: dict) -> list[Case]:
    path = DATA / "ms_flair_mni" / "patient07" / "FLAIR_brain_MNI.nii.gz"
    if not path.exists():
        print(f"skipping real-motion: {path} not found", flush=True)
        return []
    fixed, fmask = _prep(sitk.ReadImage(str(path)), pre, args.threads, n4=False)
    pts = _mask_points(fmask)
    center = pts.mean(axis=0)
    rng = np.random.default_rng(args.seed)
    arr = sitk.GetArrayViewFromImage(fixed)
    sigma = float(np.median(arr[sitk.GetArrayViewFromImage(fmask) > 0])) * args.noise
    grids = [(0.9, 0.9, 3.0), (0.7, 0.7, 4.0), (1.1, 1.1, 2.5), (0.8, 0.8, 5.0)]
    cases = []
    for k in range(args.real_cases):
        motion = _random_rigid(rng, center, args.max_deg, args.max_mm)  # moving pt -> fixed pt
        spacing = grids[k % len(grids)]
        # a field of view of the brain plus margin, axial slices, rotated grid axes
        lo = pts.min(axis=0) - 25.0
        hi = pts.max(axis=0) + 25.0
        size = [int(math.ceil((h - lo_) / s)) for lo_, h, s in zip(lo, hi, spacing)]
        grid = sitk.Image(size, sitk.sitkFloat32)
        grid.SetSpacing(spacing)
        grid.SetOrigin(tuple(float(v) for v in lo))
        # anti-aliasing for thick slices, then reslice through the motion
        smooth = sitk.SmoothingRecursiveGaussian(
            fixed, [max(0.0, 0.5 * (s - 1.0)) + 1e-3 for s in spacing])
        moved = sitk.Resample(smooth, grid, motion, sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
        m = sitk.GetArrayFromImage(moved).astype(np.float64)
        m = np.clip(m, 0, None)
        noisy = np.sqrt((m + rng.normal(0, sigma, m.shape)) ** 2 + rng.normal(0, sigma, m.shape) ** 2)
        moving = sitk.GetImageFromArray(noisy.astype(np.float32))
        moving.CopyInformation(grid)
        moving, mmask = _prep(moving, pre, args.threads, n4=False)
        truth = core_reg.invert_transform(motion)  # fixed point -> moving point
        rot, shift = core_reg.transform_size(truth, center)
        cases.append(Case("real-motion", f"p07-m{k} {rot:.1f}deg/{shift:.1f}mm "
                          f"{spacing[0]}x{spacing[1]}x{spacing[2]}", fixed, moving, fmask, mmask,
                          truth, pts))
    return cases


def real_ms_cases(args, pre: dict) -> list[Case]:
    root = DATA / "ms_flair_longitudinal"
    cases = []
    for pdir in sorted(root.glob("patient*")):
        s1 = pdir / "study1_FLAIR_raw.nii.gz"
        s2 = pdir / "study2_FLAIR_raw.nii.gz"
        if not (s1.exists() and s2.exists()):
            continue
        r1 = core_reg.read_transform(pdir / "study1_FLAIR_to_common_space.txt")  # common -> raw1
        r2 = core_reg.read_transform(pdir / "study2_FLAIR_to_common_space.txt")
        f, fm = _prep(sitk.ReadImage(str(s1)), pre, args.threads, n4=True)
        m, mm = _prep(sitk.ReadImage(str(s2)), pre, args.threads, n4=True)
        common_pts = _mask_points(sitk.ReadImage(str(pdir / "brainmask_common_space.nii.gz")))
        pts = core_reg._apply(r1, common_pts)  # in study-1 space
        truth = core_reg.compose_transforms(r2, core_reg.invert_transform(r1))
        cases.append(Case("real-ms", pdir.name, f, m, fm, mm, truth, pts,
                          inverse_consistency=True))
    if not cases:
        print(f"skipping real-ms: {root} not found", flush=True)
    return cases


# --------------------------------------------------------------------------------------------
# engines: each returns the fixed -> moving point map and the registration time (s)


class Project:
    name = "lesionlapse"

    def __init__(self, params: dict, threads: int):
        # the pipeline's keywords: b0 -> FLAIR pairs as its DWI -> FLAIR step, others as the
        # cross-session steps
        self.kw = {dwi: {**registration_kwargs(params, dwi=dwi), "n_threads": threads}
                   for dwi in (False, True)}

    def __call__(self, fixed, moving, fmask, mmask, tmp, kind: str = ""):
        t0 = time.perf_counter()
        res = core_reg.register_rigid(fixed, moving, fixed_mask=fmask, moving_mask=mmask,
                                      transform_type="rigid",
                                      **self.kw[kind == "phantom-dwi"])
        return res.transform, time.perf_counter() - t0


class Ants:
    def __init__(self, threads: int, kind: str = "Rigid"):
        import ants

        self.ants = ants
        self.kind = kind
        self.name = f"antspyx {kind}"
        self.version = ants.__version__

    def __call__(self, fixed, moving, fmask, mmask, tmp):
        paths = {}
        for key, img in (("f", fixed), ("m", moving), ("fm", fmask)):
            paths[key] = str(Path(tmp) / f"ants_{key}.nii.gz")
            sitk.WriteImage(img, paths[key])
        f, m, fm = (self.ants.image_read(paths[k]) for k in ("f", "m", "fm"))
        t0 = time.perf_counter()
        out = self.ants.registration(fixed=f, moving=m, type_of_transform=self.kind, mask=fm,
                                     outprefix=str(Path(tmp) / "ants_"))
        dt = time.perf_counter() - t0
        # fwdtransforms resample moving onto fixed: as a point map fixed -> moving (ITK)
        t = core_reg.read_transform(out["fwdtransforms"][0])
        return t, dt


class Greedy:
    """greedy rigid (``-a -dof 6 -m NMI``), image-centre initialisation, fixed seed.

    ``mask``: pass the fixed brain mask (``-gm``, as greedy's README example for rigid). On the
    small thick-slice phantom grids (coarsest level ~16x16x7 voxels) greedy with ``-gm`` and
    NMI erratically converges to ~90 deg rotations (150-300 mm TRE); with the default
    ``-seed 0`` its sample jitter is random, so the same command fails or not from run to run.
    Neither ``-ia-identity`` nor two levels nor ``-jitter 0`` removed it, ``-mm`` reduced it
    (3/22); without masks there were 0 failures in 42 runs. Both variants are run.
    """

    def __init__(self, threads: int, init: str = "-ia-image-centers", mask: bool = True):
        from picsl_greedy import Greedy3D

        self.cls = Greedy3D
        self.threads = threads
        self.init = init
        self.mask = mask
        self.name = "greedy -gm" if mask else "greedy no mask"
        try:
            from importlib.metadata import version

            self.version = version("picsl_greedy")
        except Exception:  # pragma: no cover
            self.version = "?"
        self.command = ("-d 3 -a -dof 6 -m NMI -n 100x50x10 {init} -seed 1 -threads {threads} "
                        "-i fixed moving" + (" -gm fmask" if mask else "") + " -o xfm")

    def __call__(self, fixed, moving, fmask, mmask, tmp):
        g = self.cls()
        cmd = self.command.format(init=self.init, threads=self.threads)
        sys.stdout.flush()
        saved = os.dup(1)  # greedy's C++ log goes to file descriptor 1 whatever `out` says
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        try:
            t0 = time.perf_counter()
            images = dict(fixed=fixed, moving=moving, xfm=None)
            if self.mask:
                images["fmask"] = sitk.Cast(fmask, sitk.sitkFloat32)
            g.execute(cmd, **images)
            dt = time.perf_counter() - t0
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(devnull)
        ras = np.asarray(g["xfm"], float)  # RAS physical, fixed -> moving
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        lps = flip @ ras @ flip
        return core_reg.affine_transform(lps[:3, :3], lps[:3, 3]), dt


# --------------------------------------------------------------------------------------------
# running and reporting


def run_case(engine, case: Case, tmp: str, project_ic: Project | None) -> Outcome:
    try:
        t, dt = engine(case.fixed, case.moving, case.fixed_mask, case.moving_mask, tmp,
                       **({"kind": case.kind} if isinstance(engine, Project) else {}))
        mean, mx = core_reg.tre(t, case.truth, case.points)
    except Exception as exc:  # a crash is a failure, reported
        return Outcome(engine.name, case, float("nan"), float("inf"), float("inf"),
                       error=f"{type(exc).__name__}: {exc}"[:200])
    out = Outcome(engine.name, case, dt, mean, mx)
    if project_ic is not None and case.inverse_consistency:
        back, dt_back = project_ic(case.moving, case.fixed, case.moving_mask, case.fixed_mask, tmp)
        out.ic_mean = core_reg.inverse_consistency(t, back, case.points)[0]
        out.extra["ic_seconds"] = dt_back
    return out


def summarise(outcomes: list[Outcome], kinds: list[str], engines: list[str]) -> list[dict]:
    rows = []
    for kind in kinds:
        proj = [o for o in outcomes if o.case.kind == kind and o.engine == engines[0]]
        if not proj:
            continue
        t_proj = float(np.nanmedian([o.seconds for o in proj]))
        peer_names = {o.case.name for o in outcomes
                      if o.case.kind == kind and o.engine != engines[0]}
        subset = [o for o in proj if o.case.name in peer_names]
        t_subset = float(np.nanmedian([o.seconds for o in subset])) if subset else t_proj
        for eng in [engines[0], *([f"{engines[0]} (peers' pairs)"]
                                  if subset and len(subset) < len(proj) else []), *engines[1:]]:
            if eng.endswith("(peers' pairs)"):
                sel = subset
            else:
                sel = [o for o in outcomes if o.case.kind == kind and o.engine == eng]
            if not sel:
                continue
            # peers run on a subset of the pairs (--peer-subjects): their time ratio is taken
            # against lesionlapse's median on the same pairs
            t_ref = t_proj if eng == engines[0] else t_subset
            ok = [o for o in sel if not o.error]
            times = [o.seconds for o in ok]
            means = np.array([o.tre_mean for o in sel])
            maxes = np.array([o.tre_max for o in sel])
            ics = [o.ic_mean for o in sel if np.isfinite(o.ic_mean)]
            t_med = float(np.median(times)) if times else float("nan")
            rows.append(dict(
                kind=kind, engine=eng, n=len(sel), median_s=t_med, ratio=t_med / t_ref,
                tre_mean=float(np.mean(means)), tre_worst_pair=float(np.max(means)),
                tre_max=float(np.max(maxes)),
                failures=int(sum(1 for o in sel if o.error or o.tre_mean > FAIL_MM)),
                ic_mean=float(np.mean(ics)) if ics else float("nan"),
                ic_worst=float(np.max(ics)) if ics else float("nan"),
            ))
    return rows


def _fmt(v: float, nd: int = 2) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "—" if v is None or np.isnan(v) else "inf"
    return f"{v:.{nd}f}"


DESCRIPTIONS = {
    "phantom-flair": "phantom, cross-session FLAIR (later sessions -> first), truth transforms",
    "phantom-dwi": "phantom, mean b0 -> FLAIR of the same session, truth transforms",
    "real-motion": "real FLAIR (ms_flair_mni p07, 1 mm) vs itself moved by a known rigid motion, "
                   "resliced to a thick-slice grid, Rician noise",
    "real-ms": "real MS FLAIR pairs (ms_flair_longitudinal), study 2 -> study 1; \"TRE\" = "
               "distance to the provided reference affines (not a ground truth)",
}


def table(rows: list[dict]) -> str:
    head = ("| case | engine | pairs | median s/pair | time / lesionlapse | mean TRE mm | "
            "worst pair mean TRE mm | max point error mm | failures | inverse consistency mm "
            "(mean / worst) |")
    lines = [head, "|" + " --- |" * 10]
    for r in rows:
        ic = ("—" if not np.isfinite(r["ic_mean"])
              else f"{_fmt(r['ic_mean'], 3)} / {_fmt(r['ic_worst'], 3)}")
        lines.append(
            f"| {r['kind']} | {r['engine']} | {r['n']} | {_fmt(r['median_s'])} | "
            f"{_fmt(r['ratio'])} | {_fmt(r['tre_mean'], 3)} | {_fmt(r['tre_worst_pair'], 3)} | "
            f"{_fmt(r['tre_max'], 2)} | {r['failures']} | {ic} |"
        )
    return "\n".join(lines)


def machine() -> str:
    """The machine and versions, as every benchmark reports them (benchmarks/common.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine_info

    return ", ".join(f"{k} {v}" for k, v in machine_info().items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=20, help="phantom subjects (default 20)")
    ap.add_argument("--grid", choices=("small", "clinical"), default="small",
                    help="phantom acquisition grid (default small)")
    ap.add_argument("--seed", type=int, default=2024,
                    help="seed of the phantom simulation and of the real motions")
    ap.add_argument("--phantom-bids", default=None,
                    help="an existing phantom BIDS folder (with derivatives/truth) to read, "
                         "instead of simulating one: its first --subjects subjects")
    ap.add_argument("--peer-subjects", type=int, default=0,
                    help="run the other engines on the phantom cases of the first N subjects "
                         "only (0 = all); lesionlapse runs on all, and the report adds its row "
                         "over the peers' pairs")
    ap.add_argument("--threads", type=int, default=2,
                    help="threads of every engine (ITK/OMP/greedy; default 2)")
    ap.add_argument("--real-cases", type=int, default=4,
                    help="known motions of the real FLAIR (default 4; 0 skips)")
    ap.add_argument("--max-deg", type=float, default=15.0, help="largest motion rotation (deg)")
    ap.add_argument("--max-mm", type=float, default=10.0, help="largest motion translation (mm)")
    ap.add_argument("--noise", type=float, default=0.03,
                    help="Rician noise sigma as a fraction of the brain median (default 0.03)")
    ap.add_argument("--cases", default="phantom-flair,phantom-dwi,real-motion,real-ms",
                    help="comma-separated case kinds to run")
    ap.add_argument("--engines", default="lesionlapse,ants,greedy,greedy-nomask",
                    help="comma-separated: lesionlapse, ants (Rigid), ants-quick (QuickRigid), "
                         "greedy (-gm fixed mask), greedy-nomask")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "lesionlapse-bench"),
                    help="where the phantom is simulated (reused when present)")
    ap.add_argument("--out", help="report file (default benchmarks/results/registration.md; "
                                  "with --subject-space only printed unless given)")
    ap.add_argument("--config", default=None, help="pipeline config TOML (default: defaults)")
    ap.add_argument("--subject-space", type=int, nargs="+", metavar="N",
                    help="run the within-subject space with these numbers of template "
                         "iterations instead of the engines (see above)")
    args = ap.parse_args(argv)

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    cfg = load_config(args.config).to_dict()
    pre, regp = cfg["preprocessing"], cfg["registration"]
    if args.subject_space:
        cmd = "python benchmarks/registration.py " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
        text = subject_space_report(subject_space_rows(args, pre, regp, args.subject_space), cmd)
        print(text)
        if args.out:
            Path(args.out).write_text(text)
        return 0
    args.out = args.out or str(REPO / "benchmarks" / "results" / "registration.md")
    kinds = [k.strip() for k in args.cases.split(",") if k.strip()]

    project = Project(regp, args.threads)
    engines = [project]
    versions = {}
    for e in (x.strip() for x in args.engines.split(",")):
        if e == "lesionlapse":
            continue
        try:
            if e == "ants":
                engines.append(Ants(args.threads, "Rigid"))
                versions["antspyx"] = engines[-1].version
            elif e == "ants-quick":
                engines.append(Ants(args.threads, "QuickRigid"))
                versions["antspyx"] = engines[-1].version
            elif e in ("greedy", "greedy-nomask"):
                engines.append(Greedy(args.threads, mask=e == "greedy"))
                versions["picsl_greedy"] = engines[-1].version
            else:
                ap.error(f"unknown engine {e!r}")
        except ImportError as exc:
            print(f"skipping {e}: {exc} (pip install -e '.[benchmarks]')", flush=True)

    t_start = time.perf_counter()
    project_version = _version()  # the commit the run started from
    cases: list[Case] = []  # real cases first: a run cut short still covers every kind
    if "real-motion" in kinds and args.real_cases > 0:
        cases += real_motion_cases(args, pre)
    if "real-ms" in kinds:
        cases += real_ms_cases(args, pre)
    if "phantom-flair" in kinds or "phantom-dwi" in kinds:
        cases += [c for c in phantom_cases(args, pre) if c.kind in kinds]
    print(f"{len(cases)} cases prepared in {time.perf_counter() - t_start:.0f} s", flush=True)

    def report(outcomes: list[Outcome], done: int, total: int, final: bool) -> None:
        names = [e.name for e in engines]
        rows = summarise(outcomes, [k for k in DESCRIPTIONS if k in kinds], names)
        text = table(rows)
        if final:
            print()
            print(text)

        cmd = "python benchmarks/registration.py " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
        lines = [
            "# Rigid registration benchmark",
            "",
            f"Command: `{cmd.strip()}` (total {time.perf_counter() - t_start:.0f} s)",
            "",
            *([] if final else [f"**Partial run: {done} of {total} cases finished** (the report "
                                "is rewritten after every case).", ""]),
            f"Machine: {machine()}; every engine ran with {args.threads} threads "
            f"({', '.join(THREADS_ENV)} = {args.threads}; greedy `-threads {args.threads}`), "
            "cases interleaved engine by engine so that all see the same load.",
            "",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in
                                     {"lesionlapse": project_version, **versions}.items()),
            "",
            "Engines (same preprocessed inputs: brain mask of every image, N4 on FLAIR; fixed brain "
            "mask given to every engine except `greedy no mask`):",
            "",
            "* lesionlapse: `pipeline.core.registration.register_rigid` with the `[registration]` "
            "defaults of configs/default.toml.",
            "* antspyx Rigid: `ants.registration(fixed, moving, type_of_transform='Rigid', "
            "mask=fixed_mask)` (antspy defaults: MI, 4 levels, centre-of-mass init).",
            "* antspyx QuickRigid (when run): the same with `type_of_transform='QuickRigid'`.",
            *[f"* {e.name}: `greedy {e.command.format(init=e.init, threads=args.threads)}`"
              for e in engines if isinstance(e, Greedy)],
            "",
            "Cases:",
            "",
        ]
        for k in DESCRIPTIONS:
            if k in kinds:
                lines.append(f"* `{k}`: {DESCRIPTIONS[k]}")
        lines += [
            "",
            (f"Phantom: the first {args.subjects} subjects of `{args.phantom_bids}`"
             if args.phantom_bids else
             f"Phantom: `lesionlapse simulate --preset mixed --subjects {args.subjects} --seed "
             f"{args.seed} --grid {args.grid}`")
            + (f"; peers on the first {args.peer_subjects} subjects only (lesionlapse on all; "
               "its row \"(peers' pairs)\" is over the same pairs, and the peers' time ratio "
               "is against it)" if args.peer_subjects else "")
            + f". Real motion: {args.real_cases} motions up to "
            f"{args.max_deg:g} deg / {args.max_mm:g} mm, Rician noise sigma {args.noise:g} x brain "
            "median.",
            "",
            "TRE: distance between the estimated and the true fixed -> moving point maps over "
            "(up to 5000) brain voxels of the fixed image. \"mean TRE\" is the mean over pairs of "
            "the per-pair mean, \"worst pair\" the largest per-pair mean, \"max point error\" the "
            f"largest single-voxel error. Failure: per-pair mean TRE > {FAIL_MM:g} mm or an error. "
            "Time: registration call only (inputs in memory; for antspyx, images read before the "
            "clock starts). Inverse consistency (lesionlapse only): mean |B->A(A->B(x)) - x| over "
            "the fixed brain, A->B and B->A registered independently.",
            "",
            text,
            "",
            "## Per pair",
            "",
            "| case | pair | engine | s | mean TRE mm | max mm | inverse consistency mm | error |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for o in outcomes:
            lines.append(f"| {o.case.kind} | {o.case.name} | {o.engine} | {_fmt(o.seconds)} | "
                         f"{_fmt(o.tre_mean, 3)} | {_fmt(o.tre_max, 2)} | {_fmt(o.ic_mean, 3)} | "
                         f"{o.error} |")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
        if final:
            print(f"\nwrote {out}")

    phantom_subjects = sorted({c.subject for c in cases if c.subject})
    peer_subjects = set(phantom_subjects[:args.peer_subjects] if args.peer_subjects
                        else phantom_subjects)
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="regbench-") as tmp:
        for i, case in enumerate(cases):
            for eng in engines:  # interleaved: every engine sees the same machine load
                if (eng is not project and case.subject
                        and case.subject not in peer_subjects):
                    continue
                o = run_case(eng, case, tmp, project if eng is project else None)
                outcomes.append(o)
                ic = f" ic {o.ic_mean:.3f}" if np.isfinite(o.ic_mean) else ""
                print(f"{case.kind:14s} {case.name:38s} {eng.name:20s} "
                      f"{o.seconds:7.2f} s  TRE {o.tre_mean:7.3f} / {o.tre_max:7.3f} mm{ic}"
                      f"{'  ERROR ' + o.error if o.error else ''}", flush=True)
            # the report is rewritten after every case: an interrupted run leaves its part
            report(outcomes, i + 1, len(cases), final=i + 1 == len(cases))
    return 0


def _version() -> str:
    try:
        from importlib.metadata import version

        v = version("lesionlapse")
    except Exception:
        v = "?"
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        v += f" (git {sha})"
    except Exception:
        pass
    return v


if __name__ == "__main__":
    raise SystemExit(main())
