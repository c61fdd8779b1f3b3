"""results --update: some grids' sections rendered into a page rendered before."""

import shutil
from pathlib import Path

from test_experiments import write_pinned_runs
from torch_agd.experiments import results


def _main(root: Path, page: Path, *flags: str) -> int:
    return results.main([str(root), "--out", str(page), "--figures", str(page.parent / "figures"), *flags])


def test_update_gives_the_page_a_full_render_would_give_with_a_line_naming_its_command(tmp_path, capsys):
    runs, page = tmp_path / "runs", tmp_path / "docs" / "results.md"
    write_pinned_runs(runs)
    assert _main(runs, page) == 0
    first = page.read_text()
    # the compare grid changes (a run gone: its numbers and findings change), and only its
    # records are kept elsewhere
    shutil.rmtree(runs / "compare" / "charlm-agd-orth-s1")
    records = tmp_path / "records"
    shutil.copytree(runs / "compare", records / "compare")
    assert _main(records, page, "--grids", "compare", "--update") == 0
    updated = page.read_text()
    # the reference: the whole page rendered again from every grid's runs as they are now
    assert _main(runs, tmp_path / "docs" / "full.md") == 0
    full = (tmp_path / "docs" / "full.md").read_text()
    command = f"python -m torch_agd.experiments.results {records} --grids compare --out {page} --update"
    note = f"The section of `compare` was rendered again by `{command}`; the other sections are as first rendered."
    assert updated.count(note) == 1 and updated.replace(f"\n{note}\n", "", 1) == full
    heading = f"## {results.TITLES['compare']}"
    assert updated.split(heading)[0] != first.split(heading)[0]  # the grid's losses at the top changed
    assert updated.split(heading)[1] != first.split(heading)[1]  # and its section
    # again: the same page, one line for the grid
    assert _main(records, page, "--grids", "compare", "--update") == 0
    assert page.read_text() == updated


def test_update_of_a_page_without_a_grid_puts_its_section_where_the_grids_order_does(tmp_path):
    runs, page = tmp_path / "runs", tmp_path / "results.md"
    write_pinned_runs(runs)
    compare = tmp_path / "records" / "compare"
    shutil.move(runs / "compare", compare)
    assert _main(runs, page, "--grids", "lr", "models") == 0
    assert "## Every optimizer" not in page.read_text()
    assert _main(compare.parent, page, "--grids", "compare", "--update") == 0
    text = page.read_text()
    headings = [line for line in text.split("\n") if line.startswith("## ")]
    assert headings == ["## Where AGD loses", f"## {results.TITLES['lr']}", f"## {results.TITLES['models']}",
                        f"## {results.TITLES['compare']}"]
    losses = [line[2:].split(":")[0] for line in text.split("## ")[1].split("\n") if line.startswith("- ")]
    assert losses[0] == "Learning rate" and losses[-1] == "Every optimizer" and "Models" in losses
    assert losses == sorted(losses, key=["Learning rate", "Models", "Every optimizer"].index)


def test_update_refuses_what_it_cannot_do_in_one_line_and_leaves_the_page_alone(tmp_path, capsys):
    runs, page = tmp_path / "runs", tmp_path / "results.md"
    write_pinned_runs(runs)
    assert _main(runs, page, "--update") == 2
    assert "name them" in capsys.readouterr().err and not page.exists()
    assert _main(runs, page, "--grids", "lr", "--update") == 2
    assert "leave --update out" in capsys.readouterr().err and not page.exists()
    page.write_text("# My notes\n\nnot a results page\n")
    assert _main(runs, page, "--grids", "lr", "--update") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a results page this module wrote" in err
    assert page.read_text() == "# My notes\n\nnot a results page\n"
