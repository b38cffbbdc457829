"""Second-order MAML (Finn et al. 2017) on Omniglot: the experiment.

The paper's four Omniglot settings (its Table 1), each 60,000 meta-iterations:

    python maml_omniglot.py --setting 5w1s     # 5-way 1-shot (the default)   paper: 98.7 ± 0.4 %
    python maml_omniglot.py --setting 5w5s     # 5-way 5-shot                 paper: 99.9 ± 0.1 %
    python maml_omniglot.py --setting 20w1s    # 20-way 1-shot                paper: 95.8 ± 0.3 %
    python maml_omniglot.py --setting 20w5s    # 20-way 5-shot                paper: 98.9 ± 0.2 %

and the other things it does:

    python maml_omniglot.py --out DIR --resume          # continue an interrupted run from DIR/checkpoint.pt
    python maml_omniglot.py --evaluate DIR/model.pt     # test a trained network again (more steps, tasks, K)
    python maml_omniglot.py --plot-only DIR             # redraw DIR/curves.png from DIR/log.csv
    torchrun --standalone --nproc_per_node=P maml_omniglot.py ...   # each meta-batch split over P processes

A run writes into runs/<setting>/ (git-ignored): log.csv, summary.json, curves.png, checkpoint.pt, and
model.pt when it finishes; run_files.py says what each file holds (and checks the folder, the resume and
the checkpoint, and stops a run at a checkpoint on a signal) and what the config they record is: the
settings' values (SETTINGS, the paper's appendix), the defaults of the other flags, and the limits and
checks of every value. distributed.py says how torchrun's processes share a run. results/ holds published
runs only (python results_table.py --publish). This file reads top to bottom: run(), which tells the whole
story in a few lines; the training loop; evaluation; then the command line, whose main() turns every
expected failure into one line.
"""
import csv
import math
import os
import random
import shlex
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import distributed
import run_files
from cuda_graph import GraphedMetaStep
from curves import curves_png
from distributed import DistributedError
from meta import MetaLearner, NonFiniteError
from omniglot_nshot import OmniglotNShot
from preprocess_omniglot import PreprocessError
from run_files import (EVALUATE_FLAGS, FILES, SETTINGS, Parser, Refused, RunFileError, RunState, flag, make_row,
                       new_segment, write_log)

# ----------------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------------


def run(cfg, resume, command, cuda_graph, compiled):
    """The experiment: the output folder (checked and locked), start or resume, train, test, report.

    Under torchrun only rank 0 touches the folder: it checks it, locks it, reads the checkpoint and sends
    it to the others, and writes every file."""
    paths = {key: os.path.join(cfg["out"], name) for key, name in FILES.items()}
    writer = distributed.writer()
    with run_files.RunFolder(cfg["out"], resume, writer) as folder:
        checkpoint = distributed.from_rank_0(folder.resume_point(cfg), "the checkpoint")
        sampler, meta_learner, state = start_or_resume(cfg, checkpoint, command, cuda_graph, compiled)
        with run_files.StopRequested(writer) as stop:
            train(cfg, meta_learner, sampler, state, paths, stop)
            stop.at_once = "the final test"  # nothing is lost: the checkpoint is at the last iteration
            test_accs, test_ci = evaluate(meta_learner, sampler, "test", cfg["test_tasks"])
        if writer:
            return finish(cfg, meta_learner, state, paths, test_accs, test_ci)
    return 0


def sampler_and_meta_learner(cfg):
    """The run's sampler and meta-learner, built from its config after every RNG is seeded (in this order:
    the network's initial weights are drawn from the seeded torch RNG). The sampler loads the data, and
    builds data/omniglot.npy first if it is missing."""
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    sampler = OmniglotNShot(path=cfg["data"], task_num=cfg["task_num"], n_way=cfg["n_way"], k_spt=cfg["k_spt"],
                            k_qry=cfg["k_qry"], device=cfg["device"], seed=cfg["seed"], rotate=cfg["rotate"])
    meta_learner = MetaLearner(
        n_way=cfg["n_way"], k_spt=cfg["k_spt"], update_lr=cfg["update_lr"], meta_lr=cfg["meta_lr"],
        update_step=cfg["update_step"], update_step_test=cfg["update_step_test"], first_order=cfg["first_order"],
        reduce=distributed.average_meta_step if distributed.launched() else None).to(cfg["device"])
    return sampler, meta_learner


def start_or_resume(cfg, checkpoint, command, cuda_graph, compiled):
    """The sampler, the meta-learner and the run's state: fresh from the seed, or as the checkpoint left them.
    On the CPU the compiled meta-step is built here (compiles(), below), before the segment records how it
    computes."""
    sampler, meta_learner = sampler_and_meta_learner(cfg)
    compile_s = None
    if compiled:  # MetaLearner's batching "compiled", its function built now, once per process
        if distributed.writer():
            print("compiling the meta-step (torch.compile: minutes on a CPU the first time, seconds from its cache; "
                  "--no-compile runs it eagerly)", file=sys.stderr)
        meta_learner.batching = "compiled"
        compile_s = meta_learner.compile_meta_step(cfg["n_way"], cfg["k_spt"], cfg["k_qry"])
    state = RunState(update_step=cfg["update_step"])
    if checkpoint is not None:
        state = run_files.restore(checkpoint, meta_learner, sampler)
        if distributed.writer():
            print(f"resuming from {os.path.join(cfg['out'], FILES['checkpoint'])} at iteration {state.iteration}",
                  file=sys.stderr)
    segment = new_segment(state.iteration, cfg, command, run_files.computation(cfg, meta_learner, cuda_graph))
    state.start_segment(segment if compile_s is None else dict(segment, compile_s=round(compile_s, 1)))
    changes = run_files.describe_changes(*state.segments[-2:]) if len(state.segments) > 1 else []
    if changes and distributed.writer():
        print(f"note: this segment differs from the previous one ({'; '.join(changes)}): the run continues "
              f"correctly, but not bit for bit as it would have; summary.json records both", file=sys.stderr)
    return sampler, meta_learner, state


def train(cfg, meta_learner, sampler, state, paths, stop):
    """Meta-train from state.iteration to cfg["iterations"]: meta-steps, train rows, validation, checkpoints.

    Each checkpoint is followed by an "in progress" summary.json that describes exactly what it holds.
    A SIGINT or SIGTERM (`stop`) finishes the iteration, checkpoints it and exits with 128 + the signal
    number. Under torchrun every process runs this loop on its share of the tasks, and only rank 0 writes
    and reports.
    """
    writer = distributed.writer()

    def validate(iteration):
        accs, ci95 = evaluate(meta_learner, sampler, "val", cfg["eval_tasks"])
        state.log.append(make_row(iteration, "val", accs, ci95, None, state.elapsed()))
        if writer:  # log.csv, and the curves drawn from it, so that a long run can be watched
            write_log(paths["log"], state.log, cfg)
            draw_curves(cfg["out"])
        return accs[-1]

    def checkpoint_and_maybe_stop(iteration):
        signum = distributed.largest(stop.signum or 0, "the stop signal")  # a signal to one process stops all
        if iteration % cfg["checkpoint_every"] == 0 or iteration == cfg["iterations"] or signum:
            distributed.check_identical(meta_learner.state_dict(), f"the meta-parameters at iteration {iteration}")
            state.advance(iteration)
            if writer:
                run_files.write_checkpoint(paths["checkpoint"], cfg, state, meta_learner, sampler)
                run_files.write_summary(paths["summary"], cfg, state)
        if signum:
            stop.end_run(signum, iteration, paths["checkpoint"])

    val_row = run_files.last_row(state.log, "val")
    val_acc = val_row[f"acc_step{cfg['update_step_test']}"] if val_row else float("nan")
    ema = None
    meta_step = GraphedMetaStep(meta_learner) if state.segments[-1]["computation"]["cuda_graph"] else meta_learner
    with tqdm(total=cfg["iterations"], initial=state.iteration, unit="it", dynamic_ncols=True,
              desc=f"{cfg['n_way']}-way {cfg['k_spt']}-shot", disable=not writer) as bar:
        if state.iteration == 0 and not state.log:  # the untrained initialisation, for reference
            val_acc = validate(0)
            checkpoint_and_maybe_stop(0)
        for iteration in range(state.iteration + 1, cfg["iterations"] + 1):
            # The meta-step (MetaLearner.forward, or its CUDA graph): adapt every task on its support set, take
            # the query loss of the adapted weights, backpropagate through the adaptation, one Adam step on θ.
            # Under torchrun, on this process's share of the tasks, with the meta-gradients averaged.
            started = time.monotonic()
            x_spt, y_spt, x_qry, y_qry = distributed.my_tasks(sampler.next("train"))
            logs = iteration % cfg["eval_every"] == 0 or iteration == cfg["iterations"]  # ends a train row
            try:
                loss, accs = meta_step(x_spt, y_spt, x_qry, y_qry,
                                       step_accuracies=logs or iteration % cfg["step_accuracies_every"] == 0)
            except NonFiniteError as e:
                raise NonFiniteError(f"{e} at iteration {iteration}") from None
            state.train_s += time.monotonic() - started

            # The train row: the average of the meta-batches since the last one, the accuracies before the
            # last inner step over the meta-batches that measured them (NaN in the others: MetaLearner.forward).
            accs = np.asarray(accs, dtype=np.float64)
            measured = int(not np.isnan(accs[0]))
            state.window["accs"] = state.window["accs"] + np.nan_to_num(accs, nan=0.0)
            state.window["step_count"] += measured
            state.window["loss"] += loss
            state.window["count"] += 1
            ema = accs[-1] if ema is None else 0.98 * ema + 0.02 * accs[-1]

            # Every eval_every iterations: log the train row, validate, rewrite log.csv and curves.png.
            if logs:
                window = state.window
                train_accs = np.append(window["accs"][:-1] / window["step_count"], window["accs"][-1] / window["count"])
                train_loss = window["loss"] / window["count"]
                state.log.append(make_row(iteration, "train", train_accs, None, train_loss, state.elapsed(),
                                          window["step_count"]))
                state.empty_window()
                val_acc = validate(iteration)
                if writer:
                    warning = run_files.divergence(cfg, train_loss)
                    tqdm.write(f"iteration {iteration}: query accuracy train {train_accs[-1]:.3f} (after "
                               f"{steps(cfg['update_step'])}), val {val_acc:.3f} (after "
                               f"{steps(cfg['update_step_test'])})" + (f"; warning: {warning}" if warning else ""))
            bar.set_postfix(train_acc=f"{ema:.3f}", val_acc=f"{val_acc:.3f}", refresh=False)
            bar.update(1)

            # Every checkpoint_every iterations, at the last, and on a signal: checkpoint (and stop).
            checkpoint_and_maybe_stop(iteration)


def steps(n):
    return f"{n} inner step{'s' * (n != 1)}"


def finish(cfg, meta_learner, state, paths, test_accs, test_ci):
    """Write what a finished run leaves: the log with its test row, model.pt, the summary, the curves."""
    state.advance(cfg["iterations"])
    test_row = make_row(cfg["iterations"], "test", test_accs, test_ci, None, state.elapsed_s)
    write_log(paths["log"], state.log + [test_row], cfg)
    run_files.write_model(paths["model"], cfg, meta_learner)
    warnings = run_files.divergence_warnings(cfg, state.log)
    run_files.write_summary(paths["summary"], cfg, state, test_accs, test_ci, warnings)  # "finished": closed now
    print(f"test accuracy over {cfg['test_tasks']} tasks, after 0..{cfg['update_step_test']} inner steps: "
          + ", ".join(f"{100 * a:.2f}% ± {100 * c:.2f}" for a, c in zip(test_accs, test_ci))
          + "".join(f" (warning: {w})" for w in warnings))
    try:
        draw_curves(cfg["out"])
    except RunFileError as e:
        print(f"maml_omniglot.py: error: {e}; the run has finished (its summary.json and model.pt are written): "
              f"python maml_omniglot.py --plot-only {cfg['out']} draws curves.png", file=sys.stderr)
        return 1
    return 0


def draw_curves(folder):
    """folder/curves.png, drawn by curves.py from folder/log.csv and titled with the folder's name."""
    title = os.path.basename(os.path.normpath(folder))
    run_files.atomic_write(os.path.join(folder, FILES["curves"]),
                           curves_png(run_files.read_log(os.path.join(folder, FILES["log"])), title))


# ----------------------------------------------------------------------------------------------------
# Evaluation: adapt to fresh tasks without touching the meta-parameters
# ----------------------------------------------------------------------------------------------------


def evaluate(meta_learner, sampler, split, n_tasks):
    """Per-step query accuracy on the first n_tasks tasks of `split`: (mean, 95% interval), numpy arrays.

    The split's sampler is reset first, so every validation sees the same tasks (curves are comparable)
    and evaluating never changes the training tasks. The interval is 1.96 * std / sqrt(n) over tasks,
    with numpy's std (ddof=0), as in the reference code. Under torchrun each process adapts its share of
    every batch, and they exchange the results.
    """
    sampler.reset(split)
    per_task = []
    seen = 0
    while seen < n_tasks:
        accs = meta_learner.finetunning(*distributed.my_tasks(sampler.next(split)), per_task=True)
        accs = distributed.gather_tasks(accs, f"the {split} accuracies")  # [task_num, update_step_test + 1]
        per_task.append(accs)
        seen += len(accs)
    per_task = np.concatenate(per_task)[:n_tasks]
    return per_task.mean(axis=0), 1.96 * per_task.std(axis=0) / math.sqrt(n_tasks)


def evaluate_model(args, parser, command):
    """--evaluate: adapt the model in args.evaluate to tasks of the chosen split and report the accuracy.

    Every value not given on the command line is the model's own (run_files.evaluation_config), so with no
    flags the run's test is repeated (exactly, on the same CPU). N must be the model's (its output layer has N
    classes); K, the query drawings Q, the inner steps and the number of tasks may differ from training.
    """
    given = [key for key, value in vars(args).items() if value is not None and value is not False]
    extra = [flag(key) for key in given if key not in EVALUATE_FLAGS + ("evaluate",)]
    if extra:
        parser.error(f"{', '.join(extra)}: not used by --evaluate, which takes only "
                     + ", ".join(flag(key) for key in EVALUATE_FLAGS))
    try:
        model = run_files.read_model(args.evaluate)
    except RunFileError as e:
        parser.error(str(e))
    n_way = model["config"]["n_way"]
    if args.n_way is not None and args.n_way != n_way:
        parser.error(f"{args.evaluate} is a {n_way}-way model (its output layer has {n_way} classes): --n-way "
                     f"must be {n_way}")
    cfg = run_files.evaluation_config(model["config"], vars(args))
    check_config(cfg, parser)
    split = args.split or "test"
    with run_files.EvaluationFolder(args.out) as folder:
        sampler, meta_learner = sampler_and_meta_learner(cfg)
        meta_learner.load_state_dict(model["theta"])
        accs, ci95 = evaluate(meta_learner, sampler, split, cfg["test_tasks"])
        print(f"{args.evaluate}: {cfg['n_way']}-way, K = {cfg['k_spt']} support and Q = {cfg['k_qry']} query "
              f"drawings per class, {cfg['test_tasks']} {split} tasks, seed {cfg['seed']}. Query accuracy after "
              f"0...{cfg['update_step_test']} inner steps:")
        for step, (a, c) in enumerate(zip(accs, ci95)):
            print(f"  {step} step{'s' * (step != 1)}: {100 * a:.2f} ± {100 * c:.2f} %")
        folder.write_evaluation(accs, ci95, split, args.evaluate, cfg,
                                new_segment(0, cfg, command, run_files.computation(cfg, meta_learner, False)))
    return 0


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def compiles(cfg, no_compile):
    """Whether training runs the compiled meta-step (MetaLearner's batching "compiled"): on the CPU, for
    second-order MAML, unless --no-compile. It is faster than the eager paths there in every paper setting,
    with one thread and with two (SPEED.md), once built: minutes the first time on a machine, seconds from
    inductor's cache. On CUDA the meta-step is one CUDA graph instead; the compiled function is second order
    only."""
    return not no_compile and torch.device(cfg["device"]).type == "cpu" and not cfg["first_order"]


def build_parser():
    p = Parser(prog="maml_omniglot.py", description="Second-order MAML on Omniglot (Finn et al. 2017). "
               "--setting picks the paper's values; every flag below overrides one of them.")
    p.add_argument("--setting", choices=sorted(SETTINGS), help="paper setting (default 5w1s)")
    p.add_argument("--n-way", type=int, help="classes per task (N)")
    p.add_argument("--k-spt", type=int, help="support drawings per class (K)")
    p.add_argument("--k-qry", type=int, help="query drawings per class (Q, default: K)")
    p.add_argument("--task-num", type=int, help="tasks per meta-batch (T: 32 for 5-way, 16 for 20-way)")
    p.add_argument("--update-lr", type=float, help="inner-loop learning rate alpha (0.4 / 0.1)")
    p.add_argument("--meta-lr", type=float, help="Adam meta learning rate beta (1e-3)")
    p.add_argument("--update-step", type=int, help="inner steps in meta-training (1 / 5)")
    p.add_argument("--update-step-test", type=int, help="inner steps at validation and test (3 / 5)")
    p.add_argument("--iterations", type=int, help="meta-iterations (60000)")
    p.add_argument("--first-order", action="store_true", help="first-order MAML (drop second derivatives)")
    p.add_argument("--no-rotate", action="store_true", help="no random 90-degree rotations of the classes")
    p.add_argument("--seed", type=int, help="seed for the network, the tasks and all RNGs (0)")
    p.add_argument("--device", help="auto (CUDA when available), cpu, cuda or cuda:N (auto)")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="on CUDA, run every meta-step eagerly instead of replaying it as one CUDA graph")
    p.add_argument("--no-compile", action="store_true", help="on the CPU, run the meta-step eagerly instead of "
                   "through one torch.compile'd function per task (which takes minutes to build the first time)")
    p.add_argument("--eval-every", type=int, help="validate and log training every N iterations (500)")
    p.add_argument("--eval-tasks", type=int, help="validation tasks per validation (320)")
    p.add_argument("--test-tasks", type=int, help="test tasks at the end, or with --evaluate (600)")
    p.add_argument("--checkpoint-every", type=int, help="write checkpoint.pt every N iterations (500)")
    p.add_argument("--step-accuracies-every", type=int, help="measure the train rows' query accuracies before "
                   "the last inner step every N iterations and at each row's last (10): each costs a forward pass")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt with the same flags (starts afresh if there is none)")
    p.add_argument("--data", help="preprocessed array; built from the zips beside it when missing (data/omniglot.npy)")
    p.add_argument("--out", help="output folder (runs/<setting>/); with --evaluate, where evaluation.json goes")
    p.add_argument("--evaluate", metavar="MODEL", help="adapt and test the trained network in MODEL (a model.pt)")
    p.add_argument("--split", choices=("test", "val"), help="with --evaluate: the classes to test on (test)")
    p.add_argument("--plot-only", metavar="DIR", help="only redraw DIR/curves.png from DIR/log.csv")
    return p


def check_config(cfg, parser):
    """Refuse, with one line and exit code 2 (parser.error), every impossible value, before any data is loaded:
    the values themselves (run_files.config_problem), then what this machine and torchrun make of them."""
    problem = run_files.config_problem(cfg)
    if problem is not None:
        parser.error(problem)
    try:
        cfg["device"] = distributed.process_device(distributed.resolve_device(cfg["device"]))
    except ValueError as e:
        parser.error(str(e))
    processes = distributed.world_size()
    if cfg["task_num"] % processes:
        parser.error(f"--task-num {cfg['task_num']} does not split into {processes} equal shares, one per "
                     f"process: give a multiple of {processes}, or another --nproc_per_node")
    if distributed.launched() and not os.path.isfile(cfg["data"]):
        parser.error(f"--data {cfg['data']} does not exist: under torchrun build it first, on every machine "
                     f"(python preprocess_omniglot.py --out {cfg['data']}), so that the processes do not all build it")


def resolve_config(args, parser):
    """The run's config: the setting's values and the defaults for the flags left out, all checked."""
    if args.split is not None:
        parser.error("--split is for --evaluate only: training validates on val and tests on test")
    cfg = run_files.training_config(vars(args))
    check_config(cfg, parser)
    return cfg


def plot_only(folder, parser):
    log_path = os.path.join(folder, FILES["log"])
    if not os.path.isfile(log_path):
        parser.error(f"--plot-only {folder}: there is no {log_path}")
    try:
        draw_curves(folder)
    except (ValueError, csv.Error) as e:  # curves.parse_log's messages name the row and the problem
        parser.error(f"--plot-only {folder}: {log_path} is not a log.csv of this program ({e})")
    return 0


def main(argv=None):
    """Parse the command line, run what it asks for, and turn every expected failure into one line."""
    parser = build_parser()
    if distributed.launched():  # every process of a torchrun prints its own errors: each says which it is
        parser.prog += f" (rank {distributed.rank()} of {distributed.world_size()})"
    args = parser.parse_args(argv)
    command = shlex.join(["python", "maml_omniglot.py"] + (sys.argv[1:] if argv is None else list(argv)))
    for key in ("evaluate", "plot_only", "out", "data"):
        if getattr(args, key) == "":
            parser.error(f"{flag(key)} is empty: give a path (an unset shell variable?)")
    if distributed.launched() and (args.plot_only or args.evaluate):
        parser.error("--plot-only and --evaluate run in one process: start them with python, not torchrun")
    checkpoint_path = None

    def kept():
        if not distributed.writer():
            return "rank 0 keeps the last checkpoint"
        return (f"the last good checkpoint ({checkpoint_path}) is kept" if os.path.exists(checkpoint_path)
                else "no checkpoint had been written yet")

    try:
        if args.plot_only:
            return plot_only(args.plot_only, parser)
        if args.evaluate:
            return evaluate_model(args, parser, command)
        cfg = resolve_config(args, parser)
        checkpoint_path = os.path.join(cfg["out"], FILES["checkpoint"])
        distributed.join(cfg["device"])
        code = run(cfg, args.resume, command, cuda_graph=not args.no_cuda_graph,
                   compiled=compiles(cfg, args.no_compile))
        distributed.leave()
        return code
    except Refused as e:  # a folder or file named on the command line that cannot be used as asked
        parser.error(str(e))
    except PreprocessError as e:  # --data names no usable array, and there are no zips to build it from
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except RunFileError as e:  # a full disk
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
    except NonFiniteError as e:
        print(f"{parser.prog}: error: {e}; stopping: {kept()}. Try a smaller --meta-lr or --update-lr.",
              file=sys.stderr)
    except DistributedError as e:  # under torchrun: a process died or hung, or the processes drifted apart
        print(f"{parser.prog}: error: {e}; stopping: {kept()}", file=sys.stderr)
    except (MemoryError, RuntimeError) as e:  # numpy's MemoryError; torch's, a RuntimeError on CPU and CUDA
        if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and "can't allocate memory" not in str(e):
            raise
        print(f"{parser.prog}: error: out of memory ({type(e).__name__}): make the tasks or the meta-batch "
              f"smaller (--n-way, --k-spt, --k-qry, --task-num)", file=sys.stderr)
    except KeyboardInterrupt as e:  # outside the training loop, which checkpoints on a signal itself
        left = (f"{checkpoint_path} is kept: continue with --resume"
                if checkpoint_path is not None and os.path.exists(checkpoint_path) else "nothing was written")
        print(f"{parser.prog}: interrupted{f' ({e})' if str(e) else ''}; {left}", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
