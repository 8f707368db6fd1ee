"""Whom a reader trusts: the set of owners whose signed manifests it accepts.

Every manifest is signed by its owner (``keys.OwnerKey.sign``); ``manifest.read_manifest`` always
checks that signature against the public key the manifest carries, then asks a ``TrustPolicy``
whether that key is one the reader accepts:

- **pinned** (``--trust PUBKEY``, repeatable, and the public key of the owner's own ``--key``): a
  manifest signed by any other key is refused with ``UnknownSignerError``, naming both sides'
  fingerprints;
- **trust on first use** (nothing pinned): the manifest is accepted, and a one-line
  ``UnpinnedSignerWarning`` names the key so the reader can pin it next time. A job that reads
  several manifests pins the first one's signer for the others (``after_first_use``): the test
  split of a training run, or the other splits of a dataset root, must come from the same owner.

A policy is a set of keys, not one key: a job that reads splits of several owners (one model from
several owners' data) trusts each of them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable

from .errors import EtcError
from .keys import fingerprint, load_public_key


class UnknownSignerError(EtcError):
    """A manifest is validly signed, but by an owner the reader does not trust."""


class UnpinnedSignerWarning(UserWarning):
    """A manifest was accepted on its own public key (no --trust pinned one): trust on first use."""


@dataclass(frozen=True)
class TrustPolicy:
    keys: frozenset[str] = frozenset()   # accepted public keys (ed25519:...); empty = trust on first use

    @classmethod
    def from_refs(cls, refs: Iterable[str] = (), key=None) -> "TrustPolicy":
        """The policy of ``--trust`` references (public keys or files holding one) and an owner key
        (its public key is trusted too; None when the job was given none)."""
        pinned = {load_public_key(r) for r in (refs or ())}
        if key is not None:
            pinned.add(key.public_key)
        return cls(frozenset(pinned))

    @property
    def pinned(self) -> bool:
        return bool(self.keys)

    def after_first_use(self, public_key: str) -> "TrustPolicy":
        """This policy, or, when nothing is pinned, one pinning the signer just accepted."""
        return self if self.pinned else TrustPolicy(frozenset({public_key}))

    def check(self, public_key: str, where: str) -> None:
        """Refuse a signer the policy does not accept; warn once per key when nothing is pinned."""
        if not self.pinned:
            warnings.warn(UnpinnedSignerWarning(
                f"trusting signer {public_key} (fingerprint {fingerprint(public_key)}) on first use: "
                f"no --trust pins an owner"), stacklevel=3)
            return
        if public_key not in self.keys:
            trusted = ", ".join(sorted(fingerprint(k) for k in self.keys))
            raise UnknownSignerError(
                f"{where}: unknown signer: signed by key fingerprint {fingerprint(public_key)} ({public_key}), "
                f"which is not a trusted owner (trusted fingerprints: {trusted}); refused")
