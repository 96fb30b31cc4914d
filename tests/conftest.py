import os
import subprocess

# MKL picks matrix-product kernels by memory alignment, so two processes can differ by an ulp in a
# forward (seen: 3 of 20 forked runs of tests/scripts/kill_during_commit.py); its conditional
# bitwise reproducibility makes trajectories compared across processes exact (set before MKL loads).
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")

import torch  # noqa: E402

# Without a GPU, the Triton kernels run in Triton's CPU interpreter (must be set before import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture
def cli(capsys):
    """`zoscale ARGS` in this process (no interpreter start-up: these runs take a second, not ten);
    returns what a subprocess would: returncode, stdout, stderr (argparse's exits included)."""
    from zoscale.cli import main

    def run(*args):
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)
    return run
