"""Thin Prefect flows over the etc_data library: prepare, report, train, and scheduled serving.

Nothing here holds key material: flows and tasks receive key *references* (a path, ``env:NAME``
or ``prefect-secret:BLOCK``) and load the key inside the task that encrypts. Tasks that touch
keys neither cache nor persist their results.
"""

import os

# quiet, local defaults for the embedded (ephemeral) API; explicit settings win
os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "false")
