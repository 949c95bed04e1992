"""The ``rkedge`` command: one group that mounts the commands of each subpackage.

Commands are thin: they parse options, call a typed function, and print. Domain errors are translated
here, once: the message (with its fix) goes to stderr and the exit code is the error's (2 for bad input). OS
errors that reach this edge (a full disk, a read-only or forbidden folder) become one such error too, with the
path and what is free.
Nothing heavy is imported until a command runs, so ``rkedge --help`` works without torch.
"""

from __future__ import annotations

import sys

import click

from rkedge import __version__
from rkedge.errors import InputError, RkedgeError


class RkedgeGroup(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except RkedgeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:  # disk full, read-only or forbidden output: the user's to fix, so exit 2 too
            from rkedge._fs import os_error_message

            message, fix, code = os_error_message(exc)
            translated = InputError(message, fix=fix, code=code)
            click.echo(f"error: {translated}", err=True)
            sys.exit(translated.exit_code)


@click.group(cls=RkedgeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rkedge")
def main() -> None:
    """Take a Hugging Face LLM to a Rockchip RK3588 board and chat with it on the NPU.

    Host: inspect, plan, convert, lora. Board: chat, serve, doctor. CI: mock-model and --mock run everything
    on the simulated NPU.
    """


def _mount() -> None:
    from rkedge.runtime.cli import register as register_runtime

    register_runtime(main)
    try:
        from rkedge.convert.cli import register as register_convert
    except ImportError:  # the board install may leave the host commands out
        pass
    else:
        register_convert(main)
    try:
        from rkedge.lora.cli import register as register_lora
    except ImportError:
        pass
    else:
        register_lora(main)


_mount()
