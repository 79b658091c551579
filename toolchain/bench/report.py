"""``edgesmith bench``'s outputs: report.json (every figure, every latency of the best rounds),
report.md (the table and the goals) and two PNG plots (latency distributions, ratio bars)."""

from __future__ import annotations

import json
from pathlib import Path

LATENCY_PNG, RATIO_PNG = "latency.png", "ratio.png"


def size_text(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def ms(value: float) -> str:
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def table_rows(report: dict) -> list[list[str]]:
    rows = []
    for e in report["engines"]:
        ratio = f"{e['ratio_to_fastest_peer']:.2f}×" if e["ratio_to_fastest_peer"] is not None else "–"
        rows.append([e["name"] + (f" ({e['precision'].upper()})" if e["precision"] != "fp32" else ""), e["version"],
                     ms(e["p50_ms"]), ms(e["p95_ms"]), ms(e["p99_ms"]), f"{e['throughput_per_s']:.1f}",
                     f"{e['cold_start_s']:.2f}", f"{e['peak_rss_mib']:.0f}", size_text(e["size_bytes"]),
                     f"{e['max_abs_err_vs_ort']:.1e}", ratio])
    return rows


HEADER = ["engine", "version", "p50 ms", "p95 ms", "p99 ms", "runs/s", "cold start s", "peak RSS MiB", "size",
          "max abs err vs ORT", "× fastest peer"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def goal_lines(report: dict) -> list[str]:
    lines = []
    goals = report["goals"]
    g = goals.get("selected_vs_fastest")
    if g:
        lines.append(f"- best edgesmith artifact ({g['engine']}) vs the fastest of ORT/OpenVINO ({g['fastest']}): "
                     f"{g['ratio']:.3f}× (goal ≤ {g['goal']:.2f}×: {'met' if g['met'] else 'not met'})")
    for backend in ("openvino", "ort"):
        g = goals.get(f"session_overhead_{backend}")
        if g:
            lines.append(f"- Session overhead, edgesmith:{backend} vs {backend} direct: {g['overhead_pct']:+.1f}% "
                         f"(goal ≤ {g['goal_pct']:.0f}%: {'met' if g['met'] else 'not met'})")
    return lines


def markdown(report: dict) -> str:
    m = report["model"]
    shapes = ", ".join(f"{i['name']} {'×'.join(map(str, i['shape']))}" for i in m["inputs"])
    parts = [f"# edgesmith bench: {m['name']} on {report['target']}", "",
             f"Model `{m['ref']}` ({shapes}); {report['threads']} threads, batch 1; "
             f"{report['rounds']} rounds × {report['iterations']} timed runs per engine (after {report['warmup']} warm-up runs), "
             f"each engine in its own process, best round by median reported.", "",
             f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; {report['date']}.", "",
             f"Command: `{report['command']}`", "", markdown_table(HEADER, table_rows(report)), "",
             "Cold start: process start → first result (interpreter, imports, model load, first run). Peak RSS: the "
             "engine's process. Size: what the engine loads (edgesmith: the artifact's payload; peers: the .onnx or "
             f".tflite file). Error: max abs difference from ONNX Runtime's outputs on the same {report['samples']} inputs "
             f"({report.get('samples_origin', 'seeded N(0,1)')}).", ""]
    goals = goal_lines(report)
    if goals:
        parts += ["Goals (measured, not asserted):", "", *goals, ""]
    parts += [f"![latency distributions]({LATENCY_PNG})", "", f"![ratio to the fastest peer]({RATIO_PNG})", ""]
    return "\n".join(parts)


def plot(report: dict, out_dir: Path, prefix: str = "") -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = report["engines"]
    names = [e["name"] for e in engines]
    colours = ["tab:blue" if e["role"] == "edgesmith" else "tab:grey" for e in engines]
    title = f"{report['model']['name']} on {report['target']}, {report['threads']} threads"

    fig, ax = plt.subplots(figsize=(7, 0.6 * len(engines) + 1.5))
    # Up to each engine's p99: a few calls preempted by other jobs would otherwise set the axis.
    bulk = [[v for v in e["latencies_ms"] if v <= e["p99_ms"]] for e in engines]
    parts = ax.violinplot(bulk, vert=False, showmedians=True)
    for body, colour in zip(parts["bodies"], colours):
        body.set_facecolor(colour)
    ax.set_yticks(range(1, len(names) + 1), names)
    ax.invert_yaxis()
    if max(e["p99_ms"] for e in engines) > 20 * min(e["p50_ms"] for e in engines):
        ax.set_xscale("log")
    ax.set_xlabel("latency per call up to p99, ms (best round)")
    ax.set_title(title)
    fig.tight_layout()
    latency = out_dir / f"{prefix}{LATENCY_PNG}"
    fig.savefig(latency, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 0.5 * len(engines) + 1.5))
    ratios = [e["ratio_to_fastest_peer"] or 0.0 for e in engines]
    ax.barh(names, ratios, color=colours)
    ax.axvline(1.0, color="black", linewidth=1, linestyle="--")
    for y, r in enumerate(ratios):
        ax.text(r, y, f" {r:.2f}×", va="center")
    ax.set_xlabel(f"p50 latency / fastest peer's ({report['fastest_peer']})")
    ax.set_title(title)
    ax.invert_yaxis()
    fig.tight_layout()
    ratio = out_dir / f"{prefix}{RATIO_PNG}"
    fig.savefig(ratio, dpi=110)
    plt.close(fig)
    return latency, ratio


def write_report(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    (out_dir / "report.md").write_text(markdown(report))
    plot(report, out_dir)
