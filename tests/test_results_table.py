"""The README's results table is generated from results/*/summary.json and must stay in step with it."""

import results_table


def test_readme_table_matches_the_committed_results():
    results_table.main(["--check"])  # exits with an error message when README.md is stale


def test_every_paper_setting_has_a_row_and_unrun_ones_say_so():
    rows = results_table.table().splitlines()
    for setting in results_table.PAPER:
        row = next(r for r in rows if r.startswith(f"| {setting} |"))
        has_run = (results_table.ROOT / "results" / setting / "summary.json").exists()
        assert ("not run yet" in row) != has_run
