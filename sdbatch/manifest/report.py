"""The validation report: each broken rule with its row, column, value and fix, and the summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa


@dataclass
class RowIssue:
    """One broken rule. ``row`` is the 0-based manifest row (as in default ids); -1 marks a
    problem of the job spec itself (a default that breaks a rule), ``column`` then names the
    spec key. A column of the wrong type is reported once per file, at the file's first row."""

    row: int
    id: str | None
    column: str
    value: str  # repr of the offending value, truncated to about 80 characters
    rule: str
    fix: str

    def render(self) -> str:
        if self.row < 0:
            where = "job spec"
        else:
            where = f"row {self.row}" + (f" (id {repr_value(self.id)})" if self.id is not None else "")
        return f"{where}, column {self.column!r}: value {self.value} — rule: {self.rule} — fix: {self.fix}"


@dataclass
class ValidationReport:
    num_rows: int
    issues: list[RowIssue] = field(default_factory=list)  # the first limits.max_errors_shown, by row
    issue_count: int = 0  # every issue found
    summary: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # not errors: see validate_manifest(strict=)

    @property
    def ok(self) -> bool:
        return self.issue_count == 0

    def render(self) -> str:
        s = self.summary
        lines = [f"manifest: {s.get('source', '?')} ({s.get('files', 1)} file(s), fingerprint {s.get('fingerprint', '?')})"]
        lines.append(f"  rows: {self.num_rows:,}  (numbered from 0, as in default ids)")
        if "distinct_prompts" in s:
            approx = " (approximate, ±1%)" if s.get("distinct_prompts_approximate") else ""
            lines.append(f"  distinct prompts: {s['distinct_prompts']:,}{approx}")

        def top(d: dict, k: int = 8) -> str:
            items = sorted(d.items(), key=lambda kv: (-kv[1], str(kv[0])))
            text = ", ".join(f"{key}: {cnt:,}" for key, cnt in items[:k])
            return text + (f", … ({len(items) - k} more)" if len(items) > k else "")

        for key, label in (("sizes", "sizes"), ("steps", "steps"), ("guidance_scale", "guidance"), ("schedulers", "schedulers")):
            if s.get(key):
                lines.append(f"  {label}: {top(s[key])}")
        if "img2img_rows" in s:
            lines.append(f"  img2img rows: {s['img2img_rows']:,}")
        if "seeds" in s:
            lines.append(f"  seeds: {s['seeds']}")
        if "ids" in s:
            lines.append(f"  ids: {s['ids']}")
        pt = s.get("passthrough_columns") or {}
        lines.append("  passthrough columns: " + (", ".join(f"{k} ({v})" for k, v in pt.items()) if pt else "(none)"))
        lines.extend(f"warning: {w}" for w in self.warnings)
        if self.ok:
            lines.append("OK: the manifest is valid")
            return "\n".join(lines)
        lines.append(f"  rows with errors: {s.get('bad_rows', '?'):,}" if isinstance(s.get("bad_rows"), int) else "")
        lines.append("")
        lines.extend(issue.render() for issue in self.issues)
        lines.append("")
        plural = "error" if self.issue_count == 1 else "errors"
        lines.append(f"{self.issue_count:,} {plural} in total (first {len(self.issues)} shown)")
        return "\n".join(line for line in lines if line is not None)


def arrow_kind(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        return arrow_kind(t.value_type)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", lambda _: False)(t):
        return "string"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_null(t):
        return "null"
    return "other"


def repr_value(v: Any, limit: int = 80) -> str:
    if isinstance(v, (str, bytes)) and len(v) > limit - 20:
        r = repr(v[: limit - 24])
        return f"{r[:-1]}…{r[-1]} ({len(v):,} {'chars' if isinstance(v, str) else 'bytes'})"
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 1] + "…"


def value_at(arr: pa.Array, i: int) -> str:
    try:
        v = arr[i].as_py()
    except UnicodeDecodeError:
        raw = arr.cast(pa.large_binary() if pa.types.is_large_string(arr.type) else pa.binary())[i].as_py()
        return repr_value(raw) + " (invalid UTF-8)"
    return repr_value(v)
