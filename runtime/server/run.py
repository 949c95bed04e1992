"""Starting the server (uvicorn), with the model loaded before the port opens."""

from __future__ import annotations

import sys

from rkedge.errors import InputError
from rkedge.runtime.server.settings import ServerSettings


def run_server(settings: ServerSettings, *, verbose: bool = False) -> None:
    try:
        import uvicorn

        from rkedge.runtime.server.app import create_app
    except ImportError as exc:
        raise InputError(f"rkedge serve needs the 'serve' extra ({exc.name} is missing).",
                         fix="pip install 'rkedge[serve]'") from None
    from rkedge.runtime.llm import LLM

    llm = LLM(settings.model_path, library=settings.library, abi=settings.abi, chat_template=settings.template,
              verbose=verbose, **settings.llm_params)
    app = create_app(settings, llm)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print(f"warning: listening on {settings.host} without --api-key: anyone on the network can use the NPU.",
              file=sys.stderr)
    print(f"rkedge serve: {app.state.model_name} on http://{settings.host}:{settings.port}/ "
          f"(ABI {llm.abi}{', simulated NPU' if llm.runtime.simulated else ''})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info" if verbose else "warning")
