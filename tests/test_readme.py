"""The README runs as written, prints what it says it prints, and stays one screen plus a map."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_starts_with_the_two_commands():
    first = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
    assert first.splitlines() == [
        "python3 -m pip install -e . && python3 -m experiments.stream_latency",
        "python3 -m pip install -e '.[test,data]' && python3 -m pytest"]


def test_readme_tour_and_real_data_print_right_answers():
    """The tour's flash answer is the true last close, served from cache with nothing behind;
    the real-data paragraph's answer is the CSV's last close; the printed lines match the
    README's own words about them."""
    out = io.StringIO()
    scope: dict = {}
    with contextlib.redirect_stdout(out):
        for block in _python_blocks():
            exec(compile(block, str(README), "exec"), scope)
    flash, truth, count, real = out.getvalue().splitlines()
    text, confidence, behind = flash.split()
    assert truth == f"truth: {text}" and behind == "0" and float(confidence) > 0.9
    assert scope["flash"].hit and scope["flash"].seq == 39
    prose = README.read_text().replace("\n", " ")
    assert f"`{flash}`" in prose and f"`{truth}`" in prose
    guess, guess_confidence, _, true_count = count.split()
    assert float(guess_confidence) < 0.7 and 0 <= int(true_count) <= 5
    real_text, real_confidence, _, real_truth = real.split()
    assert real_text == real_truth
    assert f"`{real_text} {real_confidence}`" in prose


def test_readme_map_and_glossary_are_short():
    text = README.read_text()
    rows = [r for r in text.split("## Map")[1].split("##")[0].splitlines() if r.startswith("| `")]
    assert 0 < len(rows) <= 15
    for row in rows:
        assert len(row.split("|")[2].split()) <= 25, row
    assert "## Glossary" in text and not re.search(r"issue \d", text, flags=re.I)
