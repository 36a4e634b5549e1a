"""What ``medvox check`` found: one :class:`Problem` per issue, collected into a :class:`CheckReport`."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Problem:
    """One thing wrong with the data, said so that a person can fix it.

    Attributes:
        what: what is wrong ("file not found").
        fix: how to fix it ("check the path; paths are relative to /data").
        row: 1-based manifest line (header = 1), or None (npz, folder sources, whole-dataset issues).
        file: the image file or folder, as written in the source.
        case_id: the case it concerns, or None for a whole-dataset problem.
        level: "error" (stops ``prepare``) or "warning" (reported, nothing stops).
        case_index: position of the case in ``CaseSet.cases``: which case ``skip_bad`` drops.
        also: ``(row, case_id, case_index)`` of further cases one grouped problem names (10,000 rows naming
            one file are one problem, not 9,999); ``skip_bad`` drops them too.
    """

    what: str
    fix: str = ""
    row: int | None = None
    file: str | None = None
    case_id: str | None = None
    level: str = "error"
    case_index: int | None = None
    also: list[tuple[int | None, str | None, int | None]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("case_index", "also")}
        if self.also:
            out["also"] = [{"row": row, "case_id": case_id} for row, case_id, _ in self.also]
        return out

    def where(self) -> str:
        parts = []
        if self.row is not None:
            parts.append(f"row {self.row}")
        if self.case_id is not None:
            parts.append(f"case {self.case_id}")
        if self.file:
            parts.append(f"file {self.file}")
        return ", ".join(parts) or "dataset"


@dataclass
class CheckReport:
    """Every problem of a dataset, found in one pass.

    Attributes:
        source: the manifest / .npz / folder checked.
        problems: all problems, in row order, dataset-wide ones last.
        cases: the parsed :class:`~medvox.data.sources.CaseSet`, or None when the source was unreadable.
        inspections: per-case image records (shape, spacing, intensity statistics), aligned with
            ``cases.cases``; None for a case whose images could not be read.
    """

    source: str
    problems: list[Problem] = field(default_factory=list)
    cases: Any = None
    inspections: list[dict[str, Any] | None] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "error"]

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not self.errors

    @property
    def bad_case_indices(self) -> set[int]:
        """Cases with at least one error: what ``skip_bad`` drops."""
        return {i for p in self.errors for i in (p.case_index, *(a[2] for a in p.also)) if i is not None}

    @property
    def dataset_errors(self) -> list[Problem]:
        """Errors no single case can be blamed for (missing column, too few cases for k)."""
        return [p for p in self.errors if p.case_index is None]

    def format(self) -> str:
        """The problems as a readable list, then a one-line summary."""
        n_cases = len(self.cases.cases) if self.cases is not None else 0
        head = f"medvox check: {self.source}"
        if self.cases is not None:
            classes = ", ".join(self.cases.classes) or "none"
            head += f" ({self.cases.kind}, {n_cases} cases, classes: {classes})"
        lines = [head]
        for p in self.problems:
            lines.append(f"  {p.level.upper():7s} {p.where()}")
            lines.append(f"          {p.what}")
            if p.fix:
                lines.append(f"          fix: {p.fix}")
        lines.append(self.summary_line())
        return "\n".join(lines)

    def summary_line(self) -> str:
        n_cases = len(self.cases.cases) if self.cases is not None else 0
        levels = Counter(p.level for p in self.problems)
        kinds = Counter(p.what.split(":")[0].split(" (")[0] for p in self.errors)
        if self.ok:
            warn = f", {levels['warning']} warning(s)" if levels["warning"] else ""
            return f"OK: {n_cases} cases checked, no errors{warn}."
        if self.cases is None:
            return f"FAILED: the source could not be read ({levels['error']} error(s)); nothing was written."
        top = "; ".join(f"{k} x{n}" for k, n in kinds.most_common(4))
        # cases named by an error, whether --skip-bad could drop them (an image) or not (a label spelled two ways)
        n_bad = len({(row, case_id) for p in self.errors for row, case_id in ((p.row, p.case_id), *(
            (a[0], a[1]) for a in p.also)) if case_id is not None})
        return (f"FAILED: {levels['error']} error(s), {levels['warning']} warning(s), {n_bad} of {n_cases} cases "
                f"affected ({top}); nothing was written.")
