"""Write the README's results table from results/*/summary.json.

    python results_table.py          # rewrite the table between the markers in README.md
    python results_table.py --check  # exit 1 if README.md's table is not what results/ says

Our numbers come only from summary.json files that maml_omniglot.py wrote; a paper setting with no
run in results/<setting>/ says so. Runs in other folders (short reference runs) get rows of their own.
"""

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
BEGIN, END = "<!-- results table: begin (python results_table.py) -->", "<!-- results table: end -->"
PAPER = {  # Finn et al. 2017, Table 1, Omniglot, MAML (second order)
    "5w1s": "98.7 ± 0.4 %",
    "5w5s": "99.9 ± 0.1 %",
    "20w1s": "95.8 ± 0.3 %",
    "20w5s": "98.9 ± 0.2 %",
}


def unique(values):
    return list(dict.fromkeys(values))


def describe(summary):
    """Ours (accuracy after update_step_test steps, with its 95% interval), iterations, wall time, device, commit.

    A run still in progress shows its last validation instead, and how far it has got. A run resumed on
    other devices or at other commits lists each one (summary.json's "segments"; older summaries have none).
    """
    cfg = summary["config"]
    if summary.get("status", "finished") == "finished":
        test = summary["test"]
        ours = f"{100 * test['accs'][-1]:.1f} ± {100 * test['ci95'][-1]:.1f} % ({test['tasks']} tasks)"
        iterations = f"{cfg['iterations']:,}"
    else:
        val = summary["last_validation"]
        ours = (f"in progress: validation {100 * val['accs'][-1]:.1f} ± {100 * val['ci95'][-1]:.1f} % "
                f"at iteration {val['iteration']:,}")
        iterations = f"{summary['iteration']:,} of {cfg['iterations']:,}"
    segments = summary.get("segments") or [summary]
    devices = []
    for segment in segments:
        device = segment["device"]["name"]
        if segment["device"]["type"] == "cpu":
            device += f", {segment['device']['cpu_threads']} threads"
        devices.append(device)
    commits = [(segment["git"]["commit"] or "unknown")[:10] for segment in segments]
    return (ours, iterations, f"{summary['wall_time_s'] / 3600:.2f} h", "; ".join(unique(devices)),
            ", ".join(unique(commits)))


def table():
    lines = ["| setting | MAML paper | ours | meta-iterations | wall time | device | commit |",
             "|---|---|---|---|---|---|---|"]
    for setting, paper in PAPER.items():
        summary_path = ROOT / "results" / setting / "summary.json"
        if summary_path.exists():
            cells = describe(json.loads(summary_path.read_text()))
        else:
            cells = ("not run yet", "", "", "", "")
        lines.append(f"| {setting} | {paper} | " + " | ".join(cells) + " |")
    for summary_path in sorted((ROOT / "results").glob("*/summary.json")):
        name = summary_path.parent.name
        if name not in PAPER:
            summary = json.loads(summary_path.read_text())
            lines.append(f"| {name} | {PAPER.get(summary['config']['setting'], '')} (at 60,000 iterations) | "
                         + " | ".join(describe(summary)) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    args = parser.parse_args(argv)
    readme_path = ROOT / "README.md"
    readme = readme_path.read_text()
    if BEGIN not in readme or END not in readme:
        sys.exit(f"error: README.md has no results-table markers; put {BEGIN!r} and {END!r} where it goes")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    updated = f"{head}{BEGIN}\n{table()}\n{END}{tail}"
    if args.check:
        if updated != readme:
            sys.exit("error: README.md's results table is out of date: run python results_table.py")
        return
    tmp_path = readme_path.with_suffix(".md.tmp")
    tmp_path.write_text(updated)
    os.replace(tmp_path, readme_path)


if __name__ == "__main__":
    main()
