"""BatchNorm with batch statistics over every rank, applied to a single-device model from outside.

The alignment MLPs (SimSiam form) normalise over the batch of (parent, child) pairs, and each rank sees only
its own micro-batch of pairs (a handful per crop). Synchronised, every rank normalises with the statistics of
the concatenated batch, as one device holding all of it would. torch's ``SyncBatchNorm`` runs on CUDA only;
this one all-reduces (count, sum, sum of squares) through ``torch.distributed.nn``'s differentiable
all-reduce, so the gradient flows to every rank's inputs, on gloo (CPU) and NCCL (tensors on the device)
alike. Statistics are computed in at least float32 whatever the parameter dtype.

The model never calls torch.distributed: :func:`convert_sync_batchnorm` swaps the modules in before the engine
wraps the model, keeping their parameters and buffers (so checkpoints, resume and export carry the same keys).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn


class SyncBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` on (P, D) whose training statistics are those of every rank's rows together.

    Every rank must call it the same number of times in the same order (it is a collective in training
    mode); in eval mode it uses the running statistics and communicates nothing.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"SyncBatchNorm1d expects (P, D), got {tuple(x.shape)}")
        dtype = torch.promote_types(x.dtype, torch.float32)  # at least float32 under bf16
        xf = x.to(dtype)
        if self.training or self.running_mean is None:
            mean, var = self._batch_stats(xf)
        else:
            mean, var = self.running_mean.to(dtype), self.running_var.to(dtype)
        y = (xf - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.to(dtype) + self.bias.to(dtype)
        return y.to(x.dtype)

    def _batch_stats(self, xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and biased variance over every rank's rows (differentiable); updates the running statistics."""
        local = torch.cat([xf.new_tensor([float(xf.shape[0])]), xf.sum(0), (xf * xf).sum(0)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from torch.distributed.nn.functional import all_reduce

            with warnings.catch_warnings():  # the differentiable all-reduce is the one with an autograd rule
                warnings.simplefilter("ignore", FutureWarning)
                local = all_reduce(local, op=dist.ReduceOp.SUM)
        count, d = float(local[0].detach()), xf.shape[1]
        if count < 2:
            raise ValueError("SyncBatchNorm1d: fewer than 2 rows over all ranks; batch statistics are undefined")
        mean = local[1:1 + d] / count
        var = (local[1 + d:] / count - mean * mean).clamp(min=0.0)  # biased, as BatchNorm normalises with
        if self.training and self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * count / (count - 1)
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        return mean, var


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every ``nn.BatchNorm1d`` replaced in place by a :class:`SyncBatchNorm1d` holding the same
    parameters and buffers. Returns ``module``."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm1d) and not isinstance(child, SyncBatchNorm1d):
            sync = SyncBatchNorm1d(child.num_features, eps=child.eps, momentum=child.momentum, affine=child.affine,
                                   track_running_stats=child.track_running_stats,
                                   device=child.running_mean.device if child.running_mean is not None else None,
                                   dtype=child.running_mean.dtype if child.running_mean is not None else None)
            sync.load_state_dict(child.state_dict())
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child)
    return module

