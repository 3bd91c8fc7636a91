"""How ``msmae --help`` shows options: a boolean flag as ``--flag/--no-flag`` without a ``<bool>`` type,
and no hidden argument (an old spelling kept for compatibility) in the usage line.

typer (0.29, with its own copy of click) prints a value type for every option, flags included, so
``--strict <bool>`` read as if it took a value; a flag's metavar is set empty here, for the commands'
flags, the group's and ``--help``.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperCommand

from msmae_cli.errors import ErrorHandlingGroup


def plain_flags(params: list[Any]) -> None:
    for param in params:
        if getattr(param, "is_flag", False):
            param.metavar = ""


class _PlainFlags:
    params: list[Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        plain_flags(self.params)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            plain_flags([option])
        return option

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        params = self.params
        self.params = [p for p in params if not getattr(p, "hidden", False)]
        try:
            return super().collect_usage_pieces(ctx)
        finally:
            self.params = params


class Command(_PlainFlags, TyperCommand):
    """A ``msmae`` command."""


class Group(_PlainFlags, ErrorHandlingGroup):
    """The ``msmae`` group: every command's errors as one line (``ErrorHandlingGroup``), flags shown plainly."""
