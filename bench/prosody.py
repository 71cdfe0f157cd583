"""Prosody, an XMPP server, as a bench system: what people run instead for private chat
with offline storage and encryption.

The bench starts it as a plain user process (never the system service) with a config and
data directory of its own, a c2s port on 127.0.0.1, TLS required (STARTTLS, with a
self-signed certificate made here by `openssl`), offline storage on and server-to-server
off. Users are registered through `prosodyctl shell` with that config, all in one call.
`bench.load`'s `XmppClient` drives it.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from bench.load import XMPP_DOMAIN, XMPP_PASSWORD

log = logging.getLogger(__name__)

CONFIG = """\
-- Written by bench.prosody for one benchmark run; nothing here is shared.
pidfile = "{work}/prosody.pid"
data_path = "{work}/data"
admin_socket = "{work}/admin.sock"
certificates = "{work}"
log = {{ info = "*console" }}
-- The bench may run as root in a container; Prosody refuses that unless told.
run_as_root = true
modules_enabled = {{ "roster", "saslauth", "tls", "disco", "ping", "offline", "admin_shell" }}
modules_disabled = {{ "s2s", "s2s_auth_certs" }}
interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {port} }}
c2s_direct_tls_ports = {{}}
legacy_ssl_ports = {{}}
s2s_ports = {{}}
c2s_require_encryption = true
authentication = "internal_hashed"
storage = "internal"
-- TCP_NODELAY, as ZeroMQ and the other systems set it.
network_settings = {{ nagle = false }}
-- Lua 5.4's generational collector: with the default incremental one, deliveries
-- collapsed past about 1,000 connections (measured: busy in Lua between system calls).
gc = {{ mode = "generational" }}
ssl = {{ key = "{work}/key.pem", certificate = "{work}/cert.pem" }}
VirtualHost "{domain}"
"""


def missing() -> str | None:
    """Why Prosody cannot run here, or None when it can."""
    for program in ("prosody", "prosodyctl", "openssl"):
        if shutil.which(program) is None:
            return f"{program} is not installed"
    return None


@dataclass
class Prosody:
    process: subprocess.Popen[str]
    endpoint: str
    config: Path

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it is still closing streams after 10 s."""
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def register(self, names: list[str]) -> None:
        """Create the users, all in one `prosodyctl shell` run over its admin socket."""
        script = "".join(
            f'user:create("{name}@{XMPP_DOMAIN}", "{XMPP_PASSWORD}")\n' for name in names
        )
        done = subprocess.run(
            ["prosodyctl", "--config", str(self.config), "shell"],
            input=script,
            capture_output=True,
            text=True,
            timeout=120 + len(names) * 0.05,
        )
        created = done.stdout.count("OK: User created")
        if created != len(names):
            raise RuntimeError(
                f"prosodyctl created {created} of {len(names)} users: {done.stdout[-500:]}"
                f" {done.stderr[-500:]}"
            )


def free_port() -> int:
    # Prosody takes a port number, not "any port": ask the OS for one that is free now.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start(work: Path, timeout: float = 30) -> Prosody:
    work.mkdir(parents=True, exist_ok=True)
    (work / "data").mkdir(exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(work / "key.pem"),
         "-out", str(work / "cert.pem"), "-days", "2", "-subj", f"/CN={XMPP_DOMAIN}"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    port = free_port()
    config = work / "prosody.cfg.lua"
    config.write_text(CONFIG.format(work=work.resolve(), port=port, domain=XMPP_DOMAIN))
    process = subprocess.Popen(
        ["prosody", "--config", str(config), "-F"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    watchdog = threading.Timer(timeout, process.kill)  # a hung start ends the readline
    watchdog.start()
    try:
        assert process.stdout is not None
        seen = []
        for line in process.stdout:
            seen.append(line)
            if "Activated service 'c2s'" in line:
                break
        else:
            raise RuntimeError("Prosody did not start: " + "".join(seen[-10:]))
        # Prosody is one thread that loads every module before it serves: once a stream
        # is answered, its admin socket (for prosodyctl) is there too.
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as probe:
            probe.sendall(
                f"<?xml version='1.0'?><stream:stream to='{XMPP_DOMAIN}' version='1.0'"
                " xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>".encode()
            )
            probe.recv(4096)
    except BaseException:
        process.kill()
        process.wait(10)
        raise
    finally:
        watchdog.cancel()
    # Its log goes on at info level, as a deployment's would; drain it.
    threading.Thread(target=drain, args=(process.stdout,), daemon=True).start()
    return Prosody(process, f"127.0.0.1:{port}", config)


def drain(stream: IO[str]) -> None:
    for _line in stream:
        pass
