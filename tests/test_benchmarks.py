"""The benchmarks' own arithmetic (their figures go into issues and the README)."""

import sys
from pathlib import Path

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
