"""Render some grids' sections into a results page rendered before (``results --update``).

A page is rendered from run directories, and the checkpoints those hold are not versioned: only
some grids keep their records in the repository (records/compare). Rendering the whole page
again would then need every grid rerun. ``--update`` renders the named grids alone and puts
their sections into the existing page in place of the old ones (or where GRID_ORDER puts them,
if the page has none yet), with their lines in "Where AGD loses"; every other section and line
stays byte for byte as it was rendered, and the page's header says which sections were rendered
again, from where and by which command.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from torch_agd.errors import UsageError

LOSSES = "## Where AGD loses"
NOWHERE = "Nowhere in these runs."


def split_page(page: str, headings: Mapping[str, str],
               name: str = "the page") -> tuple[list[str], list[str], dict[str, list[str]]]:
    """(header lines, "Where AGD loses" bullets, each grid's section lines) of a page that
    results.render_markdown wrote; ``headings``: each grid's heading line (results.HEADINGS). A
    section runs from its grid's heading to the next grid's."""
    lines = page.split("\n")
    grid_of = {line: g for g, line in headings.items()}
    if LOSSES not in lines or not any(line in grid_of for line in lines):
        raise UsageError(f"{name} is not a results page this module wrote (no '{LOSSES}' and grid "
                         "sections); write it in full without --update")
    at = lines.index(LOSSES)
    header, losses, sections, grid = lines[:at], [], {}, None
    for line in lines[at + 1:]:
        if line in grid_of:
            grid = grid_of[line]
            sections[grid] = []
        if grid is None:
            losses += [line] if line.startswith("- ") else []
        else:
            sections[grid].append(line)
    return header, losses, sections


def _loss_grid(line: str, short: Mapping[str, str]) -> str | None:
    """The grid a "Where AGD loses" bullet came from: the longest SHORT name it starts with."""
    owners = [g for g, name in short.items() if line.startswith(f"- {name}: ")]
    return max(owners, key=lambda g: len(short[g]), default=None)


def merge_pages(old: str, new: str, grids: Sequence[str], command: str, *, headings: Mapping[str, str],
                short: Mapping[str, str]) -> str:
    """``old`` with the sections of ``grids`` (and their losses) taken from ``new``, a page of
    those grids alone, which ``command`` rendered; the header gets a line per grid naming the
    command, in place of the line an earlier update left for that grid. ``headings`` (in the
    page's grid order) and ``short`` (the losses' prefixes): results.HEADINGS and results.SHORT."""
    old_header, old_losses, old_sections = split_page(old, headings, "the page to update")
    _, new_losses, new_sections = split_page(new, headings, "the new sections")
    order = list(headings)
    losses, body = [], []
    for grid in order:
        source_losses, sections = (new_losses, new_sections) if grid in grids else (old_losses, old_sections)
        losses += [line for line in source_losses if _loss_grid(line, short) == grid]
        body += sections.get(grid, [])
    # the header ends with one line per grid updated before; keep those of other grids
    notes = {g: line for line in old_header for g in order if line.startswith(_note(g, ""))}
    header = [line for line in old_header if line not in notes.values()]
    while header and header[-1] == "":
        header.pop()
    notes.update({g: _note(g, command) for g in grids})
    header += [line for g in order if g in notes for line in ("", notes[g])]
    return "\n".join([*header, "", LOSSES, "", *(losses or [NOWHERE]), "", *body])


def _note(grid: str, command: str) -> str:
    prefix = f"The section of `{grid}` was rendered again by "
    return prefix + f"`{command}`; the other sections are as first rendered." if command else prefix
