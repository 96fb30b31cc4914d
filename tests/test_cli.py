import subprocess
import sys


def zoscale(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zoscale", *args], capture_output=True, text=True, timeout=timeout)


def test_bad_arguments_exit_2_with_a_one_line_error(cli):
    for args, message in ((["train", "--steps", "0"], "must be a positive integer"),
                          (["train", "--resume", "/nonexistent"], "not a run directory"),
                          (["train", "optim.lr"], "unrecognized arguments: optim.lr"),
                          (["bench", "quadratic", "--dim", "-3", "--out", "x"], "must be a positive integer"),
                          (["frobnicate"], "invalid choice")):
        done = cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr


def test_help_lists_the_commands():
    done = zoscale("--help")
    assert done.returncode == 0
    for command in ("train", "export", "replay", "bench"):
        assert command in done.stdout
