"""`vitscope` command line: one sub-command per module in ``vitscope.commands``.

Each command module defines ``configure(parser)`` (its arguments) and ``run(args) -> int``; it parses,
calls the library and prints. ``vitscope.commands.common`` holds what several commands share.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

import vitscope
from vitscope.commands.common import CommandError, DefaultsFormatter
from vitscope.pretrain.loop import TrainingDiverged

# name -> (module, one-line help). Modules are imported only when listed or run.
COMMANDS: dict[str, tuple[str, str]] = {
    "capture": ("vitscope.commands.capture", "one forward pass over images; print a per-layer summary"),
    "analyze": ("vitscope.commands.analyze", "run the whole analysis suite on models and write a report"),
    "claims": ("vitscope.commands.claims", "evaluate the papers' claims on saved results"),
    "report": ("vitscope.commands.report", "re-render the HTML report from saved results"),
    "pretrain": ("vitscope.commands.pretrain", "pretrain a ViT: MoCo v3, SimMIM, MAE or the hybrid"),
    "finetune": ("vitscope.commands.finetune", "fine-tune a pretrained encoder for classification"),
    "curves": ("vitscope.commands.curves", "plot tracked metrics of training runs against steps"),
    "demo": ("vitscope.commands.demo", "analyse the bundled models on Fashion-MNIST and print the verdict"),
}


def _available() -> dict[str, tuple[str, str]]:
    found = {}
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            found[name] = (module, help_text)
    return found


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    parser = argparse.ArgumentParser(
        prog="vitscope",
        description="What do Vision Transformers learn? --model takes a model spec KIND:TARGET in every command "
        "(random:NAME, timm:NAME, file:PATH, mae:PATH, ...); analyze names each LABEL=SPEC.",
    )
    parser.add_argument("--version", action="version", version=f"vitscope {vitscope.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules: dict[str, str] = {}
    for name, (module_name, help_text) in _available().items():
        module = importlib.import_module(module_name)
        command_parser = sub.add_parser(name, help=help_text, description=help_text, formatter_class=DefaultsFormatter)
        module.configure(command_parser)
        modules[name] = module_name
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 1
    module = importlib.import_module(modules[args.command])
    try:
        return int(module.run(args) or 0)
    except TrainingDiverged as err:  # the run stopped cleanly; its last good checkpoint is kept
        print(f"vitscope {args.command}: {err}")
        return 3
    except KeyboardInterrupt:
        print(f"\nvitscope {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except (CommandError, ValueError, KeyError, OSError) as err:
        print(f"vitscope {args.command}: error: {error_sentence(err)}", file=sys.stderr)
        return 2


def error_sentence(err: BaseException) -> str:
    """One line for a user-facing error: the message of a CommandError or ValueError; a bare KeyError key as
    "missing key"; an OSError as the path it is about and what the system said."""
    if isinstance(err, KeyError):
        key = err.args[0] if err.args else None
        if isinstance(key, str) and " " in key:  # a KeyError raised with a sentence
            return key
        return f"missing key {key!r} in the data read (an incomplete file, or not the kind of file expected)"
    if isinstance(err, OSError) and not isinstance(err, CommandError) and err.strerror:
        paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
        return f"{' -> '.join(paths)}: {err.strerror}" if paths else err.strerror
    text = str(err).strip()
    return " ".join(text.split("\n")) if text else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
