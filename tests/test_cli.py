import json
import subprocess
import sys


def zoscale(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zoscale", *args], capture_output=True, text=True, timeout=timeout)


def test_demo_runs_and_reports_before_and_after():
    done = zoscale("demo", "--steps", "30", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["steps"] == 30
    assert 0.0 <= result["eval_before"] <= 1.0 and 0.0 <= result["eval_after"] <= 1.0


def test_bad_arguments_exit_2_with_a_one_line_error():
    for args, message in ((["demo", "--steps", "0"], "must be a positive integer"),
                          (["demo", "--eps", "-1"], "must be > 0"),
                          (["frobnicate"], "invalid choice")):
        done = zoscale(*args)
        assert done.returncode == 2
        assert message in done.stderr
        assert "Traceback" not in done.stderr
