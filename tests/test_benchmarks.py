"""The benchmarks' own arithmetic (their figures go into issues and the README)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.default_run import cpu_seconds  # noqa: E402


def test_cpu_seconds_in_a_window_count_each_process_from_its_last_sample_before_it():
    samples = [  # (seconds, pss, ray:: processes, {pid: (name, cpu seconds so far)})
        (0.0, 0, 0, {1: ("driver", 1.0), 3: ("ray::IDLE", 2.0)}),
        (5.0, 0, 0, {1: ("driver", 3.0), 2: ("ray::RayTrainWorker", 1.0)}),
        (10.0, 0, 0, {1: ("driver", 4.0), 2: ("ray::RayTrainWorker", 5.0)}),
        (15.0, 0, 0, {1: ("driver", 9.0)}),
    ]
    # driver: 4.0 at 10 s less 1.0 at 0 s; the worker started in the window; pid 3 ended before
    assert cpu_seconds(samples, 4.0, 12.0) == {"driver": 3.0, "ray::RayTrainWorker": 5.0}
    assert cpu_seconds(samples, 0.0, 20.0) == {
        "driver": 9.0, "ray::RayTrainWorker": 5.0, "ray::IDLE": 2.0
    }  # fmt: skip


def _scale_rows():
    from benchmarks.scale import growth_exponents

    rows = [
        {"clips": n, "featurize": {"seconds": s, "peak_gb": 0.5},
         "svm": {"seconds": t, "peak_gb": 1.0, "solver": solver, "mean_uar": 0.5}}
        for n, s, t, solver in [(1000, 10.0, 20.0, "exact"), (4000, 40.0, 320.0, "approx")]
    ]  # fmt: skip
    stages = ["featurize", "svm"]
    return {"cpus": 2, "stages": stages, "rows": rows, "growth": growth_exponents(rows, stages)}


def test_scale_growth_exponents_are_log_ratios_between_consecutive_sizes():
    (pair,) = _scale_rows()["growth"]
    assert (pair["from"], pair["to"]) == (1000, 4000)
    assert pair["featurize"] == 1.0  # 4x clips, 4x time: linear
    assert pair["svm"] == 2.0  # 4x clips, 16x time: quadratic


def test_scale_table_puts_sizes_side_by_side_with_exponent_columns():
    from benchmarks.scale import format_scale_benchmark

    lines = format_scale_benchmark(_scale_rows()).splitlines()
    head = [cell.strip() for cell in lines[1].strip("|").split("|")]
    assert head[:5] == ["clips", "featurize s", "featurize clips/s", "featurize exp",
                        "featurize peak GB"]  # fmt: skip
    assert "svm exp" in head and head[-1] == "svm solver, UA"
    first, second = ([c.strip() for c in line.strip("|").split("|")] for line in lines[3:5])
    assert first[:4] == ["1,000", "10.0", "100", ""]  # no exponent for the smallest size
    assert second[:4] == ["4,000", "40.0", "100", "1.00"]
    assert second[head.index("svm exp")] == "2.00" and second[-1] == "approx, 50.0"


@pytest.mark.slow
def test_scale_smoke_mode_prints_the_table_with_exponents(tmp_path):
    """The benchmark as a user runs it, on two tiny synthetic corpora (Ray, prepare.py)."""
    job = Path(__file__).resolve().parents[1] / "jobs" / "benchmark.py"
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(job), "scale", "--smoke-test", "--work", str(tmp_path / "work"),
         "--out", str(out)],
        capture_output=True, text=True, timeout=1200, check=True,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("|")]
    head = [cell.strip() for cell in lines[0].strip("|").split("|")]
    for stage in ("featurize", "svm", "svm+spknorm"):
        assert f"{stage} exp" in head and f"{stage} peak GB" in head
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [row[0] for row in rows] == ["96", "192"]
    assert rows[0][head.index("svm exp")] == ""
    float(rows[1][head.index("svm exp")])  # a number from the second size on
    figures = json.loads((out / "benchmark_scale.json").read_text())
    assert [r["clips"] for r in figures["rows"]] == [96, 192]
    assert figures["rows"][0]["svm"]["solver"] == "exact"  # tiny corpora: the exact SVC
    assert 0 < figures["rows"][1]["featurize"]["peak_gb"] < 4
