"""maml_omniglot.py under torchrun (distributed.py): two gloo processes on CPU share each meta-batch.

The meta-gradient of two processes is the one-process meta-gradient up to float32 rounding, and so are the
first iterations of a run's log. Later iterations are not compared with one process's: a rounding
difference in a near-zero gradient component becomes a whole step of Adam (its first steps are lr times
the sign of the gradient), and the runs drift apart as they would on another CPU or thread count. Two
processes against two processes are compared bit for bit: a run whose second process is killed stops
cleanly, in one line, keeping its checkpoint, and resumed it gives the uninterrupted run's log. Runs are
tiny (2 tasks per meta-batch, one per process) on the learnable fake array from conftest.py; bad cases that
never start a second process run in this process, with torchrun's environment set.
"""
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing

import distributed
import maml_omniglot
import run_files
from conftest import RunningProcess, log_rows
from meta import MetaLearner
from omniglot_nshot import random_tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERATIONS = 12
CHECKPOINT_EVERY = 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_environment(rank, port):
    """What torchrun tells process `rank` of 2 on this machine."""
    return {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def tiny_args(data, out, *extra):
    return ["--data", str(data), "--out", str(out), "--device", "cpu", "--task-num", "2", "--iterations",
            str(ITERATIONS), "--eval-every", "2", "--eval-tasks", "4", "--test-tasks", "4", "--checkpoint-every",
            str(CHECKPOINT_EVERY), "--no-compile", *extra]  # eager: see test_experiment.tiny_args


# ----------------------------------------------------------------------------------------------------
# One meta-step, in two processes started by torch.multiprocessing
# ----------------------------------------------------------------------------------------------------


def new_meta_learner(reduce=None):
    torch.manual_seed(0)
    return MetaLearner(n_way=5, k_spt=1, update_lr=0.4, meta_lr=1e-3, update_step=2, update_step_test=3,
                       reduce=reduce)


def meta_batch():
    return random_tasks(4, 5, 1, 2, torch.Generator().manual_seed(0))  # 4 tasks, 5-way 1-shot, 2 queries


def meta_step_in_process(rank, port, folder):
    """Process `rank` of 2: one meta-step on its 2 of the 4 tasks, then drift detection. Saves what it saw."""
    os.environ.update(torchrun_environment(rank, port))
    torch.set_num_threads(1)
    distributed.join("cpu")
    meta_learner = new_meta_learner(reduce=distributed.average_meta_step)
    loss, accs = meta_learner(*distributed.my_tasks(meta_batch()))
    seen = {"loss": loss, "accs": accs, "grads": [p.grad for p in meta_learner.theta()]}
    distributed.check_identical(meta_learner.state_dict(), "the meta-parameters")  # the same step everywhere
    if rank == 1:
        with torch.no_grad():
            meta_learner.net.weights[0][0, 0, 0, 0] += 1e-6
    try:
        distributed.check_identical(meta_learner.state_dict(), "the meta-parameters")
    except distributed.DistributedError as e:
        seen["drift"] = str(e)
    torch.save(seen, os.path.join(folder, f"rank{rank}.pt"))
    distributed.leave()


def test_two_processes_take_the_one_process_meta_step_and_notice_a_drift(tmp_path):
    torch.multiprocessing.spawn(meta_step_in_process, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    meta_learner = new_meta_learner()
    loss, accs = meta_learner(*meta_batch())
    exact = new_meta_learner().double()  # float64: how far float32 rounding alone puts the one-process gradient
    exact(*(t.double() if t.is_floating_point() else t for t in meta_batch()))
    for seen in ranks:
        # Within float32 rounding: the two processes' meta-gradient (3e-7 off, relatively, here) is nearer the
        # one-process one than that is to the exact gradient (2e-6 off).
        for shared, one_process, float64 in zip(seen["grads"], meta_learner.theta(), exact.theta()):
            assert (shared - one_process.grad).norm() < (one_process.grad - float64.grad.float()).norm()
        assert seen["loss"] == pytest.approx(loss, rel=1e-6)
        assert seen["accs"] == pytest.approx(accs, abs=1e-6)
        assert seen["drift"] == ("the meta-parameters differ between the processes (rank 1 against rank 0): they "
                                 "drifted apart, so nothing more of this run is written")
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["grads"], ranks[1]["grads"]))  # bit for bit


# ----------------------------------------------------------------------------------------------------
# Whole runs
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_process_run(learnable_omniglot_npy, tmp_path_factory):
    """A whole run of two processes under torchrun itself (the other runs here start the processes as it does)."""
    out = tmp_path_factory.mktemp("two") / "out"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            os.path.join(REPO, "maml_omniglot.py"), *tiny_args(learnable_omniglot_npy, out)]
    done = subprocess.run(argv, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_a_two_process_run_logs_what_one_process_logs_up_to_rounding(two_process_run, learnable_omniglot_npy,
                                                                       tmp_path):
    one = tmp_path / "one"
    torch.set_num_threads(1)
    assert maml_omniglot.main(tiny_args(learnable_omniglot_npy, one)) == 0
    one_rows, two_rows = log_rows(one), log_rows(two_process_run)
    assert [(r["iteration"], r["split"]) for r in two_rows] == [(r["iteration"], r["split"]) for r in one_rows]
    first = [(a, b) for a, b in zip(one_rows, two_rows) if int(a["iteration"]) <= 2]  # see the docstring
    assert len(first) == 3
    for one_row, two_row in first:
        for column, value in one_row.items():
            if value and column not in ("iteration", "split"):
                assert float(two_row[column]) == pytest.approx(float(value), rel=1e-5, abs=1e-7), column
    assert sorted(os.listdir(two_process_run)) == sorted([".lock", *maml_omniglot.FILES.values()])  # one writer
    summary = json.loads((two_process_run / "summary.json").read_text())
    [segment] = summary["segments"]
    assert segment["device"]["processes"] == 2 and segment["device"]["backend"] == "gloo"
    assert summary["status"] == "finished" and summary["config"]["task_num"] == 2


def start_rank(rank, port, argv):
    """One process of a two-process run, started the way torchrun starts it; rank 0's progress bar is watched."""
    return RunningProcess([sys.executable, os.path.join(REPO, "maml_omniglot.py"), *argv],
                          dict(os.environ, OMP_NUM_THREADS="1", **torchrun_environment(rank, port)), ITERATIONS)


def test_killing_one_process_stops_the_other_in_one_line_and_the_run_resumes_bit_for_bit(
        two_process_run, learnable_omniglot_npy, tmp_path, capsys):
    out = tmp_path / "out"
    port = free_port()
    rank_0, rank_1 = (start_rank(rank, port, tiny_args(learnable_omniglot_npy, out)) for rank in range(2))
    rank_0.wait_for(5)
    rank_1.popen.send_signal(signal.SIGKILL)
    code, err = rank_0.finish()
    assert rank_1.finish()[0] == -signal.SIGKILL
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("maml_omniglot.py (rank 0 of 2): error: exchanging ")
    assert "another process stopped" in last
    assert last.endswith(f"stopping: the last good checkpoint ({out / 'checkpoint.pt'}) is kept")
    stopped = run_files.read_checkpoint(str(out / "checkpoint.pt"))["run"]["iteration"]  # intact
    assert stopped % CHECKPOINT_EVERY == 0 and 4 <= stopped < ITERATIONS
    assert json.loads((out / "summary.json").read_text())["iteration"] == stopped
    print(f"\nrank 1 killed after progress 5: checkpoint at iteration {stopped}")

    # With another number of processes (one, in this process) the run continues, noting the change.
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(out / "checkpoint.pt", other / "checkpoint.pt")
    torch.set_num_threads(1)
    assert maml_omniglot.main(tiny_args(learnable_omniglot_npy, other, "--resume")) == 0
    assert "note: this segment differs from the previous one (processes 2 -> 1)" in capsys.readouterr().err
    segments = json.loads((other / "summary.json").read_text())["segments"]
    assert [segment["device"]["processes"] for segment in segments] == [2, 1]
    assert [r for r in log_rows(other) if int(r["iteration"]) <= stopped] == \
        [r for r in log_rows(two_process_run) if int(r["iteration"]) <= stopped]

    # With the same number, bit for bit the uninterrupted run.
    port = free_port()
    resumed = [start_rank(rank, port, tiny_args(learnable_omniglot_npy, out, "--resume")) for rank in range(2)]
    for process in resumed:
        code, err = process.finish()
        assert code == 0, err
    assert log_rows(out) == log_rows(two_process_run)
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["from_iteration"], s["to_iteration"]) for s in summary["segments"]] == [(0, stopped),
                                                                                        (stopped, ITERATIONS)]


# ----------------------------------------------------------------------------------------------------
# Bad cases, refused in one line before a second process is needed
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def as_rank_0_of_2(monkeypatch):
    for key, value in torchrun_environment(0, free_port()).items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("task_num", ["3", "1"])  # 1: a process would have no task
def test_a_meta_batch_that_does_not_split_evenly_is_refused(task_num, as_rank_0_of_2, learnable_omniglot_npy,
                                                            tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        maml_omniglot.main(tiny_args(learnable_omniglot_npy, tmp_path / "out") + ["--task-num", task_num])
    assert exc.value.code == 2 and capsys.readouterr().err == (
        f"maml_omniglot.py (rank 0 of 2): error: --task-num {task_num} does not split into 2 equal shares, one per "
        f"process: give a multiple of 2, or another --nproc_per_node\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--data", "missing.npy"], "--data missing.npy does not exist: under torchrun build it first, on every machine"),
    (["--evaluate", "model.pt"], "--plot-only and --evaluate run in one process: start them with python"),
])
def test_what_cannot_run_under_torchrun_is_refused(extra, message, as_rank_0_of_2, learnable_omniglot_npy, tmp_path,
                                                   capsys):
    with pytest.raises(SystemExit) as exc:
        maml_omniglot.main(tiny_args(learnable_omniglot_npy, tmp_path / "out") + extra)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"maml_omniglot.py (rank 0 of 2): error: {message}")


def test_a_rendezvous_that_fails_is_one_line_and_leaves_nothing(learnable_omniglot_npy, tmp_path, monkeypatch,
                                                                   capsys):
    port = free_port()
    for key, value in torchrun_environment(0, port).items():  # rank 1 never comes
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(distributed, "TIMEOUT", datetime.timedelta(seconds=1))
    assert maml_omniglot.main(tiny_args(learnable_omniglot_npy, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"maml_omniglot.py (rank 0 of 2): error: could not join the other processes of the run at 127.0.0.1:{port} "
        f"(gloo): ")
    assert err.endswith("; stopping: no checkpoint had been written yet\n")
    assert not (tmp_path / "out").exists()
