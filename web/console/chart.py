"""The usage chart as geometry for an inline SVG (``templates/console/_chart.html``).

Drawn on the server: no chart library, no script, nothing fetched. Bars are the
chart's buckets (empty ones included), stacked by model or user; heights are
computed from the Decimal costs and rounded to whole pixels only at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal

from shared.services.billing import money_str
from shared.services.console import Chart
from shared.services.usage import bucket_start

WIDTH = 720
HEIGHT = 260
LEFT = 8
TOP = 16
PLOT_HEIGHT = 200
MAX_SERIES = 6  # beyond this, the smallest series are drawn together as "other"
OTHER = "other"
PALETTE = ("#2563eb", "#16a34a", "#d97706", "#9333ea", "#dc2626", "#0891b2")
OTHER_COLOR = "#6b7280"
MAX_LABELS = 8


@dataclass(frozen=True)
class Segment:
    y: int
    height: int
    color: str
    title: str


@dataclass
class Bar:
    x: int
    width: int
    label: str
    show_label: bool
    total: Decimal
    segments: list[Segment] = field(default_factory=list)


@dataclass(frozen=True)
class Series:
    key: str
    label: str
    color: str
    total: Decimal


@dataclass(frozen=True)
class ChartView:
    width: int
    height: int
    baseline: int
    bars: list[Bar]
    series: list[Series]
    peak: str  # the tallest bar's cost, the top of the scale
    total: str
    empty: bool


def _bucket_starts(chart: Chart) -> list[date]:
    query = chart.query
    starts = []
    current = bucket_start(query.start, query.bucket)
    while current <= query.end:
        starts.append(current)
        if query.bucket == "day":
            current += timedelta(days=1)
        elif query.bucket == "week":
            current += timedelta(weeks=1)
        else:
            current = (current + timedelta(days=32)).replace(day=1)
    return starts


def _label(day: date, bucket: str) -> str:
    if bucket == "month":
        return day.strftime("%Y-%m")
    return day.strftime("%m-%d")


def build(chart: Chart) -> ChartView:
    split = chart.query.group_by
    costs: dict[date, dict[str, Decimal]] = {}
    totals: dict[str, Decimal] = {}
    for bucket in chart.buckets:
        key = (bucket.user_id if split == "user" else bucket.model) or "?"
        costs.setdefault(bucket.bucket_start, {})[key] = bucket.cost
        totals[key] = totals.get(key, Decimal(0)) + bucket.cost
    ranked = sorted(totals, key=lambda key: (-totals[key], key))
    kept = ranked[: MAX_SERIES - 1] if len(ranked) > MAX_SERIES else ranked
    colors = {key: PALETTE[index] for index, key in enumerate(kept)}
    series = [Series(key, chart.labels.get(key, key), colors[key], totals[key]) for key in kept]
    if len(kept) < len(ranked):
        rest = sum((totals[key] for key in ranked[len(kept) :]), Decimal(0))
        series.append(Series(OTHER, f"{len(ranked) - len(kept)} others", OTHER_COLOR, rest))

    stacks: dict[date, dict[str, Decimal]] = {}
    for start, by_key in costs.items():
        stack = stacks.setdefault(start, {})
        for key, cost in by_key.items():
            series_key = key if key in colors else OTHER
            stack[series_key] = stack.get(series_key, Decimal(0)) + cost
    starts = _bucket_starts(chart)
    peak = max((sum(stack.values(), Decimal(0)) for stack in stacks.values()), default=Decimal(0))
    slot = Decimal(WIDTH - LEFT) / max(len(starts), 1)
    bar_width = max(int(slot * Decimal("0.7")), 1)
    step = -(-len(starts) // MAX_LABELS)
    baseline = TOP + PLOT_HEIGHT
    bars = []
    for index, start in enumerate(starts):
        x = LEFT + int((slot * index + (slot - bar_width) / 2).to_integral_value(ROUND_HALF_UP))
        label = _label(start, chart.query.bucket)
        bar = Bar(x=x, width=bar_width, label=label, show_label=index % step == 0, total=Decimal(0))
        top = baseline
        stack = stacks.get(start, {})
        for item in series:
            cost = stack.get(item.key, Decimal(0))
            if cost <= 0 or peak <= 0:
                continue
            height = max(int((cost * PLOT_HEIGHT / peak).to_integral_value(ROUND_HALF_UP)), 1)
            top -= height
            bar.segments.append(
                Segment(top, height, item.color, f"{start.isoformat()} · {item.label}: {money_str(cost)}")
            )
            bar.total += cost
        bars.append(bar)
    grand_total = sum(totals.values(), Decimal(0))
    return ChartView(
        width=WIDTH,
        height=HEIGHT,
        baseline=baseline,
        bars=bars,
        series=series,
        peak=money_str(peak),
        total=money_str(grand_total),
        empty=not chart.buckets,
    )
