"""`python -m prefixlm.plots prefix-counts` writes a real histogram and a table."""

from prefixlm import plots


def test_prefix_counts_cli_writes_png_and_table(tmp_path, capsys):
    assert plots.main(["prefix-counts", "--tokenizer", "llama3", "--output", str(tmp_path)]) == 0
    png = (tmp_path / "prefix_counts.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    table = (tmp_path / "prefix_counts.md").read_text()
    assert "| tokens with a nonempty P(s) | 127,744 (99.8%) |" in table
    assert "| 58040 | 128 x ' ' | 85 |" in table
    assert "' person', ' persona', ' personal'" in table
    assert "127,744" in capsys.readouterr().out
