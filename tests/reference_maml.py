"""The plain per-task MAML loop: the independent computation the fast path in meta.py is tested against.

It shares nothing with learner.py and meta.py but the parameter order: every task runs on its own with
ordinary convolutions, and every inner step is written out. It is what most public reproductions do,
and it is slow, which is why meta.py does not run it.
"""

import torch
import torch.nn.functional as F

BN_EPS = 1e-3


def random_tasks(tasks, n_way, k_shot, k_query, generator, dtype=torch.float32):
    """Synthetic tasks shaped as OmniglotNShot serves them: random images, labels shuffled per task."""
    def labels(k):
        return torch.stack([torch.randperm(n_way, generator=generator).repeat(k) for _ in range(tasks)])
    x_spt = torch.rand(tasks, n_way * k_shot, 1, 28, 28, generator=generator, dtype=dtype)
    x_qry = torch.rand(tasks, n_way * k_query, 1, 28, 28, generator=generator, dtype=dtype)
    return x_spt, labels(k_shot), x_qry, labels(k_query)


def reference_forward(x, params):
    """One task, x [n, C, 28, 28], with a parameter list in BaseNet order -> logits [n, n_way]."""
    h = x
    for block in range(4):
        conv_weight, bn_weight, bn_bias = params[3 * block: 3 * block + 3]
        h = F.conv2d(h, conv_weight, stride=2, padding=1)
        h = F.batch_norm(h, None, None, bn_weight, bn_bias, training=True, eps=BN_EPS)
        h = F.relu(h)
    return F.linear(h.mean(dim=(2, 3)), params[-2], params[-1])


def reference_meta_loss(params, x_spt, y_spt, x_qry, y_qry, k_shot, update_lr, update_step,
                        first_order=False, detach_inner_grads=False):
    """Task by task: adapt, then the query loss. Returns (mean query loss over tasks, accs [update_step + 1]).

    first_order=True takes the inner gradients without create_graph; detach_inner_grads=True takes
    them with create_graph and then detaches them, a second way to write first-order MAML.
    """
    task_losses = []
    accs = torch.zeros(update_step + 1)
    for task in range(x_spt.shape[0]):
        fast_weights = list(params)
        for step in range(update_step + 1):
            query_logits = reference_forward(x_qry[task], fast_weights)
            accs[step] += (query_logits.argmax(dim=1) == y_qry[task]).float().mean().item()
            if step == update_step:
                task_losses.append(F.cross_entropy(query_logits, y_qry[task]))
                break
            support_logits = reference_forward(x_spt[task], fast_weights)
            support_loss = F.cross_entropy(support_logits, y_spt[task], reduction="sum") / k_shot
            grads = torch.autograd.grad(support_loss, fast_weights, create_graph=not first_order)
            if detach_inner_grads:
                grads = [g.detach() for g in grads]
            fast_weights = [w - update_lr * g for w, g in zip(fast_weights, grads)]
    return torch.stack(task_losses).mean(), (accs / x_spt.shape[0]).numpy()
