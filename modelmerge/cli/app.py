"""The Typer application: one module per command, registered here."""

from __future__ import annotations

from typing import Annotated

import typer

from modelmerge.cli.align import EXAMPLES as ALIGN_EXAMPLES
from modelmerge.cli.align import align_command
from modelmerge.cli.aligners import EXAMPLES as ALIGNERS_EXAMPLES
from modelmerge.cli.aligners import aligners_command
from modelmerge.cli.demo import EXAMPLES as DEMO_EXAMPLES
from modelmerge.cli.demo import demo_command
from modelmerge.cli.evaluate import EXAMPLES as EVALUATE_EXAMPLES
from modelmerge.cli.evaluate import evaluate_command
from modelmerge.cli.inspect import EXAMPLES as INSPECT_EXAMPLES
from modelmerge.cli.inspect import inspect_command
from modelmerge.cli.interpolate import EXAMPLES as INTERPOLATE_EXAMPLES
from modelmerge.cli.interpolate import interpolate_command
from modelmerge.cli.merge import EXAMPLES as MERGE_EXAMPLES
from modelmerge.cli.merge import merge_command
from modelmerge.cli.spec import EXAMPLES as SPEC_EXAMPLES
from modelmerge.cli.spec import spec_command
from modelmerge.cli.train_aligner import EXAMPLES as TRAIN_EXAMPLES
from modelmerge.cli.train_aligner import train_aligner_command
from modelmerge.cli.zoo import EXAMPLES as ZOO_EXAMPLES
from modelmerge.cli.zoo import zoo_command

app = typer.Typer(
    name="modelmerge",
    help="Align (re-basin) and merge neural-network checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from modelmerge import __version__

        typer.echo(f"modelmerge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Align (re-basin) and merge neural-network checkpoints."""


app.command("align", epilog=ALIGN_EXAMPLES)(align_command)
app.command("interpolate", epilog=INTERPOLATE_EXAMPLES,  # (its docstring's line break would show in the list)
            short_help="Write (1-alpha)*A + alpha*B per tensor (integer tensors that differ are refused).",
            )(interpolate_command)
app.command("merge", epilog=MERGE_EXAMPLES)(merge_command)
app.command("inspect", epilog=INSPECT_EXAMPLES)(inspect_command)
app.command("spec", epilog=SPEC_EXAMPLES)(spec_command)
app.command("zoo", epilog=ZOO_EXAMPLES)(zoo_command)
app.command("evaluate", epilog=EVALUATE_EXAMPLES)(evaluate_command)
app.command("demo", epilog=DEMO_EXAMPLES)(demo_command)
app.command("train-aligner", epilog=TRAIN_EXAMPLES)(train_aligner_command)
app.command("aligners", epilog=ALIGNERS_EXAMPLES)(aligners_command)
