"""Thin Prefect flows over the etc_data jobs: prepare, report, train, and scheduled serving.

This folder is installed as ``etc_data.flows`` (see pyproject.toml); the library itself never
imports Prefect, only the CLI's ``prepare``/``serve`` commands and users of these flows do.

Nothing here holds key material: flows and tasks receive key *references* (a path, ``env:NAME``
or ``prefect-secret:BLOCK``) and load the key inside the task that encrypts. Tasks that touch
keys neither cache nor persist their results.
"""

import os

# Prefect's embedded default: the local ephemeral API, quiet logs, results not persisted.
# Explicit settings (environment variables, a Prefect profile) win.
LOCAL_DEFAULTS = {
    "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true",
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def apply_local_defaults() -> None:
    """Set Prefect's embedded defaults where nothing else set them (before Prefect is imported)."""
    for k, v in LOCAL_DEFAULTS.items():
        os.environ.setdefault(k, v)


apply_local_defaults()
