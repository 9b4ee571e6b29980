"""``python -m devstack [DIR]``: run the full local stack until Ctrl-C."""

from devstack.stack import main

raise SystemExit(main())
