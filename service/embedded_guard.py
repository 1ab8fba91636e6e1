"""nx-27017 run in this process, ended when the service that started it is gone.

The service starts the embedded server in a session of its own, so that a Ctrl-C at the terminal reaches only the
service, which then stops the server in order. A service killed outright (SIGKILL, the OOM killer) cannot: without
this guard the server would go on holding its port, its memory and its data file. A thread here watches the parent
and, once it is gone, ends the server as the service's own stop would, with SIGTERM.

    python -m service.embedded_guard PARENT_PID [nx-27017 arguments ...]
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

PARENT_POLL_SECONDS = 0.5


def _watch(parent: int) -> None:
    # A parent that dies hands its children to another process: the parent id changes.
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str]) -> None:
    parent, server_args = int(argv[0]), argv[1:]
    threading.Thread(target=_watch, args=(parent,), name="parent-watch", daemon=True).start()
    from nx_27017.nx_27017 import main as serve

    sys.argv = ["nx-27017", *server_args]
    serve()


if __name__ == "__main__":
    main(sys.argv[1:])
