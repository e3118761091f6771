"""What the Celery variant of scripts/full_stack.py takes from this repository: each worker's recorded
hostname (``[core] hostname_callable``) and the Celery configuration (``[celery] celery_config_options``).

Several workers on one machine would all report the machine's name; each worker of the stack gets its
own in ``PSEUDONYMISE_STACK_WORKER_HOSTNAME``, as workers on separate machines report theirs. The
configuration is Airflow's default with prefetching off: a worker fetches a task only when one of its
processes is free, so a queued range never waits behind a busy worker while another is idle.
"""

from __future__ import annotations

import os
import socket

from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG

CELERY_CONFIG = {**DEFAULT_CELERY_CONFIG, "worker_disable_prefetch": True}  # Celery >= 5.6, Redis brokers


def hostname() -> str:
    return os.environ.get("PSEUDONYMISE_STACK_WORKER_HOSTNAME") or socket.getfqdn()
