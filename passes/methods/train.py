"""One training loop for every method.

run() installs the method's hooks on the executor (TorchGraph: weight_hooks give effective
weights, value_hooks mask activations), then per batch: forward, loss + method.penalty(),
backward, optimizer step, method.step(i). At the end method.finalize() hardens the masks and
zeroes the pruned parameters, so the exported weights carry the exact pattern.

Batches are `feeds` or `(feeds, labels)`; feeds is a dict (graph input name -> tensor) or one
tensor. Without labels the loss distils to the dense model (a frozen copy taken before any
hook is installed): mean squared error of every floating-point output, relative to the teacher output's mean
square so the loss is scale-free. With labels it is the task loss (`loss_fn(outputs, labels)`;
default cross-entropy on the first output for integer labels, MSE otherwise).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
import torch.nn.functional as F


def install(net, method):
    """Put the method's hooks on the executor (TorchGraph reads these dicts at every forward)."""
    net.weight_hooks, net.value_hooks = method.weight_hooks(), method.value_hooks()


def outputs(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return list(out.values())
    return list(out)


def call(net, feeds):
    return net(**feeds) if isinstance(feeds, dict) else net(feeds)  # TorchGraph: by name or position


def split(batch):
    if isinstance(batch, tuple):
        if len(batch) != 2:
            raise ValueError("a batch is feeds or (feeds, labels); pass several inputs as a dict")
        return batch
    return batch, None


def distill_loss(student: list, teacher: list) -> torch.Tensor:
    """Over the floating-point outputs: an integer one (an argmax beside the scores) has no gradient."""
    loss = 0.0
    for s, t in zip(student, teacher):
        if s.is_floating_point():
            loss = loss + F.mse_loss(s, t) / t.pow(2).mean().clamp(min=1e-12)
    return loss


def task_loss(out: list, labels) -> torch.Tensor:
    if not labels.is_floating_point():
        return F.cross_entropy(out[0], labels)
    return F.mse_loss(out[0], labels)


def _finite_grads(net):
    """Removed channels are exact zeros; where one feeds a denominator (x / masked zero) its
    upstream gradient is 0 * inf = nan. Those channels are constant, so their gradient is 0."""
    for p in net.parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)


def run(net, method, batches, loss_fn=None, epochs=1, optimizer=None, lr=1e-3, teacher=None,
        train_mode=False, shuffle=True, seed=0) -> list[float]:
    """Train `net` (TorchGraph or any module with the same hooks) under `method` for `epochs`
    passes over `batches`; returns the loss per step (without the penalty).

    train_mode=False keeps the graph's inference semantics while training (BatchNormalization
    uses its running statistics, Dropout is off): robust with the small batches of calibration
    data; True uses batch statistics and updates them. `shuffle` visits the batches in a new
    (seeded) order every epoch."""
    batches = list(batches)
    steps = epochs * len(batches)
    if steps != method.total_steps:
        warnings.warn(f"method scheduled for {method.total_steps} steps, training for {steps}", stacklevel=2)
    labeled = any(split(b)[1] is not None for b in batches)
    if teacher is None and not labeled:
        teacher = copy.deepcopy(net)  # dense, before any hook
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    net.train(train_mode)
    install(net, method)
    if optimizer is None:
        optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    targets = {}
    losses = []
    i = 0
    order = np.random.default_rng(seed)
    for _epoch in range(epochs):
        visit = order.permutation(len(batches)) if shuffle else range(len(batches))
        for b in visit:
            batch = batches[b]
            feeds, labels = split(batch)
            out = outputs(call(net, feeds))
            if labels is not None:
                loss = loss_fn(out, labels) if loss_fn else task_loss(out, labels)
            else:
                if b not in targets:  # the teacher is frozen: one forward per batch suffices
                    with torch.no_grad():
                        targets[b] = [t.detach() for t in outputs(call(teacher, feeds))]
                loss = loss_fn(out, targets[b]) if loss_fn else distill_loss(out, targets[b])
            total = loss + method.penalty()
            if not torch.isfinite(total):
                raise FloatingPointError(f"loss is {float(total)} at step {i}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            _finite_grads(net)
            optimizer.step()
            method.step(i)
            if method.optimizer_reset:  # P-GaP workers start from fresh optimizer state
                optimizer.state.clear()
                method.optimizer_reset = False
            losses.append(float(loss.detach()))
            i += 1
    method.finalize()
    return losses
