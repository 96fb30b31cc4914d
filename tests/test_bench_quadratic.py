import json
import subprocess
import sys

from zoscale.cli.bench.quadratic import QuadraticConfig, summarize


def test_speedup_is_the_ratio_of_first_hits_of_mezos_final_mean():
    curves = {"mezo": [[10, 6, 2, 1.0], [10, 4, 2, 1.0]], "conmezo": [[10, 3, 1, 0.5], [10, 3, 0.9, 0.5]]}
    summary = summarize(QuadraticConfig(iters=3, trials=2, curve_points=3), curves)
    assert summary["methods"]["mezo"]["iterations_to_mezo_final"] == 3
    assert summary["methods"]["conmezo"]["iterations_to_mezo_final"] == 2
    assert summary["speedup"] == 1.5
    assert summary["methods"]["conmezo"]["curve"]["mean_value"] == [10, 3, 0.95, 0.5]


def test_bench_writes_the_report_and_never_overwrites_it(tmp_path):
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "zoscale", "bench", "quadratic", "--dim", "60", "--iters", "1500", "--trials", "2",
           "--workers", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "conmezo trial 2/2: 1500/1500" in done.stdout  # progress while it runs
    report = json.loads((out / "quadratic.json").read_text())
    assert set(report["methods"]) == {"mezo", "conmezo"}
    assert len(report["methods"]["mezo"]["final_per_trial"]) == 2
    # ConMeZO is ahead on this ill-conditioned problem even in a short run
    assert report["speedup"] > 1.0
    assert report["methods"]["conmezo"]["final_mean"] < report["methods"]["mezo"]["final_mean"]
    assert (out / "quadratic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Speedup" in (out / "quadratic.md").read_text()

    before = (out / "quadratic.json").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "exists; pass --force" in again.stderr
    assert (out / "quadratic.json").read_text() == before
