"""A TCP forwarder that a test can break: one process losing its database (a network
partition between it and PostgreSQL) while every other process keeps its own, or a
service's gateway that turns slow, silent or forgetful.

Faults (each can be switched on and off while connections are open):

* ``cut()`` / ``restore()``: every connection dropped, new ones refused;
* ``latency_s``: each chunk is held this long before it is forwarded (both ways);
* ``black_hole()``: connections are accepted and what they send is swallowed, nothing
  comes back (a peer that hangs: the client's timeout is the only way out);
  ``drop_rate``: that fraction of new connections is closed at once;
* ``cut_responses(n, share)``: up to ``n`` answers are lost *after* the request was
  delivered — the upstream did the work, the client sees its connection reset — each
  with probability ``share`` (1: the next ``n``).

The Kafka broker cannot be put behind it transparently: a client connects to the
address the broker advertises (its own port), not the bootstrap address it was given.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time

from sqlalchemy.engine import make_url

from tests.support.harness import free_port


class TcpProxy:
    """``127.0.0.1:<port>`` forwarded to ``target``. ``cut()`` drops every connection
    and refuses new ones; ``restore()`` listens again on the same port (and ends the
    other faults)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = free_port()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.latency_s = 0.0
        self.drop_rate = 0.0
        self._black_hole = False
        self._cut_responses, self._cut_share = 0, 1.0
        #: faults that struck: connections dropped, answers cut after delivery
        self.dropped = 0
        self.responses_cut = 0
        self._rng = random.Random()
        self.restore()

    @classmethod
    def for_database(cls, url: str) -> TcpProxy:
        u = make_url(url)
        return cls(u.host or "127.0.0.1", u.port or 5432)

    @classmethod
    def for_http(cls, url: str) -> TcpProxy:
        """A proxy for an ``http://host:port`` base URL (the gateway's, say)."""
        hostport = url.split("://", 1)[-1].split("/", 1)[0]
        host, _, port = hostport.rpartition(":")
        return cls(host or "127.0.0.1", int(port))

    def url(self, url: str) -> str:
        """``url`` (a SQLAlchemy database URL) through this proxy."""
        return make_url(url).set(host="127.0.0.1", port=self.port).render_as_string(False)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        self.latency_s, self.drop_rate = 0.0, 0.0
        self._black_hole, self._cut_responses = False, 0
        if self._listener is not None:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            doomed, self._sockets = [*filter(None, [self._listener]), *self._sockets], []
            self._listener = None
        self.dropped += len(doomed) // 2
        for s in doomed:
            _close(s)

    def black_hole(self) -> None:
        """From now on nothing is forwarded either way, and open connections hang too."""
        self._black_hole = True

    def cut_responses(self, n: int = 1, share: float = 1.0) -> None:
        """From now on up to ``n`` answers are lost, each with probability ``share``
        (``cut_responses(0)``: none any more)."""
        with self._lock:
            self._cut_responses, self._cut_share = n, share

    def close(self) -> None:
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            if self.drop_rate and self._rng.random() < self.drop_rate:
                self.dropped += 1
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    _close(client)
                    _close(upstream)
                    return
                self._sockets += [client, upstream]
            for src, dst, answers in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(src, dst, answers), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, answers: bool) -> None:
        try:
            while data := src.recv(65536):
                if self.latency_s:
                    time.sleep(self.latency_s)
                while self._black_hole:  # swallow: the peer hears nothing
                    data = b""
                    time.sleep(0.05)
                if answers and self._take_cut():
                    return  # the request was delivered; its answer is lost
                if data:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)

    def _take_cut(self) -> bool:
        with self._lock:
            if self._cut_responses <= 0 or self._rng.random() >= self._cut_share:
                return False
            self._cut_responses -= 1
            self.responses_cut += 1
            return True


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept() or recv()
    s.close()
