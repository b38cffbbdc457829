"""The figure of a run (curves.png), drawn from the rows of its log.csv.

Top row, query accuracy (%) on a linear 0-100 % axis: on the left the validation accuracy over
meta-iterations, one curve per number of inner adaptation steps with its 95% interval as a band, and
the meta-training accuracy (dashed grey, at the training's number of inner steps); on the right, once
the run has finished, the test accuracy per number of inner steps with its 95% interval as error bars
(an unfinished run, with no test row yet, has only the left column).

Bottom row, the same curves as query ERROR (100 - accuracy, %) on a log scale. A trained MAML is at
95-99.5 % on 5-way Omniglot, where the linear view spends most of its height on the chance level and
the differences that matter are a few pixels. On a log scale equal ratios are equal distances: 1 % vs
2 % error is as far apart as 10 % vs 20 %, so the late phase of a long run (errors ~0.5-3 %) is as
readable as the early phase of a short one (errors ~15-50 %). An error of 0 and the lower end of an
interval that reaches 0 or below have no place on a log axis: they are drawn at the bottom edge, which
sits a little below the smallest positive error.

comparison_png overlays two runs' validation curves after one number of inner steps on the same two axes,
accuracy above and error on a log scale below (results_table.py --compare).

This module is the project's one place for matplotlib, and it draws through matplotlib.figure.Figure
alone: no pyplot, so no backend has to be chosen first and no global figure state is touched.
"""
import dataclasses
import io
import math
import re
import reprlib

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

DPI = 120
WIDTH_WITH_TEST = 11  # inches: the validation panels and, beside them, the test panels
WIDTH_WITHOUT_TEST = 7.5  # an unfinished run has no test row yet
HEIGHT = 8.5
ERROR_FLOOR_RATIO = 0.7  # the log axis ends this far below the smallest positive error drawn
SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class Log:
    """What a log.csv holds, accuracies and 95% half-widths in % (an empty interval cell, as in train rows,
    counts as 0).

    steps: the inner steps of its columns, 0..S. val: {step: (iterations, accuracies, half-widths)} for every
    step, empty where no val row has it. train_step, train: the training's number of inner steps (the last
    step train rows have) and their (iterations, accuracies, half-widths), or None. test_iteration, test: the
    last test row's iteration and its [(step, accuracy, half-width)], or None.
    """

    steps: list
    val: dict
    train_step: int | None
    train: tuple | None
    test_iteration: int | None
    test: list | None

    def final_step(self):
        """The most inner steps a val row has (update_step_test), or None without a validation."""
        return max((step for step, (x, _, _) in self.val.items() if x), default=None)


def parse_log(rows):
    """The Log of a log.csv's rows, as run_files.read_log gives them (dicts of strings, the header's columns).

    Raises ValueError, in one line naming the row (1 is the first after the header) and the problem, when
    rows are not such a log: none at all, a row with more or fewer fields than the header, a column missing,
    a split other than train, val or test, an iteration that is not a whole number, an accuracy or interval
    that is not a fraction from 0 to 1, or no row with an accuracy at all."""
    if not rows:
        raise ValueError("the log has no rows (no validation, training or test entry yet): nothing to draw")
    steps = sorted(int(match[1]) for column in rows[0] if (match := re.fullmatch(r"acc_step(\d+)", str(column))))
    # Without a single acc_step column the first one missing is acc_step0.
    required = ["iteration", "split"] + [f"{kind}_step{step}" for kind in ("acc", "ci95") for step in steps or [0]]
    missing = [column for column in required if column not in rows[0]]
    if missing:
        raise ValueError(f"the header has no column {missing[0]!r}")
    parsed = [parse_row(number, row, steps) for number, row in enumerate(rows, start=1)]
    if not any(points for _, _, points in parsed):
        raise ValueError("no row of the log has an accuracy: nothing to draw")

    def series(split, step):
        points = [(iteration, *cells[step]) for iteration, kind, cells in parsed if kind == split and step in cells]
        return [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]

    train_steps = [step for step in steps if series("train", step)[0]]
    tests = [(iteration, points) for iteration, kind, points in parsed if kind == "test"]
    return Log(steps=steps, val={step: series("val", step) for step in steps},
               train_step=train_steps[-1] if train_steps else None,
               train=series("train", train_steps[-1]) if train_steps else None,
               test_iteration=tests[-1][0] if tests else None,
               test=[(step, *point) for step, point in tests[-1][1].items()] if tests else None)


def parse_row(number, row, steps):
    """(iteration, split, {step: (accuracy %, half-width %)} for the steps the row has) of row number."""
    if None in row:
        raise ValueError(f"row {number} has more fields than the header")
    if None in row.values():
        raise ValueError(f"row {number} has fewer fields than the header")
    if not re.fullmatch(r"\d+", row["iteration"]):
        raise ValueError(f"row {number}: iteration is {reprlib.repr(row['iteration'])}, not a whole number")
    if row["split"] not in SPLITS:
        raise ValueError(f"row {number}: split is {reprlib.repr(row['split'])}, not train, val or test")
    points = {step: (100 * fraction(number, row, f"acc_step{step}"), 100 * fraction(number, row, f"ci95_step{step}"))
              for step in steps if row[f"acc_step{step}"] != ""}
    return int(row["iteration"]), row["split"], points


def fraction(number, row, column):
    """The cell of row number in column as a float from 0 to 1 (an empty cell: 0); ValueError otherwise."""
    text = row[column]
    try:
        value = float(text or 0)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise ValueError(f"row {number}: {column} is {reprlib.repr(text)}, not a fraction from 0 to 1")
    return value


def curves_png(rows, title):
    """Draw a run's log as a PNG and return its bytes.

    rows: the rows of log.csv, as run_files.read_log gives them. title: names the run in the figure's title.
    Raises ValueError (parse_log's) when they are not a log with something to draw."""
    return png(curves_figure(parse_log(rows), title))


def png(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def error_floor(errors):
    """The bottom of a log-scale error axis for these errors (in %): a little below the smallest positive one."""
    positive = [e for e in errors if e > 0]
    return ERROR_FLOOR_RATIO * min(positive) if positive else 0.1


def curves_figure(log, title):
    """The figure of a Log (the module docstring describes it)."""
    steps, val, train, test = log.steps, log.val, log.train, log.test
    errors = [100 - acc for _, accs, _ in val.values() for acc in accs]
    errors += [100 - acc for acc in train[1]] if train else []
    errors += [100 - acc for _, acc, _ in test] if test else []
    floor = error_floor(errors)

    fig = Figure(figsize=(WIDTH_WITH_TEST if test else WIDTH_WITHOUT_TEST, HEIGHT), dpi=DPI, layout="constrained")
    grid = fig.add_gridspec(2, 2 if test else 1, width_ratios=[2.2, 1] if test else None, height_ratios=[1, 1.3])
    acc_ax = fig.add_subplot(grid[0, 0])
    err_ax = fig.add_subplot(grid[1, 0], sharex=acc_ax)
    colors = matplotlib.colormaps["viridis"]([0.9 * i / max(len(steps) - 1, 1) for i in range(len(steps))])
    for step, color in zip(steps, colors):
        draw_validation(acc_ax, err_ax, val[step], floor, f"val, {step} step{'s' * (step != 1)}", color=color)
    if train:
        x, accs, _ = train
        label = f"train, {log.train_step} step{'s' * (log.train_step != 1)}"
        acc_ax.plot(x, accs, linestyle="--", color="grey", label=label)
        err_ax.plot(x, [max(100 - a, floor) for a in accs], linestyle="--", color="grey")
    iteration_axes(acc_ax, err_ax, floor)
    acc_ax.set_title("validation during meta-training (band: 95% interval)")

    if test:
        test_acc_ax = fig.add_subplot(grid[0, 1], sharey=acc_ax)
        test_err_ax = fig.add_subplot(grid[1, 1], sharey=err_ax, sharex=test_acc_ax)
        draw_test(test_acc_ax, test, floor, error=False)
        draw_test(test_err_ax, test, floor, error=True)
        test_acc_ax.set_title(f"test after {log.test_iteration} iterations\n(bars: 95% interval)")
        test_acc_ax.tick_params(labelbottom=False)
        test_err_ax.set_title("the same, as error on a log scale")
        test_err_ax.set_xlabel("inner adaptation steps")
        test_acc_ax.set_ylabel("query accuracy (%)")

    fig.suptitle(f"MAML on Omniglot: {title}\n"
                 "top: query accuracy (%), linear  ·  bottom: query error = 100 − accuracy (%), log scale")
    legend_below(fig, acc_ax)  # no legend for a log that holds only a test row: it has no curves
    return fig


def comparison_png(logs, step, title):
    """Two runs' validation after step inner steps, overlaid, as a PNG's bytes: the query accuracy (%) above,
    the error on a log scale below, each with its 95% band, over the meta-iterations. logs: [(label, Log)],
    the run compared (blue) and the published run it is compared with (black, dashed). title: the figure's."""
    styles = (dict(color="C0"), dict(color="black", linestyle="--"))
    floor = error_floor([100 - acc for _, log in logs for acc in log.val[step][1]])
    fig = Figure(figsize=(WIDTH_WITHOUT_TEST, HEIGHT), dpi=DPI, layout="constrained")
    grid = fig.add_gridspec(2, 1, height_ratios=[1, 1.3])
    acc_ax = fig.add_subplot(grid[0, 0])
    err_ax = fig.add_subplot(grid[1, 0], sharex=acc_ax)
    for (label, log), style in zip(logs, styles):
        draw_validation(acc_ax, err_ax, log.val[step], floor, label, **style)
    iteration_axes(acc_ax, err_ax, floor)
    acc_ax.set_title(f"validation after {step} inner step{'s' * (step != 1)} (band: 95% interval)")
    fig.suptitle(title, fontsize="medium", wrap=True)
    legend_below(fig, acc_ax)
    return png(fig)


def legend_below(fig, ax):
    """The legend of ax's curves below the panels, in one row if it fits the figure's width, else in the fewest
    rows, as even as they can be, that fit (a run validating after 5 steps has 7 curves, too many for one row of an
    unfinished run's narrow figure). Nothing where ax has no labelled curves."""
    handles, labels = ax.get_legend_handles_labels()
    for rows in range(1, len(labels) + 1):
        legend = fig.legend(handles, labels, loc="outside lower center", ncol=math.ceil(len(labels) / rows),
                            fontsize="small")
        if legend.get_window_extent().width <= fig.bbox.width or rows == len(labels):
            return
        legend.remove()


def draw_validation(acc_ax, err_ax, series, floor, label, **style):
    """One validation curve (iterations, accuracies, half-widths in %) with its 95% band: the accuracy on
    acc_ax, the error on err_ax (at floor where it is at or below it). Nothing for an empty series."""
    x, accs, ci = series
    if not x:
        return
    marker = "o" if len(x) <= 40 else None  # markers on a few points; on many they only hide the curve
    acc_ax.plot(x, accs, marker=marker, markersize=3, label=label, **style)
    acc_ax.fill_between(x, [a - c for a, c in zip(accs, ci)], [a + c for a, c in zip(accs, ci)],
                        alpha=0.15, linewidth=0, color=style.get("color"))
    err = [100 - a for a in accs]
    err_ax.plot(x, [max(e, floor) for e in err], marker=marker, markersize=3, **style)
    err_ax.fill_between(x, [max(e - c, floor) for e, c in zip(err, ci)], [e + c for e, c in zip(err, ci)],
                        alpha=0.15, linewidth=0, color=style.get("color"))


def iteration_axes(acc_ax, err_ax, floor):
    """The accuracy axis (0-100 %) above the log-scale error axis, over whole meta-iterations."""
    acc_ax.set_ylim(0, 100)
    acc_ax.set_ylabel("query accuracy (%)")
    acc_ax.tick_params(labelbottom=False)
    error_axis(err_ax, floor)
    # matplotlib's default ticks (AutoLocator's), but only whole iterations: a short run's axis has no 0.5.
    err_ax.xaxis.set_major_locator(MaxNLocator("auto", steps=[1, 2, 2.5, 5, 10], integer=True))
    err_ax.set_xlabel("meta-iteration")
    err_ax.set_title("the same, as error on a log scale")
    for ax in (acc_ax, err_ax):
        ax.grid(alpha=0.3)


def error_axis(ax, floor):
    """Make ax a log-scale error axis from floor to 100 %, its ticks labelled in plain percent (0.5, 1, 2, 5,
    ...) rather than powers of ten; on an axis of at most 1.5 decades (a short run's errors of 15-80 %), with
    more labels (15, 20, 30, 50, 70), as 1-2-5 alone would leave it two or three."""
    ax.set_yscale("log")
    ax.set_ylim(floor, 100)
    subs = (1, 1.5, 2, 3, 5, 7) if math.log10(100 / floor) <= 1.5 else (1, 2, 5)
    ax.yaxis.set_major_locator(LogLocator(subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("query error (%), log scale")


def draw_test(ax, test, floor, error):
    """The test accuracy (error=False) or error (error=True) per number of inner steps, with 95% error
    bars and the value beside each point. On the error axis an error or an interval end at or below floor
    is drawn at floor."""
    x = [step for step, _, _ in test]
    if error:
        y = [max(100 - acc, floor) for _, acc, _ in test]
        low = [e - max(100 - acc - ci, floor) for e, (_, acc, ci) in zip(y, test)]
        high = [max(100 - acc + ci, floor) - e for e, (_, acc, ci) in zip(y, test)]
        labels = [percent(100 - acc) for _, acc, _ in test]
        error_axis(ax, floor)
    else:
        y = [acc for _, acc, _ in test]
        low = high = [ci for _, _, ci in test]
        labels = [f"{acc:.1f}" for acc in y]
    # No line between the points: the steps are separate settings, and a line would run through the labels. Not
    # clipped by the axes and drawn over their frame, so that a point on the bottom edge (an error of 0) shows whole.
    ax.errorbar(x, y, yerr=[low, high], marker="o", linestyle="none", capsize=4, color="C3", clip_on=False, zorder=3)
    # Beside each point; on the accuracy axis a little below it, clear of the top edge where a trained network is.
    for step, value, label in zip(x, y, labels):
        ax.annotate(label, (step, value), textcoords="offset points", xytext=(7, 0 if error else -3), ha="left",
                    va="center" if error else "top", fontsize="small")
    ax.set_xticks(x)
    ax.set_xlim(-0.5, len(x) - 0.1)
    ax.grid(alpha=0.3)


def percent(value):
    """An error in % with two significant digits but no exponent: 80, 16, 1.4, 0.93, 0."""
    if value <= 0:
        return "0"
    return f"{value:.{max(0, 1 - math.floor(math.log10(value)))}f}"
