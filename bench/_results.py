"""Shared output of the benchmark scripts: one JSON file and one PNG plot per benchmark.

The JSON holds everything the plot needs (the raw samples, in panels), so a plot is a pure
function of its JSON: `bench/report --replot` redraws every PNG without measuring again, and the
rendering is testable without a test bed. A result is a dict:

    {"benchmark": NAME, "params": {...options...},
     "headline": [{"metric": str, "value": float, "unit": str, "target": str (optional)}, ...],
     "panels": [PANEL, ...], ...anything else the script wants to keep...}

A PANEL is one subplot, by kind:
    {"kind": "box", "title", "ylabel", "series": {label: [samples]}}      distributions side by side
    {"kind": "line", "title", "xlabel", "ylabel", "x": [..], "series": {label: [y per x]},
     "logx": bool}                                                            scaling curves
    {"kind": "bars", "title", "ylabel", "categories": [..], "series": {label: [value per category]}}
and optionally "target": a value drawn as a dashed horizontal line.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
KINDS = ("box", "line", "bars")


def default_path(name: str) -> str:
    return os.path.join(RESULTS, f"{name}.json")


def add_json_option(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--json", metavar="PATH", default=default_path(name),
                        help=f"where to write the results (default bench/results/{name}.json); "
                             "the PNG plot goes next to it, same name with .png")


def png_path(json_path: str) -> str:
    return os.path.splitext(json_path)[0] + ".png"


def ms(seconds: list[float]) -> list[float]:
    """Samples in seconds as milliseconds, rounded to 0.01 ms (what the JSON keeps)."""
    return [round(s * 1000, 2) for s in seconds]


def headline(metric: str, value: float, unit: str, target: str = "") -> dict[str, Any]:
    row: dict[str, Any] = {"metric": metric, "value": round(value, 3), "unit": unit}
    if target:
        row["target"] = target
    return row


def validate(result: dict[str, Any]) -> None:
    """Refuse a malformed result before anything is written, naming what is wrong."""
    for key in ("benchmark", "params", "headline", "panels"):
        if key not in result:
            raise ValueError(f"benchmark result without {key!r}")
    for i, panel in enumerate(result["panels"]):
        kind = panel.get("kind")
        if kind not in KINDS:
            raise ValueError(f"panel {i} ({panel.get('title')!r}): kind {kind!r} is not one of {', '.join(KINDS)}")
        series = panel.get("series")
        if not isinstance(series, dict) or not series:
            raise ValueError(f"panel {i} ({panel.get('title')!r}): no series")
        width = len(panel["x"]) if kind == "line" else len(panel["categories"]) if kind == "bars" else None
        for label, values in series.items():
            if width is not None and len(values) != width:
                raise ValueError(f"panel {i} ({panel.get('title')!r}): series {label!r} has {len(values)} "
                                 f"values for {width} points")


def save(result: dict[str, Any], json_path: str) -> tuple[str, str]:
    """Write the result as JSON and its plot as PNG next to it; returns both paths."""
    validate(result)
    directory = os.path.dirname(os.path.abspath(json_path))
    os.makedirs(directory, exist_ok=True)
    with open(json_path, "w", encoding="utf-8") as out:
        json.dump(result, out, indent=1)
        out.write("\n")
    png = png_path(json_path)
    render(result, png)
    print(f"wrote {json_path} and {png}")
    return json_path, png


def load(json_path: str) -> dict[str, Any]:
    with open(json_path, encoding="utf-8") as source:
        result: dict[str, Any] = json.load(source)
    validate(result)
    return result


def render(result: dict[str, Any], png: str) -> None:
    """Draw every panel of a result side by side into one PNG."""
    import matplotlib
    matplotlib.use("Agg")  # no display; also keeps the PNG independent of the environment
    import matplotlib.pyplot as plt

    panels = result["panels"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        {"box": _box, "line": _line, "bars": _bars}[panel["kind"]](ax, panel)
        ax.set_title(panel.get("title", ""), fontsize=9)
        ax.tick_params(labelsize=7)
        across = panel["kind"] == "bars"  # horizontal bars: the value axis is x (long category names)
        (ax.set_xlabel if across else ax.set_ylabel)(panel.get("ylabel", ""), fontsize=8)
        ax.grid(axis="x" if across else "y", alpha=0.3)
        # differences read against the whole value, not a zoomed band
        ax.set_xlim(left=0) if across else ax.set_ylim(bottom=0)
        if "target" in panel:
            (ax.axvline if across else ax.axhline)(panel["target"], color="tab:red", linestyle="--", linewidth=1,
                                                   label="target")
            ax.legend(fontsize=7)
    fig.suptitle(_caption(result), fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=90, metadata={"Software": None})  # no version string: reruns differ only in data
    plt.close(fig)


def _caption(result: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in result["params"].items())
    return f"{result['benchmark']} ({params})" if params else result["benchmark"]


def _box(ax: Any, panel: dict[str, Any]) -> None:
    labels = list(panel["series"])
    data = [panel["series"][label] for label in labels]
    ax.boxplot(data, showfliers=False, widths=0.5)
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
    for i, values in enumerate(data, start=1):  # every sample, spread evenly (no random jitter)
        n = len(values)
        xs = [i - 0.15 + 0.3 * k / max(1, n - 1) for k in range(n)] if n > 1 else [i]
        ax.scatter(xs, values, s=6, alpha=0.5, color="tab:blue", zorder=3)


def _line(ax: Any, panel: dict[str, Any]) -> None:
    for label, ys in panel["series"].items():
        ax.plot(panel["x"], ys, marker="o", markersize=3, label=label)
    if panel.get("logx"):
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(panel["x"], [f"{x:,}" for x in panel["x"]])
    ax.set_xlabel(panel.get("xlabel", ""), fontsize=8)
    ax.legend(fontsize=7)


def _bars(ax: Any, panel: dict[str, Any]) -> None:
    categories, series = panel["categories"], panel["series"]
    height = 0.8 / len(series)
    for k, (label, values) in enumerate(series.items()):
        ax.barh([i + (k - (len(series) - 1) / 2) * height for i in range(len(categories))], values, height, label=label)
    ax.set_yticks(range(len(categories)), categories, fontsize=7)
    ax.invert_yaxis()  # first category on top
    if len(series) > 1:
        ax.legend(fontsize=7)
