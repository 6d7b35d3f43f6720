"""report: one row per key, atomic writes, clear errors."""

import pytest

from quantlesson import LessonError, report


def test_record_adds_and_replaces_rows(tmp_path):
    path = tmp_path / "results.csv"
    report.record(path, episode="e", model="m", method="RTN", bits=4, group_size=128, kld=0.5, hardware="cpu")
    report.record(path, episode="e", model="m", method="RTN", bits=3, group_size=128, kld=0.9, hardware="cpu")
    report.record(path, episode="e", model="m", method="RTN", bits=4, group_size=128, kld=0.25, hardware="cpu")
    again = report.read(path)
    assert len(again) == 2
    assert list(again.columns) == report.COLUMNS
    assert sorted(again["kld"].astype(float)) == [0.25, 0.9]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_unknown_or_missing_fields_are_refused(tmp_path):
    with pytest.raises(LessonError, match="Unknown result fields"):
        report.record(tmp_path / "r.csv", episode="e", model="m", method="x", accuracy=1)
    with pytest.raises(LessonError, match="needs"):
        report.record(tmp_path / "r.csv", model="m", method="x")
    assert not (tmp_path / "r.csv").exists()


def test_combine_and_plot(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    report.record(a, episode="a", model="m", method="RTN", bits=4, bits_per_weight=4.1, kld=0.01)
    report.record(b, episode="b", model="m", method="GPTQ", bits=4, bits_per_weight=4.1, kld=0.002)
    table = report.combine([a, b, tmp_path / "missing.csv"])
    assert list(table["method"]) == ["RTN", "GPTQ"]
    ax = report.plot(table)
    assert len(ax.get_lines()) == 2 and ax.get_yscale() == "log"


def test_hardware_names_the_machine():
    assert report.hardware().startswith(("CPU: ", "GPU: "))


def test_plot_without_tags_and_with_many_groups(tmp_path):
    path = tmp_path / "r.csv"
    for i in range(10):
        report.record(path, episode="e", model="m", method=f"method {i}", bits=4, bits_per_weight=4 + i / 10, kld=0.01 / (i + 1))
    table = report.read(path)
    ax = report.plot(table, annotate=False)
    assert len(ax.texts) == 0 and len(ax.get_lines()) == 10
    legend = ax.get_legend()
    assert legend.get_bbox_to_anchor().x0 > ax.get_window_extent().x1 - 1  # beside the axes, not over the points
    assert len(report.plot(table).texts) == 10  # tagged by default


def test_rows_without_a_group_size_are_replaced_not_repeated(tmp_path):
    """A missing group size reads back from the CSV as NaN, and 128 as 128.0: both must match the new row's key."""
    path = tmp_path / "r.csv"
    for kld in (0.3, 0.2, 0.1):
        report.record(path, episode="e", model="m", method="GGUF Q4_0", bits=4, group_size=None, kld=kld, hardware="cpu")
        report.record(path, episode="e", model="m", method="GPTQ", bits=4, group_size=128, kld=kld, hardware="cpu")
    table = report.read(path)
    assert len(table) == 2 and list(table["kld"].astype(float)) == [0.1, 0.1]
