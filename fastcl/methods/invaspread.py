"""InvaSpread (Ye et al. 2019): invariant and spreading instance features, through
fastcl.losses.invaspread (exact leave-one-out log-sum-exps on the dense logits) or fastcl.nt_xent.

f = n(fc(backbone(x))) (fc: d -> feat_dim, 128 in the paper) for two augmented views of each image;
all 2B features are anchors.

- loss="invaspread" (the paper): for s_ak = exp(f_a . sg(f_k) / tau), D_a = sum_{k != a} s_ak,
  P_a = s_{a,p(a)} / D_a,
      L = -(1/2B) sum_a [log P_a + sum_{k not in {a, p(a)}} log(1 - s_ak / D_a)],
  the gradient flowing through the anchor side only.
- loss="nt_xent": the plain softmax form (SimCLR's NT-Xent: no spreading term, gradient through
  both sides), its modern equivalent.

The paper's CIFAR setting: tau 0.1, B 128, SGD lr 0.03, wd 5e-4. The defaults keep its tau, batch
and weight decay, with AdamW and the trainer's cosine schedule.
"""
from __future__ import annotations

from torch import Tensor, nn

import fastcl
from fastcl.augment import Recipe
from fastcl.losses.invaspread import InvaSpreadLoss
from fastcl.methods.base import MOCO_V1_COLOR, Method, min_scale_hparam

LOSSES = ("invaspread", "nt_xent")


class InvaSpread(Method):
    """InvaSpread: two views, anchor-side gradient, positive and spreading terms."""

    name = "invaspread"
    HPARAMS = {
        "temperature": (0.1, "temperature tau"),
        "feat_dim": (128, "embedding dimension"),
        "loss": ("invaspread", "invaspread (the paper's loss) or nt_xent (plain softmax form)"),
        "min_scale": min_scale_hparam(0.2),
    }
    # The paper's weight decay; its SGD (lr 0.03, B 128) needs far longer runs.
    DEFAULTS = {**Method.DEFAULTS, "weight_decay": 5e-4, "epochs": 10}

    def __init__(self, backbone, **kw):
        super().__init__(backbone, **kw)
        hp = self.hparams
        self.check_choice("loss", LOSSES)
        self.head = nn.Linear(backbone.out_dim, hp["feat_dim"])
        self.criterion = (InvaSpreadLoss(hp["temperature"], gather=self.gather)
                          if hp["loss"] == "invaspread"
                          else fastcl.NTXentLoss(hp["temperature"], gather=self.gather))

    def view_recipes(self, image_size: int) -> list[Recipe]:
        return self.same_views(image_size, **MOCO_V1_COLOR)

    def forward(self, views: list[Tensor], *, epoch: int = 0) -> Tensor:
        z1, z2 = (self.head(self.backbone(v)) for v in views)
        return self.criterion(z1, z2)
