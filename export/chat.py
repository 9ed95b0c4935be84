#!/usr/bin/env python
"""Chat with a GGUF file through llama-cpp-python, offline, using the template inside the file.

    python export/chat.py runs/demo/gguf/demo-q4_k_m.gguf
    python export/chat.py FILE.gguf --system "You are ..." --prompt "one question"   # one shot

Interactive mode streams the answer token by token and keeps the conversation; an empty line or
Ctrl-D ends it.
"""

import argparse
import sys

from fasttune import cli, infer


def main(argv=None):
    parser = argparse.ArgumentParser(prog="export/chat.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", help="GGUF file to chat with")
    parser.add_argument("--system", help="system message (default: none, or the run's own if you pass it)")
    parser.add_argument("--prompt", help="ask one question, print the answer and exit")
    parser.add_argument("--max-tokens", type=int, default=512, help="longest answer in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    args = parser.parse_args(argv)

    history = [{"role": "system", "content": args.system}] if args.system else []
    with infer.load(args.gguf) as llm:
        if args.prompt is not None:
            history.append({"role": "user", "content": args.prompt})
            reply = infer.chat(llm, history, max_tokens=args.max_tokens, temperature=args.temperature)
            print(reply["choices"][0]["message"]["content"])
            return
        print(f"chatting with {args.gguf} (empty line or Ctrl-D to quit)")
        while True:
            try:
                question = input("\nyou> ").strip()
            except EOFError:
                break
            if not question:
                break
            history.append({"role": "user", "content": question})
            print("model> ", end="", flush=True)
            answer = []
            for chunk in infer.chat(llm, history, max_tokens=args.max_tokens, stream=True,
                                    temperature=args.temperature):
                piece = chunk["choices"][0]["delta"].get("content") or ""
                answer.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            print()
            history.append({"role": "assistant", "content": "".join(answer)})


if __name__ == "__main__":
    cli.run(main)
