"""The crowd's section of results.md, and its targets (issue 24)."""

from __future__ import annotations

from typing import Any

from bench.report.tables import Row, ms, n
from streamer.config import Settings

DEFAULTS = Settings.model_fields  # the service runs with the defaults of these

KB_PER_STREAM = 12.0
P99_MS = 250.0
HERD_S = 60.0


def targets(crowd: dict[str, Any] | None) -> list[Row]:
    if not crowd:
        return []
    s, o, m, d, h = (crowd[k] for k in ("settings", "open", "memory", "delivery", "herd"))
    beats = crowd["heartbeats"]
    return [
        {
            "target": f"{n(s['streams'])} streams ({n(s['users'])} users x {s['tabs']}) on "
            f"`--workers {s['workers']}`, all synced",
            "measured": f"{n(o['live'])} in {o['seconds']:.1f} s",
            "ok": o["live"] == s["streams"],
        },
        {
            "target": f"at most {KB_PER_STREAM:.0f} KB of service memory per stream",
            "measured": f"{m['pss_kb_per_stream']:.1f} KB PSS ({m['rss_kb_per_stream']:.1f} RSS)",
            "ok": m["pss_kb_per_stream"] <= KB_PER_STREAM,
        },
        {
            "target": f"1% of users a second delivered at p99 under {P99_MS:.0f} ms, nothing lost",
            "measured": f"p99 {ms(d['p99_ms'])} ms at {d['commit_rate']:.0f} commits/s, "
            f"{d['lost']} lost",
            "ok": (d["p99_ms"] or 1e9) < P99_MS and d["lost"] == 0,
        },
        {
            "target": "heartbeats on time (within 1 s of the period)",
            "measured": f"{beats['late']} of {n(beats['gaps'])} late, max gap "
            f"{beats['gap_max_s']} s",
            "ok": beats["late"] == 0,
        },
        {
            "target": f"SIGKILL and restart: every tab back within {HERD_S:.0f} s, nothing lost",
            "measured": f"{n(h['resynced'])} of {n(h['streams'])} back, the last at "
            f"{h['last_resync_s']} s; {h['stale']} stale",
            "ok": h["resynced"] == h["streams"]
            and (h["last_resync_s"] or 1e9) <= HERD_S
            and h["stale"] == 0,
        },
    ]


def section(crowd: dict[str, Any]) -> list[str]:
    s, o, m, d, h = (crowd[k] for k in ("settings", "open", "memory", "delivery", "herd"))
    b, k, beats = crowd["baseline"], crowd["kernel"], crowd["heartbeats"]
    refused = ", ".join(f"{v:,} {e}" for e, v in o["refused"].items()) or "none"
    backlog = ", ".join(f"{name} {v:,}" for name, v in o["kernel"].items() if v) or "none"
    return [
        "## A crowd: one machine, many tabs",
        "",
        f"`streamer serve --workers {s['workers']}`, its workers one fleet through Redis (one "
        f"change connection for all), {n(s['users'])} users x {s['tabs']} tabs = "
        f"{n(s['streams'])} lean raw-socket tabs in {s['processes']} client processes, each from "
        "a loopback address of its own (127.0.0.2, ...), with Chrome's EventSource headers, "
        f"the token in a cookie, `?snapshot=1`; heartbeat every {s['heartbeat']:.0f} s; "
        f"{s['change_share']:.0%} of the users changing their row each second "
        f"({n(s['rate'])} commits/s). Kernel: somaxconn {k['somaxconn']}, "
        f"tcp_max_syn_backlog {k['tcp_max_syn_backlog']}, syncookies {k['tcp_syncookies']}, "
        f"ports {k['ip_local_port_range']}, nofile {k['nofile']}; the service's listen backlog "
        f"is {DEFAULTS['listen_backlog'].default} per worker (STREAMER_LISTEN_BACKLOG, capped "
        f"by somaxconn), {DEFAULTS['max_opening'].default} connections a worker set up at "
        "once (STREAMER_MAX_OPENING).",
        "",
        "| | |",
        "|---|---|",
        f"| start (every worker listening, the fleet reading) | {crowd['start_s']:.1f} s |",
        f"| open, to the last synced | {n(o['live'])} of {n(o['streams'])} in "
        f"{o['seconds']:.1f} s; refused: {refused} |",
        f"| kernel, while opening | {backlog} |",
        f"| service memory | {b['pss_mb']:.0f} MB PSS idle ({b['rss_mb']:.0f} RSS), "
        f"{m['pss_mb']:.0f} MB open ({m['rss_mb']:.0f}), {m['processes']} processes |",
        f"| per stream | **{m['pss_kb_per_stream']:.1f} KB PSS**, {m['rss_kb_per_stream']:.1f} "
        "KB RSS |",
        f"| heartbeats | gaps p50 {beats['gap_p50_s']} s, p99 {beats['gap_p99_s']} s, max "
        f"{beats['gap_max_s']} s; {beats['late']} late; {beats['ms_per_round']} ms CPU per "
        f"round ({beats['us_per_stream']} µs per stream) |",
        f"| delivery at {d['commit_rate']:.0f} commits/s | p50 {ms(d['p50_ms'])} ms, p99 "
        f"{ms(d['p99_ms'])} ms, p99.9 {ms(d['p999_ms'])} ms, max {ms(d['max_ms'])} ms; "
        f"{d['lost']} lost of {n(d['expected'])}; service CPU {d['service_cpu_pct']}%; "
        f"of the events over 250 ms, by tenth of the heartbeat period their commit fell in: "
        f"{(d.get('late_windows') or {}).get('phase_tenths', 'none')} |",
        f"| sockets per process, after opening | {', '.join(map(str, o.get('sockets', [])))} "
        f"(workers listening at {o.get('listen_s')} s into the start) |",
        *_herd_rows(h),
        "",
    ]


def _behind(behind: dict[str, Any]) -> str:
    """What the tabs still behind the database lack, and which workers hold them."""
    if not behind:
        return "none"
    kinds = "; ".join(f"{v:,} {k}" for k, v in behind.get("kinds", {}).items())
    workers = ", ".join(f"{v:,}" for v in sorted(behind.get("by_worker", {}).values()))
    both = behind.get("users_with_both_tabs_behind")
    return f"{kinds}; held by workers {workers}; {both} users with both tabs behind"


def _herd_rows(h: dict[str, Any]) -> list[str]:
    """The restart's rows."""
    pool, cpu = h["pool"], h.get("restart_cpu", {})
    herd_refused = ", ".join(f"{v:,} {e}" for e, v in h["refused"].items()) or "none"
    return [
        f"| restart after SIGKILL | listening and ready again in {n(h['restart_s'], 1)} s "
        f"({h.get('restart_error') or 'ready'}; each worker listening at "
        f"{h.get('listen_s')} s, having used "
        f"{cpu.get('service_to_listen_s')} CPU-s; to ready the service used "
        f"{cpu.get('service_s')} CPU-s, the tabs' processes "
        f"{cpu.get('clients_s')}); sockets per process after: "
        f"{', '.join(map(str, h.get('sockets', [])))}; "
        f"{n(h['resynced'])} of {n(h['streams'])} resynced, p50 {h['resync_p50_s']} s, "
        f"p99 {h['resync_p99_s']} s, last {h['last_resync_s']} s after the kill; to then the "
        f"service used {cpu.get('service_to_all_back_s')} CPU-s, the tabs' "
        f"processes {cpu.get('clients_to_all_back_s')} |",
        f"| ... state at the end | {h['stale']} tabs older than the database "
        f"({n(h.get('stale_live'))} of them live), {h['ahead']} ahead "
        f"({n(h.get('stale_at_first'))} behind 3 s after the last commit, "
        f"{h.get('converged_s')} s before they agreed or were given up on); "
        f"{n(h['commits'])} commits meanwhile |",
        f"| ... the tabs behind | {_behind(h.get('behind') or {})} |",
        f"| ... reconnects | {n(h['reconnects'])} attempts; refused: {herd_refused} |",
        f"| ... the restarted service logged | "
        f"{'; '.join(f'{v:,} x `{e}`' for e, v in h.get('errors', {}).items()) or 'no error'} |",
        f"| ... pool (probe) | {n(pool.get('acquires'))} acquires, longest wait "
        f"{n(pool.get('max_wait_ms'))} ms, {n(pool.get('over_1s'))} over 1 s, "
        f"{n(pool.get('max_waiting'))} waiting at once (most in one process); Postgres "
        f"connections of the service at most {h['pg_connections_peak']}; "
        f"{n(pool.get('full_gcs'))} full garbage collections, the longest "
        f"{n(pool.get('max_full_gc_ms'))} ms, {n(pool.get('full_gc_ms_total'))} ms in all |",
    ]
