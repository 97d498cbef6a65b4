"""The package under mpiexec as a whole job: an uncaught exception on one rank ends the job
(instead of leaving the other ranks waiting in a collective), and a clean run exits 0 with MPI
finalised (OpenMPI reports a non-zero exit for a rank that skips MPI_Finalize).
"""

import os
import subprocess
import sys
import textwrap

CLEAN = textwrap.dedent("""
    import ringattn, torch
    t = torch.full((3,), float(ringattn.rank() + 1))
    ringattn.allreduce_(t)
    n = ringattn.world_size()
    assert ringattn.get_comm().name == "mpi"
    assert t.tolist() == [n * (n + 1) / 2] * 3, t
    print("clean rank", ringattn.rank())
""")

FAILING = textwrap.dedent("""
    import ringattn, torch
    t = torch.ones(1)
    if ringattn.rank() == 1:
        raise RuntimeError("boom on rank 1")
    ringattn.allreduce_(t)   # rank 0 waits here for a rank that is gone
    print("unreachable")
""")


def mpiexec(code, ranks, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(code)
    cmd = [os.environ.get("RINGATTN_MPIEXEC", "mpiexec"), "-n", str(ranks), "--oversubscribe",
           "--bind-to", "none", sys.executable, str(script)]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


def test_clean_job_exits_zero(tmp_path):
    proc = mpiexec(CLEAN, 3, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("clean rank") == 3


def test_exception_on_one_rank_ends_the_job(tmp_path):
    proc = mpiexec(FAILING, 2, tmp_path)  # the 60 s timeout raises if the job hangs
    assert proc.returncode != 0
    assert "boom on rank 1" in proc.stderr
    assert "aborting the MPI job" in proc.stderr
    assert "unreachable" not in proc.stdout
