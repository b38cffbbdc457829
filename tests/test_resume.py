"""Runs that survive interruption: SIGKILL or SIGTERM a real `python maml_omniglot.py` process, resume it
with --resume, and compare log.csv row for row with an uninterrupted run (every column but elapsed_s,
which is wall-clock time and cannot repeat).

Kill points: before any checkpoint exists (start-up), at iterations spread over the run (read from the
progress bar the process prints), and after the last iteration (during the test). Each test prints the
iteration its checkpoint held when the process died (pytest -s shows it). The runs train as
`python maml_omniglot.py` does by default on the CPU, through the compiled meta-step (each process builds it
first, seconds from inductor's cache), so that it is the default path whose resume is exact.
"""
import json
import os
import random
import signal
import sys
import time

import pytest
import torch

from conftest import RunningProcess, log_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERATIONS = 24


def command(data, out, *extra):
    return [sys.executable, os.path.join(REPO, "maml_omniglot.py"), "--data", str(data), "--out", str(out),
            "--device", "cpu", "--task-num", "2", "--iterations", str(ITERATIONS), "--eval-every", "4",
            "--eval-tasks", "4", "--test-tasks", "4", "--checkpoint-every", "3", *extra]


def environment():
    # One torch thread: see test_experiment.py. Determinism holds for any fixed thread count.
    return dict(os.environ, OMP_NUM_THREADS="1")


def checkpoint_iteration(out):
    path = os.path.join(out, "checkpoint.pt")
    return torch.load(path, weights_only=False)["run"]["iteration"] if os.path.exists(path) else None


def start(argv):
    return RunningProcess(argv, environment(), ITERATIONS)


@pytest.fixture(scope="module")
def uninterrupted(learnable_omniglot_npy, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    code, err = start(command(learnable_omniglot_npy, out)).finish()
    assert code == 0, err
    return log_rows(out)


def resume_and_compare(data, out, expected):
    code, err = start(command(data, out, "--resume")).finish()
    assert code == 0, err
    assert log_rows(out) == expected
    # summary.json's segments cover the run without gap or overlap: each resumed where the last checkpoint was
    summary = json.loads((out / "summary.json").read_text())
    spans = [(segment["from_iteration"], segment["to_iteration"]) for segment in summary["segments"]]
    assert summary["status"] == "finished" and spans[0][0] == 0 and spans[-1][1] == ITERATIONS
    assert all(earlier[1] == later[0] for earlier, later in zip(spans, spans[1:])), spans


# "start-up": killed 0.3 s after launch, before the first checkpoint; "random": a new iteration each
# session (printed); the others after the progress bar showed that iteration (the process runs on a
# little before the signal lands, so the kill can fall inside a validation or a checkpoint write).
KILL_POINTS = ["start-up", 5, "random", ITERATIONS]


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_sigkill_then_resume_gives_the_uninterrupted_log(kill_at, uninterrupted, learnable_omniglot_npy, tmp_path):
    out = tmp_path / "out"
    process = start(command(learnable_omniglot_npy, out))
    if kill_at == "start-up":
        time.sleep(0.3)
    else:
        kill_at = random.randint(0, ITERATIONS) if kill_at == "random" else kill_at
        process.wait_for(kill_at)
    process.popen.send_signal(signal.SIGKILL)
    code, _ = process.finish()
    assert code in (-signal.SIGKILL, 0)  # 0: the run finished before the signal (kill_at = ITERATIONS)
    print(f"\nSIGKILL after progress {kill_at}: checkpoint at iteration {checkpoint_iteration(out)}, "
          f"exit {code}")
    resume_and_compare(learnable_omniglot_npy, out, uninterrupted)


def test_sigterm_checkpoints_the_current_iteration_and_exits(uninterrupted, learnable_omniglot_npy, tmp_path):
    out = tmp_path / "out"
    process = start(command(learnable_omniglot_npy, out))
    process.wait_for(8)
    process.popen.send_signal(signal.SIGTERM)
    code, err = process.finish()
    assert code == 128 + signal.SIGTERM, err
    stopped = checkpoint_iteration(out)
    assert 8 <= stopped < ITERATIONS
    assert f"SIGTERM at iteration {stopped}: checkpoint saved to {out / 'checkpoint.pt'}" in err
    summary = json.loads((out / "summary.json").read_text())  # where the run stands, as the checkpoint holds it
    assert summary["status"] == "in progress" and summary["iteration"] == stopped
    assert [(s["from_iteration"], s["to_iteration"]) for s in summary["segments"]] == [(0, stopped)]
    print(f"\nSIGTERM after progress 8: checkpoint at iteration {stopped}")
    resume_and_compare(learnable_omniglot_npy, out, uninterrupted)
