"""What the step-for-step comparisons with the official code share: a float64 method on a small
backbone, random views, the official optimizer, and checks that two lists of parameters (or their
gradients) agree."""
import torch
from torch import nn

from tests.helpers import assert_close, make_method

TOL = 1e-9  # float64 on both sides: only the order of the sums differs


def float64_method(name, channels=1, image_size=8, **hparams):
    """make_method(name) (1/8-width ResNet-18, seed-0 weights) in float64, training mode."""
    return make_method(name, channels, image_size=image_size, **hparams).double().train()


def random_views(count, batch=8, channels=1, side=8, seed=0):
    """`count` (batch, channels, side, side) float64 standard-normal views (already augmented)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, side, side, generator=g, dtype=torch.float64)
            for _ in range(count)]


def params(*modules):
    """The parameters of the modules, in order (as nn.Sequential(*modules) lists them)."""
    return list(nn.Sequential(*modules).parameters())


def sgd(parameters, lr=0.03, momentum=0.9, weight_decay=1e-4):
    """MoCo's (and SimSiam's, InstDisc's, CMC's, SupContrast's) optimizer: SGD with momentum."""
    return torch.optim.SGD([p for p in parameters if p.requires_grad], lr=lr,
                           momentum=momentum, weight_decay=weight_decay)


def trainer_step(method, optimizer, views, step, total_steps, *, epoch=0, scale=1.0, **extras):
    """One step of method as the trainer takes it (loss * scale backward, after_backward, the
    optimizer, after_step); returns the unscaled loss."""
    loss = method(views, epoch=epoch, **extras)
    optimizer.zero_grad()
    (scale * loss).backward()
    method.after_backward(epoch)
    optimizer.step()
    method.after_step(step, total_steps)
    return loss


def assert_same(fast, official, what, tol=TOL):
    """Two equally long lists of tensors (or of parameters' .grad when grad=True) agree."""
    assert len(fast) == len(official), f"{what}: {len(fast)} != {len(official)} tensors"
    for i, (a, b) in enumerate(zip(fast, official)):
        assert_close(a, b, tol, f"{what} [{i}]")


def assert_grads(fast, official, what, tol=TOL):
    """The parameters' gradients agree (None on both sides counts as equal)."""
    assert len(fast) == len(official), f"{what}: {len(fast)} != {len(official)} parameters"
    for i, (a, b) in enumerate(zip(fast, official)):
        assert (a.grad is None) == (b.grad is None), f"{what} [{i}]: gradient on one side only"
        if a.grad is not None:
            assert_close(a.grad, b.grad, tol, f"{what} [{i}] gradient")


def official_step_agrees(optimizer, official_loss, loss, fast_params, official_params, step):
    """The official loop's update (zero_grad, backward, step), then fastcl's step `loss` (the
    official one reshaped to its shape: CMC's is (1,)) and the parameters' gradients and values
    after both updates agree with it."""
    optimizer.zero_grad()
    official_loss.backward()
    optimizer.step()
    assert_close(loss, official_loss.reshape(loss.shape), TOL, f"step {step} loss")
    assert_grads(fast_params, official_params, f"step {step}")
    assert_same(fast_params, official_params, f"step {step} parameters")
