"""BaseNet and MetaLearner: shapes, exact second-order gradients, the first-order option, the
inner-loss scaling, the two paths through a batch of tasks and the rule that picks one, finetunning's
promises, the meta-step as one function (step_tensors) with its refusals, and real learning on Omniglot;
and that benchmark.py, which times them, loads neither the experiment nor matplotlib."""

import copy
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from learner import BaseNet
import meta
from meta import MetaLearner, NonFiniteError, shares, task_threads
import plain_maml
from omniglot_nshot import random_tasks


def test_basenet_shapes_and_parameter_order():
    net = BaseNet(n_way=7)
    assert [tuple(p.shape) for p in net.weights][:3] == [(64, 1, 3, 3), (64,), (64,)]
    assert [tuple(p.shape) for p in net.weights][-2:] == [(7, 64), (7,)]
    assert len(net.param_names) == len(net.weights) == 14
    assert net(torch.rand(10, 1, 28, 28)).shape == (10, 7)
    assert net(torch.rand(3, 10, 1, 28, 28)).shape == (3, 10, 7)


def test_params_none_equals_explicit_list():
    torch.manual_seed(0)
    net = BaseNet(n_way=5)
    x = torch.rand(4, 10, 1, 28, 28)
    assert torch.equal(net(x), net(x, params=list(net.parameters())))
    assert torch.equal(net(x[0]), net(x[0], params=[p.clone() for p in net.parameters()]))


def test_batched_forward_with_per_task_weights_equals_one_task_at_a_time():
    torch.manual_seed(0)
    net = BaseNet(n_way=5)
    x = torch.rand(3, 10, 1, 28, 28)
    per_task = [p.detach() + 0.1 * torch.randn(3, *p.shape) for p in net.parameters()]
    batched = net(x, per_task)
    for task in range(3):
        expected = plain_maml.forward(x[task], [p[task] for p in per_task])
        torch.testing.assert_close(batched[task], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_the_first_layer_as_patches_is_the_convolution_to_second_order(in_channels, monkeypatch):
    """The form the compiled CPU meta-step gives the first layer (learner.first_layer_as_patches), run eager
    here in float64: the logits, their gradient and a gradient of that gradient (what second-order MAML
    differentiates) equal the convolution's, for one task and for a batch with per-task weights."""
    torch.manual_seed(0)
    net = BaseNet(n_way=5, in_channels=in_channels).double()
    x = torch.rand(3, 10, in_channels, 28, 28, dtype=torch.float64)
    per_task = [(p.detach() + 0.1 * torch.randn(3, *p.shape, dtype=torch.float64)).requires_grad_()
                for p in net.parameters()]

    def outputs(xs, params):
        logits = net(xs, params)
        grads = torch.autograd.grad(logits.square().sum(), params, create_graph=True)
        return [logits, *grads, *torch.autograd.grad(sum(g.square().sum() for g in grads), params)]

    for xs, params in ((x, per_task), (x[0], [p[0] for p in per_task])):
        convolution = outputs(xs, params)
        with monkeypatch.context() as patched:
            patched.setattr(torch.compiler, "is_compiling", lambda: True)
            patches = outputs(xs, params)
        assert not torch.equal(patches[0], convolution[0])  # another computation, not the same kernels
        for a, b in zip(patches, convolution):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_batch_norm_is_transductive_and_per_task():
    """Each task is normalised with its own statistics: shifting one task's images leaves the
    logits of the other tasks unchanged, and there are no running statistics."""
    torch.manual_seed(0)
    net = BaseNet(n_way=5)
    x = torch.rand(2, 5, 1, 28, 28)
    shifted = x.clone()
    shifted[1] = shifted[1] * 3 + 1
    assert torch.equal(net(x)[0], net(shifted)[0])
    assert not torch.allclose(net(x)[1], net(shifted)[1])
    assert list(net.buffers()) == []


@pytest.mark.parametrize("batching", ["batched", "per task"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_way, update_lr, update_step", [(5, 0.4, 3), (20, 0.1, 2)])  # the paper's inner rates
@pytest.mark.parametrize("first_order", [False, True])
def test_fast_path_matches_the_per_task_loop(n_way, update_lr, update_step, first_order, dtype, batching):
    """Loss, per-step accuracies and meta-gradient of both of MetaLearner's paths equal the plain loop's.

    float64 shows that the two compute the same function (to 1e-10). float32 is held to rtol 1e-4 on a
    small problem: on large ones a pre-activation within rounding of zero can fall on the other side of
    a ReLU in one of the two computations, and the gradient jumps by that unit's share, in either
    implementation alike (measured: up to 5% between float32 and float64 for the loop itself).
    """
    torch.manual_seed(1)
    meta_learner = MetaLearner(n_way=n_way, k_spt=1, update_lr=update_lr, meta_lr=1e-3, update_step=update_step,
                               update_step_test=3, first_order=first_order, batching=batching).to(dtype)
    tasks = random_tasks(2, n_way, 1, 1, torch.Generator().manual_seed(2), dtype=dtype)
    theta = meta_learner.theta()
    rtol = 1e-4 if dtype == torch.float32 else 1e-10

    loss, accs = meta_learner.meta_loss(*tasks)
    grads = torch.autograd.grad(loss, theta)
    expected_loss, expected_accs = plain_maml.meta_loss(theta, *tasks, k_spt=1, update_lr=update_lr,
                                                       update_step=update_step, first_order=first_order)
    expected_grads = torch.autograd.grad(expected_loss, theta)

    torch.testing.assert_close(loss, expected_loss, rtol=rtol, atol=0)
    np.testing.assert_allclose(accs.numpy(), expected_accs, rtol=1e-6)
    for name, grad, expected in zip(meta_learner.net.param_names, grads, expected_grads):
        assert torch.linalg.norm(grad - expected) <= rtol * torch.linalg.norm(expected), name


def tiny_float64_problem():
    torch.manual_seed(3)
    meta_learner = MetaLearner(n_way=3, k_spt=1, update_lr=0.4, meta_lr=1e-3, update_step=2, update_step_test=2)
    meta_learner.double()
    tasks = random_tasks(2, 3, 1, 2, torch.Generator().manual_seed(4), dtype=torch.float64)
    return meta_learner, tasks


def test_second_order_meta_gradient_matches_finite_differences():
    """∇θ of the outer loss, computed by autograd through the inner steps, against central finite
    differences of the outer loss as a function of θ, along random directions, in float64."""
    meta_learner, tasks = tiny_float64_problem()
    theta = meta_learner.theta()
    loss, _ = meta_learner.meta_loss(*tasks)
    grads = torch.autograd.grad(loss, theta)

    def outer_loss_at(shift):
        with torch.no_grad():
            for p, d in zip(theta, shift):
                p.add_(d)
        value = meta_learner.meta_loss(*tasks)[0].item()
        with torch.no_grad():
            for p, d in zip(theta, shift):
                p.sub_(d)
        return value

    generator = torch.Generator().manual_seed(5)
    eps = 1e-6
    for _ in range(4):
        direction = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in theta]
        norm = torch.sqrt(sum((d ** 2).sum() for d in direction))
        direction = [d / norm for d in direction]
        analytic = sum((g * d).sum() for g, d in zip(grads, direction)).item()
        numeric = (outer_loss_at([eps * d for d in direction])
                   - outer_loss_at([-eps * d for d in direction])) / (2 * eps)
        assert abs(analytic - numeric) <= 1e-4 * abs(numeric), (analytic, numeric)


def test_first_order_differs_and_equals_detached_inner_gradients():
    meta_learner, tasks = tiny_float64_problem()
    theta = meta_learner.theta()
    second = torch.autograd.grad(meta_learner.meta_loss(*tasks)[0], theta)
    meta_learner.first_order = True
    first = torch.autograd.grad(meta_learner.meta_loss(*tasks)[0], theta)
    # A second way to write first-order MAML: the inner gradients taken with their graph, then detached.
    autograd_grad = torch.autograd.grad
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.autograd, "grad", lambda *args, **kw: [g.detach() for g in autograd_grad(*args, **kw)])
        detached_loss, _ = plain_maml.meta_loss(theta, *tasks, k_spt=1, update_lr=0.4, update_step=2)
    detached = torch.autograd.grad(detached_loss, theta)

    for f, d in zip(first, detached):
        torch.testing.assert_close(f, d, rtol=1e-10, atol=1e-12)
    difference = torch.sqrt(sum(((s - f) ** 2).sum() for s, f in zip(second, first)))
    size = torch.sqrt(sum((s ** 2).sum() for s in second))
    assert difference > 1e-3 * size, "first- and second-order meta-gradients should differ"


@pytest.mark.parametrize("n_way, k_spt", [(5, 1), (5, 5), (20, 1)])
def test_inner_loss_is_n_times_mean_cross_entropy(n_way, k_spt):
    torch.manual_seed(6)
    meta_learner = MetaLearner(n_way=n_way, k_spt=k_spt, update_lr=0.4, meta_lr=1e-3, update_step=1,
                               update_step_test=1)
    logits = torch.randn(3, n_way * k_spt, n_way, requires_grad=True)
    labels = torch.arange(n_way).repeat(3, k_spt)
    inner = meta_learner.support_loss(logits, labels)  # [3]
    mean_ce = torch.stack([F.cross_entropy(logits[t], labels[t]) for t in range(3)])
    torch.testing.assert_close(inner, n_way * mean_ce)
    inner_grad, = torch.autograd.grad(inner.sum(), logits)
    mean_grad, = torch.autograd.grad(mean_ce.sum(), logits)
    torch.testing.assert_close(inner_grad, n_way * mean_grad)


def test_finetunning_keeps_meta_parameters_and_starts_from_them():
    torch.manual_seed(7)
    meta_learner = MetaLearner(n_way=5, k_spt=1, update_lr=0.4, meta_lr=1e-3, update_step=1, update_step_test=3)
    before = [p.detach().clone() for p in meta_learner.theta()]
    x_spt, y_spt, x_qry, y_qry = random_tasks(6, 5, 1, 3, torch.Generator().manual_seed(8))

    per_task = meta_learner.finetunning(x_spt, y_spt, x_qry, y_qry, per_task=True)
    assert per_task.shape == (6, 4)
    np.testing.assert_allclose(meta_learner.finetunning(x_spt, y_spt, x_qry, y_qry), per_task.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(meta_learner.finetunning(x_spt[2], y_spt[2], x_qry[2], y_qry[2]), per_task[2],
                               rtol=1e-6)
    with torch.no_grad():
        unadapted = (meta_learner.net(x_qry).argmax(-1) == y_qry).float().mean(1).numpy()
    np.testing.assert_array_equal(per_task[:, 0], unadapted)
    for p, b in zip(meta_learner.theta(), before):
        assert torch.equal(p, b)
        assert p.grad is None


def test_forward_takes_an_adam_step_and_reports_step_accuracies():
    torch.manual_seed(9)
    meta_learner = MetaLearner(n_way=5, k_spt=1, update_lr=0.4, meta_lr=1e-3, update_step=2, update_step_test=3)
    before = [p.detach().clone() for p in meta_learner.theta()]
    loss, accs = meta_learner(*random_tasks(4, 5, 1, 1, torch.Generator().manual_seed(10)))
    assert accs.shape == (3,) and np.all((0 <= accs) & (accs <= 1))
    assert isinstance(loss, float) and np.isfinite(loss)
    assert all(not torch.equal(p, b) for p, b in zip(meta_learner.theta(), before))


def test_a_non_finite_meta_gradient_is_never_stepped_into():
    """An inner rate of 1e15 sends the fast weights to infinity: the meta-gradient is NaN while the loss the
    step reports could still look finite. The step must refuse before Adam touches θ or its own state."""
    torch.manual_seed(9)
    meta_learner = MetaLearner(n_way=5, k_spt=1, update_lr=1e15, meta_lr=1e-3, update_step=1, update_step_test=1)
    before = [p.detach().clone() for p in meta_learner.theta()]
    with pytest.raises(NonFiniteError, match="meta-gradient is not finite"):
        meta_learner(*random_tasks(2, 5, 1, 1, torch.Generator().manual_seed(10)))
    assert all(torch.equal(p, b) for p, b in zip(meta_learner.theta(), before))
    assert meta_learner.meta_optim.state_dict()["state"] == {}  # Adam never stepped


@pytest.mark.parametrize("n_way, k_spt, k_qry, on_the_cpu", [(5, 1, 1, "batched"), (5, 2, 2, "batched"),
                                                             (5, 3, 3, "per task"), (20, 1, 1, "per task"),
                                                             (5, 1, 15, "per task")])
def test_the_cpu_runs_tasks_of_more_than_20_images_one_by_one(n_way, k_spt, k_qry, on_the_cpu, monkeypatch,
                                                              one_thread):
    """The rule (MetaLearner.path), and that meta_loss and finetunning follow it: per task, their batched
    code runs once per task, on batches of one (with one thread, so that one task thread has every task)."""
    meta_learner = MetaLearner(n_way=n_way, k_spt=k_spt, update_lr=0.4, meta_lr=1e-3, update_step=1,
                               update_step_test=1)
    images = n_way * (k_spt + k_qry)
    assert meta_learner.path(torch.device("cpu"), images) == on_the_cpu
    assert meta_learner.path(torch.device("cuda"), images) == "batched"  # a device name needs no GPU

    batch_sizes = []  # the number of tasks each call of the batched code gets

    def counted(code):
        def call(self, *tasks):
            batch_sizes.append(len(tasks[0]))
            return code(self, *tasks)
        return call

    for name in ("batch_meta_loss", "batch_finetunning"):
        monkeypatch.setattr(MetaLearner, name, counted(getattr(MetaLearner, name)))
    tasks = random_tasks(3, n_way, k_spt, k_qry, torch.Generator().manual_seed(12))
    meta_learner.meta_loss(*tasks)
    meta_learner.finetunning(*tasks)
    assert batch_sizes == ([3, 3] if on_the_cpu == "batched" else [1] * 6)

    meta_learner.batching = "per task"
    assert meta_learner.path(torch.device("cpu"), 10) == meta_learner.path(torch.device("cuda"), 10) == "per task"


def test_finetunning_per_task_equals_batched():
    torch.manual_seed(14)
    meta_learner = MetaLearner(n_way=5, k_spt=1, update_lr=0.4, meta_lr=1e-3, update_step=1, update_step_test=3,
                               batching="batched").double()
    tasks = random_tasks(6, 5, 1, 3, torch.Generator().manual_seed(15), dtype=torch.float64)
    batched = meta_learner.finetunning(*tasks, per_task=True)
    meta_learner.batching = "per task"
    np.testing.assert_allclose(meta_learner.finetunning(*tasks, per_task=True), batched, rtol=0, atol=1e-12)


def test_batching_is_auto_batched_or_per_task():
    with pytest.raises(ValueError, match="batching must be one of"):
        MetaLearner(n_way=5, k_spt=1, update_lr=0.4, meta_lr=1e-3, update_step=1, update_step_test=1, batching="x")


def test_shares_are_consecutive_and_as_even_as_possible():
    tasks = torch.arange(5)
    assert [share[0].tolist() for share in shares((tasks, -tasks), 2)] == [[0, 1, 2], [3, 4]]
    assert [share[1].tolist() for share in shares((tasks, -tasks), 2)] == [[0, -1, -2], [-3, -4]]
    assert [share[0].tolist() for share in shares((tasks[:1],), 2)] == [[0]]  # no empty share


def test_task_threads_are_the_intra_op_threads_on_the_cpu():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert task_threads(torch.device("cpu")) == 2
        assert task_threads(torch.device("cuda")) == 1  # a device name needs no GPU
    finally:
        torch.set_num_threads(threads)


class ThreadRecordingNet(BaseNet):
    """BaseNet that notes, at every forward, the thread running it and that thread's intra-op thread count."""
    calls = []

    def forward(self, x, params=None):
        ThreadRecordingNet.calls.append((threading.get_ident(), torch.get_num_threads()))
        return super().forward(x, params)


@pytest.mark.parametrize("batching", ["batched", "per task"])
def test_two_task_threads_compute_the_one_thread_meta_step_and_finetunning(batching):
    """With two intra-op threads, the tasks of a batch (here 3: shares of 2 and 1) run on two worker threads
    of one intra-op thread each, the caller keeping its two, and compute the one-thread numbers: in float64
    the same meta-loss, accuracies, θ.grad after backward, and finetunning accuracies, to 1e-12."""
    threads = torch.get_num_threads()
    torch.manual_seed(52)
    meta_learner = MetaLearner(n_way=5, k_spt=1, update_lr=0.4, meta_lr=1e-3, update_step=2, update_step_test=2,
                               batching=batching, network=ThreadRecordingNet).double()
    tasks = random_tasks(3, 5, 1, 2, torch.Generator().manual_seed(53), dtype=torch.float64)
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            ThreadRecordingNet.calls = []
            meta_learner.zero_grad(set_to_none=True)
            loss, accs = meta_learner.meta_loss(*tasks)
            loss.backward()
            results.append((loss.detach(), accs, [p.grad for p in meta_learner.theta()],
                            torch.as_tensor(meta_learner.finetunning(*tasks, per_task=True))))
            assert torch.get_num_threads() == count  # the caller's own count, whatever the workers have
        workers = dict(ThreadRecordingNet.calls)
    finally:
        torch.set_num_threads(threads)
    assert len(workers) == 2 and threading.get_ident() not in workers and set(workers.values()) == {1}
    (loss, accs, grads, tested), (threaded_loss, threaded_accs, threaded_grads, threaded_tested) = results
    torch.testing.assert_close(threaded_loss, loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(threaded_accs, accs, rtol=0, atol=1e-7)  # accuracies are float32
    torch.testing.assert_close(threaded_tested, tested, rtol=0, atol=0)
    for name, grad, threaded in zip(meta_learner.net.param_names, grads, threaded_grads):
        assert torch.linalg.norm(threaded - grad) <= 1e-12 * torch.linalg.norm(grad), name


def learner_and_copies(copies, **kwargs):
    """A small MetaLearner and `copies` deep copies of it: equal θ, equal Adam, independent."""
    torch.manual_seed(11)
    settings = dict(n_way=5, k_spt=1, update_lr=0.4, meta_lr=1e-3, update_step=2, update_step_test=2)
    meta_learner = MetaLearner(**dict(settings, **kwargs))
    return [meta_learner] + [copy.deepcopy(meta_learner) for _ in range(copies)]


def tensors_of(meta_learner):
    """θ and Adam's state, copied: everything a meta-step changes and the next one reads."""
    theta = meta_learner.theta()
    state = meta_learner.meta_optim.state
    return [t.detach().clone() for p in theta for t in [p, *state.get(p, {}).values()]]


def all_equal(tensors, others):
    return len(tensors) == len(others) and all(torch.equal(t, o) for t, o in zip(tensors, others))


@pytest.mark.parametrize("batching", ["batched", "per task"])
def test_step_tensors_is_the_unguarded_meta_step_bit_for_bit(batching):
    """step_tensors, the meta-step that forward runs and cuda_graph.py captures, against the meta-step written
    plainly (zero the gradients, meta_loss, backward, Adam step): over three steps the loss, the accuracies, θ,
    its gradients and Adam's state agree to the last bit, so the guard against non-finite steps changes no
    number, and forward returns the same numbers."""
    guarded, plain, forwarded = learner_and_copies(2, batching=batching)
    for seed in range(3):
        tasks = random_tasks(3, 5, 1, 2, torch.Generator().manual_seed(20 + seed))
        loss, accs, refused = guarded.step_tensors(*tasks)
        plain.meta_optim.zero_grad(set_to_none=True)
        expected_loss, expected_accs = plain.meta_loss(*tasks)
        expected_loss.backward()
        plain.meta_optim.step()
        forward_loss, forward_accs = forwarded(*tasks)

        assert refused.item() == 0
        assert torch.equal(loss, expected_loss.detach()) and torch.equal(accs, expected_accs)
        assert forward_loss == expected_loss.item() and np.array_equal(forward_accs, expected_accs.numpy())
        assert all_equal(tensors_of(guarded), tensors_of(plain))
        assert all_equal(tensors_of(forwarded), tensors_of(plain))
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(guarded.theta(), plain.theta()))


@pytest.mark.parametrize("batching", ["batched", "per task"])
def test_a_meta_step_without_step_accuracies_takes_the_same_step_and_skips_their_query_passes(batching):
    """step_accuracies=False (training's meta-steps but every --step-accuracies-every-th): the same loss, last
    accuracy, θ, gradients and Adam state bit for bit over three steps, NaN for the accuracies before the last
    step, and one query forward pass per task or batch instead of update_step + 1 (k_qry = 2 here, so that the
    query passes are told from the support passes by their size)."""
    measuring, skipping = learner_and_copies(1, batching=batching)
    query_passes = {measuring: 0, skipping: 0}
    for meta_learner in query_passes:
        def counted(x, params=None, net=meta_learner.net, forward=meta_learner.net.forward, learner=meta_learner):
            query_passes[learner] += x.shape[-4] == 5 * 2  # N * k_qry images
            return forward(x, params)
        meta_learner.net.forward = counted
    for seed in range(3):
        tasks = random_tasks(3, 5, 1, 2, torch.Generator().manual_seed(60 + seed))
        loss, accs = measuring(*tasks)
        skipped_loss, skipped_accs = skipping(*tasks, step_accuracies=False)
        assert skipped_loss == loss and skipped_accs[-1] == accs[-1]
        assert np.isnan(skipped_accs[:-1]).all() and not np.isnan(accs).any()
        assert all_equal(tensors_of(skipping), tensors_of(measuring))
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(skipping.theta(), measuring.theta()))
    units = 3 * (batching == "per task") or min(3, torch.get_num_threads())  # task threads share a batch
    assert query_passes[skipping] == 3 * units and query_passes[measuring] == 3 * units * 3  # update_step = 2


def test_a_refused_step_leaves_theta_and_adam_state_as_they_were():
    """Once Adam has a state: a non-finite meta-gradient (refused 1) and an Adam step that makes θ non-finite (an
    infinite meta learning rate: refused 2) are undone inside step_tensors, without a branch, to the last bit of θ,
    Adam's moments and its step counts; forward names the reason. A refused first step leaves no Adam state."""
    meta_learner, = learner_and_copies(0)
    tasks = random_tasks(3, 5, 1, 2, torch.Generator().manual_seed(30))
    meta_learner(*tasks)
    before = tensors_of(meta_learner)

    meta_learner.update_lr = 1e15
    assert meta_learner.step_tensors(*tasks)[2].item() == 1
    assert all_equal(tensors_of(meta_learner), before)
    with pytest.raises(NonFiniteError, match="the meta-gradient is not finite"):
        meta_learner(*tasks)
    assert all_equal(tensors_of(meta_learner), before)

    meta_learner.update_lr = 0.4
    meta_learner.meta_optim.param_groups[0]["lr"] = float("inf")
    assert meta_learner.step_tensors(*tasks)[2].item() == 2
    assert all_equal(tensors_of(meta_learner), before)
    with pytest.raises(NonFiniteError, match="the Adam step made the meta-parameters non-finite"):
        meta_learner(*tasks)
    assert all_equal(tensors_of(meta_learner), before)

    fresh, = learner_and_copies(0, meta_lr=float("inf"))
    before = tensors_of(fresh)
    with pytest.raises(NonFiniteError, match="the Adam step made the meta-parameters non-finite"):
        fresh(*tasks)
    assert all_equal(tensors_of(fresh), before) and fresh.meta_optim.state_dict()["state"] == {}


def test_an_adam_state_saved_on_cuda_continues_on_the_cpu():
    """On CUDA Adam runs with capturable=True, which a checkpoint keeps and which Adam refuses on the CPU: the
    learner turns it back into the CPU's Adam, and the steps are those of a state saved on the CPU."""
    meta_learner, from_cuda = learner_and_copies(1)
    first, second = (random_tasks(3, 5, 1, 2, torch.Generator().manual_seed(seed)) for seed in (40, 41))
    meta_learner(*first)
    state = meta_learner.meta_optim.state_dict()
    saved_on_cuda = copy.deepcopy(state)
    for group in saved_on_cuda["param_groups"]:
        group["capturable"] = True
    from_cuda.load_state_dict(meta_learner.state_dict())
    from_cuda.meta_optim.load_state_dict(saved_on_cuda)
    (loss, accs), (expected_loss, expected_accs) = from_cuda(*second), meta_learner(*second)
    assert loss == expected_loss and np.array_equal(accs, expected_accs)
    assert all_equal(tensors_of(from_cuda), tensors_of(meta_learner))
    assert not from_cuda.meta_optim.param_groups[0]["capturable"]


def test_unadapted_accuracy_at_initialisation_is_chance(real_omniglot_npy):
    """Before any training, the step-0 accuracy on real tasks is 1/N: labels are a fresh permutation
    per task, so nothing but adaptation can tell the classes apart. (Real learning on the real data is
    checked by tests/test_regression.py: test accuracy above 60% after 500 meta-steps.)"""
    from omniglot_nshot import OmniglotNShot

    data_path, _ = real_omniglot_npy
    torch.manual_seed(13)
    data = OmniglotNShot(data_path, task_num=50, n_way=5, k_spt=1, k_qry=5, seed=0)
    meta_learner = MetaLearner(n_way=5, k_spt=1, update_lr=0.4, meta_lr=1e-3, update_step=1, update_step_test=1)
    accs = np.concatenate([meta_learner.finetunning(*data.next("val"), per_task=True) for _ in range(8)])
    assert accs.shape == (400, 2)
    assert abs(accs[:, 0].mean() - 0.2) < 0.03  # 400 tasks x 25 queries: standard error 0.004


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_compiled_path_computes_the_eager_paths_function(one_thread):
    """batching "compiled" (each task's meta-gradient from one compiled torch.func function) against the eager
    per-task path: the same loss, accuracies and θ.grad to float32 rounding, and a meta-gradient as close to a
    float64 eager computation's as the eager path's own, which only second order gives. One inner step, so
    that the compilation (once per process, thread count and shape; about 80 s with a cold cache) stays short,
    and the 5w1s setting's values on one thread, as test_experiment's --compile run, which then finds this
    compilation in the inductor cache (or this test finds that one)."""
    compiled, eager = learner_and_copies(1, batching="compiled", update_step=1)
    eager.batching = "per task"
    exact = copy.deepcopy(eager).double()
    tasks = random_tasks(3, 5, 1, 1, torch.Generator().manual_seed(50))
    results = {}
    for meta_learner, dtype in ((compiled, torch.float32), (eager, torch.float32), (exact, torch.float64)):
        loss, accs = meta_learner.meta_loss(*(t.to(dtype) if t.is_floating_point() else t for t in tasks))
        loss.backward()
        results[meta_learner] = loss.detach().double(), accs.double(), [p.grad.double() for p in meta_learner.theta()]
    assert compiled.compiler_works
    # Without the step accuracies: the same compiled function, the same loss and meta-gradient, NaN before the end.
    grads = [p.grad.clone() for p in compiled.theta()]
    compiled.meta_optim.zero_grad(set_to_none=True)
    loss, accs = compiled.meta_loss(*tasks, step_accuracies=False)
    loss.backward()
    assert torch.equal(loss.detach().double(), results[compiled][0]) and accs[-1].double() == results[compiled][1][-1]
    assert torch.isnan(accs[:-1]).all() and all(torch.equal(p.grad, g) for p, g in zip(compiled.theta(), grads))
    (loss, accs, grads), (eager_loss, eager_accs, eager_grads), (_, exact_accs, exact_grads) = results.values()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=0)
    assert torch.equal(accs, eager_accs) and torch.equal(accs, exact_accs)
    for name, grad, eager_grad, exact_grad in zip(compiled.net.param_names, grads, eager_grads, exact_grads):
        assert torch.linalg.norm(grad - eager_grad) <= 1e-5 * torch.linalg.norm(eager_grad), name
        error, eager_error = (torch.linalg.norm(g - exact_grad) / torch.linalg.norm(exact_grad)
                              for g in (grad, eager_grad))
        assert error <= max(2 * eager_error, 1e-6), (name, error.item(), eager_error.item())


def test_two_task_threads_run_the_compiled_path_with_its_one_thread_numbers(one_thread, monkeypatch):
    """With two intra-op threads the compiled path's tasks (here 3: shares of 2 and 1) run on two worker
    threads of one intra-op thread each, as the eager paths' do (its graph releases Python's GIL, so they run
    side by side: SPEED.md), and give the one-thread loss, accuracies and θ.grad, up to float32 rounding of
    the sums over the shares. The compiled function is test_the_compiled_path_computes_the_eager_paths_function's
    (the same shapes, the same thread count inside it): no second compilation with a warm cache."""
    meta_learner = learner_and_copies(0, batching="compiled", update_step=1)[0]
    compiled_function, calls = meta.task_meta_gradient(), []

    def recording(*args):  # the compiled function, noting the thread that calls it and its intra-op threads
        calls.append((threading.get_ident(), torch.get_num_threads()))
        return compiled_function(*args)

    monkeypatch.setattr(meta, "task_meta_gradient", lambda: recording)
    tasks = random_tasks(3, 5, 1, 1, torch.Generator().manual_seed(54))
    results, callers = [], []
    for count in (1, 2):
        torch.set_num_threads(count)
        calls.clear()
        meta_learner.zero_grad(set_to_none=True)
        loss, accs = meta_learner.meta_loss(*tasks)
        loss.backward()
        results.append((loss.detach(), accs, [p.grad for p in meta_learner.theta()]))
        callers.append(dict(calls))
        assert len(calls) == 3 and torch.get_num_threads() == count  # the caller keeps its own count
    assert meta_learner.compiler_works
    assert callers[0] == {threading.get_ident(): 1}
    assert len(callers[1]) == 2 and threading.get_ident() not in callers[1] and set(callers[1].values()) == {1}
    (loss, accs, grads), (threaded_loss, threaded_accs, threaded_grads) = results
    torch.testing.assert_close(threaded_loss, loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(threaded_accs, accs, rtol=0, atol=1e-6)
    for name, grad, threaded in zip(meta_learner.net.param_names, grads, threaded_grads):
        assert torch.linalg.norm(threaded - grad) <= 1e-6 * torch.linalg.norm(grad), name


def test_benchmark_loads_neither_the_experiment_nor_matplotlib():
    """Timing a meta-step needs the meta-learner, the settings and random tasks: not maml_omniglot.py, and
    not curves.py's matplotlib, which take seconds to load and are none of its business."""
    code = ("import sys, benchmark; loaded = {'maml_omniglot', 'curves', 'matplotlib'} & set(sys.modules); "
            "assert not loaded, f'benchmark.py loads {sorted(loaded)}'")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_without_a_cpp_compiler_the_compiled_path_says_so_in_one_line_and_runs_eager(one_thread, capsys):
    """torch.compile failing (here: no C++ compiler, and no cache to fall back on) leaves batching "compiled"
    on the eager path that the size rule picks, said in one line, computing exactly what that path does."""
    compiled, eager = learner_and_copies(1, batching="compiled", update_step=1)
    eager.batching = "auto"
    torch._dynamo.reset()  # forget what earlier tests compiled in this process, which would be reused
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/g++",), "force_disable_caches": True}):
        compiled.compile_meta_step(5, 1, 1)
    err = capsys.readouterr().err
    assert err.startswith("meta.py: torch.compile failed, the meta-step runs batched, eager: InvalidCxxCompiler")
    assert not compiled.compiler_works and compiled.path(torch.device("cpu"), 10) == "batched"
    tasks = random_tasks(3, 5, 1, 1, torch.Generator().manual_seed(51))
    assert compiled(*tasks)[0] == eager(*tasks)[0] and all_equal(tensors_of(compiled), tensors_of(eager))
