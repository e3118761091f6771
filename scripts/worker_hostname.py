"""The hostname a Celery worker of scripts/full_stack.py records in its task instances (``[core] hostname_callable``).

Several workers on one machine would all report the machine's name; each worker of the stack gets its
own in ``PSEUDONYMISE_STACK_WORKER_HOSTNAME``, as workers on separate machines report theirs.
"""

from __future__ import annotations

import os
import socket


def hostname() -> str:
    return os.environ.get("PSEUDONYMISE_STACK_WORKER_HOSTNAME") or socket.getfqdn()
