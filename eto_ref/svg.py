"""Small hand-written SVG charts: titled axes, a legend beside the plot (never over it), error bars.

    point_chart({"test_seen": [(0, 40.1, 3.2), (1, 44.0, 3.1)]}, {"RFT, test_seen": (42.0, 3.0)},
                x_labels=["0", "1"], x_title="ETO iteration", y_title="reward", y_range=(0, 100))
    line_chart({"loss": [(1, 1.7), (2, 1.1)]}, "step", "loss")

Points of different series at the same x are drawn side by side (dodged), so equal
values stay visible.
"""

from __future__ import annotations

import html

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
WIDTH, HEIGHT = 720, 320
LEFT, RIGHT, TOP, BOTTOM = 60, 230, 20, 50  # the plot area's margins; the legend lives in the right one


class Frame:
    """Maps data coordinates to pixels inside the plot area."""

    def __init__(self, x_range: tuple[float, float], y_range: tuple[float, float]):
        self.x0, self.x1 = x_range
        self.y0, self.y1 = y_range

    def x(self, value: float) -> float:
        span = (self.x1 - self.x0) or 1.0
        return LEFT + (WIDTH - LEFT - RIGHT) * (value - self.x0) / span

    def y(self, value: float) -> float:
        span = (self.y1 - self.y0) or 1.0
        return HEIGHT - BOTTOM - (HEIGHT - TOP - BOTTOM) * (value - self.y0) / span


def text(x: float, y: float, s: str, anchor: str = "middle", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" {extra}>{html.escape(s)}</text>'


def axes(f: Frame, x_ticks: list[tuple[float, str]], y_ticks: list[float], x_title: str, y_title: str) -> list[str]:
    """The two axes, their ticks and labels, and both titles."""
    bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
    out = [f'<line x1="{LEFT}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>',
           f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{bottom}" stroke="black"/>']
    for value in y_ticks:
        y = f.y(value)
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(text(LEFT - 6, y + 4, f"{value:g}", "end"))
    for value, label in x_ticks:
        out.append(text(f.x(value), bottom + 16, label))
    out.append(text((LEFT + right) / 2, HEIGHT - 10, x_title))
    out.append(text(16, (TOP + bottom) / 2, y_title, extra=f'transform="rotate(-90 16 {(TOP + bottom) / 2:.1f})"'))
    return out


def legend(entries: list[tuple[str, str, bool]]) -> list[str]:
    """One line per (label, color, dashed) in the right margin, outside the plot area."""
    out, x = [], WIDTH - RIGHT + 16
    for i, (label, color, dashed) in enumerate(entries):
        y = TOP + 8 + 16 * i
        dash = ' stroke-dasharray="4 3"' if dashed else ""
        out.append(f'<line x1="{x}" y1="{y}" x2="{x + 18}" y2="{y}" stroke="{color}" stroke-width="2"{dash}/>')
        out.append(text(x + 24, y + 4, label, "start"))
    return out


def frame_svg(body: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" '
            f'font-size="11"><rect width="100%" height="100%" fill="white"/>' + "".join(body) + "</svg>")


def ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def error_bar(f: Frame, x: float, y: float, err: float, color: str) -> str:
    top, bottom = f.y(y + err), f.y(y - err)
    return (f'<line x1="{x:.1f}" y1="{top:.1f}" x2="{x:.1f}" y2="{bottom:.1f}" stroke="{color}"/>'
            f'<line x1="{x - 3:.1f}" y1="{top:.1f}" x2="{x + 3:.1f}" y2="{top:.1f}" stroke="{color}"/>'
            f'<line x1="{x - 3:.1f}" y1="{bottom:.1f}" x2="{x + 3:.1f}" y2="{bottom:.1f}" stroke="{color}"/>')


def point_chart(series: dict[str, list[tuple[float, float, float | None]]],
                references: dict[str, tuple[float, float | None]], x_labels: list[str], x_title: str,
                y_title: str, y_range: tuple[float, float] = (0, 100)) -> str:
    """Points (x, y, error) joined per series, error bars, and horizontal reference lines (y, error)."""
    f = Frame((-0.5, max(len(x_labels) - 0.5, 0.5)), y_range)
    body = axes(f, list(enumerate(x_labels)), ticks(*y_range), x_title, y_title)
    entries = []
    for k, (name, points) in enumerate(series.items()):
        color, dodge = COLORS[k % len(COLORS)], 0.08 * (k - (len(series) - 1) / 2)
        coords = [(f.x(x + dodge), f.y(y), y, err) for x, y, err in points]
        if len(coords) > 1:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py, _, _ in coords)
            body.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for px, py, y, err in coords:
            if err:
                body.append(error_bar(f, px, y, err, color))
            body.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3.5" fill="{color}"/>')
        entries.append((name, color, False))
    for k, (name, (y, err)) in enumerate(references.items(), start=len(series)):
        color = COLORS[k % len(COLORS)]
        if err:
            body.append(f'<rect x="{LEFT}" y="{f.y(y + err):.1f}" width="{WIDTH - LEFT - RIGHT}" '
                        f'height="{f.y(y - err) - f.y(y + err):.1f}" fill="{color}" opacity="0.08"/>')
        body.append(f'<line x1="{LEFT}" y1="{f.y(y):.1f}" x2="{WIDTH - RIGHT}" y2="{f.y(y):.1f}" stroke="{color}" '
                    f'stroke-width="1.5" stroke-dasharray="4 3"/>')
        entries.append((name, color, True))
    return frame_svg(body + legend(entries))


def line_chart(series: dict[str, list[tuple[float, float]]], x_title: str, y_title: str,
               y_range: tuple[float, float] | None = None) -> str:
    """Lines through (x, y) points, one per series; the y range from the data unless given."""
    xs = [x for points in series.values() for x, _ in points] or [0, 1]
    ys = [y for points in series.values() for _, y in points] or [0, 1]
    lo, hi = y_range or (min(0.0, min(ys)), max(ys) if max(ys) > min(0.0, min(ys)) else 1.0)
    f = Frame((min(xs), max(xs)), (lo, hi))
    x_ticks = [(x, f"{x:g}") for x in ticks(min(xs), max(xs))]
    body = axes(f, x_ticks, ticks(lo, hi), x_title, y_title)
    entries = []
    for k, (name, points) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        path = " ".join(f"{f.x(x):.1f},{f.y(y):.1f}" for x, y in points)
        body.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        entries.append((name, color, False))
    return frame_svg(body + legend(entries))
