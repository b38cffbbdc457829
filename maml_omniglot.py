"""Second-order MAML (Finn et al. 2017) on Omniglot: train, validate, test, plot.

    python maml_omniglot.py                      # the paper's 5-way 1-shot experiment
    python maml_omniglot.py --setting 20w5s      # any of the paper's four settings
    python maml_omniglot.py --out DIR --resume   # continue an interrupted run from DIR/checkpoint.pt
    python maml_omniglot.py --plot-only DIR      # redraw DIR/curves.png from DIR/log.csv

The file reads top to bottom: settings, command line and its validation, evaluation, the log,
checkpoints, the training loop, the summary and the plot, and main().

Outputs in --out (each written atomically: temporary file, then os.replace):
  log.csv       one row per logged point: iteration, split (train/val/test), acc_step0..acc_stepS
                (mean query accuracy after 0..S inner steps, as fractions; S = the larger of
                --update-step and --update-step-test, cells beyond a row's own steps left empty),
                ci95_step0..ci95_stepS (the 95% interval half-widths, val and test rows), loss (train
                rows: the meta-loss, the query cross-entropy), elapsed_s (seconds since the run began,
                summed over resumed segments).
                train rows average the meta-training tasks since the previous train row (one row every
                --eval-every iterations and at the last one); val rows are --eval-tasks validation tasks,
                at iteration 0 (the untrained initialisation, for reference) and every --eval-every
                iterations; the test row is --test-tasks test tasks after training, the only time the
                test classes are seen. val and test rows have no loss.
  summary.json  the record of the run: status ("in progress" or "finished"), the iterations done, the
                last validation, the test accuracies with 95% intervals (once finished), the config,
                seed, command, git commit, versions, device, wall time, meta-iterations per second, and
                one entry per segment (a process that started or resumed the run) with its own
                iterations, command, commit, device and wall time. Rewritten at every checkpoint, so an
                unfinished run always has an up-to-date record of where it is and what produced it.
  curves.png    validation accuracy over iterations per adaptation step, and the test accuracy per step.
  checkpoint.pt everything needed to continue the run exactly (see train()), written every
                --checkpoint-every iterations, at the last one, and on SIGINT/SIGTERM (the run then
                stops with exit code 128 + the signal number). It also holds the trained network.

On CPU, the same command on the same machine gives a bit-identical log.csv, also across a SIGKILL and
--resume, in every column except elapsed_s (wall-clock time cannot repeat).
"""
import argparse
import csv
import io
import json
import math
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from meta import MetaLearner  # noqa: E402
from omniglot_nshot import DRAWINGS_PER_CHARACTER, SPLIT_SIZES, OmniglotNShot  # noqa: E402
from preprocess_omniglot import PreprocessError  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# Settings: the paper's appendix (reference code: github.com/cbfinn/maml).
# ----------------------------------------------------------------------------------------------------
SETTINGS = {
    "5w1s": dict(n_way=5, k_spt=1, task_num=32, update_step=1, update_lr=0.4, update_step_test=3),
    "5w5s": dict(n_way=5, k_spt=5, task_num=32, update_step=1, update_lr=0.4, update_step_test=3),
    "20w1s": dict(n_way=20, k_spt=1, task_num=16, update_step=5, update_lr=0.1, update_step_test=5),
    "20w5s": dict(n_way=20, k_spt=5, task_num=16, update_step=5, update_lr=0.1, update_step_test=5),
}
COMMON = dict(meta_lr=1e-3, iterations=60000)  # and k_qry = k_spt, 600 test tasks

# Config keys that may differ when resuming: where the files are, how often to checkpoint, and the
# device (which changes only floating-point rounding). Any other difference is refused.
RESUMABLE_CHANGES = ("data", "out", "device", "checkpoint_every")

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 2  # 2: the state holds per-segment provenance ("segments")

# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr (no usage dump) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    p = Parser(
        prog="maml_omniglot.py",
        description="Second-order MAML on Omniglot (Finn et al. 2017). "
        "--setting picks the paper's values; every flag below overrides one of them.",
    )
    p.add_argument("--setting", default="5w1s", choices=sorted(SETTINGS), help="paper setting (default 5w1s)")
    p.add_argument("--n-way", type=int, help="classes per task (N)")
    p.add_argument("--k-spt", type=int, help="support drawings per class (K)")
    p.add_argument("--k-qry", type=int, help="query drawings per class (default: K)")
    p.add_argument("--task-num", type=int, help="tasks per meta-batch (32 for 5-way, 16 for 20-way)")
    p.add_argument("--update-lr", type=float, help="inner-loop learning rate alpha (0.4 / 0.1)")
    p.add_argument("--meta-lr", type=float, help="Adam meta learning rate beta (1e-3)")
    p.add_argument("--update-step", type=int, help="inner steps in meta-training (1 / 5)")
    p.add_argument("--update-step-test", type=int, help="inner steps at validation and test (3 / 5)")
    p.add_argument("--iterations", type=int, help="meta-iterations (60000)")
    p.add_argument("--first-order", action="store_true", help="first-order MAML (drop second derivatives)")
    p.add_argument("--no-rotate", action="store_true", help="no random 90-degree rotations of the classes")
    p.add_argument("--seed", type=int, default=0, help="seed for the network, the tasks and all RNGs (0)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (auto)")
    p.add_argument("--eval-every", type=int, default=500, help="validate and log training every N iterations (500)")
    p.add_argument("--eval-tasks", type=int, default=320, help="validation tasks per validation (320)")
    p.add_argument("--test-tasks", type=int, default=600, help="test tasks at the end (600)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="write checkpoint.pt every N iterations (500)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt with the same flags (starts afresh if there is none)")
    p.add_argument("--data", default="data/omniglot.npy",
                   help="preprocessed array; built from the zips beside it when missing (data/omniglot.npy)")
    p.add_argument("--out", help="output folder (results/<setting>/)")
    p.add_argument("--plot-only", metavar="DIR", help="only redraw DIR/curves.png from DIR/log.csv")
    return p


def resolve_config(args, parser):
    """Fill the setting's values into the flags left out, check them all, return the run's config.

    Every impossible value ends the program here, before any data is loaded, with one line on stderr
    and exit code 2 (parser.error). The output folder is created here to prove it can be written.
    """
    setting = dict(SETTINGS[args.setting], **COMMON)
    cfg = {"setting": args.setting}
    for key in ("n_way", "k_spt", "task_num", "update_lr", "meta_lr", "update_step", "update_step_test",
                "iterations"):
        value = getattr(args, key)
        cfg[key] = setting[key] if value is None else value
    cfg["k_qry"] = cfg["k_spt"] if args.k_qry is None else args.k_qry
    cfg.update(first_order=args.first_order, rotate=not args.no_rotate, seed=args.seed,
               eval_every=args.eval_every, eval_tasks=args.eval_tasks, test_tasks=args.test_tasks,
               checkpoint_every=args.checkpoint_every, data=args.data,
               out=args.out if args.out is not None else os.path.join("results", args.setting))

    if cfg["n_way"] < 2:
        parser.error(f"--n-way must be at least 2 (a task needs two classes), got {cfg['n_way']}")
    smallest = min(SPLIT_SIZES, key=SPLIT_SIZES.get)
    if cfg["n_way"] > SPLIT_SIZES[smallest]:
        parser.error(f"--n-way {cfg['n_way']} is more than the {SPLIT_SIZES[smallest]} classes "
                     f"of the {smallest} split")
    if cfg["k_spt"] < 1:
        parser.error(f"--k-spt must be at least 1, got {cfg['k_spt']}")
    if cfg["k_qry"] < 1:
        parser.error(f"--k-qry must be at least 1, got {cfg['k_qry']}")
    if cfg["k_spt"] + cfg["k_qry"] > DRAWINGS_PER_CHARACTER:
        parser.error(f"--k-spt + --k-qry = {cfg['k_spt'] + cfg['k_qry']} is more than the "
                     f"{DRAWINGS_PER_CHARACTER} drawings of an Omniglot character")
    for key in ("update_lr", "meta_lr"):
        if not (math.isfinite(cfg[key]) and cfg[key] > 0):
            parser.error(f"--{key.replace('_', '-')} must be a positive number, got {cfg[key]}")
    for key in ("task_num", "update_step", "update_step_test", "iterations", "eval_every", "eval_tasks",
                "test_tasks", "checkpoint_every"):
        if cfg[key] < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1, got {cfg[key]}")
    cfg["device"] = resolve_device(args.device, parser)
    check_output_folder(cfg["out"], args.resume, parser)
    return cfg


def resolve_device(name, parser):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device {name!r} is unknown: use auto, cpu, cuda or cuda:N")
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        parser.error(f"--device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        parser.error(f"--device {name}: CUDA is not available on this machine")
    if device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(device)


def check_output_folder(out, resume, parser):
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}.tmp")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        parser.error(f"--out {out} cannot be written: {e.strerror or e}")
    if not resume and os.path.exists(os.path.join(out, CHECKPOINT)):
        parser.error(f"--out {out} already holds {CHECKPOINT}: add --resume to continue that run, "
                     f"or choose another --out")


# ----------------------------------------------------------------------------------------------------
# Evaluation: adapt to fresh tasks without touching the meta-parameters
# ----------------------------------------------------------------------------------------------------


def evaluate(learner, data, split, n_tasks):
    """Per-step query accuracy on the first n_tasks tasks of `split`: (mean, 95% interval), numpy arrays.

    The split's sampler is reset first, so every validation sees the same tasks (curves are comparable)
    and evaluating never changes the training tasks. The interval is 1.96 * std / sqrt(n) over tasks,
    with numpy's std (ddof=0), as in the reference code.
    """
    data.reset(split)
    per_task = []
    seen = 0
    while seen < n_tasks:
        x_spt, y_spt, x_qry, y_qry = data.next(split)
        accs = np.asarray(learner.finetunning(x_spt, y_spt, x_qry, y_qry, per_task=True))
        per_task.append(accs)
        seen += len(accs)
    per_task = np.concatenate(per_task)[:n_tasks]
    return per_task.mean(axis=0), 1.96 * per_task.std(axis=0) / math.sqrt(n_tasks)


# ----------------------------------------------------------------------------------------------------
# The log: rows in memory, log.csv rewritten atomically from them
# ----------------------------------------------------------------------------------------------------


def atomic_write(path, data):
    """Write bytes to path so that a reader (or a crash) sees the old file or the new one, never half."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def log_columns(cfg):
    n_steps = max(cfg["update_step"], cfg["update_step_test"]) + 1  # accuracies after 0..S inner steps
    return (["iteration", "split"] + [f"acc_step{s}" for s in range(n_steps)]
            + [f"ci95_step{s}" for s in range(n_steps)] + ["loss", "elapsed_s"])


def make_row(iteration, split, accs, ci95, loss, elapsed):
    """A log row. Numbers are python floats, written with repr: exact, so logs compare bit for bit."""
    row = {"iteration": iteration, "split": split, "loss": "" if loss is None else float(loss),
           "elapsed_s": round(elapsed, 3)}
    row.update({f"acc_step{s}": float(a) for s, a in enumerate(accs)})
    row.update({f"ci95_step{s}": float(c) for s, c in enumerate(ci95 if ci95 is not None else [])})
    return row


def write_log(path, rows, cfg):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=log_columns(cfg), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buf.getvalue().encode())


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------


def rng_states():
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path, state):
    """Atomically write the whole training state: a SIGKILL mid-write leaves the previous checkpoint."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, buf.getvalue())


def load_checkpoint(path, cfg, parser):
    """Read and check a checkpoint before any data is loaded; refuse (exit 2) if unusable.

    A refused checkpoint is left as it is: nothing is written until training has resumed.
    Checkpoints are pickles: load only your own.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)  # holds numpy RNG state
        if state.get("format") == 1:  # parser.error exits: SystemExit passes the except below
            parser.error(f"{path} was written by an older maml_omniglot.py (checkpoint format 1, which did "
                         f"not record where each segment of the run ran); resume it with the commit that "
                         f"wrote it, or move it away to start over")
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unknown format {state.get('format')!r}")
        for key in ("config", "iteration", "learner", "meta_optim", "rng", "data", "log", "window",
                    "elapsed_s", "train_s", "segments"):
            if key not in state:
                raise KeyError(f"missing {key!r}")
    except Exception as e:  # a truncated zip, random bytes, a foreign pickle: all refused the same way
        reason = (str(e).strip().splitlines() or [""])[0]
        parser.error(f"{path} is corrupt or truncated ({type(e).__name__}: {reason}); refusing to resume "
                     f"from it. It was left untouched: move it away to start over")
    saved = state["config"]
    differ = [f"{k}: checkpoint {saved.get(k)!r}, now {cfg.get(k)!r}"
              for k in sorted(set(saved) | set(cfg)) if k not in RESUMABLE_CHANGES and saved.get(k) != cfg.get(k)]
    if differ:
        parser.error(f"{path} was made with another configuration; refusing to resume ("
                     + "; ".join(differ) + ")")
    return state


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


class StopRequested:
    """Remembers a SIGINT/SIGTERM so the loop can finish the iteration, checkpoint and exit."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class NonFiniteLoss(Exception):
    pass


def train(cfg, learner, data, state, paths):
    """Meta-train from state["iteration"] to cfg["iterations"], logging, validating and checkpointing.

    `state` holds the iteration, the log rows, the running sums of the current train-row window,
    the elapsed and training seconds, and the segments (one per process that ran part of the run, the
    last one this process); it is updated in place and returned. A checkpoint adds the config, the
    network, the Adam state, the RNG states of python, numpy and torch, and the task sampler's state,
    and is followed by an "in progress" summary.json that describes exactly what the checkpoint holds.
    """
    segment_start = time.monotonic()
    elapsed_at_start = state["elapsed_s"]

    def elapsed():
        return elapsed_at_start + time.monotonic() - segment_start

    def validate(iteration):
        accs, ci95 = evaluate(learner, data, "val", cfg["eval_tasks"])
        state["log"].append(make_row(iteration, "val", accs, ci95, None, elapsed()))
        return accs[-1]

    def checkpoint(iteration):
        state.update(iteration=iteration, elapsed_s=elapsed())
        state["segments"][-1].update(to_iteration=iteration, wall_time_s=round(elapsed() - elapsed_at_start, 3))
        save_checkpoint(paths["checkpoint"], dict(
            state, format=CHECKPOINT_FORMAT, config=cfg, learner=learner.state_dict(),
            meta_optim=learner.meta_optim.state_dict(), rng=rng_states(), data=data.state_dict()))
        write_summary(paths["summary"], cfg, state)

    def after(iteration, stop):
        if iteration % cfg["checkpoint_every"] == 0 or iteration == cfg["iterations"] or stop.signum:
            checkpoint(iteration)
        if stop.signum:
            name = signal.Signals(stop.signum).name
            tqdm.write(f"{name} at iteration {iteration}: checkpoint saved to {paths['checkpoint']}; "
                       f"continue with the same command and --resume", file=sys.stderr)
            raise SystemExit(128 + stop.signum)

    start = state["iteration"]
    val_rows = [row for row in state["log"] if row["split"] == "val"]
    val_acc = val_rows[-1][f"acc_step{cfg['update_step_test']}"] if val_rows else float("nan")
    ema = None
    with StopRequested() as stop, tqdm(total=cfg["iterations"], initial=start, unit="it", dynamic_ncols=True,
                                       desc=f"{cfg['n_way']}-way {cfg['k_spt']}-shot") as bar:
        if start == 0 and not state["log"]:
            val_acc = validate(0)
            write_log(paths["log"], state["log"], cfg)
            after(0, stop)
        for iteration in range(start + 1, cfg["iterations"] + 1):
            t = time.monotonic()
            x_spt, y_spt, x_qry, y_qry = data.next("train")
            accs, loss = learner(x_spt, y_spt, x_qry, y_qry)
            state["train_s"] += time.monotonic() - t
            if not math.isfinite(loss):
                raise NonFiniteLoss(f"meta-loss is {loss} at iteration {iteration}")
            window = state["window"]
            window["accs"] = window["accs"] + np.asarray(accs, dtype=np.float64)
            window["loss"] += loss
            window["count"] += 1
            ema = accs[-1] if ema is None else 0.98 * ema + 0.02 * accs[-1]
            if iteration % cfg["eval_every"] == 0 or iteration == cfg["iterations"]:
                train_accs = window["accs"] / window["count"]
                state["log"].append(make_row(iteration, "train", train_accs, None,
                                             window["loss"] / window["count"], elapsed()))
                state["window"] = empty_window(cfg)
                val_acc = validate(iteration)
                write_log(paths["log"], state["log"], cfg)
                tqdm.write(f"iteration {iteration}: query accuracy train {train_accs[-1]:.3f} (after "
                           f"{cfg['update_step']} inner steps), val {val_acc:.3f} (after {cfg['update_step_test']})")
            bar.set_postfix(train_acc=f"{ema:.3f}", val_acc=f"{val_acc:.3f}", refresh=False)
            bar.update(1)
            after(iteration, stop)
    state["elapsed_s"] = elapsed()
    return state


def empty_window(cfg):
    return {"accs": np.zeros(cfg["update_step"] + 1), "loss": 0.0, "count": 0}


# ----------------------------------------------------------------------------------------------------
# Summary and plot
# ----------------------------------------------------------------------------------------------------


def git_info():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True).stdout.strip()
        changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(changes)}


def device_description(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def new_segment(iteration, cfg, command):
    """The record of one process that runs part of the run, from `iteration` on: what ran, where, when.

    A run resumed across machines, thread counts or commits is still one run, but it was not produced
    by one command at one commit; its summary.json lists every segment, so that nothing is hidden.
    """
    return {"from_iteration": iteration, "to_iteration": iteration, "command": command, "git": git_info(),
            "device": {"type": torch.device(cfg["device"]).type, "name": device_description(cfg["device"]),
                       "cpu_threads": torch.get_num_threads()},
            "torch": torch.__version__, "python": platform.python_version(),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_time_s": 0.0}


def describe_changes(previous, current):
    """What differs between two segments in ways that change floating-point rounding (or the code)."""
    changes = []
    if previous["git"]["commit"] != current["git"]["commit"]:
        changes.append(f"commit {str(previous['git']['commit'])[:10]} -> {str(current['git']['commit'])[:10]}")
    for key in ("name", "cpu_threads"):
        if previous["device"][key] != current["device"][key]:
            changes.append(f"{key.replace('_', ' ')} {previous['device'][key]} -> {current['device'][key]}")
    if previous["torch"] != current["torch"]:
        changes.append(f"torch {previous['torch']} -> {current['torch']}")
    return changes


def write_summary(path, cfg, state, test_accs=None, test_ci=None):
    """summary.json: "in progress" after every checkpoint (describing exactly the checkpoint), then
    "finished" with the test accuracies. The top-level command, git, versions and device are those of
    the latest segment; "segments" has them all. wall_time_s counts training, validation and test over
    all segments (not start-up, data loading, or the work lost after a checkpoint); meta_iterations_per_s
    divides the iterations done by the time spent sampling tasks and taking meta-steps."""
    finished = test_accs is not None
    val_rows = [row for row in state["log"] if row["split"] == "val"]
    steps = range(cfg["update_step_test"] + 1)
    last_val = val_rows[-1] if val_rows else None
    latest = state["segments"][-1]
    summary = {
        "status": "finished" if finished else "in progress",
        "iteration": state["iteration"],
        "test": {"accs": [float(a) for a in test_accs], "ci95": [float(c) for c in test_ci],
                 "tasks": cfg["test_tasks"]} if finished else None,
        "last_validation": None if last_val is None else {
            "iteration": last_val["iteration"], "tasks": cfg["eval_tasks"],
            "accs": [last_val[f"acc_step{s}"] for s in steps], "ci95": [last_val[f"ci95_step{s}"] for s in steps]},
        "config": cfg,
        "seed": cfg["seed"],
        "command": latest["command"],
        "git": latest["git"],
        "torch": latest["torch"],
        "python": latest["python"],
        "device": latest["device"],
        "segments": state["segments"],
        "wall_time_s": round(state["elapsed_s"], 3),
        "train_time_s": round(state["train_s"], 3),
        "meta_iterations_per_s": round(state["iteration"] / state["train_s"], 3) if state["train_s"] else None,
    }
    atomic_write(path, (json.dumps(summary, indent=2) + "\n").encode())


def plot_curves(log_path, png_path, title):
    """Draw validation accuracy per adaptation step over iterations and the final test accuracy per step."""
    rows = read_log(log_path)
    steps = sorted(int(c[len("acc_step"):]) for c in rows[0] if c.startswith("acc_step")) if rows else []

    def series(split, step):
        pts = [(int(r["iteration"]), 100 * float(r[f"acc_step{step}"])) for r in rows
               if r["split"] == split and r[f"acc_step{step}"] != ""]
        return [p[0] for p in pts], [p[1] for p in pts]

    test = [r for r in rows if r["split"] == "test"]
    fig, axes = plt.subplots(1, 2 if test else 1, figsize=(11 if test else 7, 5), squeeze=False,
                             gridspec_kw={"width_ratios": [2.2, 1]} if test else None)
    ax = axes[0][0]
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(len(steps), 1)))
    for step, color in zip(steps, colors):
        x, y = series("val", step)
        if x:
            ax.plot(x, y, marker="o", markersize=3, color=color, label=f"val, {step} step{'s' * (step != 1)}")
            ci = [100 * float(r[f"ci95_step{step}"]) for r in rows if r["split"] == "val"]
            ax.fill_between(x, np.subtract(y, ci), np.add(y, ci), color=color, alpha=0.15, linewidth=0)
    train_steps = [s for s in steps if series("train", s)[0]]
    if train_steps:
        last = train_steps[-1]
        x, y = series("train", last)
        ax.plot(x, y, linestyle="--", color="grey", label=f"train, {last} step{'s' * (last != 1)}")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("query accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("validation during meta-training (band: 95% interval)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)  # below: hides nothing
    if test:
        row = test[-1]
        accs = [100 * float(row[f"acc_step{s}"]) for s in steps if row[f"acc_step{s}"] != ""]
        ci = [100 * float(row[f"ci95_step{s}"]) if row.get(f"ci95_step{s}", "") != "" else 0.0
              for s in range(len(accs))]
        ax2 = axes[0][1]
        ax2.errorbar(range(len(accs)), accs, yerr=ci, marker="o", capsize=4, color="C3")
        for s, (a, c) in enumerate(zip(accs, ci)):
            ax2.annotate(f"{a:.1f}", (s, a), textcoords="offset points", xytext=(6, 0), ha="left",
                         va="center", fontsize="small")
        ax2.set_xticks(range(len(accs)))
        ax2.set_xlabel("inner adaptation steps")
        ax2.set_ylabel("query accuracy (%)")
        ax2.set_title(f"test after {row['iteration']} iterations\n(bars: 95% interval)")
        ax2.set_xlim(-0.5, len(accs) - 0.2)
        ax2.set_ylim(0, 100)
        ax2.grid(alpha=0.3)
    fig.suptitle(f"MAML on Omniglot: {title}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(png_path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    command = shlex.join(["python", "maml_omniglot.py"] + (sys.argv[1:] if argv is None else list(argv)))

    if args.plot_only:
        log_path = os.path.join(args.plot_only, "log.csv")
        if not os.path.isfile(log_path):
            parser.error(f"--plot-only {args.plot_only}: there is no {log_path}")
        plot_curves(log_path, os.path.join(args.plot_only, "curves.png"),
                    os.path.basename(os.path.normpath(args.plot_only)))
        return 0

    cfg = resolve_config(args, parser)
    paths = {key: os.path.join(cfg["out"], name) for key, name in
             (("checkpoint", CHECKPOINT), ("log", "log.csv"), ("summary", "summary.json"), ("curves", "curves.png"))}
    checkpoint = None
    if args.resume:
        if os.path.exists(paths["checkpoint"]):
            checkpoint = load_checkpoint(paths["checkpoint"], cfg, parser)
        else:
            print(f"--resume: no {paths['checkpoint']} yet, starting from the beginning", file=sys.stderr)

    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    try:
        data = OmniglotNShot(path=cfg["data"], batchsz=cfg["task_num"], n_way=cfg["n_way"], k_shot=cfg["k_spt"],
                             k_query=cfg["k_qry"], device=cfg["device"], seed=cfg["seed"], rotate=cfg["rotate"])
    except (PreprocessError, ValueError) as e:  # no zips and no network, a damaged or foreign array
        print(f"maml_omniglot.py: error: {e}", file=sys.stderr)
        return 1
    learner = MetaLearner(cfg["n_way"], cfg["k_spt"], cfg["update_lr"], cfg["meta_lr"], cfg["update_step"],
                          cfg["update_step_test"], first_order=cfg["first_order"]).to(cfg["device"])
    state = {"iteration": 0, "log": [], "window": empty_window(cfg), "elapsed_s": 0.0, "train_s": 0.0,
             "segments": []}
    if checkpoint is not None:
        learner.load_state_dict(checkpoint["learner"])
        learner.meta_optim.load_state_dict(checkpoint["meta_optim"])
        data.load_state_dict(checkpoint["data"])
        set_rng_states(checkpoint["rng"])
        state = {k: checkpoint[k] for k in state}
        print(f"resuming from {paths['checkpoint']} at iteration {state['iteration']}", file=sys.stderr)
    state["segments"].append(new_segment(state["iteration"], cfg, command))
    if len(state["segments"]) > 1:
        changes = describe_changes(state["segments"][-2], state["segments"][-1])
        if changes:
            print(f"note: this segment differs from the previous one ({'; '.join(changes)}): the run continues "
                  f"correctly, but not bit for bit as it would have; summary.json records both",
                  file=sys.stderr)

    segment_began = state["elapsed_s"]
    try:
        state = train(cfg, learner, data, state, paths)
    except NonFiniteLoss as e:
        last = f"the last good checkpoint ({paths['checkpoint']}) is kept" if os.path.exists(paths["checkpoint"]) \
            else "no checkpoint had been written yet"
        print(f"maml_omniglot.py: error: {e}; stopping: {last}. Try a smaller --meta-lr or --update-lr.",
              file=sys.stderr)
        return 1

    test_start = time.monotonic()
    test_accs, test_ci = evaluate(learner, data, "test", cfg["test_tasks"])
    state["elapsed_s"] += time.monotonic() - test_start
    state["segments"][-1]["wall_time_s"] = round(state["elapsed_s"] - segment_began, 3)
    write_log(paths["log"], state["log"] + [make_row(cfg["iterations"], "test", test_accs, test_ci, None,
                                                     state["elapsed_s"])], cfg)
    print(f"test accuracy over {cfg['test_tasks']} tasks, after 0..{cfg['update_step_test']} inner steps: "
          + ", ".join(f"{100 * a:.2f}% ± {100 * c:.2f}" for a, c in zip(test_accs, test_ci)))
    write_summary(paths["summary"], cfg, state, test_accs, test_ci)
    plot_curves(paths["log"], paths["curves"], os.path.basename(os.path.normpath(cfg["out"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
