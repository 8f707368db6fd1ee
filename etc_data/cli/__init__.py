"""The ``etc-data`` command line. Each concept registers its commands from its own module here.

Every ``EtcError`` (a bad input named in its message) is printed as ``error: ...`` with exit
status 2; no traceback, and never key material.
"""

from __future__ import annotations

import importlib
import sys
import warnings

import click

from .. import __version__
from ..errors import EtcError

# modules under etc_data/cli/ that define a ``register(group)`` function
COMMAND_MODULES = ["keys", "crypt", "prepare", "report", "train", "modelcrypt", "audit"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="etc-data")
def cli():
    """Encrypt image datasets for privacy-preserving training (EtC), shard, report, train."""


for _name in COMMAND_MODULES:
    importlib.import_module(f"{__name__}.{_name}").register(cli)


def _warning_printer(fallback):
    """Trust-on-first-use warnings as one ``warning: ...`` line on stderr; others through ``fallback``."""
    from ..trust import UnpinnedSignerWarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UnpinnedSignerWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            fallback(message, category, filename, lineno, file, line)

    return show


def main(argv: list[str] | None = None) -> int:
    shown = warnings.showwarning
    warnings.showwarning = _warning_printer(shown)
    try:
        cli.main(args=argv, prog_name="etc-data", standalone_mode=False)
    except EtcError as e:
        click.echo(f"error: {e}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    finally:
        warnings.showwarning = shown
    return 0


def entry() -> None:  # console script
    sys.exit(main())
