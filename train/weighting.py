"""How the per-task losses combine into the one loss that is optimised.

* ``static``: ``sum_t w_t L_t`` with the configured weights.
* ``uncertainty`` (Kendall et al. 2018): learned log-variances ``s_t``, ``sum_t exp(-s_t) L_t + s_t``.
  The same form is used for every task (no 0.5 factor for regression), so at the optimum
  ``exp(-s_t) = 1 / L_t``: each task's weight is the inverse of its loss.
* ``gradnorm`` (Chen et al. 2018): weights that equalise the tasks' gradient norms, scaled by how
  far each task still is from its first loss. Gradients are taken with respect to the *shared
  representation* (the user model's output) rather than shared weights. Not under DeepSpeed ZeRO-3
  (the trainer refuses it): taking them runs the towers' backward once more per task, which
  ZeRO-3's reference-counted parameter gathering for the backward pass does not survive, and ZeRO-3
  hands the weighting's forward a copy of the representation, from which the losses do not derive
  (the gradients would be zeros). Weights are ``T * softmax(logits)``, which keeps
  their sum at the number of tasks T by construction instead of renormalising after each step.
  The returned loss is ``sum_t w_t L_t`` (weights held constant) plus the GradNorm term
  ``sum_t |w_t G_t - target_t|``, whose gradient only reaches the weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from common.errors import InputError
from train.config import LossWeightingConfig


class LossWeighting(nn.Module):
    def __init__(self, config: LossWeightingConfig, task_names: Sequence[str]):
        super().__init__()
        self.method = config.method
        self.task_names = list(task_names)
        num_tasks = len(self.task_names)
        if self.method == "static":
            missing = [name for name in self.task_names if name not in config.static_weights]
            if missing:
                raise InputError(f"model.loss_weighting.static_weights: no weight for task(s) {', '.join(missing)}")
            weights = [config.static_weights[name] for name in self.task_names]
            self.register_buffer("static_weights", torch.tensor(weights, dtype=torch.float))
        elif self.method == "uncertainty":
            self.log_variances = nn.Parameter(torch.zeros(num_tasks))
        else:
            self.alpha = config.gradnorm_alpha
            self.weight_logits = nn.Parameter(torch.zeros(num_tasks))
            # Each task's first positive loss: GradNorm's reference for its training rate.
            self.register_buffer("initial_losses", torch.full((num_tasks,), float("nan")))

    def weights(self) -> Tensor:
        """The current weight of each task, in ``task_names`` order."""
        if self.method == "static":
            return self.static_weights
        if self.method == "uncertainty":
            return torch.exp(-self.log_variances)
        return len(self.task_names) * torch.softmax(self.weight_logits, dim=0)

    def forward(self, losses: Mapping[str, Tensor], shared: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The total loss and the current weights (detached, for logging). ``shared`` is the
        representation every task reads (needed by GradNorm in training, ignored otherwise)."""
        stacked = torch.stack([losses[name] for name in self.task_names])
        weights = self.weights()
        if self.method == "static":
            total = (weights * stacked).sum()
        elif self.method == "uncertainty":
            total = (weights * stacked + self.log_variances).sum()
        else:
            total = (weights.detach() * stacked).sum()
            if self.training and shared is not None and shared.requires_grad and torch.is_grad_enabled():
                total = total + self._gradnorm_loss(stacked, weights, shared)
        return total, {name: weight.detach() for name, weight in zip(self.task_names, weights)}

    def _gradnorm_loss(self, losses: Tensor, weights: Tensor, shared: Tensor) -> Tensor:
        detached = losses.detach()
        with torch.no_grad():
            unset = self.initial_losses.isnan() & (detached > 0)
            self.initial_losses.copy_(torch.where(unset, detached, self.initial_losses))
        gradient_norms = torch.stack(
            [torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True, materialize_grads=True)[0].norm() for loss in losses]
        )
        weighted_norms = weights * gradient_norms
        loss_ratios = torch.where(self.initial_losses.isnan(), 1.0, detached / self.initial_losses)
        relative_rates = loss_ratios / loss_ratios.mean()
        targets = (weighted_norms.mean() * relative_rates**self.alpha).detach()
        return (weighted_norms - targets).abs().sum()
