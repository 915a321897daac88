"""Errors as sentences: what went wrong and what to do, with an exit code."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from fusion_graph.errors import DecisionError, NotEnoughCandidatesError

err = Console(stderr=True)
"""Progress, tables and errors go to stderr; answers and results to stdout."""


class CliError(Exception):
    """An error with a sentence for the user and an exit code."""

    def __init__(self, message: str, *, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def explain(exc: BaseException, *, where: str, api_key_env: str) -> CliError:
    """Turn a run's failure into a sentence that says what to do. ``where`` names the model
    server (or the embedded model) for connection errors."""
    if isinstance(exc, CliError):
        return exc
    if isinstance(exc, NotEnoughCandidatesError):
        names = {k.__name__ for e in exc.exceptions for k in type(e).__mro__}
        if names & {"APIConnectionError", "ConnectError", "ConnectionError"}:
            return CliError(
                f"Could not reach the model server at {where}. Check that it is "
                "running and that --base-url is right (it usually ends in /v1)."
            )
        if names & {"AuthenticationError", "PermissionDeniedError"}:
            return CliError(
                f"The server at {where} refused the API key. Put a valid key in "
                f"${api_key_env} (or pick another variable with --api-key-env)."
            )
        first = exc.exceptions[0]
        return CliError(f"{exc}. First error: {type(first).__name__}: {first}")
    if isinstance(exc, DecisionError):
        return CliError(f"{exc}. Run again, or pick another --selector/--strategy.")
    if isinstance(exc, ValueError | TypeError):
        return CliError(f"Invalid input: {exc}.", code=2)
    if isinstance(exc, FileNotFoundError | ImportError):
        return CliError(str(exc))
    return CliError(f"{type(exc).__name__}: {exc}")


def fail(exc: BaseException, *, where: str, api_key_env: str, debug: bool) -> None:
    """Print ``exc`` as a sentence and exit with its code (re-raise it with ``--debug``)."""
    if debug:
        raise exc
    problem = explain(exc, where=where, api_key_env=api_key_env)
    err.print(f"[bold red]Error:[/] {escape(str(problem))}", soft_wrap=True)
    raise typer.Exit(problem.code) from None
