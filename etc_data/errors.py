"""The base class of every user-facing error (the CLI prints its message and exits 2), and the
source error that image decoding, archives and sources share."""


class EtcError(ValueError):
    """A bad input, named in the message (file, shard, key reference, config field)."""


class SourceError(EtcError):
    """A source or one of its images cannot be read (the message names the file)."""
