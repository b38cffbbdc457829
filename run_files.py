"""The files of a run: what maml_omniglot.py writes into its output folder, and how.

A run's folder (--out, runs/<setting>/ by default) holds:

  log.csv        one row per logged point, in this column order:
                   iteration     the meta-iteration the row describes
                   split         train, val or test
                   acc_step0..S  mean query accuracy after 0..S inner steps, as fractions; S is the larger
                                 of update_step and update_step_test, and the cells beyond a row's own
                                 steps are left empty
                   ci95_step0..S the 95% interval half-widths of those (val and test rows)
                   loss          train rows: the meta-loss, the query cross-entropy
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
                 produced it.
                 A folder whose summary says "finished" is never written into again.
  curves.png     drawn from log.csv by curves.py.
  checkpoint.pt  everything needed to continue the run exactly (CHECKPOINT_KEYS below), written every
                 --checkpoint-every iterations, at the last one, and on SIGINT/SIGTERM.
  model.pt       the trained network, written when the run finishes: {"format", "config",
                 "param_names", "state_dict", "digest"}, tensors and plain values only, so that
                 torch.load(path, weights_only=True) reads it. state_dict is BaseNet's (its parameters
                 "vars.0", "vars.1", ... are the param_names, in order: conv1.weight, bn1.weight, ...).
  .lock          held (flock) by the process writing the folder, so that two runs never write one folder.

Every file is written atomically: to a temporary name of this process beside it, then renamed over the
old one, so a reader or a crash sees the old file or the new one, never half of one. A write that fails
(a full disk) removes its temporary file and raises RunFileError. checkpoint.pt and model.pt carry a
digest (SHA-256) of their contents, checked when they are read: a flipped bit is refused, not trained on.

On CPU, the same command on the same machine gives a bit-identical log.csv, also across a SIGKILL and
--resume, in every column except elapsed_s (wall-clock time cannot repeat).
"""

import csv
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import platform
import random
import subprocess
import time

import numpy as np
import torch
import torch.distributed as dist

CHECKPOINT_FORMAT = 3  # 3: one "run" entry (RunState) and a digest
CHECKPOINT_LAST_READERS = {1: "1e6d682", 2: "bf074d8"}  # older formats: the last commit that resumes them
CHECKPOINT_KEYS = ("format", "config", "run", "net", "meta_optim", "rng", "sampler", "digest")
FILES = {"log": "log.csv", "summary": "summary.json", "curves": "curves.png", "checkpoint": "checkpoint.pt",
         "model": "model.pt"}  # a run folder's files, by what they are
MODEL_FORMAT = 1
MODEL_KEYS = ("format", "config", "param_names", "state_dict", "digest")


class RunFileError(Exception):
    """A run file that cannot be written, or read back as what it should be. The message is one line."""


class FolderInUse(RunFileError):
    """Another process holds the folder's lock."""


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


class FolderLock:
    """Holds `folder/.lock` with flock for as long as a run writes the folder.

    The kernel releases the lock when the process ends, however it ends, so a crash leaves no stale
    lock. The file keeps the holder's pid, so that a refused second run can name it. A run that wrote
    nothing (refused data, Ctrl-C while loading) leaves nothing: the lock file goes, and the folder too
    when this run created it (created=True).
    """

    def __init__(self, folder, created=False):
        self.folder, self.created = folder, created
        self.path = os.path.join(folder, ".lock")
        self.file = None

    def __enter__(self):
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
        return self

    def __exit__(self, *exc):
        if os.listdir(self.folder) == [".lock"]:
            os.remove(self.path)
            if self.created:
                os.rmdir(self.folder)
        self.file.close()  # releases the lock


def status_of(folder):
    """The status in folder/summary.json ("finished", "in progress"), or None when there is none."""
    try:
        with open(os.path.join(folder, "summary.json")) as f:
            return json.load(f).get("status")
    except (OSError, ValueError, AttributeError):
        return None


# ----------------------------------------------------------------------------------------------------
# log.csv
# ----------------------------------------------------------------------------------------------------


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


def last_row(rows, split):
    """The last row of `split` in a log (rows as make_row or read_log give them), or None."""
    return next((row for row in reversed(rows) if row["split"] == split), None)


# ----------------------------------------------------------------------------------------------------
# The state of a run, its segments, and summary.json
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunState:
    """Where a run stands: everything of it that is not the network, the optimizer or an RNG.

    window holds the running sums of the train row being accumulated. elapsed_s counts the training,
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

    def empty_window(self):
        self.window = {"accs": np.zeros(self.update_step + 1), "loss": 0.0, "count": 0}

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


def new_segment(iteration, cfg, command, computation):
    """The record of one process that runs part of the run, from `iteration` on: what ran, where, when.

    A run resumed across machines, thread counts, numbers of processes or commits is still one run, but it
    was not produced by one command at one commit; its summary.json lists every segment, so that nothing is
    hidden. Under torchrun, device is rank 0's, and processes and backend say how many shared the work and how
    they talked (distributed.py); without it they are 1 and null. computation says how the process computes
    (maml_omniglot.py's computation(): the tasks batched or one by one, the meta-step as a CUDA graph or
    not). On CUDA the device also records the cuDNN version and whether convolutions (cuDNN) and matrix
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
    """What differs between two segments in ways that change floating-point rounding (or the code).
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


def write_summary(path, cfg, state, test_accs=None, test_ci=None):
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
    atomic_write(path, (json.dumps(summary, indent=2) + "\n").encode())


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


def load_with_digest(path, kind, keys, fmt, weights_only, last_readers=None):
    """torch.load a file written by save_with_digest and check it: its format, keys and digest.
    kind names the file for messages; last_readers names, for an older format, the last commit that reads it.
    Raises RunFileError."""
    try:
        contents = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # a truncated zip, random bytes, a foreign pickle: all refused the same way
        reason = (str(e).strip().splitlines() or [""])[0]
        raise RunFileError(f"{path} is corrupt or truncated, or not a {kind} ({type(e).__name__}: "
                           f"{reason[:100]})") from None
    found_format = contents.get("format") if isinstance(contents, dict) else None
    if found_format in (last_readers or {}):
        raise RunFileError(f"{path} was written by an older maml_omniglot.py (format {found_format}); use it "
                           f"with commit {last_readers[found_format]}, the last that reads it, or move it away")
    if not isinstance(contents, dict) or contents.get("format") != fmt:
        found = contents.get("format") if isinstance(contents, dict) else type(contents).__name__
        raise RunFileError(f"{path} is corrupt or truncated (not a format-{fmt} file of maml_omniglot.py: "
                           f"format {found!r})")
    missing = [key for key in keys if key not in contents]
    if missing:
        raise RunFileError(f"{path} is corrupt or truncated (it lacks {', '.join(missing)})")
    saved = contents.pop("digest")
    if digest(contents) != saved:
        raise RunFileError(f"{path} is corrupt or truncated (its contents do not match their SHA-256 digest)")
    return contents


def write_checkpoint(path, cfg, state, meta_learner, sampler):
    """The whole training state, CHECKPOINT_KEYS: enough to continue the run exactly."""
    save_with_digest(path, {
        "format": CHECKPOINT_FORMAT, "config": cfg, "run": state.fields(), "net": meta_learner.net.state_dict(),
        "meta_optim": meta_learner.meta_optim.state_dict(), "rng": rng_states(), "sampler": sampler.state_dict()})


def read_checkpoint(path):
    """Read and check a checkpoint: the one reader of what write_checkpoint writes. A checkpoint is a
    pickle (it holds numpy's RNG state): load only your own. Raises RunFileError."""
    return load_with_digest(path, "checkpoint.pt", CHECKPOINT_KEYS, CHECKPOINT_FORMAT, weights_only=False,
                            last_readers=CHECKPOINT_LAST_READERS)


def write_model(path, cfg, net):
    """model.pt: the trained network and the config it was trained with; weights_only-loadable."""
    save_with_digest(path, {"format": MODEL_FORMAT, "config": cfg, "param_names": list(net.param_names),
                            "state_dict": net.state_dict()})


def read_model(path):
    """Read and check a model.pt with torch.load(weights_only=True). Raises RunFileError."""
    if not os.path.isfile(path):
        raise RunFileError(f"{path} is not a file: give the model.pt of a finished run")
    return load_with_digest(path, "model.pt", MODEL_KEYS, MODEL_FORMAT, weights_only=True)
