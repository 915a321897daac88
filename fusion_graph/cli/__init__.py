"""The ``fusion-graph`` command: ``ask`` a question with Fusion-of-N or Best-of-N, make
synthetic data (``synth``) and compare strategies (``eval``).

The command line imports the library; the library never imports the command line.
"""

from __future__ import annotations

from typing import Annotated

import typer

from fusion_graph import __version__
from fusion_graph.cli.ask import ask
from fusion_graph.cli.batch import eval_command, synth
from fusion_graph.cli.serve import serve

app = typer.Typer(
    help="Inference-time scaling for LLM steps: Fusion-of-N and Best-of-N from the shell.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fusion-graph {__version__}")
        raise typer.Exit


@app.callback()
def _main(
    _: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """fusion-graph: Fusion-of-N and Best-of-N for any LLM step."""


app.command()(ask)
app.command("synth")(synth)
app.command("eval")(eval_command)
app.command("serve")(serve)


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
