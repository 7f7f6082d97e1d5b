"""The README's claims that code can check: the models table is exactly what `icegrid models` builds."""

from __future__ import annotations

from pathlib import Path

from icegrid.models import catalog

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_models_table() -> list[tuple[str, ...]]:
    text = README.read_text()
    block = text.split("<!-- models-table -->", 1)[1].split("<!-- /models-table -->", 1)[0]
    rows = [line for line in block.splitlines() if line.startswith("| `")]
    return [tuple(cell.strip().strip("`") for cell in row.strip("|").split("|")) for row in rows]


def test_readme_models_table_is_every_preset_with_its_exact_parameter_count():
    built = []
    for row in catalog.preset_rows():
        limit, rule = ("all", "none") if row.infer_limit is None else (str(row.infer_limit), row.truncation)
        built.append((row.model, row.preset, row.origin, f"{row.n_parameters:,}", limit, rule))
    assert _readme_models_table() == built

