"""MoCo v1 and v2 step for step against the official code (facebookresearch/moco): the same
weights, views and hyper-parameters through fastcl's method and the official training step; the
loss, every gradient, the parameters after SGD, the queue and the key encoder agree over three
steps, the queue wrapping around."""
import copy

import pytest
import torch
from torch import nn

from tests.methods.official.common import (assert_same, float64_method, official_step_agrees,
                                           params, random_views, sgd, trainer_step)


class OfficialMoCo(nn.Module):
    """moco/builder.py MoCo, retyped for one process: encoder_q is the given query encoder (the
    official base_encoder(num_classes=dim), with the MLP fc for v2), concat_all_gather is the
    identity and the DDP batch shuffle a random permutation of the one local batch."""

    def __init__(self, encoder_q, queue, K, m, T):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.encoder_q = encoder_q
        self.encoder_k = copy.deepcopy(encoder_q)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)  # initialize
            param_k.requires_grad = False  # not update by gradient
        # Official: normalize(torch.randn(dim, K), dim=0); here fastcl's initial queue, transposed.
        self.register_buffer("queue", queue.T.clone())
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.mul_(self.m).add_(param_q.mul(1. - self.m))

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        assert self.K % batch_size == 0  # for simplicity
        self.queue[:, ptr:ptr + batch_size] = keys.T
        ptr = (ptr + batch_size) % self.K
        self.queue_ptr[0] = ptr

    def forward(self, im_q, im_k):
        q = self.encoder_q(im_q)
        q = nn.functional.normalize(q, dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            # _batch_shuffle_ddp / _batch_unshuffle_ddp on one process
            idx_shuffle = torch.randperm(im_k.shape[0])
            idx_unshuffle = torch.argsort(idx_shuffle)
            k = self.encoder_k(im_k[idx_shuffle])
            k = nn.functional.normalize(k, dim=1)
            k = k[idx_unshuffle]
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])
        logits = torch.cat([l_pos, l_neg], dim=1)
        logits /= self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long)
        self._dequeue_and_enqueue(k)
        return logits, labels


@pytest.mark.parametrize("version", ["mocov1", "mocov2"])
def test_moco_steps_match_official(version):
    # The official settings (v1: T 0.07; v2: T 0.2, MLP head of the backbone's width; m 0.999),
    # a queue of 16 keys (65536 on ImageNet) so that three batches of 8 wrap around, one BN group
    # (the official shuffle BN on one process: a permutation, which BatchNorm does not see).
    temperature = 0.07 if version == "mocov1" else 0.2
    hp = dict(temperature=temperature, momentum=0.999, queue_size=16, bn_groups=1)
    if version == "mocov2":
        hp["mlp_hidden"] = 64  # the 1/8-width ResNet-18's features: the official dim_mlp
    fast = float64_method(version, **hp)
    assert fast.backbone.out_dim == 64
    official = OfficialMoCo(copy.deepcopy(nn.Sequential(fast.backbone, fast.head)),
                            fast.queue.tensor, K=16, m=0.999, T=temperature)
    fast_params, official_params = params(fast.backbone, fast.head), params(official.encoder_q)
    fast_opt, official_opt = sgd(fast_params), sgd(official_params)  # main_moco.py's SGD
    criterion = nn.CrossEntropyLoss()  # main_moco.py
    for step in range(3):
        im_q, im_k = random_views(2, seed=step)
        loss = trainer_step(fast, fast_opt, [im_q, im_k], step, 3)

        output, target = official(im_q, im_k)
        official_loss = criterion(output, target)
        official_step_agrees(official_opt, official_loss, loss, fast_params, official_params,
                             step)
        assert_same([fast.queue.tensor], [official.queue.T], f"step {step} queue")
        assert int(fast.queue.pointer) == int(official.queue_ptr)
    # fastcl moves the key encoder after the step, the official code before the next keys.
    official._momentum_update_key_encoder()
    assert_same(params(fast.key_encoder), params(official.encoder_k), "key encoder")


def test_moco_trains_under_bf16_autocast():
    """The trainer's --precision bf16: bf16 queries against float32 keys (a TypeError before)."""
    fast = float64_method("mocov2", queue_size=16).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fast([v.float() for v in random_views(2)])
    loss.backward()
    assert torch.isfinite(loss) and fast.queue.tensor.dtype == torch.float32
