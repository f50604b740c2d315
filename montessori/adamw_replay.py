"""One torch.optim.AdamW step replayed from a saved warm-up state, parameter by parameter.

The influence stage applies (or only computes) the step of each parameter as soon as its
gradient is complete, so it cannot call `AdamW.step()`; these functions are torch's single-tensor
AdamW path operation for operation (bit-identical in fp32), with the saved moments only read.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ModelError
from .optim_state import AdamWStateFile


@dataclass
class WarmupState:
    """The warm-up's AdamW state, keyed by parameter name, each moment on its parameter's device."""

    step: int
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    no_decay: set
    exp_avg: dict
    exp_avg_sq: dict

    @classmethod
    def load(cls, path, model, moment_dtype) -> "WarmupState":
        """Moments read tensor by tensor straight to each parameter's device (an 8B student's fp32
        moments are 64 GB: they never pass through host memory all at once)."""
        saved = AdamWStateFile(path)
        params = {name: param for name, param in model.named_parameters() if param.requires_grad}
        missing = [name for name in params if name not in saved.names]
        if missing:
            raise ModelError(f"{saved.path}: no AdamW moments for parameters {missing[:5]} (of {len(missing)})")
        exp_avg, exp_avg_sq = {}, {}
        for name, param in params.items():
            exp_avg[name], exp_avg_sq[name] = saved.moments(name, param.device, moment_dtype)
        return cls(step=saved.step, lr=saved.lr, betas=saved.betas, eps=saved.eps,
                   weight_decay=saved.weight_decay, no_decay=set(saved.no_decay),
                   exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)

    def decay(self, name: str) -> float:
        return 0.0 if name in self.no_decay else self.weight_decay


class Scratch:
    """Reusable fp32 work buffers (the size of the largest parameter, per device): the update runs
    once per parameter per example, and fresh multi-hundred-MB allocations each time cost more than
    the arithmetic."""

    def __init__(self):
        self.buffers: dict = {}

    def get(self, index: int, like):
        import torch

        key = (like.device, index)
        if key not in self.buffers or self.buffers[key].numel() < like.numel():
            self.buffers[key] = torch.empty(like.numel(), dtype=torch.float32, device=like.device)
        return self.buffers[key][:like.numel()].view(like.shape)


def _updated_moments(grad, exp_avg, exp_avg_sq, scratch: Scratch, betas):
    """(m', v') of the step, in scratch buffers 0 and 1, by torch's operations in torch's order."""
    import torch

    beta1, beta2 = betas
    grad = grad.to(torch.float32)
    exp_avg_new = torch.lerp(exp_avg.to(torch.float32), grad, 1 - beta1, out=scratch.get(0, grad))
    exp_avg_sq_new = torch.mul(exp_avg_sq.to(torch.float32), beta2, out=scratch.get(1, grad))
    exp_avg_sq_new.addcmul_(grad, grad, value=1 - beta2)
    return exp_avg_new, exp_avg_sq_new


def _new_moments(grad, exp_avg, exp_avg_sq, scratch: Scratch, step: int, betas, eps: float):
    """(m', denom) of the step, in scratch buffers 0 and 1."""
    exp_avg_new, denom = _updated_moments(grad, exp_avg, exp_avg_sq, scratch, betas)
    denom.sqrt_().div_((1 - betas[1] ** (step + 1)) ** 0.5).add_(eps)
    return exp_avg_new, denom


def adamw_apply_(param, grad, exp_avg, exp_avg_sq, scratch: Scratch, *, step: int, lr: float, betas,
                 eps: float, weight_decay: float) -> None:
    """One torch.optim.AdamW step (its single-tensor path) on `param` in place; the moments given
    are only read. In fp32 the result is bit-identical to `AdamW.step()`; with bf16 weights or
    moments the arithmetic is fp32 and only the new weight is rounded."""
    import torch

    exp_avg_new, denom = _new_moments(grad, exp_avg, exp_avg_sq, scratch, step, betas, eps)
    work = param if param.dtype == torch.float32 else scratch.get(2, param).copy_(param)
    if weight_decay != 0:
        work.mul_(1 - lr * weight_decay)
    work.addcdiv_(exp_avg_new, denom, value=-(lr / (1 - betas[0] ** (step + 1))))
    if work is not param:
        param.copy_(work)


def adamw_update_dot(vector, grad, exp_avg, exp_avg_sq, scratch: Scratch, *, step: int, lr: float, betas,
                     eps: float) -> float:
    """vector . (theta' - theta) of that step without its weight-decay term (which does not depend
    on the gradient: the caller adds -lr * weight_decay * (vector . theta), computed once).

    The hot path of `first_order`, once per parameter per pair, so it makes as few passes over
    memory as it can: with c = sqrt(1 - beta2^t), m' / (sqrt(v') / c + eps) = c m' / (sqrt(v') +
    c eps), and the scalar factors are applied to the dot product, not to the tensor (7 passes
    instead of 10; equal to the dot of the full update to fp32 rounding)."""
    import torch

    beta1, beta2 = betas
    exp_avg_new, denom = _updated_moments(grad, exp_avg, exp_avg_sq, scratch, betas)
    correction2 = (1 - beta2 ** (step + 1)) ** 0.5
    denom.sqrt_().add_(correction2 * eps)
    direction = exp_avg_new.div_(denom)
    scale = -(lr / (1 - beta1 ** (step + 1))) * correction2
    return scale * float(torch.dot(vector.reshape(-1), direction.view(-1)))
