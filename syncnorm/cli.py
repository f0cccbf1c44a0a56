"""The ``syncnorm`` command: ``summary``, ``bench`` and ``launch``.

::

    syncnorm summary torchvision:resnet50 [--to sync] [--layer-kwarg r_max=3.0 ...]
    syncnorm bench [NAME ...] [--list] [--benchmarks-dir DIR] [-- SCRIPT ARGS]
    syncnorm launch [torchrun options] script.py [script args]     # = python -m syncnorm.launch

Bad arguments exit with an argparse message and status 2. ``python -m syncnorm`` is the same command.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "build_parser", "load_model", "discover_benchmarks"]

PROG = "syncnorm"


class UsageError(Exception):
    """A bad command-line value found after parsing; reported through ``parser.error`` (exit status 2)."""


# ---------------------------------------------------------------------------------------------------------- summary

def load_model(spec: str):
    """Build the ``nn.Module`` that ``spec`` names, with random weights (nothing is downloaded).

    - ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None)`` (classification, detection,
      segmentation and video models);
    - ``timm:NAME``: ``timm.create_model(NAME, pretrained=False)`` (needs timm installed);
    - ``package.module:callable``: imports the module and calls ``callable()`` with no arguments (a class or a factory);
    - ``NAME`` alone: a torchvision model name, else a timm one.

    Raises UsageError with the reason when the spec names nothing buildable.
    """
    import torch.nn as nn

    if ":" in spec:
        source, name = spec.split(":", 1)
    else:
        source, name = "", spec
    if not name:
        raise UsageError(f"model spec {spec!r} has no name after ':'")
    if source in ("torchvision", "", "timm"):
        attempts = {"torchvision": ["torchvision"], "timm": ["timm"], "": ["torchvision", "timm"]}[source]
        reasons = []
        for lib in attempts:
            try:
                return _from_zoo(lib, name)
            except UsageError as err:
                reasons.append(str(err))
        raise UsageError("; ".join(reasons))
    try:
        module = importlib.import_module(source)
    except ImportError as err:
        raise UsageError(f"cannot import module {source!r} of model spec {spec!r}: {err}") from None
    except Exception as err:  # noqa: BLE001 - the module itself fails while importing: also a bad spec
        raise UsageError(f"importing module {source!r} of model spec {spec!r} failed: {type(err).__name__}: "
                         f"{err}") from None
    try:
        factory = getattr(module, name)
    except AttributeError:
        raise UsageError(f"module {source!r} has no attribute {name!r}") from None
    model = factory
    if callable(factory) and not isinstance(factory, nn.Module):
        try:
            model = factory()
        except Exception as err:  # noqa: BLE001 - any failure of the user's factory is a bad spec
            raise UsageError(f"calling {spec}() failed: {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _from_zoo(lib: str, name: str):
    if lib == "torchvision":
        try:
            import torchvision.models as tvm
        except ImportError:
            raise UsageError("torchvision is not installed") from None
        if name.lower() not in tvm.list_models():
            raise UsageError(f"torchvision has no model {name!r} (see torchvision.models.list_models())")
        kwargs = {"weights_backbone": None} if _accepts(tvm.get_model_builder(name), "weights_backbone") else {}
        return tvm.get_model(name, weights=None, **kwargs)
    try:
        import timm
    except ImportError:
        raise UsageError(f"timm is not installed, so the timm model {name!r} is unavailable") from None
    if not timm.list_models(name):
        raise UsageError(f"timm has no model {name!r} (see timm.list_models())")
    return timm.create_model(name, pretrained=False)


def _accepts(fn, keyword: str) -> bool:
    import inspect

    try:
        return keyword in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _layer_kwargs(items: Sequence[str]) -> dict:
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--layer-kwarg expects KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw  # a bare word stays a string
    return out


def _cmd_summary(args) -> int:
    # the functions, not `syncnorm.convert`: once the submodule syncnorm.convert is imported, that name is the module
    from .convert import convert, summary

    kwargs = _layer_kwargs(args.layer_kwarg)
    if kwargs and not args.to:
        raise UsageError("--layer-kwarg needs --to")
    model = load_model(args.model)
    # both tables are made before anything is printed, so that a conversion error (a bad --layer-kwarg value)
    # is the only output
    built = summary(model)
    converted = None
    if args.to:
        try:
            converted_model = convert(model, args.to, **kwargs)
        except (ValueError, TypeError) as err:
            raise UsageError(f"--to {args.to}: {err}") from None
        converted = summary(converted_model)
    print(f"{args.model}: norm layers as built")
    print(built)
    if converted is not None:
        print()
        print(f"{args.model}: norm layers after convert(to={args.to!r}{''.join(f', {k}={v!r}' for k, v in kwargs.items())})")
        print(converted)
    return 0


# ------------------------------------------------------------------------------------------------------------ bench

def _default_benchmarks_dir() -> Path:
    here = Path.cwd() / "benchmarks"
    if here.is_dir():
        return here
    return Path(__file__).resolve().parent.parent / "benchmarks"  # the checkout of an editable install


def discover_benchmarks(directory: Path) -> dict[str, Path]:
    """``{name: path}`` of the ``bench_NAME.py`` scripts in ``directory``, sorted by name."""
    return {p.stem[len("bench_"):]: p for p in sorted(Path(directory).glob("bench_*.py"))}


def _cmd_bench(args) -> int:
    directory = Path(args.benchmarks_dir) if args.benchmarks_dir else _default_benchmarks_dir()
    found = discover_benchmarks(directory)
    if not found:
        raise UsageError(f"no bench_*.py scripts in {directory}")
    if args.list:
        for name, path in found.items():
            print(f"{name}\t{path}")
        return 0
    unknown = [n for n in args.names if n not in found]
    if unknown:
        raise UsageError(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(found)}")
    selected = args.names or list(found)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # the benchmarks time one thread per rank
    failed = []
    for name in selected:
        path = found[name]
        print(f"== {name} ({path})", flush=True)
        # benchmarks are modules of the `benchmarks` package: run them from the directory that holds it
        cmd = [sys.executable, "-m", f"{path.parent.name}.{path.stem}", *args.script_args]
        code = subprocess.call(cmd, cwd=path.parent.parent, env=env)
        if code != 0:
            print(f"== {name} failed with exit status {code}", file=sys.stderr, flush=True)
            failed.append(name)
    return 1 if failed else 0


def _cmd_build_ext(args) -> int:
    import time

    from . import ops

    start = time.perf_counter()
    try:
        directory = ops.build_cpu_kernels(verbose=args.verbose)
    except Exception as e:  # noqa: BLE001 - report whatever the compiler or loader said
        print(f"syncnorm: the C++ CPU kernels could not be built: {type(e).__name__}: {e}\n"
              "syncnorm still works: CPU tensors use the reference implementation (same results, slower).",
              file=sys.stderr)
        return 1
    print(f"syncnorm: C++ CPU kernels ready ({directory}, {time.perf_counter() - start:.1f} s)")
    return 0


# ------------------------------------------------------------------------------------------------------------ parser

def build_parser() -> argparse.ArgumentParser:
    """The ``syncnorm`` argument parser: subcommands ``summary``, ``bench``, ``build-ext`` and ``launch``."""
    parser = argparse.ArgumentParser(prog=PROG, description="syncnorm: correct batch statistics for small batches.")
    sub = parser.add_subparsers(dest="command", metavar="{summary,bench,build-ext,launch}")
    sub.required = True

    p = sub.add_parser("summary", help="table of a model's norm layers, before and after conversion",
                       description="Print the norm-layer table of a model, and after syncnorm.convert with --to.")
    p.add_argument("model", help="torchvision:NAME, timm:NAME, package.module:callable, or a bare torchvision/timm NAME")
    from .convert import TARGETS  # the registry: a new conversion target shows up here by itself

    p.add_argument("--to", choices=sorted(TARGETS), help="conversion target for syncnorm.convert")
    p.add_argument("--layer-kwarg", "-k", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for the converted layers (a Python literal), e.g. r_max=3.0; repeatable")
    p.set_defaults(func=_cmd_summary)

    p = sub.add_parser("bench", help="run the benchmark scripts (benchmarks/bench_*.py) and print their tables",
                       description="Run benchmarks/bench_NAME.py scripts (all, or the NAMEs given) and print their "
                                   "tables. Arguments after '--' go to every script.")
    p.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--benchmarks-dir", help="directory of bench_*.py (default: ./benchmarks, else the checkout's)")
    p.set_defaults(func=_cmd_bench, script_args=[])

    p = sub.add_parser("build-ext", help="compile the C++ CPU kernels now (else: at the first CPU training step)",
                       description="Compile and load syncnorm's C++ CPU kernels (syncnorm/csrc/norm_cpu.cpp), once per "
                                   "environment, under ~/.cache/syncnorm (SYNCNORM_BUILD_DIR moves it). Exit status 1 "
                                   "when they cannot be built; CPU tensors then use the reference implementation.")
    p.add_argument("--verbose", action="store_true", help="show the compiler's output")
    p.set_defaults(func=_cmd_build_ext)

    # parsed by syncnorm.launch itself (torchrun's parser); declared here for --help
    sub.add_parser("launch", help="torchrun with syncnorm's defaults (= python -m syncnorm.launch)", add_help=False)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``syncnorm`` command with ``argv`` (default ``sys.argv[1:]``) and return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "launch":
        from . import launch

        return launch.main(argv[1:])
    script_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, script_args = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if script_args:
        if args.command != "bench":
            parser.error("arguments after '--' are only accepted by 'bench'")
        args.script_args = script_args
    try:
        return args.func(args)
    except UsageError as err:
        parser.error(f"{args.command}: {err}")
    return 2  # pragma: no cover - parser.error exits


if __name__ == "__main__":
    sys.exit(main())
