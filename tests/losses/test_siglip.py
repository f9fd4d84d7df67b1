"""fastcl.siglip against the float64 formula (fastcl.formulas.siglip) and open_clip's SigLipLoss:
the loss and the gradients of image, text, scale and bias, every reduction, 16-bit inputs, bad
arguments, torch.compile and gather=True over 2 gloo processes."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastcl import SigLIPLoss, formulas, siglip
from tests.helpers import assert_close, run_on_ranks


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def compare(backend, image, text, scale, bias, tol=2e-5, **options):
    """siglip on (image, text) in their dtype against the formula in float64, with tensor scale
    and bias; loss and the four gradients under a random upstream gradient."""
    s, b = torch.tensor(scale, device=backend), torch.tensor(bias, device=backend)
    inputs = _leaves(image, text, s, b)
    loss = siglip(*inputs, **options)
    upstream = torch.randn(loss.shape, dtype=torch.float64, device=backend)
    grads = torch.autograd.grad((loss * upstream.float()).sum(), inputs)
    inputs64 = _leaves(*(t.double() for t in (image, text, s, b)))
    loss64 = formulas.siglip(*inputs64, **options)
    grads64 = torch.autograd.grad((loss64 * upstream).sum(), inputs64)
    assert loss.dtype == torch.float32
    assert_close(loss, loss64, tol, "loss")
    for name, g, g64, x in zip(["image", "text", "scale", "bias"], grads, grads64, inputs):
        assert g.dtype == x.dtype
        assert_close(g, g64, tol if x.dtype == torch.float32 else 1e-2, f"d{name}")


@pytest.mark.parametrize("n,d", [(1, 3), (2, 1), (37, 60), (200, 257)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("normalize", [True, False])
def test_siglip(backend, n, d, reduction, normalize):
    if backend == "cpu" and n * d > 10000:
        from fastcl._backend import cpu_backend_name

        if cpu_backend_name() == "triton":
            pytest.skip("the interpreter is slow: the large shapes run on the C++ and reference")
    image, text = torch.randn(n, d, device=backend), torch.randn(n, d, device=backend)
    if not normalize:
        image, text = 0.3 * image, 0.3 * text
    compare(backend, image, text, 10.0, -10.0, reduction=reduction, normalize=normalize)


@pytest.mark.parametrize("scale,bias", [(1.0, 0.0), (100.0, -10.0), (1e4, 20.0)])
def test_scales(backend, scale, bias):
    """SigLIP's trained regime (100, -10) and logits ~1e4 (no overflow)."""
    image, text = torch.randn(33, 16, device=backend), torch.randn(33, 16, device=backend)
    text[:10] = image[:10] + 1e-3 * torch.randn(10, 16, device=backend)  # near-duplicates
    compare(backend, image, text, scale, bias, reduction="none")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    from fastcl._backend import cpu_backend_name

    if backend == "cpu" and dtype == torch.bfloat16 and cpu_backend_name() == "triton":
        pytest.skip("the Triton interpreter has no bfloat16 dot")
    image = torch.randn(40, 24, device=backend).to(dtype)
    text = torch.randn(40, 24, device=backend).to(dtype)
    compare(backend, image, text, 10.0, -10.0, tol=1e-3)


def test_equals_open_clip_siglip_loss():
    """open_clip's SigLipLoss on one process, retyped from src/open_clip/loss.py of
    mlfoundations/open_clip (commit 89fb801), get_ground_truth, get_logits and _loss (chunk_size
    0): the loss and the gradients of both feature sets, logit_scale and logit_bias."""

    def open_clip_siglip(image_features, text_features, logit_scale, logit_bias):
        logits = logit_scale * image_features @ text_features.T
        logits += logit_bias
        n = image_features.shape[0]
        labels = -torch.ones((n, n), device=image_features.device, dtype=image_features.dtype)
        labels = 2 * torch.eye(n, device=image_features.device,
                               dtype=image_features.dtype) + labels
        return -F.logsigmoid(labels * logits).sum() / image_features.shape[0]

    image = F.normalize(torch.randn(50, 32, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(50, 32, dtype=torch.float64), dim=1)
    log_scale, bias = torch.tensor(2.3, dtype=torch.float64), torch.tensor(-10.0,
                                                                          dtype=torch.float64)
    theirs_in = _leaves(image, text, log_scale, bias)
    theirs = open_clip_siglip(theirs_in[0], theirs_in[1], theirs_in[2].exp(), theirs_in[3])
    ours_in = _leaves(image.float(), text.float(), log_scale.float(), bias.float())
    # open_clip's model normalizes the features; its loss takes them as they are.
    ours = siglip(ours_in[0], ours_in[1], ours_in[2].exp(), ours_in[3], normalize=False)
    assert_close(ours, theirs, 1e-6, "loss")
    for name, a, b in zip(["image", "text", "logit_scale", "logit_bias"],
                          torch.autograd.grad(ours, ours_in),
                          torch.autograd.grad(theirs, theirs_in)):
        assert_close(a, b, 1e-5, name)


def test_module_matches_function():
    image, text = torch.randn(12, 8), torch.randn(12, 8)
    for reduction in ("mean", "sum", "none"):
        module = SigLIPLoss(reduction=reduction, normalize=False)
        torch.testing.assert_close(module(image, text, 5.0, -2.0),
                                   siglip(image, text, 5.0, -2.0, reduction=reduction,
                                          normalize=False))


def test_compile_fullgraph():
    image, text = _leaves(torch.randn(9, 6), torch.randn(9, 6))
    log_scale, bias = _leaves(torch.tensor(2.0), torch.tensor(-3.0))

    def loss_fn(image, text, log_scale, bias):
        return siglip(image, text, log_scale.exp(), bias)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(image, text, log_scale, bias), [image, text, log_scale,
                                                                        bias])
    want = torch.autograd.grad(loss_fn(image, text, log_scale, bias), [image, text, log_scale,
                                                                       bias])
    for a, b in zip(got, want):
        assert_close(a, b, 1e-6, "compiled gradient")


BAD = [
    (dict(image=[[1.0]]), TypeError, "image must be a torch.Tensor"),
    (dict(text=torch.ones(4, 3, dtype=torch.long)), TypeError, "text must be float32"),
    (dict(text=torch.ones(5, 3)), ValueError, "image and text must have the same shape"),
    (dict(image=torch.ones(4)), ValueError, "image must have 2 dimensions"),
    (dict(scale=0.0), ValueError, "scale must be a finite number > 0"),
    (dict(scale=float("inf")), ValueError, "scale must be a finite number > 0"),
    (dict(scale=1e300), ValueError, "scale must be finite in torch.float32"),
    (dict(scale="10"), TypeError, "scale must be a float or a 0-dim tensor"),
    (dict(scale=torch.ones(2)), TypeError, "scale must be a float or a 0-dim floating tensor"),
    (dict(bias=float("nan")), ValueError, "bias must be a finite number, got nan"),
    (dict(bias=None), TypeError, "bias must be a float or a 0-dim tensor"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
]


@pytest.mark.parametrize("bad,error,message", BAD)
def test_bad_arguments(bad, error, message):
    args = dict(image=torch.ones(4, 3), text=torch.ones(4, 3), scale=10.0, bias=-10.0)
    options = {"reduction": bad.pop("reduction")} if "reduction" in bad else {}
    args.update(bad)
    with pytest.raises(error, match=message):
        siglip(args["image"], args["text"], args["scale"], args["bias"], **options)


def test_bias_may_be_any_sign():
    image, text = torch.randn(6, 4), torch.randn(6, 4)
    assert torch.isfinite(siglip(image, text, 10.0, 3.0))
    assert torch.isfinite(siglip(image, text, 10.0, 0))


WORLD, N, D = 2, 5, 7


def _gather_worker(rank, results, image, text, log_scale, bias):
    rows = slice(rank * N, (rank + 1) * N)
    inputs = _leaves(image[rows], text[rows], log_scale, bias)
    loss = siglip(inputs[0], inputs[1], inputs[2].exp(), inputs[3], gather=True)
    loss.backward()
    results[rank] = (loss.detach(), *(t.grad for t in inputs))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_process_gather_equals_one_process():
    """Each rank's mean loss over its N images against all 2N texts: the ranks' average (what DDP
    does with gradients) equals one process over 2N rows, for the feature gradients and for the
    scale's and bias's (DDP averages those too)."""
    image, text = torch.randn(WORLD * N, D), torch.randn(WORLD * N, D)
    log_scale, bias = torch.tensor(2.0), torch.tensor(-4.0)
    results = run_on_ranks(_gather_worker, image, text, log_scale, bias, world=WORLD)
    inputs = _leaves(image, text, log_scale, bias)
    loss = siglip(inputs[0], inputs[1], inputs[2].exp(), inputs[3])
    loss.backward()
    per_rank = [results[r] for r in range(WORLD)]
    assert_close(sum(r[0] for r in per_rank) / WORLD, loss, 1e-6, "loss")
    for r, (_, d_image, d_text, d_scale, d_bias) in enumerate(per_rank):
        rows = slice(r * N, (r + 1) * N)
        # DDP averages over ranks; the gathered texts' gradients are summed over ranks already.
        assert_close(d_image / WORLD, inputs[0].grad[rows], 1e-5, "image")
        assert_close(d_text / WORLD, inputs[1].grad[rows], 1e-5, "text")
    assert_close(sum(r[3] for r in per_rank) / WORLD, inputs[2].grad, 1e-5, "scale")
    assert_close(sum(r[4] for r in per_rank) / WORLD, inputs[3].grad, 1e-5, "bias")
