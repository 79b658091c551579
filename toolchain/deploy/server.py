"""HTTP server for the artifact store: ``GET/HEAD /artifacts/<sha256>.tar`` (docs/deployment.md §1).

Starlette's FileResponse does the HTTP: ``Range`` (206 with Content-Range, 416 when unsatisfiable),
``HEAD`` with the length, ETag and Last-Modified; uvicorn serves it. Only content-addressed names
are served, so nothing else in the store directory (the index, temp files) is reachable.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Route

from edgesmith.toolchain.errors import UserError

_NAME = re.compile(r"^[0-9a-f]{64}\.tar$")
START_TIMEOUT_S = 15.0


def make_app(store_dir: Path) -> Starlette:
    store = Path(store_dir)

    async def artifact(request: Request) -> Response:
        name = request.path_params["name"]
        path = store / name
        if not _NAME.match(name) or not path.is_file():
            return PlainTextResponse("no such artifact archive\n", status_code=404)
        return FileResponse(path, media_type="application/x-tar")

    async def health(_request: Request) -> Response:
        return PlainTextResponse("ok\n")

    return Starlette(routes=[Route("/artifacts/{name}", artifact, methods=["GET", "HEAD"]),
                             Route("/healthz", health, methods=["GET"])])


class AppServer:
    """An ASGI app served by uvicorn in a background thread (tests, `edgesmith deploy`), or in the
    foreground (``run``); ``url`` once bound. The artifact server and the capture receiver
    (toolchain/capture/receiver.py) are both one of these."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 certfile: str | None = None, keyfile: str | None = None, what: str = "artifacts",
                 option: str = "--serve"):
        """With ``certfile`` and ``keyfile`` it serves https:// (e.g. a certificate from the fleet CA,
        `edgesmith broker certs`, which devices already trust)."""
        self.host = host
        self.what = what
        self.scheme = "https" if certfile else "http"
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as e:
            self._sock.close()
            raise UserError(f"cannot serve {what} on {host}:{port} ({e.strerror}); pick another {option} "
                            "address or port") from None
        self.port = self._sock.getsockname()[1]
        self._sock.listen(2048)  # connections wait in the backlog from now on, until uvicorn accepts them
        config = uvicorn.Config(app, log_level=log_level, access_log=log_level == "info",
                                lifespan="off", ssl_certfile=certfile, ssl_keyfile=keyfile)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                       name=f"{what}-server", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def start(self) -> AppServer:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise UserError(f"the {self.what} server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self._sock.close()

    def run(self) -> None:
        """Serve in the calling (main) thread until interrupted: uvicorn stops on SIGINT/SIGTERM."""
        self.server.run(sockets=[self._sock])

    def __enter__(self) -> AppServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


class ArtifactServer(AppServer):
    """The artifact store's server (``make_app``)."""

    def __init__(self, store_dir: Path, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 certfile: str | None = None, keyfile: str | None = None):
        self.store_dir = Path(store_dir)
        super().__init__(make_app(self.store_dir), host, port, log_level, certfile, keyfile)


def serve_forever(store_dir: Path, host: str, port: int, certfile: str | None = None,
                  keyfile: str | None = None) -> None:
    """`edgesmith fleet serve-artifacts`: run in the foreground until interrupted."""
    logging.basicConfig(level=logging.INFO)
    server = ArtifactServer(store_dir, host, port, log_level="info", certfile=certfile, keyfile=keyfile)
    print(f"serving {Path(store_dir).resolve()} at {server.url}/artifacts/<sha256>.tar", flush=True)
    server.run()
