"""Figures of the per-token SDPO signal (used by auxiliary/sdpo_signal_analysis.py).

Every figure uses the same diverging colour map centred at 0 (red = the hindsight context
makes the token less likely, blue = more likely) and one symmetric scale +-vmax shared by
all figures of a run, so colours compare across figures. Figure sizes are fixed functions
of the data (no tight bounding box), at DPI = 100 pixels per inch:

    heatmap_size(n_rows)              (14, 1.6 + 0.3 n_rows) inches; one row per case, one column per token
    side_by_side_size(n_rows)         (18, 1.6 + 0.3 n_rows)
    token_view_size(n_lines_per_panel) (TOKEN_FIG_WIDTH, see token_view_size)
"""
from __future__ import annotations

import math
import textwrap
import warnings
from typing import Sequence

import numpy as np

from auxiliary.evals.eval_common import save_figure

DPI = 100
CMAP = "RdBu"
_ROW_INCHES = 0.3
_HEATMAP_EXTRA = 1.6

# token view: a monospace grid, one cell per character
TOKEN_FONT_SIZE = 9
CHARS_PER_LINE = 110
_CHAR_INCHES = TOKEN_FONT_SIZE * 0.6021 / 72  # advance width of DejaVu Sans Mono
_LINE_INCHES = 0.24
_SIDE_MARGIN = 0.3
TOKEN_FIG_WIDTH = round(CHARS_PER_LINE * _CHAR_INCHES + 2 * _SIDE_MARGIN, 2)
_PANEL_TITLE_INCHES = 0.55
_COLORBAR_INCHES = 1.0


def heatmap_size(n_rows: int) -> tuple[float, float]:
    return 14.0, _HEATMAP_EXTRA + _ROW_INCHES * n_rows


def side_by_side_size(n_rows: int) -> tuple[float, float]:
    return 18.0, _HEATMAP_EXTRA + _ROW_INCHES * n_rows


def token_view_size(n_lines: int, n_panels: int = 2) -> tuple[float, float]:
    return TOKEN_FIG_WIDTH, n_panels * (_PANEL_TITLE_INCHES + _LINE_INCHES * n_lines) + _COLORBAR_INCHES


def shared_scale(signal_rows: Sequence[Sequence[float]], quantile: float = 0.98) -> float:
    """Symmetric colour limit: a high quantile of |signal| over every token (a few outliers
    would otherwise wash out the rest); colours saturate beyond it."""
    values = np.abs(np.concatenate([np.asarray(r, dtype=float) for r in signal_rows if len(r)] or [np.zeros(1)]))
    return max(float(np.quantile(values, quantile)), 1e-6)


def _matrix(rows: Sequence[Sequence[float]]) -> np.ndarray:
    width = max((len(r) for r in rows), default=1)
    matrix = np.full((len(rows), max(width, 1)), np.nan)
    for index, row in enumerate(rows):
        matrix[index, :len(row)] = row
    return matrix


def _cmap():
    import matplotlib

    return matplotlib.colormaps[CMAP].with_extremes(bad="#eeeeee")  # grey = past the end of the reply


def _draw_heatmap(ax, rows, labels, vmax, title):
    image = ax.imshow(_matrix(rows), aspect="auto", cmap=_cmap(), vmin=-vmax, vmax=vmax, interpolation="nearest")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel("reply token position")
    ax.set_title(title, fontsize=10)
    return image


def plot_heatmap(rows: Sequence[Sequence[float]], labels: Sequence[str], path: str, vmax: float, title: str) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=heatmap_size(len(rows)), layout="constrained")
    ax = fig.subplots()
    image = _draw_heatmap(ax, rows, labels, vmax, title)
    fig.colorbar(image, ax=ax, label="signal A_t (nats)", shrink=0.9)
    return save_figure(fig, path, DPI)


def plot_stacked(unrelated: Sequence[Sequence[float]], followup: Sequence[Sequence[float]], labels: Sequence[str],
                 path: str, vmax: float) -> str:
    """Each case as two adjacent rows (unrelated, then relevant follow-up): the same tokens, compared directly."""
    from matplotlib.figure import Figure

    rows, row_labels = [], []
    for label, unrel, follow in zip(labels, unrelated, followup):
        rows += [unrel, follow]
        row_labels += [f"{label} | unrelated", f"{label} | follow-up"]
    fig = Figure(figsize=heatmap_size(len(rows)), layout="constrained")
    ax = fig.subplots()
    image = _draw_heatmap(ax, rows, row_labels, vmax,
                          "Per-token signal, each case under the unrelated (upper) and the relevant (lower) follow-up")
    for boundary in range(2, len(rows), 2):
        ax.axhline(boundary - 0.5, color="black", linewidth=0.6)
    fig.colorbar(image, ax=ax, label="signal A_t (nats)", shrink=0.9)
    return save_figure(fig, path, DPI)


def plot_side_by_side(unrelated, followup, labels, path: str, vmax: float, summary: dict | None = None) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=side_by_side_size(len(labels)), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)

    def subtitle(name, key):
        if not summary:
            return name
        return f"{name}: mean |A| = {summary[key]:.3f}"

    _draw_heatmap(left, unrelated, labels, vmax, subtitle("Unrelated follow-up", "mean_abs_unrelated"))
    image = _draw_heatmap(right, followup, labels, vmax, subtitle("Relevant follow-up", "mean_abs_followup"))
    fig.colorbar(image, ax=[left, right], label="signal A_t (nats)", shrink=0.9)
    return save_figure(fig, path, DPI)


# --------------------------------------------------------------------------- token view

def display_token(text: str) -> str:
    """Readable cell text: newlines as a return arrow, tabs as spaces, characters our font lacks as a box."""
    text = text.replace("\r", "").replace("\t", "    ").replace("\n", "\u21b5")
    return "".join(ch if ord(ch) <= 0xFFFF and (ch.isprintable() or ch == " ") else "\u25a1" for ch in text)


def layout_tokens(tokens: Sequence[str], chars_per_line: int = CHARS_PER_LINE) -> list[tuple[int, int, str]]:
    """(line, column, cell text) per token: tokens wrap at the line width and after a newline."""
    cells, line, column = [], 0, 0
    for token in tokens:
        cell = display_token(token)[:chars_per_line] or "\u2205"
        if column + len(cell) > chars_per_line and column > 0:
            line, column = line + 1, 0
        cells.append((line, column, cell))
        column += len(cell)
        if "\n" in token:
            line, column = line + 1, 0
    return cells


def plot_case_tokens(tokens: Sequence[str], panels: Sequence[tuple[str, Sequence[float]]], path: str, vmax: float,
                     title: str) -> str:
    """One panel per (heading, signal): the reply's tokens as text cells coloured by their signal."""
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    cells = layout_tokens(tokens)
    n_lines = (cells[-1][0] + 1) if cells else 1
    width, height = token_view_size(n_lines, len(panels))
    fig = Figure(figsize=(width, height))
    fig.suptitle(textwrap.shorten(title, 115), fontsize=9, x=_SIDE_MARGIN / width, ha="left",
                 y=1 - 0.05 / height, va="top")
    cmap, norm = _cmap(), Normalize(-vmax, vmax)
    top = height - 0.25
    for heading, signal in panels:
        panel_height = _LINE_INCHES * n_lines
        top -= _PANEL_TITLE_INCHES
        ax = fig.add_axes([_SIDE_MARGIN / width, (top - panel_height) / height,
                           CHARS_PER_LINE * _CHAR_INCHES / width, panel_height / height])
        ax.set_xlim(0, CHARS_PER_LINE)
        ax.set_ylim(n_lines, 0)
        ax.axis("off")
        ax.set_title(textwrap.shorten(heading, 125), fontsize=8, loc="left")
        for (line, column, cell), value in zip(cells, signal):
            colour = cmap(norm(value)) if math.isfinite(value) else (0.9, 0.9, 0.9, 1.0)
            ax.add_patch(Rectangle((column, line + 0.06), len(cell), 0.88, facecolor=colour, edgecolor="white",
                                   linewidth=0.4))
            dark = abs(value) > 0.6 * vmax if math.isfinite(value) else False
            ax.text(column, line + 0.5, cell, fontsize=TOKEN_FONT_SIZE, family="DejaVu Sans Mono", va="center",
                    ha="left", color="white" if dark else "black")
        top -= panel_height
    bar_ax = fig.add_axes([0.25, 0.3 / height, 0.5, 0.13 / height])
    from matplotlib.cm import ScalarMappable

    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=bar_ax, orientation="horizontal")
    bar_ax.tick_params(labelsize=7)
    bar_ax.set_title("signal A_t (nats): red = less likely after the follow-up, blue = more likely", fontsize=7)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Gg]lyph.*")
        return save_figure(fig, path, DPI)
