"""``hrsa``: one command, one verb per job. Each package's ``cli.py`` holds its verbs; this file only
assembles them and turns a :class:`~hrsa.store.errors.UserError` into one line and exit code 2."""

from __future__ import annotations

import errno
import signal
import sys

import click

from hrsa import __version__
from hrsa.analyze.cli import analyze
from hrsa.analyze.report.cli import report
from hrsa.cluster.cli import demo, run, submit
from hrsa.extract.cli import extract
from hrsa.store.cli import store_group
from hrsa.store.errors import HrsaError, UserError
from hrsa.train.cli import eval_command, mine_negatives_command, train

__all__ = ["main", "cli"]


#: Click's "no arguments: print the help" (a UsageError since Click 8.2), left as Click shows it.
_HELP_ON_NO_ARGUMENTS: tuple[type[Exception], ...] = tuple(
    getattr(click.exceptions, name) for name in ("NoArgsIsHelpError",) if hasattr(click.exceptions, name))


class _OneLineUsageError(click.UsageError):
    """Click's usage error in one line naming the fix (Click prints three: the usage, a hint, the error)."""

    def show(self, file: object = None) -> None:
        where = f" (see `{self.ctx.command_path} --help`)" if self.ctx is not None else ""
        click.echo(f"hrsa: error: {self.format_message()}{where}", err=True)


class _Hrsa(click.Group):
    def make_context(self, *args: object, **kwargs: object) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)  # type: ignore[arg-type]
        except _HELP_ON_NO_ARGUMENTS:  # `hrsa` alone: the help, as itself
            raise
        except click.UsageError as error:  # `hrsa --bogus`: this group's own flags
            raise _OneLineUsageError(error.format_message(), error.ctx) from None

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (_OneLineUsageError, *_HELP_ON_NO_ARGUMENTS):  # `hrsa store` alone: its help
            raise
        except click.UsageError as error:  # a verb's flags and arguments, parsed here
            raise _OneLineUsageError(error.format_message(), error.ctx) from None
        except HrsaError as error:  # one line that names the fix: exit 2 for the user's to fix, 1 (corrupted data...)
            for line in error.warnings:  # what the run found before it failed still holds
                click.echo(f"hrsa: warning: {line}", err=True)
            click.echo(f"hrsa: error: {error}", err=True)
            ctx.exit(2 if isinstance(error, UserError) else 1)
        except KeyboardInterrupt:  # Ctrl-C: the command's cleanup has run; 130 as the shell says it, not Click's 1
            click.echo("hrsa: interrupted.", err=True)
            ctx.exit(130)
        except OSError as error:  # a path the system refused (checked before the work where hrsa can tell): one line
            fix = _PATH_FIXES.get(error.errno) if error.filename is not None else None
            if fix is None:
                raise
            click.echo(f"hrsa: error: Expected {error.filename} usable. Got {error.strerror} instead: {fix}.", err=True)
            ctx.exit(2)


#: What the user does about a path the system refused, by errno (others keep their traceback: a bug of hrsa's).
_PATH_FIXES = {
    errno.EROFS: "a read-only filesystem; choose a writable path",
    errno.EACCES: "no permission; choose another path, or grant it",
    errno.EPERM: "not permitted; choose another path",
    errno.ENOSPC: "free space on that disk, or choose another path",
    errno.EDQUOT: "free space within your quota, or choose another path",
    errno.ENOENT: "check the path (a folder on the way cannot be made there)",
    errno.ENOTDIR: "a file stands where a folder is needed on the way; check the path",
}


@click.group(cls=_Hrsa, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="hrsa")
def cli() -> None:
    """hrsa: store per-token hidden states of models and compare them with HRSA.

    \b
    Verbs:
      store   list, describe, read, verify and delete what a store holds
      extract every hidden state of a model over a corpus into a store, on Ray
      demo    the demo pipeline: a real model on a CoT corpus into a local store
      analyze compare two models of a store: CKA, dimension-wise correlation, Procrustes
      train   train an embedding model with InfoNCE on Ray Train (resumable checkpoints)
      run     a pipeline YAML: train, extract, analyze, dynamics, report (resumable)
      submit  a pipeline as a Ray job on a cluster
      report  one self-contained HTML report of analysis results (and training dynamics)
      mine-negatives  hard negatives for InfoNCE training, with an embedding model and FAISS
      eval    MTEB evaluation of a backbone or of every checkpoint of a training run
    """


cli.add_command(store_group)
cli.add_command(demo)
cli.add_command(extract)
cli.add_command(analyze)
cli.add_command(train)
cli.add_command(run)
cli.add_command(submit)
cli.add_command(report)
cli.add_command(mine_negatives_command)
cli.add_command(eval_command)


def main() -> None:
    exit_on_sigterm()
    sys.exit(cli.main(prog_name="hrsa", standalone_mode=True))


def exit_on_sigterm() -> None:
    """SIGTERM (``ray job stop``, scancel, a Kubernetes pod stopped) raises SystemExit in the main thread, as
    Ctrl-C raises KeyboardInterrupt: the command's cleanup runs (an S3 lease on a run folder or a pipeline's out is
    let go at once, not left to lapse; workers are stopped) instead of the process vanishing mid-step."""

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
