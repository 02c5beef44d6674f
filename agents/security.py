"""ZeroMQ CURVE for the verifier socket (docs/design.md section 9).

Key flow: the driver makes every key of a run in memory (`RunKeys.new`): one server keypair and
one client keypair per DeviceGroup. The Verifier gets the server keypair and the allow-list of
client public keys (`ServerKeys`); each group gets the server's public key and its own keypair
(`ClientKeys`). All of it travels as Ray task arguments and is never written to a file.

The server authenticates clients with a ZAP handler on its own ZeroMQ context
(`AllowList`): a client key not on the allow-list is refused in the handshake. A client
without CURVE (NULL mechanism) or with the wrong server public key cannot complete the
handshake at all. A refused peer never reaches the verifier's message loop.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import zmq

MODES = ("auto", "on", "off")


def require_curve() -> None:
    if not zmq.has("curve"):
        raise RuntimeError(
            f"CURVE is needed (server.curve or a non-loopback verifier address) but this libzmq "
            f"({zmq.zmq_version()}, pyzmq {zmq.__version__}) was built without it: install a pyzmq "
            f"wheel (bundles libsodium) or a libzmq built with libsodium/tweetnacl"
        )


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or interface: it may be reachable from elsewhere


def curve_on(mode: str, host: str) -> bool:
    """Whether the verifier bound at `host` uses CURVE: auto = off loopback only. Raises
    ValueError for `off` off loopback (an open port anyone can reach must not be plain)."""
    if mode not in MODES:
        raise ValueError(f"server.curve must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off" and not is_loopback(host):
        raise ValueError(
            f"server.curve is off but the verifier binds {host}, which other machines can reach: "
            f"use curve auto or on (off is for loopback only)"
        )
    return mode == "on" or (mode == "auto" and not is_loopback(host))


@dataclass(frozen=True)
class Keypair:
    public: bytes  # z85, 40 bytes
    secret: bytes = field(repr=False)  # never in a repr or a log line

    @classmethod
    def new(cls) -> Keypair:
        require_curve()
        return cls(*zmq.curve_keypair())


@dataclass(frozen=True)
class ClientKeys:
    """What a client needs: the server's public key and its own keypair."""

    server_public: bytes
    keypair: Keypair


@dataclass(frozen=True)
class ServerKeys:
    """What the verifier needs: its keypair and the client public keys it accepts."""

    keypair: Keypair
    allowed: frozenset[bytes]


@dataclass(frozen=True)
class RunKeys:
    """Every key of one run (made in the driver, handed out through Ray)."""

    server: Keypair
    clients: tuple[Keypair, ...]

    @classmethod
    def new(cls, n_clients: int) -> RunKeys:
        return cls(Keypair.new(), tuple(Keypair.new() for _ in range(n_clients)))

    def for_server(self) -> ServerKeys:
        return ServerKeys(self.server, frozenset(k.public for k in self.clients))

    def for_client(self, i: int) -> ClientKeys:
        return ClientKeys(self.server.public, self.clients[i])


def configure_server(sock: zmq.Socket, keys: ServerKeys) -> None:
    """Make `sock` a CURVE server (before bind)."""
    require_curve()
    sock.curve_secretkey = keys.keypair.secret
    sock.curve_publickey = keys.keypair.public
    sock.curve_server = True


def configure_client(sock: zmq.Socket, keys: ClientKeys) -> None:
    """Make `sock` a CURVE client of the server with `keys.server_public` (before connect)."""
    require_curve()
    sock.curve_secretkey = keys.keypair.secret
    sock.curve_publickey = keys.keypair.public
    sock.curve_serverkey = keys.server_public


class AllowList:
    """A ZAP handler on `ctx` that admits CURVE clients whose public key is in `allowed` (an
    in-memory set: pyzmq's configure_curve would read keys from a directory). Only sockets of
    `ctx` are covered, so the verifier gives its socket a context of its own.

    Counts (`counts()`, in Verifier.status and summary.json "curve_refused"):
    - `denied`: handshakes of a client with a valid CURVE setup whose key is not allow-listed
      (refused here, by ZAP);
    - `failed`: every handshake the server socket refused, by libzmq's socket monitor (`watch`):
      the ZAP denials, and the clients that never get that far: no CURVE at all (mechanism
      mismatch) or the wrong server public key (the HELLO does not decrypt). A client that keeps
      reconnecting counts once per attempt."""

    HANDSHAKE_FAILED = (
        "EVENT_HANDSHAKE_FAILED_NO_DETAIL",
        "EVENT_HANDSHAKE_FAILED_PROTOCOL",
        "EVENT_HANDSHAKE_FAILED_AUTH",
    )

    def __init__(self, ctx: zmq.Context, allowed: frozenset[bytes]):
        from zmq.auth.thread import ThreadAuthenticator

        self.allowed = frozenset(allowed)
        self.denied = 0
        self.failed = 0
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        self.auth.configure_curve_callback("*", self)
        self._monitor = None

    def callback(self, domain: str, key: bytes) -> bool:  # pyzmq's credentials-provider interface
        ok = key in self.allowed
        self.denied += not ok
        return ok

    def watch(self, sock: zmq.Socket) -> None:
        """Count the handshakes `sock` (the CURVE server) refuses, in a thread of its own."""
        import threading

        events = 0
        for name in self.HANDSHAKE_FAILED:
            events |= getattr(zmq, name, 0)
        if not events:  # libzmq < 4.3: no handshake events; `denied` still counts
            return
        mon = sock.get_monitor_socket(events)
        self._monitor = (
            sock,
            mon,
            threading.Thread(target=self._count, args=(mon,), name="curve-monitor", daemon=True),
        )
        self._monitor[2].start()

    def _count(self, mon: zmq.Socket) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                event = recv_monitor_message(mon)
            except zmq.ZMQError:  # closed (stop)
                return
            if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                return
            self.failed += 1

    def counts(self) -> dict:
        return {"denied_keys": self.denied, "handshakes_refused": self.failed}

    def stop(self) -> None:
        if self._monitor is not None:
            sock, mon, thread = self._monitor
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            thread.join(timeout=2)
            mon.close(linger=0)
            self._monitor = None
        self.auth.stop()
