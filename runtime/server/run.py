"""Starting the server (uvicorn): the port is bound first, then the model loaded, then the line saying where
it listens; uvicorn runs with the connection limits of :class:`~rkedge.runtime.server.settings.ServerSettings`."""

from __future__ import annotations

import errno
import logging
import math
import socket
import sys
from typing import Any

from rkedge.errors import InputError
from rkedge.runtime.server.settings import ServerSettings

#: File descriptors kept for the model, the log and the runtime besides the connections.
SPARE_FDS = 64


def run_server(settings: ServerSettings, *, verbose: bool = False) -> None:
    try:
        import uvicorn

        from rkedge.runtime.server.app import create_app
    except ImportError as exc:
        raise InputError(f"rkedge serve needs the 'serve' extra ({exc.name} is missing).",
                         fix="pip install 'rkedge[serve]'") from None
    from rkedge.runtime.llm import LLM

    listener = bind(settings.host, settings.port)  # before loading: a taken port fails fast, before any banner
    try:
        fit_connections_to_fd_limit(settings)
        first = settings.models()[0]
        llm = LLM(first, library=settings.library, abi=settings.abi, chat_template=settings.template,
                  verbose=verbose, **settings.llm_params)
        app = create_app(settings, llm)
    except BaseException:
        listener.close()
        raise
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print(f"warning: listening on {settings.host} without --api-key: anyone on the network can use the NPU.",
              file=sys.stderr)
    enable_access_log()
    names = ", ".join(entry.name for entry in app.state.pool.entries)
    print(f"rkedge serve: {names} on http://{settings.host}:{settings.port}/ "
          f"(ABI {llm.abi}{', simulated NPU' if llm.runtime.simulated else ''})", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn_config(app, settings, log_level="info" if verbose else "warning"))
    server.run(sockets=[listener])


def uvicorn_config(app: Any, settings: ServerSettings, **overrides: Any) -> Any:
    """The uvicorn configuration: header deadline and connection cap (our protocol), request concurrency,
    the shutdown grace period (then in-flight requests are cancelled, which aborts their runs), no uvicorn
    access log (ours has the route and the queue's status)."""
    import uvicorn

    from rkedge.runtime.server.protocol import guarded_protocol

    options: dict[str, Any] = {
        "host": settings.host, "port": settings.port,
        "http": guarded_protocol(settings.header_timeout_s, settings.max_connections),
        # +1: uvicorn answers 503 when connections >= the limit, and the protocol already caps connections
        "limit_concurrency": settings.max_connections + 1,
        "timeout_graceful_shutdown": max(1, math.ceil(settings.shutdown_grace_s)),
        "access_log": False, **overrides}
    return uvicorn.Config(app, **options)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets whose proto says TCP (0 would leave
    # Nagle on, and each small response would wait ~40 ms for a delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise InputError(f"port {port} on {host} is already in use.",
                             fix=f"pick another --port, or stop what listens there (ss -ltnp 'sport = :{port}')",
                             code="port_in_use") from None
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}.",
                         fix="check --host (an address of this machine) and --port (below 1024 needs root)",
                         code="cannot_listen") from None
    sock.set_inheritable(True)
    return sock


def fit_connections_to_fd_limit(settings: ServerSettings) -> None:
    """Raises the soft descriptor limit as far as needed (and allowed), else lowers the connection cap, so that
    accepting connections never fails with "too many open files"."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = settings.max_connections + SPARE_FDS
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
        if soft < wanted:
            settings.max_connections = max(1, soft - SPARE_FDS)
            print(f"warning: the file descriptor limit ({soft}) allows {settings.max_connections} connections.",
                  file=sys.stderr)


def enable_access_log() -> None:
    """One line per request on stderr (middleware.Observe writes them)."""
    log = logging.getLogger("rkedge.serve.access")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
