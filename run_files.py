"""The files of a run: what maml_omniglot.py writes into its output folder, and how; and the config they record.

A run's folder (--out, runs/<setting>/ by default) holds:

  log.csv        one row per logged point, in this column order:
                   iteration     the meta-iteration the row describes
                   split         train, val or test
                   acc_step0..S  mean query accuracy after 0..S inner steps, as fractions; S is the larger
                                 of update_step and update_step_test, and the cells beyond a row's own
                                 steps are left empty
                   ci95_step0..S the 95% interval half-widths of those (val and test rows)
                   loss          train rows: the meta-loss, the query cross-entropy
                   step_acc_iterations  train rows: of the iterations the row averages, how many measured
                                 the accuracies before the last inner step, acc_step0..update_step-1 (every
                                 --step-accuracies-every-th iteration and the row's last: each costs a
                                 query forward pass; acc_step<update_step> is measured at every iteration,
                                 with the loss; a CUDA graph measures them all at every iteration). Empty
                                 in rows written before it existed, which measured them at every iteration
                   elapsed_s     seconds since the run began, summed over resumed segments
                 train rows average the meta-training tasks since the previous train row (one row every
                 --eval-every iterations and at the last one); val rows are --eval-tasks validation tasks,
                 at iteration 0 (the untrained initialisation, for reference) and every --eval-every
                 iterations; the test row is --test-tasks test tasks after training, the only time the
                 test classes are seen. Numbers are written exactly (Python's repr), so that two logs
                 compare bit for bit.
  summary.json   the record of the run: status ("in progress" or "finished"), the iterations done, the
                 last validation, the test accuracies with 95% intervals (once finished), the config,
                 seed, command, git commit, versions, device, wall time, meta-iterations per second, and
                 one entry per segment (a process, or torchrun's processes, that started or resumed the
                 run) with its own iterations, command, commit, device, processes, computation (the tasks
                 batched or one by one, a CUDA graph or not) and wall time. Rewritten at every
                 checkpoint, so an unfinished run always has an up-to-date record of where it is and what
                 produced it. A finished run whose meta-training diverged (a train row's meta-loss more than
                 DIVERGED_LOSS times ln N) also has "warnings", which say so.
                 A folder whose summary says "finished" is never written into again.
  curves.png     drawn from log.csv by curves.py.
  checkpoint.pt  everything needed to continue the run exactly (CHECKPOINT_KEYS below): θ (the
                 MetaLearner's state_dict), Adam's state, the RNG and sampler states, the run's state and
                 config; written every --checkpoint-every iterations, at the last one, and on
                 SIGINT/SIGTERM.
  model.pt       the trained meta-parameters θ, written when the run finishes: {"format", "config",
                 "param_names", "theta", "digest"}, tensors and plain values only, so that
                 torch.load(path, weights_only=True) reads it. theta is the MetaLearner's state_dict: its
                 network's weights "net.weights.0", "net.weights.1", ... are the param_names, in order
                 (conv1.weight, bn1.weight, ...; learner.py).
  .lock          held (flock) by the process writing the folder, so that two runs never write one folder.

--evaluate writes one more file, into its own --out folder (never a training run's):

  evaluation.json  {"accs", "ci95"}: the query accuracy after 0..update_step_test inner steps and its 95%
                 interval, over "tasks" tasks of "split"; "model" (the model.pt), "config" (the model's,
                 with the flags given), and the command, git, device, computation, torch, python and
                 started_utc of the process that evaluated, as a segment of summary.json records them, and
                 its wall_time_s.

The config that the files record ("config" in summary.json, checkpoint.pt, model.pt and evaluation.json)
is defined here too, in the section "The config": the paper's four settings, the defaults of the other
flags, what --evaluate may change, the limits and config_problem, which refuses an impossible value in one
line before any data is loaded; the keys that do not change what is learned (NOT_LEARNED) and the values
of keys added later (ADDED_CONFIG); and Parser, the one-line command-line error of every script.

Files of older formats keep working. A checkpoint or model.pt of an older format that this code still
reads is upgraded as it is read (UPGRADES), and a config written before a key existed gets the value that
reproduces what that code did (ADDED_CONFIG), so that every committed checkpoint and published model.pt
resumes and evaluates with every later commit (tests/test_run_files.py, with a committed file of each
older format). Formats too old to upgrade name the last commit that reads them.

Every file is written atomically: to a temporary name of this process beside it, then renamed over the
old one, so a reader or a crash sees the old file or the new one, never half of one. A write that fails
(a full disk) removes its temporary file and raises RunFileError. checkpoint.pt and model.pt carry a
digest (SHA-256) of their contents, checked when they are read: a flipped bit is refused, not trained on.

On CPU, the same command on the same machine gives a bit-identical log.csv, also across a SIGKILL and
--resume, in every column except elapsed_s (wall-clock time cannot repeat).
"""

import argparse
import csv
import dataclasses
import fcntl
import hashlib
import io
import json
import math
import os
import platform
import random
import re
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from meta import task_threads

FILES = {"log": "log.csv", "summary": "summary.json", "curves": "curves.png", "checkpoint": "checkpoint.pt",
         "model": "model.pt"}  # a run folder's files, by what they are
EVALUATION_FILE = "evaluation.json"  # what --evaluate writes into its own --out folder
CHECKPOINT_FORMAT = 4  # 4: θ as the MetaLearner's state_dict; 3: the network's ("net"); 2: no "run" entry
CHECKPOINT_KEYS = ("format", "config", "run", "theta", "meta_optim", "rng", "sampler", "digest")
CHECKPOINT_LAST_READERS = {1: "1e6d682", 2: "bf074d8"}  # formats too old to upgrade: the last commit that reads them
MODEL_FORMAT = 2  # 2: θ as the MetaLearner's state_dict; 1: the network's ("state_dict")
MODEL_KEYS = ("format", "config", "param_names", "theta", "digest")


class RunFileError(Exception):
    """A run file that cannot be written, or read back as what it should be. The message is one line."""


class Refused(RunFileError):
    """A folder or file named on the command line that cannot be used as asked: refused like a bad flag
    (maml_omniglot.py exits with 2), before anything is written."""


class FolderInUse(Refused):
    """Another process holds the folder's lock."""


# ----------------------------------------------------------------------------------------------------
# The config: what every file of a run records as its "config", and the refusal of impossible values
# ----------------------------------------------------------------------------------------------------
# Settings: the paper's appendix (reference code: github.com/cbfinn/maml)
SETTINGS = {
    "5w1s": dict(n_way=5, k_spt=1, task_num=32, update_step=1, update_lr=0.4, update_step_test=3),
    "5w5s": dict(n_way=5, k_spt=5, task_num=32, update_step=1, update_lr=0.4, update_step_test=3),
    "20w1s": dict(n_way=20, k_spt=1, task_num=16, update_step=5, update_lr=0.1, update_step_test=5),
    "20w5s": dict(n_way=20, k_spt=5, task_num=16, update_step=5, update_lr=0.1, update_step_test=5),
}
COMMON = dict(meta_lr=1e-3, iterations=60000)  # and k_qry = k_spt: K query drawings per class
# The flags that are not the algorithm's: how a run is run, logged and stored.
RUN_DEFAULTS = dict(seed=0, device="auto", eval_every=500, eval_tasks=320, test_tasks=600, checkpoint_every=500,
                    step_accuracies_every=10, data="data/omniglot.npy")
# --evaluate takes these flags, and reads every other value from the model's config...
EVALUATE_FLAGS = ("n_way", "k_spt", "k_qry", "update_step_test", "test_tasks", "seed", "split", "data", "device",
                  "out")
# ...into which it puts the values given, except these two, which are the evaluation's own, not the model's: the
# classes it tests on, and the folder of evaluation.json (the config keeps the training's --out).
EVALUATE_OWN = ("split", "out")
SEED_LIMIT = 2 ** 32  # numpy's legacy seeding accepts 0 .. 2**32 - 1
MAX_EVALUATION_TASKS = 100_000  # the paper tests on 600; 100,000 already take hours on a CPU
MAX_INNER_STEPS = 100  # the paper takes 1 to 5, the reference code tests with 10
# The config keys that do not change what is learned: where the files are, how often to checkpoint and to measure
# the step accuracies of training, and the device (which changes floating-point rounding only). A run may resume
# with other values of these, and runs that differ in these and the seed alone are seeds of one configuration
# (results_table.py).
NOT_LEARNED = ("data", "out", "device", "checkpoint_every", "step_accuracies_every")
# Config keys added after runs were first written, each with the value that gives what the code did before
# the key existed. Every config read from a checkpoint or model.pt gets them (read_checkpoint, read_model),
# so that a new option never orphans an earlier run: add a key here when you add it to the config.
ADDED_CONFIG = {"step_accuracies_every": 1}


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr (no usage dump) and exit code 2: the command line of every
    script here (maml_omniglot.py, preprocess_omniglot.py, results_table.py, benchmark.py)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def flag(key):
    """The command-line flag that sets a config key: update_lr -> --update-lr."""
    return "--" + key.replace("_", "-")


def training_config(flags):
    """A training run's config, from its command-line flags (a dict: None, or False, where one is not given):
    the setting's values (5w1s unless --setting) and COMMON, Q = K (k_qry = k_spt) unless --k-qry, and
    RUN_DEFAULTS with runs/<setting>/ as --out, each replaced by its flag where given. Not checked here."""
    setting = flags["setting"] or "5w1s"
    cfg = {"setting": setting}
    for key, default in dict(SETTINGS[setting], **COMMON).items():
        cfg[key] = default if flags[key] is None else flags[key]
    cfg.update(k_qry=cfg["k_spt"] if flags["k_qry"] is None else flags["k_qry"], first_order=flags["first_order"],
               rotate=not flags["no_rotate"])
    for key, default in dict(RUN_DEFAULTS, out=os.path.join("runs", setting)).items():
        cfg[key] = default if flags[key] is None else flags[key]
    return cfg


def evaluation_config(model_config, flags):
    """--evaluate's config: the model's, with the EVALUATE_FLAGS given (flags as training_config takes them) in
    place of its values, but for EVALUATE_OWN; N must be the model's (maml_omniglot.py checks it), and the
    device is the evaluation's own (auto unless --device), not the training's. Not checked here."""
    cfg = dict(model_config)
    cfg.update({key: flags[key] for key in EVALUATE_FLAGS if key not in EVALUATE_OWN and flags[key] is not None})
    cfg["device"] = flags["device"] or "auto"  # the model may have been trained elsewhere
    return cfg


def config_problem(cfg):
    """The first impossible value in a config, as the one line that refuses it (naming its flags), or None.

    The values alone, so that they are refused before any data is loaded; what this machine and torchrun make
    of them (the device, the meta-batch's split over the processes) maml_omniglot.py checks itself.
    """
    # Imported here, not at the top: omniglot_nshot imports preprocess_omniglot, which imports this module.
    from omniglot_nshot import task_shape_problem

    problem = task_shape_problem(cfg["n_way"], cfg["k_spt"], cfg["k_qry"], cfg["task_num"])
    if problem is not None:
        names, what = problem
        return f"{' + '.join(flag(name) for name in names)} {what}"
    for key in ("update_lr", "meta_lr"):
        if not (math.isfinite(cfg[key]) and cfg[key] > 0):
            return f"{flag(key)} must be a positive number, got {cfg[key]}"
    for key in ("update_step", "update_step_test", "iterations", "eval_every", "eval_tasks", "test_tasks",
                "checkpoint_every", "step_accuracies_every"):
        if cfg[key] < 1:
            return f"{flag(key)} must be at least 1, got {cfg[key]}"
    for key, limit, why in (("eval_tasks", MAX_EVALUATION_TASKS, "the paper tests on 600"),
                            ("test_tasks", MAX_EVALUATION_TASKS, "the paper tests on 600"),
                            ("update_step", MAX_INNER_STEPS, "the paper takes 1 to 5"),
                            ("update_step_test", MAX_INNER_STEPS, "the paper takes 3 to 5")):
        if cfg[key] > limit:
            return f"{flag(key)} {cfg[key]} is more than {limit:,}, which would take hours ({why})"
    if not 0 <= cfg["seed"] < SEED_LIMIT:
        return f"--seed must be between 0 and {SEED_LIMIT - 1}, got {cfg['seed']}"
    return None


# ----------------------------------------------------------------------------------------------------
# Writing: atomic, and one writer per folder
# ----------------------------------------------------------------------------------------------------


def atomic_write(path, data):
    """Write bytes to path so that a reader (or a crash) sees the old file or the new one, never half."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise RunFileError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class FolderLock:
    """Holds `folder/.lock` with flock for as long as a process writes the folder.

    The kernel releases the lock when the process ends, however it ends, so a crash leaves no stale
    lock. The file keeps the holder's pid, so that a refused second process can name it. The holder
    removes the temporary files (atomic_write's NAME.PID.tmp) that killed processes left. A process
    that wrote nothing (refused data, Ctrl-C while loading) leaves nothing: the lock file goes, and the
    folder too when it was created for this process (created=True).
    """

    def __init__(self, folder, created=False):
        self.folder, self.created = folder, created
        self.path = os.path.join(folder, ".lock")
        self.file = None

    def __enter__(self):
        self.had_lock_file = os.path.exists(self.path)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise FolderInUse(f"--out {self.folder} is being written by {holder}: wait for it to finish, or "
                              f"choose another --out") from None
        self.file.truncate(0)
        self.file.write(f"process {os.getpid()} on {platform.node()}\n")
        self.file.flush()
        for name in os.listdir(self.folder):
            left = re.fullmatch(r".+\.(\d+)\.tmp", name)
            if left and not alive(int(left[1])):
                os.remove(os.path.join(self.folder, name))
        return self

    def __exit__(self, kind=None, error=None, traceback=None):
        if os.listdir(self.folder) == [".lock"] or (isinstance(error, Refused) and not self.had_lock_file):
            os.remove(self.path)  # nothing was written, or the folder was refused as it was found
            if self.created and not os.listdir(self.folder):
                os.rmdir(self.folder)
        self.file.close()  # releases the lock


def status_of(folder):
    """The status in folder/summary.json ("finished", "in progress"), or None when there is none."""
    try:
        with open(os.path.join(folder, FILES["summary"])) as f:
            return json.load(f).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def writable_folder(folder):
    """Make `folder` if needed and check that files can be written in it; Refused when not. Returns whether
    it was created."""
    created = not os.path.isdir(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}.tmp")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise Refused(f"--out {folder} cannot be written: {e.strerror or e}") from None
    return created


class RunFolder(FolderLock):
    """A training run's folder (--out), checked and locked for as long as the run writes it: it must be
    writable, must not hold a finished run (never written into again), and holds a checkpoint only with
    --resume. The checks are made under the lock, so that no other process changes the folder between
    them and the run. Under torchrun only rank 0 (writer=True) touches the folder; the others get a
    folder object that does nothing."""

    def __init__(self, folder, resume, writer=True):
        super().__init__(folder)
        self.resume, self.writer = resume, writer
        self.checkpoint_path = os.path.join(folder, FILES["checkpoint"])

    def __enter__(self):
        if not self.writer:
            return self
        self.created = writable_folder(self.folder)
        super().__enter__()
        try:
            if status_of(self.folder) == "finished":
                raise Refused(f"--out {self.folder} holds a finished run, which is never written into again: "
                              f"choose another --out")
            if not self.resume and os.path.exists(self.checkpoint_path):
                raise Refused(f"--out {self.folder} already holds {FILES['checkpoint']}: add --resume to continue "
                              f"that run, or choose another --out")
        except Refused as error:
            super().__exit__(Refused, error, None)
            raise
        return self

    def __exit__(self, *exc):
        if self.writer:
            super().__exit__(*exc)

    def resume_point(self, cfg):
        """With --resume, the checkpoint to continue from, checked (Refused when it cannot be used, leaving it
        untouched, before any data is loaded); None to start from the beginning, and on the other ranks."""
        if not (self.writer and self.resume):
            return None
        if not os.path.exists(self.checkpoint_path):
            print(f"--resume: no {self.checkpoint_path} yet, starting from the beginning", file=sys.stderr)
            return None
        try:
            checkpoint = read_checkpoint(self.checkpoint_path)
        except RunFileError as e:
            raise Refused(f"{e}; refusing to resume from it. It was left untouched: move it away to start over") \
                from None
        differ = [f"{key}: checkpoint {checkpoint['config'].get(key)!r}, now {cfg.get(key)!r}"
                  for key in sorted(set(checkpoint["config"]) | set(cfg))
                  if key not in NOT_LEARNED and checkpoint["config"].get(key) != cfg.get(key)]
        if differ:
            raise Refused(f"{self.checkpoint_path} was made with another configuration; refusing to resume ("
                          + "; ".join(differ) + ")")
        return checkpoint


class EvaluationFolder(FolderLock):
    """--evaluate's --out folder, where evaluation.json goes: writable, not a finished run's, and locked while
    evaluation.json is written, so that it never writes into a folder that a training run holds. Without
    --out (folder None) nothing is written."""

    def __init__(self, folder):
        super().__init__(folder or "")

    def __enter__(self):
        self.started = time.monotonic()
        if not self.folder:
            return self
        self.created = writable_folder(self.folder)
        super().__enter__()
        if status_of(self.folder) == "finished":  # checked under the lock, as RunFolder does
            error = Refused(f"--out {self.folder} holds a finished run, which is never written into again: "
                            f"choose another --out")
            super().__exit__(Refused, error, None)
            raise error
        return self

    def __exit__(self, *exc):
        if self.folder:
            super().__exit__(*exc)

    def write_evaluation(self, accs, ci95, split, model, cfg, segment):
        """evaluation.json (see the top of this file), from the accuracies, their intervals and the
        segment (new_segment) of the process that evaluated; wall_time_s counts from entering the folder
        (data loading included) to this write."""
        if not self.folder:
            return
        report = {"accs": [float(a) for a in accs], "ci95": [float(c) for c in ci95], "tasks": cfg["test_tasks"],
                  "split": split, "model": model, "config": cfg,
                  **{key: segment[key] for key in ("command", "git", "device", "computation", "torch", "python",
                                                   "started_utc")},
                  "wall_time_s": round(time.monotonic() - self.started, 3)}
        atomic_write(os.path.join(self.folder, EVALUATION_FILE), (json.dumps(report, indent=2) + "\n").encode())


# ----------------------------------------------------------------------------------------------------
# log.csv
# ----------------------------------------------------------------------------------------------------


def log_columns(cfg):
    n_steps = max(cfg["update_step"], cfg["update_step_test"]) + 1  # accuracies after 0..S inner steps
    return (["iteration", "split"] + [f"acc_step{s}" for s in range(n_steps)]
            + [f"ci95_step{s}" for s in range(n_steps)] + ["loss", "step_acc_iterations", "elapsed_s"])


def make_row(iteration, split, accs, ci95, loss, elapsed, step_acc_iterations=None):
    """A log row. Numbers are python floats, written with repr: exact, so logs compare bit for bit."""
    row = {"iteration": iteration, "split": split, "loss": "" if loss is None else float(loss),
           "step_acc_iterations": "" if step_acc_iterations is None else int(step_acc_iterations),
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


def last_row(rows, split):
    """The last row of `split` in a log (rows as make_row or read_log give them), or None."""
    return next((row for row in reversed(rows) if row["split"] == split), None)


# ----------------------------------------------------------------------------------------------------
# The state of a run, its segments, and summary.json
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunState:
    """Where a run stands: everything of it that is not the network, the optimizer or an RNG.

    window holds the running sums of the train row being accumulated: of the accuracies after each inner step
    (those before the last summed over the step_count iterations that measured them), of the loss, and the
    iterations, count. elapsed_s counts the training,
    validation and test seconds of all segments, train_s only the sampling and meta-steps. segments has
    one entry per process that ran part of the run (new_segment), the last one this process's.
    """

    update_step: int
    iteration: int = 0
    log: list = dataclasses.field(default_factory=list)
    window: dict = None
    elapsed_s: float = 0.0
    train_s: float = 0.0
    segments: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.window is None:
            self.empty_window()
        # A window from a checkpoint written before the step accuracies were sampled measured them every time.
        self.window.setdefault("step_count", self.window["count"])

    def empty_window(self):
        self.window = {"accs": np.zeros(self.update_step + 1), "loss": 0.0, "count": 0, "step_count": 0}

    def start_segment(self, segment):
        """Begin this process's segment: its clock starts now, from the seconds the run already had."""
        self.segments.append(segment)
        self._clock_start, self._elapsed_before = time.monotonic(), self.elapsed_s

    def elapsed(self):
        return self._elapsed_before + time.monotonic() - self._clock_start

    def advance(self, iteration):
        """Bring the iteration, the seconds and this process's segment up to now."""
        self.iteration, self.elapsed_s = iteration, self.elapsed()
        self.segments[-1].update(to_iteration=iteration, wall_time_s=round(self.elapsed_s - self._elapsed_before, 3))

    def fields(self):
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


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
    """The GPU's name; for the CPU, its model name with its family and model numbers and the vector
    instructions that PyTorch's CPU kernels use (torch.backends.cpu.get_cpu_capability()), e.g. "AMD EPYC
    (family 25, model 1, AVX2)". A virtual machine's model name alone can hide which processor it is: one
    "AMD EPYC" here has AVX-512 and another only AVX2, and the kernels, so the rounding and the speed,
    differ between them."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    numbers = [f"family {fields['cpu family']}, model {fields['model']}"] if "cpu family" in fields else []
    return f"{name} ({', '.join(numbers + [torch.backends.cpu.get_cpu_capability()])})"


def computation(cfg, meta_learner, cuda_graph):
    """How this process computes, as its segment records it: the tasks batched or one by one in the
    meta-step and finetunning, or the meta-step compiled (MetaLearner.path); how many task threads share the
    meta-step's tasks (meta.task_threads); and whether the meta-step is one CUDA graph (on CUDA, unless
    --no-cuda-graph, and not under torchrun, whose all-reduce runs between the backward pass and the Adam
    step). The training loop reads cuda_graph from here: it does what is recorded. And every how many
    iterations the train rows' accuracies before the last inner step are measured (--step-accuracies-every;
    1 with a CUDA graph, which measures them at every replay)."""
    device = torch.device(cfg["device"])
    images_per_task = cfg["n_way"] * (cfg["k_spt"] + cfg["k_qry"])
    joined = dist.is_available() and dist.is_initialized()
    path = meta_learner.path(device, images_per_task)
    graphed = cuda_graph and device.type == "cuda" and not joined
    return {"tasks": path, "task_threads": task_threads(device), "cuda_graph": graphed,
            "step_accuracies_every": 1 if graphed else cfg["step_accuracies_every"]}


def new_segment(iteration, cfg, command, computation):
    """The record of one process that runs part of the run, from `iteration` on: what ran, where, when.

    A run resumed across machines, thread counts, numbers of processes or commits is still one run, but it
    was not produced by one command at one commit; its summary.json lists every segment, so that nothing is
    hidden. Under torchrun, device is rank 0's, and processes and backend say how many shared the work and how
    they talked (distributed.py); without it they are 1 and null. computation says how the process computes
    (computation() above: the tasks batched, one by one or compiled, the meta-step as a CUDA graph or not);
    a segment that compiled its meta-step (on the CPU, unless --no-compile) adds compile_s, the seconds that
    took. On CUDA the device also records the cuDNN version and whether convolutions (cuDNN) and matrix
    products may round their inputs to TF32, which changes the numbers.
    """
    joined = dist.is_available() and dist.is_initialized()
    device = {"type": torch.device(cfg["device"]).type, "name": device_description(cfg["device"]),
              "cpu_threads": torch.get_num_threads(), "processes": dist.get_world_size() if joined else 1,
              "backend": dist.get_backend() if joined else None}
    if device["type"] == "cuda":
        device.update(cudnn=torch.backends.cudnn.version(), tf32_cudnn=torch.backends.cudnn.allow_tf32,
                      tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return {"from_iteration": iteration, "to_iteration": iteration, "command": command, "git": git_info(),
            "device": device, "computation": computation, "torch": torch.__version__,
            "python": platform.python_version(), "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "wall_time_s": 0.0}


def describe_changes(previous, current):
    """What differs between two segments in ways that change floating-point rounding (or the code), or what
    the train rows measure (computation's step_accuracies_every).
    Segments written before computation was recorded lack it: that shows as "not recorded"."""
    changes = []
    if previous["git"]["commit"] != current["git"]["commit"]:
        changes.append(f"commit {str(previous['git']['commit'])[:10]} -> {str(current['git']['commit'])[:10]}")
    for key in ("name", "cpu_threads", "cudnn", "tf32_cudnn", "tf32_matmul"):
        if previous["device"].get(key) != current["device"].get(key):
            changes.append(f"{key.replace('_', ' ')} {previous['device'].get(key)} -> {current['device'].get(key)}")
    processes = [segment["device"].get("processes", 1) for segment in (previous, current)]  # older segments: 1
    if processes[0] != processes[1]:
        changes.append(f"processes {processes[0]} -> {processes[1]}")
    before, now = previous.get("computation") or {}, current.get("computation") or {}
    for key in sorted(before.keys() | now.keys()):
        if before.get(key) != now.get(key):
            changes.append(f"{key.replace('_', ' ')} {before.get(key, 'not recorded')} -> "
                           f"{now.get(key, 'not recorded')}")
    if previous["torch"] != current["torch"]:
        changes.append(f"torch {previous['torch']} -> {current['torch']}")
    return changes


DIVERGED_LOSS = 10  # a train row whose meta-loss is this many times ln(N), a uniform guess's, has diverged


def divergence(cfg, loss):
    """The warning when a train row's meta-loss says the meta-training diverged (finite, but far above a
    uniform guess's ln N), or None. Non-finite numbers stop the run instead (MetaLearner.forward)."""
    if loss <= DIVERGED_LOSS * math.log(cfg["n_way"]):
        return None
    return (f"the meta-loss, {loss:.3g}, is more than {DIVERGED_LOSS} times a uniform guess's "
            f"({math.log(cfg['n_way']):.2f}): the meta-training has diverged, try a smaller --update-lr or --meta-lr")


def divergence_warnings(cfg, log):
    """A finished run's summary.json "warnings": that of the last train row in the log that diverged, if any."""
    return [w for w in (divergence(cfg, row["loss"]) for row in log if row["split"] == "train") if w][-1:]


def write_summary(path, cfg, state, test_accs=None, test_ci=None, warnings=()):
    """summary.json: "in progress" after every checkpoint (describing exactly the checkpoint), then
    "finished" with the test accuracies. The top-level command, git, versions and device are those of
    the latest segment; "segments" has them all. wall_time_s counts training, validation and test over
    all segments (not start-up, data loading, or the work lost after a checkpoint); meta_iterations_per_s
    divides the iterations done by the time spent sampling tasks and taking meta-steps."""
    finished = test_accs is not None
    steps = range(cfg["update_step_test"] + 1)
    last_val = last_row(state.log, "val")
    latest = state.segments[-1]
    summary = {
        "status": "finished" if finished else "in progress",
        "iteration": state.iteration,
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
        "segments": state.segments,
        "wall_time_s": round(state.elapsed_s, 3),
        "train_time_s": round(state.train_s, 3),
        "meta_iterations_per_s": round(state.iteration / state.train_s, 3) if state.train_s else None,
    }
    if warnings:
        summary["warnings"] = list(warnings)
    atomic_write(path, (json.dumps(summary, indent=2) + "\n").encode())


# ----------------------------------------------------------------------------------------------------
# Stopping on a signal: at the end of the iteration, with a checkpoint
# ----------------------------------------------------------------------------------------------------


class StopRequested:
    """SIGINT and SIGTERM while training: say so at once, finish the iteration (and its validation),
    checkpoint it and exit with 128 + the signal number. The training loop reads `signum` at the end of
    every iteration, and calls end_run() once it has checkpointed. Once `at_once` names what runs (the final
    test, after the last checkpoint), a signal stops it at once instead, as KeyboardInterrupt."""

    def __init__(self, writer):
        self.writer, self.signum, self.at_once, self.previous = writer, None, None, {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def handle(self, signum, frame):
        if self.at_once:
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} during {self.at_once}")
        if self.signum is None and self.writer:
            tqdm.write(f"{signal.Signals(signum).name}: stopping after this iteration (and its validation, if it "
                       f"has one), with a checkpoint", file=sys.stderr)
        self.signum = signum

    def end_run(self, signum, iteration, checkpoint_path):
        """Stop the run, checkpointed at `iteration`, for signal signum (this process's or another's)."""
        if self.writer:
            tqdm.write(f"{signal.Signals(signum).name} at iteration {iteration}: checkpoint saved to "
                       f"{checkpoint_path}; continue with the same command and --resume", file=sys.stderr)
        raise SystemExit(128 + signum)

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


# ----------------------------------------------------------------------------------------------------
# checkpoint.pt and model.pt
# ----------------------------------------------------------------------------------------------------


def digest(value):
    """SHA-256 of a nest of dicts, lists, tuples, tensors, numpy arrays and plain values: their contents,
    not their pickled bytes, so that the digest of what was loaded can be compared with the one saved."""
    sha = hashlib.sha256()

    def feed(v):
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().contiguous()
            sha.update(f"tensor {v.dtype} {tuple(v.shape)}:".encode())
            sha.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(v, np.ndarray):
            sha.update(f"array {v.dtype} {v.shape}:".encode() + np.ascontiguousarray(v).tobytes())
        elif isinstance(v, dict):
            sha.update(b"{")
            for key, item in v.items():
                feed(key)
                feed(item)
            sha.update(b"}")
        elif isinstance(v, (list, tuple)):
            sha.update(b"[")
            for item in v:
                feed(item)
            sha.update(b"]")
        else:
            sha.update(f"{type(v).__name__} {v!r};".encode())

    feed(value)
    return sha.hexdigest()


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


def save_with_digest(path, contents):
    buf = io.BytesIO()
    torch.save(dict(contents, digest=digest(contents)), buf)
    atomic_write(path, buf.getvalue())


def theta_of_net(net_state):
    """θ as MetaLearner.state_dict() names it, from a BaseNet state_dict of the older formats ("vars.i")."""
    return {"net.weights." + key.removeprefix("vars."): value for key, value in net_state.items()}


def upgrade_checkpoint_3(contents):
    contents["theta"] = theta_of_net(contents.pop("net"))
    return contents


def upgrade_model_1(contents):
    contents["theta"] = theta_of_net(contents.pop("state_dict"))
    return contents


KIND_MARKS = {FILES["checkpoint"]: "sampler", FILES["model"]: "param_names"}  # a key that only this kind of file has
# The older formats still read, by file: {format: (the keys it has, the function that makes it today's)}.
UPGRADES = {
    FILES["checkpoint"]: {3: (("format", "config", "run", "net", "meta_optim", "rng", "sampler", "digest"),
                                upgrade_checkpoint_3)},
    FILES["model"]: {1: (("format", "config", "param_names", "state_dict", "digest"), upgrade_model_1)},
}


def load_with_digest(path, kind, keys, fmt, weights_only, last_readers=None):
    """torch.load a file written by save_with_digest and check it: its format, keys and digest; then upgrade
    an older format (UPGRADES) and complete its config (ADDED_CONFIG). kind names the file for messages;
    last_readers names, for a format too old to upgrade, the last commit that reads it. Raises RunFileError."""
    try:
        contents = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # a truncated zip, random bytes, a foreign pickle: all refused the same way
        if "Weights only load failed" in str(e) and zipfile.is_zipfile(path):  # a torch.save of more than tensors
            raise RunFileError(f"{path} is not a {kind}: it holds objects that a {kind} never does (a "
                               f"checkpoint.pt? {kind} is what a run writes when it finishes)") from None
        reason = re.sub(r"\x1b\[[0-9;]*m", "", (str(e).strip().splitlines() or [""])[0])  # no terminal colours
        raise RunFileError(f"{path} is corrupt or truncated, or not a {kind} ({type(e).__name__}: "
                           f"{reason[:100]})") from None
    other = next((name for name, mark in KIND_MARKS.items() if name != kind and isinstance(contents, dict)
                  and mark in contents), None)
    if other is not None:
        hint = ("--evaluate it, or give the run's checkpoint.pt" if other == FILES["model"]
                else "a run writes model.pt when it finishes")
        raise RunFileError(f"{path} is a {other}, not a {kind}: {hint}")
    found_format = contents.get("format") if isinstance(contents, dict) else None
    if found_format in (last_readers or {}):
        raise RunFileError(f"{path} was written by an older maml_omniglot.py (format {found_format}); use it "
                           f"with commit {last_readers[found_format]}, the last that reads it, or move it away")
    upgrades = UPGRADES[kind]
    if not isinstance(contents, dict) or (found_format != fmt and found_format not in upgrades):
        found = found_format if isinstance(contents, dict) else type(contents).__name__
        raise RunFileError(f"{path} is corrupt or truncated (not a format-{fmt} file of maml_omniglot.py: "
                           f"format {found!r})")
    expected, upgrade = upgrades.get(found_format, (keys, None))
    missing = [key for key in expected if key not in contents]
    if missing:
        raise RunFileError(f"{path} is corrupt or truncated (it lacks {', '.join(missing)})")
    saved = contents.pop("digest")
    if digest(contents) != saved:
        raise RunFileError(f"{path} is corrupt or truncated (its contents do not match their SHA-256 digest)")
    if upgrade is not None:
        contents = upgrade(contents)
    contents["config"] = dict(ADDED_CONFIG, **contents["config"])
    return contents


def write_checkpoint(path, cfg, state, meta_learner, sampler):
    """The whole training state, CHECKPOINT_KEYS: enough to continue the run exactly."""
    save_with_digest(path, {
        "format": CHECKPOINT_FORMAT, "config": cfg, "run": state.fields(), "theta": meta_learner.state_dict(),
        "meta_optim": meta_learner.meta_optim.state_dict(), "rng": rng_states(), "sampler": sampler.state_dict()})


def restore(checkpoint, meta_learner, sampler):
    """Put a run back where read_checkpoint's checkpoint left it: θ, Adam's state, the sampler, every RNG.
    Returns its RunState."""
    meta_learner.load_state_dict(checkpoint["theta"])
    meta_learner.meta_optim.load_state_dict(checkpoint["meta_optim"])
    sampler.load_state_dict(checkpoint["sampler"])
    set_rng_states(checkpoint["rng"])
    return RunState(**checkpoint["run"])


def read_checkpoint(path):
    """Read and check a checkpoint: the one reader of what write_checkpoint writes (of any format it still
    upgrades). A checkpoint is a pickle (it holds numpy's RNG state): load only your own. Raises RunFileError."""
    return load_with_digest(path, FILES["checkpoint"], CHECKPOINT_KEYS, CHECKPOINT_FORMAT, weights_only=False,
                            last_readers=CHECKPOINT_LAST_READERS)


def write_model(path, cfg, meta_learner):
    """model.pt: θ and the config it was trained with; weights_only-loadable."""
    save_with_digest(path, {"format": MODEL_FORMAT, "config": cfg, "param_names": list(meta_learner.net.param_names),
                            "theta": meta_learner.state_dict()})


def read_model(path):
    """Read and check a model.pt with torch.load(weights_only=True). Raises RunFileError."""
    if not os.path.isfile(path):
        raise RunFileError(f"{path} is not a file: give the model.pt of a finished run")
    return load_with_digest(path, FILES["model"], MODEL_KEYS, MODEL_FORMAT, weights_only=True)
