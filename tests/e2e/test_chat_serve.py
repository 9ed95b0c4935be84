"""export/chat.py in a real pseudo-terminal, and export/serve.py through the real `openai` client."""

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pexpect
import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def bf16(trained_run):
    return trained_run[0] / "gguf" / "memorize-bf16.gguf"


def spawn_chat(*args):
    # Ctrl-C as in a terminal: a test run started in the background (`cmd &` in a script) ignores SIGINT,
    # and the chat would inherit that
    child = pexpect.spawn(sys.executable, ["export/chat.py", *map(str, args)], cwd=str(REPO), encoding="utf-8",
                          timeout=120, dimensions=(50, 400),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect_exact("you> ")
    return child


def test_chat_repl_streams_saves_resets_and_exits(tmp_path, bf16, memorized_chats):
    chat = memorized_chats[0].messages
    child = spawn_chat(bf16)  # no --system: the recipe's, read from the Modelfile beside the file
    assert f"system: {chat[0]['content']}" in child.before
    child.sendline(chat[1]["content"].replace("\n", " "))
    child.expect_exact("model> ")
    child.expect(r"\[(\d+) tokens, ([\d.]+) tokens/s\]")
    answer = child.before.replace("\r\n", "\n").strip()  # the terminal writes \r\n
    # the question arrives as one line (input() reads one): a prompt the model never saw, so its answer has
    # the learned shape, not verbatim words (those are checked on the exact prompts elsewhere)
    assert answer.startswith("Summary:")
    assert int(child.match.group(1)) > 5 and float(child.match.group(2)) > 0
    saved = tmp_path / "conv.json"
    child.expect_exact("you> ")
    child.sendline(f"/save {saved}")
    child.expect_exact("(saved 3 messages")
    messages = json.loads(saved.read_text())
    assert [m["role"] for m in messages] == ["system", "user", "assistant"] and messages[2]["content"] == answer
    child.sendline("/reset")
    child.expect_exact("(conversation cleared)")
    child.sendline(f"/save {saved}")
    child.expect_exact("(saved 1 messages")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_drops_the_oldest_turns_when_the_context_is_full(bf16, memorized_chats):
    child = spawn_chat(bf16, "--ctx", "256", "--max-tokens", "180")
    child.logfile_read = transcript = io.StringIO()
    for chat in memorized_chats[:3]:  # ~60 tokens for the first question, 180 kept for the answer: no room for a second turn
        child.sendline(chat.messages[1]["content"].replace("\n", " "))
        child.expect(r"tokens/s\]")
        child.expect_exact("you> ")
    assert "(context full: dropped the" in transcript.getvalue()
    assert transcript.getvalue().count("tokens/s]") == 3  # every question still answered
    child.sendline("/exit")
    child.expect(pexpect.EOF)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(log: Path, *args):
    """export/serve.py with `args` on a free port, key "sesame", model name "mine": (client, port) once
    it answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "export/serve.py", *map(str, args), "--port", str(port), "--api-key",
                             "sesame", "--name", "mine"], cwd=REPO, stdout=(out := log.open("w")),
                            stderr=subprocess.STDOUT)  # a file, not a pipe nobody reads until it fills
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sesame", max_retries=0)
    deadline = time.time() + 120
    try:
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"server did not start: {log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield client, port
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        out.close()


@pytest.fixture(scope="module")
def server(bf16, tmp_path_factory):
    with serving(tmp_path_factory.mktemp("serve") / "server.log", bf16) as started:
        yield started


def test_serve_chat_completion_and_streaming(server, memorized_chats):
    client, _ = server
    messages = memorized_chats[1].messages
    assert [m.id for m in client.models.list().data] == ["mine"]
    reply = client.chat.completions.create(model="mine", messages=messages[:-1], temperature=0, max_tokens=64)
    assert reply.choices[0].message.content.strip() == messages[-1]["content"]
    assert reply.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="mine", messages=messages[:-1], temperature=0, max_tokens=64,
                                            stream=True)
    chunks = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([c for c in chunks if c]) > 3 and "".join(chunks).strip() == messages[-1]["content"]


def test_serve_rejects_a_wrong_key(server):
    _, port = server
    intruder = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        intruder.chat.completions.create(model="mine", messages=[{"role": "user", "content": "hi"}], max_tokens=4)


def test_serve_missing_file_is_a_usage_error(tmp_path):
    proc = subprocess.run([sys.executable, "export/serve.py", str(tmp_path / "nope.gguf")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {tmp_path / 'nope.gguf'}: no such GGUF file"


@pytest.mark.parametrize("origin, allowed", [("http://evil.example", False), ("http://localhost:3000", True),
                                             ("http://127.0.0.1:5173", True), ("null", False)])
def test_serve_answers_browsers_only_from_loopback_pages(server, origin, allowed):
    """A page the user opens elsewhere cannot read the answers: no CORS grant on the preflight or on a
    simple request; the machine's own pages can, as Ollama allows."""
    _, port = server
    url = f"http://127.0.0.1:{port}/v1/models"
    preflight = httpx.options(url, headers={"Origin": origin, "Access-Control-Request-Method": "GET",
                                            "Access-Control-Request-Headers": "authorization"})
    simple = httpx.get(url, headers={"Origin": origin, "Authorization": "Bearer sesame"})
    grants = [r.headers.get("access-control-allow-origin") for r in (preflight, simple)]
    assert grants == ([origin, origin] if allowed else [None, None]), grants
    assert all(r.headers.get("access-control-allow-credentials") is None for r in (preflight, simple))


def test_serve_refuses_a_foreign_host_header(server):
    """DNS rebinding: a page on evil.example whose name now points at 127.0.0.1 sends Host: evil.example."""
    _, port = server
    url = f"http://127.0.0.1:{port}/v1/models"
    assert httpx.get(url, headers={"Host": "evil.example", "Authorization": "Bearer sesame"}).status_code == 400
    assert httpx.get(url, headers={"Host": f"localhost:{port}", "Authorization": "Bearer sesame"}).status_code == 200


def test_serve_beyond_loopback_needs_a_key(bf16):
    proc = subprocess.run([sys.executable, "export/serve.py", str(bf16), "--host", "0.0.0.0"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, FASTTUNE_API_KEY=""))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--host 0.0.0.0 makes the model reachable from the network: pass --api-key" in proc.stderr


def test_chat_survives_a_failed_save_and_ctrl_c(tmp_path, bf16):
    child = spawn_chat(bf16)
    child.sendline(f"/save {tmp_path / 'no' / 'such' / 'dir.json'}")
    child.expect_exact("(could not save to")
    child.expect_exact("the conversation goes on)")
    child.expect_exact("you> ")
    child.sendintr()  # Ctrl-C at the prompt: a fresh prompt, the chat goes on
    child.expect_exact("you> ")
    child.sendline("/reset")
    child.expect_exact("(conversation cleared)")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
