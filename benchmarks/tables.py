"""Markdown formatting shared by the writers and the report (no torch import, so `report` stays light)."""
import math


def fmt(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "inf"
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


def env_line(env):
    bw = f", copy bandwidth {env['copy_bandwidth_gbps']:.0f} GB/s" if env.get("copy_bandwidth_gbps") else ""
    return (f"{env['device']}{bw} · torch {env['torch']} · triton {env['triton']} · deepspeed "
            f"{env['deepspeed']} · commit `{env['git_commit']}` (source `{env['source_digest']}`) · {env['date']}")


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header, rows):
    """A plain fixed-width table for terminals (the GPU check's closing summary)."""
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(cells[0], widths)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells[1:]]
    return "\n".join(out)
