"""The README's tour runs as written and prints a cached flash answer and a query answer."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_tour_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    tour = blocks[0]
    assert "load_default()" in tour and "live.ask(flash_id)" in tour
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(tour, str(README), "exec"), {})
    flash, query = out.getvalue().splitlines()
    assert flash.startswith("FlashResult(") and query.startswith("QueryResult("), (flash, query)
    assert "hit=True" in flash and "items_behind=0" in flash and "seq=59" in flash
    # The answer is a price as the stream writes them (whether it is the right one is the
    # model's accuracy, docs/ladder.md; the context here is 60 bars, ~2.1k tokens).
    text = re.search(r"text='([^']*)'", flash).group(1)
    assert re.fullmatch(r"\d+(\.\d+)?", text), text
