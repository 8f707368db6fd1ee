"""Key references for flows: a path, ``env:NAME``, or ``prefect-secret:BLOCK`` (a Prefect Secret block
holding a key file's content or the hex secret). Resolved inside tasks only."""

from __future__ import annotations

from etc_data.keys import OwnerKey, load_key, parse_key_text

SECRET_PREFIX = "prefect-secret:"


def load_key_ref(ref: str | None) -> OwnerKey:
    if ref and str(ref).startswith(SECRET_PREFIX):
        from prefect.blocks.system import Secret

        name = str(ref)[len(SECRET_PREFIX):]
        try:
            value = Secret.load(name).get()
        except ValueError as e:
            from etc_data.keys import KeyFileError

            raise KeyFileError(f"Prefect Secret block {name!r} cannot be loaded: {e}") from None
        return parse_key_text(str(value), f"Prefect Secret block {name!r}")
    return load_key(ref)
