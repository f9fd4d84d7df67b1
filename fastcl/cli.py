"""Command line: ``fastcl train METHOD``, ``fastcl eval``, ``fastcl list`` (also ``python -m fastcl``).

    fastcl train simclr                                  # the embedded digits, a few minutes on CPU
    fastcl train swav --data ~/cifar-10-batches-py --epochs 100 --precision bf16 --out runs/swav
    fastcl train simclr --config run.toml --resume       # options from a TOML / YAML file
    fastcl eval --checkpoint runs/simclr/last.pt
    torchrun --nproc_per_node=2 -m fastcl train simclr   # DDP: gloo on CPU, NCCL on GPU

A config file holds the same options as the command line (keys spelled with - or _); options given
on the command line win over it.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from fastcl import __version__
from fastcl.data import CACHE_BYTES, CACHE_CHOICES, default_workers
from fastcl.distributed import GATHERS
from fastcl.methods import METHODS, RING_METHODS
from fastcl.models import BACKBONES
from fastcl.optim import OPTIMIZERS

DEVICE_HELP = "auto (CUDA if present), cpu, cuda, cuda:1; default auto"
KNN_K_HELP = ("neighbours of the kNN evaluation, at most half the smallest class's training "
              "images; default 200")
_COMMON = ("data", "epochs", "batch_size", "lr", "weight_decay", "optimizer", "warmup_epochs",
           "backbone", "width", "device", "precision", "out", "resume", "seed", "deterministic",
           "knn_k", "image_size", "workers", "cache", "gather")


def _method_parser(sub, method_cls) -> argparse.ArgumentParser:
    d = method_cls.DEFAULTS
    p = sub.add_parser(method_cls.name, help=(method_cls.__doc__ or "").strip().split("\n")[0],
                       description=sys.modules[method_cls.__module__].__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_argument_group("run")
    run.add_argument("--config", metavar="FILE", help="TOML or YAML file with any of these options")
    run.add_argument("--data", metavar="PATH",
                     help="ImageFolder folder (train/, val/), CIFAR python batches folder or "
                          ".npz (x_train, y_train, x_test, y_test); default: the embedded "
                          "scikit-learn digits; digits-shift: the same digits moved, rescaled "
                          "and coloured (16 px RGB); digits-color: the digits in amber on blue "
                          "(8 px RGB)")
    run.add_argument("--image-size", type=int, metavar="PX",
                     help="side the images of an ImageFolder are cut to (a random crop when "
                          "training, the centred square when evaluating); default: the median "
                          "shorter side of its training images")
    run.add_argument("--workers", type=int,
                     help=f"DataLoader processes decoding an ImageFolder (0: in the training "
                          f"process); default {default_workers()} (the CPUs but one, at most 8)")
    run.add_argument("--cache", choices=CACHE_CHOICES, default="auto",
                     help=f"hold an ImageFolder's images in memory: auto (when they take at most "
                          f"{CACHE_BYTES >> 20} MiB at --image-size, else stream them from disk), "
                          f"always or never; default auto")
    run.add_argument("--epochs", type=int, help=f"default {d.get('epochs')}")
    run.add_argument("--batch-size", type=int, help=f"per process; default {d.get('batch_size')}")
    run.add_argument("--lr", type=float, help=f"peak learning rate; default {d.get('lr')}")
    run.add_argument("--weight-decay", type=float, help=f"default {d.get('weight_decay')}")
    run.add_argument("--optimizer", choices=OPTIMIZERS, help=f"default {d.get('optimizer')}")
    run.add_argument("--warmup-epochs", type=int,
                     help=f"epochs of linear learning-rate warm-up, fewer than --epochs; default "
                          f"{d.get('warmup_epochs')} (at most --epochs - 1)")
    run.add_argument("--backbone", choices=sorted(BACKBONES),
                     help=f"default {d.get('backbone')} (the ResNets with a small-image stem)")
    run.add_argument("--width", type=float, help=f"channel multiplier of the backbone; default "
                                                 f"{d.get('width', 1.0)}")
    run.add_argument("--device", default="auto", help=DEVICE_HELP)
    run.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                     help="default fp32")
    run.add_argument("--out", metavar="DIR", help=f"output folder; default runs/{method_cls.name}")
    run.add_argument("--resume", action="store_true", help="continue from DIR/last.pt")
    run.add_argument("--seed", type=int, default=0, help="default 0")
    run.add_argument("--deterministic", action="store_true",
                     help="deterministic kernels: a resumed run reproduces the uninterrupted one")
    run.add_argument("--knn-k", type=int, default=200, help=KNN_K_HELP)
    run.add_argument("--gather", choices=GATHERS, default="all",
                     help="under torchrun, how the loss sees every rank's embeddings: all "
                          "(all-gathered, each rank holds them all) or ring (passed around the "
                          "ranks, each holds its own; "
                          f"{', '.join(RING_METHODS)}); "
                          "default all")
    run.add_argument("--no-progress", action="store_true", help="no progress bar or epoch lines")
    hp = p.add_argument_group(f"{method_cls.name} hyper-parameters")
    for name, (default, text) in method_cls.HPARAMS.items():
        hp.add_argument(f"--{name.replace('_', '-')}", dest=f"hp_{name}", type=type(default),
                        default=default, metavar=name.upper(), help=f"{text} (default {default})")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastcl", description="Self-supervised training on your images with fastcl's fused "
                                   "losses.", epilog=_listing(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastcl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a method", epilog=_listing(),
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="fastcl train METHOD [options]; "
                                       "fastcl train METHOD --help lists a method's options.")
    methods = train.add_subparsers(dest="method", metavar="METHOD", required=True)
    for method_cls in METHODS.values():
        _method_parser(methods, method_cls)
    ev = sub.add_parser("eval", help="kNN and linear probe of a checkpoint's frozen encoder")
    ev.add_argument("--checkpoint", required=True, metavar="PATH",
                    help="a last.pt that fastcl train wrote")
    ev.add_argument("--data", metavar="PATH",
                    help="as fastcl train's --data; default: the data the checkpoint was trained "
                         "on")
    ev.add_argument("--device", default="auto", help=DEVICE_HELP)
    ev.add_argument("--knn-k", type=int, default=200, help=KNN_K_HELP)
    sub.add_parser("list", help="the methods and backbones")
    return parser


def _listing() -> str:
    return (f"methods:   {', '.join(METHODS)}\n"
            f"backbones: {', '.join(BACKBONES)}")


def _read_config(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {path!r} does not exist")
    if p.suffix == ".toml":
        import tomllib

        with open(p, "rb") as f:
            try:
                values = tomllib.load(f)
            except tomllib.TOMLDecodeError as err:
                raise ValueError(f"--config {path!r} is not valid TOML: {err}") from None
    elif p.suffix in (".yaml", ".yml"):
        import yaml

        with open(p) as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise ValueError(f"--config {path!r} is not valid YAML: "
                                 f"{' '.join(str(err).split())}") from None
    else:
        raise ValueError(f"--config {path!r} must be a .toml, .yaml or .yml file")
    if not isinstance(values, dict):
        raise ValueError(f"--config {path!r} must hold a table of options")
    return {k.replace("-", "_"): v for k, v in values.items()}


def _apply_config(parser: argparse.ArgumentParser, argv: Sequence[str], args) -> argparse.Namespace:
    """Re-parses argv with the config file's values as defaults (the command line wins)."""
    method_parser = parser._subparsers._group_actions[0].choices["train"]._subparsers \
        ._group_actions[0].choices[args.method]
    values = _read_config(args.config)
    values.pop("method", None)
    dests = {a.dest for a in method_parser._actions}
    defaults, unknown = {}, []
    for key, value in values.items():
        dest = key if key in dests else f"hp_{key}"
        (defaults.__setitem__(dest, value) if dest in dests else unknown.append(key))
    if unknown:
        valid = sorted(d.removeprefix("hp_") for d in dests if d not in ("help", "config"))
        raise ValueError(f"--config {args.config!r}: unknown option(s) {unknown}; valid: {valid}")
    method_parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def _train_config(args):
    from fastcl.train import TrainConfig

    common = {k: getattr(args, k) for k in _COMMON}
    common["out"] = common["out"] or f"runs/{args.method}"
    hparams = {k[3:]: v for k, v in vars(args).items() if k.startswith("hp_")}
    return TrainConfig(method=args.method, progress=not args.no_progress, hparams=hparams,
                       **common)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "list":
        print(_listing())
        return 0
    try:
        if args.command == "eval":
            from fastcl.train import evaluate_checkpoint

            print(json.dumps(evaluate_checkpoint(args.checkpoint, args.data, device=args.device,
                                                 k=args.knn_k), indent=2))
            return 0
        if args.config:
            args = _apply_config(parser, argv, args)
        from fastcl.train import summary_line, train

        cfg = _train_config(args)
        # kill (SIGTERM) stops like Ctrl-C; last.pt is only ever replaced whole, so it stays loadable.
        signal.signal(signal.SIGTERM, _raise_interrupt)
        result = train(cfg)
        if result:
            print(json.dumps(result, indent=2))
            print(summary_line(result))
        return 0
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        parser.exit(2, f"fastcl: error: {err}\n")
    except KeyboardInterrupt:
        out = Path(getattr(args, "out", None) or f"runs/{getattr(args, 'method', '')}")
        print(f"\ninterrupted; the last complete checkpoint is {out / 'last.pt'} "
              f"(continue with --resume)", file=sys.stderr)
        return 130
