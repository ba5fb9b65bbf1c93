"""`raygpt serve runs/<name>/checkpoint` as a user runs it: a subprocess (its own embedded Ray) that serves on
127.0.0.1:PORT, answers the official `openai` client with the key from `http.api_key_file`, blocks, and exits 0
on Ctrl-C (SIGINT). The process group is ended by its id if anything goes wrong."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from models.checkpoint import save_checkpoint
from models.config import GPTConfig
from models.gpt import GPT
from models.tokenizer import Tokenizer

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def test_raygpt_serve_serves_the_openai_client_and_stops_on_sigint(tmp_path: Path) -> None:
    from pydoc_data.topics import topics

    tok = Tokenizer.train(list(topics.values()), vocab_size=512)
    torch.manual_seed(0)
    ckpt = save_checkpoint(GPT(GPTConfig.from_name("nano", vocab_size=tok.vocab_size)),
                           tmp_path / "runs" / "demo" / "checkpoint", tokenizer=tok)
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    key_file.chmod(0o600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYGPT_API_KEY")}
    cmd = [str(BIN / "raygpt"), "serve", str(ckpt), "--port", str(port), "--set", "num_cpus=2",
           "--set", f"http.api_key_file={key_file}"]
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"raygpt serve exited early:\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "raygpt serve did not come up in 180 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="s3cret-key", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list()] == ["demo"]  # the run's name, from runs/demo/checkpoint
        r = c.completions.create(model="demo", prompt="Hello", max_tokens=8, temperature=0)
        assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens <= 8
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="nope", max_retries=0).models.list()

        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal signals the whole foreground group
        assert proc.wait(timeout=90) == 0
        out = (tmp_path / "serve.log").read_text()
        assert f"http://127.0.0.1:{port}/v1" in out and "api key: on" in out and "s3cret" not in out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
