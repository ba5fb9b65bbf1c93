"""Jobs on a real `ray start --head` cluster through the Job Submission API: `raygpt submit/status/logs/stop` and
plain `ray job submit --working-dir . -- python -m jobs.<name>`; a bad spec never reaches the cluster.

The head is started by the test in its own process group with token auth (Ray 2.60's default), a private HOME
and temp dir, and free ports above 20000 (10002–19999 are Ray's worker ports; other Ray sessions may be running
on this machine), then ended by its process-group id.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head():
    from headnode import head_node

    with head_node(num_cpus=2, timeout_s=90) as h:  # the drivers here name the address themselves
        yield {**h, "env": {k: v for k, v in h["env"].items() if k != "RAY_ADDRESS"}}


def _raygpt(head, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], env=head["env"], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout)


def _job_ids(head) -> list[str]:
    code = ("import sys; from ray.job_submission import JobSubmissionClient as C; "
            "print(sorted(j.submission_id for j in C(sys.argv[1]).list_jobs()))")
    r = subprocess.run([sys.executable, "-c", code, head["address"]], env=head["env"], text=True,
                       capture_output=True, check=True)
    return eval(r.stdout.strip().splitlines()[-1])  # a printed list of str ids


def test_raygpt_submit_runs_job_and_writes_artifacts(head, tmp_path):
    out = tmp_path / "tok" / "tokenizer.json"  # absolute: the job's cwd is the uploaded copy of the project
    r = _raygpt(head, "submit", "--address", head["address"], "--", "tokenizer", "--set", "corpus=pydoc",
                "--set", "vocab_size=300", "--set", f"out={out}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCEEDED" in r.stdout
    # the job's own output was streamed back: its JSON stats line
    stats = json.loads(next(line for line in r.stdout.splitlines() if line.startswith('{"tokenizer"')))
    assert stats["vocab_size"] == 300 and stats["tokenizer"] == str(out)

    from models.tokenizer import Tokenizer

    tok = Tokenizer.from_file(out)
    assert tok.vocab_size == 300
    assert tok.decode(tok.encode("To be, or not to be")) == "To be, or not to be"

    job_id = next(w for w in r.stdout.split() if w.startswith("raysubmit_"))
    st = _raygpt(head, "status", job_id, "--address", head["address"])
    assert st.returncode == 0 and f"{job_id} SUCCEEDED" in st.stdout
    logs = _raygpt(head, "logs", job_id, "--address", head["address"])
    assert '"vocab_size": 300' in logs.stdout


def test_plain_ray_job_submit_with_working_dir(head, tmp_path):
    from jobs.data.corpus import load_texts
    from models.tokenizer import Tokenizer

    tok_path = Tokenizer.train(load_texts("pydoc"), vocab_size=300).save(tmp_path / "tokenizer.json")
    out = tmp_path / "data"
    r = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", head["address"], "--working-dir", ".", "--",
         "python", "-m", "jobs.prepare", "--set", "corpus=pydoc", "--set", f"tokenizer={tok_path}",
         "--set", f"out={out}"],
        env=head["env"], cwd=ROOT, text=True, capture_output=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"]["tokens"] > 0 and meta["splits"]["validation"]["tokens"] > 0
    assert sorted(p.name for p in out.glob("*.parquet"))


def test_bad_spec_rejected_before_submission(head):
    before = _job_ids(head)
    r = _raygpt(head, "submit", "--address", head["address"], "--", "tokenizer", "--set", "vocab_size=12")
    assert r.returncode == 2
    assert "vocab_size" in r.stderr and "nothing submitted" in r.stderr
    r = _raygpt(head, "submit", "--address", head["address"], "--", "prepare", "--set", "shard_rowz=3")
    assert r.returncode == 2 and "shard_rowz: unknown field" in r.stderr
    assert _job_ids(head) == before  # the cluster never saw either


def test_stop_and_status(head, tmp_path):
    # A job that runs far longer than submit → stop takes: 24 MB of random letter-words (millions of distinct
    # words) to 30,000 merges is ~35 s of BPE training on an idle 2-core box. (The Shakespeare plays were too quick
    # on a loaded one: the job could finish before the stop arrived.)
    import numpy as np

    rng = np.random.default_rng(0)
    letters = rng.integers(97, 123, size=24_000_000, dtype=np.uint8)
    letters[rng.random(letters.size) < 1 / 6] = 32
    (tmp_path / "words.txt").write_bytes(letters.tobytes())
    r = _raygpt(head, "submit", "--no-wait", "--address", head["address"], "--", "tokenizer",
                "--set", f"corpus={tmp_path / 'words.txt'}", "--set", "vocab_size=30000",
                "--set", f"out={tmp_path / 'big.json'}")
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.split()[-1]
    assert _raygpt(head, "stop", job_id, "--address", head["address"]).returncode == 0
    deadline = time.time() + 60
    while time.time() < deadline:
        st = _raygpt(head, "status", job_id, "--address", head["address"]).stdout
        if "STOPPED" in st:
            break
        time.sleep(1)
    assert f"{job_id} STOPPED" in st
    assert not (tmp_path / "big.json").exists()
