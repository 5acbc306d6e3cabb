"""Sample charts with known values, drawn with matplotlib (the `eval` extra): bar, line and pie.

Each function draws one chart from `rng` into `path` (PNG) and returns (records, truth):
records are native eval records (ChartQA-style questions, relaxed accuracy); truth holds what a
test needs to read the values back from the pixels: the values and the exact fill colour of each
bar, marker or wedge (bars start at 0, so their pixel heights are proportional to the values; a pie
wedge's pixel area is proportional to its share; line markers sit on a linear value axis).
"""

from __future__ import annotations

import random

from ..errors import Phi3VError

CATEGORIES = ("Apples", "Pears", "Plums", "Grapes", "Cherries", "Lemons", "Figs", "Kiwis")
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
MARKER = "#d62728"
LINE = "#1f77b4"
DPI = 100


def _figure(width_in: float = 6.4, height_in: float = 4.2):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise Phi3VError("the sample charts need matplotlib: pip install 'phi3v[eval]'") from None
    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> None:
    # No "Software" text chunk: the same seed gives the same bytes on any matplotlib version.
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})


def bar_chart(rng: random.Random, path, rel: str, n: int) -> tuple[list[dict], dict]:
    k = rng.randint(4, 6)
    names = rng.sample(CATEGORIES, k)
    values = [rng.randint(5, 95) for _ in names]
    while values.count(max(values)) > 1:  # one clear maximum for the "which is highest" question
        values[values.index(max(values))] -= 1
    colours = list(COLOURS[:k])
    fig = _figure()
    ax = fig.add_subplot()
    bars = ax.bar(names, values, color=colours, edgecolor="none", antialiased=False)
    ax.bar_label(bars, labels=[str(v) for v in values], padding=2)
    ax.set_ylim(0, 110)
    ax.set_title("Fruit sold per day")
    ax.set_ylabel("units")
    _save(fig, path)
    ask = rng.randrange(k)
    records = [
        {"id": f"bar-{n}-value", "images": [rel], "question": f"How many {names[ask]} were sold per day?",
         "answers": [str(values[ask])], "metric": "relaxed"},
        {"id": f"bar-{n}-max", "images": [rel], "question": "Which fruit sold the most units per day?",
         "answers": [names[values.index(max(values))]], "metric": "relaxed"},
    ]
    return records, {"kind": "bar", "image": rel, "labels": names, "values": values, "colours": colours}


def line_chart(rng: random.Random, path, rel: str, n: int) -> tuple[list[dict], dict]:
    k = rng.randint(5, 7)
    start = rng.randint(2010, 2016)
    years = [start + i for i in range(k)]
    values = [rng.randint(10, 90) for _ in years]
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(years, values, color=LINE, linewidth=1.5, marker="s", markersize=7, markerfacecolor=MARKER,
            markeredgecolor=MARKER, antialiased=False)
    for x, y in zip(years, values):
        ax.annotate(str(y), (x, y), textcoords="offset points", xytext=(0, 8), ha="center")
    ax.set_ylim(0, 100)
    ax.set_xticks(years)
    ax.set_title("Visitors per year (thousands)")
    _save(fig, path)
    ask = rng.randrange(k)
    records = [
        {"id": f"line-{n}-value", "images": [rel],
         "question": f"How many thousand visitors were there in {years[ask]}?", "answers": [str(values[ask])],
         "metric": "relaxed"},
        {"id": f"line-{n}-change", "images": [rel],
         "question": f"By how much did the visitors change from {years[0]} to {years[-1]} (in thousands)?",
         "answers": [str(values[-1] - values[0])], "metric": "relaxed"},
    ]
    return records, {"kind": "line", "image": rel, "years": years, "values": values, "marker": MARKER}


def pie_chart(rng: random.Random, path, rel: str, n: int) -> tuple[list[dict], dict]:
    k = rng.randint(3, 5)
    names = rng.sample(("Rent", "Food", "Travel", "Savings", "Fun", "Books"), k)
    cuts = sorted(rng.sample(range(5, 96), k - 1))  # k shares of at least 1%, summing to 100
    shares = [b - a for a, b in zip([0] + cuts, cuts + [100])]
    while min(shares) < 5:  # readable wedges: move points from the largest share
        shares[shares.index(min(shares))] += 1
        shares[shares.index(max(shares))] -= 1
    colours = list(COLOURS[:k])
    fig = _figure(5.2, 5.2)
    ax = fig.add_subplot()
    ax.pie(shares, labels=[f"{a} ({s}%)" for a, s in zip(names, shares)], colors=colours, startangle=90,
           counterclock=False, wedgeprops={"linewidth": 0, "antialiased": False})
    ax.set_title("Monthly budget")
    _save(fig, path)
    ask = rng.randrange(k)
    records = [
        {"id": f"pie-{n}-share", "images": [rel], "question": f"What percentage of the budget is {names[ask]}?",
         "answers": [str(shares[ask]), f"{shares[ask]}%"], "metric": "relaxed"},
    ]
    return records, {"kind": "pie", "image": rel, "labels": names, "values": shares, "colours": colours}
