"""An unfinished paper run in results/ can be continued from the repository alone.

While results/<setting>/summary.json says "in progress", the run's checkpoint is committed as
in-progress/<setting>/checkpoint.pt (see in-progress/README.md). It must be the checkpoint that the
committed summary.json and log.csv describe: same iteration, same log rows, same segments, and one
that maml_omniglot.py accepts for --resume with the run's configuration. A finished run leaves no
checkpoint behind.
"""

import json
from pathlib import Path

import run_files
from run_files import RunState

ROOT = Path(__file__).resolve().parents[1]


def summaries():
    """{run folder name: summary} for every results/*/summary.json."""
    paths = sorted((ROOT / "results").glob("*/summary.json"))
    return {path.parent.name: json.loads(path.read_text()) for path in paths}


def carried_checkpoint(name):
    return ROOT / "in-progress" / name / "checkpoint.pt"


def test_every_unfinished_run_is_continued_by_its_committed_checkpoint(tmp_path):
    for name, summary in summaries().items():
        if summary["status"] != "in progress":
            continue
        path = carried_checkpoint(name)
        assert path.is_file(), f"results/{name} is in progress but {path.relative_to(ROOT)} is not committed"
        checkpoint = run_files.read_checkpoint(str(path))
        state = RunState(**checkpoint["run"])
        # A summary written before a config key existed lacks it; the checkpoint's reader adds it (ADDED_CONFIG).
        assert checkpoint["config"] == dict(run_files.ADDED_CONFIG, **summary["config"])
        assert state.iteration == summary["iteration"]
        assert state.segments == summary["segments"]
        # The log inside the checkpoint, written the way the run writes log.csv, is the committed log.csv: the
        # same bytes, or, for a log written before a column existed, the same rows with that column empty.
        rewritten = tmp_path / f"{name}.csv"
        run_files.write_log(str(rewritten), state.log, checkpoint["config"])
        committed = ROOT / "results" / name / "log.csv"
        if rewritten.read_bytes() != committed.read_bytes():
            columns = run_files.log_columns(checkpoint["config"])
            assert [dict(dict.fromkeys(columns, ""), **row) for row in run_files.read_log(str(committed))] \
                == run_files.read_log(str(rewritten))


def test_no_checkpoint_is_carried_for_a_finished_or_missing_run():
    runs = summaries()
    for path in sorted((ROOT / "in-progress").glob("*/checkpoint.pt")):
        name = path.parent.name
        assert name in runs, f"{path.relative_to(ROOT)} has no results/{name}/summary.json"
        assert runs[name].get("status") == "in progress", \
            f"results/{name} has finished: delete {path.relative_to(ROOT)}"
