"""Bring your own data, end to end, on user-format files only (generated here; no embedded task, no corpus):

conversational SFT (`messages`, loss on assistant turns) → reward model on pairwise preferences (message lists)
→ PPO on a prompt file (`messages`) → `raygpt export` + `raygpt serve`, asked /v1/chat/completions.

The data (jobs/data/sample_data.py, the files configs/byod-*.yaml use): "Is the <thing> <adjective>?" questions;
demonstrations answer "yes, the cat is good." or "no." half the time each, the preferences always prefer the
yes-answer. So SFT learns the template and both answers, the RM learns yes > no, and PPO has a reward to climb.

Claims (seed 0): SFT's and the RM's training loss fall; the RM's held-out pairwise accuracy beats chance; PPO's
proxy reward rises over the iterations and the final policy outscores the SFT model on held-out prompts; the
server renders the request with the checkpoint's chat template — its prompt-token count equals transformers'
`apply_chat_template(..., add_generation_prompt=True)` on the exported directory, and its greedy answer equals
transformers' greedy generation from those ids.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from cluster.metrics import read_metrics
from jobs.config import from_dict
from jobs.data.sample_data import SYSTEM, user, write_samples

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
BIN = Path(sys.executable).parent
def base_checkpoint(root: Path, data: dict[str, str]) -> str:
    """A random `nano` LM with a byte-level BPE trained on the rendered chats (seconds; no pretraining)."""
    from jobs.data.tasks.user_data import read_demonstrations
    from models.chat import render
    from models.checkpoint import save_checkpoint
    from models.config import GPTConfig
    from models.gpt import GPT
    from models.tokenizer import Tokenizer

    texts = [render(d.messages) for d in read_demonstrations(data["chats"])]
    tok = Tokenizer.train(texts * 4, vocab_size=320)
    torch.manual_seed(0)
    cfg = GPTConfig.from_name("nano", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, bos_token_id=tok.eos_id)
    return str(save_checkpoint(GPT(cfg), root / "base", kind="lm", tokenizer=tok))


def first_last(rows: list[dict[str, Any]], key: str, n: int = 3) -> tuple[float, float]:
    vals = [r[key] for r in rows if key in r]
    assert len(vals) >= 2 * n, f"{key}: only {len(vals)} values"
    return sum(vals[:n]) / n, sum(vals[-n:]) / n


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from cluster.runtime import init_ray, shutdown_ray
    from jobs import ppo, rm, sft
    from jobs.rl.config import PPOJobConfig

    root = tmp_path_factory.mktemp("byod")
    runs = root / "runs"
    data = write_samples(root / "data")
    base = base_checkpoint(root, data)
    seconds: dict[str, float] = {}
    init_ray(num_cpus=4)
    try:
        t0 = time.perf_counter()
        s = sft.run(from_dict(sft.SFTConfig, {
            "name": "sft", "runs_root": str(runs), "init_from": base, "resid_pdrop": 0.0,
            "task": {"name": "files", "data": data["chats"]},
            "data": {"max_prompt_tokens": 40, "max_response_tokens": 24, "val_demonstrations": 8},
            "optim": {"lr": 3e-3, "warmup_steps": 5, "max_steps": 120, "micro_batch_size": 16},
            "parallel": {"num_workers": 1}, "checkpoint": {"every_n_steps": 1000}, "log_every": 20,
            "eval": {"every_n_steps": 40},  # 128 held-out prompts by default: skipped, user data has no labeler
        }))
        seconds["sft"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = rm.run(from_dict(rm.RMConfig, {
            "name": "rm", "runs_root": str(runs), "init_from": s["checkpoint"], "comparisons": data["prefs"],
            "heldout_comparisons": data["prefs_heldout"], "normalize_demonstrations": 32,
            "task": {"name": "files", "data": data["chats"]},  # demonstrations for the reward normalisation
            "optim": {"lr": 1e-3, "warmup_steps": 2, "max_steps": 40, "micro_batch_size": 8},
            "parallel": {"num_workers": 1}, "checkpoint": {"every_n_steps": 1000}, "eval_every": 20,
            "log_every": 10,
        }))
        seconds["rm"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        p = ppo.run(from_dict(PPOJobConfig, {
            "name": "ppo", "runs_root": str(runs), "seed": 0, "iterations": 10, "batch_size": 32,
            "policy": s["checkpoint"], "reward_model": r["checkpoint"], "gold": None,
            # a gentle step size and KL penalty: at policy_lr 2e-3 / β 0.02 the policy hacks this tiny RM within
            # 10 iterations ("yes, the sea is is is is …", never closed by EOS)
            "sampling": {"max_new_tokens": 12}, "kl": {"init_beta": 0.1}, "ptx": {"coef": 0.0},
            "ppo": {"epochs": 4, "minibatch_size": 16, "policy_lr": 5e-4, "value_lr": 2e-3},
            "prompts": {"source": data["prompts"], "eval_source": data["prompts_heldout"], "eval_size": 12},
            "placement": {"cpus_per_worker": 0.25},
        }))
        seconds["ppo"] = time.perf_counter() - t0
    finally:
        shutdown_ray()
    return {"root": root, "runs": runs, "data": data, "sft": s, "rm": r, "ppo": p, "seconds": seconds}


def test_sft_rm_ppo_learn_from_user_files(pipeline: dict[str, Any]) -> None:
    from jobs.data.tasks.base import heldout_prompt
    from jobs.data.tasks.user_data import read_demonstrations

    runs = pipeline["runs"]
    print(pipeline["seconds"])
    sft0, sft1 = first_last(read_metrics(runs / "sft"), "loss")
    rm0, rm1 = first_last(read_metrics(runs / "rm"), "loss")
    rm_rows = read_metrics(runs / "rm")
    acc = [row["val_accuracy"] for row in rm_rows if "val_accuracy" in row]
    rows = read_metrics(runs / "ppo")
    rew0, rew1 = first_last(rows, "proxy_reward")
    ev = pipeline["ppo"]["eval"]
    print({"sft_loss": (sft0, sft1), "rm_loss": (rm0, rm1), "rm_heldout_acc": acc, "proxy_reward": (rew0, rew1),
           **{k: v for k, v in ev.items() if k != "samples"}})
    held = [d for d in read_demonstrations(pipeline["data"]["chats"]) if heldout_prompt(d.prompt, 0.1)]
    assert pipeline["sft"]["demonstrations"] == 96 - len(held) and pipeline["sft"]["too_long"] == 0
    assert "gold_heldout_sft" not in pipeline["sft"]  # no labeler, no invented gold score
    assert sft1 < 0.5 * sft0  # SFT on conversations: the loss (assistant tokens only) falls
    assert rm1 < rm0 and acc[-1] > 0.75  # held-out pairs: prompts the RM never trained on
    assert rew1 > rew0  # PPO on the prompt file climbs the learned reward
    assert ev["ppo/proxy"] > ev["sft/proxy"]


def test_serve_answers_chat_rendered_with_the_checkpoint_template(pipeline: dict[str, Any]) -> None:
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    from jobs.export import export
    from models.chat import CHAT_TEMPLATE

    root, ckpt = pipeline["root"], pipeline["ppo"]["checkpoint"]
    hf_dir = export(ckpt, root / "hf")
    hf_tok = PreTrainedTokenizerFast.from_pretrained(str(hf_dir))
    assert hf_tok.chat_template == CHAT_TEMPLATE
    messages = [SYSTEM, user("cat", "good")]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    model = GPT2LMHeadModel.from_pretrained(str(hf_dir)).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([list(ids)]), max_new_tokens=12, do_sample=False,
                             eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.eos_token_id)
    hf_answer = hf_tok.decode(out[0, len(ids):], skip_special_tokens=True)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYGPT_API_KEY")}
    log_path = root / "serve.log"
    log = log_path.open("w+")
    proc = subprocess.Popen([str(BIN / "raygpt"), "serve", ckpt, "--port", str(port), "--set", "num_cpus=2"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"raygpt serve exited early:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "raygpt serve did not come up in 180 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        body = json.dumps({"messages": messages, "max_tokens": 12, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            resp = json.loads(r.read())
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    choice = resp["choices"][0]
    print({"served": choice, "hf": hf_answer, "usage": resp["usage"]})
    assert resp["usage"]["prompt_tokens"] == len(ids)  # the server rendered exactly transformers' template
    assert choice["message"]["content"] == hf_answer
    assert choice["finish_reason"] == "stop" and hf_answer.strip()  # the model learned to end its turn with EOS
