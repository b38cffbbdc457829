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

This module is the project's one place for matplotlib, and it draws through matplotlib.figure.Figure
alone: no pyplot, so no backend has to be chosen first and no global figure state is touched.
"""
import io
import math

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

DPI = 120
WIDTH_WITH_TEST = 11  # inches: the validation panels and, beside them, the test panels
WIDTH_WITHOUT_TEST = 7.5  # an unfinished run has no test row yet
HEIGHT = 8.5
ERROR_FLOOR_RATIO = 0.7  # the log axis ends this far below the smallest positive error drawn


def curves_png(rows, title):
    """Draw a run's log as a PNG and return its bytes.

    rows: the rows of log.csv, as csv.DictReader gives them (dicts of strings; cells beyond a row's own
    inner steps are empty strings). title: names the run in the figure's title. Raises ValueError when
    there are no rows: an empty log has nothing to draw."""
    if not rows:
        raise ValueError("curves_png: the log has no rows (no validation, training or test entry yet), "
                         "so there is nothing to draw")
    steps = sorted(int(column[len("acc_step"):]) for column in rows[0] if column.startswith("acc_step"))
    val = {step: series(rows, "val", step) for step in steps}
    train_steps = [step for step in steps if series(rows, "train", step)[0]]
    train = series(rows, "train", train_steps[-1]) if train_steps else None
    tests = [row for row in rows if row["split"] == "test"]
    test = row_points(tests[-1], steps) if tests else None

    errors = [100 - acc for _, accs, _ in val.values() for acc in accs]
    errors += [100 - acc for acc in train[1]] if train else []
    errors += [100 - acc for _, acc, _ in test] if test else []
    positive = [e for e in errors if e > 0]
    floor = ERROR_FLOOR_RATIO * min(positive) if positive else 0.1

    fig = Figure(figsize=(WIDTH_WITH_TEST if test else WIDTH_WITHOUT_TEST, HEIGHT), dpi=DPI, layout="constrained")
    grid = fig.add_gridspec(2, 2 if test else 1, width_ratios=[2.2, 1] if test else None, height_ratios=[1, 1.3])
    acc_ax = fig.add_subplot(grid[0, 0])
    err_ax = fig.add_subplot(grid[1, 0], sharex=acc_ax)
    colors = matplotlib.colormaps["viridis"]([0.9 * i / max(len(steps) - 1, 1) for i in range(len(steps))])
    for step, color in zip(steps, colors):
        x, accs, ci = val[step]
        if not x:
            continue
        marker = "o" if len(x) <= 40 else None  # markers on a few points; on many they only hide the curve
        label = f"val, {step} step{'s' * (step != 1)}"
        acc_ax.plot(x, accs, marker=marker, markersize=3, color=color, label=label)
        acc_ax.fill_between(x, [a - c for a, c in zip(accs, ci)], [a + c for a, c in zip(accs, ci)],
                            color=color, alpha=0.15, linewidth=0)
        err = [100 - a for a in accs]
        err_ax.plot(x, [max(e, floor) for e in err], marker=marker, markersize=3, color=color)
        err_ax.fill_between(x, [max(e - c, floor) for e, c in zip(err, ci)], [e + c for e, c in zip(err, ci)],
                            color=color, alpha=0.15, linewidth=0)
    if train:
        x, accs, _ = train
        label = f"train, {train_steps[-1]} step{'s' * (train_steps[-1] != 1)}"
        acc_ax.plot(x, accs, linestyle="--", color="grey", label=label)
        err_ax.plot(x, [max(100 - a, floor) for a in accs], linestyle="--", color="grey")

    acc_ax.set_ylim(0, 100)
    acc_ax.set_ylabel("query accuracy (%)")
    acc_ax.set_title("validation during meta-training (band: 95% interval)")
    acc_ax.tick_params(labelbottom=False)
    error_axis(err_ax, floor)
    err_ax.set_xlabel("meta-iteration")
    err_ax.set_title("the same, as error on a log scale")
    for ax in (acc_ax, err_ax):
        ax.grid(alpha=0.3)

    if test:
        iteration = tests[-1]["iteration"]
        test_acc_ax = fig.add_subplot(grid[0, 1], sharey=acc_ax)
        test_err_ax = fig.add_subplot(grid[1, 1], sharey=err_ax, sharex=test_acc_ax)
        draw_test(test_acc_ax, test, floor, error=False)
        draw_test(test_err_ax, test, floor, error=True)
        test_acc_ax.set_title(f"test after {iteration} iterations\n(bars: 95% interval)")
        test_acc_ax.tick_params(labelbottom=False)
        test_err_ax.set_title("the same, as error on a log scale")
        test_err_ax.set_xlabel("inner adaptation steps")
        test_acc_ax.set_ylabel("query accuracy (%)")

    fig.suptitle(f"MAML on Omniglot: {title}\n"
                 "top: query accuracy (%), linear  ·  bottom: query error = 100 − accuracy (%), log scale")
    handles, labels = acc_ax.get_legend_handles_labels()
    if labels:  # none in a log that holds only a test row
        fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def series(rows, split, step):
    """The (iterations, accuracies in %, 95% half-widths in %) of one split at one number of inner steps,
    over the rows that have that step (an empty interval cell, as in train rows, counts as 0)."""
    points = [(int(row["iteration"]), 100 * float(row[f"acc_step{step}"]), 100 * float(row[f"ci95_step{step}"] or 0))
              for row in rows if row["split"] == split and row[f"acc_step{step}"] != ""]
    return [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]


def row_points(row, steps):
    """The (step, accuracy in %, 95% half-width in %) of the test row, for the steps it has."""
    return [(step, 100 * float(row[f"acc_step{step}"]), 100 * float(row[f"ci95_step{step}"] or 0))
            for step in steps if row[f"acc_step{step}"] != ""]


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
