"""How fast is a meta-iteration? MetaLearner's paths, its CUDA graph, and a minimal per-task loop.

    python benchmark.py                                  # 5w1s as the paper trains it, on the best device
    python benchmark.py --setting 20w1s --protocol public --device cpu

Everything runs in one process on one synthetic batch of tasks (random images, labels shuffled per task),
so the numbers measure computation only, not data loading. Protocols:

    paper   the setting's own values: meta-batch, inner steps and K query drawings per class, as
            maml_omniglot.py trains them (for 5w1s: 32 tasks, 1 inner step, 1 query per class)
    public  5 inner steps and 15 query drawings per class, the workload most public PyTorch MAML
            reproductions use, with the setting's meta-batch

Printed, as the median seconds per meta-iteration (the whole meta-step, Adam included) and the achieved
GFLOP/s: MetaLearner.forward with the tasks batched and with the tasks one by one, the arrow marking the
path that MetaLearner.path picks for this device and workload (the fast path: what `MetaLearner(...)`
called on a batch runs, and CPU training with --no-compile), all without the step accuracies, as training
runs most meta-steps (it measures them every --step-accuracies-every-th iteration), and the fast path
once more with them; on the CPU also the tasks one by one through the compiled function (batching
"compiled", which maml_omniglot.py trains with there unless --no-compile), its compilation time on a line
of its own, before the timings; on CUDA also the batched path replayed as one CUDA graph (cuda_graph.py),
which is what maml_omniglot.py trains with there (a graph measures the step accuracies every time); the
minimal loop (plain_maml.meta_step with accuracies=False: plain autograd, second order, no per-step
accuracies, Adam, the tasks one after another in one thread of control, with this process's intra-op
threads) and the speed-ups over it of the fast path and of the compiled one; test tasks adapted per
second by finetunning on the fast path. On the CPU every path of MetaLearner shares the tasks among the
task threads (meta.task_threads: one per intra-op thread, each with one intra-op thread), and the minimal
loop runs with this process's intra-op threads, so OMP_NUM_THREADS=1 and =2 measure one core and two. The
paths take turns, one meta-iteration each, after one warm-up each, so that other work on the machine
slows them all alike.
The FLOPs of a meta-iteration (convolutions and matrix products, forward and all backward passes, without
the step accuracies) are counted by torch.utils.flop_counter on the minimal loop, because its formula for a
grouped convolution's backward counts the work once per group. Peak memory: on CUDA each row's own;
on the CPU the process's largest resident size, the same for every row.
"""

import resource
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import plain_maml
from cuda_graph import GraphedMetaStep
from distributed import resolve_device
from meta import MetaLearner, task_threads
from omniglot_nshot import random_tasks
from run_files import COMMON, SETTINGS, Parser


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds_of(step, device):
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


def median_seconds(steps, device, repeats):
    """{name: step} -> ({name: median seconds of a call}, {name: peak memory in MiB}), the steps taking turns
    `repeats` times after their warm-ups (allocator, oneDNN/cuDNN kernel choices, compilation)."""
    times = {name: [] for name in steps}
    peaks = dict.fromkeys(steps, 0.0)
    for _ in range(repeats):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[name].append(seconds_of(step, device))
            peaks[name] = max(peaks[name], peak_memory_mib(device))
    return {name: statistics.median(t) for name, t in times.items()}, peaks


def flops_of(step):
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv=None):
    parser = Parser(prog="benchmark.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="5w1s")
    parser.add_argument("--protocol", choices=("paper", "public"), default="paper")
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--repeats", type=int, default=5, help="timed meta-iterations per path (default 5)")
    parser.add_argument("--skip-reference", action="store_true", help="do not time the minimal per-task loop")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    try:
        device = torch.device(resolve_device(args.device))
    except ValueError as e:
        parser.error(str(e))

    setting = SETTINGS[args.setting]
    n_way, k_spt, tasks = setting["n_way"], setting["k_spt"], setting["task_num"]
    update_step, update_lr = setting["update_step"], setting["update_lr"]
    k_qry = k_spt
    if args.protocol == "public":
        update_step, k_qry = 5, 15
    torch.manual_seed(0)
    meta_learner = MetaLearner(n_way=n_way, k_spt=k_spt, update_lr=update_lr, meta_lr=COMMON["meta_lr"],
                               update_step=update_step, update_step_test=setting["update_step_test"],
                               first_order=args.first_order).to(device)
    batch = [t.to(device) for t in random_tasks(tasks, n_way, k_spt, k_qry, torch.Generator().manual_seed(0))]
    images_per_task = n_way * (k_spt + k_qry)
    fast_path = meta_learner.path(device, images_per_task)  # what the rule picks here (batching "auto")

    def path_step(batching, step_accuracies=False):
        def step():
            meta_learner.batching = batching
            meta_learner(*batch, step_accuracies=step_accuracies)
        return step

    graphed_step = GraphedMetaStep(meta_learner)

    def reference_step(accuracies=False):
        plain_maml.meta_step(meta_learner.theta(), meta_learner.meta_optim, *batch, k_spt=k_spt, update_lr=update_lr,
                             update_step=update_step, first_order=args.first_order, accuracies=accuracies)

    def test_step():
        meta_learner.batching = "auto"
        meta_learner.finetunning(*batch)

    threads = (f", {torch.get_num_threads()} threads (task threads: {task_threads(device)})"
               if device.type == "cpu" else "")
    print(f"{args.setting}, {args.protocol} protocol: {tasks} tasks, {n_way}-way {k_spt}-shot, "
          f"{k_qry} query per class, {update_step} inner steps, "
          f"{'first' if args.first_order else 'second'} order, {device}{threads}, torch {torch.__version__}")
    work = flops_of(reference_step)
    print(f"a meta-iteration is {work / 1e9:.1f} GFLOP; the fast path on {device.type} for tasks of "
          f"{images_per_task} images: {fast_path} (MetaLearner.path, for finetunning too)")

    steps = {f"meta-step, {batching}": path_step(batching) for batching in ("batched", "per task")}
    steps[f"meta-step, {fast_path}, step accs"] = path_step(fast_path, step_accuracies=True)
    if device.type == "cpu" and not args.first_order:  # the compiled path is second order only
        steps["meta-step, compiled"] = path_step("compiled")
    if device.type == "cuda":
        steps["meta-step, CUDA graph"] = graphed_step
    if not args.skip_reference:
        steps["minimal loop"] = reference_step
    for name, step in steps.items():
        warm_up = seconds_of(step, device)
        if name == "meta-step, compiled":
            done = "compiled" if meta_learner.compiler_works else "not compiled: it ran per task, eager"
            print(f"the compiled path's first meta-step, {done}: {warm_up:.1f} s")
    seconds, peaks = median_seconds(steps, device, args.repeats)
    notes = {f"meta-step, {fast_path}": "  <- fast path",
             f"meta-step, {fast_path}, step accs": "  (its iterations that measure the step accuracies)",
             "meta-step, compiled": "  <- maml_omniglot.py (unless --no-compile)",
             "meta-step, CUDA graph": "  <- maml_omniglot.py (the batched path, replayed)"}
    for name in steps:
        print(f"{name:<33} {seconds[name]:8.4f} s/it  {work / seconds[name] / 1e9:7.1f} GFLOP/s  "
              f"peak memory {peaks[name]:,.0f} MiB{notes.get(name, '')}")
    fast, compiled = seconds[f"meta-step, {fast_path}"], seconds.get("meta-step, compiled")
    if compiled:
        per_task = seconds["meta-step, per task"]
        print(f"speed-up of the compiled path over the per-task path: {per_task / compiled:.2f} x")
    if not args.skip_reference:
        print(f"speed-up of the fast path over the minimal loop: {seconds['minimal loop'] / fast:.2f} x")
        if compiled:
            print(f"speed-up of the compiled path over the minimal loop: {seconds['minimal loop'] / compiled:.2f} x")
    test_step()  # warm-up
    test_seconds = median_seconds({"finetunning": test_step}, device, args.repeats)[0]["finetunning"]
    print(f"finetunning {tasks / test_seconds:8.1f} test tasks/s with {setting['update_step_test']} steps "
          f"({600 * test_seconds / tasks:.2f} s for 600 tasks)")


if __name__ == "__main__":
    main()
