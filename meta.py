"""MetaLearner: second-order MAML (Finn, Abbeel, Levine 2017) on a batch of few-shot tasks.

Each task Tᵢ brings a support set (N classes x K drawings, labelled 0..N-1) and a query set of other
drawings of the same classes. MAML looks for initial weights θ from which a few gradient steps on the
support set already classify the query set well:

    inner loop, per task:   θ'ᵢ ← θ'ᵢ − α ∇ L_support,i(θ'ᵢ),  starting from θ'ᵢ = θ, `update_step` times
    outer loop (meta-step): θ ← θ − β ∇θ (1/T) Σᵢ L_query,i(θ'ᵢ(θ))   (Adam, not plain SGD)

The outer gradient flows through the inner updates. With one inner step,
∇θ L_query(θ') = (I − α ∇²L_support(θ)) ∇L_query(θ'): it contains the Hessian of the support loss.
That is second-order MAML, and it needs the inner gradients to stay in the autograd graph
(`create_graph=True`). With `first_order=True` (FOMAML) the inner gradients are treated as constants,
the Hessian term drops out and the outer gradient is simply ∇L_query evaluated at θ'ᵢ.

Inner-loss scaling, as in the reference code (cbfinn/maml): the support loss of a task is Σ CE / K,
the per-example cross-entropy divided by K, summed over the N*K support examples. It comes from the
reference's TensorFlow code, which computes a per-example loss divided by K
(`softmax_cross_entropy_with_logits(...) / update_batch_size`) and differentiates it with
`tf.gradients`, which sums over the examples. That is N times the mean cross-entropy, so its gradient
is N times the gradient of the mean. The paper's α = 0.4 for 5-way and α = 0.1 for 20-way therefore
both mean a step of 2.0 on the mean cross-entropy. The outer loss is the plain mean cross-entropy over
the query examples of all tasks (the 1/T above); the reference sums it like the inner loss, but a
constant factor on the meta-gradient does not change Adam's steps.

All tasks of a meta-batch run at once: BaseNet takes a batch of tasks with per-task fast weights (see
learner.py), and one `autograd.grad` of the summed support losses gives every task its own gradient,
because task i's loss depends only on task i's fast weights. The same algorithm written task by task,
with nothing batched, is plain_maml.py: read it first.

Or one task after another. The batched path is not faster everywhere: on this project's 2-core CPU it
beats a per-task loop for 5-way 1-shot tasks, but loses to it for larger tasks, where its grouped
convolutions (and their double backward, which PyTorch runs group by group on copied slices) cost more
than one task's plain convolutions (SPEED.md). `MetaLearner.path` is
the one rule that picks the path, for the meta-step and finetunning alike; the per-task path runs the
same code on batches of one task, so both compute the same function, up to float32 rounding
(tests/test_maml.py compares both with plain_maml.py and with each other).

Or one task after another through a compiled function, when asked for (batching "compiled", on the CPU,
second order only; maml_omniglot.py trains so unless --no-compile): each task's query loss after its inner
steps is written with torch.func (task_meta_loss), each inner gradient torch.func.grad of the support
loss, and the whole differentiated by torch.func.grad again and compiled by torch.compile (inductor)
into one graph, called once per task: (∇θ L_query,i, L_query,i, the last step's accuracy and the fast
weights before it, from which the other step accuracies are measured eagerly when asked) (compiled_meta_loss). The
same function as the eager paths, to float32 rounding (tests/test_maml.py); the first call compiles
(compile_meta_step), once per process, thread count and shape, minutes on a CPU unless inductor's cache
already has it. Finetunning stays eager, by the size rule. Without a C++ compiler the eager path of the
size rule runs instead, with one line saying so.

Batched or one by one, on the CPU the tasks are shared among threads (task_threads): with P intra-op threads
(torch.get_num_threads(), OMP_NUM_THREADS), P worker threads each take a share of the tasks, with one
intra-op thread of their own, and compute its loss, accuracies and meta-gradient; the shares' weighted sums
are the batch's. The threads meet once per batch, as processes under torchrun do (distributed.py), where
threads inside every operation meet at each of its thousands of small operations. Validation and test
(finetunning) share their tasks the same way. The numbers are the one-thread numbers, up to the order of
the sums over the shares (tests/test_maml.py). The compiled path too: its graph is called from C++ with
Python's GIL released (COMPILE_OPTIONS), so the task threads run its kernels side by side.

The step accuracies. A meta-step reports the query accuracy after 0, 1, ..., update_step inner steps.
The last of them comes with the loss; each of the others costs one more forward pass of the query set
(without a graph), about a tenth of a 5-step meta-step's arithmetic. So they are measured only when
asked for (`step_accuracies=True`, the default; training asks at every --step-accuracies-every-th
iteration, maml_omniglot.py), and are NaN when not: the loss, the meta-gradient and the step are the
same either way. A CUDA graph (cuda_graph.py) is one fixed function, and measures them at every replay.

One meta-step without waiting for the device. `step_tensors` is the whole meta-step (zero the
gradients, meta-loss, backward, finiteness check, Adam step) on tensors alone: no number is read on the
host and no branch depends on one, so that cuda_graph.py can capture it as one CUDA graph and replay
it. `forward` runs the same function eagerly and then reads its results.

Shapes: T tasks (task_num), N classes (n_way), K support and Q query drawings per class (k_spt, k_qry).
One 5w1s meta-iteration (T = 32, N = 5, K = Q = 1, one inner step), from the sampler to Adam:

    sampler.next("train")     x_spt [32, 5, 1, 28, 28]  y_spt [32, 5]  x_qry [32, 5, 1, 28, 28]  y_qry [32, 5]
    adapt: θ'ᵢ = θ            every weight expanded per task: conv1 [32, 64, 1, 3, 3] ... fc [32, 5, 64]
      net(x_spt, θ')          tasks side by side [5, 32, 28, 28] -> 4 blocks -> [5, 2048, 2, 2] -> [32, 5, 5]
      support_loss            Σ CE / K per task [32], summed; autograd.grad -> per-task gradients [32, *shape]
      θ' ← θ' − α g           (update_step times, the graph kept: second order)
    net(x_qry, θ')            logits [32, 5, 5] -> mean cross-entropy over the 160 query images: the loss, []
    loss.backward()           θ's .grad, shaped as θ: conv1 [64, 1, 3, 3] ... fc [5, 64], 112,005 numbers
    guarded_step              one Adam step on θ (undone if not finite)
"""

import functools
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn
import torch.nn.functional as F

from learner import BaseNet

# MetaLearner's `batching`: "auto" lets MetaLearner.path decide; "compiled" is only ever asked for
BATCHINGS = ("auto", "batched", "per task", "compiled")
CPU_BATCHED_IMAGES = 20  # on the CPU, tasks of at most this many images (support + query) run batched


def path_by_size(device, images_per_task):
    """MetaLearner.path's rule: "per task" for tasks of more than CPU_BATCHED_IMAGES images on the CPU,
    "batched" otherwise."""
    return "per task" if device.type == "cpu" and images_per_task > CPU_BATCHED_IMAGES else "batched"


def accuracy_per_task(logits, labels):
    """Fraction of correct predictions per task: logits [T, n, N], labels [T, n] -> [T]."""
    return (logits.argmax(dim=-1) == labels).float().mean(dim=1)


def not_measured(like):
    """The step accuracy of a meta-step that does not measure it: NaN, shaped and placed as `like`."""
    return torch.full_like(like, float("nan"))


def one_by_one(*batch):
    """The tasks of a batch as batches of one task: tensors [T, ...] -> T tuples of views [1, ...]."""
    return zip(*(tensor.split(1) for tensor in batch))


def task_threads(device):
    """How many threads share the tasks of a batch on `device`: on the CPU one per intra-op thread of the caller
    (torch.get_num_threads(), OMP_NUM_THREADS), each computing its share of the tasks with one intra-op thread
    of its own, whatever the path (the compiled one too: its graph runs with Python's GIL released,
    COMPILE_OPTIONS). One, the caller, on CUDA: a batch is one stream of kernels."""
    return torch.get_num_threads() if device.type == "cpu" else 1


@functools.cache
def thread_pool(threads):
    """`threads` worker threads, each with one intra-op thread (set per thread: the caller keeps its own)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="maml-tasks", initializer=torch.set_num_threads,
                              initargs=(1,))


def shares(batch, threads):
    """The tasks of a batch (tensors [T, ...]) as `threads` consecutive shares, the first T mod threads of them
    one task larger: tuples of views [Tᵢ, ...]. Shares with no task are left out."""
    return [share for share in zip(*(tensor.tensor_split(threads) for tensor in batch)) if len(share[0])]


def all_finite(tensors):
    """Whether every number in `tensors` is finite, as a bool tensor on their device (nothing is read)."""
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


class PrecomputedGradient(torch.autograd.Function):
    """A loss whose gradient is already known: apply(loss, gradients, *inputs) is `loss`, and its backward
    hands grad_output * gradients[i] to inputs[i] (nothing where gradients[i] is None). The compiled path
    (MetaLearner.compiled_meta_loss) computes θ's meta-gradient with the loss, and so do the task threads
    (MetaLearner.meta_loss); this makes their loss backpropagate as one graph's does."""

    @staticmethod
    def forward(ctx, loss, gradients, *inputs):
        ctx.gradients = gradients
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        return None, None, *(None if g is None else grad_output * g for g in ctx.gradients)


# Inductor's options for the compiled meta-step. On the CPU it lays convolutions out channels-last by default
# (layout_optimization), oneDNN's preferred layout for large ones; for these small ones and their double
# backward the network's own contiguous layout is faster (SPEED.md). Its graph is called from Python by
# default, holding the GIL while the kernels run (pytorch#163061), so that task threads of it would take
# turns; called from C++ (cpp_wrapper), it releases the GIL and they run side by side (SPEED.md).
COMPILE_OPTIONS = {"layout_optimization": False, "cpp_wrapper": True}


@functools.cache
def task_meta_gradient():
    """MetaLearner.task_meta_loss differentiated with respect to its `params` by torch.func.grad and
    compiled whole (inductor, one graph per shape, built at the first call): (gradients, (loss, accs)).
    The learner is an argument, not a bound self, so that copies of a learner never share its closure."""
    return torch.compile(torch.func.grad(MetaLearner.task_meta_loss, argnums=1, has_aux=True), dynamic=False,
                         options=COMPILE_OPTIONS)


class NonFiniteError(ArithmeticError):
    """The meta-gradient or the meta-parameters stopped being finite numbers."""


class MetaLearner(nn.Module):
    """Second-order MAML: θ, its Adam meta-optimizer, the meta-step (forward) and test-time adaptation.

    θ, the meta-parameters, is this module's own parameters, `theta()`: its network's weights (the
    initial weights every task adapts from) and anything a variant learns beside them, such as per-step
    inner learning rates. Everything that handles θ as a whole goes through `theta()` or this module's
    `state_dict()`: Adam, the all-reduce of several processes, the finiteness check and its undo, the
    CUDA graph's warm-up, the drift check between processes, checkpoint.pt and model.pt.

    `network(n_way)` builds the network, the paper's BaseNet by default. It must run as
    `net(x, params)` with any list of tensors shaped as `net.parameters()`, in that order (learner.py).
    """

    def __init__(self, *, n_way, k_spt, update_lr, meta_lr, update_step, update_step_test, first_order=False,
                 reduce=None, batching="auto", network=BaseNet):
        super().__init__()
        if batching not in BATCHINGS:
            raise ValueError(f"batching must be one of {BATCHINGS}, got {batching!r}")
        self.reduce = reduce  # several processes: their shares of a meta-batch made one (distributed.py)
        self.k_spt = k_spt
        self.update_lr = update_lr
        self.update_step = update_step
        self.update_step_test = update_step_test
        self.first_order = first_order
        self.batching = batching
        self.compiler_works = True  # until torch.compile fails here once: then "compiled" runs "per task"
        self.net = network(n_way)
        self.meta_optim = torch.optim.Adam(self.theta(), lr=meta_lr)

    def theta(self):
        """θ: every tensor the meta-step learns, as a list (this module's parameters, its network's first)."""
        return list(self.parameters())

    def path(self, device, images_per_task):
        """How a batch of tasks of `images_per_task` images each (N*K support + N*Q query) runs on `device`:
        "batched" (all at once) or "per task" (one after another), for the meta-step and finetunning, or
        "compiled" (the meta-step one task after another through a compiled function, compiled_meta_loss;
        finetunning as the rule says), which only `batching` asks for, on the CPU.

        The rule, from measurements on this project's 2-core CPU (SPEED.md, "which path, by task size";
        benchmark.py prints both paths and marks the one picked here): the CPU batches tasks of at most
        CPU_BATCHED_IMAGES images and runs larger ones one by one, whatever the number of inner steps.
        CUDA always batches: one kernel launch per operation instead of one per task, and one graph
        (cuda_graph.py). A `batching` other than "auto" overrides the rule (tests and benchmark.py run
        both paths); "compiled" falls back to the rule once torch.compile has failed here.
        """
        if self.batching == "compiled" and self.compiler_works:
            return "compiled"
        if self.batching not in ("auto", "compiled"):
            return self.batching
        return path_by_size(device, images_per_task)

    def finetunning_path(self, device, images_per_task):
        """`path` for finetunning: the compiled function is the meta-step's, so with it finetunning goes by the
        size rule."""
        path = self.path(device, images_per_task)
        return path_by_size(device, images_per_task) if path == "compiled" else path

    def support_loss(self, logits, labels):
        """Inner loss per task: Σ over the support examples of cross-entropy / K. [T, n, N], [T, n] -> [T]."""
        per_example = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        return per_example.view(labels.shape).sum(dim=1) / self.k_spt

    def adapt(self, x_spt, y_spt, steps, params, create_graph):
        """Yield the fast weights of every task after 0, 1, ..., `steps` inner steps.

        x_spt [T, N*K, 1, 28, 28], y_spt [T, N*K]. `params` is θ (shared by all tasks). Each yielded
        list holds tensors with a leading task dimension: [T, *shape of the parameter].
        With create_graph=True the inner gradients stay differentiable (second order).
        """
        tasks = x_spt.shape[0]
        # `expand` gives every task its own view of θ (no copy): fast_weights[i][t] is task t's. The
        # support losses are then summed over tasks, and since task t's loss depends only on its own
        # slice, one autograd.grad of the sum is every task's own gradient, stacked: [T, *shape].
        fast_weights = [p.expand(tasks, *p.shape) for p in params]
        yield fast_weights
        for _ in range(steps):
            loss = self.support_loss(self.net(x_spt, fast_weights), y_spt).sum()
            grads = torch.autograd.grad(loss, fast_weights, create_graph=create_graph)
            fast_weights = [w - self.update_lr * g for w, g in zip(fast_weights, grads)]
            yield fast_weights

    def meta_loss(self, x_spt, y_spt, x_qry, y_qry, step_accuracies=True):
        """Outer loss of a batch of tasks and the query accuracy after 0..update_step inner steps.

        x_spt [T, N*K, 1, 28, 28], y_spt [T, N*K], x_qry [T, N*Q, 1, 28, 28], y_qry [T, N*Q].
        Returns (loss, accs), both on the tasks' device: loss is the differentiable mean query
        cross-entropy after `update_step` steps, averaged over tasks; accs a tensor of update_step + 1
        accuracies. The loss and the accuracies are means over the tasks of each task's, the same numbers
        however the tasks are grouped, since every task has N*Q query examples. With
        step_accuracies=False the accuracies before the last step are not measured (NaN).

        With several task threads (task_threads: on the CPU one per intra-op thread), each thread computes its
        share of the tasks (share_meta_loss) and the gradient of that share's loss with respect to θ, and the
        loss returned carries their weighted sum as its gradient
        (PrecomputedGradient): backpropagating it gives θ's .grad the meta-gradient, (1/T) Σ_shares Tₛ ∇θ Lₛ,
        as one backward of one graph would. The threads meet once per batch, not at every operation.
        """
        batch = (x_spt, y_spt, x_qry, y_qry)
        threads = task_threads(x_spt.device)
        if threads == 1:
            return self.share_meta_loss(*batch, step_accuracies)
        theta = self.theta()

        def share_gradient(share):
            loss, accs = self.share_meta_loss(*share, step_accuracies)
            return torch.autograd.grad(loss, theta, allow_unused=True), loss.detach(), accs

        parts = shares(batch, threads)
        weights = [len(share[0]) / len(x_spt) for share in parts]  # Tₛ / T
        results = list(thread_pool(threads).map(share_gradient, parts))
        gradients = [None if any(g is None for g in share_grads) else sum(w * g for w, g in zip(weights, share_grads))
                     for share_grads in zip(*(grads for grads, _, _ in results))]
        loss = sum(w * loss for w, (_, loss, _) in zip(weights, results))
        accs = sum(w * accs for w, (_, _, accs) in zip(weights, results))
        return PrecomputedGradient.apply(loss, gradients, *theta), accs

    def share_meta_loss(self, x_spt, y_spt, x_qry, y_qry, step_accuracies):
        """meta_loss of the tasks given, in the calling thread: all at once, one by one or compiled, as `path`
        says. One by one, the loss and the accuracies are the means over the tasks of each task's."""
        path = self.path(x_spt.device, x_spt.shape[1] + x_qry.shape[1])
        if path == "compiled":
            try:
                return self.compiled_meta_loss(x_spt, y_spt, x_qry, y_qry, step_accuracies)
            except torch._dynamo.exc.BackendCompilerFailed as error:  # no C++ compiler, for one
                self.compiler_works = False
                path = self.path(x_spt.device, x_spt.shape[1] + x_qry.shape[1])
                print(f"meta.py: torch.compile failed, the meta-step runs {path}, eager: "
                      f"{str(error).splitlines()[0]}", file=sys.stderr)
        if path == "batched":
            return self.batch_meta_loss(x_spt, y_spt, x_qry, y_qry, step_accuracies)
        losses, accs = zip(*(self.batch_meta_loss(*task, step_accuracies)
                             for task in one_by_one(x_spt, y_spt, x_qry, y_qry)))
        return torch.stack(losses).mean(), torch.stack(accs).mean(dim=0)

    def batch_meta_loss(self, x_spt, y_spt, x_qry, y_qry, step_accuracies):
        """meta_loss with all the tasks at once (see learner.py).

        Only the last step's query forward is needed for the loss; the accuracies before it, when
        measured, without building a graph.
        """
        accs = []
        # The fast weights start at the network's weights, θ's part that the tasks adapt.
        steps = self.adapt(x_spt, y_spt, self.update_step, self.net.parameters(), create_graph=not self.first_order)
        for step, fast_weights in enumerate(steps):
            if step < self.update_step:
                accs.append(self.step_accuracy(x_qry, y_qry, fast_weights) if step_accuracies else None)
            else:
                logits = self.net(x_qry, fast_weights)  # [T, N*Q, N]
                loss = F.cross_entropy(logits.flatten(0, 1), y_qry.flatten())
                accs.append(accuracy_per_task(logits.detach(), y_qry).mean())
        return loss, torch.stack([not_measured(accs[-1]) if acc is None else acc for acc in accs])

    def step_accuracy(self, x_qry, y_qry, fast_weights):
        """The query accuracy of the tasks with these fast weights, averaged over them: a forward pass
        without a graph (the next inner step is computed by adapt's generator outside it, with its graph)."""
        with torch.no_grad():
            return accuracy_per_task(self.net(x_qry, fast_weights), y_qry).mean()

    def task_meta_loss(self, params, x_spt, y_spt, x_qry, y_qry):
        """batch_meta_loss of one task written with torch.func, for compiled_meta_loss:
        (loss, (loss, the last step's accuracy, the fast weights after 1..update_step-1 steps)).

        x_spt [1, N*K, 1, 28, 28], y_spt [1, N*K], x_qry [1, N*Q, 1, 28, 28], y_qry [1, N*Q]; `params` in
        the network's order, shared by the fast weights' start. Each inner step is torch.func.grad of the
        support loss, θ' ← θ' − α ∇L_support(θ'), and task_meta_gradient differentiates the whole by
        torch.func.grad again: nested transforms keep the second-order terms, and torch.compile turns
        them into one graph (autograd.grad with create_graph inside a compiled function does not: inductor
        refuses or gets the double backward wrong). The accuracy reads only an argmax, so it contributes
        nothing to the gradient; the loss is returned a second time as the auxiliary output beside it,
        since the gradient replaces the function's value. The other step accuracies are not part of the
        compiled function, so that one function serves the meta-steps that measure them and those that do
        not: compiled_meta_loss measures them from the fast weights returned.
        """
        def support_loss(fast_weights):
            return self.support_loss(self.net(x_spt, fast_weights), y_spt).sum()

        fast_weights, steps = params, []
        for step in range(self.update_step):
            if step > 0:
                steps.append(fast_weights)
            grads = torch.func.grad(support_loss)(fast_weights)
            fast_weights = [w - self.update_lr * g for w, g in zip(fast_weights, grads)]
        logits = self.net(x_qry, fast_weights)  # [1, N*Q, N]
        loss = F.cross_entropy(logits[0], y_qry[0])
        return loss, (loss, accuracy_per_task(logits, y_qry)[0], steps)

    def compiled_meta_loss(self, x_spt, y_spt, x_qry, y_qry, step_accuracies):
        """meta_loss one task after another, each task's loss, last accuracy and meta-gradient ∇θ L_query,i
        from one call of task_meta_gradient; its other step accuracies, when measured, from the fast weights
        that call returns, eagerly. The meta-gradient (1/T) Σᵢ ∇θ L_query,i is summed here and reaches θ's
        .grad when the loss is backpropagated (PrecomputedGradient), as the eager paths' does.
        """
        if self.first_order:
            raise ValueError("batching 'compiled' is second-order MAML only")
        theta = list(self.net.parameters())
        params = [p.detach() for p in theta]
        gradients, losses, accs = None, [], []
        for task in one_by_one(x_spt, y_spt, x_qry, y_qry):
            task_gradients, (loss, last, steps) = task_meta_gradient()(self, params, *task)
            gradients = task_gradients if gradients is None else [g + t for g, t in zip(gradients, task_gradients)]
            losses.append(loss)
            before = ([self.step_accuracy(task[2], task[3], fast_weights) for fast_weights in [params] + steps]
                      if step_accuracies else [not_measured(last)] * self.update_step)
            accs.append(torch.stack(before + [last]))
        tasks = x_spt.shape[0]
        loss = PrecomputedGradient.apply(torch.stack(losses).mean(), [g / tasks for g in gradients], *theta)
        return loss, torch.stack(accs).mean(dim=0)

    def compile_meta_step(self, n_way, k_spt, k_qry):
        """With batching "compiled": build the compiled function now, for tasks of N-way K-shot with Q query
        drawings per class, so that training starts with it built. It runs once on a task of blank images,
        through meta_loss, so in a task thread of one intra-op thread, as training's tasks run (no random
        number is drawn; θ, its .grad and Adam are untouched). Returns the seconds it took; if torch.compile
        failed, `path` now names the eager path that runs instead."""
        started = time.monotonic()
        device = self.theta()[0].device
        images = [torch.zeros(1, n_way * k, 1, 28, 28, device=device) for k in (k_spt, k_qry)]
        labels = [torch.arange(n_way, device=device).repeat(k)[None] for k in (k_spt, k_qry)]
        self.meta_loss(images[0], labels[0], images[1], labels[1])
        return time.monotonic() - started

    def step_tensors(self, x_spt, y_spt, x_qry, y_qry, step_accuracies=True):
        """One meta-step, computed on the device without reading any number: what forward runs, and what
        cuda_graph.py captures as one CUDA graph.

        It reads as plain_maml.meta_step does: adapt every task and score its query set (meta_loss),
        backpropagate through the adaptation, step θ with Adam, here guarded (guarded_step). Returns
        (loss, accs, refused), tensors on the device: the meta-loss (detached) and the accuracies of
        meta_loss, and `refused` as guarded_step gives it. When the tasks of a meta-batch are spread over
        several processes (distributed.py), each passes its share, and `reduce(theta, loss, accs)` turns
        its meta-gradient (θ's .grad), loss and accuracies into the whole batch's before the step, so
        that every process takes the same step.
        """
        self.match_adam_to_device()
        self.meta_optim.zero_grad(set_to_none=True)
        loss, accs = self.meta_loss(x_spt, y_spt, x_qry, y_qry, step_accuracies)
        loss.backward()
        loss = loss.detach()
        if self.reduce is not None:  # this process's share of a meta-batch: the whole batch's, from them all
            loss, accs = self.reduce(self.theta(), loss, accs)
        return loss, accs, self.guarded_step()

    def guarded_step(self):
        """Adam's step on θ from its .grad, undone when it is not finite. Returns `refused`, a tensor on the
        device: 0 when the step was taken, 1 when the meta-gradient was not finite, 2 when the step made θ
        non-finite (an overflow inside Adam). A refused step leaves θ and Adam's state exactly as they were.

        Why the step is taken and then undone rather than tested first: a test is a branch on a number
        on the device, which a CUDA graph cannot contain (a replay launches the same kernels every
        time), and which makes the host wait for the device. So Adam always steps, and every tensor it
        changes (θ, its moments, its step counts) is then set to torch.where(taken, new value, copy
        kept before the step). When taken, that is the new value bit for bit, so the numbers are those
        of an unguarded step (tests/test_maml.py checks it); when refused, the old one bit for bit. The
        copies are three passes over θ's 0.1 M numbers, nothing next to the meta-gradient. The host reads
        `refused` afterwards (read_step) and raises. One exception, handled by forward: Adam creates its
        state at its first step, so a refused first step leaves a new state behind, which forward drops.
        """
        theta = self.theta()
        gradient_finite = all_finite([p.grad for p in theta])
        changed = theta + [t for p in theta for t in self.meta_optim.state.get(p, {}).values()]
        with torch.no_grad():
            kept = [t.clone() for t in changed]
            self.meta_optim.step()
            refused = torch.where(gradient_finite, torch.where(all_finite(theta), 0, 2), 1)
            for tensor, before in zip(changed, kept):
                tensor.copy_(torch.where(refused == 0, tensor, before))
        return refused

    def match_adam_to_device(self):
        """Adam as the device wants it. On CUDA with capturable=True: its step counts live on the GPU and
        its bias corrections are computed there, as a CUDA graph requires (and the eager path does the
        same, so that both run one function). On the CPU with capturable=False, Adam's default: step
        counts on the CPU, corrections in Python floats. A checkpoint from the other kind of device is
        converted here; the change is a rounding difference at most."""
        capturable = self.theta()[0].device.type == "cuda"
        for group in self.meta_optim.param_groups:
            group["capturable"] = capturable
        for p, state in self.meta_optim.state.items():
            if "step" in state:
                state["step"] = state["step"].to(p.device if capturable else "cpu")

    def read_step(self, loss, accs, refused):
        """The host's half of a meta-step (step_tensors, run or replayed): (loss as a float, accs as a numpy
        array), or NonFiniteError for a refused step."""
        refused = int(refused)  # the one wait for the device
        if refused == 1:
            raise NonFiniteError(f"the meta-gradient is not finite (meta-loss {loss.item()})")
        if refused == 2:
            raise NonFiniteError("the Adam step made the meta-parameters non-finite (the step was undone)")
        return loss.item(), accs.cpu().numpy()

    def forward(self, x_spt, y_spt, x_qry, y_qry, step_accuracies=True):
        """One meta-step on a batch of tasks: adapt, meta-loss, backward through the adaptation, Adam step.

        Returns (loss, accs) as meta_loss does, the loss as a float and accs as a numpy array (NaN before the
        last step with step_accuracies=False: not measured). Raises
        NonFiniteError if the meta-gradient is not finite or if the step would make θ non-finite (an
        overflow inside Adam); either way θ and Adam's state are left as they were before the step
        (step_tensors), and the caller stops without saving, so the last checkpoint holds finite weights.
        """
        adam_started = bool(self.meta_optim.state)
        loss, accs, refused = self.step_tensors(x_spt, y_spt, x_qry, y_qry, step_accuracies)
        if not adam_started and int(refused):
            self.meta_optim.state.clear()  # the state Adam created at a refused first step: it had none before
        return self.read_step(loss, accs, refused)

    def finetunning(self, x_spt, y_spt, x_qry, y_qry, per_task=False):
        """Adapt to test tasks for `update_step_test` steps and measure the query accuracy at each step.

        (The name keeps the reference PyTorch code's spelling, dragen1860/MAML-Pytorch, which users of
        this lineage search for.) Takes one task (x [n, 1, 28, 28]) or a batch (x [T, n, 1, 28, 28]).
        The meta-parameters are never changed: the adaptation starts from θ detached (new tensors that
        share θ's memory but not its graph, so nothing flows back into θ), and its gradients are taken
        without a graph, since nothing differentiates through them. Returns a numpy array of
        update_step_test + 1 accuracies averaged over the tasks, or [T, update_step_test + 1] with
        per_task=True; index 0 is the accuracy before any inner step (chance, 1/N, before training).
        The tasks run all at once or one by one, as `path` says (with "compiled", as its rule says), shared
        among the task threads as in meta_loss.
        """
        if x_spt.dim() == 4:
            x_spt, y_spt, x_qry, y_qry = x_spt[None], y_spt[None], x_qry[None], y_qry[None]
        batch = (x_spt, y_spt, x_qry, y_qry)
        threads = task_threads(x_spt.device)
        if threads == 1:
            accs = self.share_finetunning(*batch)
        else:
            accs = torch.cat(list(thread_pool(threads).map(lambda share: self.share_finetunning(*share),
                                                           shares(batch, threads))))
        accs = accs.cpu().numpy()  # [T, update_step_test + 1]
        return accs if per_task else accs.mean(axis=0)

    def share_finetunning(self, x_spt, y_spt, x_qry, y_qry):
        """finetunning's accuracies of the tasks given, in the calling thread, all at once or one by one as
        `path` says: [T, update_step_test + 1], on the device."""
        if self.finetunning_path(x_spt.device, x_spt.shape[1] + x_qry.shape[1]) == "batched":
            return self.batch_finetunning(x_spt, y_spt, x_qry, y_qry)
        return torch.cat([self.batch_finetunning(*task) for task in one_by_one(x_spt, y_spt, x_qry, y_qry)])

    def batch_finetunning(self, x_spt, y_spt, x_qry, y_qry):
        """finetunning's accuracies with all the tasks at once: [T, update_step_test + 1], on the device."""
        start = [p.detach().requires_grad_() for p in self.net.parameters()]
        accs = []
        with torch.enable_grad():
            for fast_weights in self.adapt(x_spt, y_spt, self.update_step_test, start, create_graph=False):
                with torch.no_grad():
                    accs.append(accuracy_per_task(self.net(x_qry, fast_weights), y_qry))
        return torch.stack(accs, dim=1)
