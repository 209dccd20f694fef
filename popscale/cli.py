"""The `popscale` command. Subcommands are thin: parse, call one library function, print.

Every subcommand ends with one `RESULT key=value ...` line so scripts can read the outcome;
exit status is 0 on success, 1 when some input failed (the rest was still done), 2 on usage
(a bad flag, config key, override, config file or model preset). An error is one line,
`error: ...`, naming the key or the file, then `RESULT error=<kind>`; `popscale --debug ...`
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from data_service.errors import ConfigError, CorpusError

from .commands import cluster, data, live, models, train
from .commands.common import console, fail, result, say

__all__ = ["build_parser", "console", "fail", "main", "result", "say"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage errors end like every other error
        self.print_usage(sys.stderr)
        fail(f"{self.prog}: {message}", "usage")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="popscale", description="Pretraining for neural population decoding.")
    p.add_argument("--debug", action="store_true", help="on an error, show the traceback instead of one line")
    sub = p.add_subparsers(dest="command", required=True)
    for group in (data, train, models, cluster, live):
        group.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except Exception as e:  # noqa: BLE001 - every error ends as one line and a RESULT line
        if args.debug:
            raise
        message = str(e)
        if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in message:
            message = f"{e.filename}: {e.strerror or e}"
        lines = [ln.strip() for ln in message.splitlines() if ln.strip()] or [type(e).__name__]
        message = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"  # e.g. a worker's traceback
        if len(lines) > 1 or not isinstance(e, (ValueError, OSError, RuntimeError, CorpusError, LookupError)):
            message = f"{message} (popscale --debug {args.command} ... shows the whole error)"
        fail(message, type(e).__name__)
        return 2 if isinstance(e, ConfigError) else 1  # 2: asked wrongly (usage); 1: input or job failed


if __name__ == "__main__":
    sys.exit(main())
