"""The one base class for every user-facing error: the CLI prints its message and exits 2."""


class EtcError(ValueError):
    """A bad input, named in the message (file, shard, key reference, config field)."""
