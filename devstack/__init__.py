"""The local process stack for development, tests and the demo (never shipped in an image).

It starts real ``redis-server``, SeaweedFS, the API and Celery workers on free loopback ports and
imports nothing of the service: they get their configuration through ``LORP_*`` variables.
``python -m devstack [DIR]`` runs the whole stack until Ctrl-C (``make stack``).
"""

from . import stack
from .stack import *  # noqa: F403  (the public names are stack.__all__)

__all__ = stack.__all__
