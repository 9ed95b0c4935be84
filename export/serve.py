#!/usr/bin/env python
"""Serve a GGUF file over an OpenAI-compatible HTTP API (llama-cpp-python's server), offline.

    python export/serve.py runs/demo/gguf/demo-q4_k_m.gguf            # http://127.0.0.1:8000/v1
    python export/serve.py FILE.gguf --host 0.0.0.0 --api-key SECRET  # reachable from the network

Any OpenAI client works: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="SECRET")` then
`client.chat.completions.create(model=NAME, messages=[...])`, streaming included. Chat requests use
the template inside the GGUF and stop at its end-of-turn token. Binds to 127.0.0.1 unless --host
says otherwise; with --api-key every request must carry `Authorization: Bearer SECRET`.
"""

import argparse
import os
from pathlib import Path

from fasttune import cli, cpu_threads, infer


def main(argv=None):
    parser = argparse.ArgumentParser(prog="export/serve.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", type=Path, help="GGUF file to serve")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="listen port")
    parser.add_argument("--api-key", default=os.environ.get("FASTTUNE_API_KEY"),
                        help="require this key (default: $FASTTUNE_API_KEY; none: no key needed)")
    parser.add_argument("--name", help="model name clients pass as `model` (default: the file name without .gguf)")
    parser.add_argument("--ctx", type=int, default=4096, help="context window in tokens")
    args = parser.parse_args(argv)
    infer.check_runnable(args.gguf)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this port can use the model")

    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    name = args.name or args.gguf.stem
    app = create_app(
        server_settings=ServerSettings(host=args.host, port=args.port, api_key=args.api_key),
        # chat_format None: the chat template embedded in the GGUF
        model_settings=[ModelSettings(model=str(args.gguf), model_alias=name, n_ctx=args.ctx, chat_format=None,
                                      n_threads=cpu_threads(), n_threads_batch=cpu_threads(), verbose=False)],
    )
    print(f"serving {args.gguf} as '{name}' on http://{args.host}:{args.port}/v1 "
          f"({'key required' if args.api_key else 'no key'}); Ctrl-C stops")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    cli.run(main)
