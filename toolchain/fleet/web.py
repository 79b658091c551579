"""The monitor's HTTP side (stdlib server, no assets from anywhere): Prometheus ``/metrics``,
``/api/fleet`` (JSON) and a dashboard at ``/`` (the fleet table, and per model version × target
latency and drift charts as inline SVG drawn on the server, so the page works without JavaScript
and without a network).

Metric names follow ``edgesmith_<thing>_<unit>`` with the label set fleet, device, model, version,
target; what would need another label (a quantile, a drop reason, an output) is a metric name.
"""

from __future__ import annotations

import html
import json
import logging
import threading
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.fleet.store import DROP_REASONS

log = logging.getLogger("edgesmith.fleet.monitor")

DEVICE_LABELS = ["fleet", "device", "model", "version", "target"]
MODEL_LABELS = ["fleet", "model", "version", "target"]
Snapshot = Callable[[], dict[str, Any]]


def _seconds(us: float | None) -> float | None:
    return None if us is None else us / 1e6


class FleetCollector:
    """Prometheus collector over the monitor's latest snapshot (devices come and go, so the
    families are built on every scrape rather than kept as long-lived gauges)."""

    def __init__(self, snapshot: Snapshot):
        self.snapshot = snapshot

    def collect(self) -> Iterable[Any]:
        snap = self.snapshot()
        counts = snap["monitor"]["counters"]
        yield self._counter("edgesmith_monitor_messages", "Device messages stored (store-wide).", counts.get("stored", 0))
        yield self._counter("edgesmith_monitor_duplicate_messages", "Messages dropped as duplicates of (device, bdSeq, seq).",
                            counts.get("duplicates", 0))
        for reason in DROP_REASONS:
            yield self._counter(f"edgesmith_monitor_{reason}_messages", f"Messages refused as {reason.replace('_', ' ')}.",
                                counts.get(f"dropped.{reason}", 0))
        firing = GaugeMetricFamily("edgesmith_monitor_alerts_firing", "Alerts firing now.")
        firing.add_metric([], sum(1 for a in snap["alerts"] if a["active"]))
        yield firing

        d_labels = lambda d: [d["fleet"], d["device"], d["model"] or "", d["version"] or "", d["target"] or ""]  # noqa: E731
        devices = snap["devices"]
        yield self._family(GaugeMetricFamily, "edgesmith_device_online", "1 when the device's session is open and it is not silent.",
                           DEVICE_LABELS, ((d_labels(d), 1.0 if d["online"] else 0.0) for d in devices))
        yield self._family(GaugeMetricFamily, "edgesmith_device_last_seen_timestamp_seconds",
                           "When the monitor last received anything from the device.", DEVICE_LABELS,
                           ((d_labels(d), d["last_seen_ms"] / 1000) for d in devices))
        for name, key, doc in (("runs", "runs_total", "Inference runs reported (all stored windows)."),
                               ("errors", "errors_total", "Failed inference runs reported (all stored windows)."),
                               ("messages", "messages", "Messages stored."),
                               ("duplicate_messages", "duplicates", "Messages dropped as duplicates.")):
            yield self._family(CounterMetricFamily, f"edgesmith_device_{name}", doc, DEVICE_LABELS,
                               ((d_labels(d), d[key]) for d in devices))
        yield self._family(GaugeMetricFamily, "edgesmith_device_missing_messages",
                           "Sequence numbers below the device's highest that never arrived.", DEVICE_LABELS,
                           ((d_labels(d), d["gaps"]) for d in devices))
        yield from self._recent("device", DEVICE_LABELS, [(d_labels(d), d) for d in devices])

        groups = snap["groups"]
        g_labels = lambda g: [g["fleet"], g["model"], g["version"], g["target"]]  # noqa: E731
        yield self._family(GaugeMetricFamily, "edgesmith_model_devices", "Devices running this model version on this target.",
                           MODEL_LABELS, ((g_labels(g), g["devices"]) for g in groups))
        yield self._family(GaugeMetricFamily, "edgesmith_model_devices_online", "Of them, online now.",
                           MODEL_LABELS, ((g_labels(g), g["online"]) for g in groups))
        yield from self._recent("model", MODEL_LABELS, [(g_labels(g), g) for g in groups])

    def _recent(self, scope: str, labels: list[str], items: list[tuple[list[str], dict[str, Any]]]) -> Iterable[Any]:
        for q in ("p50", "p95", "p99"):
            yield self._family(GaugeMetricFamily, f"edgesmith_{scope}_latency_{q}_seconds",
                               f"{q} latency over the recent windows (merged buckets).", labels,
                               ((lv, _seconds(x["recent"][f"{q}_us"])) for lv, x in items))
        yield self._family(GaugeMetricFamily, f"edgesmith_{scope}_error_ratio", "errors / (runs + errors), recent windows.",
                           labels, ((lv, x["recent"]["error_rate"]) for lv, x in items))
        yield self._family(GaugeMetricFamily, f"edgesmith_{scope}_runs_per_second", "Inference throughput, recent windows.",
                           labels, ((lv, x["recent"]["throughput_rps"]) for lv, x in items))
        yield self._family(GaugeMetricFamily, f"edgesmith_{scope}_drift_psi",
                           "Population stability index of the most drifted output against the build's reference.",
                           labels, ((lv, x["psi"]) for lv, x in items))
        yield self._family(GaugeMetricFamily, f"edgesmith_{scope}_drift_js",
                           "Jensen-Shannon divergence (bits) of the most drifted output against the build's reference.",
                           labels, ((lv, x["js"]) for lv, x in items))

    @staticmethod
    def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc)
        family.add_metric([], value)
        return family

    @staticmethod
    def _family(cls: type, name: str, doc: str, labels: list[str], values: Iterable[tuple[list[str], float | None]]) -> Any:
        family = cls(name, doc, labels=labels)
        for label_values, value in values:
            if value is not None:  # an unknown value is left out, not reported as 0
                family.add_metric(label_values, value)
        return family


# ---- dashboard -------------------------------------------------------------------------------------

_CSS = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse}th,td{padding:.25em .7em;border-bottom:1px solid #ddd;text-align:left;white-space:nowrap}
td.n{text-align:right;font-variant-numeric:tabular-nums}.on{color:#18794e;font-weight:600}.off{color:#b42318;font-weight:600}
.muted{color:#777}.charts{display:flex;flex-wrap:wrap;gap:1em}.group{border:1px solid #ddd;border-radius:6px;padding:.6em 1em;margin:.8em 0}
.firing{color:#b42318}svg text{font:11px system-ui,sans-serif;fill:#555}
"""
_COLOURS = ["#2563eb", "#d97706", "#dc2626", "#059669", "#7c3aed"]


def _ms(us: float | None) -> str:
    return "–" if us is None else f"{us / 1000:.3g}"


def _ago(ms: int | None, at_ms: int) -> str:
    if ms is None:
        return "–"
    seconds = max(0, (at_ms - ms) / 1000)
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago" if seconds < 7200 else f"{seconds / 3600:.0f} h ago"


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def svg_chart(title: str, points: list[dict[str, Any]], series: list[tuple[str, str, float]],
              limits: list[tuple[str, float]] = (), unit: str = "", width: int = 460, height: int = 170) -> str:
    """A line chart: ``series`` are (label, key in each point, scale) drawn over ``t_ms``; ``limits``
    are horizontal threshold lines."""
    left, right, top, bottom = 46, 10, 22, 22
    values = [p[key] * scale for p in points for _, key, scale in series if p.get(key) is not None]
    values += [v for _, v in limits]
    top_value = max(values) * 1.1 if values and max(values) > 0 else 1.0
    times = [p["t_ms"] for p in points]
    t0, t1 = (min(times), max(times)) if times else (0, 1)
    span = max(t1 - t0, 1)

    def x(t: float) -> float:
        return left + (t - t0) / span * (width - left - right)

    def y(v: float) -> float:
        return height - bottom - v / top_value * (height - top - bottom)

    parts = [f'<svg class="chart" role="img" aria-label="{html.escape(title)}" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="{left}" y="14" style="font-weight:600;fill:#222">{html.escape(title)}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#bbb"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#bbb"/>']
    for frac in (0.0, 0.5, 1.0):
        v = top_value / 1.1 * frac
        parts.append(f'<text x="{left - 4}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.3g}{unit}</text>')
    if times:
        parts.append(f'<text x="{left}" y="{height - 6}">{datetime.fromtimestamp(t0 / 1000).strftime("%H:%M:%S")}</text>')
        parts.append(f'<text x="{width - right}" y="{height - 6}" text-anchor="end">'
                     f'{datetime.fromtimestamp(t1 / 1000).strftime("%H:%M:%S")}</text>')
    for label, value in limits:
        parts.append(f'<line x1="{left}" y1="{y(value):.1f}" x2="{width - right}" y2="{y(value):.1f}" stroke="#b42318" '
                     f'stroke-dasharray="4 3"/><text x="{width - right}" y="{y(value) - 3:.1f}" text-anchor="end" '
                     f'style="fill:#b42318">{html.escape(label)} {value:g}</text>')
    legend_x = width - right - sum(8 + 7 * len(label) for label, _, _ in series)
    for i, (label, key, scale) in enumerate(series):
        colour = _COLOURS[i % len(_COLOURS)]
        coords = [f"{x(p['t_ms']):.1f},{y(p[key] * scale):.1f}" for p in points if p.get(key) is not None]
        if len(coords) == 1:
            cx, cy = coords[0].split(",")
            parts.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{colour}"/>')
        elif coords:
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{" ".join(coords)}"/>')
        parts.append(f'<text x="{legend_x}" y="14" style="fill:{colour}">{html.escape(label)}</text>')
        legend_x += 8 + 7 * len(label)
    if len(points) < 2:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">collecting data…</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_dashboard(snap: dict[str, Any], thresholds: dict[str, float]) -> str:
    at = snap["generated_ms"]
    e = html.escape
    devices = snap["devices"]
    online = sum(1 for d in devices if d["online"])
    firing = [a for a in snap["alerts"] if a["active"]]
    counters = snap["monitor"]["counters"]
    dropped = ", ".join(f"{r.replace('_', ' ')} {counters.get(f'dropped.{r}', 0)}" for r in DROP_REASONS)
    out = [f"<!doctype html><html lang=en><head><meta charset=utf-8><meta http-equiv=refresh content=10>"
           f"<title>edgesmith fleet</title><style>{_CSS}</style></head><body>",
           "<h1>edgesmith fleet monitor</h1>",
           f'<p class=muted>{len(devices)} devices, {online} online, {len(firing)} alerts firing · '
           f'{counters.get("stored", 0)} messages stored, {counters.get("duplicates", 0)} duplicates dropped; refused: '
           f'{e(dropped)} · {_iso(at)}</p>']
    if firing:
        out.append('<h2 class=firing>Alerts firing</h2><table id=alerts><tr><th>alert</th><th>fleet</th><th>subject</th>'
                   '<th>since</th><th>message</th></tr>')
        for a in firing:
            out.append(f"<tr><td>{e(a['alert'])}</td><td>{e(a['fleet'])}</td><td>{e(a['subject'])}</td>"
                       f"<td>{_ago(a['since_ms'], at)}</td><td>{e(a['message'] or '')}</td></tr>")
        out.append("</table>")
    out.append('<h2>Devices</h2><table id=fleet><thead><tr><th>device</th><th>fleet</th><th>online</th><th>artifact</th>'
               '<th>version</th><th>target</th><th>p50 ms</th><th>p95 ms</th><th>p99 ms</th><th>error rate</th>'
               '<th>runs/s</th><th>drift PSI</th><th>last seen</th></tr></thead><tbody>')
    for d in devices:
        r = d["recent"]
        state = ("<span class=on>online</span>" if d["online"] else
                 "<span class=off>silent</span>" if d["session_open"] else
                 f"<span class=off>offline</span> <span class=muted>{e(d['death_reason'] or '')}</span>")
        rate = "–" if r["error_rate"] is None else f"{r['error_rate']:.2%}"
        rps = "–" if r["throughput_rps"] is None else f"{r['throughput_rps']:.3g}"
        psi = "–" if d["psi"] is None else f"{d['psi']:.3f}"
        out.append(f'<tr data-device="{e(d["device"])}"><td>{e(d["device"])}</td><td>{e(d["fleet"])}</td><td>{state}</td>'
                   f"<td>{e(d['artifact'] or '–')}</td><td>{e(d['version'] or '–')}</td><td>{e(d['target'] or '–')}</td>"
                   f"<td class=n>{_ms(r['p50_us'])}</td><td class=n>{_ms(r['p95_us'])}</td><td class=n>{_ms(r['p99_us'])}</td>"
                   f"<td class=n>{rate}</td><td class=n>{rps}</td><td class=n>{psi}</td>"
                   f'<td title="{_iso(d["last_seen_ms"])}">{_ago(d["last_seen_ms"], at)}</td></tr>')
    out.append("</tbody></table>")
    refused = [(d["fleet"], d["device"], d["refused"]) for d in [*devices, *snap.get("refused_devices", [])]
               if d.get("refused")]
    if refused:  # the device is marked, never the monitor
        out.append('<h2>Refused messages</h2><table id=refused><tr><th>device</th><th>fleet</th><th>refused</th>'
                   '<th>last</th><th>what was wrong</th></tr>')
        for fleet, device, r in refused:
            reasons = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(r["by_reason"].items()))
            out.append(f"<tr><td>{e(device)}</td><td>{e(fleet)}</td><td>{e(reasons)}</td>"
                       f"<td>{_ago(r['last_ms'], at)}</td><td>{e(r['last_detail'] or '')}</td></tr>")
        out.append("</table>")
    out.append("<h2>Models by target</h2>")
    if not snap["groups"]:
        out.append("<p class=muted>no device has announced an artifact yet</p>")
    for g in snap["groups"]:
        r = g["recent"]
        name = f"{g['model']} {g['version']} × {g['target']}" + ("" if g.get("verified") else
                                                                 f" (unverified, manifest {g['manifest_sha256'][:8]})")
        rate = "–" if r["error_rate"] is None else f"{r['error_rate']:.2%}"
        out.append(f'<div class=group data-group="{e(name)}"><b>{e(name)}</b> <span class=muted>fleet {e(g["fleet"])} · '
                   f"{g['devices']} devices, {g['online']} online · p50/p95/p99 {_ms(r['p50_us'])}/{_ms(r['p95_us'])}/"
                   f"{_ms(r['p99_us'])} ms · error rate {rate}</span>"
                   '<div class=charts>')
        out.append(svg_chart("latency (ms)", g["history"], [("p50", "p50_us", 1e-3), ("p95", "p95_us", 1e-3),
                                                             ("p99", "p99_us", 1e-3)]))
        out.append(svg_chart("drift", g["history"], [("PSI", "psi", 1.0), ("JS", "js", 1.0)],
                             limits=[("PSI alert", thresholds["drift_psi"]), ("JS alert", thresholds["drift_js"])]))
        out.append("</div></div>")
    mix = snap["version_mix"]
    if mix:
        out.append("<h2>Version mix</h2><table id=versions><tr><th>fleet</th><th>model × target</th><th>versions (devices)</th></tr>")
        for fleet, models in sorted(mix.items()):
            for model, versions in sorted(models.items()):
                text = ", ".join(f"{v}: {n}" for v, n in sorted(versions.items()))
                out.append(f"<tr><td>{e(fleet)}</td><td>{e(model)}</td><td>{e(text)}</td></tr>")
        out.append("</table>")
    out.extend(_deployments_html(snap.get("deployments") or [], snap.get("deploy_states") or [], at))
    out.extend(_retrain_html(snap.get("retrain") or [], at))
    out.extend(_shadows_html(snap.get("shadows") or [], at))
    out.append('<p class=muted><a href="/api/fleet">/api/fleet</a> · <a href="/api/shadows">/api/shadows</a> · '
               '<a href="/api/retrain">/api/retrain</a> · <a href="/metrics">/metrics</a></p></body></html>')
    return "".join(out)


def _deployments_html(deployments: list[dict[str, Any]], states: list[dict[str, Any]], at: int) -> list[str]:
    """Recent deployments with their waves, and each device's deployment state (docs/deployment.md §6)."""
    e = html.escape
    if not deployments and not states:
        return []
    out = ["<h2>Deployments</h2><table id=deployments><tr><th>deployment</th><th>action</th><th>artifact</th>"
           "<th>fleet</th><th>status</th><th>waves (applied / devices)</th><th>results</th><th>started</th></tr>"]
    for d in deployments:
        waves = "; ".join(f"{w['share']:.0%}: {w['applied']}/{w['devices']}" + (f" ({w['status']})" if w["status"] != "done" else "")
                          for w in d["wave_rows"])
        results = ", ".join(f"{k} {n}" for k, n in sorted(d["results"].items()))
        action = f"rollback of {d['rolls_back']}" if d["action"] == "rollback" else d["action"]
        css = "off" if d["status"] in ("aborted", "rolled-back", "failed") else "on" if d["status"] == "completed" else ""
        out.append(f'<tr data-deployment="{e(d["id"])}"><td>{e(d["id"])}</td><td>{e(action)}</td><td>{e(d["artifact"])}</td>'
                   f"<td>{e(d['fleet'])}</td><td><span class={css}>{e(d['status'])}</span></td><td>{e(waves)}</td>"
                   f"<td>{e(results)}</td><td>{_ago(d['started_ms'], at)}</td></tr>")
    out.append("</table>")
    if states:
        out.append("<table id=deploy-states><tr><th>device</th><th>fleet</th><th>slot</th><th>deployment</th>"
                   "<th>result</th><th>error</th></tr>")
        for r in states:
            dep = r["deploy"]
            out.append(f'<tr data-device="{e(r["device"])}"><td>{e(r["device"])}</td><td>{e(r["fleet"])}</td>'
                       f"<td>{e(dep.get('slot') or '–')}</td><td>{e(dep.get('deployment_id') or '–')}</td>"
                       f"<td>{e(dep.get('result') or '–')}</td><td>{e(dep.get('error') or '')}</td></tr>")
        out.append("</table>")
    return out


def _shown(names: list[str], count: int) -> str:
    return ", ".join(names) + (f" and {count - len(names)} more" if count > len(names) else "")


def _retrain_html(requests: list[dict[str, Any]], at: int) -> list[str]:
    """Retrain requests drift alerts opened (docs/telemetry.md): model, devices, status and what the loop linked."""
    e = html.escape
    if not requests:
        return []
    out = ["<h2>Retrain requests</h2><table id=retrain><tr><th>request</th><th>fleet</th><th>status</th><th>model</th>"
           "<th>devices</th><th>alerts</th><th>opened</th><th>linked</th></tr>"]
    for r in requests:
        model = f"{r['model'] or '?'} {r['model_version'] or '?'}" + (f" ({r['manifest_sha256'][:8]})"
                                                                     if r["manifest_sha256"] else "")
        linked = ", ".join(f"{k.replace('_', ' ')} {r[k]}" for k in ("capture_id", "dataset_digest", "mlflow_run_id",
                                                                     "result_version") if r[k]) or r["note"] or "–"
        css = "off" if r["status"] == "open" else "on" if r["status"] == "done" else "muted" if r["status"] == "dismissed" else ""
        out.append(f'<tr data-retrain="{e(r["id"])}"><td>{e(r["id"])}</td><td>{e(r["fleet"])}</td>'
                   f"<td><span class={css}>{e(r['status'])}</span></td><td>{e(model)}</td>"
                   f"<td>{e(_shown(r['devices'], r['device_count']))}</td>"
                   f"<td title=\"{e(' '.join(a['alert'] for a in r['alerts']))}\">{r['alert_firings']}</td>"
                   f"<td>{_ago(r['opened_ms'], at)}</td><td>{e(linked)}</td></tr>")
    out.append("</table>")
    return out


def _shadows_html(shadows: list[dict[str, Any]], at: int) -> list[str]:
    """Recent shadows (docs/shadow.md): per candidate, its windows' agreement and paired latency ratio (p50 over
    the p50 of the serving model timed beside it in the shadow child)."""
    e = html.escape
    if not shadows:
        return []
    out = ["<h2>Shadows</h2>"]
    for s in shadows:
        out.append(f'<div class=shadow data-shadow="{e(s["id"])}"><h3>{e(s["id"])} · {e(s["fleet"])} · '
                   f'{e(s["status"])} · {len(s["devices"])} device(s) · started {_ago(s["created_ms"], at)}</h3>'
                   '<div class=charts>')
        for c in s["candidates"]:
            out.append(svg_chart(f"{c['index']} {c['name']}: agreement", c["points"], [("top-1", "agreement", 1.0)]))
            out.append(svg_chart(f"{c['index']} {c['name']}: latency ratio", c["points"],
                                 [("p50 / paired serving", "latency_ratio", 1.0)], limits=[("serving", 1.0)]))
        out.append("</div></div>")
    return out


# ---- server ----------------------------------------------------------------------------------------

class HttpServer:
    """``/``, ``/metrics``, ``/api/fleet`` and ``/healthz`` on a background thread."""

    def __init__(self, host: str, port: int, snapshot: Snapshot, thresholds: dict[str, float]):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(FleetCollector(snapshot))
        registry.register(ProcessCollector(namespace="edgesmith_monitor", registry=None))
        self.registry = registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                path = self.path.split("?", 1)[0]
                try:
                    if path == "/metrics":
                        self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                    elif path == "/api/fleet":
                        self._send(200, "application/json", json.dumps(snapshot(), separators=(",", ":")).encode())
                    elif path in ("/api/shadows", "/api/retrain"):
                        body = json.dumps(snapshot().get(path.rsplit("/", 1)[1]) or [], separators=(",", ":")).encode()
                        self._send(200, "application/json", body)
                    elif path in ("/", "/index.html"):
                        self._send(200, "text/html; charset=utf-8", render_dashboard(snapshot(), thresholds).encode())
                    elif path == "/healthz":
                        self._send(200, "text/plain", b"ok\n")
                    else:
                        self._send(404, "text/plain", b"not found; try /, /metrics, /api/fleet, /api/shadows or /api/retrain\n")
                except BrokenPipeError:
                    pass

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("http %s " + format, self.address_string(), *args)

        try:
            self.server = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            raise UserError(f"cannot serve HTTP on {host}:{port} ({e.strerror}); choose another --http HOST:PORT") from None
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

