"""The local process stack for development, tests and the demo (never shipped in an image).

It starts real ``redis-server``, SeaweedFS, the API and Celery workers on free loopback ports and
imports nothing of the service: they get their configuration through ``LORP_*`` variables.
``python -m devstack [DIR]`` runs the whole stack until Ctrl-C (``make stack``).
"""

from .stack import (
    ApiServer,
    CeleryWorker,
    LocalStack,
    ManagedProcess,
    RedisServer,
    SeaweedS3,
    StackError,
    find_weed,
    free_port,
    install_signal_handlers,
    process_group_alive,
)

__all__ = [
    "ApiServer",
    "CeleryWorker",
    "LocalStack",
    "ManagedProcess",
    "RedisServer",
    "SeaweedS3",
    "StackError",
    "find_weed",
    "free_port",
    "install_signal_handlers",
    "process_group_alive",
]
