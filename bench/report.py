"""Tables from the JSON lines: a plain summary after a run, and the README's Markdown table.

The Markdown table takes one run (the newest ``run_id`` per peer and
workload unless the files hold only one) and puts each peer beside the
reference peer (Go + gorilla) with ratios, since only figures measured in the
same run on this shared machine compare.
"""

from __future__ import annotations

from collections import defaultdict


def _steps(lines: list[dict], peer: str, tag: str, mode: str) -> list[dict]:
    return [x for x in lines if x.get("peer") == peer and x.get("tag") == tag and x.get("mode") == mode]


def summary(lines: list[dict]) -> str:
    """One row per measured step: enough to see at a glance what happened."""
    cols = ["peer", "tag", "rate", "conns", "sent", "expected", "received", "lost", "p50", "p99", "p999", "max",
            "deliv/s", "srv cpu s", "srv cpu %", "us/deliv", "srv hwm MB", "cli cpu %", "other %", "pass"]
    rows = []
    for x in lines:
        if x.get("mode") in ("fanout", "chat"):
            rows.append([x.get("peer"), x.get("tag"), f"{x.get('rate', 0):g}", x.get("conns_ok"), x.get("sent"),
                         x.get("expected"), x.get("received"), x.get("lost"), _f(x.get("p50_ms")),
                         _f(x.get("p99_ms")), _f(x.get("p999_ms")), _f(x.get("max_ms")),
                         _f(x.get("deliveries_per_s"), 0), _f(x.get("server_cpu_s"), 2),
                         _f(x.get("server_cpu_pct"), 0), _f(x.get("server_cpu_us_per_delivery")),
                         _f((x.get("server_hwm_kb") or 0) / 1024, 0),
                         _f(x.get("client_cpu_pct"), 0) + ("!" if x.get("client_saturated") else ""),
                         _f(x.get("other_cpu_pct"), 0), "yes" if x.get("pass") else f"no ({x.get('fail_reason', '')})"])
        elif x.get("mode") == "idle":
            rows.append([x.get("peer"), x.get("tag"), "idle", x.get("conns_ok"), "", "", "", "", "", "", "", "", "",
                         _f(x.get("server_cpu_s"), 2), "", "", _f((x.get("server_hwm_kb") or 0) / 1024, 0),
                         "", "", f"{x.get('server_rss_per_conn_kb')} KB/conn"])
        elif x.get("mode") == "error":
            rows.append([x.get("peer"), x.get("tag"), "error", "", "", "", "", "", "", "", "", "", "", "", "", "", "",
                         "", x.get("error")])
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    out = ["  ".join(str(c).rjust(w) for c, w in zip(cols, widths))]
    out += ["  ".join(str(c if c is not None else "").rjust(w) for c, w in zip(r, widths)) for r in rows]
    out.append("(latencies in ms; '!' after client CPU: a client process was above 90 % of a core; "
               "other %: CPU used by other processes during the window, steal included, softirq not)")
    return "\n".join(out)


def _f(v: float | None, digits: int = 1) -> str:
    if v is None or v == "":
        return ""
    return f"{v:,.{digits}f}"


def _latest(lines: list[dict]) -> list[dict]:
    newest: dict[tuple, str] = {}
    for x in lines:
        key = (x.get("peer"), x.get("tag"), x.get("client", "py"), x.get("chatd_args", ""))
        newest[key] = max(newest.get(key, ""), x.get("run_id", ""))
    return [x for x in lines
            if x.get("run_id", "") == newest[(x.get("peer"), x.get("tag"), x.get("client", "py"), x.get("chatd_args", ""))]]


def facts(lines: list[dict]) -> dict[str, dict[str, object]]:
    """The table's figures per peer (label incl. client and chatd options) from one run's lines."""
    out: dict[str, dict[str, object]] = defaultdict(dict)
    for x in lines:
        label = x.get("peer", "?")
        if x.get("chatd_args"):
            label += f" ({x['chatd_args']})"
        if x.get("client") == "loadgen":
            label += " [Go loadgen]"
        f = out[label]
        tag, mode = x.get("tag"), x.get("mode")
        if tag in ("W1", "W4") and mode == "fanout":
            if x.get("pass") and x.get("rate", 0) >= f.get(f"{tag}_rate", 0):
                f[f"{tag}_rate"] = x["rate"]
                f[f"{tag}_at"] = x
            if tag == "W1" and x.get("rate") == 10 and "w1_cpu10" not in f:
                f["w1_cpu10"] = x
            if tag == "W1" and x.get("rate") == 20 and "w1_cpu20" not in f:
                f["w1_cpu20"] = x
        elif tag == "W2" and mode == "chat":
            f["W2"] = x
        elif tag == "W3" and mode == "idle":
            f["W3"] = x
    return out


def markdown(lines: list[dict], ref: str = "go-gorilla") -> str:
    """The README's table: every peer of one run, with ratios to ``ref`` where a ratio means something."""
    lines = _latest(lines)
    fx = facts(lines)
    r = fx.get(ref, {})

    def ratio(v: float | None, base: float | None, inverse: bool = False) -> str:
        if not v or not base:
            return ""
        return f" ({(base / v if inverse else v / base):.2f}×)"

    def us(x: dict | None) -> float | None:
        return x.get("server_cpu_us_per_delivery") if x else None

    head = ("| server | W1 sustained, msg/s per sender | W1 deliveries/s, p50 / p99 ms there | "
            "CPU per delivery at 10k/s (W1 rate 10) | server CPU % at 10k / 20k deliveries/s | "
            "W2 p50 / p99 ms, CPU % | W2 peak RSS | W3 RSS per idle connection | W4 sustained (× its W1) |")
    out = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, f in fx.items():
        at = f.get("W1_at") or {}
        c10, c20, w2, w3, w4 = f.get("w1_cpu10"), f.get("w1_cpu20"), f.get("W2"), f.get("W3"), f.get("W4_at")
        cells = [
            f"**{label}**" if label.startswith("chatd") else label,
            (f"{f.get('W1_rate', 0):g}" + ratio(f.get("W1_rate"), r.get("W1_rate"))) if "W1_rate" in f
            else ("0" if c10 else ""),
            f"{at.get('deliveries_per_s', 0):,.0f}, {at.get('p50_ms', 0):.1f} / {at.get('p99_ms', 0):.1f}" if at else "",
            (f"{us(c10):.1f} µs" + ratio(us(c10), us(r.get("w1_cpu10")))) if us(c10) else "",
            f"{c10.get('server_cpu_pct', 0):.0f} / {c20.get('server_cpu_pct', 0):.0f}" if c10 and c20 else
            (f"{c10.get('server_cpu_pct', 0):.0f} / –" if c10 else ""),
            (f"{w2['p50_ms']:,.1f} / {w2['p99_ms']:,.1f}, {w2.get('server_cpu_pct', 0):.0f} %"
             + ("" if not w2.get("lost") else f", lost {w2['lost']}")) if w2 else "",
            f"{w2.get('server_hwm_kb', 0) / 1024:.0f} MB" if w2 and w2.get("server_hwm_kb") else "",
            (f"{w3['server_rss_per_conn_kb']:.1f} KB" + ratio(w3["server_rss_per_conn_kb"],
                                                            (r.get("W3") or {}).get("server_rss_per_conn_kb")))
            if w3 and w3.get("server_rss_per_conn_kb") else "",
            (f"{f['W4_rate']:g}" + (f" ({f['W4_rate'] / f['W1_rate']:.2f}×)" if f.get("W1_rate") else ""))
            if w4 else "",
        ]
        out.append("| " + " | ".join(cells) + " |")
    runs = sorted({x.get("run_id", "") for x in lines})
    out.append("")
    out.append(f"(run {', '.join(runs)}; ratios in brackets are to {ref} in the same run: for CPU per delivery and "
               "RSS lower is better, for sustained rate higher is better)")
    return "\n".join(out)
