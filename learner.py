"""BaseNet: the paper's Omniglot network, written so that any weights can be plugged in.

MAML adapts a copy of the weights to every task (the "fast weights" θ'ᵢ) and then differentiates
through that adaptation. Copying an `nn.Module` per task is slow and hides the math, so this network
keeps its parameters in one explicit list and its `forward(x, params)` runs with whatever list of
tensors it is given: the meta-parameters θ, or fast weights that are themselves functions of θ.

The architecture is the one of Finn et al. (2017), appendix A.1, for Omniglot:

    4 x [conv 3x3, 64 filters, stride 2, padding 1 -> batch norm -> ReLU]     28 -> 14 -> 7 -> 4 -> 2
    -> mean over the 2x2 spatial positions -> linear layer to n_way logits

Its weights, `BaseNet.weights`, in this order (`BaseNet.param_names`):

    conv1.weight [64, 1, 3, 3], bn1.weight [64], bn1.bias [64],
    conv2.weight [64, 64, 3, 3], bn2.weight [64], bn2.bias [64],
    conv3.weight ..., bn3.weight, bn3.bias, conv4.weight ..., bn4.weight, bn4.bias,
    fc.weight [n_way, 64], fc.bias [n_way]

Three choices, each documented because reproductions differ on them:

* Batch norm is transductive: it always normalises with the statistics of the batch it is given, at
  meta-training and at test time, as the MAML reference code does (TensorFlow's batch_norm in training
  mode). Each task is normalised with its own statistics. "Transductive" because the prediction for a
  query image then depends on the other query images of its task (they share the statistics): the
  query set is classified as a whole, not image by image. There are no running statistics, so nothing
  can drift between training and evaluation. The batch-norm scale and shift are ordinary parameters
  and are adapted in the inner loop with the rest (the reference code learns only a shift, outside the
  inner loop). The epsilon is the reference's 1e-3.
* The convolutions have no bias: a per-channel constant added before batch norm is removed again by the
  mean subtraction, so its gradient is exactly zero and it would be pure wasted work.
* Initialisation: Glorot (Xavier) uniform for the conv and linear weights; zeros for the linear bias
  and the batch-norm shift, ones for the batch-norm scale. The reference uses Xavier for its conv
  weights too, but draws its Omniglot output layer from a unit normal (a known deviation, listed in
  the README).

Many tasks at once. `forward` takes one task, x [n, 1, 28, 28], or a batch of T tasks,
x [T, n, 1, 28, 28]. With a batch, every parameter may be shared by all tasks (shaped as in the list
above) or given per task (with a leading dimension T): fast weights after an inner step differ per
task. The tasks are laid side by side along the channel axis, [n, T*C, H, W], so that

* the T convolutions with T different weights are one grouped convolution (groups=T), and
* per-task batch norm is ordinary batch norm over T*C channels: each channel of each task is
  normalised over its own task's n images and H x W positions.

The whole meta-batch thus runs as a few large operations instead of thousands of small ones, and the
numbers are the same as running the tasks one by one (tests/test_maml.py checks this against a plain
per-task loop).

The first layer, compiled for the CPU. Its convolution has one input channel: each output value is a
product of a 3 x 3 patch of the image (9 numbers) with a filter. Under torch.compile on the CPU (the
compiled meta-step, meta.py) it is written so, F.unfold's patches times the filters, which inductor
compiles into its own kernels, where oneDNN's kernel for one input channel is slow (SPEED.md). The same
function, to float32 rounding; eager, and on any other device, it stays F.conv2d (`first_layer_as_patches`).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

HIDDEN = 64
BLOCKS = 4
BN_EPS = 1e-3


def first_layer_as_patches(x):
    """Whether the first layer runs as a product of patches (the module docstring): under torch.compile, on
    the CPU."""
    return x.device.type == "cpu" and torch.compiler.is_compiling()


class BaseNet(nn.Module):
    """The 4-block conv net of the MAML paper, run with its own weights or any given list."""

    def __init__(self, n_way, in_channels=1):
        super().__init__()
        self.param_names = []
        params = []
        channels = in_channels
        for block in range(1, BLOCKS + 1):
            conv_weight = torch.empty(HIDDEN, channels, 3, 3)
            nn.init.xavier_uniform_(conv_weight)
            params += [conv_weight, torch.ones(HIDDEN), torch.zeros(HIDDEN)]
            self.param_names += [f"conv{block}.weight", f"bn{block}.weight", f"bn{block}.bias"]
            channels = HIDDEN
        fc_weight = torch.empty(n_way, HIDDEN)
        nn.init.xavier_uniform_(fc_weight)
        params += [fc_weight, torch.zeros(n_way)]
        self.param_names += ["fc.weight", "fc.bias"]
        self.weights = nn.ParameterList([nn.Parameter(p) for p in params])  # in param_names order

    def forward(self, x, params=None):
        """Logits for one task, x [n, C, 28, 28] -> [n, n_way], or for T tasks, x [T, n, C, 28, 28] -> [T, n, n_way].

        `params` is a list of tensors in `param_names` order (default: this net's own weights).
        Each entry is shared by all tasks (the shape of the net's own parameter) or holds one set per
        task (a leading dimension T).
        """
        params = list(self.weights) if params is None else list(params)
        if len(params) != len(self.weights):
            raise ValueError(f"expected {len(self.weights)} parameter tensors, got {len(params)}")
        one_task = x.dim() == 4
        if one_task:
            x = x.unsqueeze(0)
        tasks, n, channels, height, width = x.shape
        params = [p if p.dim() > own.dim() else p.expand(tasks, *own.shape) for p, own in zip(params, self.weights)]
        # params[i]: [T, *shape of own parameter i]

        # Tasks side by side along the channels, task by task: [T, n, C, H, W] -> [n, T*C, H, W], where
        # channels t*C .. t*C + C-1 are task t's. The per-task conv weights [T, 64, C, 3, 3] become
        # [T*64, C, 3, 3]: output channels t*64 .. t*64 + 63 are task t's filters. With groups=T the
        # convolution splits the input channels into T blocks of C and the filters into T blocks of 64,
        # and applies filter block t to input block t only: T independent convolutions in one call.
        h = x.transpose(0, 1).reshape(n, tasks * channels, height, width)  # [n, T*C, 28, 28]
        for block in range(BLOCKS):
            conv_weight, bn_weight, bn_bias = params[3 * block: 3 * block + 3]  # [T, 64, C, 3, 3], [T, 64], [T, 64]
            if block == 0 and first_layer_as_patches(h):
                patches = F.unfold(h, 3, padding=1, stride=2).view(n, tasks, channels * 9, -1)  # [n, T, 9, 196]
                h = torch.einsum("tok,ntkl->ntol", conv_weight.flatten(2), patches)  # [n, T, 64, 196]
                h = h.reshape(n, tasks * HIDDEN, (height + 1) // 2, (width + 1) // 2)
            else:
                h = F.conv2d(h, conv_weight.reshape(-1, *conv_weight.shape[2:]), stride=2, padding=1, groups=tasks)
            # h: [n, T*64, H/2, W/2], halving 28 -> 14 -> 7 -> 4 -> 2
            # Batch norm over n and H x W for each of the T*64 channels: per task, per channel.
            h = F.batch_norm(h, None, None, bn_weight.reshape(-1), bn_bias.reshape(-1), training=True, eps=BN_EPS)
            h = F.relu(h)
        features = h.mean(dim=(2, 3)).reshape(n, tasks, HIDDEN).transpose(0, 1)  # [T, n, 64]
        fc_weight, fc_bias = params[-2:]
        logits = torch.baddbmm(fc_bias.unsqueeze(1), features, fc_weight.transpose(1, 2))  # [T, n, n_way]
        return logits[0] if one_task else logits
