"""CurveZMQ keys: key pairs on disk, fingerprints, pinned server keys, key discovery.

Keys travel and are stored as Z85 text (40 characters), as libzmq prints them. A
fingerprint is what people compare: "SHA256:" and the unpadded base64 of the SHA-256 of
the 32-byte public key, as SSH shows host keys.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85

from .env import SettingError, env_bool, env_key

# The plaintext key-discovery exchange: request [KEY_SIGNATURE, b"KEY"], answer
# [KEY_SIGNATURE, b"KEY", public key in Z85].
log = logging.getLogger(__name__)

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
    """Write a file only its owner can read (0600), replacing it atomically and durably.

    The text goes to a temporary file of its own in the same directory (so concurrent
    writers never share one), is flushed to disk, and only then renamed over `path`; the
    directory is flushed too, so after a crash `path` holds either the old or the new
    text, never an empty file.
    """
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    # mkstemp creates the file with mode 0600 and a name nobody else is using.
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)  # umask may have narrowed less than we asked; Windows ignores it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable. Windows cannot open a directory for this
    (NTFS journals the rename itself), so there it is skipped."""
    if os.name == "nt":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError as exc:  # the file itself is written and renamed: only durability waits
        log.debug("cannot open directory %s to fsync it: %s", directory, exc)
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems (and macOS network mounts) refuse it
        log.debug("cannot fsync directory %s: %s", directory, exc)
    finally:
        os.close(fd)


# Threads of one process share this; other processes are kept out by the lock file.
_THREAD_LOCK = threading.Lock()
# Windows: each msvcrt LK_LOCK attempt itself retries for about 10 s, so about 30 s in all.
LOCK_ATTEMPTS = 3


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock for read-modify-write of `path`, across threads and
    processes: an advisory lock on `<path>.lock` (flock on POSIX, msvcrt on Windows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    with _THREAD_LOCK:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _lock_file(fd, lock_path)
            try:
                yield
            finally:
                _unlock_file(fd)
        finally:
            os.close(fd)


if sys.platform == "win32":  # (sys.platform, not os.name: mypy --platform reads it)
    import msvcrt

    def _lock_file(fd: int, lock_path: Path) -> None:
        for _attempt in range(LOCK_ATTEMPTS):
            try:
                msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
                return
            except OSError:
                continue  # LK_LOCK already waited
        raise KeyFileError(f"{lock_path} stayed locked by another program; try again")

    def _unlock_file(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _lock_file(fd: int, lock_path: Path) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if the holder dies

    def _unlock_file(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


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
    """The key pair in `path`, created on first use. Returns (pair, created).

    Two programs starting at once for the first time get the same pair: creation is
    done under the file's lock.
    """
    if path.exists():
        return load_keypair(path), False
    with _locked(path):
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
        """Pin `public` for `endpoint`, keeping every other entry, also when other
        threads or programs pin at the same time."""
        with _locked(self.path):
            self._pin_unlocked(endpoint, public)

    def _pin_unlocked(self, endpoint: str, public: str) -> None:
        entries = self._entries()
        entries[endpoint] = public
        text = "".join(f"{e} {k}\n" for e, k in sorted(entries.items()))
        _write_private(self.path, "# MangoGram pinned server keys: endpoint key\n" + text)


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for tcp endpoints on a loopback address (and ipc/inproc, which never leave
    the machine)."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://") :].rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def key_endpoint_for(endpoint: str) -> str:
    """The key-discovery endpoint beside a broker endpoint: the next TCP port."""
    head, _, port = endpoint.rpartition(":")
    if port == "*" and head.startswith("tcp://"):
        return endpoint
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


class ServerKeyError(Exception):
    """The broker's key could not be learned, does not match the pinned one, or the
    broker refused our handshake. The message says what to do."""


@dataclass(frozen=True)
class Security:
    """What a client needs for CurveZMQ: whom it trusts and who it is."""

    server_key: str
    identity: KeyPair


def user_config_dir() -> Path:
    """Where clients keep their identity and pinned keys (MANGOGRAM_CONFIG_DIR wins)."""
    override = os.environ.get("MANGOGRAM_CONFIG_DIR")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_config_dir("mangogram", appauthor=False))


def plaintext_requested() -> bool:
    """True when MANGOGRAM_INSECURE_PLAINTEXT asks for the development mode.

    Raises:
        SettingError: the variable is set to something other than 1/true/yes/on or
            0/false/no/off.
    """
    return env_bool("MANGOGRAM_INSECURE_PLAINTEXT") or False


TrustPrompt = Callable[[str, str, str], bool]


def resolve_security(
    endpoint: str,
    *,
    server_key: str | None = None,
    identity: KeyPair | Path | None = None,
    plaintext: bool | None = None,
    key_endpoint: str | None = None,
    trust_new_server: TrustPrompt | None = None,
    config_dir: Path | None = None,
) -> Security | None:
    """Decide how to talk to `endpoint`: None for plaintext (development), else the keys.

    The server key is, in order: `server_key` (or MANGOGRAM_SERVER_KEY); the key pinned for
    this endpoint in `known_servers`; or, trusted on first use, the key the broker's
    key-discovery endpoint announces, if `trust_new_server(endpoint, key, fingerprint)`
    agrees (default: accept and log the fingerprint). A newly trusted key is pinned.
    The identity is `identity`, else MANGOGRAM_IDENTITY, else `identity.json` in the
    config dir, created on first use.

    Raises:
        ServerKeyError: no usable server key (an empty one included).
        KeyFileError: an identity file is broken or readable by others.
        SettingError: MANGOGRAM_INSECURE_PLAINTEXT holds something other than a yes/no word.
    """
    if plaintext is None:
        plaintext = plaintext_requested()
    if plaintext:
        if not is_loopback_endpoint(endpoint):
            raise ServerKeyError(
                f"plaintext is for development on this machine only; {endpoint} is not a"
                " loopback address (unset MANGOGRAM_INSECURE_PLAINTEXT)"
            )
        log.warning("talking to %s without encryption (development mode)", endpoint)
        return None
    directory = config_dir or user_config_dir()
    if isinstance(identity, KeyPair):
        pair = identity
    else:
        path = identity or Path(os.environ.get("MANGOGRAM_IDENTITY") or directory / "identity.json")
        pair, created = load_or_create_keypair(Path(path))
        if created:
            log.info("created your identity key in %s", path)
    if server_key is not None:
        if not server_key.strip():
            raise ServerKeyError(
                "the server key is empty; give the broker's key (it logs it at start), or"
                " leave it out to use the pinned one"
            )
        explicit: str | None = server_key
    else:
        try:
            explicit = env_key("MANGOGRAM_SERVER_KEY")
        except SettingError as exc:
            raise ServerKeyError(str(exc)) from exc
    if explicit is not None:
        if not is_valid_key(explicit):
            raise ServerKeyError("the server key must be 40 characters of Z85 text")
        return Security(explicit, pair)
    known = KnownServers(directory / "known_servers")
    pinned = known.lookup(endpoint)
    if pinned is not None:
        return Security(pinned, pair)
    where = key_endpoint or os.environ.get("MANGOGRAM_KEY_ENDPOINT") or key_endpoint_for(endpoint)
    try:
        announced = fetch_server_key(where)
    except (TimeoutError, KeyFileError) as exc:
        raise ServerKeyError(
            f"cannot learn the key of {endpoint}: {exc}. Give it with --server-key or"
            " MANGOGRAM_SERVER_KEY (the broker logs it at start)"
        ) from exc
    accept = trust_new_server or _accept_and_log
    if not accept(endpoint, announced, fingerprint(announced)):
        raise ServerKeyError(f"you did not trust the key of {endpoint}")
    known.pin(endpoint, announced)
    return Security(announced, pair)


@dataclass(frozen=True)
class SecurityRequest:
    """What a caller asked for (see `resolve_security`); `resolve` looks the keys up."""

    server_key: str | None = None
    identity: KeyPair | Path | None = None
    plaintext: bool | None = None
    trust_new_server: TrustPrompt | None = None

    def resolve(self, endpoint: str) -> Security | None:
        return resolve_security(
            endpoint,
            server_key=self.server_key,
            identity=self.identity,
            plaintext=self.plaintext,
            trust_new_server=self.trust_new_server,
        )


def _accept_and_log(endpoint: str, key: str, print_: str) -> bool:
    log.warning("trusting %s on first use: key fingerprint %s (pinned)", endpoint, print_)
    return True


def handshake_failure_message(endpoint: str, security: Security | None, event: int) -> str:
    """A person-readable account of a failed CurveZMQ handshake."""
    if security is None:
        return (
            f"the broker at {endpoint} requires encryption; drop the plaintext setting"
            " (MANGOGRAM_INSECURE_PLAINTEXT / --insecure-plaintext)"
        )
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return f"the broker at {endpoint} refused our key"
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return (
            f"the broker at {endpoint} does not speak CurveZMQ: it most likely runs without"
            " encryption (--insecure-plaintext). For a development broker on this machine"
            " use plaintext too (MANGOGRAM_INSECURE_PLAINTEXT=1 / --insecure-plaintext);"
            " otherwise ask its operator"
        )
    return (
        f"the broker at {endpoint} does not hold the expected key"
        f" {fingerprint(security.server_key)} (or it runs without encryption). If its key"
        f" really changed, remove its line from {user_config_dir() / 'known_servers'}, or"
        " pass the new key with --server-key / MANGOGRAM_SERVER_KEY; otherwise someone may"
        " be impersonating it"
    )
