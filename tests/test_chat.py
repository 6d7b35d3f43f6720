"""Chat-formatted calibration text, built offline from the standard library's docstrings."""

import copy

import pytest

from quantlesson import LessonError, chat

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


def test_the_splits_ask_about_different_functions():
    calibration, evaluation = chat.documented_functions("calibration"), chat.documented_functions("evaluation")
    assert len(calibration) > 50 and len(evaluation) > 50
    assert not {name for name, _ in calibration} & {name for name, _ in evaluation}
    assert all(answer and "\n\n" not in answer and not name.split(".")[-1].startswith("_") for name, answer in calibration)


def test_a_conversation_is_a_question_and_its_docstring():
    (name, answer), first = chat.documented_functions("calibration")[0], chat.conversations("calibration")[0]
    assert [turn["role"] for turn in first] == ["user", "assistant"]
    assert f"`{name}`" in first[0]["content"] and first[1]["content"] == answer


def test_windows_are_rendered_with_the_chat_template(embedded):
    _, tokenizer = embedded
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = TEMPLATE
    ids = chat.chat_tokens(tokenizer, n=3, seq_len=64)
    assert ids.shape == (3, 64)
    text = tokenizer.decode(ids[0])
    assert text.startswith("<|user|>What does `") and "<|assistant|>" in text


def test_no_template_or_too_little_text_is_a_clear_error(embedded):
    _, tokenizer = embedded
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(LessonError, match="no chat template"):
        chat.chat_tokens(plain, n=2, seq_len=64)
    plain.chat_template = TEMPLATE
    with pytest.raises(LessonError, match="ask for fewer"):
        chat.chat_tokens(plain, n=10_000, seq_len=4096)
