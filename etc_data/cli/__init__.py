"""The ``etc-data`` command line. Each concept registers its commands from its own module here.

One error line: every ``EtcError`` (a bad input named in its message) and every ``OSError`` (a
read-only or full disk, a permission: the message names the file) is printed as ``error: ...``
with exit status 2; no traceback, and never key material. ``etc-data --debug ...`` (or
``ETC_DATA_DEBUG=1``) prints the traceback as well.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings

import click

from .. import __version__
from ..errors import EtcError

# modules under etc_data/cli/ that define a ``register(group)`` function
COMMAND_MODULES = ["keys", "crypt", "prepare", "report", "train", "modelcrypt", "audit"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="etc-data")
@click.option("--debug", is_flag=True, help="on an error, print its traceback too (also ETC_DATA_DEBUG=1)")
def cli(debug):
    """Encrypt image datasets for privacy-preserving training (EtC), shard, report, train."""
    if debug:
        os.environ["ETC_DATA_DEBUG"] = "1"


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


def debugging() -> bool:
    return os.environ.get("ETC_DATA_DEBUG", "") not in ("", "0")


def _error(message: str) -> int:
    if debugging():
        import traceback

        traceback.print_exc()
    click.echo(f"error: {message}", err=True)
    return 2


def os_error_message(e: OSError) -> str:
    """An OSError as one line naming its file: ``out/train: Read-only file system``."""
    what = e.strerror or str(e)
    return f"{e.filename}: {what}" if e.filename else what


def main(argv: list[str] | None = None) -> int:
    shown = warnings.showwarning
    warnings.showwarning = _warning_printer(shown)
    try:
        cli.main(args=argv, prog_name="etc-data", standalone_mode=False)
    except EtcError as e:
        return _error(str(e))
    except OSError as e:
        return _error(os_error_message(e))
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
