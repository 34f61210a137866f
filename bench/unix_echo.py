"""Floor (b) of the benchmark: a tiny echo server on a Unix socket (blocking sockets).

Frames are asgi_htag's: a 4-byte big-endian length, then the payload. Each frame received
is sent back as is. Started by bench/run.py as ``python bench/unix_echo.py PATH``; it
prints READY once listening and serves connections one at a time until stdin closes or
it is terminated.
"""
import os
import socket
import struct
import sys
import threading

HEADER = struct.Struct(">I")


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _serve(conn: socket.socket) -> None:
    with conn:
        try:
            while True:
                header = _recv_exactly(conn, HEADER.size)
                (length,) = HEADER.unpack(header)
                conn.sendall(header + _recv_exactly(conn, length))
        except (EOFError, OSError):
            return


def main(path: str) -> int:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(16)
    sys.stdout.write("READY\n")
    sys.stdout.flush()

    def stop_on_stdin_eof() -> None:  # the parent closing our stdin means: exit
        sys.stdin.read()
        os._exit(0)

    threading.Thread(target=stop_on_stdin_eof, daemon=True).start()
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
