"""blip2 chat: the prompt builder, the session (history, context, one image pass),
and real ``blip2 chat`` processes fed on stdin (and one on a pseudo-terminal)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blip2cli.ask import (
    Asker,
    ChatSession,
    ImageStage,
    chat_prompt,
    context_limit,
    render_prompt,
)
from blip2cli.caption import GenerationOptions

from helpers import reference_answer

GREEDY = dict(num_beams=1, max_new_tokens=4, min_new_tokens=1)


def blip2_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("blip2")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "blip2cli"]


# -- the prompt builder ----------------------------------------------------------
def test_chat_prompt_carries_the_earlier_turns():
    assert chat_prompt([], "which city is this?") == "Question: which city is this? Answer:"
    history = [("which city is this?", "singapore"), ("why?", "it has a statue of a merlion")]
    assert chat_prompt(history, "where is the name merlion coming from?") == (
        "Question: which city is this? Answer: singapore. Question: why? Answer: it has a statue "
        "of a merlion. Question: where is the name merlion coming from? Answer:"
    )
    assert chat_prompt([("a", "b")], "c", "Q: {question} A:") == "Q: a A: b. Q: c A:"


# -- the session on a tiny checkpoint ----------------------------------------------
def session_for(loaded, image, limit=0, **gen):
    session = ChatSession(Asker(loaded, GenerationOptions(**{**GREEDY, **gen})), ImageStage(loaded), limit=limit)
    session.set_image(image, image.name)
    return session


def test_turns_carry_history_and_reuse_one_image_pass(tiny_opt, loaded_opt, example_images):
    calls = []
    handle = loaded_opt.model.vision_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        session = session_for(loaded_opt, example_images[0])
        first = session.ask("what is this?")
        second = session.ask("why")
        third = session.ask("who")
    finally:
        handle.remove()
    assert len(calls) == 1, "the image pass runs once, not once per turn"
    assert [t.number for t in (first, second, third)] == [1, 2, 3]
    assert session.history == [("what is this?", first.answer), ("why", second.answer), ("who", third.answer)]
    # Each turn equals the documented usage with the whole conversation as the prompt.
    prompt = f"Question: what is this? Answer: {first.answer}. Question: why Answer:"
    assert session.fit("why") is not None
    assert second.answer == reference_answer(tiny_opt, example_images[0], prompt, **GREEDY)
    assert first.answer == reference_answer(tiny_opt, example_images[0], render_prompt("what is this?"), **GREEDY)


def test_reset_and_new_image_start_a_fresh_context(loaded_opt, example_images):
    session = session_for(loaded_opt, example_images[0])
    fresh = session.ask("what is this?").answer
    session.ask("why")
    session.reset()
    assert session.history == [] and session.ask("what is this?").answer == fresh
    session.set_image(example_images[2], "astronaut")
    assert session.history == [] and session.image == "astronaut"
    other = session.ask("what is this?")
    assert other.image == "astronaut" and other.answer != fresh
    assert [t.number for t in session.transcript] == [1, 2, 3, 4]


def test_oldest_turns_are_dropped_to_fit_the_context(loaded_opt, example_images):
    tok = loaded_opt.tokenizer
    single = len(tok(render_prompt("what?"))["input_ids"])
    session = session_for(loaded_opt, example_images[0], limit=single * 2 + 8)
    turns = [session.ask(q) for q in ("what?", "why?", "who?", "how?", "where?")]
    assert turns[0].dropped == 0 and any(t.dropped for t in turns)
    assert all(t.error is None for t in turns)
    # what is left always fits, and keeps the latest turns
    assert session.history[-1] == ("where?", turns[-1].answer)
    assert len(session.history) < len(turns)
    prompt = chat_prompt(session.history[:-1], "where?")
    assert len(tok(prompt)["input_ids"]) <= session.limit


def test_a_question_longer_than_the_context_is_an_error_turn(loaded_opt, example_images):
    session = session_for(loaded_opt, example_images[0], limit=10)
    turn = session.ask("what is this?")
    assert turn.answer is None and "too long" in turn.error
    assert session.history == []


def test_context_limit_leaves_room_for_image_and_answer(loaded_opt):
    config = loaded_opt.model.config
    assert context_limit(loaded_opt, 30) == (
        config.text_config.max_position_embeddings - config.num_query_tokens - 30
    )


# -- real processes ----------------------------------------------------------------
def run_chat(image, model, *args, stdin: str, env=None):
    return subprocess.run(
        [*blip2_cmd(), "chat", str(image), "--model", str(model), "--num-beams", "1",
         "--max-new-tokens", "4", *args],
        input=stdin.encode(), capture_output=True, timeout=300, env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
def test_subprocess_text_mode_one_answer_per_question_and_commands(tiny_opt, example_images, tmp_path):
    saved = tmp_path / "transcript.jsonl"
    lines = [
        "what is this?",
        "",  # blank lines are skipped
        "why",
        "/reset",
        "what is this?",
        f"/image {example_images[1]}",
        "/image missing.png",
        "what is this?",
        f"/save {saved}",
        "/help",
        "/quit",
        "never asked",
    ]
    proc = run_chat(example_images[0], tiny_opt, stdin="\n".join(lines) + "\n")
    err = proc.stderr.decode()
    answers = proc.stdout.decode().splitlines()
    assert proc.returncode == 1, err  # the missing image is a failure
    assert len(answers) == 4 and all(answers), answers
    assert answers[2] == answers[0], "/reset: the same question gets the same answer again"
    assert answers[3] != answers[0], "/image: another image, another answer"
    assert "context cleared" in err and "missing.png" in err and "/save FILE" in err
    records = [json.loads(l) for l in saved.read_text().splitlines()]
    assert [r["turn"] for r in records] == [1, 2, 3, 4]
    assert [r["answer"] for r in records] == answers
    assert [r["image"] for r in records] == [str(example_images[0])] * 3 + [str(example_images[1])]
    assert records[1]["question"] == "why"


@pytest.mark.slow
def test_subprocess_jsonl_turns_and_dropped_turns_reported(tiny_opt, example_images):
    proc = run_chat(example_images[0], tiny_opt, "-f", "jsonl", "--context-tokens", "60",
                    stdin="what?\nwhy?\nwho?\nhow?\n")
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    records = [json.loads(l) for l in proc.stdout.decode().splitlines()]
    assert [r["turn"] for r in records] == [1, 2, 3, 4]
    assert [r["question"] for r in records] == ["what?", "why?", "who?", "how?"]
    assert all(r["answer"] and r["error"] is None and r["image"] == str(example_images[0]) for r in records)
    assert "dropped the" in err and "oldest turn" in err


@pytest.mark.slow
def test_terminal_mode_line_editing_prompt_on_the_terminal(tiny_opt, example_images, tmp_path):
    """stdin and stderr on a pseudo-terminal, stdout a pipe: the prompt stays off stdout,
    the answer is on it, Ctrl-D ends, and the question lands in the history file."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [*blip2_cmd(), "chat", str(example_images[0]), "--model", str(tiny_opt), "--num-beams", "1",
         "--max-new-tokens", "4"],
        stdin=slave, stdout=subprocess.PIPE, stderr=slave,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path), "TERM": "xterm"},
    )
    os.close(slave)
    screen = b""

    def read_until(pattern: bytes, count: int, deadline: float) -> None:
        nonlocal screen
        while screen.count(pattern) < count:
            assert time.monotonic() < deadline, f"waited for {pattern!r}; screen: {screen!r}"
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    screen += os.read(master, 4096)
                except OSError:
                    return

    try:
        deadline = time.monotonic() + 240
        read_until(b"> ", 1, deadline)
        os.write(master, b"what is this?\r")
        read_until(b"> ", 2, deadline)  # answered, prompting again
        os.write(master, b"\x04")  # Ctrl-D
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert proc.returncode == 0, screen
    answers = out.decode().splitlines()
    assert len(answers) == 1 and answers[0] and "> " not in out.decode()
    assert b"/help for commands" in screen
    history = (tmp_path / "blip2" / "chat_history").read_text()
    assert "what is this?" in history
