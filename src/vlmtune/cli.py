"""The `vlmtune` command: a table of typed functions, each taking one config dataclass.

Flags come from the dataclass fields (`lora_r` -> `--lora-r`), help from their `help` metadata. Values are
resolved as: the dataclass default, then `--config preset.yaml`, then flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import types
import typing
from typing import Any, Literal

from .config import (
    AskConfig,
    CaptionConfig,
    ChatConfig,
    ConfigError,
    DataCheckConfig,
    DemoConfig,
    EvaluateConfig,
    MergeConfig,
    ModelsConfig,
    PushConfig,
    ServeConfig,
    TrainConfig,
    load_yaml,
)

# name -> (config class, "module:function"); modules import lazily so `--help` does not wait for torch.
COMMANDS: dict[str, tuple[type, str]] = {
    "train": (TrainConfig, "vlmtune.training.run:train"),
    "caption": (CaptionConfig, "vlmtune.infer:caption"),
    "ask": (AskConfig, "vlmtune.infer:ask"),
    "chat": (ChatConfig, "vlmtune.infer:chat"),
    "merge": (MergeConfig, "vlmtune.export:merge"),
    "push": (PushConfig, "vlmtune.push:push"),
    "evaluate": (EvaluateConfig, "vlmtune.evaluate:evaluate"),
    "data": (DataCheckConfig, "vlmtune.data.checks:check"),
    "serve": (ServeConfig, "vlmtune.serve:serve"),
    "models": (ModelsConfig, "vlmtune.catalog:models"),
    "demo": (DemoConfig, "vlmtune.demo:demo"),
}
USAGE_ERRORS = (ConfigError, ValueError, FileExistsError, NotImplementedError, ImportError)


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, tp: Any) -> None:
    tp = _unwrap_optional(tp)
    kw: dict[str, Any] = {"help": f.metadata.get("help", "")}
    if f.metadata.get("positional"):
        kw["nargs"] = "+" if typing.get_origin(tp) is list else None
        kw["choices"] = typing.get_args(tp) if typing.get_origin(tp) is Literal else None
        parser.add_argument(f.name, metavar=f.name.upper(), **{k: v for k, v in kw.items() if v is not None})
        return
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    kw["help"] += f" (default: {default})" if default not in (None, "") else ""
    kw["default"] = argparse.SUPPRESS  # absent flags stay absent, so a --config file can fill them
    if tp is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(tp) is Literal:
        kw["choices"] = typing.get_args(tp)
    elif typing.get_origin(tp) is list:
        kw["nargs"] = "+"
        kw["action"] = "extend"  # `--run a --run b` and `--run a b` both give [a, b]
    else:
        kw["type"] = tp
    parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmtune", description=__doc__.splitlines()[0])
    from . import __version__

    parser.add_argument("--version", action="version", version=f"vlmtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (cls, _) in COMMANDS.items():
        doc = (cls.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0], description=doc)
        p.add_argument("--config", help="YAML preset of these options; flags on the command line override it")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            _add_field(p, f, hints[f.name])
    return parser


def parse(argv: list[str] | None = None) -> tuple[str, Any]:
    """(command name, its config dataclass) from the command line."""
    args = vars(build_parser().parse_args(argv))
    name = args.pop("command")
    cls = COMMANDS[name][0]
    values: dict[str, Any] = {}
    preset = args.pop("config", None)
    if preset:
        values.update(load_yaml(preset, cls))
    values.update(args)
    return name, cls(**values)


def run(name: str, cfg: Any) -> Any:
    module, func = COMMANDS[name][1].split(":")
    return getattr(importlib.import_module(module), func)(cfg)


def main(argv: list[str] | None = None) -> int:
    name, cfg = parse(argv)
    from .errors import DataError, TrainingStopped
    from .modeling import ModelLoadError
    from .rundir import RunDirError

    try:
        run(name, cfg)
    except TrainingStopped as e:
        print(f"vlmtune {name}: {e}", file=sys.stderr)
        return e.exit_code
    except (*USAGE_ERRORS, DataError, ModelLoadError, RunDirError) as e:
        print(f"vlmtune {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vlmtune {name}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
