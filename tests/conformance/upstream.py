"""A small HTTP service for the proxy tests: `python3 upstream.py NAME`.
Prints its port on stdout once it listens.

GET /whoami  -> {"name", "path", "method", "headers"}
POST /upload -> {"name", "length", "sha256"} of the body (streamed in)
GET /slow    -> answers after 5 s
"""

import hashlib
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME = sys.argv[1]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def answer(self, obj, status=200):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.send_header("connection", "keep-alive, x-hop")
        self.send_header("x-hop", "must not pass")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.startswith("/slow"):
            time.sleep(5)
        self.answer({"name": NAME, "path": self.path, "method": "GET",
                     "headers": {k.lower(): v for k, v in self.headers.items()}})

    def do_POST(self):
        h, n = hashlib.sha256(), 0
        left = int(self.headers.get("content-length", "0"))
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
            left -= len(chunk)
        self.answer({"name": NAME, "length": n, "sha256": h.hexdigest()})


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
