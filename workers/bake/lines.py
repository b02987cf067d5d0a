"""The lines to bake (a CSV: npc, line, optional id) and the check for lines already baked."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
COLUMNS = ("npc", "line", "id")


@dataclass(frozen=True)
class Line:
    npc: str
    text: str
    id: str
    row: int = 0  # 1-based CSV row (the header is row 1), for messages

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Line:
        return cls(npc=d["npc"], text=d["text"], id=d["id"], row=int(d.get("row", 0)))

    def digest(self) -> str:
        """What the outputs were made from; a changed line under the same id is baked again."""
        return _digest(self.npc, self.text)


class LinesError(ValueError):
    """The lines file cannot be baked as it is; the message names the row and the problem."""


def default_id(npc: str, text: str) -> str:
    """A stable id from the content, so reordering the file keeps what is already baked."""
    return f"{npc}-{_digest(npc, text)[:10]}"


def _digest(npc: str, text: str) -> str:
    return hashlib.sha1(f"{npc}\n{text}".encode()).hexdigest()


def parse_lines(text: str, npcs: set[str] | None = None, where: str = "lines") -> list[Line]:
    """The lines of a CSV with a header naming ``npc`` and ``line`` (and optionally ``id``).

    Every problem is collected and raised at once (LinesError), so a file is fixed in one go."""
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    header = next(reader, None)
    if not header:
        raise LinesError(f"{where}: empty file; expected a header row: npc,line[,id]")
    cols = [h.strip().lower() for h in header]
    missing = [c for c in ("npc", "line") if c not in cols]
    unknown = [h for h in cols if h and h not in COLUMNS]
    if missing or unknown:
        raise LinesError(f"{where}: header {header!r}: "
                         + (f"missing column(s) {', '.join(missing)}" if missing else "")
                         + ("; " if missing and unknown else "")
                         + (f"unknown column(s) {', '.join(unknown)}" if unknown else "")
                         + "; expected npc,line[,id]")
    at = {c: cols.index(c) for c in COLUMNS if c in cols}
    lines: list[Line] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for n, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank rows are allowed
        cell = {c: row[i].strip() if i < len(row) else "" for c, i in at.items()}
        npc, body, lid = cell["npc"], cell["line"], cell.get("id", "")
        if not npc or not body:
            problems.append(f"row {n}: {'npc' if not npc else 'line'} is empty")
            continue
        if npcs is not None and npc not in npcs:
            problems.append(f"row {n}: unknown npc {npc!r} (known: {', '.join(sorted(npcs))})")
            continue
        lid = lid or default_id(npc, body)
        if not ID_RE.fullmatch(lid):
            problems.append(f"row {n}: id {lid!r} is not a file name (letters, digits, _ . -, "
                            "not starting with . or -, at most 128)")
            continue
        if lid in seen:
            problems.append(f"row {n}: id {lid!r} already used in row {seen[lid]}")
            continue
        seen[lid] = n
        lines.append(Line(npc=npc, text=body, id=lid, row=n))
    if problems:
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise LinesError(f"{where}: " + "; ".join(problems[:20]) + more)
    if not lines:
        raise LinesError(f"{where}: no lines below the header")
    return lines


def read_lines(path: str | Path, npcs: set[str] | None = None) -> list[Line]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LinesError(f"{path}: not UTF-8 text ({exc})") from None
    return parse_lines(text, npcs, where=str(path))


def output_paths(out_dir: str | Path, line_id: str) -> tuple[Path, Path, Path]:
    out = Path(out_dir)
    return out / f"{line_id}.wav", out / f"{line_id}.csv", out / f"{line_id}.json"


def baked(out_dir: str | Path, line: Line) -> bool:
    """Whether the line's WAV, CSV and JSON are there, whole, and made from this line.

    The JSON is written last and states the WAV's samples and the CSV's frames, so a file
    replaced or cut short since (or a killed worker's leftovers) does not count."""
    wav, csv_path, meta_path = output_paths(out_dir, line.id)
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("digest") != line.digest():
            return False
        import soundfile as sf

        info = sf.info(str(wav))
        if info.frames != meta["samples"] or info.samplerate != meta["rate"]:
            return False
        with open(csv_path, "rb") as fh:
            rows = sum(1 for _ in fh) - 1  # minus the header
        return rows == meta["frames"]
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return False
