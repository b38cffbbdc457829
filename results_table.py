"""Write the README's results table from results/*/summary.json (and the table of the published weights'
evaluations from results/*/evaluations/*/evaluation.json), publish finished runs into results/, and
compare a run with a published one.

    python results_table.py                    # rewrite the table between the markers in README.md
    python results_table.py --check            # exit 1 if README.md's table is not what results/ says, else one line
    python results_table.py --publish RUN_DIR [--as NAME] [--without-weights]
                                               # copy the finished run in RUN_DIR to results/NAME/, rewrite the table
    python results_table.py --compare RUN_DIR --against NAME_OR_DIR [--figure PATH]
                                               # the run's validation against a published run's: exit 1 if it fails

Our numbers come only from summary.json files that maml_omniglot.py wrote; a paper setting with no
run in results/<setting>/ says so. Runs in other folders (more seeds, short reference runs) get rows of
their own under their setting's row. Where two or more finished runs of a setting differ only in their
seed (their configs agree on everything but NOT_HYPERPARAMETERS), a row "<setting>, N seeds" follows
them: the mean ± the sample standard deviation (ddof=1) over the seeds of the test accuracy after
update_step_test steps; each run's own row keeps its 95% interval over test tasks. Runs still in
progress do not count, and of two runs with the same seed only the first in the table does.

--publish copies summary.json, log.csv, curves.png and model.pt (the trained weights) of a run whose
summary.json says "finished" into results/NAME/ (NAME: RUN_DIR's folder name unless --as gives one),
then rewrites the table. A run without model.pt is refused unless --without-weights says to publish it
without. So is a destination that holds anything but an unfinished run, which the finished one replaces,
and a log.csv or model.pt that does not read back as --plot-only and --evaluate read them (a malformed
row, a digest that does not match). The files go into a hidden folder beside the destination and are
renamed into place, so a failure leaves results/ as it was.

--compare, the regression check for any run, finished or not: per validation point and number of inner
steps, both accuracies, their difference and its 95% interval, then a one-line verdict by the regression
rule (regression_verdict, which tests/test_regression.py applies too), and an overlay figure of both
validation curves (compare's docstring says more).

Exit codes: 0 done (--compare: the run passes); 1 --check found the table out of date, or --compare's run
fails the rule; 2 bad input (a bad flag, a summary.json that is not JSON or lacks a key the table needs, a
README.md without the markers, a log.csv that cannot be read) or a refused --publish, told in one line on
stderr that names the file or value and the fix, with nothing written.
"""

import csv
import json
import math
import os
import reprlib
import shutil
import statistics
import sys
from pathlib import Path

from curves import comparison_png, parse_log
from run_files import EVALUATION_FILE, FILES, NOT_LEARNED, Parser, RunFileError, atomic_write, read_log, read_model

ROOT = Path(__file__).resolve().parent  # the repository: README.md and results/ (tests point it elsewhere)
BEGIN, END = "<!-- results table: begin (python results_table.py) -->", "<!-- results table: end -->"
PAPER = {  # Finn et al. 2017, Table 1, Omniglot, MAML (second order)
    "5w1s": "98.7 ± 0.4 %",
    "5w5s": "99.9 ± 0.1 %",
    "20w1s": "95.8 ± 0.3 %",
    "20w5s": "98.9 ± 0.2 %",
}
PAPER_ITERATIONS = 60_000
NOT_HYPERPARAMETERS = ("seed",) + NOT_LEARNED  # runs that differ in these alone are seeds of one setting
PUBLISHED_FILES = tuple(FILES[key] for key in ("summary", "log", "curves", "model"))  # all but the checkpoint
REGENERATE = "regenerate it with today's maml_omniglot.py (rerun its command)"
# The regression rule (regression_verdict): the largest difference allowed at any validation point, and over the
# whole curve on average, as fractions.
TOLERANCE = 0.08
MEAN_TOLERANCE = 0.04


class BadInput(Exception):
    """A file or value this script cannot use; the message names it and the fix (exit code 2)."""


def shown(path):
    """path relative to ROOT where it is inside it (results/5w1s/summary.json), else as given."""
    try:
        return Path(path).resolve().relative_to(ROOT.resolve())
    except ValueError:
        return path


def why(error):
    """The one-line reason of an OSError or a decoding error."""
    return getattr(error, "strerror", None) or str(error)


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What the table reads from a summary.json: dotted key -> (what it must be, test).
NUMBER = ("a number", is_number)
NUMBERS = ("a non-empty list of numbers", lambda v: isinstance(v, list) and v != [] and all(map(is_number, v)))
TEXT = ("a string", lambda v: isinstance(v, str))
OPTIONAL_TEXT = ("a string or null", lambda v: v is None or isinstance(v, str))
OBJECTS = ("a non-empty list of objects", lambda v: isinstance(v, list) and v != [] and
           all(isinstance(x, dict) for x in v))
OBJECT = ("an object", lambda v: isinstance(v, dict))
OPTIONAL_OBJECT = ("an object or null", lambda v: v is None or isinstance(v, dict))
SUMMARY_KEYS = {"iteration": NUMBER, "config.setting": TEXT, "config.seed": NUMBER, "config.iterations": NUMBER,
                "segments": OBJECTS, "wall_time_s": NUMBER}
FINISHED_KEYS = {"test.accs": NUMBERS, "test.ci95": NUMBERS, "test.tasks": NUMBER}
IN_PROGRESS_KEYS = {"last_validation": OPTIONAL_OBJECT}
VALIDATION_KEYS = {"last_validation.iteration": NUMBER, "last_validation.accs": NUMBERS,
                   "last_validation.ci95": NUMBERS}
EVALUATION_KEYS = {"accs": NUMBERS, "ci95": NUMBERS, "tasks": NUMBER, "split": TEXT, "config.n_way": NUMBER,
                   "config.k_spt": NUMBER, "config.k_qry": NUMBER, "config.update_step_test": NUMBER,
                   "config.seed": NUMBER}
# What an evaluation may change from the run's own test (maml_omniglot.py --evaluate), in words.
PROTOCOL_KEYS = (("k_spt", "K ="), ("k_qry", "Q ="), ("update_step_test", "inner steps"), ("seed", "seed"))
SEGMENT_KEYS = {"device": OBJECT, "device.type": TEXT, "device.name": TEXT, "git.commit": OPTIONAL_TEXT}


def require(record, keys, path, prefix=""):
    """Raise BadInput naming path and the first of keys ({dotted key: kind}) that record lacks or holds a value
    of another kind in; prefix is prepended to the key in the message (segments[0].)."""
    for dotted, (kind, test) in keys.items():
        value = record
        for part in dotted.split("."):
            if not isinstance(value, dict) or part not in value:
                raise BadInput(f'{shown(path)} lacks "{prefix}{dotted}", which the results table needs: {REGENERATE}')
            value = value[part]
        if not test(value):
            raise BadInput(f'{shown(path)}: "{prefix}{dotted}" is {reprlib.repr(value)}, not {kind}: {REGENERATE}')


def load_summary(path):
    """The summary.json at path, checked to hold everything describe() and table() read; BadInput if not."""
    try:
        summary = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise BadInput(f"cannot read {shown(path)}: {why(error)}") from None
    except ValueError as error:
        raise BadInput(f"{shown(path)} is not valid JSON ({error}): {REGENERATE}") from None
    if not isinstance(summary, dict):
        raise BadInput(f"{shown(path)} holds a JSON {type(summary).__name__}, not an object: {REGENERATE}")
    status = summary.get("status")
    if status not in ("finished", "in progress"):
        what = "lacks \"status\"" if "status" not in summary else f'has "status" {reprlib.repr(status)}'
        raise BadInput(f'{shown(path)} {what}, which must be "finished" or "in progress": {REGENERATE}')
    require(summary, SUMMARY_KEYS | (FINISHED_KEYS if status == "finished" else IN_PROGRESS_KEYS), path)
    if status == "in progress" and summary["last_validation"] is not None:
        require(summary, VALIDATION_KEYS, path)
    for number, segment in enumerate(summary["segments"]):
        require(segment, SEGMENT_KEYS, path, prefix=f"segments[{number}].")
        device_keys = {"device.cpu_threads": NUMBER} if segment["device"]["type"] == "cpu" else {}
        if "processes" in segment["device"]:  # torchrun's (distributed.py); older segments lack it: one process
            device_keys["device.processes"] = NUMBER
        require(segment, device_keys, path, prefix=f"segments[{number}].")
    return summary


def load_runs():
    """{folder name: summary} for every results/*/summary.json, each checked by load_summary. Hidden folders
    (a --publish in the middle of its copy) are not runs."""
    paths = sorted((ROOT / "results").glob(f"*/{FILES['summary']}"))
    return {path.parent.name: load_summary(path) for path in paths if not path.parent.name.startswith(".")}


def unique(values):
    return list(dict.fromkeys(values))


def describe(summary):
    """Ours (accuracy after update_step_test steps, with its 95% interval), iterations, wall time, device, commit.

    A run still in progress shows its last validation instead (if it has had one), and how far it has got.
    A run resumed on other devices or at other commits lists each one (summary.json's "segments").
    """
    cfg = summary["config"]
    if summary["status"] == "finished":
        test = summary["test"]
        ours = f"{100 * test['accs'][-1]:.1f} ± {100 * test['ci95'][-1]:.1f} % ({test['tasks']} tasks)"
        iterations = f"{cfg['iterations']:,}"
    else:
        val = summary["last_validation"]
        ours = "in progress: no validation yet" if val is None else (
            f"in progress: validation {100 * val['accs'][-1]:.1f} ± {100 * val['ci95'][-1]:.1f} % "
            f"at iteration {val['iteration']:,}")
        iterations = f"{summary['iteration']:,} of {cfg['iterations']:,}"
    devices = []
    for segment in summary["segments"]:
        device = segment["device"]["name"]
        if segment["device"]["type"] == "cpu":
            threads = segment["device"]["cpu_threads"]
            device += f", {threads} thread{'s' * (threads != 1)}"
        processes = segment["device"].get("processes", 1)
        if processes > 1:
            device += f" x {processes} processes"
        devices.append(device)
    commits = [(segment["git"]["commit"] or "unknown")[:10] for segment in summary["segments"]]
    return (ours, iterations, f"{summary['wall_time_s'] / 3600:.2f} h", "; ".join(unique(devices)),
            ", ".join(unique(commits)))


def paper_cell(setting, iterations):
    """The paper's number for setting, saying that it was reached at 60,000 iterations where ours ran fewer or more."""
    paper = PAPER.get(setting, "")
    return f"{paper} (at {PAPER_ITERATIONS:,} iterations)" if paper and iterations != PAPER_ITERATIONS else paper


def seed_groups(runs):
    """The finished runs among runs ([summary], in table order) that are seeds of one setting: grouped by their
    config without NOT_HYPERPARAMETERS, the first run of each seed, only groups of two seeds or more."""
    groups = {}
    for summary in runs:
        if summary["status"] == "finished":
            cfg = summary["config"]
            key = json.dumps({k: v for k, v in cfg.items() if k not in NOT_HYPERPARAMETERS}, sort_keys=True)
            groups.setdefault(key, {}).setdefault(cfg["seed"], summary)
    return [list(by_seed.values()) for by_seed in groups.values() if len(by_seed) > 1]


def seeds_row(setting, seeds):
    """The row "<setting>, N seeds": mean ± sample std (ddof=1) over the seeds of the test accuracy after
    update_step_test steps, the iterations they share, and their wall time added up."""
    accs = [100 * summary["test"]["accs"][-1] for summary in seeds]
    numbers = ", ".join(str(seed) for seed in sorted(summary["config"]["seed"] for summary in seeds))
    ours = f"{statistics.mean(accs):.1f} ± {statistics.stdev(accs):.1f} % (mean ± sample std, seeds {numbers})"
    iterations = seeds[0]["config"]["iterations"]
    wall_time = f"{sum(summary['wall_time_s'] for summary in seeds) / 3600:.2f} h in all"
    return f"| {setting}, {len(seeds)} seeds | {paper_cell(setting, iterations)} | {ours} | {iterations:,} | " \
           f"{wall_time} |  |  |"


def table(runs=None):
    """The markdown table of runs ({folder name: summary}; by default load_runs()), one block per setting.

    A paper setting's block starts with results/<setting>/ (or "not run yet"); then come, sorted by folder
    name, the other folders whose config has that setting, then a seeds row per group of seeds.
    """
    runs = load_runs() if runs is None else runs
    others = {name: summary for name, summary in runs.items() if name not in PAPER}
    settings = list(PAPER) + sorted({summary["config"]["setting"] for summary in others.values()} - set(PAPER))
    lines = ["| setting | MAML paper | ours | meta-iterations | wall time | device | commit |",
             "|---|---|---|---|---|---|---|"]
    for setting in settings:
        block = [(name, summary) for name, summary in sorted(others.items())
                 if summary["config"]["setting"] == setting]
        if setting in PAPER and setting in runs:
            block.insert(0, (setting, runs[setting]))
        elif setting in PAPER:
            lines.append(f"| {setting} | {PAPER[setting]} | not run yet |  |  |  |  |")
        for name, summary in block:
            paper = paper_cell(summary["config"]["setting"], summary["config"]["iterations"])
            lines.append(f"| {name} | {paper} | " + " | ".join(describe(summary)) + " |")
        lines += [seeds_row(setting, seeds) for seeds in seed_groups([summary for _, summary in block])]
    return "\n".join(lines)


def load_evaluations(runs):
    """[(run name, evaluation name, evaluation)] for every results/RUN/evaluations/NAME/evaluation.json of a
    run in runs, sorted, each checked to hold what evaluations_table reads; BadInput if not."""
    found = []
    for path in sorted((ROOT / "results").glob(f"*/evaluations/*/{EVALUATION_FILE}")):
        run, name = path.parents[2].name, path.parent.name
        if run in runs:
            try:
                evaluation = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise BadInput(f"cannot read {shown(path)}: {why(error)}") from None
            require(evaluation, EVALUATION_KEYS, path)
            found.append((run, name, evaluation))
    return found


def tasks_in_words(cfg, tasks, split):
    """The tasks of a test in words: 20-way 5-shot, 1 query drawing per class, 5 inner steps, 600 test tasks."""
    return (f"{cfg['n_way']}-way {cfg['k_spt']}-shot, {cfg['k_qry']} query drawing{'s' * (cfg['k_qry'] != 1)} per "
            f"class, {cfg['update_step_test']} inner step{'s' * (cfg['update_step_test'] != 1)}, {tasks:,} {split} "
            f"tasks")


def evaluations_table(runs, evaluations):
    """The markdown table of the published models' evaluations by --evaluate (load_evaluations), or "" when
    there are none. Each row says what its test tasks were and what differs from the run's own test, and
    gives the paper's number only where the paper trained a model on such tasks, saying so."""
    if not evaluations:
        return ""
    lines = ["Evaluations of the published weights (`python maml_omniglot.py --evaluate results/RUN/model.pt ...`"
             ", into results/RUN/evaluations/NAME/evaluation.json): each row is its own protocol.", "",
             "| run | evaluation | tasks | differs from the run's own test | ours | MAML paper |",
             "|---|---|---|---|---|---|"]
    for run, name, evaluation in evaluations:
        trained, cfg = runs[run]["config"], evaluation["config"]
        differs = [f"{what} {cfg[key]} (the run: {trained[key]})" for key, what in PROTOCOL_KEYS
                   if cfg[key] != trained[key]]
        if evaluation["split"] != "test":
            differs.append(f"the {evaluation['split']} classes")
        ours = f"{100 * evaluation['accs'][-1]:.1f} ± {100 * evaluation['ci95'][-1]:.1f} %"
        setting = f"{cfg['n_way']}w{cfg['k_spt']}s"
        trained_so = setting in PAPER and evaluation["split"] == "test"
        paper = f"{PAPER[setting]} (a model trained {setting})" if trained_so else ""
        lines.append(f"| {run} | {name} | {tasks_in_words(cfg, evaluation['tasks'], evaluation['split'])} | "
                     f"{'; '.join(differs) or 'nothing'} | {ours} | {paper} |")
    return "\n".join(lines)


def readme_tables(runs):
    """What goes between README.md's markers: the results table, then the evaluations table if there are any."""
    evaluations = evaluations_table(runs, load_evaluations(runs))
    return table(runs) + (f"\n\n{evaluations}" if evaluations else "")


def read_readme():
    """README.md's text, checked to hold the table's markers; BadInput if it cannot be read or has none."""
    path = ROOT / "README.md"
    try:
        readme = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as error:
        raise BadInput(f"cannot read {shown(path)}: {why(error)}") from None
    if BEGIN not in readme or END not in readme.split(BEGIN, 1)[1]:
        raise BadInput(f"{shown(path)} has no results-table markers: put the line {BEGIN!r} and, below it, the line "
                       f"{END!r} where the table goes")
    return readme


def with_table(readme, text):
    """readme with text between its markers in place of what was there."""
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{text}\n{END}{tail}"


def read_run_log(folder):
    """The curves.Log of folder/log.csv, read and parsed as --plot-only does; BadInput if it cannot be read or
    is not such a log."""
    path = Path(folder) / FILES["log"]
    try:
        return parse_log(read_log(path))
    except OSError as error:
        raise BadInput(f"cannot read {shown(path)}: {why(error)}") from None
    except (csv.Error, ValueError) as error:  # a UnicodeDecodeError is a ValueError
        raise BadInput(f"{shown(path)} is not a log.csv of maml_omniglot.py ({error})") from None


def check_destination(run_dir, dest):
    """Refuse (BadInput) to publish over dest unless it is absent or holds an unfinished run."""
    if not dest.exists():
        return
    try:
        held = "a finished run" if load_summary(dest / FILES["summary"])["status"] == "finished" else None
    except BadInput:
        held = "no summary.json" if not (dest / FILES["summary"]).exists() else "a summary.json this table cannot read"
    if held:
        raise BadInput(f"refusing to publish {run_dir} as {shown(dest)}: it already holds {held}; "
                       f"choose another name with --as NAME, or remove {shown(dest)} first")


def publish(run_dir, name=None, without_weights=False):
    """Copy the finished run in run_dir to results/<name>/ (name: run_dir's folder name by default), rewrite
    README.md's table, and return results/<name>.

    Everything that can be refused (BadInput) is checked before results/ is touched. The files are copied
    into results/.<name>.<pid>.tmp, which is then renamed to results/<name> (an unfinished run there is
    first renamed aside, and deleted once the new one is in place), and README.md is rewritten atomically.
    If a copy, a rename or README.md's write fails, the new folder is taken back out and removed, and an
    unfinished run that was there is renamed back.
    """
    run_dir = Path(run_dir)
    name = name or run_dir.resolve().name
    if name in ("", ".", "..") or name.startswith(".") or "/" in name or os.sep in name:
        raise BadInput(f"--as {name!r} is not a folder name for results/: give one like 5w1s-seed1")
    if not (run_dir / FILES["summary"]).is_file():
        raise BadInput(f"{run_dir} has no summary.json: give the folder that maml_omniglot.py wrote the run to "
                       "(its --out)")
    summary = load_summary(run_dir / FILES["summary"])
    if summary["status"] != "finished":
        raise BadInput(f"{run_dir / 'summary.json'} says the run is in progress (iteration {summary['iteration']:,} "
                       f"of {summary['config']['iterations']:,}): finish it (its command with --resume), then "
                       "publish it")
    files = [file for file in PUBLISHED_FILES if not (without_weights and file == FILES["model"])]
    missing = [file for file in files if not (run_dir / file).is_file()]
    if missing == [FILES["model"]]:
        raise BadInput(f"{run_dir} has no model.pt, the trained weights that a published run ships: publish the "
                       "folder the run wrote them to, or add --without-weights to publish it without")
    if missing:
        raise BadInput(f"{run_dir} lacks {', '.join(missing)}: a finished run of maml_omniglot.py writes them "
                       f"(python maml_omniglot.py --plot-only {run_dir} redraws curves.png)")
    read_run_log(run_dir)  # as --plot-only and --evaluate would read them
    if FILES["model"] in files:
        try:
            read_model(run_dir / FILES["model"])
        except RunFileError as error:
            raise BadInput(str(error)) from None
    results = ROOT / "results"
    dest = results / name
    check_destination(run_dir, dest)
    readme = read_readme()
    runs = load_runs()
    runs[name] = summary
    text = with_table(readme, readme_tables(runs)).encode()
    tmp, old = results / f".{name}.{os.getpid()}.tmp", results / f".{name}.{os.getpid()}.old.tmp"
    try:
        tmp.mkdir(parents=True)
        for file in files:
            shutil.copyfile(run_dir / file, tmp / file)
        if dest.exists():
            os.rename(dest, old)
        os.rename(tmp, dest)
        try:
            atomic_write(ROOT / "README.md", text)
        except RunFileError:
            os.rename(dest, tmp)
            raise
    except (OSError, RunFileError) as error:
        if old.exists():
            os.rename(old, dest)
        raise BadInput(f"cannot publish {run_dir} as {shown(dest)}: {why(error)}; results/ is as it was") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def regression_verdict(measured, expected):
    """The regression rule. measured, expected: validation curves, {iteration: accuracy after update_step_test
    inner steps, as a fraction}, compared at the iterations both have (at least one). It holds when

        |measured[i] − expected[i]| ≤ TOLERANCE at every such iteration i, and their mean ≤ MEAN_TOLERANCE.

    With 320 validation tasks of 5 query drawings one point's standard error is about 1 percentage point;
    the README's "Regression check" says how the tolerances were checked. Returns (whether it holds, a line
    with the largest and the mean difference and both tolerances)."""
    differences = {i: abs(measured[i] - expected[i]) for i in sorted(measured.keys() & expected.keys())}
    worst = max(differences, key=differences.get)
    mean = sum(differences.values()) / len(differences)
    passed = differences[worst] <= TOLERANCE and mean <= MEAN_TOLERANCE
    return passed, (f"largest difference {100 * differences[worst]:.1f} points at iteration {worst:,} (tolerance "
                    f"{100 * TOLERANCE:g}), mean {100 * mean:.1f} (tolerance {100 * MEAN_TOLERANCE:g}) over "
                    f"{len(differences)} validation point{'s' * (len(differences) != 1)}")


def published_folder(name):
    """results/<name> where name is the name of a folder there, else name as a folder of its own."""
    folder = ROOT / "results" / name
    return folder if name == Path(name).name and not name.startswith(".") and folder.is_dir() else Path(name)


def validation(log, step):
    """{iteration: (accuracy %, 95% half-width %)} of a curves.Log's val rows after step inner steps."""
    iterations, accs, ci = log.val[step]
    return dict(zip(iterations, zip(accs, ci)))


def compare(run_dir, against, figure=None):
    """Compare the run in run_dir, finished or not, with the published run against (the name of a folder in
    results/, or any run's folder): print the comparison, write the overlay figure, return the verdict (bool).

    Printed: for every validation point both logs have and every number of inner steps s, both accuracies,
    their difference d = run − published, and the 95% interval of d, ± √(ci_run² + ci_published²) from the
    logs' ci95 columns (the two validations are independent samples of tasks); then, in one line, the verdict
    of regression_verdict on the curves after the last step (update_step_test). An unfinished run is compared
    on the points it has. The figure (curves.comparison_png) goes to figure, by default to
    runs/compare-<run>-vs-<published>.png: never into a run's folder. BadInput when a folder or log cannot be
    read, when the logs validate after different numbers of steps, or when they have no validation point in
    common.
    """
    run_dir, published = Path(run_dir), published_folder(against)
    if not run_dir.is_dir():
        raise BadInput(f"--compare {run_dir}: no such folder: give a run's folder (its --out)")
    if not published.is_dir():
        raise BadInput(f"--against {against}: neither results/{against} nor {against} is a folder: give the name of "
                       "a folder in results/ or a run's folder")
    names = shown(run_dir), shown(published)
    run, reference = read_run_log(run_dir), read_run_log(published)
    for name, log in zip(names, (run, reference)):
        if log.final_step() is None:
            raise BadInput(f"{name}/log.csv has no validation row yet: there is nothing to compare")
    step = reference.final_step()
    if run.final_step() != step:
        raise BadInput(f"{names[0]} validates after up to {run.final_step()} inner steps, {names[1]} after {step}: "
                       "compare runs of one setting")
    ours, theirs = validation(run, step), validation(reference, step)
    common = sorted(ours.keys() & theirs.keys())
    if not common:
        raise BadInput(f"{names[0]} and {names[1]} have no validation point in common: one validates at iterations "
                       f"{reprlib.repr(sorted(ours))}, the other at {reprlib.repr(sorted(theirs))}")
    passed, detail = regression_verdict({i: ours[i][0] / 100 for i in common}, {i: theirs[i][0] / 100 for i in common})
    if len(common) < len(theirs):
        detail += f" of the published {len(theirs)}"
    word, title = "pass" if passed else "FAIL", f"{names[0]} against {names[1]} (published)"

    labels = str(names[0]), f"{names[1]} (published)"
    png = comparison_png(list(zip(labels, (run, reference))), step, f"{title}\n{word}: {detail}")
    try:
        if figure is None:
            figure = ROOT / "runs" / f"compare-{run_dir.resolve().name}-vs-{published.resolve().name}.png"
            figure.parent.mkdir(exist_ok=True)
        atomic_write(figure, png)
    except (OSError, RunFileError) as error:
        raise BadInput(f"cannot write the figure {figure}: {why(error)}") from None

    print(f"{title}: validation accuracy (%) at each point both have, after s inner steps; d = run − published, "
          "± its 95% interval")
    print(f"{'iteration':>9} {'s':>2} {'run':>6} {'published':>9}  d ± 95% interval")
    steps = [s for s in run.steps if s in reference.steps]
    pairs = {s: (validation(run, s), validation(reference, s)) for s in steps}
    for i in common:
        for s in steps:
            if i in pairs[s][0] and i in pairs[s][1]:
                (a, ci_a), (b, ci_b) = pairs[s][0][i], pairs[s][1][i]
                print(f"{i:>9} {s:>2} {a:>6.1f} {b:>9.1f}  {a - b:+.1f} ± {math.hypot(ci_a, ci_b):.1f}")
    print(f"figure: {shown(figure)}")
    print(f"{word}: {title}, validation after {step} inner steps: {detail}")
    return passed


def main(argv=None):
    """The command line (see the module docstring); exits 1 on a stale --check and 2 on bad input."""
    parser = Parser(prog="results_table.py", description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    action.add_argument("--publish", metavar="RUN_DIR", type=Path,
                        help="copy the finished run in RUN_DIR to results/NAME/, then rewrite the table")
    parser.add_argument("--as", dest="name", metavar="NAME", help="with --publish: the folder in results/ "
                        "(default: RUN_DIR's folder name)")
    parser.add_argument("--without-weights", action="store_true",
                        help="with --publish: publish a run that has no model.pt")
    action.add_argument("--compare", metavar="RUN_DIR", type=Path,
                        help="compare the run in RUN_DIR (finished or not) with a published one; exit 1 if it fails")
    parser.add_argument("--against", metavar="NAME_OR_DIR",
                        help="with --compare: the published run, a folder name in results/ (or any run's folder)")
    parser.add_argument("--figure", metavar="PATH", type=Path, help="with --compare: where the overlay figure goes "
                        "(default: runs/compare-<run>-vs-<published>.png)")
    args = parser.parse_args(argv)
    if (args.name is not None or args.without_weights) and args.publish is None:
        parser.error("--as and --without-weights go with --publish RUN_DIR")
    if (args.compare is None) != (args.against is None) or (args.figure is not None and args.compare is None):
        parser.error("--compare RUN_DIR needs --against NAME_OR_DIR, and --against and --figure go with --compare")
    try:
        if args.compare is not None:
            if not compare(args.compare, args.against, args.figure):
                sys.exit(1)
            return
        if args.publish is not None:
            dest = publish(args.publish, args.name, args.without_weights)
            files = ", ".join(sorted(path.name for path in dest.iterdir()))
            print(f"published {args.publish} as {shown(dest)}/ ({files}); README.md's table rewritten")
            if (ROOT / "in-progress" / dest.name).exists():
                print(f"note: results/{dest.name} has finished: git rm -r in-progress/{dest.name} (its checkpoint)")
            return
        readme, runs = read_readme(), load_runs()
        updated = with_table(readme, readme_tables(runs))
        if args.check:
            if updated != readme:
                print("error: README.md's results table is out of date: run python results_table.py", file=sys.stderr)
                sys.exit(1)
            print(f"README.md's results table is up to date with results/*/summary.json ({', '.join(runs) or 'none'})")
            return
        try:
            atomic_write(ROOT / "README.md", updated.encode())
        except RunFileError as error:
            raise BadInput(str(error)) from None
    except BadInput as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
