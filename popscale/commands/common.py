"""What every command shares: the console, one line to the user, the closing RESULT line, an
error as one line, and the flags several commands take."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape

from data_service.remote import redact

console = Console(stderr=True)


def say(message: str) -> None:
    """One line to the user (stderr; never wrapped, so a script can grep it); URL passwords masked."""
    console.print(escape(redact(message)), soft_wrap=True)


def result(**kv) -> None:
    print("RESULT " + " ".join(f"{k}={redact(v)}" for k, v in kv.items()), flush=True)


def fail(message: str, kind: str) -> None:
    console.print(f"[red]error:[/red] {escape(redact(message))}", soft_wrap=True, highlight=False)
    result(error=kind)


def tracking_flag(s: argparse.ArgumentParser) -> None:
    s.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else runs/mlflow.db)")


def model_flag(s: argparse.ArgumentParser) -> None:
    s.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or an exported directory")
