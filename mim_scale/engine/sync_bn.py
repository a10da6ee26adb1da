"""BatchNorm with batch statistics over every rank, applied to a single-device model from outside.

The alignment MLPs (SimSiam form) normalise over the batch of (parent, child) pairs, and each rank sees only
its own micro-batch of pairs (a handful per crop). Synchronised, every rank normalises with the statistics of
the concatenated batch, as one device holding all of it would. torch's ``SyncBatchNorm`` runs on CUDA only;
this one all-reduces (count, sum, sum of squares) through ``torch.distributed.nn``'s differentiable
all-reduce, so the gradient flows to every rank's inputs, on gloo (CPU) and NCCL (tensors on the device)
alike. Statistics are computed in float32 whatever the parameter dtype.

The model never calls torch.distributed: :func:`convert_sync_batchnorm` swaps the modules in before the engine
wraps the model, keeping their parameters and buffers (so checkpoints, resume and export carry the same keys).
"""

from __future__ import annotations

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
        if not self.training or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        xf = x.float()
        local = torch.cat([xf.new_tensor([float(xf.shape[0])]), xf.sum(0), (xf * xf).sum(0)])
        total = all_reduce(local, op=dist.ReduceOp.SUM)
        count, d = total[0], x.shape[1]
        mean = total[1:1 + d] / count
        var = (total[1 + d:] / count - mean * mean).clamp(min=0.0)  # biased, as BatchNorm normalises with
        if float(count) < 2:
            raise ValueError("SyncBatchNorm1d: fewer than 2 rows over all ranks; batch statistics are undefined")
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * count / (count - 1)
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        y = (xf - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.float() + self.bias.float()
        return y.to(x.dtype)


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

