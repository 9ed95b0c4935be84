#!/usr/bin/env python
"""Chat with a GGUF file through llama-cpp-python, offline, using the template inside the file.

    python export/chat.py runs/demo/gguf/demo-q4_k_m.gguf
    python export/chat.py FILE.gguf --system "You are ..." --prompt "one question"   # one shot
    python export/chat.py runs/demo/gguf/lora/base-q4_k_m.gguf --lora runs/demo/gguf/lora/demo-lora.gguf

Interactive mode streams the answer token by token, keeps the conversation, and shows tokens/s
after each answer. Commands: /reset (forget the conversation), /save [FILE] (write it as JSON),
/exit (or Ctrl-D). When the conversation outgrows the context window, the oldest turns are dropped
and a notice says so. Without --system, the system prompt of the Modelfile beside the GGUF (the
recipe's) is used. --lora applies a GGUF LoRA adapter to the file at load time (the base model's
GGUF and the run's adapter, as --lora_gguf writes them): the fine-tune is never rounded into the base.
"""

import argparse
import re
import sys
import time
from pathlib import Path

from fasttune import UserError, cli, infer, rundir


def recipe_system_prompt(gguf_path: Path) -> str | None:
    """The SYSTEM line of the Ollama Modelfile fasttune wrote beside the GGUF, if any."""
    modelfile = gguf_path.with_name(f"Modelfile.{gguf_path.stem}")
    found = re.search(r'^SYSTEM """(.*?)"""', modelfile.read_text(), re.S | re.M) if modelfile.is_file() else None
    return found.group(1) if found else None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="export/chat.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", type=Path, help="GGUF file to chat with")
    parser.add_argument("--system", help="system message (default: the recipe's, from the Modelfile beside the file)")
    parser.add_argument("--prompt", help="ask one question, print the answer and exit")
    parser.add_argument("--max-tokens", type=int, default=512, help="longest answer in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--ctx", type=int, default=4096, help="context window in tokens (conversation + answer)")
    parser.add_argument("--lora", type=Path, metavar="ADAPTER.gguf",
                        help="a GGUF LoRA adapter to apply to the file at load time (gguf/lora/ of a run)")
    args = parser.parse_args(argv)
    if args.lora and not args.lora.is_file():
        raise UserError(f"--lora {args.lora}: no such file")

    # the recipe's system prompt: in the Modelfile beside the adapter when there is one, else beside the file
    system = args.system if args.system is not None else recipe_system_prompt(args.lora or args.gguf)
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    with infer.load(args.gguf, n_ctx=args.ctx, **({"lora_path": str(args.lora)} if args.lora else {})) as llm:
        if args.prompt is not None:
            history, _ = infer.fit_context(llm, history + [{"role": "user", "content": args.prompt}], args.max_tokens)
            reply = infer.chat(llm, history, max_tokens=args.max_tokens, temperature=args.temperature)
            print(reply["choices"][0]["message"]["content"].strip())
            return
        print(f"chatting with {args.gguf.name} ({args.ctx}-token context). /reset, /save [FILE], /exit")
        if system:
            print(f"system: {system}")
        while True:
            try:
                question = input("\nyou> ").strip()
            except EOFError:
                break
            except KeyboardInterrupt:  # at the prompt: a fresh prompt, as a shell does (/exit or Ctrl-D quits)
                print()
                continue
            if question in ("/exit", "/quit"):
                break
            if question == "/reset":
                history = list(start)
                print("(conversation cleared)")
                continue
            if question.startswith("/save"):
                path = Path(question[5:].strip() or f"chat-{time.strftime('%Y%m%d-%H%M%S')}.json")
                try:
                    rundir.write_json(path, history)
                    print(f"(saved {len(history)} messages to {path})")
                except OSError as e:  # a bad path or a full disk: say so, keep the conversation
                    print(f"(could not save to {path}: {e.strerror}; the conversation goes on)")
                continue
            if not question:
                continue
            try:
                history, dropped = infer.fit_context(llm, history + [{"role": "user", "content": question}],
                                                     args.max_tokens)
            except UserError as e:
                print(f"({e})")
                continue
            if dropped:
                print(f"(context full: dropped the {dropped} oldest turn{'s' * (dropped > 1)})")
            print("model> ", end="", flush=True)
            answer, tokens, began = [], 0, time.perf_counter()
            try:
                for chunk in infer.chat(llm, history, max_tokens=args.max_tokens, stream=True,
                                        temperature=args.temperature):
                    piece = chunk["choices"][0]["delta"].get("content")
                    if piece:
                        tokens += 1  # llama-cpp-python streams one chunk per generated token
                        answer.append(piece)
                        sys.stdout.write(piece)
                        sys.stdout.flush()
            except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
                print("\n(stopped)", end="")
            elapsed = time.perf_counter() - began
            print(f"\n[{tokens} tokens, {tokens / elapsed:.1f} tokens/s]")
            history.append({"role": "assistant", "content": "".join(answer).strip()})


if __name__ == "__main__":
    cli.run(main)
