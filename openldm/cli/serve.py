"""`openldm serve`: keep a model loaded and make images for clients (the generating commands' --server)."""

from __future__ import annotations

import argparse
import sys
import time

from openldm.cli import generate as cli_generate
from openldm.client import DEFAULT_PORT, SERVER_ENV


def add_commands(sub) -> None:
    p = sub.add_parser(
        "serve", help="keep a model loaded and generate for clients over HTTP (see --server)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Load a model once and serve generation requests over HTTP with JSON (POST "
                    "/v1/generate, GET /v1/model; the protocol is in openldm/server.py). The generating "
                    f"commands send their work here with --server URL or ${SERVER_ENV}, and then skip both "
                    "starting torch and loading the model. Requests run one at a time. There is no "
                    "authentication: keep the default host (this machine only) unless a proxy guards the "
                    "port.",
        epilog=f"example:\n  openldm serve &\n  export {SERVER_ENV}=127.0.0.1:{DEFAULT_PORT}\n"
               '  openldm txt2img "a small red circle on the left, on a blue background" -o out.png',
    )
    g = p.add_argument_group("model")
    cli_generate.add_model_options(g)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: only "
                   "this machine)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port (default {DEFAULT_PORT}; 0: any free one)")
    p.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    from openldm.server import RenderServer

    started = time.perf_counter()
    renderer = cli_generate.load_here(args)
    server = RenderServer(renderer, args.host, args.port)
    print(f"serving {renderer.model_name} ({renderer.pipe.config.name}) at {server.url}, loaded in "
          f"{time.perf_counter() - started:.1f} s; Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("openldm serve: stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0
