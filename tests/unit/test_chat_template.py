"""The one chat template (models/chat.py) against transformers: the Jinja stored in tokenizer_config.json, rendered
by `PreTrainedTokenizerFast.apply_chat_template`, gives the same text, token ids and assistant-token mask that
raygpt trains on and serves; and the single-turn split (prompt, answer) tokenises like the whole conversation."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from models.chat import (
    CHAT_TEMPLATE,
    ChatError,
    Message,
    check_messages,
    encode_chat,
    prompt_and_answer,
    render,
    render_spans,
    stored_template,
    write_tokenizer_config,
)
from models.tokenizer import Tokenizer

WORDS = ["hello", "world", "Hi", "there", ":", "the", "king", "  spaced", "é", "naïve", "\n", "?", "!", "42",
         "don't", "User:", "Assistant:", "tab\tbed", "日本", " ", "a.b", "–", "end"]


def conversation(rng: random.Random, turns: int, final_assistant: bool = True) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": " ".join(rng.choices(WORDS, k=3))}] if rng.random() < 0.5 else []
    for t in range(turns):
        msgs.append({"role": "user", "content": "".join(rng.choices(WORDS, k=rng.randint(1, 6))).strip() or "q"})
        if t < turns - 1 or final_assistant:
            msgs.append({"role": "assistant",
                         "content": "".join(rng.choices(WORDS, k=rng.randint(1, 6))).strip() or "a"})
    return msgs


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    texts = [" ".join(rng.choices(WORDS, k=30)) for _ in range(200)] + ["User: hi\nAssistant: hello"] * 20
    d = tmp_path_factory.mktemp("tok")
    Tokenizer.train(texts, 400).save(d / "tokenizer.json")
    write_tokenizer_config(d, model_max_length=128)
    return d


@pytest.fixture(scope="module")
def hf(tok_dir: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(tok_dir))


def test_hand_worked_rendering() -> None:
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    assert render(msgs[:2], add_generation_prompt=True) == "System: Be kind.\nUser: Hi\nAssistant:"
    text, spans = render_spans(msgs[:3])
    assert text == "System: Be kind.\nUser: Hi\nAssistant: Hello!<|endoftext|>"
    assert [text[s:e] for s, e in spans] == [" Hello!<|endoftext|>"]
    assert render(msgs, add_generation_prompt=True) == (
        "System: Be kind.\nUser: Hi\nAssistant: Hello!<|endoftext|>\nUser: Bye\nAssistant:")
    assert render([], add_generation_prompt=True) == "Assistant:"


def test_template_stored_and_read_back(tok_dir: Path, hf) -> None:
    assert stored_template(tok_dir) == CHAT_TEMPLATE
    assert hf.chat_template == CHAT_TEMPLATE
    assert hf.eos_token == "<|endoftext|>" and hf.pad_token == "<|endoftext|>"


@pytest.mark.parametrize("seed", range(40))
def test_transformers_renders_what_raygpt_trains_on(tok_dir: Path, hf, seed: int) -> None:
    """Text, ids and assistant mask of a random conversation: raygpt's Python renderer + tokenizer vs
    transformers' Jinja + tokenizer (return_assistant_tokens_mask uses the template's {% generation %} blocks)."""
    rng = random.Random(seed)
    msgs = conversation(rng, rng.randint(1, 3))
    ours = Tokenizer.from_file(tok_dir / "tokenizer.json")
    assert hf.apply_chat_template(msgs, tokenize=False) == render(msgs)
    out = hf.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = encode_chat(ours, msgs)
    assert list(out["input_ids"]) == ids
    assert list(out["assistant_masks"]) == mask
    assert sum(mask) >= sum(1 for m in msgs if m["role"] == "assistant") * 2  # ≥ one content token + EOS each
    assert ids[-1] == ours.eos_id and mask[-1] == 1
    # the prompt a server / RL job sends: transformers' generation prompt == ours, token for token
    prompt = msgs[:-1]
    hf_prompt = hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(hf_prompt) == ours.encode(render(prompt, add_generation_prompt=True))
    # single-turn split: prompt ids + answer ids + EOS == the conversation's ids (what the RM and PPO score)
    p, a = prompt_and_answer(check_messages(msgs, "m"))
    assert ours.encode(p) + ours.encode(a) + [ours.eos_id] == ids
    # and the loss mask covers exactly the final answer's tokens after the prompt
    assert mask[len(ours.encode(p)):] == [1] * (len(ids) - len(ours.encode(p)))


def test_unknown_role_refused_by_both(hf) -> None:
    bad = [{"role": "tool", "content": "x"}]
    with pytest.raises(ChatError, match=r"m\[0\]: unknown role 'tool'"):
        check_messages(bad, "m")
    with pytest.raises(ChatError, match="unknown role"):
        render([Message("tool", "x")])
    with pytest.raises(Exception, match="unknown role tool"):
        hf.apply_chat_template(bad, tokenize=False)


@pytest.mark.parametrize("value, kw, match", [
    ("hi", {}, "must be a list of messages"),
    ([], {}, "empty message list"),
    (["hi"], {}, r"m\[0\]: a message must be an object"),
    ([{"role": "user"}], {}, r"m\[0\]: missing 'content'"),
    ([{"content": "x"}], {}, r"m\[0\]: missing 'role'"),
    ([{"role": "user", "content": 3}], {}, "content must be a string, got int"),
    ([{"role": "user", "content": "  "}], {}, "empty user message"),
    ([{"role": "user", "content": "a<|endoftext|>b"}], {}, "special token"),
    ([{"role": "user", "content": "q"}], {"need_assistant": True}, "no assistant turn"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}],
     {"final": "assistant"}, "last message must be the assistant's"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], {"final": "not-assistant"},
     "must not end with an assistant message"),
])
def test_malformed_messages(value, kw, match) -> None:
    with pytest.raises(ChatError, match=match):
        check_messages(value, "m", **kw)
