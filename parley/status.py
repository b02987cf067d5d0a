"""`parley status`: workers, their jobs, and queue lag per stage, read from Redis."""

from __future__ import annotations

import json

import redis

from core.redisconn import connect_sync
from schemas.streams import STAGES, Keys


def fleet_status(url: str, prefix: str = "parley") -> dict:
    r = connect_sync(url)
    keys = Keys(prefix)
    workers = []
    for key in r.scan_iter(keys.worker_pattern(), count=500):
        h = {k.decode(): v.decode() for k, v in r.hgetall(key).items()}
        if not h:
            continue
        workers.append({
            "stage": h.get("stage"), "consumer": h.get("consumer"), "pid": int(h.get("pid", 0)),
            "host": h.get("host"), "jobs": json.loads(h.get("jobs", "[]")),
            "done": int(h.get("done", 0)), "failed": int(h.get("failed", 0)),
            "stopping": h.get("stopping") == "1",
            "metrics_port": int(h.get("metrics_port") or 0),
        })
    workers.sort(key=lambda w: (STAGES.index(w["stage"]) if w["stage"] in STAGES else 9,
                                w["consumer"]))
    queues = {}
    for stage in STAGES:
        q = {"lag": 0, "pending": 0, "dead": 0}
        try:
            for g in r.xinfo_groups(keys.jobs(stage)):
                if g["name"].decode() == keys.group(stage):
                    q["lag"] = int(g.get("lag") or 0)
                    q["pending"] = int(g["pending"])
        except redis.ResponseError:
            pass
        q["dead"] = r.xlen(keys.dead(stage))
        queues[stage] = q
    sessions = r.zcard(keys.sessions())
    r.close()
    return {"redis": url, "workers": workers, "queues": queues, "sessions": sessions}


def render(status: dict) -> str:
    lines = [f"redis {status['redis']}, {status['sessions']} session(s) stored", "",
             f"{'stage':8} {'lag':>5} {'pending':>8} {'dead':>5}"]
    for stage, q in status["queues"].items():
        lines.append(f"{stage:8} {q['lag']:>5} {q['pending']:>8} {q['dead']:>5}")
    lines += ["", f"{'stage':8} {'pid':>7} {'done':>6} {'metrics':>7}  {'consumer':40} "
              "jobs (session/turn)"]
    for w in status["workers"]:
        jobs = ", ".join(f"{j['session']}/{j['turn']}" for j in w["jobs"]) or "-"
        port = w.get("metrics_port") or "-"
        lines.append(f"{w['stage']:8} {w['pid']:>7} {w['done']:>6} {port:>7}  "
                     f"{w['consumer']:40} {jobs}")
    if not status["workers"]:
        lines.append("(no live workers)")
    up = status.get("up")
    if up:
        ports = up.get("metrics_ports") or {}
        lines += ["", f"parley up (pid {up['pid']}): gateway {up.get('gateway')}"
                  + (f", metrics on port {ports['gateway']}" if "gateway" in ports else "")]
        if ports:
            lines.append("metrics (/metrics, /healthz, /readyz): " + ", ".join(
                f"{name} {port}" for name, port in ports.items()))
    return "\n".join(lines)
