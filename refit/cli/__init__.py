"""The ``refit`` command: the composition root, one module per command group.

It starts flows and servers, so it reaches up into ``flows/``, but only inside
each command: importing this package loads neither Prefect, torch nor MLflow.
"""

from __future__ import annotations

import sys

from rich.markup import escape

from refit.cli.common import _emit, _prepare, _run_flow, app, bench_app, err, labels_app  # noqa: F401
from refit.cli import loop, drift, bench, labels, episode  # noqa: F401,E402  (each registers its commands on app)
from refit.cli.bench import _int_list  # noqa: F401
from refit.errors import RefitError

# `refit stack up|down|status|env`: the local Prefect server, worker and MLflow server (refit/stack.py).
from refit.stack import app as stack_app  # noqa: E402  (typer only: no Prefect or MLflow import)

app.add_typer(stack_app, name="stack")

# The serving commands live with the server; refit.cli.serve imports only typer at module level.
from refit.cli.serve import bench_serve, serve  # noqa: E402

app.command("serve")(serve)
bench_app.command("serve")(bench_serve)


def main() -> None:
    try:
        app()
    except RefitError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
