import json

import matplotlib.pyplot as plt
import pytest

from triptych.experiments.report import Report, markdown_table, save_figure, to_json, write_report


def test_write_report_records_provenance(tmp_path):
    report = Report(title="T", sections=["## Body\n\nhello"], results={"x": 1.5, "bad": float("nan")})
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    report.figures.append(save_figure(fig, tmp_path, "f.png"))
    write_report(report, tmp_path, config={"a": 1}, command="triptych reproduce x", elapsed_s=2.0)
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["command"] == "triptych reproduce x"
    assert payload["config"] == {"a": 1}
    assert payload["results"] == {"x": 1.5, "bad": "nan"}
    assert {"torch", "numpy", "python"} <= set(payload["versions"])
    assert payload["machine"]["torch_threads"] >= 1 and payload["git_commit"]
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# T") and "hello" in text and "triptych reproduce x" in text
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_markdown_table_shape():
    table = markdown_table(["a", "b"], [[1, 0.123456], ["x", 2.0]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.123 |", "| x | 2 |"]


def test_to_json_is_strict():
    with pytest.raises(TypeError):
        to_json({"f": object()})
