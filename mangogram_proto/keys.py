"""CurveZMQ keys: key pairs on disk, fingerprints, pinned server keys, key discovery.

Keys travel and are stored as Z85 text (40 characters), as libzmq prints them. A
fingerprint is what people compare: "SHA256:" and the unpadded base64 of the SHA-256 of
the 32-byte public key, as SSH shows host keys.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85

# The plaintext key-discovery exchange: request [KEY_SIGNATURE, b"KEY"], answer
# [KEY_SIGNATURE, b"KEY", public key in Z85].
KEY_SIGNATURE = b"MGK01"
KEY_COMMAND = b"KEY"


class KeyFileError(Exception):
    """A key file is missing, unreadable, malformed or readable by others."""


@dataclass(frozen=True)
class KeyPair:
    public: str
    secret: str

    @classmethod
    def generate(cls) -> KeyPair:
        public, secret = zmq.curve_keypair()
        return cls(public.decode("ascii"), secret.decode("ascii"))


def is_valid_key(text: str) -> bool:
    """True for a 40-character Z85 CurveZMQ key."""
    if len(text) != 40:
        return False
    try:
        return len(z85.decode(text.encode("ascii"))) == 32
    except (ValueError, UnicodeEncodeError, KeyError):
        return False


def fingerprint(public: str) -> str:
    raw = z85.decode(public.encode("ascii"))
    digest = base64.b64encode(hashlib.sha256(raw).digest()).decode("ascii").rstrip("=")
    return f"SHA256:{digest}"


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (0600), replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(tmp, 0o600)  # umask may have narrowed less than we asked; Windows ignores it
    os.replace(tmp, path)


def save_keypair(path: Path, pair: KeyPair) -> None:
    _write_private(path, json.dumps({"public": pair.public, "secret": pair.secret}) + "\n")


def load_keypair(path: Path) -> KeyPair:
    """Read a key pair file.

    Raises:
        KeyFileError: missing, malformed, or (on POSIX) readable by group or others.
    """
    try:
        if os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(f"{path} is readable by others; run: chmod 600 {path}")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise KeyFileError(f"no key file at {path}") from exc
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise KeyFileError(f"{path} is not a key file")
    public, secret = data.get("public"), data.get("secret")
    if not (isinstance(public, str) and isinstance(secret, str)):
        raise KeyFileError(f"{path} is not a key file")
    if not (is_valid_key(public) and is_valid_key(secret)):
        raise KeyFileError(f"{path} holds malformed keys")
    if zmq.curve_public(secret.encode("ascii")).decode("ascii") != public:
        raise KeyFileError(f"{path}: the public key does not belong to the secret key")
    return KeyPair(public, secret)


def load_or_create_keypair(path: Path) -> tuple[KeyPair, bool]:
    """The key pair in `path`, created on first use. Returns (pair, created)."""
    if path.exists():
        return load_keypair(path), False
    pair = KeyPair.generate()
    save_keypair(path, pair)
    return pair, True


class KnownServers:
    """Pinned server keys, one "endpoint key" line each (like SSH's known_hosts)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _entries(self) -> dict[str, str]:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return {}
        entries = {}
        for line in lines:
            parts = line.split()
            if len(parts) == 2 and not line.startswith("#") and is_valid_key(parts[1]):
                entries[parts[0]] = parts[1]
        return entries

    def lookup(self, endpoint: str) -> str | None:
        return self._entries().get(endpoint)

    def pin(self, endpoint: str, public: str) -> None:
        entries = self._entries()
        entries[endpoint] = public
        text = "".join(f"{e} {k}\n" for e, k in sorted(entries.items()))
        _write_private(self.path, "# MangoGram pinned server keys: endpoint key\n" + text)


def key_endpoint_for(endpoint: str) -> str:
    """The key-discovery endpoint beside a broker endpoint: the next TCP port."""
    head, _, port = endpoint.rpartition(":")
    if not port.isdigit() or not head.startswith("tcp://"):
        raise ValueError(f"cannot derive a key endpoint from {endpoint!r}; give it explicitly")
    return f"{head}:{int(port) + 1}"


def fetch_server_key(
    key_endpoint: str, timeout_ms: int = 3000, context: zmq.Context[zmq.Socket[bytes]] | None = None
) -> str:
    """Ask a broker's key-discovery endpoint for its public key (plaintext, unauthenticated:
    show the fingerprint to a person before trusting it).

    Raises:
        TimeoutError: nothing answered.
        KeyFileError: the answer is not a key.
    """
    context = context or zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(key_endpoint)
        sock.send_multipart([KEY_SIGNATURE, KEY_COMMAND])
        if not sock.poll(timeout_ms):
            raise TimeoutError(f"no key server answered at {key_endpoint}")
        reply = sock.recv_multipart()
    finally:
        sock.close(linger=0)
    if len(reply) != 3 or reply[:2] != [KEY_SIGNATURE, KEY_COMMAND]:
        raise KeyFileError(f"{key_endpoint} did not answer with a key")
    key = reply[2].decode("ascii", errors="replace")
    if not is_valid_key(key):
        raise KeyFileError(f"{key_endpoint} sent a malformed key")
    return key
