"""The man page, tcplife-trace(8), written from the click definitions themselves, so that it
cannot say other than `--help` does.

    python -m tcplife_trace.manpage > tcplife-trace.8     (scripts/provision.sh installs it)
"""
from __future__ import annotations

import inspect
import sys

import click

from . import __version__


def _roff(text: str) -> str:
    """Text as roff: backslashes and hyphens escaped, no line starting with a control char."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + ln if ln[:1] in (".", "'") else ln) for ln in text.splitlines())


def _paragraphs(help_text: str) -> list[tuple[bool, str]]:
    """click's help as (verbatim?, text) blocks: a paragraph after a \\b line is kept as is."""
    out = []
    for block in inspect.cleandoc(help_text or "").split("\n\n"):
        if block.startswith("\b\n"):
            out.append((True, block[2:]))
        elif block.strip():
            out.append((False, " ".join(block.split())))
    return out


def _body(help_text: str) -> list[str]:
    lines = []
    for verbatim, text in _paragraphs(help_text):
        lines += [".PP", ".nf", _roff(text), ".fi"] if verbatim else [".PP", _roff(text)]
    return lines


def _options(cmd: click.Command, ctx: click.Context) -> list[str]:
    lines = []
    for param in cmd.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        flags, helptext = record
        lines += [".TP", f"\\fB{_roff(flags)}\\fR", _roff(" ".join(helptext.split()))]
    return lines


def render(group: click.Group | None = None, mark: str | None = None) -> str:
    if group is None:
        from .cli import cli as group
    ctx = click.Context(group, info_name="tcplife-trace")
    out = [f'.TH TCPLIFE\\-TRACE 8 "" '
           f'"tcplife-trace {__version__}" "System Administration"']
    if mark:
        out.insert(0, f'.\\" {mark}')
    out += [".SH NAME", "tcplife\\-trace \\- " + _roff(group.get_short_help_str(limit=200)),
            ".SH SYNOPSIS", "\\fBtcplife\\-trace\\fR [\\fIOPTIONS\\fR]",
            ".br", "\\fBtcplife\\-trace\\fR \\fICOMMAND\\fR [\\fIOPTIONS\\fR] [\\fIARGS\\fR]",
            ".SH DESCRIPTION", *_body(group.help), ".SH OPTIONS", *_options(group, ctx)]
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        sub = click.Context(cmd, info_name=name, parent=ctx)
        out += [f".SH COMMAND: {_roff(name).upper()}", ".PP",
                f"\\fBtcplife\\-trace {_roff(name)}\\fR {_roff(' '.join(cmd.collect_usage_pieces(sub)))}",
                *_body(cmd.help), *_options(cmd, sub)]
        if cmd.epilog:
            out += _body(cmd.epilog)
    if group.epilog:
        out += [".SH EXAMPLES", *_body(group.epilog)]
    out += [".SH SEE ALSO", "tcplife(8), tcpstates(8), ss(8), bpftool(8)", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    mark = argv[argv.index("--mark") + 1] if "--mark" in argv else None
    sys.stdout.write(render(mark=mark))
    return 0


if __name__ == "__main__":
    sys.exit(main())
