#!/usr/bin/env python
"""Serve a GGUF file over an OpenAI-compatible HTTP API (llama-cpp-python's server), offline.

    python export/serve.py runs/demo/gguf/demo-q4_k_m.gguf            # http://127.0.0.1:8000/v1
    python export/serve.py FILE.gguf --host 0.0.0.0 --api-key SECRET  # reachable from the network
    python export/serve.py BASE.gguf --lora ADAPTER.gguf               # a GGUF LoRA applied at load time

Any OpenAI client works: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="SECRET")` then
`client.chat.completions.create(model=NAME, messages=[...])`, streaming included. Chat requests use
the template inside the GGUF and stop at its end-of-turn token. Binds to 127.0.0.1 unless --host
says otherwise; with --api-key every request must carry `Authorization: Bearer SECRET`.

Safe by default, like Ollama: browsers may call it only from loopback pages (http://localhost:*,
http://127.0.0.1:*; --allow-origin adds others), the Host header must name the address it is bound
to (a DNS-rebinding page cannot reach it), and binding beyond loopback needs --api-key.
"""

import sys

# Python puts this script's folder first on sys.path, and export/gguf.py is there: without this line
# `import gguf` (the package, which fasttune reads GGUF metadata with) would import that script instead.
sys.path = [p for p in sys.path if not p.endswith("export")]

import argparse  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

from fasttune import UserError, cli, cpu_threads, gguf_file, infer  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(prog="export/serve.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", type=Path, help="GGUF file to serve")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="listen port")
    parser.add_argument("--api-key", default=os.environ.get("FASTTUNE_API_KEY"),
                        help="require this key (default: $FASTTUNE_API_KEY; none: no key needed)")
    parser.add_argument("--name", help="model name clients pass as `model` (default: the file name without .gguf)")
    parser.add_argument("--ctx", type=int, default=4096, help="context window in tokens")
    parser.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                        help="a web origin (https://app.example.com) whose pages may call the API from a browser, "
                             "besides loopback ones; repeatable")
    parser.add_argument("--lora", type=Path, metavar="ADAPTER.gguf",
                        help="a GGUF LoRA adapter to apply to the file at load time (gguf/lora/ of a run)")
    args = parser.parse_args(argv)
    infer.check_runnable(args.gguf)
    if warning := infer.context_warning(args.gguf.name, args.ctx, gguf_file.read(args.gguf).fields):
        print(f"warning: {warning}", file=sys.stderr)
    if args.lora and not args.lora.is_file():
        raise UserError(f"--lora {args.lora}: no such file")
    loopback = args.host in LOOPBACK
    if not loopback and not args.api_key:
        raise UserError(f"--host {args.host} makes the model reachable from the network: pass --api-key KEY (or set "
                        "$FASTTUNE_API_KEY) so that only clients with the key can use it")

    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    name = args.name or args.gguf.stem
    app = create_app(
        server_settings=ServerSettings(host=args.host, port=args.port, api_key=args.api_key),
        # chat_format None: the chat template embedded in the GGUF
        model_settings=[ModelSettings(model=str(args.gguf), model_alias=name, n_ctx=args.ctx, chat_format=None,
                                      n_threads=cpu_threads(), n_threads_batch=cpu_threads(), verbose=False,
                                      n_gpu_layers=infer.gpu_layers(),
                                      lora_path=str(args.lora) if args.lora else None)],
    )
    guard(app, args.host, args.allow_origin)
    served = f"{args.gguf} with {args.lora}" if args.lora else str(args.gguf)
    print(f"serving {served} as '{name}' on http://{args.host}:{args.port}/v1 "
          f"({'key required' if args.api_key else 'no key'}); Ctrl-C stops")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Pages a browser may call the API from by default: the machine's own (any port), as Ollama allows.
LOOPBACK_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"


def guard(app, host: str, allow_origins: list[str]) -> None:
    """Replace llama-cpp-python's CORS policy (every origin, with credentials: any web page the user
    opens could read the answers) with loopback origins plus `allow_origins`, and accept only requests
    whose Host header names the bound address (DNS rebinding). Starlette builds the middleware stack
    on the first request, so editing the list here takes effect."""
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    hosts = ["*"] if host in ("0.0.0.0", "::") else (list(LOOPBACK) + ["[::1]"] if host in LOOPBACK else [host])
    app.user_middleware = [m for m in app.user_middleware if m.cls is not CORSMiddleware] + [
        Middleware(CORSMiddleware, allow_origins=allow_origins, allow_origin_regex=LOOPBACK_ORIGINS,
                   allow_credentials=False, allow_methods=["GET", "POST", "OPTIONS"],
                   allow_headers=["Authorization", "Content-Type"]),
        Middleware(TrustedHostMiddleware, allowed_hosts=hosts),
    ]


if __name__ == "__main__":
    cli.run(main)
