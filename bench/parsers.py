"""Alternative HTTP/1.1 parsers for the credential server, for bench/credentials.py only.

The server's connection (guestagent/credentials/http.py) parses heads by hand. These
subclasses swap in a well-kept parser so the benchmark can decide:

- ``httptools``: llhttp (C) through callbacks, as uvicorn uses it;
- ``h11``: the pure-Python sans-I/O state machine; it must also frame the responses
  (it tracks each cycle), so answers are re-emitted through it.

Only the parsing changes; routing, peers and the answers are the server's own. The
head-size limit and timeouts stay with the base class's deadline bookkeeping.
"""

from __future__ import annotations

from typing import Any

from guestagent.credentials.http import MAX_HEAD, Connection, Request


class HttptoolsConnection(Connection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import httptools

        super().__init__(*args, **kwargs)
        self._error = httptools.HttpParserError
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._ready: list[Request] = []
        self._head_bytes = 0

    # llhttp callbacks
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value
        self._head_bytes += len(name) + len(value) + 4

    def on_message_complete(self) -> None:
        close = not self._parser.should_keep_alive()
        self._ready.append(Request(self._parser.get_method(), self._url, self._headers, close))
        self._url, self._headers, self._head_bytes = b"", {}, 0

    def _drain(self) -> None:
        transport, peer = self.transport, self.peer
        if transport is None or peer is None:
            return
        if self.buf:
            data, self.buf = self.buf, b""
            try:
                self._parser.feed_data(data)
            except self._error:
                self._fail(400, "BadRequest", "malformed request")
                return
            if self._head_bytes > MAX_HEAD:
                self._fail(431, "HeaderTooLarge", "request head too large")
                return
        while self._ready and not self.closing:
            req = self._ready.pop(0)
            result = self.server.handle(peer, req)
            if isinstance(result, bytes):
                self._answer(result, req.close)
                continue
            self._wait(req, result)
            return
        self._rearm()


class H11Connection(Connection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import h11

        super().__init__(*args, **kwargs)
        self._h11 = h11
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)

    def _drain(self) -> None:
        h11 = self._h11
        transport, peer = self.transport, self.peer
        if transport is None or peer is None:
            return
        if self.buf:
            self._conn.receive_data(self.buf)
            self.buf = b""
        while not self.closing:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError:
                self._fail(400, "BadRequest", "malformed request")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if not isinstance(event, h11.Request):
                continue
            headers = {k.lower(): v for k, v in event.headers}
            close = headers.get(b"connection", b"").lower() == b"close"
            req = Request(event.method, event.target, headers, close)
            result = self.server.handle(peer, req)
            if not isinstance(result, bytes):
                self._wait(req, result)
                return
            self._answer(self._frame(result), close)
        self._rearm()

    def _frame(self, raw: bytes) -> bytes:
        """Emit the server's answer through h11 (it must see every response)."""
        h11 = self._h11
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = [tuple(ln.split(b": ", 1)) for ln in lines[1:]]
        while self._conn.their_state is h11.SEND_BODY:
            self._conn.next_event()  # EndOfMessage of the request
        out = self._conn.send(h11.Response(status_code=status, headers=headers))
        out += self._conn.send(h11.Data(data=body)) + self._conn.send(h11.EndOfMessage())
        if self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE:
            self._conn.start_next_cycle()
        return out


VARIANTS: dict[str, type[Connection]] = {
    "builtin": Connection,
    "httptools": HttptoolsConnection,
    "h11": H11Connection,
}
