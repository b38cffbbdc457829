"""results_table.py on synthetic repositories: the seeds row, --publish and its refusals, malformed input.

Every test points results_table.ROOT at its own tmp folder holding a README.md with the markers and a
results/ of summaries made by summary() below, so nothing here reads or writes the committed results.
"""
import csv
import json
import math
import random
from pathlib import Path

import pytest

import results_table
import run_files

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "5w1s-cpu-reference"
README = f"# project\n\n{results_table.BEGIN}\nold table\n{results_table.END}\n\nafter the table\n"


def summary(setting="5w1s", seed=0, acc=0.99, status="finished", **config):
    """A summary.json as maml_omniglot.py writes it, every key present: a run of setting with seed whose test
    accuracy after update_step_test (3) steps is acc (one step earlier it is 0.5, so a wrong step shows).
    config overrides values of the run's config; the run ran on 2 CPU threads at commit abc..."""
    cfg = {"setting": setting, "n_way": 5, "k_spt": 1, "task_num": 32, "update_lr": 0.4, "meta_lr": 0.001,
           "update_step": 1, "update_step_test": 3, "iterations": 60000, "k_qry": 1, "first_order": False,
           "rotate": True, "seed": seed, "eval_every": 500, "eval_tasks": 320, "test_tasks": 600,
           "checkpoint_every": 500, "data": "data/omniglot.npy", "out": f"results/{setting}", "device": "cpu"}
    cfg.update(config)
    finished = status == "finished"
    device = {"type": "cpu", "name": "AMD EPYC", "cpu_threads": 2}
    git = {"commit": "abcdef0123456789", "dirty": False}
    return {
        "status": status,
        "iteration": cfg["iterations"] if finished else 1000,
        "test": {"accs": [0.2, 0.5, 0.5, acc], "ci95": [0.01, 0.01, 0.01, 0.004], "tasks": 600} if finished else None,
        "last_validation": {"iteration": 1000, "tasks": 320, "accs": [0.2, 0.9, 0.9, 0.9],
                            "ci95": [0.01, 0.01, 0.01, 0.01]},
        "config": cfg, "seed": seed, "command": "python maml_omniglot.py", "git": git, "torch": "2.13.0+cpu",
        "python": "3.11.7", "device": device,
        "segments": [{"from_iteration": 0, "to_iteration": cfg["iterations"], "command": "python maml_omniglot.py",
                      "git": git, "device": device, "torch": "2.13.0+cpu", "python": "3.11.7",
                      "started_utc": "2026-11-24T08:01:53Z", "wall_time_s": 3600.0}],
        "wall_time_s": 3600.0, "train_time_s": 3500.0, "meta_iterations_per_s": 3.4,
    }


def write_run(folder, run_summary, files=("log.csv", "curves.png", "model.pt")):
    """folder/summary.json holding run_summary, and each of files: log.csv and model.pt the committed reference
    run's (--publish reads them), any other file with content that names it."""
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(run_summary, indent=2))
    for file in files:
        real = REFERENCE / file if file in ("log.csv", "model.pt") else None
        (folder / file).write_bytes(real.read_bytes() if real else f"{folder.name}/{file}".encode())
    return folder


def flip_a_byte(path):
    """Flip the bits of the byte in the middle of path (in model.pt: inside the weights)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A repository for results_table: README.md with the markers and an empty results/."""
    root = tmp_path / "repo"
    (root / "results").mkdir(parents=True)
    (root / "README.md").write_text(README)
    monkeypatch.setattr(results_table, "ROOT", root)
    return root


def run_main(argv, capsys):
    """(exit code, stdout, stderr) of results_table.main(argv)."""
    try:
        results_table.main(argv)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(root):
    """{relative path: bytes} of every file under root, to show that a refused command changed nothing."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def rows(text):
    """{first cell: row} of a markdown table."""
    return {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}


def test_the_seeds_row_gives_mean_and_sample_std_of_the_final_test_accuracies(root):
    accs = {0: 0.991, 1: 0.985, 2: 0.973}
    for seed, acc in accs.items():
        name = "5w1s" if seed == 0 else f"5w1s-seed{seed}"
        write_run(root / "results" / name, summary(seed=seed, acc=acc, out=f"runs/{name}"))
    percents = [100 * acc for acc in accs.values()]
    mean = sum(percents) / 3
    std = math.sqrt(sum((p - mean) ** 2 for p in percents) / (3 - 1))  # 0.9 (with ddof=0 it would be 0.7)
    table = rows(results_table.table())
    assert f"| {mean:.1f} ± {std:.1f} % (mean ± sample std, seeds 0, 1, 2) | 60,000 | 3.00 h in all |" \
        in table["5w1s, 3 seeds"]
    for name, own in (("5w1s", "99.1"), ("5w1s-seed1", "98.5"), ("5w1s-seed2", "97.3")):
        assert f"| {own} ± 0.4 % (600 tasks) |" in table[name]  # each run keeps its own interval
    names = list(table)
    assert names.index("5w1s-seed2") + 1 == names.index("5w1s, 3 seeds") < names.index("5w5s")


def test_where_and_on_what_a_seed_ran_does_not_split_it_but_a_hyperparameter_does(root):
    write_run(root / "results" / "5w1s", summary(seed=0, acc=0.99))
    write_run(root / "results" / "5w1s-seed1", summary(seed=1, acc=0.98, out="elsewhere", data="other.npy",
                                                       device="cuda", checkpoint_every=100))
    write_run(root / "results" / "5w1s-lr", summary(seed=2, acc=0.90, update_lr=0.3))
    write_run(root / "results" / "5w1s-short", summary(seed=3, acc=0.80, iterations=500))
    table = rows(results_table.table())
    assert "(mean ± sample std, seeds 0, 1)" in table["5w1s, 2 seeds"]
    assert [name for name in table if "seeds" in name] == ["5w1s, 2 seeds"]


def test_runs_in_progress_and_a_repeated_seed_are_not_counted(root):
    write_run(root / "results" / "5w1s", summary(seed=0, acc=0.99))
    write_run(root / "results" / "5w1s-seed0-again", summary(seed=0, acc=0.50))
    write_run(root / "results" / "5w1s-seed1", summary(seed=1, acc=0.97))
    write_run(root / "results" / "5w1s-seed2", summary(seed=2, status="in progress"))
    table = rows(results_table.table())
    assert "| 98.0 ± 1.4 % (mean ± sample std, seeds 0, 1) |" in table["5w1s, 2 seeds"]
    assert "in progress: validation 90.0 ± 1.0 % at iteration 1,000" in table["5w1s-seed2"]


def test_one_finished_seed_beside_an_unfinished_one_has_no_seeds_row(root):
    write_run(root / "results" / "5w1s", summary(seed=0))
    write_run(root / "results" / "5w1s-seed1", summary(seed=1, status="in progress"))
    assert "seeds" not in results_table.table()


def test_publish_copies_the_run_and_rewrites_the_table(root, tmp_path, capsys):
    run_dir = write_run(tmp_path / "runs" / "5w1s-seed1", summary(seed=1, acc=0.97))
    write_run(root / "results" / "5w1s", summary(seed=0, acc=0.99))
    code, out, err = run_main(["--publish", str(run_dir)], capsys)
    assert (code, err) == (0, "")
    assert "published" in out and "results/5w1s-seed1/" in out
    published = root / "results" / "5w1s-seed1"
    assert snapshot(published) == snapshot(run_dir)
    assert sorted(path.name for path in (root / "results").iterdir()) == ["5w1s", "5w1s-seed1"]  # no leftovers
    readme = (root / "README.md").read_text()
    assert readme == results_table.with_table(README, results_table.table())
    assert "| 5w1s-seed1 |" in readme and "| 5w1s, 2 seeds |" in readme and "old table" not in readme
    assert run_main(["--check"], capsys)[0] == 0


def test_publish_as_another_name_and_without_weights(root, tmp_path, capsys):
    run_dir = write_run(tmp_path / "runs" / "5w1s", summary(), files=("log.csv", "curves.png"))
    code, _, err = run_main(["--publish", str(run_dir), "--as", "5w1s-gpu", "--without-weights"], capsys)
    assert (code, err) == (0, "")
    assert sorted(path.name for path in (root / "results" / "5w1s-gpu").iterdir()) == \
        ["curves.png", "log.csv", "summary.json"]


def test_publish_replaces_an_unfinished_run_and_says_to_drop_its_carried_checkpoint(root, tmp_path, capsys):
    write_run(root / "results" / "5w1s", summary(status="in progress"), files=("log.csv", "curves.png", "x"))
    (root / "in-progress" / "5w1s").mkdir(parents=True)
    run_dir = write_run(tmp_path / "runs" / "5w1s", summary())
    code, out, _ = run_main(["--publish", str(run_dir)], capsys)
    assert code == 0 and "git rm -r in-progress/5w1s" in out
    assert snapshot(root / "results") == {f"5w1s/{name}": data for name, data in snapshot(run_dir).items()}


REFUSALS = {  # case: (what to do to the run folder or the results, what the line must say)
    "no summary.json": ("summary.json", "has no summary.json"),
    "in progress": ("in progress", "says the run is in progress (iteration 1,000 of 60,000)"),
    "no weights": ("model.pt", "has no model.pt, the trained weights that a published run ships"),
    "no curves": ("curves.png", "lacks curves.png"),
    "finished destination": ("finished destination", "already holds a finished run; choose another name with --as"),
    "foreign destination": ("foreign destination", "already holds no summary.json; choose another name with --as"),
    "bad name": ("bad name", "--as '../x' is not a folder name for results/"),
    "weights with a flipped byte": ("flipped weights", "model.pt is corrupt or truncated"),
    "a log of random bytes": ("random log", "log.csv is not a log.csv of maml_omniglot.py"),
    "a log with a short row": ("short row", "log.csv is not a log.csv of maml_omniglot.py (row 3 has fewer fields"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_publish_refuses_in_one_line_with_exit_2_and_changes_nothing(case, root, tmp_path, capsys):
    damage, message = REFUSALS[case]
    status = "in progress" if damage == "in progress" else "finished"
    run_dir = write_run(tmp_path / "runs" / "5w1s", summary(status=status))
    if damage in ("summary.json", "model.pt", "curves.png"):
        (run_dir / damage).unlink()
    if damage == "flipped weights":
        flip_a_byte(run_dir / "model.pt")
    if damage == "random log":
        (run_dir / "log.csv").write_bytes(random.Random(0).randbytes(3000))
    if damage == "short row":
        lines = (run_dir / "log.csv").read_text().splitlines(keepends=True)
        lines[3] = lines[3][:20] + "\n"
        (run_dir / "log.csv").write_text("".join(lines))
    if damage == "finished destination":
        write_run(root / "results" / "5w1s", summary(acc=0.5))
    if damage == "foreign destination":
        (root / "results" / "5w1s").mkdir()
        (root / "results" / "5w1s" / "notes.txt").write_text("mine")
    before = snapshot(root)
    argv = ["--publish", str(run_dir)] + (["--as", "../x"] if damage == "bad name" else [])
    code, out, err = run_main(argv, capsys)
    assert (code, out, err.count("\n")) == (2, "", 1)
    assert err.startswith("error: ") and message in err
    assert snapshot(root) == before
    left = ["5w1s"] if "destination" in case else []
    assert [path.name for path in (root / "results").iterdir()] == left  # no temporary folder either


def test_a_failed_copy_leaves_results_and_the_readme_as_they_were(root, tmp_path, capsys, monkeypatch):
    write_run(root / "results" / "5w1s", summary(status="in progress"))
    run_dir = write_run(tmp_path / "runs" / "5w1s", summary())
    copied = []

    def copy_then_fail(source, target):
        if len(copied) == 2:
            raise OSError(28, "No space left on device")
        copied.append(target)
        target.write_bytes(source.read_bytes())

    monkeypatch.setattr(results_table.shutil, "copyfile", copy_then_fail)
    before = snapshot(root)
    code, _, err = run_main(["--publish", str(run_dir)], capsys)
    assert code == 2 and err.count("\n") == 1 and "No space left on device; results/ is as it was" in err
    assert len(copied) == 2 and snapshot(root) == before


def test_a_failed_rename_puts_the_unfinished_run_back(root, tmp_path, capsys, monkeypatch):
    write_run(root / "results" / "5w1s", summary(status="in progress"))
    run_dir = write_run(tmp_path / "runs" / "5w1s", summary())
    rename = results_table.os.rename

    def fail_into_place(source, target):
        if target.name == "5w1s" and source.name.endswith(".tmp") and ".old." not in source.name:
            raise OSError(5, "Input/output error")
        rename(source, target)

    monkeypatch.setattr(results_table.os, "rename", fail_into_place)
    before = snapshot(root)
    code, _, err = run_main(["--publish", str(run_dir)], capsys)
    assert code == 2 and "Input/output error" in err
    assert snapshot(root) == before


def test_a_readme_that_cannot_be_written_takes_the_published_run_back_out(root, tmp_path, capsys, monkeypatch):
    write_run(root / "results" / "5w1s", summary(status="in progress"))
    run_dir = write_run(tmp_path / "runs" / "5w1s", summary())

    def full_disk(path, data):
        raise run_files.RunFileError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(results_table, "atomic_write", full_disk)
    before = snapshot(root)
    for argv in (["--publish", str(run_dir)], []):
        code, _, err = run_main(argv, capsys)
        assert code == 2 and err.count("\n") == 1 and "README.md: No space left on device" in err
        assert snapshot(root) == before
    assert sorted(path.name for path in (root / "results").iterdir()) == ["5w1s"]


def drop(key):
    """A change to a summary dict that deletes the dotted key."""
    def change(record):
        *parents, last = key.split(".")
        for part in parents:
            record = record[part]
        del record[last]
    return change


MALFORMED = {  # case: (summary.json's text or a change to summary(), what the line must say)
    "not JSON": ('{"status": "finished",', "is not valid JSON (Expecting"),
    "not UTF-8": (b'{"status": "\xff"}', "is not valid JSON ("),
    "a list": ("[1, 2]", "holds a JSON list, not an object"),
    "older schema": (drop("status"), 'lacks "status", which must be "finished" or "in progress"'),
    "unknown status": (lambda s: s.update(status="done"), "has \"status\" 'done', which must be"),
    "no segments": (drop("segments"), 'lacks "segments", which the results table needs'),
    "no test accuracies": (drop("test.accs"), 'lacks "test.accs"'),
    "empty test accuracies": (lambda s: s["test"].update(accs=[]), '"test.accs" is [], not a non-empty list'),
    "test is null": (lambda s: s.update(test=None), 'lacks "test.accs"'),
    "no seed": (drop("config.seed"), 'lacks "config.seed"'),
    "no wall time": (drop("wall_time_s"), 'lacks "wall_time_s"'),
    "segment without device": (lambda s: s["segments"][0].pop("device"), 'lacks "segments[0].device",'),
    "segment without threads": (lambda s: s["segments"][0]["device"].pop("cpu_threads"),
                                'lacks "segments[0].device.cpu_threads"'),
    "segment device not an object": (lambda s: s["segments"][0].update(device="cpu"),
                                     "\"segments[0].device\" is 'cpu', not an object"),
    "processes not a number": (lambda s: s["segments"][0]["device"].update(processes="2"),
                               "\"segments[0].device.processes\" is '2', not a number"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_summary_is_one_line_naming_the_file_and_exit_2(case, root, capsys):
    content, message = MALFORMED[case]
    write_run(root / "results" / "5w1s", summary())
    path = root / "results" / "5w1s-bad" / "summary.json"
    write_run(path.parent, summary())
    if callable(content):
        bad = summary()
        content(bad)
        path.write_text(json.dumps(bad))
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = snapshot(root)
    for argv in ([], ["--check"]):
        code, out, err = run_main(argv, capsys)
        assert (code, out, err.count("\n")) == (2, "", 1)
        assert err.startswith("error: results/5w1s-bad/summary.json") and message in err
        assert "regenerate it with today's maml_omniglot.py" in err
    assert snapshot(root) == before


def test_a_malformed_summary_to_publish_is_refused_the_same_way(root, tmp_path, capsys):
    bad = summary()
    del bad["segments"]
    run_dir = write_run(tmp_path / "runs" / "5w1s", bad)
    code, _, err = run_main(["--publish", str(run_dir)], capsys)
    assert code == 2 and err.count("\n") == 1 and 'summary.json lacks "segments"' in err
    assert not (root / "results" / "5w1s").exists()


@pytest.mark.parametrize("readme, message", [
    ("# no markers\n", "README.md has no results-table markers: put the line"),
    (f"{results_table.END}\n{results_table.BEGIN}\n", "README.md has no results-table markers"),
    (None, "cannot read README.md: No such file or directory"),
    (b"\xff\xfe not UTF-8", "cannot read README.md: 'utf-8' codec can't decode"),
])
def test_a_readme_without_markers_or_unreadable_is_one_line_and_exit_2(readme, message, root, tmp_path, capsys):
    if readme is None:
        (root / "README.md").unlink()
    else:
        (root / "README.md").write_bytes(readme if isinstance(readme, bytes) else readme.encode())
    run_dir = write_run(tmp_path / "runs" / "5w1s", summary())
    before = snapshot(root)
    for argv in ([], ["--check"], ["--publish", str(run_dir)]):
        code, out, err = run_main(argv, capsys)
        assert (code, out, err.count("\n")) == (2, "", 1)
        assert message in err
        assert snapshot(root) == before


def test_check_exits_1_on_a_stale_table_and_0_once_rewritten_saying_what_it_checked(root, capsys):
    write_run(root / "results" / "5w1s", summary(status="in progress"))
    write_run(root / "results" / "5w1s-seed1", summary(seed=1))
    code, _, err = run_main(["--check"], capsys)
    assert code == 1 and "README.md's results table is out of date" in err
    assert run_main([], capsys)[0] == 0
    assert run_main(["--check"], capsys) == (
        0, "README.md's results table is up to date with results/*/summary.json (5w1s, 5w1s-seed1)\n", "")
    assert sorted(path.name for path in root.iterdir()) == ["README.md", "results"]  # no temporary file left


def test_an_unfinished_run_without_a_validation_yet_says_so():
    run = summary(status="in progress")
    run["last_validation"] = None
    assert results_table.describe(run)[:2] == ("in progress: no validation yet", "1,000 of 60,000")


def test_a_run_resumed_under_torchrun_names_its_processes():
    run = summary()
    two = dict(run["segments"][0], device=dict(run["device"], cpu_threads=1, processes=2, backend="gloo"))
    run["segments"].append(two)  # the first segment, written before torchrun was supported, has no "processes"
    assert results_table.describe(run)[3] == "AMD EPYC, 2 threads; AMD EPYC, 1 thread x 2 processes"


def test_a_publish_killed_midway_leaves_a_hidden_folder_that_is_no_run(root):
    write_run(root / "results" / ".5w1s.4242.tmp", summary())  # what a kill -9 during the copy leaves behind
    (root / "results" / ".5w1s.4242.tmp" / "summary.json").write_text('{"status": "fin')  # cut off mid-copy
    table = results_table.table()
    assert "| 5w1s | 98.7 ± 0.4 % | not run yet |" in table and ".5w1s" not in table


@pytest.mark.parametrize("argv, message", [
    (["--as", "x"], "--as and --without-weights go with --publish RUN_DIR"),
    (["--without-weights"], "--as and --without-weights go with --publish RUN_DIR"),
    (["--check", "--publish", "runs/5w1s"], "argument --publish: not allowed with argument --check"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--publish"], "argument --publish: expected one argument"),
    (["--compare", "runs/5w1s"], "--compare RUN_DIR needs --against NAME_OR_DIR, and --against and --figure go"),
    (["--against", "5w1s"], "--compare RUN_DIR needs --against NAME_OR_DIR"),
    (["--figure", "x.png"], "--compare RUN_DIR needs --against NAME_OR_DIR"),
    (["--compare", "runs/5w1s", "--against", "5w1s", "--check"], "argument --check: not allowed with argument"),
])
def test_a_bad_flag_is_one_line_and_exit_2(argv, message, root, capsys):
    code, out, err = run_main(argv, capsys)
    assert (code, out, err.count("\n")) == (2, "", 1)
    assert err.startswith(f"results_table.py: error: {message}")


def test_the_regression_rule_bounds_every_point_and_the_mean():
    expected = {0: 0.0, 50: 0.0, 100: 0.0, 150: 0.0}  # from 0, each difference is exactly the measured value
    tolerance, mean_tolerance = results_table.TOLERANCE, results_table.MEAN_TOLERANCE
    assert results_table.regression_verdict(expected | {50: tolerance}, expected)[0]  # the bound itself holds
    assert not results_table.regression_verdict(expected | {50: tolerance + 0.001}, expected)[0]
    passed, line = results_table.regression_verdict({i: mean_tolerance + 0.001 for i in expected}, expected)
    assert not passed  # every point within the tolerance, their mean beyond its own
    assert line.startswith("largest difference 4.1 points at iteration ")
    assert line.endswith(" (tolerance 8), mean 4.1 (tolerance 4) over 4 validation points")
    passed, line = results_table.regression_verdict({0: 0.5, 500: 0.9}, {0: 0.5})  # only common points count
    assert passed and line == "largest difference 0.0 points at iteration 0 (tolerance 8), mean 0.0 (tolerance 4) " \
                              "over 1 validation point"


def write_log(folder, change=lambda row: None, keep=lambda row: True):
    """folder/log.csv: the reference run's log with change(row) applied to each row it keeps."""
    with open(REFERENCE / "log.csv", newline="") as source:
        reader = csv.DictReader(source)
        rows = [row for row in reader if keep(row)]
    for row in rows:
        change(row)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "log.csv", "w", newline="") as target:
        writer = csv.DictWriter(target, fieldnames=reader.fieldnames, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return folder


@pytest.fixture
def published(root):
    """results/5w1s-cpu-reference in the test's repository: the committed reference's log."""
    return write_log(root / "results" / "5w1s-cpu-reference")


def test_compare_passes_a_run_identical_to_the_published_one(root, published, tmp_path, capsys):
    run_dir = write_log(tmp_path / "runs" / "again")
    code, out, err = run_main(["--compare", str(run_dir), "--against", "5w1s-cpu-reference"], capsys)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert len(lines) == 2 + 11 * 4 + 2  # two header lines, one per validation point and step, figure, verdict
    assert lines[2].split() == ["0", "0", "23.1", "23.1", "+0.0", "±", f"{math.hypot(2.0284, 2.0284):.1f}"]
    assert lines[-1] == (f"pass: {run_dir} against results/5w1s-cpu-reference (published), validation after 3 "
                         "inner steps: largest difference 0.0 points at iteration 0 (tolerance 8), mean 0.0 "
                         "(tolerance 4) over 11 validation points")
    figure = root / "runs" / "compare-again-vs-5w1s-cpu-reference.png"
    assert lines[-2] == "figure: runs/compare-again-vs-5w1s-cpu-reference.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(path.name for path in run_dir.iterdir()) == ["log.csv"]  # nothing written into the run


def test_compare_fails_a_clearly_worse_run_with_exit_1(root, published, tmp_path, capsys):
    def worse(row):
        if row["split"] == "val" and row["iteration"] != "0":
            row["acc_step3"] = str(float(row["acc_step3"]) - 0.1)

    run_dir = write_log(tmp_path / "runs" / "worse", worse)
    figure = tmp_path / "worse.png"
    code, out, err = run_main(["--compare", str(run_dir), "--against", str(published), "--figure", str(figure)],
                              capsys)
    assert (code, err) == (1, "")
    assert out.splitlines()[-1].startswith(f"FAIL: {run_dir} against results/5w1s-cpu-reference (published), "
                                           "validation after 3 inner steps: largest difference 10.0 points")
    assert "      500  3   74.4      84.4  -10.0 ± 2.7" in out.splitlines()  # √2 · 1.93
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_takes_an_unfinished_run_on_the_points_it_has(published, tmp_path, capsys):
    run_dir = write_log(tmp_path / "runs" / "unfinished", keep=lambda row: int(row["iteration"]) <= 200)
    code, out, _ = run_main(["--compare", str(run_dir), "--against", "5w1s-cpu-reference"], capsys)
    assert code == 0 and out.splitlines()[-1].endswith("over 5 validation points of the published 11")


COMPARE_REFUSALS = {  # case: (the run's folder given a log by write_log's arguments or None, --against, message)
    "no such run folder": (None, "5w1s-cpu-reference", "--compare {run}: no such folder"),
    "no such published run": ({}, "5w1s-gpu", "--against 5w1s-gpu: neither results/5w1s-gpu nor 5w1s-gpu is a folder"),
    "a garbage log": ("garbage", "5w1s-cpu-reference", "{run}/log.csv is not a log.csv of maml_omniglot.py ("),
    "no log": ("no log", "5w1s-cpu-reference", "cannot read {run}/log.csv: No such file or directory"),
    "no validation yet": ({"keep": lambda row: row["split"] == "train"}, "5w1s-cpu-reference",
                          "{run}/log.csv has no validation row yet"),
    "no common point": ({"change": lambda row: row.update(iteration=str(int(row["iteration"]) + 1))},
                        "5w1s-cpu-reference", "have no validation point in common: one validates at iterations "
                                              "[1, 51, 101, 151, 201, 251, ...], the other at [0, 50, 100,"),
    "another setting": ({"change": lambda row: row.update(acc_step3="")}, "5w1s-cpu-reference",
                        "validates after up to 2 inner steps, results/5w1s-cpu-reference after 3"),
}


@pytest.mark.parametrize("case", COMPARE_REFUSALS)
def test_compare_refuses_bad_input_in_one_line_with_exit_2_writing_nothing(case, root, published, tmp_path, capsys):
    log, against, message = COMPARE_REFUSALS[case]
    run_dir = tmp_path / "runs" / "x"
    if isinstance(log, dict):
        write_log(run_dir, **log)
    elif log == "garbage":
        run_dir.mkdir(parents=True)
        (run_dir / "log.csv").write_bytes(random.Random(0).randbytes(3000))
    elif log == "no log":
        run_dir.mkdir(parents=True)
    before = snapshot(root)
    code, out, err = run_main(["--compare", str(run_dir), "--against", against], capsys)
    assert (code, out, err.count("\n")) == (2, "", 1)
    assert err.startswith("error: ") and message.format(run=run_dir) in err
    assert snapshot(root) == before


def write_evaluation(root, run, name, acc, split="test", **changes):
    """results/RUN/evaluations/NAME/evaluation.json as --evaluate writes it: the run's config with changes."""
    cfg = dict(json.loads((root / "results" / run / "summary.json").read_text())["config"], **changes)
    folder = root / "results" / run / "evaluations" / name
    folder.mkdir(parents=True)
    evaluation = {"accs": [0.2] * cfg["update_step_test"] + [acc], "ci95": [0.01] * cfg["update_step_test"] + [0.002],
                  "tasks": cfg["test_tasks"], "split": split, "model": f"results/{run}/model.pt", "config": cfg}
    (folder / "evaluation.json").write_text(json.dumps(evaluation))


def test_the_evaluations_of_published_weights_get_a_table_saying_what_each_changed(root, capsys):
    write_run(root / "results" / "5w1s-seed1", summary(seed=1))
    write_run(root / "results" / "20w1s", summary("20w1s", n_way=20, task_num=16, update_step=5, update_step_test=5))
    write_evaluation(root, "5w1s-seed1", "5-shot", 0.995, k_spt=5)
    write_evaluation(root, "5w1s-seed1", "10-steps", 0.991, update_step_test=10)
    write_evaluation(root, "20w1s", "5-shot", 0.981, k_spt=5)
    write_evaluation(root, "20w1s", "val-15-queries", 0.95, split="val", k_qry=15, test_tasks=320)
    results_table.main([])
    readme = (root / "README.md").read_text()
    table = readme.split(results_table.BEGIN)[1].split(results_table.END)[0]
    lines = [line for line in table.splitlines() if line.startswith(("| 5w1s-seed1 | ", "| 20w1s | "))]
    evaluations = lines[-4:]  # after the results table's own rows of these runs
    assert evaluations == [
        "| 20w1s | 5-shot | 20-way 5-shot, 1 query drawing per class, 5 inner steps, 600 test tasks | K = 5 "
        "(the run: 1) | 98.1 ± 0.2 % | 98.9 ± 0.2 % (a model trained 20w5s) |",
        "| 20w1s | val-15-queries | 20-way 1-shot, 15 query drawings per class, 5 inner steps, 320 val tasks | Q = 15 "
        "(the run: 1); the val classes | 95.0 ± 0.2 % |  |",
        "| 5w1s-seed1 | 10-steps | 5-way 1-shot, 1 query drawing per class, 10 inner steps, 600 test tasks | inner "
        "steps 10 (the run: 3) | 99.1 ± 0.2 % | 98.7 ± 0.4 % (a model trained 5w1s) |",
        "| 5w1s-seed1 | 5-shot | 5-way 5-shot, 1 query drawing per class, 3 inner steps, 600 test tasks | K = 5 (the "
        "run: 1) | 99.5 ± 0.2 % | 99.9 ± 0.1 % (a model trained 5w5s) |"]
    results_table.main(["--check"])
    assert "up to date" in capsys.readouterr().out


def test_without_evaluations_there_is_no_evaluations_table(root):
    write_run(root / "results" / "5w1s", summary())
    results_table.main([])
    assert "Evaluations of the published weights" not in (root / "README.md").read_text()


def test_a_malformed_evaluation_is_one_line_naming_the_file_and_exit_2(root, capsys):
    write_run(root / "results" / "5w1s", summary())
    write_evaluation(root, "5w1s", "5-shot", 0.99, k_spt=5)
    path = root / "results" / "5w1s" / "evaluations" / "5-shot" / "evaluation.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "accs"}))
    with pytest.raises(SystemExit) as exit:
        results_table.main([])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1
    assert 'results/5w1s/evaluations/5-shot/evaluation.json lacks "accs"' in err
