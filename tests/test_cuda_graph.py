"""cuda_graph.py: the meta-step replayed from one CUDA graph is the eager meta-step, and a run records how it
computed. The graph tests need a GPU and skip without one, as in CI: gpu_check.sh runs them on a GPU machine.
On the CPU, tests/test_maml.py checks that step_tensors, the function the graph captures, is forward's step."""

import copy
import json

import numpy as np
import pytest
import torch

import maml_omniglot
import run_files
from cuda_graph import GraphedMetaStep
from meta import MetaLearner, NonFiniteError
from omniglot_nshot import random_tasks

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@pytest.fixture
def float32_rounding():
    """Convolutions and matrix products in float32, not TF32, so that two computations agree to float32 rounding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def eager_and_graphed(n_way, update_step):
    """Two equal MetaLearners on the GPU: one to step eagerly, one behind a GraphedMetaStep."""
    torch.manual_seed(0)
    eager = MetaLearner(n_way=n_way, k_spt=1, update_lr=0.4 if n_way == 5 else 0.1, meta_lr=1e-3,
                        update_step=update_step, update_step_test=3).cuda()
    graphed = copy.deepcopy(eager)
    return eager, graphed, GraphedMetaStep(graphed)


def cuda_tasks(n_way, seed, tasks=4):
    return [t.cuda() for t in random_tasks(tasks, n_way, 1, 1, torch.Generator().manual_seed(seed))]


def state_tensors(meta_learner):
    """θ and Adam's state, in a fixed order."""
    theta = meta_learner.theta()
    return [t for p in theta for t in [p, *meta_learner.meta_optim.state.get(p, {}).values()]]


def relative_difference(tensors, expected):
    difference = torch.sqrt(sum(((t - e).double() ** 2).sum() for t, e in zip(tensors, expected)))
    return (difference / torch.sqrt(sum((e.double() ** 2).sum() for e in expected))).item()


@needs_cuda
def test_capturing_changes_nothing():
    """The warm-up steps before the capture are real meta-steps: θ and Adam's state are put back, in place."""
    _, graphed, step = eager_and_graphed(5, 1)
    theta = list(graphed.theta())
    before = [p.detach().clone() for p in theta]
    step.capture(cuda_tasks(5, 1))
    assert all(torch.equal(p, b) for p, b in zip(theta, before))
    states = [graphed.meta_optim.state[p] for p in theta]  # Adam's initial state: step 0, zero moments
    assert all(len(state) == 3 and all(torch.count_nonzero(t) == 0 for t in state.values()) for state in states)


@needs_cuda
@pytest.mark.parametrize("n_way, update_step", [(5, 1), (20, 5)])
def test_the_graph_replays_the_eager_meta_step(float32_rounding, n_way, update_step):
    """On the same θ and Adam state, a replay and the eager step_tensors give the same loss, accuracies,
    meta-gradient and new θ to float32 rounding (cuDNN may add in another order), step after step."""
    eager, graphed, step = eager_and_graphed(n_way, update_step)
    for seed in range(3):
        tasks = cuda_tasks(n_way, 10 + seed)
        if seed:  # the same θ and Adam state for both, copied in place: the graph reads these very tensors
            with torch.no_grad():
                for t, e in zip(state_tensors(graphed), state_tensors(eager)):
                    t.copy_(e)
        loss, accs = step(*tasks)
        expected_loss, expected_accs = eager(*tasks)
        assert loss == pytest.approx(expected_loss, rel=1e-5)
        np.testing.assert_allclose(accs, expected_accs, atol=1 / (4 * n_way) + 1e-6)  # a near tie may flip one query
        grads = [p.grad for p in graphed.theta()]
        expected_grads = [p.grad for p in eager.theta()]
        assert relative_difference(grads, expected_grads) <= 1e-4
        assert relative_difference(state_tensors(graphed), state_tensors(eager)) <= 1e-5


@needs_cuda
def test_a_refused_step_in_the_graph_is_undone_and_training_goes_on():
    """A NaN image makes the meta-gradient NaN inside the replay: the graph undoes the step, the host raises, and
    the next finite batch takes the step the eager path takes."""
    eager, graphed, step = eager_and_graphed(5, 1)
    step(*cuda_tasks(5, 20))
    eager(*cuda_tasks(5, 20))
    before = [t.detach().clone() for t in state_tensors(graphed)]
    poisoned = cuda_tasks(5, 21)
    poisoned[0][0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="the meta-gradient is not finite"):
        step(*poisoned)
    assert all(torch.equal(t, b) for t, b in zip(state_tensors(graphed), before))
    loss, _ = step(*cuda_tasks(5, 22))
    expected_loss, _ = eager(*cuda_tasks(5, 22))
    assert loss == pytest.approx(expected_loss, rel=1e-4)


@needs_cuda
def test_a_batch_of_another_shape_is_refused():
    _, _, step = eager_and_graphed(5, 1)
    step(*cuda_tasks(5, 30))
    with pytest.raises(ValueError, match="the graph was captured for a batch of"):
        step(*cuda_tasks(5, 31, tasks=3))


@pytest.mark.parametrize("extra, tasks", [((), "compiled"), (("--no-compile",), "batched"),
                                          (("--k-spt", "5", "--no-compile", "--no-cuda-graph"), "per task")])
def test_a_run_records_how_it_computed(learnable_omniglot_npy, tmp_path, extra, tasks):
    """summary.json's segment says how the tasks ran (compiled on the CPU by default; with --no-compile 5-way
    1-shot batched, 5-shot one by one), among how many task threads (one per intra-op thread), that the CPU
    runs no graph, and every how many iterations the step accuracies were measured (the default)."""
    out = tmp_path / "out"
    argv = ["--data", str(learnable_omniglot_npy), "--out", str(out), "--device", "cpu", "--task-num", "2",
            "--iterations", "2", "--eval-every", "2", "--eval-tasks", "2", "--test-tasks", "2", *extra]
    assert maml_omniglot.main(argv) == 0
    [segment] = json.loads((out / "summary.json").read_text())["segments"]
    assert segment["computation"] == {"tasks": tasks, "task_threads": torch.get_num_threads(), "cuda_graph": False,
                                      "step_accuracies_every": 10}
    assert "cudnn" not in segment["device"]


def test_a_change_of_computation_between_segments_is_named():
    """A resumed run that computes otherwise continues with other rounding: the note on resuming says so."""
    cpu = {"device": "cpu"}
    before = run_files.new_segment(0, cpu, "python maml_omniglot.py", {"tasks": "batched", "cuda_graph": False})
    after = run_files.new_segment(5, cpu, "python maml_omniglot.py", {"tasks": "per task", "cuda_graph": False})
    assert run_files.describe_changes(before, after) == ["tasks batched -> per task"]
    del before["computation"]  # a segment written before it was recorded
    assert run_files.describe_changes(before, after) == ["cuda graph not recorded -> False",
                                                         "tasks not recorded -> per task"]
