"""`python -m declsaga worker`: run a worker from the shell.

    python -m declsaga worker --store postgresql://app@db/orders --import shop.sagas

`--import` (repeatable) names the modules that define the sagas to run: importing them
registers the definitions. SIGTERM or Ctrl-C stops the worker gracefully (see
`declsaga.worker`). A store that cannot be reached is retried with backoff; a
malformed URL or a module that cannot be imported ends the process with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING

from ._errors import StoreError
from ._executor import Executor
from .stores._sqlite import SQLiteStore

if TYPE_CHECKING:
    from .stores._postgres import PostgresStore
from .stores._urls import from_url, mask
from .worker import Worker

__all__ = ["main"]

logger = logging.getLogger("declsaga.worker")

_LONGEST_BACKOFF = 30.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m declsaga", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser("worker", help="run submitted and orphaned sagas")
    worker.add_argument(
        "--store", required=True, metavar="URL", help="sqlite:///path or postgresql://..."
    )
    worker.add_argument(
        "--import",
        dest="modules",
        action="append",
        required=True,
        metavar="MODULE",
        help="a module that defines sagas (repeatable)",
    )
    worker.add_argument("--concurrency", type=int, default=4, help="sagas at once (default 4)")
    worker.add_argument(
        "--poll-interval", type=float, default=0.5, help="seconds between looks for work"
    )
    worker.add_argument(
        "--grace", type=float, default=30.0, help="seconds to finish steps after SIGTERM"
    )
    worker.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    return parser


def _open_store(url: str, stopping: threading.Event) -> SQLiteStore | PostgresStore | None:
    """The store at `url`, retried with backoff while it cannot be reached; None if the
    worker was stopped meanwhile. A malformed URL raises ValueError at once."""
    backoff = 0.5
    while True:
        try:
            return from_url(url)
        except StoreError as error:  # its message never holds the password
            logger.warning(
                "Cannot open the store %s (retrying in %.1fs): %s", mask(url), backoff, error
            )
        if stopping.wait(backoff):
            return None
        backoff = min(backoff * 2, _LONGEST_BACKOFF)


def main(argv: Sequence[str] | None = None) -> int:
    options = _parser().parse_args(argv)
    logging.basicConfig(
        level=options.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    for module in options.modules:
        try:
            importlib.import_module(module)
        except Exception as error:
            print(f"declsaga worker: cannot import {module!r}: {error!r}", file=sys.stderr)
            return 2
    stopping = threading.Event()
    worker: Worker | None = None

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()
        if worker is not None:
            worker.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        store = _open_store(options.store, stopping)
    except ValueError as error:
        print(f"declsaga worker: {error}", file=sys.stderr)
        return 2
    if store is None:
        return 0
    try:
        worker = Worker(
            Executor(store=store),
            concurrency=options.concurrency,
            poll_interval=options.poll_interval,
        )
        if stopping.is_set():  # a signal arrived before the worker existed
            worker.stop()
        logger.info("Worker started on %r, %d at once.", store, worker.concurrency)
        worker.run(grace=options.grace)
        logger.info("Worker stopped.")
    except ValueError as error:
        print(f"declsaga worker: {error}", file=sys.stderr)
        return 2
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
