"""docs/ros2.md's parameter table (section 6) lists exactly the parameters the node declares, each with
its type and whether it changes at run time: a parameter added to the node cannot go undocumented."""
from __future__ import annotations

import re
from pathlib import Path

from lidar_completion_pkg.parameters import PARAMETERS

ROOT = Path(__file__).resolve().parent.parent
HEADER = "| name | type | default | run time | meaning |"


def table_rows() -> list[list[str]]:
    """The cells of the table that follows the ``### Parameters`` heading of docs/ros2.md."""
    text = (ROOT / "docs" / "ros2.md").read_text()
    section = text.split("\n### Parameters\n", 1)[1]
    lines = section[section.index(HEADER):].splitlines()[2:]  # after the header and |---| lines
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def documented() -> dict[str, tuple[str, bool]]:
    """name -> (type, run time) as the table gives them; a row may name several parameters
    (``min_range``, ``max_range``), with one type for all or one each."""
    out = {}
    for cells in table_rows():
        names = re.findall(r"`([a-z_0-9]+)`", cells[0])
        types = [t.strip() for t in cells[1].split(",")]
        assert names and len(types) in (1, len(names)), cells
        for i, name in enumerate(names):
            assert name not in out, f"{name} appears twice in the table"
            out[name] = (types[0] if len(types) == 1 else types[i], cells[3] == "yes")
    return out


def test_the_table_lists_every_declared_parameter():
    table = documented()
    declared = {p.name for p in PARAMETERS}
    assert not declared - set(table), f"docs/ros2.md section 6 lacks {sorted(declared - set(table))}"
    assert not set(table) - declared, f"docs/ros2.md section 6 lists {sorted(set(table) - declared)}, " \
                                      "which the node does not declare"
    for p in PARAMETERS:
        assert table[p.name] == (p.type, p.dynamic), (p.name, table[p.name])


def test_the_z_limits_name_the_frame_they_apply_in():
    """min_z / max_z apply in model_frame (the input's own frame when it is empty; pipeline, section 3
    of docs/ros2.md), not in the sensor's frame: --help, the params file and the table say so."""
    from lidar_completion_pkg.parameters import BY_NAME

    for name in ("min_z", "max_z"):
        description = BY_NAME[name].description
        assert "model_frame" in description and "sensor frame" not in description, description
    yaml_text = (ROOT / "launch" / "params" / "completion.yaml").read_text()
    assert "sensor frame" not in yaml_text
