"""`openldm serve`: a job-queue HTTP server (native /v1 and A1111 /sdapi/v1) that the generating commands'
--server sends work to."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from openldm.cli.generate import read_gib
from openldm.client import DEFAULT_PORT, SERVER_ENV, ServerError
from openldm.engines import ENGINE_NAMES, default_engine
from openldm.models.embedded import default_model_path


def add_commands(sub) -> None:
    p = sub.add_parser(
        "serve", help="a job-queue server for --server, web pages and A1111 clients",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Queue generation jobs in a SQLite store under --data-dir and run them with the models "
                    "found under --models-dir (loaded on demand). The native API is under /v1 "
                    "(docs/server.md, /docs), the AUTOMATIC1111 one under /sdapi/v1. Jobs queued or "
                    "running when the server stops run after it restarts. Listens on 127.0.0.1 unless --host "
                    "says otherwise. Needs the serve extra: pip install 'openldm[serve]'.",
        epilog="example:\n  openldm serve --models-dir ~/models &\n"
               f"  export {SERVER_ENV}=127.0.0.1:{DEFAULT_PORT}\n"
               '  openldm txt2img "a small red circle on the left, on a blue background" -o out.png',
    )
    g = p.add_argument_group("models")
    g.add_argument("--model", type=Path, metavar="PATH", help="the default model: a checkpoint file, "
                   f"diffusers folder or model folder (default: the embedded model, {default_model_path()})")
    g.add_argument("--models-dir", type=Path, metavar="DIR", help="folder of models a job may name")
    g.add_argument("--controlnet-dir", type=Path, metavar="DIR", help="folder of ControlNets jobs may name "
                   "(default: <models-dir>/ControlNet)")
    g.add_argument("--lora-dir", type=Path, action="append", default=[], metavar="DIR",
                   help="folder of LoRA files prompts name as <lora:NAME:W> (repeatable)")
    g.add_argument("--embeddings", type=Path, action="append", default=[], metavar="DIR",
                   help="folder of textual-inversion embeddings (repeatable)")
    g.add_argument("--keep-models", type=int, default=1, metavar="K", help="models each worker keeps loaded")
    g.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="default fp16 on cuda, fp32 elsewhere")
    g.add_argument("--no-warmup", action="store_true",
                   help="do not load the default model and run it once at start (the warm-up spares the "
                        "first job the load and the engine's compile)")
    g.add_argument("--engine", choices=ENGINE_NAMES,
                   help="what runs the UNet and decoder ($OPENLDM_ENGINE or auto; see openldm txt2img -h)")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: only "
                   "this machine)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any)")
    s.add_argument("--data-dir", type=Path, default=Path("openldm-data"), metavar="DIR",
                   help="the job store, inputs and outputs (default ./openldm-data)")
    s.add_argument("--api-auth", metavar="USER:PASS[,...]", help="require HTTP basic auth (as A1111)")
    s.add_argument("--api-key", metavar="KEY", help="accept 'Authorization: Bearer KEY'")
    s.add_argument("--no-a1111", action="store_true", help="do not serve the /sdapi/v1 API")
    s.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes (1: a thread in "
                   "the server process)")
    s.add_argument("--devices", metavar="DEV,...", help="one device per worker: cpu,cuda:0,... (cycled)")
    s.add_argument("--threads", type=int, metavar="N", help="torch threads per worker")
    lim = p.add_argument_group("limits (each refusal is a 422 naming it; a full queue is a 429)")
    from openldm.server.config import ServerLimits

    for name, value in vars(ServerLimits()).items():
        if name != "memory_budget":
            lim.add_argument(f"--{name.replace('_', '-')}", type=int, default=value, metavar="N",
                             help=f"default {value:,}")
    lim.add_argument("--memory-budget", type=read_gib, metavar="GIB", help="refuse jobs whose estimated peak "
                     "memory is over this many GiB (default: what the device has free when the job comes)")
    p.set_defaults(run=_serve)


def server_config(args: argparse.Namespace):
    """The `ServerConfig` the flags describe; a ValueError names a bad flag."""
    from openldm.server.auth import parse_auth
    from openldm.server.config import ServerConfig, ServerLimits

    limits = ServerLimits(**{name: getattr(args, name) for name in vars(ServerLimits())})
    model = args.model or default_model_path()
    if not model.exists():
        raise ValueError(f"model not found: {model}")
    if args.models_dir is not None and not args.models_dir.is_dir():
        raise ValueError(f"--models-dir {args.models_dir} is not a folder")
    if args.controlnet_dir is not None and not args.controlnet_dir.is_dir():
        raise ValueError(f"--controlnet-dir {args.controlnet_dir} is not a folder")
    if args.workers < 1 or args.keep_models < 1:
        raise ValueError("--workers and --keep-models must be at least 1")
    devices = tuple(d.strip() for d in args.devices.split(",") if d.strip()) if args.devices else ()
    return ServerConfig(
        data_dir=args.data_dir.resolve(), default_model=model.resolve(),
        models_dir=args.models_dir.resolve() if args.models_dir else None,
        controlnet_dir=args.controlnet_dir.resolve() if args.controlnet_dir else None,
        lora_dirs=tuple(p.resolve() for p in args.lora_dir),
        embedding_dirs=tuple(p.resolve() for p in args.embeddings), keep_models=args.keep_models,
        workers=args.workers, devices=devices, dtype=args.dtype, engine=args.engine or default_engine(),
        threads=args.threads, warmup=not args.no_warmup,
        auth=parse_auth(args.api_auth) if args.api_auth else (), api_key=args.api_key,
        a1111=not args.no_a1111, limits=limits,
    )


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from openldm.server.app import create_app
    except ImportError as e:
        raise ServerError(f"{e.name} is missing; pip install 'openldm[serve]'") from None
    config = server_config(args)
    if config.threads and config.workers == 1:
        import torch

        torch.set_num_threads(config.threads)
    app = create_app(config)
    state = app.state.server
    if state.requeued:
        print(f"requeued {len(state.requeued)} job(s) left running by the last run", file=sys.stderr)
    print(f"openldm serve: {state.catalog.default_name} and {len(state.catalog.entries) - 1} more model(s), "
          f"jobs in {config.database}, at http://{args.host}:{args.port}; Ctrl-C stops", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
