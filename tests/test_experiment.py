"""maml_omniglot.py in-process: bad arguments, the outputs, determinism, NaN, refused resumes, plotting.

Runs are tiny (2 tasks per meta-batch, a few iterations, 4 validation and test tasks) on the learnable
fake array from conftest.py, so the whole file takes seconds. The subprocess kill tests are in
test_resume.py. Torch runs on one thread here: for such tiny batches a second thread only adds
synchronisation, which costs up to 100x when other processes compete for the cores.
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import maml_omniglot
import preprocess_omniglot
import results_table
import run_files
from conftest import log_rows


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_args(data, out, *extra, compiled=False):
    """A tiny run on the CPU, eager (--no-compile) unless `compiled`: the compiled meta-step is built once per
    process and shape, which the many tiny runs here would wait for (its tests ask for it)."""
    return ["--data", str(data), "--out", str(out), "--device", "cpu", "--task-num", "2", "--iterations", "6",
            "--eval-every", "3", "--eval-tasks", "4", "--test-tasks", "4", "--checkpoint-every", "2",
            *([] if compiled else ["--no-compile"]), *extra]


def exit_code_and_stderr(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        maml_omniglot.main(argv)
    return exc.value.code, capsys.readouterr().err


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if maml_omniglot gets as far as loading data or building the network."""

    def forbidden(*args, **kwargs):
        raise AssertionError("arguments should have been refused before loading data")

    monkeypatch.setattr(maml_omniglot, "OmniglotNShot", forbidden)
    monkeypatch.setattr(maml_omniglot, "MetaLearner", forbidden)


@pytest.fixture(scope="module")
def finished_run(learnable_omniglot_npy, tmp_path_factory):
    """One complete tiny run; tests read it but must not change it."""
    out = tmp_path_factory.mktemp("run") / "out"
    assert maml_omniglot.main(tiny_args(learnable_omniglot_npy, out)) == 0
    return out


BAD_ARGUMENTS = [
    (["--n-way", "1"], "--n-way must be at least 2"),
    (["--n-way", "101"], "--n-way 101 is more than the 100 classes of the val split"),
    (["--k-spt", "0"], "--k-spt must be at least 1"),
    (["--k-qry", "0"], "--k-qry must be at least 1"),
    (["--k-spt", "-3", "--k-qry", "1"], "--k-spt must be at least 1"),
    (["--k-spt", "15"], "--k-spt + --k-qry = 30 is more than the 20 drawings"),
    (["--k-spt", "10", "--k-qry", "11"], "--k-spt + --k-qry = 21 is more than the 20 drawings"),
    (["--update-lr", "-0.4"], "--update-lr must be a positive number, got -0.4"),
    (["--update-lr", "0"], "--update-lr must be a positive number, got 0.0"),
    (["--meta-lr", "-0.001"], "--meta-lr must be a positive number, got -0.001"),
    (["--meta-lr=-1e-3"], "--meta-lr must be a positive number, got -0.001"),
    (["--meta-lr", "nan"], "--meta-lr must be a positive number, got nan"),
    (["--update-lr", "inf"], "--update-lr must be a positive number, got inf"),
    (["--setting", "7w1s"], "argument --setting: invalid choice: '7w1s'"),
    (["--device", "tpu"], "--device 'tpu' is unknown"),
    (["--device", "mps"], "--device 'mps' is not supported"),
    (["--iterations", "0"], "--iterations must be at least 1, got 0"),
    (["--task-num", "0"], "--task-num must be at least 1, got 0"),
    (["--update-step", "0"], "--update-step must be at least 1, got 0"),
    (["--update-step-test", "0"], "--update-step-test must be at least 1, got 0"),
    (["--update-step", "101"], "--update-step 101 is more than 100, which would take hours (the paper takes 1 to 5)"),
    (["--update-step-test", "101"], "--update-step-test 101 is more than 100, which would take hours"),
    (["--eval-every", "0"], "--eval-every must be at least 1, got 0"),
    (["--eval-tasks", "0"], "--eval-tasks must be at least 1, got 0"),
    (["--test-tasks", "-1"], "--test-tasks must be at least 1, got -1"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be at least 1, got 0"),
    (["--n-way", "five"], "argument --n-way: invalid int value: 'five'"),
]


@pytest.mark.parametrize("extra, message", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_impossible_arguments_fail_before_loading_data_with_one_line(extra, message, tmp_path, capsys, no_training):
    code, err = exit_code_and_stderr(tiny_args(tmp_path / "data.npy", tmp_path / "out", *extra), capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("maml_omniglot.py: error: ")
    assert message in err
    assert not (tmp_path / "out" / "log.csv").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_but_unavailable(tmp_path, capsys, no_training):
    code, err = exit_code_and_stderr(tiny_args(tmp_path / "data.npy", tmp_path / "out", "--device", "cuda"), capsys)
    assert code == 2 and err == "maml_omniglot.py: error: --device cuda: CUDA is not available on this machine\n"


def test_unwritable_output_folder(tmp_path, capsys, no_training):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, err = exit_code_and_stderr(tiny_args(tmp_path / "data.npy", blocker / "out"), capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"--out {blocker / 'out'} cannot be written" in err


@pytest.mark.parametrize("key", ["--evaluate", "--plot-only", "--out", "--data"])
def test_an_empty_path_is_refused_in_one_line_writing_nothing(key, tmp_path, monkeypatch, capsys, no_training):
    """An empty value (an unset shell variable) is refused, not read as "not given" (training with the
    defaults into runs/5w1s) or as the current folder."""
    monkeypatch.chdir(tmp_path)  # where the default --out, runs/5w1s, would be written
    code, err = exit_code_and_stderr([key, ""], capsys)
    assert code == 2 and err == f"maml_omniglot.py: error: {key} is empty: give a path (an unset shell variable?)\n"
    assert os.listdir(tmp_path) == []


def test_missing_data_without_zips_or_network_fails_clearly(tmp_path, capsys):
    assert maml_omniglot.main(tiny_args(tmp_path / "nothing" / "omniglot.npy", tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("maml_omniglot.py: error: could not download images_background.zip")
    assert "put the two Omniglot zips here" in err


def test_an_array_of_the_wrong_shape_fails_clearly(tmp_path, capsys):
    np.save(tmp_path / "small.npy", np.zeros((10, 20, 1, 28, 28), dtype=np.float32))
    assert maml_omniglot.main(tiny_args(tmp_path / "small.npy", tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"maml_omniglot.py: error: {tmp_path / 'small.npy'} holds float32 (10, 20, 1, 28, 28)")


def test_a_run_writes_log_summary_and_plot(finished_run, learnable_omniglot_npy):
    rows = log_rows(finished_run, drop=())
    assert list(rows[0]) == (["iteration", "split"] + [f"acc_step{s}" for s in range(4)]
                             + [f"ci95_step{s}" for s in range(4)] + ["loss", "step_acc_iterations", "elapsed_s"])
    assert [(r["iteration"], r["split"]) for r in rows] == [
        ("0", "val"), ("3", "train"), ("3", "val"), ("6", "train"), ("6", "val"), ("6", "test")]
    for row in rows:
        assert float(row["elapsed_s"]) >= 0
        if row["split"] == "train":  # update_step = 1: two accuracies, a loss, no interval
            assert row["acc_step1"] and not row["acc_step2"] and not row["ci95_step0"] and float(row["loss"]) > 0
            assert 0 <= float(row["acc_step0"]) <= 1
            assert row["step_acc_iterations"] == "1"  # every 10th iteration and the row's last: of 3, the last
        else:  # update_step_test = 3: four accuracies with intervals, no loss
            assert all(0 <= float(row[f"acc_step{s}"]) <= 1 for s in range(4)) and row["ci95_step3"]
            assert row["loss"] == "" and row["step_acc_iterations"] == ""

    summary = json.loads((finished_run / "summary.json").read_text())
    test_row = rows[-1]
    assert summary["test"] == {"accs": [float(test_row[f"acc_step{s}"]) for s in range(4)],
                               "ci95": [float(test_row[f"ci95_step{s}"]) for s in range(4)], "tasks": 4}
    assert summary["config"]["n_way"] == 5 and summary["config"]["update_lr"] == 0.4
    assert summary["config"]["task_num"] == 2 and summary["seed"] == 0
    assert len(summary["git"]["commit"]) == 40 and isinstance(summary["git"]["dirty"], bool)
    assert summary["command"].startswith("python maml_omniglot.py --data ")
    assert summary["torch"] == torch.__version__ and summary["device"]["type"] == "cpu"
    assert summary["device"]["name"].endswith(f"{torch.backends.cpu.get_cpu_capability()})")  # which kernels ran
    assert summary["wall_time_s"] > 0 and summary["meta_iterations_per_s"] > 0
    assert summary["status"] == "finished" and summary["iteration"] == 6
    val_row = [r for r in rows if r["split"] == "val"][-1]
    assert summary["last_validation"]["accs"] == [float(val_row[f"acc_step{s}"]) for s in range(4)]
    [segment] = summary["segments"]
    assert (segment["from_iteration"], segment["to_iteration"]) == (0, 6)
    assert segment["command"] == summary["command"] and segment["git"] == summary["git"]
    assert segment["device"] == summary["device"] and segment["device"]["cpu_threads"] == 1
    assert 0 < segment["wall_time_s"] <= summary["wall_time_s"] + 1e-3

    assert (finished_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (finished_run / "checkpoint.pt").exists()
    assert not [p for p in os.listdir(finished_run) if p.endswith(".tmp")]


def test_sampling_the_step_accuracies_changes_no_step_and_the_train_rows_say_how_many(learnable_omniglot_npy,
                                                                                       tmp_path):
    """--step-accuracies-every 1 and 2: the same training bit for bit (losses, last-step accuracies, validation,
    θ), and each train row counts the iterations that measured acc_step0 (of iterations 1-3 and 4-6: all three,
    or the 2nd and the row's last)."""
    runs = {}
    for every in (1, 2):
        out = tmp_path / str(every)
        assert maml_omniglot.main(tiny_args(learnable_omniglot_npy, out, "--step-accuracies-every", str(every))) == 0
        runs[every] = (log_rows(out), run_files.read_checkpoint(str(out / "checkpoint.pt")))
    (all_rows, all_checkpoint), (sampled_rows, sampled_checkpoint) = runs[1], runs[2]
    assert [r["step_acc_iterations"] for r in all_rows if r["split"] == "train"] == ["3", "3"]
    assert [r["step_acc_iterations"] for r in sampled_rows if r["split"] == "train"] == ["2", "2"]
    for row, sampled in zip(all_rows, sampled_rows):
        assert {k: v for k, v in row.items() if k not in ("acc_step0", "step_acc_iterations")} == \
               {k: v for k, v in sampled.items() if k not in ("acc_step0", "step_acc_iterations")}
        if row["split"] != "train":
            assert row["acc_step0"] == sampled["acc_step0"]
    assert all(torch.equal(all_checkpoint["theta"][k], v) for k, v in sampled_checkpoint["theta"].items())
    assert sampled_checkpoint["config"]["step_accuracies_every"] == 2


def test_the_cpu_trains_through_the_compiled_meta_step_unless_told_not_to(learnable_omniglot_npy, tmp_path, capsys):
    """On the CPU a second-order run compiles its meta-step (the segment says "compiled" and how long compiling
    took), --no-compile and --first-order run it eagerly, and the first meta-step (from the same θ, on the
    same tasks) has the eager run's loss and accuracies to float32 rounding. Later rows drift apart by more:
    Adam's first steps are about sign(gradient) * lr, so a rounding difference in a near-zero component
    becomes a step of lr (as between the eager batched and per-task paths)."""
    first_rows, segments, said = [], [], []
    runs = (("eager", False, ()), ("compiled", True, ()), ("first order", True, ("--first-order",)))
    for name, compiled, extra in runs:
        out = tmp_path / name
        assert maml_omniglot.main(tiny_args(learnable_omniglot_npy, out, "--iterations", "1", *extra,
                                            compiled=compiled)) == 0
        segments.append(json.loads((out / "summary.json").read_text())["segments"][0])
        first_rows.append([r for r in log_rows(out) if r["split"] == "train"][0])
        said.append("compiling the meta-step (torch.compile" in capsys.readouterr().err)
    assert said == [False, True, False]
    assert [segment["computation"]["tasks"] for segment in segments] == ["batched", "compiled", "batched"]
    assert [("compile_s" in segment) for segment in segments] == [False, True, False]  # 0.0 if built already
    eager, compiled, _ = first_rows
    assert eager["iteration"] == compiled["iteration"] == "1"
    assert float(compiled["loss"]) == pytest.approx(float(eager["loss"]), rel=1e-5)
    assert compiled["acc_step0"] == eager["acc_step0"]
    assert float(compiled["acc_step1"]) == pytest.approx(float(eager["acc_step1"]), abs=0.1 + 1e-6)  # 1 of 10


def test_same_seed_same_log_other_seed_other_log(finished_run, learnable_omniglot_npy, tmp_path):
    assert maml_omniglot.main(tiny_args(learnable_omniglot_npy, tmp_path / "again")) == 0
    assert log_rows(tmp_path / "again") == log_rows(finished_run)
    assert maml_omniglot.main(tiny_args(learnable_omniglot_npy, tmp_path / "seed1", "--seed", "1")) == 0
    assert log_rows(tmp_path / "seed1") != log_rows(finished_run)


def test_plot_only_redraws_from_the_log(finished_run, tmp_path):
    for rows_kept in (None, -1):  # with the test row, and without it
        folder = tmp_path / f"plot{rows_kept}"
        folder.mkdir()
        lines = (finished_run / "log.csv").read_text().splitlines(keepends=True)
        (folder / "log.csv").write_text("".join(lines[:rows_kept]))
        assert maml_omniglot.main(["--plot-only", str(folder)]) == 0
        assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert sorted(os.listdir(folder)) == ["curves.png", "log.csv"]


def test_plot_only_into_a_folder_it_cannot_write_is_one_line(finished_run, tmp_path, monkeypatch, capsys):
    def disk_full(fd):
        raise OSError(28, "No space left on device")

    folder = tmp_path / "plot"
    folder.mkdir()
    (folder / "log.csv").write_bytes((finished_run / "log.csv").read_bytes())
    monkeypatch.setattr(run_files.os, "fsync", disk_full)
    assert maml_omniglot.main(["--plot-only", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err == f"maml_omniglot.py: error: cannot write {folder / 'curves.png'}: No space left on device\n"
    assert sorted(os.listdir(folder)) == ["log.csv"]


def test_the_iteration_line_names_its_inner_steps_in_good_english(learnable_omniglot_npy, tmp_path, capsys):
    assert maml_omniglot.main(tiny_args(learnable_omniglot_npy, tmp_path / "out", "--iterations", "3")) == 0
    out = capsys.readouterr().out
    assert "(after 1 inner step), val" in out and "(after 3 inner steps)" in out and "1 inner steps" not in out


def test_plot_only_without_a_log(tmp_path, capsys):
    code, err = exit_code_and_stderr(["--plot-only", str(tmp_path)], capsys)
    assert code == 2 and f"there is no {tmp_path / 'log.csv'}" in err


def copy_of_finished_checkpoint(finished_run, tmp_path):
    """A folder holding only the checkpoint of the finished run: a run that stopped just before its test."""
    out = tmp_path / "copy"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((finished_run / "checkpoint.pt").read_bytes())
    return out


def checkpoint_contents(out):
    return run_files.read_checkpoint(str(out / "checkpoint.pt"))


def test_nan_stops_naming_the_iteration_and_keeps_the_last_good_checkpoint(
        learnable_omniglot_npy, tmp_path, monkeypatch, capsys):
    class NanAtFifth(maml_omniglot.MetaLearner):
        calls = 0

        def meta_loss(self, *batch):
            loss, accs = super().meta_loss(*batch)
            NanAtFifth.calls += 1
            return (loss * float("nan") if NanAtFifth.calls == 5 else loss), accs

    monkeypatch.setattr(maml_omniglot, "MetaLearner", NanAtFifth)
    out = tmp_path / "out"
    assert maml_omniglot.main(tiny_args(learnable_omniglot_npy, out)) == 1
    err = capsys.readouterr().err
    assert "error: the meta-gradient is not finite (meta-loss nan) at iteration 5; stopping" in err
    assert f"the last good checkpoint ({out / 'checkpoint.pt'}) is kept" in err
    checkpoint = checkpoint_contents(out)
    assert checkpoint["run"]["iteration"] == 4
    assert all(torch.isfinite(w).all() for w in checkpoint["theta"].values())
    assert [r["iteration"] for r in log_rows(out)] == ["0", "3", "3"]
    summary = json.loads((out / "summary.json").read_text())  # describes the checkpoint that was kept
    assert summary["status"] == "in progress" and summary["iteration"] == 4 and summary["test"] is None
    assert summary["last_validation"]["iteration"] == 3
    assert [(s["from_iteration"], s["to_iteration"]) for s in summary["segments"]] == [(0, 4)]
    assert not (out / "model.pt").exists()
    ours, iterations = results_table.describe(summary)[:2]
    assert ours.startswith("in progress: validation ") and ours.endswith(" % at iteration 3")
    assert iterations == "4 of 6"


def test_an_exploding_inner_rate_never_finishes_with_nan_weights(learnable_omniglot_npy, tmp_path, capsys):
    """The reliability report's case: the first meta-gradient is NaN though the loss it reports is finite."""
    out = tmp_path / "out"
    code = maml_omniglot.main(tiny_args(learnable_omniglot_npy, out, "--iterations", "1", "--update-lr", "1e15",
                                        "--eval-every", "2", "--checkpoint-every", "1"))
    assert code == 1 and "the meta-gradient is not finite" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "in progress" and summary["iteration"] == 0
    assert all(torch.isfinite(w).all() for w in checkpoint_contents(out)["theta"].values())
    assert not (out / "model.pt").exists()
    assert maml_omniglot.main(tiny_args(learnable_omniglot_npy, out, "--iterations", "1", "--update-lr", "1e15",
                                        "--eval-every", "2", "--checkpoint-every", "1", "--resume")) == 1


def test_a_finite_divergence_finishes_with_a_warning_everywhere(learnable_omniglot_npy, tmp_path, capsys):
    """--update-lr 100 on the tiny data: a finite meta-loss thousands of times a uniform guess's."""
    out = tmp_path / "out"
    assert maml_omniglot.main(tiny_args(learnable_omniglot_npy, out, "--update-lr", "100", "--iterations", "1",
                                        "--eval-every", "1", "--checkpoint-every", "1")) == 0
    captured = capsys.readouterr()
    [warning] = json.loads((out / "summary.json").read_text())["warnings"]
    assert warning.startswith("the meta-loss, ") and "the meta-training has diverged" in warning
    loss = float(log_rows(out)[1]["loss"])
    assert np.isfinite(loss) and loss > run_files.DIVERGED_LOSS * np.log(5) and f"{loss:.3g}" in warning
    [iteration_line] = [line for line in captured.out.splitlines() if line.startswith("iteration 1: ")]
    assert iteration_line.endswith(f"; warning: {warning}")
    [test_line] = [line for line in captured.out.splitlines() if line.startswith("test accuracy")]
    assert test_line.endswith(f" (warning: {warning})")


def test_resume_with_another_configuration_is_refused_naming_the_values(finished_run, tmp_path, capsys,
                                                                        learnable_omniglot_npy):
    out = copy_of_finished_checkpoint(finished_run, tmp_path)
    before = (out / "checkpoint.pt").read_bytes()
    code, err = exit_code_and_stderr(
        tiny_args(learnable_omniglot_npy, out, "--resume", "--update-lr", "0.3", "--setting", "5w5s"), capsys)
    assert code == 2 and err.count("\n") == 1
    assert "was made with another configuration; refusing to resume" in err
    for difference in ("k_spt: checkpoint 1, now 5", "k_qry: checkpoint 1, now 5",
                       "setting: checkpoint '5w1s', now '5w5s'", "update_lr: checkpoint 0.4, now 0.3"):
        assert difference in err
    assert (out / "checkpoint.pt").read_bytes() == before
    assert os.listdir(out) == ["checkpoint.pt"]  # the folder as it was: no .lock left behind


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "foreign"])
def test_corrupt_checkpoint_is_refused_and_left_alone(damage, finished_run, learnable_omniglot_npy, tmp_path,
                                                     capsys):
    out = tmp_path / "out"
    out.mkdir()
    good = (finished_run / "checkpoint.pt").read_bytes()
    bad = {"truncated": good[: len(good) // 2], "garbage": os.urandom(5000), "empty": b"",
           "foreign": None}[damage]
    if bad is None:
        torch.save({"format": run_files.CHECKPOINT_FORMAT, "iteration": 3}, out / "checkpoint.pt")
        bad = (out / "checkpoint.pt").read_bytes()
    else:
        (out / "checkpoint.pt").write_bytes(bad)
    code, err = exit_code_and_stderr(tiny_args(learnable_omniglot_npy, out, "--resume"), capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"{out / 'checkpoint.pt'} is corrupt or truncated" in err and "refusing to resume" in err
    assert (out / "checkpoint.pt").read_bytes() == bad
    assert sorted(os.listdir(out)) == ["checkpoint.pt"]


def test_a_checkpoint_of_an_older_format_is_refused_naming_the_commit_that_reads_it(
        learnable_omniglot_npy, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    torch.save({"format": 2, "iteration": 3, "segments": []}, out / "checkpoint.pt")  # format 2's layout, in short
    code, err = exit_code_and_stderr(tiny_args(learnable_omniglot_npy, out, "--resume"), capsys)
    assert code == 2 and err.count("\n") == 1
    assert "was written by an older maml_omniglot.py (format 2); use it with commit bf074d8" in err
    assert "It was left untouched" in err


def test_a_bit_flip_in_a_checkpoint_is_refused(finished_run, learnable_omniglot_npy, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    checkpoint = torch.load(finished_run / "checkpoint.pt", weights_only=False)
    weight = checkpoint["theta"]["net.weights.0"]
    weight.view(torch.int32)[0, 0, 0, 0] ^= 1 << 3  # one bit of one weight: still a perfectly loadable file
    torch.save(checkpoint, out / "checkpoint.pt")
    code, err = exit_code_and_stderr(tiny_args(learnable_omniglot_npy, out, "--resume"), capsys)
    assert code == 2 and err.count("\n") == 1
    assert "do not match their SHA-256 digest" in err and "refusing to resume" in err


def test_an_existing_checkpoint_needs_resume(finished_run, learnable_omniglot_npy, tmp_path, capsys, no_training):
    out = copy_of_finished_checkpoint(finished_run, tmp_path)
    code, err = exit_code_and_stderr(tiny_args(learnable_omniglot_npy, out), capsys)
    assert code == 2 and "already holds checkpoint.pt: add --resume" in err


@pytest.mark.parametrize("resume", [False, True])
def test_a_finished_run_is_never_written_into_again(resume, finished_run, learnable_omniglot_npy, capsys,
                                                    no_training):
    before = {name: (finished_run / name).read_bytes() for name in os.listdir(finished_run)}
    code, err = exit_code_and_stderr(tiny_args(learnable_omniglot_npy, finished_run, *["--resume"] * resume), capsys)
    assert code == 2 and err == (f"maml_omniglot.py: error: --out {finished_run} holds a finished run, which is "
                                 f"never written into again: choose another --out\n")
    assert {name: (finished_run / name).read_bytes() for name in os.listdir(finished_run)} == before


def test_resuming_a_finished_run_only_repeats_the_test(finished_run, learnable_omniglot_npy, tmp_path):
    out = copy_of_finished_checkpoint(finished_run, tmp_path)
    assert maml_omniglot.main(tiny_args(learnable_omniglot_npy, out, "--resume")) == 0
    assert log_rows(out) == log_rows(finished_run)
    segments = json.loads((out / "summary.json").read_text())["segments"]
    assert [(s["from_iteration"], s["to_iteration"]) for s in segments] == [(0, 6), (6, 6)]


def test_a_resumed_segment_that_runs_differently_is_recorded_and_announced(finished_run, learnable_omniglot_npy,
                                                                         tmp_path, capsys):
    out = copy_of_finished_checkpoint(finished_run, tmp_path)
    torch.set_num_threads(2)
    try:
        assert maml_omniglot.main(tiny_args(learnable_omniglot_npy, out, "--resume")) == 0
    finally:
        torch.set_num_threads(1)
    assert ("note: this segment differs from the previous one (cpu threads 1 -> 2; task threads 1 -> 2)"
            in capsys.readouterr().err)
    summary = json.loads((out / "summary.json").read_text())
    assert [s["device"]["cpu_threads"] for s in summary["segments"]] == [1, 2]
    assert results_table.describe(summary)[3].endswith(
        ", 1 thread; " + summary["segments"][1]["device"]["name"] + ", 2 threads")


def write_array_its_sidecar_does_not_describe(path, learnable):
    path.write_bytes(learnable.read_bytes())
    sidecar = learnable.with_suffix(".json").read_text().replace('"sha256": "', '"sha256": "0')
    path.with_suffix(".json").write_text(sidecar)


def write_array_with_nan_pixels(path, learnable):
    omniglot = np.load(learnable)
    omniglot[7, 3, 0, 14, 14] = np.nan
    preprocess_omniglot.save_omniglot(path, omniglot, {})  # a consistent pair: the sidecar describes it


BAD_DATA = {
    "a folder": lambda path, learnable: path.mkdir(),
    "an empty file": lambda path, learnable: path.write_bytes(b""),
    "another format": lambda path, learnable: path.write_text("iteration,split\n0,val\n"),
    "an array without its sidecar": lambda path, learnable: path.write_bytes(learnable.read_bytes()),
    "an array its sidecar does not describe": write_array_its_sidecar_does_not_describe,
    "an array with NaN pixels": write_array_with_nan_pixels,
}


@pytest.mark.parametrize("kind", BAD_DATA)
def test_unusable_data_is_refused_in_one_line_leaving_nothing(kind, learnable_omniglot_npy, tmp_path, capsys):
    data = tmp_path / "data" / "omniglot.npy"
    data.parent.mkdir()
    BAD_DATA[kind](data, learnable_omniglot_npy)
    out = tmp_path / "out"
    assert maml_omniglot.main(tiny_args(data, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"maml_omniglot.py: error: {data}"), err
    assert not out.exists()


def test_a_folder_in_use_by_another_run_is_refused_naming_the_holder(learnable_omniglot_npy, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with run_files.FolderLock(str(out)):
        code, err = exit_code_and_stderr(tiny_args(learnable_omniglot_npy, out), capsys)
        assert sorted(os.listdir(out)) == [".lock"]  # the holder's, and nothing of the refused run
    assert code == 2 and err.count("\n") == 1
    assert f"--out {out} is being written by process {os.getpid()} on " in err


def test_a_folder_in_use_is_refused_before_its_files_are_read(finished_run, learnable_omniglot_npy, tmp_path,
                                                             capsys, no_training):
    """The folder's checks (here: a finished summary.json) are made under the lock, so the refusal is the
    lock's: another process may be changing the files."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_bytes((finished_run / "summary.json").read_bytes())
    with run_files.FolderLock(str(out)):
        code, err = exit_code_and_stderr(tiny_args(learnable_omniglot_npy, out), capsys)
        assert sorted(os.listdir(out)) == [".lock", "summary.json"]
    assert code == 2 and err.count("\n") == 1
    assert f"--out {out} is being written by process {os.getpid()} on " in err


def test_evaluate_into_a_folder_in_use_is_refused_naming_the_holder(finished_run, tmp_path, capsys, no_training):
    out = tmp_path / "out"
    out.mkdir()
    with run_files.FolderLock(str(out)):
        code, err = exit_code_and_stderr(["--evaluate", str(finished_run / "model.pt"), "--out", str(out)], capsys)
        assert os.listdir(out) == [".lock"]  # the holder's, and no evaluation.json
    assert code == 2 and err.count("\n") == 1
    assert f"--out {out} is being written by process {os.getpid()} on " in err


def test_the_lock_holder_removes_the_temporary_files_of_dead_processes_only(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead = int(finished.stdout)  # a process that has ended (and been reaped)
    assert not run_files.alive(dead) and run_files.alive(os.getpid())
    left = {"dead": f"checkpoint.pt.{dead}.tmp", "live": f"log.csv.{os.getpid()}.tmp", "other": "notes.txt"}
    for name in left.values():
        (tmp_path / name).write_text("partial")
    with run_files.FolderLock(str(tmp_path)):
        assert sorted(os.listdir(tmp_path)) == sorted([".lock", left["live"], left["other"]])


def test_ctrl_c_while_loading_leaves_nothing(learnable_omniglot_npy, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(maml_omniglot, "OmniglotNShot", interrupted)
    out = tmp_path / "out"
    assert maml_omniglot.main(tiny_args(learnable_omniglot_npy, out)) == 130
    assert capsys.readouterr().err == "maml_omniglot.py: interrupted; nothing was written\n"
    assert not out.exists()


def test_ctrl_c_during_the_test_keeps_the_checkpoint_and_resume_finishes(finished_run, learnable_omniglot_npy,
                                                                          tmp_path, monkeypatch, capsys):
    evaluate = maml_omniglot.evaluate

    def interrupted_test(meta_learner, sampler, split, n_tasks):
        if split == "test":
            raise KeyboardInterrupt
        return evaluate(meta_learner, sampler, split, n_tasks)

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(maml_omniglot, "evaluate", interrupted_test)
        assert maml_omniglot.main(tiny_args(learnable_omniglot_npy, out)) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"maml_omniglot.py: interrupted; {out / 'checkpoint.pt'} is kept: continue with --resume"
    assert json.loads((out / "summary.json").read_text())["status"] == "in progress"
    assert maml_omniglot.main(tiny_args(learnable_omniglot_npy, out, "--resume")) == 0
    assert log_rows(out) == log_rows(finished_run)


def test_a_signal_during_training_is_announced_at_once(capsys):
    """Unit test of the handler: the stop is said when the signal comes, not minutes later at the checkpoint."""
    stop = run_files.StopRequested(writer=True)
    stop.handle(signal.SIGINT, None)
    assert capsys.readouterr().err == ("SIGINT: stopping after this iteration (and its validation, if it has one), "
                                       "with a checkpoint\n")
    assert stop.signum == signal.SIGINT
    stop.handle(signal.SIGINT, None)  # a second Ctrl-C: the stop is already on its way
    assert capsys.readouterr().err == ""


def test_an_interrupted_run_has_the_curves_of_its_last_validation(learnable_omniglot_npy, tmp_path, monkeypatch,
                                                                 capsys):
    evaluate = maml_omniglot.evaluate

    def interrupted_test(meta_learner, sampler, split, n_tasks):
        if split == "test":
            raise KeyboardInterrupt
        return evaluate(meta_learner, sampler, split, n_tasks)

    monkeypatch.setattr(maml_omniglot, "evaluate", interrupted_test)
    out = tmp_path / "out"
    assert maml_omniglot.main(tiny_args(learnable_omniglot_npy, out, "--iterations", "3")) == 130
    assert json.loads((out / "summary.json").read_text())["status"] == "in progress"
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sigterm_during_the_final_test_stops_at_once_and_resume_finishes(finished_run, learnable_omniglot_npy,
                                                                         tmp_path, monkeypatch, capsys):
    """After the last checkpoint nothing is lost by stopping at once: the test is stopped, not finished first."""
    evaluate = maml_omniglot.evaluate

    def sigterm_during_the_test(meta_learner, sampler, split, n_tasks):
        if split == "test":
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # the installed handler, as the signal calls it
        return evaluate(meta_learner, sampler, split, n_tasks)

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(maml_omniglot, "evaluate", sigterm_during_the_test)
        assert maml_omniglot.main(tiny_args(learnable_omniglot_npy, out)) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"maml_omniglot.py: interrupted (SIGTERM during the final test); {out / 'checkpoint.pt'} is kept: "
                   f"continue with --resume")
    assert json.loads((out / "summary.json").read_text())["status"] == "in progress"
    assert not (out / "model.pt").exists()
    assert maml_omniglot.main(tiny_args(learnable_omniglot_npy, out, "--resume")) == 0
    assert log_rows(out) == log_rows(finished_run)


def test_a_full_disk_fails_in_one_line_and_leaves_no_temporary_file(learnable_omniglot_npy, tmp_path, monkeypatch,
                                                                    capsys):
    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_files.os, "fsync", disk_full)
    out = tmp_path / "out"
    out.mkdir()
    assert maml_omniglot.main(tiny_args(learnable_omniglot_npy, out)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"maml_omniglot.py: error: cannot write {out / 'log.csv'}: No space left on device"
    assert os.listdir(out) == []  # no temporary file keeps the disk full


def test_a_full_disk_at_the_final_curves_says_the_run_has_finished(learnable_omniglot_npy, tmp_path, monkeypatch,
                                                                    capsys):
    out = tmp_path / "out"
    atomic_write = run_files.atomic_write

    def full_at_the_final_curves(path, data):
        if path == str(out / "curves.png") and run_files.status_of(str(out)) == "finished":
            raise run_files.RunFileError(f"cannot write {path}: No space left on device")
        atomic_write(path, data)

    with monkeypatch.context() as patch:
        patch.setattr(run_files, "atomic_write", full_at_the_final_curves)
        assert maml_omniglot.main(tiny_args(learnable_omniglot_npy, out, "--iterations", "3")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"maml_omniglot.py: error: cannot write {out / 'curves.png'}: No space left on device; the run "
                   f"has finished (its summary.json and model.pt are written): python maml_omniglot.py --plot-only "
                   f"{out} draws curves.png")
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
    assert run_files.read_model(str(out / "model.pt"))["config"]["iterations"] == 3
    assert maml_omniglot.main(["--plot-only", str(out)]) == 0  # the disk has room again: the advice works


@pytest.mark.parametrize("seed", ["-1", str(2 ** 32)])
def test_a_seed_the_rngs_cannot_take_is_refused(seed, learnable_omniglot_npy, tmp_path, capsys, no_training):
    code, err = exit_code_and_stderr(tiny_args(learnable_omniglot_npy, tmp_path / "out", "--seed", seed), capsys)
    assert code == 2 and err == f"maml_omniglot.py: error: --seed must be between 0 and {2 ** 32 - 1}, got {seed}\n"


@pytest.mark.parametrize("content", ["", "not,a\nlog\n", "\x00\xff\xfe"])
def test_plot_only_refuses_a_malformed_log_in_one_line(content, tmp_path, capsys):
    (tmp_path / "log.csv").write_bytes(content.encode("latin-1"))
    code, err = exit_code_and_stderr(["--plot-only", str(tmp_path)], capsys)
    assert code == 2 and err.count("\n") == 1 and "is not a log.csv of this program" in err
    assert not (tmp_path / "curves.png").exists()


def test_a_finished_run_ships_its_weights_loadable_with_weights_only(finished_run):
    model = torch.load(finished_run / "model.pt", weights_only=True)
    summary = json.loads((finished_run / "summary.json").read_text())
    assert model["config"] == summary["config"] and model["format"] == run_files.MODEL_FORMAT
    assert model["param_names"][:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    trained = checkpoint_contents(finished_run)["theta"]
    assert model["theta"].keys() == trained.keys()
    assert all(torch.equal(model["theta"][name], trained[name]) for name in trained)


def test_evaluate_repeats_the_runs_test_exactly(finished_run, learnable_omniglot_npy, tmp_path, capsys):
    out = tmp_path / "evaluation"
    assert maml_omniglot.main(["--evaluate", str(finished_run / "model.pt"), "--data", str(learnable_omniglot_npy),
                               "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads((out / "evaluation.json").read_text())
    summary = json.loads((finished_run / "summary.json").read_text())
    assert {key: report[key] for key in ("accs", "ci95", "tasks")} == summary["test"]
    assert report["split"] == "test" and report["config"]["seed"] == summary["seed"]
    assert report["command"].startswith("python maml_omniglot.py --evaluate ") and len(report["git"]["commit"]) == 40
    assert report["device"]["type"] == "cpu" and report["wall_time_s"] > 0
    printed = capsys.readouterr().out
    assert f"3 steps: {100 * summary['test']['accs'][3]:.2f} ± {100 * summary['test']['ci95'][3]:.2f} %" in printed


def test_evaluate_with_more_steps_another_k_and_more_queries(finished_run, learnable_omniglot_npy, tmp_path):
    out = tmp_path / "evaluation"
    assert maml_omniglot.main(["--evaluate", str(finished_run / "model.pt"), "--data", str(learnable_omniglot_npy),
                               "--device", "cpu", "--update-step-test", "10", "--k-spt", "5", "--k-qry", "15",
                               "--test-tasks", "6", "--split", "val", "--seed", "3", "--out", str(out)]) == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert len(report["accs"]) == len(report["ci95"]) == 11 and report["tasks"] == 6 and report["split"] == "val"
    assert (report["config"]["k_spt"], report["config"]["k_qry"], report["config"]["seed"]) == (5, 15, 3)
    assert report["accs"][10] > report["accs"][0]  # adaptation helps, also with 5 drawings and 10 steps


def write_model_of_another_format(path):
    torch.save({"format": 99}, path)


BAD_MODELS = {
    "missing": (lambda path: None, "is not a file: give the model.pt of a finished run"),
    "a checkpoint": (None, "is not a model.pt: it holds objects that a model.pt never does (a checkpoint.pt?"),
    "random bytes": (lambda path: path.write_bytes(os.urandom(300)), "is corrupt or truncated, or not a model.pt"),
    "another format": (write_model_of_another_format, "is corrupt or truncated (not a format-2 file"),
}


@pytest.mark.parametrize("kind", BAD_MODELS)
def test_evaluate_refuses_what_is_not_a_model_in_one_line(kind, finished_run, tmp_path, capsys, no_training):
    make, message = BAD_MODELS[kind]
    path = tmp_path / "model.pt"
    if make is None:
        path.write_bytes((finished_run / "checkpoint.pt").read_bytes())
    else:
        make(path)
    code, err = exit_code_and_stderr(["--evaluate", str(path)], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err


def test_evaluate_refuses_another_n_way_and_training_flags(finished_run, capsys, no_training):
    model = str(finished_run / "model.pt")
    code, err = exit_code_and_stderr(["--evaluate", model, "--n-way", "20"], capsys)
    assert code == 2 and "is a 5-way model (its output layer has 5 classes): --n-way must be 5" in err
    code, err = exit_code_and_stderr(["--evaluate", model, "--iterations", "5", "--resume"], capsys)
    assert code == 2 and err.startswith("maml_omniglot.py: error: --iterations, --resume: not used by --evaluate")
    code, err = exit_code_and_stderr(["--evaluate", model, "--k-spt", "19", "--k-qry", "2"], capsys)
    assert code == 2 and "--k-spt + --k-qry = 21 is more than the 20 drawings" in err
    code, err = exit_code_and_stderr(["--split", "val"], capsys)
    assert code == 2 and "--split is for --evaluate only" in err


@pytest.mark.parametrize("extra", [["--setting", "20w1s"], ["--iterations", "0"]], ids=" ".join)
def test_evaluate_refuses_every_training_flag_given_whatever_its_value(extra, finished_run, capsys, no_training):
    code, err = exit_code_and_stderr(["--evaluate", str(finished_run / "model.pt"), *extra], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"maml_omniglot.py: error: {extra[0]}: not used by --evaluate")


def test_a_meta_batch_too_large_for_memory_fails_in_one_line_leaving_nothing(learnable_omniglot_npy, tmp_path,
                                                                              capsys):
    out = tmp_path / "out"
    assert maml_omniglot.main(tiny_args(learnable_omniglot_npy, out, "--task-num", "100000000")) == 1
    err = capsys.readouterr().err  # the progress bar had begun: the first validation samples the tasks
    assert err.count("error") == 1
    assert err.strip().splitlines()[-1].startswith("maml_omniglot.py: error: out of memory (")
    assert not out.exists()


@pytest.mark.parametrize("key", ["--eval-tasks", "--test-tasks"])
def test_an_evaluation_that_would_never_end_is_refused(key, tmp_path, capsys, no_training):
    code, err = exit_code_and_stderr(tiny_args(tmp_path / "data.npy", tmp_path / "out", key, "1000000"), capsys)
    assert code == 2 and f"{key} 1000000 is more than 100,000, which would take hours" in err
