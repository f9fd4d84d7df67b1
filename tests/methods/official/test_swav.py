"""SwAV step for step against the official code (facebookresearch/swav): the same weights, crops
and hyper-parameters through fastcl's method and the official training step (main_swav.py train:
prototype normalization, the multi-crop forward of src/resnet50.py, distributed_sinkhorn, the
queue, the prototypes frozen in the first iterations); the loss, every gradient, the parameters,
the queue and the BatchNorm statistics agree over three steps."""
import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import assert_close
from tests.methods.official.common import (TOL, assert_same, float64_method, params, random_views,
                                           sgd, trainer_step)

EPSILON, SINKHORN_ITERATIONS, TEMPERATURE = 0.05, 3, 0.1


class OfficialSwAV(nn.Module):
    """src/resnet50.py ResNet's forward (backbone once per resolution, then the projection head,
    n() and the prototypes once on all crops), retyped around the given backbone."""

    def __init__(self, backbone, out_dim, hidden_mlp, output_dim, nmb_prototypes):
        super().__init__()
        self.backbone = backbone
        self.projection_head = nn.Sequential(nn.Linear(out_dim, hidden_mlp),
                                             nn.BatchNorm1d(hidden_mlp), nn.ReLU(inplace=True),
                                             nn.Linear(hidden_mlp, output_dim))
        self.prototypes = nn.Linear(output_dim, nmb_prototypes, bias=False)

    def forward_head(self, x):
        x = self.projection_head(x)
        x = nn.functional.normalize(x, dim=1, p=2)
        return x, self.prototypes(x)

    def forward(self, inputs):
        idx_crops = torch.cumsum(torch.unique_consecutive(
            torch.tensor([inp.shape[-1] for inp in inputs]), return_counts=True)[1], 0)
        start_idx = 0
        for end_idx in idx_crops:
            _out = self.backbone(torch.cat(inputs[start_idx:end_idx]))
            output = _out if start_idx == 0 else torch.cat((output, _out))
            start_idx = end_idx
        return self.forward_head(output)


def distributed_sinkhorn(out):
    """main_swav.py distributed_sinkhorn on one process (world size 1, no all-reduce)."""
    Q = torch.exp(out / EPSILON).t()
    B = Q.shape[1]
    K = Q.shape[0]
    sum_Q = torch.sum(Q)
    Q /= sum_Q
    for it in range(SINKHORN_ITERATIONS):
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        Q /= sum_of_rows
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def official_step(model, optimizer, inputs, queue, iteration, freeze_prototypes_niters,
                  crops_for_assign=(0, 1), nmb_crops=(2, 2)):
    """main_swav.py train, one iteration (use_the_queue is re-derived from the queue each
    step: once full it stays full). Returns the loss and the gradients the optimizer used."""
    with torch.no_grad():
        w = model.prototypes.weight.data.clone()
        w = nn.functional.normalize(w, dim=1, p=2)
        model.prototypes.weight.copy_(w)
    embedding, output = model(inputs)
    embedding = embedding.detach()
    bs = inputs[0].size(0)
    loss = 0
    for i, crop_id in enumerate(crops_for_assign):
        with torch.no_grad():
            out = output[bs * crop_id: bs * (crop_id + 1)].detach()
            if queue is not None:
                if not torch.all(queue[i, -1, :] == 0):
                    out = torch.cat((torch.mm(queue[i], model.prototypes.weight.t()), out))
                queue[i, bs:] = queue[i, :-bs].clone()
                queue[i, :bs] = embedding[crop_id * bs: (crop_id + 1) * bs]
            q = distributed_sinkhorn(out)[-bs:]
        subloss = 0
        for v in np.delete(np.arange(np.sum(nmb_crops)), crop_id):
            x = output[bs * v: bs * (v + 1)] / TEMPERATURE
            subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss += subloss / (np.sum(nmb_crops) - 1)
    loss /= len(crops_for_assign)
    optimizer.zero_grad()
    loss.backward()
    if iteration < freeze_prototypes_niters:
        for name, p in model.named_parameters():
            if "prototypes" in name:
                p.grad = None
    grads = {id(p): None if p.grad is None else p.grad.clone() for p in model.parameters()}
    optimizer.step()
    return loss, grads


def test_swav_steps_match_official():
    # The official settings (epsilon 0.05, 3 Sinkhorn iterations, temperature 0.1, the queue, the
    # prototypes frozen in the first iteration) at small sizes: 2 large crops of 8 px and 2 small
    # of 4 px, 10 prototypes, a queue of 16 (two batches: used from the third step). The official
    # optimizer is SGD wrapped in apex's LARC; here plain SGD on both sides.
    fast = float64_method("swav", temperature=TEMPERATURE, epsilon=EPSILON,
                          sinkhorn_iterations=SINKHORN_ITERATIONS, num_prototypes=10,
                          proj_hidden=32, proj_dim=16, freeze_prototypes_epochs=1,
                          queue_length=16, queue_start_epoch=0)
    official = OfficialSwAV(copy.deepcopy(fast.backbone), 64, 32, 16, 10).double()
    missing = official.projection_head.load_state_dict(fast.projector.state_dict(), strict=False)
    assert missing.missing_keys == ["0.bias"]  # the official bias before BN: no effect
    official.prototypes.load_state_dict(fast.prototypes.state_dict())
    queue = torch.zeros(2, 16, 16, dtype=torch.float64)
    fast_params = params(fast.backbone, fast.projector, fast.prototypes)
    official_params = [p for n, p in official.named_parameters() if n != "projection_head.0.bias"]
    fast_opt, official_opt = sgd(fast_params, lr=0.1), sgd(official.parameters(), lr=0.1)
    for step in range(3):
        epoch = min(step, 1)  # the prototypes frozen in epoch 0 = iteration 0
        crops = random_views(2, seed=step) + random_views(2, side=4, seed=10 + step)
        loss = trainer_step(fast, fast_opt, crops, step, 3, epoch=epoch)

        official_loss, grads = official_step(official, official_opt, crops, queue, step, 1)
        assert_close(loss, official_loss, TOL, f"step {step} loss")
        for i, (a, b) in enumerate(zip(fast_params, official_params)):
            g = grads[id(b)]
            assert (a.grad is None) == (g is None), f"step {step} [{i}]: gradient on one side"
            if g is not None:
                assert_close(a.grad, g, TOL, f"step {step} [{i}] gradient")
        assert_close(grads[id(official.projection_head[0].bias)],
                     torch.zeros(32, dtype=torch.float64), TOL, "official bias before BN")
        assert_same(fast_params, official_params, f"step {step} parameters")
        assert_same([fast.queue], [queue], f"step {step} queue")
        # BatchNorm statistics, but the projector's running mean, which carries the official
        # bias before it (a shift that the batch statistics of training remove).
        stats = [[t for n, t in m.named_buffers() if "running" in n and n != skip]
                 for m, skip in ((nn.Sequential(fast.backbone, fast.projector), "1.1.running_mean"),
                                 (official, "projection_head.1.running_mean"))]
        assert_same(*stats, f"step {step} BN statistics")
    assert fast.queue[:, -1].any()  # full: the third step's codes used it
