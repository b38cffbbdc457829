"""MAML written plainly, one task at a time: read it before meta.py.

This is the whole algorithm of Finn et al. (2017) as most public code writes it, with nothing batched.
One meta-iteration (meta_step): for every task of the meta-batch, take `update_step` gradient steps on
its support set starting from θ (keeping the gradients in the graph, so that the meta-gradient can
flow through them), score the adapted weights on its query set, and average the query losses over the
tasks (meta_loss); then backpropagate that loss to θ, through the inner steps, and take one Adam step
on θ. Training is that, 60,000 times, on fresh batches of tasks:

    theta = [w.requires_grad_() for w in initial_weights]   # θ, in BaseNet's order (learner.py)
    meta_optim = torch.optim.Adam(theta, lr=1e-3)           # β
    for batch in batches_of_tasks:                          # x_spt, y_spt, x_qry, y_qry (omniglot_nshot.py)
        loss, accs = meta_step(theta, meta_optim, *batch, k_spt=1, update_lr=0.4, update_step=1)  # 5w1s

meta.py computes exactly the same numbers for all tasks at once (tests/test_maml.py checks it), which
is faster but harder to read.

It shares nothing with learner.py and meta.py but the parameter order (learner.py's
`BaseNet.param_names`): the network is written out again here with ordinary, per-task convolutions,
so that it is an independent computation to test the fast path against. benchmark.py times both.
"""

import torch
import torch.nn.functional as F

BN_EPS = 1e-3  # as learner.py, written again so that nothing here depends on it


def forward(x, params):
    """One task, x [n, C, 28, 28], with a parameter list in BaseNet order -> logits [n, n_way]."""
    h = x
    for block in range(4):
        conv_weight, bn_weight, bn_bias = params[3 * block: 3 * block + 3]
        h = F.conv2d(h, conv_weight, stride=2, padding=1)  # [n, 64, H/2, W/2]
        h = F.batch_norm(h, None, None, bn_weight, bn_bias, training=True, eps=BN_EPS)  # this task's statistics
        h = F.relu(h)
    return F.linear(h.mean(dim=(2, 3)), params[-2], params[-1])  # [n, 64] -> [n, n_way]


def meta_loss(params, x_spt, y_spt, x_qry, y_qry, k_spt, update_lr, update_step, first_order=False, accuracies=True):
    """Task by task: adapt, then the query loss. Returns (mean query loss over tasks, accs [update_step + 1]).

    params: θ, a list of tensors in BaseNet order. x_spt [T, N*K, 1, 28, 28], y_spt [T, N*K],
    x_qry [T, N*Q, 1, 28, 28], y_qry [T, N*Q]. accs[s] is the query accuracy after s inner steps,
    averaged over the tasks. first_order=True takes the inner gradients without create_graph (FOMAML).
    accuracies=False measures none (accs is None): only what the loss needs runs, the minimal loop that
    benchmark.py times the meta-step against.
    """
    task_losses = []
    accs = torch.zeros(update_step + 1)
    for task in range(x_spt.shape[0]):
        fast_weights = list(params)  # θ'ᵢ starts at θ: the same tensors, so gradients reach θ
        for step in range(update_step):
            if accuracies:  # the query accuracy before this step, no part of the loss
                with torch.no_grad():
                    accs[step] += (forward(x_qry[task], fast_weights).argmax(dim=1) == y_qry[task]).float().mean()
            # The inner loss: Σ CE / K over the support examples, as the reference code (see meta.py).
            support_logits = forward(x_spt[task], fast_weights)
            support_loss = F.cross_entropy(support_logits, y_spt[task], reduction="sum") / k_spt
            grads = torch.autograd.grad(support_loss, fast_weights, create_graph=not first_order)
            fast_weights = [w - update_lr * g for w, g in zip(fast_weights, grads)]  # θ'ᵢ ← θ'ᵢ − α ∇L
        query_logits = forward(x_qry[task], fast_weights)
        task_losses.append(F.cross_entropy(query_logits, y_qry[task]))
        if accuracies:
            accs[update_step] += (query_logits.argmax(dim=1) == y_qry[task]).float().mean().detach()
    return torch.stack(task_losses).mean(), (accs / x_spt.shape[0]).numpy() if accuracies else None


def meta_step(params, meta_optim, x_spt, y_spt, x_qry, y_qry, k_spt, update_lr, update_step, first_order=False,
              accuracies=True):
    """One meta-iteration: the meta-loss (adapt every task, score its query set), its gradient with respect
    to θ through the adaptation, one step of the meta-optimizer on θ. Returns (loss as a float, accs)."""
    meta_optim.zero_grad()
    loss, accs = meta_loss(params, x_spt, y_spt, x_qry, y_qry, k_spt, update_lr, update_step, first_order, accuracies)
    loss.backward()  # ∇θ of the mean query loss: through every inner step, the Hessian terms included
    meta_optim.step()  # θ ← Adam(θ, ∇θ)
    return loss.item(), accs
