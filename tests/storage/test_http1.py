"""The S3 client's own HTTP/1.1 connection against a scripted loopback server: the framings
S3 servers use (Content-Length, chunked, read-to-close, HEAD, 1xx), keep-alive reuse, and
the failures a transfer must survive (a stale connection, an answer cut short); and OSS's
CRC64 header checked on a download (moto and rclone do not send it)."""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from guestagent.storage import integrity
from guestagent.storage.endpoint import from_url
from guestagent.storage.errors import Unavailable
from guestagent.storage.keys import Keys, StaticKeys
from guestagent.storage.s3 import S3Client

Answer = Callable[[socket.socket, bytes], bool]  # (connection, request head) -> keep open?


@dataclass
class Script:
    """A server answering each request with the next scripted answer."""

    answers: list[Answer]
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0


def _read_request(conn: socket.socket, buf: bytearray) -> bytes | None:
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end])
    del buf[:end]
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            want = int(line.split(b":")[1])
            while len(buf) < want:
                buf += conn.recv(65536)
            del buf[:want]
    return head


@pytest.fixture
def server() -> Iterator[Callable[[list[Answer]], tuple[Script, S3Client]]]:
    listeners: list[socket.socket] = []
    clients: list[S3Client] = []

    def start(answers: list[Answer]) -> tuple[Script, S3Client]:
        script = Script(list(answers))
        lsock = socket.create_server(("127.0.0.1", 0))
        listeners.append(lsock)

        def serve() -> None:
            while script.answers:
                try:
                    conn, _ = lsock.accept()
                except OSError:
                    return
                script.connections += 1
                buf = bytearray()
                with conn:
                    while script.answers:
                        head = _read_request(conn, buf)
                        if head is None:
                            break
                        script.requests.append(head)
                        if not script.answers.pop(0)(conn, head):
                            break

        threading.Thread(target=serve, daemon=True).start()
        port = lsock.getsockname()[1]
        client = S3Client(from_url(f"http://127.0.0.1:{port}", path_style=True),
                          StaticKeys(Keys("id", "secret")), retries=2, backoff_base=0.01,
                          timeout=10)
        clients.append(client)
        return script, client

    yield start
    for client in clients:
        client.close()
    for lsock in listeners:
        lsock.close()


def send(raw: bytes, keep: bool = True) -> Answer:
    def answer(conn: socket.socket, head: bytes) -> bool:
        conn.sendall(raw)
        return keep

    return answer


def ok(body: bytes, extra: str = "") -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def test_bodies_by_length_chunked_and_to_close(server) -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
    script, client = server([
        send(ok(b"by length", "ETag: \"e1\"\r\n")),
        send(chunked),
        send(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"after 100")),
        send(b"HTTP/1.0 200 OK\r\n\r\nuntil the connection closes", keep=False),
        send(ok(b"new connection")),
    ])
    first = client.call("GET", "bkt", "a")
    assert first.body == b"by length" and first.headers["etag"] == '"e1"'
    assert client.call("GET", "bkt", "b").body == b"hello world"
    assert client.call("GET", "bkt", "c").body == b"after 100"
    assert client.call("GET", "bkt", "d").body == b"until the connection closes"
    assert client.call("GET", "bkt", "e").body == b"new connection"
    # Keep-alive: the first four answers on one connection, the fifth after the close.
    assert script.connections == 2
    assert script.requests[0].startswith(b"GET /bkt/a HTTP/1.1\r\n")
    assert b"authorization: aws4-hmac-sha256" in script.requests[0].lower()


def test_head_has_no_body_and_the_connection_is_reused(server) -> None:
    script, client = server([
        send(b"HTTP/1.1 200 OK\r\nContent-Length: 123456\r\nETag: \"abc\"\r\n"
             b"x-amz-meta-mtime: 12.5\r\n\r\n"),
        send(ok(b"next")),
    ])
    info = client.head_object("bkt", "k")
    assert info is not None and info.size == 123456 and info.meta == {"mtime": "12.5"}
    assert client.call("GET", "bkt", "k2").body == b"next"
    assert script.connections == 1


def test_a_stale_keep_alive_connection_is_retried_at_once(server) -> None:
    script, client = server([
        send(ok(b"one")),
        send(b"", keep=False),  # the server dropped the idle connection
        send(ok(b"two")),
    ])
    assert client.call("GET", "bkt", "a").body == b"one"
    assert client.call("GET", "bkt", "b").body == b"two"
    assert client.retried == 0 and script.connections == 2


def test_a_body_cut_short_is_fetched_again_from_where_it_stopped(server) -> None:
    data = bytes(range(256)) * 64  # 16 KiB
    cut = (b"HTTP/1.1 206 Partial Content\r\nContent-Length: 16384\r\n"
           b"Content-Range: bytes 0-16383/16384\r\n\r\n" + data[:5000])
    rest = (b"HTTP/1.1 206 Partial Content\r\nContent-Length: 11384\r\n"
            b"Content-Range: bytes 5000-16383/16384\r\n\r\n" + data[5000:])
    script, client = server([send(cut, keep=False), send(rest)])
    got = bytearray(len(data))

    def write(pos: int, chunk: memoryview) -> None:
        got[pos:pos + len(chunk)] = chunk

    client.get_range("bkt", "k", 0, len(data), write)
    assert bytes(got) == data
    assert b"range: bytes=0-16383" in script.requests[0].lower()
    assert b"range: bytes=5000-16383" in script.requests[1].lower()


def test_a_body_spliced_into_a_file_cut_short_goes_on_from_where_it_stopped(
    server, tmp_path: Path
) -> None:
    """The large-object path: bytes go socket -> pipe -> file at their offset (the ones
    read with the headers written first), and a cut is fetched again from the byte it
    stopped at, into the same place; ``landed`` is told of every byte once."""
    data = os.urandom(3 * 1024 * 1024)
    start, end, stop = 1000, 3 * 1024 * 1024, 2 * 1024 * 1024 + 77
    head = (f"HTTP/1.1 206 Partial Content\r\nContent-Length: {end - start}\r\n"
            f"Content-Range: bytes {start}-{end - 1}/{end}\r\n\r\n").encode()
    rest = (f"HTTP/1.1 206 Partial Content\r\nContent-Length: {end - stop}\r\n"
            f"Content-Range: bytes {stop}-{end - 1}/{end}\r\n\r\n").encode()
    script, client = server([send(head + data[start:stop], keep=False),
                             send(rest + data[stop:])])
    path = tmp_path / "f.part"
    path.write_bytes(b"\0" * end)
    landed: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDWR)
    try:
        client.get_range_into("bkt", "k", start, end, fd=fd,
                              landed=lambda pos, n: landed.append((pos, n)))
    finally:
        os.close(fd)
    assert path.read_bytes() == b"\0" * start + data[start:]
    assert sum(n for _, n in landed) == end - start
    assert all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(landed))
    assert f"range: bytes={stop}-{end - 1}".encode() in script.requests[1].lower()


def test_a_server_ignoring_the_range_still_gives_the_right_bytes(server) -> None:
    data = bytes(range(256)) * 16
    cut = (b"HTTP/1.1 206 Partial Content\r\nContent-Length: 4096\r\n"
           b"Content-Range: bytes 0-4095/4096\r\n\r\n" + data[:1000])
    _, client = server([send(cut, keep=False), send(ok(data))])  # then all of it, 200
    got = bytearray(len(data))

    def write(pos: int, chunk: memoryview) -> None:
        got[pos:pos + len(chunk)] = chunk

    client.get_range("bkt", "k", 0, len(data), write)
    assert bytes(got) == data


def test_a_range_answer_from_the_wrong_offset_is_refused(server) -> None:
    wrong = (b"HTTP/1.1 206 Partial Content\r\nContent-Length: 10\r\n"
             b"Content-Range: bytes 0-9/100\r\n\r\n" + b"x" * 10)
    _, client = server([send(wrong)] * 3)
    with pytest.raises(Unavailable, match="asked for bytes from 50"):
        client.get_range("bkt", "k", 50, 60, lambda pos, chunk: None)


def test_garbage_instead_of_an_answer_is_retried_then_named(server) -> None:
    _, client = server([send(b"SSH-2.0-OpenSSH\r\n\r\n", keep=False)] * 3)
    with pytest.raises(Unavailable, match=r"failed 3 times.*not an HTTP/1\.x status line"):
        client.call("GET", "bkt", "k")


def test_header_values_cannot_inject_lines(server) -> None:
    script, client = server([send(ok(b""))])
    with pytest.raises(ValueError, match="line breaks"):
        client.put_object("bkt", "k", b"x", b"0" * 16, meta={"note": "a\r\nx-evil: 1"})
    assert script.requests == []


def _oss_object(body: bytes, crc: int) -> Answer:
    """HEAD and (ranged) GET of one object as OSS answers them, with its CRC64 header."""
    extra = (f"ETag: \"{hashlib.md5(body).hexdigest()}\"\r\n"
             f"x-oss-hash-crc64ecma: {crc}\r\n")

    def answer(conn: socket.socket, head: bytes) -> bool:
        lines = head.decode().lower().split("\r\n")
        ranges = [line.split("bytes=")[1] for line in lines if line.startswith("range:")]
        if lines[0].startswith("head"):
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
                         .encode())
        elif ranges:
            first, last = (int(x) for x in ranges[0].split("-"))
            part = body[first:last + 1]
            conn.sendall(ok(part, extra + f"Content-Range: bytes {first}-{last}/{len(body)}"
                                          "\r\n").replace(b"200 OK", b"206 Partial Content"))
        else:
            conn.sendall(ok(body, extra))
        return True

    return answer


@pytest.mark.parametrize(("size", "requests"), [(5000, 2), (3 * 1024 * 1024, 3)])
def test_oss_crc64_is_checked_on_download(server, tmp_path: Path, size: int,
                                          requests: int) -> None:
    """Whole (5000 bytes) and in ranges (3 MiB as 1 + 2 MiB, summed by the follower)."""
    from guestagent.storage.ossurl import OssUrl
    from guestagent.storage.transfer import IntegrityError, Options, Transfers

    body = os.urandom(size)
    crc = integrity.file_crc64_of(body)
    # A HEAD, then one GET or two ranges; the same again with a wrong CRC64.
    _, client = server([_oss_object(body, crc)] * requests
                       + [_oss_object(body, crc ^ 1)] * requests)
    dest = tmp_path / "dest"
    dest.mkdir()
    opts = Options(state_dir=tmp_path / "state", part_size=1024 * 1024,
                   multipart_threshold=2 * 1024 * 1024, concurrency=1)
    with Transfers(client, opts) as t:
        t.download_file(OssUrl("bkt", "k"), dest / "good")
        assert (dest / "good").read_bytes() == body
        # Same bytes (the MD5 matches), but the CRC64 OSS sends does not: refused.
        with pytest.raises(IntegrityError, match="CRC64 mismatch"):
            t.download_file(OssUrl("bkt", "k"), dest / "bad")
    assert sorted(p.name for p in dest.iterdir()) == ["good"]
