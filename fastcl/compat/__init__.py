"""Drop-in adapters: the loss classes of open_clip, lightly and pytorch-metric-learning with their
constructor arguments, forward signatures, return values and distributed options, computed by
fastcl's fused losses. Change one import, keep the rest:

    from fastcl.compat.open_clip import ClipLoss, SigLipLoss   # was: from open_clip.loss import
    from fastcl.compat.lightly import NTXentLoss, DINOLoss, SwaVLoss, NegativeCosineSimilarity
    from fastcl.compat.pml import NTXentLoss, SupConLoss     # was: pytorch_metric_learning.losses

The adapters never import the peers (they need not be installed). A peer option that fastcl
cannot honour raises a ValueError at construction (or at the call, for inputs) naming the option
and what is supported. Losses are fp32 for 16-bit inputs (fp32 accumulation), where the peers
compute in the input dtype. docs/compat.md lists every adapter, option and difference.
"""
