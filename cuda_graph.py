"""One meta-iteration as one CUDA graph: MetaLearner.step_tensors captured once, then replayed.

On a GPU a meta-iteration is thousands of small kernels (convolutions on 1 to 75 images of 28 x 28 or
smaller per task), and launching them one by one from Python takes longer than running them (SPEED.md,
"On a GPU").
torch.cuda.CUDAGraph records the kernels that one call of step_tensors launches, with the addresses of
their arguments, and `replay()` launches them all again at once.

What a recording requires (PyTorch's notes on CUDA graphs, "whole network capture"), and how it is met:

* The same memory every time. Each batch is copied into static input tensors before a replay. θ, its
  gradients and Adam's state are updated in place: step_tensors sets the gradients to None, so backward
  allocates them from the graph's own memory during the capture, and every replay writes them there
  again. The outputs (loss, accs, refused) are the tensors the captured call returned, overwritten by
  each replay, so they are read before the next one (read_step does, at once).
* No host synchronisation and no branch on a value: step_tensors reads no number (a refused step is
  undone by selection, see meta.py) and runs Adam with capturable=True, its step counts on the GPU.
* A warm-up before the capture, on the side stream that then captures, so that cuDNN and cuBLAS pick
  their kernels and the autograd engine sets up its streams outside the recording. The warm-up steps
  are real meta-steps; θ and Adam's state are copied before them and written back after, in place, so
  that capturing changes nothing and the first replay computes the step the eager path would.

The graph is the function the eager path runs: step_tensors, which forward calls too. On the CPU, where
nothing is captured, tests/test_maml.py checks that step_tensors takes the same steps as an unguarded
meta-step, bit for bit; on a GPU, tests/test_cuda_graph.py compares replay and eager to float32 rounding.
"""

import torch

WARMUP_STEPS = 3  # as in PyTorch's whole-network example


class GraphedMetaStep:
    """Called like MetaLearner.forward, (x_spt, y_spt, x_qry, y_qry) -> (loss, accs), and the same meta-step,
    replayed from a CUDA graph of step_tensors that the first call captures (batches of one shape only). The
    graph is one fixed function: it measures the step accuracies at every replay, whatever `step_accuracies`
    asks (MetaLearner.forward measures them only when asked)."""

    def __init__(self, meta_learner):
        self.meta_learner = meta_learner
        self.graph = None
        self.inputs = None  # the static batch: every replay reads these tensors
        self.outputs = None  # (loss, accs, refused) of step_tensors: every replay writes these tensors

    def __call__(self, x_spt, y_spt, x_qry, y_qry, step_accuracies=True):
        batch = (x_spt, y_spt, x_qry, y_qry)
        if self.graph is None:
            self.capture(batch)
        for static, tensor in zip(self.inputs, batch):
            if static.shape != tensor.shape:
                raise ValueError(f"the graph was captured for a batch of {[tuple(t.shape) for t in self.inputs]}, "
                                 f"got {[tuple(t.shape) for t in batch]}")
            static.copy_(tensor)
        self.graph.replay()
        return self.meta_learner.read_step(*self.outputs)

    def capture(self, batch):
        """Warm up on a side stream, put θ and Adam's state back as they were, and record one step_tensors."""
        meta_learner = self.meta_learner
        self.inputs = [tensor.clone() for tensor in batch]
        meta_learner.match_adam_to_device()
        theta = meta_learner.theta()
        optimizer_state = meta_learner.meta_optim.state
        with torch.no_grad():
            kept = {id(t): (t, t.clone()) for p in theta for t in [p, *optimizer_state.get(p, {}).values()]}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_STEPS):
                meta_learner.step_tensors(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.no_grad():
            for tensor, before in kept.values():
                tensor.copy_(before)
            for p in theta:  # state that the warm-up created: Adam's own initial state, step 0 and zero moments
                for t in optimizer_state[p].values():
                    if id(t) not in kept:
                        t.zero_()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=stream):
            self.outputs = meta_learner.step_tensors(*self.inputs)
