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


def test_target_rows_and_plot(tmp_path, llama3):
    gold = llama3.encode(" personality")[0]
    support, rows = plots.target_rows(llama3, gold)
    assert support[-1] == gold and len(support) == 10
    assert rows["ce"][-1] == 1.0 and rows["prefix_norm eps=1.0"][-1] == 0.0
    assert abs(rows["prefix_simple eps=0.1"][-1] - 0.9) < 1e-6
    assert abs(rows["prefix_norm eps=1.0"].sum() - 1.0) < 1e-5  # all mass on P(s)
    assert plots.main(["targets", "--word", " personality", "--output", str(tmp_path)]) == 0
    assert (tmp_path / "targets_personality.png").stat().st_size > 20_000


def test_targets_refuses_multi_token_words(tmp_path, capsys):
    assert plots.main(["targets", "--word", "strawberryjam", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is 4 tokens" in err[0], err
