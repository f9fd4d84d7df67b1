"""InstDisc step for step against the official code (zhirongw/lemniscate.pytorch): the same
weights, memory bank, images, indices, sampled negatives and hyper-parameters through fastcl's
method and the official training step (main.py: lib/NCEAverage.py NCEAverage + lib/NCECriterion.py
NCECriterion, or lib/LinearAverage.py LinearAverage + cross-entropy over the whole bank, SGD); the
loss, every gradient, the parameters, the memory bank and Z agree over three steps."""
import copy

import pytest
import torch
from torch import nn
from torch.autograd import Function

from tests.helpers import assert_close
from tests.methods.official.common import (assert_grads, assert_same, float64_method, params,
                                           random_views, sgd, trainer_step)

TOL = 1e-9
N, K, B = 32, 16, 8


class NCEFunction(Function):
    """lib/NCEAverage.py NCEFunction (the sampled negatives idx are given, as the AliasMethod
    draws them; column 0 is overwritten with y there). The bank update runs in backward."""

    @staticmethod
    def forward(self, x, y, memory, idx, params):
        K = int(params[0])
        T = params[1]
        Z = params[2]
        batchSize = x.size(0)
        outputSize = memory.size(0)
        inputSize = memory.size(1)
        idx.select(1, 0).copy_(y)
        weight = memory.index_select(0, idx.view(-1))
        weight.resize_(batchSize, K + 1, inputSize)
        out = torch.bmm(weight, x.reshape(batchSize, inputSize, 1))
        out.div_(T).exp_()
        if Z < 0:
            params[2] = out.mean() * outputSize
            Z = params[2]
        out.div_(Z).resize_(batchSize, K + 1)
        self.save_for_backward(x, y)
        self.data_for_backward = memory, weight, out, params
        return out

    @staticmethod
    def backward(self, gradOutput):
        x, y = self.saved_tensors
        memory, weight, out, params = self.data_for_backward
        K = int(params[0])
        T = params[1]
        momentum = params[3]
        batchSize = gradOutput.size(0)
        gradOutput = gradOutput.clone()  # (the old in-place .data ops, on a copy)
        gradOutput.mul_(out)
        gradOutput.div_(T)
        gradOutput = gradOutput.view(batchSize, 1, K + 1)
        gradInput = torch.bmm(gradOutput.data, weight)
        gradInput.resize_as_(x)
        weight_pos = weight.select(1, 0).resize_as_(x)
        weight_pos.mul_(momentum)
        weight_pos.add_(torch.mul(x, 1 - momentum))
        w_norm = weight_pos.pow(2).sum(1, keepdim=True).pow(0.5)
        updated_weight = weight_pos.div(w_norm)
        memory.index_copy_(0, y, updated_weight)
        return gradInput, None, None, None, None


def nce_criterion(x, nLem, eps=1e-7):
    """lib/NCECriterion.py NCECriterion.forward."""
    batchSize = x.size(0)
    K = x.size(1) - 1
    Pnt = 1 / float(nLem)
    Pns = 1 / float(nLem)
    Pmt = x.select(1, 0)
    Pmt_div = Pmt.add(K * Pnt + eps)
    lnPmt = torch.div(Pmt, Pmt_div)
    Pon_div = x.narrow(1, 1, K).add(K * Pns + eps)
    Pon = Pon_div.clone().fill_(K * Pns)
    lnPon = torch.div(Pon, Pon_div)
    lnPmt = lnPmt.log()
    lnPon = lnPon.log()
    lnPmtsum = lnPmt.sum(0)
    lnPonsum = lnPon.view(-1, 1).sum(0)
    return - (lnPmtsum + lnPonsum) / batchSize


class LinearAverageOp(Function):
    """lib/LinearAverage.py LinearAverageOp: logits against the whole bank; the bank update runs
    in backward."""

    @staticmethod
    def forward(self, x, y, memory, params):
        T = params[0]
        out = torch.mm(x, memory.t())
        out.div_(T)
        self.save_for_backward(x, memory, y, params)
        return out

    @staticmethod
    def backward(self, gradOutput):
        x, memory, y, params = self.saved_tensors
        T = params[0]
        momentum = params[1]
        gradOutput = gradOutput / T
        gradInput = torch.mm(gradOutput, memory)
        gradInput.resize_as_(x)
        weight_pos = memory.index_select(0, y.view(-1)).resize_as_(x)
        weight_pos.mul_(momentum)
        weight_pos.add_(torch.mul(x, 1 - momentum))
        w_norm = weight_pos.pow(2).sum(1, keepdim=True).pow(0.5)
        updated_weight = weight_pos.div(w_norm)
        memory.index_copy_(0, y, updated_weight)
        return gradInput, None, None, None


class Normalize(nn.Module):
    """lib/normalize.py Normalize: x / ||x||_2 (the model's last layer)."""

    def forward(self, x):
        norm = x.pow(2).sum(1, keepdim=True).pow(1. / 2)
        return x.div(norm)


@pytest.mark.parametrize("loss", ["nce", "softmax"])
def test_instdisc_steps_match_official(loss):
    # The official settings (tau 0.07, bank momentum 0.5, SGD lr 0.03 momentum 0.9 wd 1e-4) on a
    # bank of N = 32 rows. loss="nce": K = 16 sampled negatives, Z estimated on the first batch.
    # loss="softmax": every other bank row as a negative (K = N - 1), which is LinearAverage's
    # cross-entropy over the whole bank (fastcl samples K rows; here all of them).
    negatives_per_anchor = K if loss == "nce" else N - 1
    fast = float64_method("instdisc", num_items=N, loss=loss,
                          num_negatives=negatives_per_anchor, temperature=0.07,
                          bank_momentum=0.5)
    model = nn.Sequential(copy.deepcopy(fast.backbone), copy.deepcopy(fast.head), Normalize())
    memory = fast.memory.tensor.clone()  # official: uniform in +-1/sqrt(D/3), not unit rows
    nce_params = torch.tensor([K, 0.07, -1, 0.5], dtype=torch.float64)
    fast_params, official_params = params(fast.backbone, fast.head), params(model)
    fast_opt, official_opt = sgd(fast_params), sgd(official_params)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        (images,) = random_views(1, seed=step)
        index = torch.randperm(N, generator=g)[:B]
        if loss == "nce":
            idx = torch.randint(0, N, (B, K + 1), generator=g)  # official: AliasMethod.draw
            negatives = idx[:, 1:].clone()
        else:  # every row but the anchor's own
            negatives = torch.stack([torch.cat([torch.arange(i), torch.arange(i + 1, N)])
                                     for i in index.tolist()])
        loss_value = trainer_step(fast, fast_opt, [images, negatives], step, 3, indices=index)

        feature = model(images)
        if loss == "nce":
            output = NCEFunction.apply(feature, index, memory, idx, nce_params)
            # NCECriterion adds eps = 1e-7 to each denominator P + K / n: the only difference,
            # some 1e-6 of the gradients; without it everything agrees to float64 rounding.
            assert_close(loss_value, nce_criterion(output.detach(), N).squeeze(), 1e-6,
                         "loss with the official eps")
            official_loss = nce_criterion(output, N, eps=0.0)
        else:
            output = LinearAverageOp.apply(feature, index, memory,
                                           torch.tensor([0.07, 0.5], dtype=torch.float64))
            official_loss = nn.CrossEntropyLoss()(output, index)
        official_opt.zero_grad()
        official_loss.backward()
        official_opt.step()

        assert_close(loss_value, official_loss.squeeze(), TOL, f"step {step} loss")
        assert_grads(fast_params, official_params, f"step {step}", TOL)
        assert_same(fast_params, official_params, f"step {step} parameters", TOL)
        assert_same([fast.memory.tensor], [memory], f"step {step} memory bank", TOL)
        if loss == "nce":
            assert_close(fast.nce.z, nce_params[2], TOL, "Z")
