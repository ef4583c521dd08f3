"""A loopback HTTP server for tests, serving a folder slowly enough that a shard is still being read
when the test kills the server: `python tests/shard_server.py FOLDER PORT` (GET only, 16 KiB every
10 ms; killed, it leaves the readers' connections reset, as a real server's crash does)."""

from __future__ import annotations

import functools
import http.server
import sys
import time


class Slow(http.server.SimpleHTTPRequestHandler):
    def copyfile(self, source, destination) -> None:
        while chunk := source.read(16384):
            destination.write(chunk)
            time.sleep(0.01)

    def log_message(self, *args) -> None:  # quiet
        pass


if __name__ == "__main__":
    folder, port = sys.argv[1], int(sys.argv[2])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Slow, directory=folder))
    print("serving", flush=True)
    server.serve_forever()
