"""Thread count of the ITK filters in this process and in the processes it starts."""

from __future__ import annotations

import os

THREAD_VARIABLES = ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS",
                    "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def pin_threads(n_threads: int) -> None:
    """Run every ITK filter (and BLAS/OpenMP) on ``n_threads`` threads, here and in children.

    Why: several ITK filters reduce over dynamically split image chunks (statistics, moments,
    registration metrics), so with more than one thread their sums depend on thread timing
    and a registration can end a few hundredths of a millimetre elsewhere from run to run.
    With one thread (the default ``resources.omp_nthreads``) every run is bit-identical.
    The environment variables reach Nipype's worker processes and Slurm jobs (sbatch exports
    the environment); the SimpleITK call covers this process, where ITK may be loaded already.
    """
    n = int(n_threads)
    if n < 1:
        raise ValueError(f"thread count must be at least 1, got {n}")
    for name in THREAD_VARIABLES:
        os.environ[name] = str(n)
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
