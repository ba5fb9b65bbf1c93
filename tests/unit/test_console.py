"""The quiet console (cluster/console.py): Ray-internal actors' lines and third-party deprecation warnings go to the
log file; our own output, real warnings and errors stay on the terminal."""

from __future__ import annotations

from pathlib import Path

from cluster import console

TORCH_WARNING = ("/x/.venv/lib/python3.11/site-packages/torch/nn/modules/module.py:1762: FutureWarning: "
                 "`torch.cuda.amp.autocast(args...)` is deprecated.")


def test_split_lines_drops_third_party_deprecations_with_their_source_line() -> None:
    lines = ["[pretrain] step 3 loss 4.1", TORCH_WARNING, "  return forward_call(*args, **kwargs)",
             "/work/main/models/gpt.py:10: UserWarning: our own warning", "Traceback (most recent call last):",
             "[2026-12-01 11:26:00,778] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to "
             "CPU. If you have GPU or other accelerator, we were unable to detect it.",
             "Setting up process group for: file:///x/store-1 [rank=0, world_size=2]"]
    kept, dropped = console.split_lines(lines, internal=False)
    assert kept == [lines[0], lines[3], lines[4]]
    assert dropped == [lines[1], lines[2], lines[5], lines[6]]


def test_serve_replicas_keep_warnings_and_drop_their_info_access_log() -> None:
    lines = ["INFO 2026-12-01 11:33:08,051 app_ingress x y -- POST /v1/completions 200 94.2ms",
             "WARNING 2026-12-01 11:33:09,000 app_ingress x y -- replica is slow"]
    assert console.split_lines(lines, internal=False, serve_replica=True) == (lines[1:], lines[:1])
    assert console.split_lines(lines, internal=False) == (lines, [])


def test_internal_actors_are_dropped_whole() -> None:
    lines = ["Failed to query Ray Train Controller actor state; retrying"]
    assert console.split_lines(lines, internal=True) == ([], lines)
    assert console.RAY_INTERNAL_ACTORS.match("PlacementGroupCleaner")
    assert not console.RAY_INTERNAL_ACTORS.match("PolicyWorker")


def test_driver_warnings_from_third_party_go_to_the_file(tmp_path: Path) -> None:
    console.redirect(tmp_path / "ray.log")
    shown: list[str] = []
    show = console._showwarning(lambda message, *args: shown.append(str(message)))
    show(DeprecationWarning("old api"), DeprecationWarning, "/v/site-packages/deepspeed/x.py", 3)
    show(UserWarning("ours"), UserWarning, "/work/main/jobs/x.py", 4)
    show(UserWarning("theirs, but not a deprecation"), UserWarning, "/v/site-packages/ray/x.py", 5)
    assert shown == ["ours", "theirs, but not a deprecation"]
    assert "old api" in (tmp_path / "ray.log").read_text()
