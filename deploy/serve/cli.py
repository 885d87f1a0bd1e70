"""`dgpt serve MODEL_DIR [--host 127.0.0.1] [--port 8000] [--api-key-env NAME] [limits]`.

Registered in flows.cli.SUBCOMMANDS as "serve": ("deploy.serve.cli", "add_serve_parser").
Serves the OpenAI-compatible API and the chat page (http://HOST:PORT/) until interrupted. The
API key is read from the environment variable named by --api-key-env; there is deliberately no
flag for the key itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any

from dgpt_core._cli.generate import load_pipeline

from .settings import ServeSettings

LIMIT_FLAGS = ("batch_window_ms", "max_batch_size", "max_n", "max_tokens_cap", "max_steps", "max_body_bytes")
"""ServeSettings fields that are plain command-line options (`--batch-window-ms`, ...)."""


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `serve MODEL_DIR`; sets `func` to the command's runner."""
    defaults = ServeSettings(model_dir="")
    parser = subparsers.add_parser(
        "serve", help="OpenAI-compatible API and browser chat on a saved model folder",
        description="Serve a model folder over HTTP: /v1/models, /v1/chat/completions, /v1/completions "
        "(OpenAI protocol, streaming as server-sent events), /health, /metrics, and the chat page at /.",
    )
    parser.add_argument("model_dir", help="folder written by save_model_folder, e.g. runs/latest/models/sft")
    parser.add_argument("--host", default=defaults.host, help="interface to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=defaults.port, help="TCP port (default: %(default)s)")
    parser.add_argument("--api-key-env", default=None, metavar="NAME",
                        help="require 'Authorization: Bearer KEY', KEY read from this environment variable")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    limits = parser.add_argument_group("batching and limits")
    for field in dataclasses.fields(ServeSettings):
        if field.name in LIMIT_FLAGS:
            limits.add_argument("--" + field.name.replace("_", "-"), type=type(field.default),
                                default=field.default, help=f"(default: {field.default})")
    parser.set_defaults(func=run_serve)
    return parser


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """The typed settings of the parsed command line (the API key read from its variable)."""
    return ServeSettings(
        model_dir=args.model_dir, host=args.host, port=args.port, api_key_env=args.api_key_env,
        api_key=ServeSettings.read_api_key(args.api_key_env), device=args.device,
        **{name: getattr(args, name) for name in LIMIT_FLAGS},
    )


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app

    settings = settings_from_args(args)
    pipe = load_pipeline(settings.model_dir, settings.device)
    app = create_app(pipe, settings)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    auth = f"API key from ${settings.api_key_env}" if settings.api_key_env else "no API key"
    print(f"serving {settings.model_dir} on http://{settings.host}:{settings.port}/ ({auth})", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    return 0
