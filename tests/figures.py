"""Reading what a matplotlib plot draws (the figures come from conftest's
``saved_figures``): a plot test checks curves, labels, titles and legends."""


def drawn(ax) -> dict[str, list]:
    """What one Axes shows: its curves as (label, xs, ys), its title, labels and legend."""
    legend = ax.get_legend()
    return {
        "lines": [
            (ln.get_label(), list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()
        ],
        "title": ax.get_title(),
        "xlabel": ax.get_xlabel(),
        "ylabel": ax.get_ylabel(),
        "legend": [t.get_text() for t in legend.get_texts()] if legend else [],
    }
