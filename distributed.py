"""Several processes, one meta-batch: maml_omniglot.py under torchrun, across cores, GPUs and machines.

    torchrun --standalone --nproc_per_node=P maml_omniglot.py [flags]        # P processes on this machine
    torchrun --nnodes=M --node_rank=N --master_addr=HOST --master_port=PORT --nproc_per_node=P \\
        maml_omniglot.py [flags]                # on each of M machines, N = 0 .. M-1; HOST: machine 0's address

The tasks of a meta-batch are independent until their meta-gradients are summed, so the design is small:
each process adapts its share of the tasks, one all-reduce sums the meta-gradient, and every process takes
the same Adam step. The processes talk through gloo on CPU and NCCL on CUDA, where process LOCAL_RANK of a
machine uses its GPU LOCAL_RANK. Without torchrun (no WORLD_SIZE in the environment) none of this runs: the
functions below return what they are given.

The same numbers. Every process builds the same sampler from the same seed, draws the whole meta-batch of
T tasks and keeps its share (my_tasks): process r of P takes tasks r·T/P .. (r+1)·T/P − 1, so together
the processes run exactly the one-process batch. Process r's meta-loss is the mean query cross-entropy of
its T/P tasks, (P/T) Σ_{i of r} L_i, and average_meta_step averages the P gradients in one all-reduce of
one flat buffer:

    (1/P) Σ_r (P/T) Σ_{i of r} ∇L_i = (1/T) Σ_i ∇L_i,   the one-process meta-gradient.

The loss and the query accuracies ride in the same buffer, so the train rows are the whole batch's. Every
process then takes the same Adam step from the same θ and Adam state; batch norm is per task, so nothing
else is shared. Validation and test batches are split the same way, and gather_tasks puts the per-task
accuracies back together in rank order: the one-process rows. At every checkpoint check_identical compares
the processes' θ, and stops the run if they ever drift apart.

What "the same" means. A meta-step of P processes is the one-process meta-step up to float32 rounding (the
sums are taken in another order; tests/test_distributed.py). A run is not: Adam's first steps are about
lr·sign(gradient), so a rounding difference in a near-zero gradient component becomes a whole step, and
within a few iterations the run follows another trajectory of the same training, as it would on another
CPU or with another thread count (one process whose θ is moved by 1e-7, relatively, drifts off the same
way). Two CPU runs with the same number of processes and threads agree bit for bit, across --resume too.

One writer. Only rank 0 touches the output folder: the lock, log.csv, summary.json, curves.png, the
checkpoint and model.pt. On --resume it reads the checkpoint and sends it to the others (from_rank_0). A
checkpoint holds nothing of any one process, so a run can resume with another number of processes. Rank 0
is process 0 of machine 0 (--node_rank=0): the run's folder is on that machine, unless --out is a shared
disk. Every machine needs its own --data array; the processes refuse to build it.

Failures. Every exchange goes through `exchange`, which turns a failed one into DistributedError, one line:
a process died (the others see its connections close), or did not answer within TIMEOUT. torchrun then
stops the processes that are left (SIGTERM, SIGKILL 30 s later) and exits with 1, printing its own report.
A rendezvous of machines that fails is torchrun's to report: its agent gives up after --rdzv-conf
timeout=SECONDS (600 by default), before this code runs. A process that cannot join the others here, in
init_process_group, stops in one line too.
"""

import datetime
import os
import re

import numpy as np
import torch
import torch.distributed as dist

from run_files import digest

TIMEOUT = datetime.timedelta(minutes=5)  # the longest a process waits for the others in one exchange


class DistributedError(RuntimeError):
    """An exchange between the processes failed, or they no longer agree. The message is one line."""


def launched():
    """Whether torchrun started this process: it names the world in the environment."""
    return "WORLD_SIZE" in os.environ


def world_size():
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank():
    return int(os.environ.get("RANK", "0"))


def writer():
    """Whether this process writes the run's files: rank 0, the only process without torchrun."""
    return rank() == 0


def resolve_device(name):
    """A --device value as a torch device string; ValueError with the reason when it cannot be used."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is unknown: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        raise ValueError(f"--device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(device)


def process_device(device):
    """This process's device, given the run's (resolve_device's): the same without torchrun and on CPU;
    under torchrun on CUDA, GPU LOCAL_RANK of this machine. ValueError when that cannot be."""
    if not launched() or device == "cpu":
        return device
    if device != "cuda":
        raise ValueError(f"--device {device}: under torchrun each process uses its own GPU, cuda:LOCAL_RANK: "
                         f"give --device cuda or auto")
    local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local_rank >= gpus:
        raise ValueError(f"torchrun started process {local_rank} on a machine with {gpus} GPU(s): give "
                         f"--nproc_per_node={gpus} or fewer")
    return f"cuda:{local_rank}"


def join(device):
    """Join the run's other processes (nothing without torchrun): gloo on CPU, NCCL on CUDA."""
    if not launched():
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, timeout=TIMEOUT,
                                device_id=torch.device(device) if backend == "nccl" else None)
    except (RuntimeError, ValueError) as e:
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise DistributedError(f"could not join the other processes of the run at {where} ({backend}): "
                               f"{first_line(e)}") from None


def leave():
    if dist.is_initialized():
        dist.destroy_process_group()


def first_line(error):
    """An exception's message in short: its first sentence, without the C++ source location gloo puts first."""
    message = re.sub(r"^\[[^\]]*\] *", "", str(error).strip()) or type(error).__name__
    return message.splitlines()[0].split(". ")[0][:200]


def exchange(what, collective, *args, **kwargs):
    """Run one collective operation of torch.distributed; DistributedError, naming what, when it fails."""
    try:
        return collective(*args, **kwargs)
    except RuntimeError as e:
        raise DistributedError(f"exchanging {what} failed: another process stopped, or did not answer within "
                               f"{TIMEOUT.total_seconds():.0f} s ({first_line(e)})") from None


def my_tasks(batch):
    """This process's share of a batch of tasks (x_spt, y_spt, x_qry, y_qry, each [T, ...]): [T/P, ...] each."""
    if not launched():
        return batch
    share = len(batch[0]) // world_size()  # maml_omniglot.py refuses a task_num that P does not divide
    return tuple(tensor[rank() * share:(rank() + 1) * share] for tensor in batch)


def average_meta_step(parameters, loss, accs):
    """MetaLearner's `reduce`: the meta-gradient (the parameters' .grad), the loss (0-d tensor) and the query
    accuracies (a tensor [update_step + 1]) of this process's share of the tasks become the whole meta-batch's,
    the same on every process: their averages over the processes, in one all-reduce of one flat buffer."""
    grads = [p.grad for p in parameters]
    accs = torch.as_tensor(accs, device=loss.device)
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(1), accs])  # [parameters + 1 + steps]
    exchange("the meta-gradient", dist.all_reduce, flat)  # the sum over the processes
    flat /= world_size()
    *grad_parts, loss, accs = flat.split([g.numel() for g in grads] + [1, len(accs)])
    for grad, part in zip(grads, grad_parts):
        grad.copy_(part.view_as(grad))
    return loss[0], accs


def gather_tasks(per_task, what):
    """Every process's rows (numpy, one per task of its share) in rank order: the whole batch's, on every one."""
    if not launched():
        return per_task
    parts = [None] * world_size()
    exchange(what, dist.all_gather_object, parts, per_task)
    return np.concatenate(parts)


def from_rank_0(value, what):
    """Rank 0's value (any picklable object) on every process."""
    if not launched():
        return value
    box = [value]
    exchange(what, dist.broadcast_object_list, box, src=0)
    return box[0]


def largest(value, what):
    """The largest of the processes' integers `value`, on every process."""
    if not launched():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([value], device=device)
    exchange(what, dist.all_reduce, tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def check_identical(value, what):
    """Stop with DistributedError unless value (tensors and plain values) is the same, bit for bit, on every
    process: the processes must take the same steps, and would otherwise drift apart unnoticed."""
    if not launched():
        return
    digests = [None] * world_size()
    exchange(what, dist.all_gather_object, digests, digest(value))
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise DistributedError(f"{what} differ between the processes (rank{'s' * (len(differ) > 1)} "
                               f"{', '.join(map(str, differ))} against rank 0): they drifted apart, so nothing more "
                               f"of this run is written")
