"""data: the embedded corpus's splits, token windows, and the hub path's clear error offline."""

import pytest
import torch

from quantlesson import LessonError, data


def test_splits_share_no_document():
    names = {split: set(data.embedded_documents(split, "all")) for split in data.SPLITS}
    assert all(names.values())
    assert not names["train"] & names["calibration"]
    assert not names["train"] & names["evaluation"]
    assert not names["calibration"] & names["evaluation"]


def test_evaluation_text_does_not_appear_in_calibration_or_training_text():
    calibration = data.embedded_text("calibration", "all")
    train = data.embedded_text("train", "all")
    substantial = [t for t in data.embedded_documents("evaluation", "all").values() if len(t) > 500]
    assert substantial
    for text in substantial:
        assert text not in calibration and text not in train


def test_both_domains_have_text_in_every_split():
    for split in data.SPLITS:
        for domain in data.DOMAINS:
            assert len(data.embedded_text(split, domain)) > 10_000, (split, domain)


def test_source_follows_the_model_unless_overridden(monkeypatch):
    monkeypatch.delenv("LESSON_DATA", raising=False)
    monkeypatch.setenv("LESSON_MODEL", "embedded")
    assert data.source() == "embedded"
    monkeypatch.setenv("LESSON_MODEL", "facebook/opt-125m")
    assert data.source() == "hub"
    monkeypatch.setenv("LESSON_DATA", "embedded")
    assert data.source() == "embedded"
    monkeypatch.setenv("LESSON_DATA", "wikipedia")
    with pytest.raises(LessonError, match="embedded' or 'hub'"):
        data.source()


def test_token_windows_are_seeded_and_shaped():
    ids = torch.arange(1000)
    a = data.token_windows(ids, 4, 100, seed=3)
    assert a.shape == (4, 100)
    assert torch.equal(a, data.token_windows(ids, 4, 100, seed=3))
    assert all(torch.equal(row, torch.arange(row[0], row[0] + 100)) for row in a)  # contiguous slices


def test_a_sequence_longer_than_the_text_is_refused():
    with pytest.raises(LessonError, match="longer than the text"):
        data.token_windows(torch.arange(50), 2, 51)


def test_hub_data_offline_names_the_embedded_switch(monkeypatch):
    monkeypatch.setenv("LESSON_DATA", "hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(LessonError, match="LESSON_MODEL=embedded"):
        data.evaluation_text()


@pytest.mark.parametrize("max_tokens", [-5, 0, 1, 2.5, True])
def test_a_bad_token_count_says_what_to_do(max_tokens):
    with pytest.raises(LessonError, match="whole number of tokens"):
        data.evaluation_tokens(None, max_tokens=max_tokens)


def test_the_evaluation_budget_follows_size_and_device(tiny_llama, capsys):
    assert data.evaluation_budget(tiny_llama) == 16_384 and not data.is_large_on_cpu(tiny_llama)
    big = torch.nn.Linear(5000, 5000)  # 25 M parameters on the CPU: a laptop's budget
    assert data.evaluation_budget(big) == 4_096 and data.is_large_on_cpu(big)
    assert "4,096 tokens" in capsys.readouterr().out
    with pytest.raises(LessonError, match="no parameters"):
        data.evaluation_budget(torch.nn.ReLU())
