"""curves.py: the figure of a run, drawn from its log rows.

The logs here are written in the test, in log.csv's format (strings, as csv.DictReader gives them; train rows
have only the training's inner steps, the rest of their cells empty), so the tests do not depend on any
committed run.
"""
import csv
import io
import os
import subprocess
import sys

import pytest
from PIL import Image

import curves

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEST_RED = (214, 39, 40)  # matplotlib's "C3", the colour of the test points and bars, and of nothing else
STEPS = 4  # acc_step0..acc_step3, as in the paper's 5-way settings (update_step_test = 3)


def row(iteration, split, accs, ci=(), loss="", steps=STEPS):
    """One log row: accs (fractions) for the first len(accs) of its steps, ci likewise, the other cells empty."""
    cells = {"iteration": str(iteration), "split": split}
    cells.update({f"acc_step{s}": str(accs[s]) if s < len(accs) else "" for s in range(steps)})
    cells.update({f"ci95_step{s}": str(ci[s]) if s < len(ci) else "" for s in range(steps)})
    cells.update({"loss": str(loss), "elapsed_s": str(1.5 * iteration)})
    return cells


def unfinished_log():
    """A run stopped at iteration 1000: the untrained validation at 0, then train and val rows every 500."""
    rows = [row(0, "val", [0.23, 0.28, 0.38, 0.47], [0.02, 0.016, 0.018, 0.022])]
    for iteration, acc in ((500, 0.84), (1000, 0.91)):
        rows.append(row(iteration, "train", [0.2, acc - 0.1], loss=0.8))
        rows.append(row(iteration, "val", [0.2, acc, acc + 0.005, acc + 0.006], [0.02, 0.019, 0.019, 0.019]))
    return rows


def finished_log():
    """The unfinished run taken on to 99 %, with its test row: the regime where the error view matters."""
    return unfinished_log() + [
        row(1500, "train", [0.2, 0.994], loss=0.02),
        row(1500, "val", [0.21, 0.9944, 0.9944, 0.995], [0.019, 0.0044, 0.0044, 0.0043]),
        row(1500, "test", [0.202, 0.9903, 0.9907, 0.9907], [0.015, 0.0043, 0.0043, 0.0043]),
    ]


def image(png):
    """The PNG bytes as an RGB PIL image, after checking the signature."""
    assert png[:8] == PNG_SIGNATURE
    return Image.open(io.BytesIO(png)).convert("RGB")


def has_test_red(img):
    return any(color == TEST_RED for _, color in img.getcolors(img.width * img.height))


def test_finished_run_draws_validation_and_test_panels():
    img = image(curves.curves_png(finished_log(), "5w1s"))
    assert img.size == (1320, 1020)  # 11 x 8.5 inches at 120 dpi: the validation panels and the test panels
    assert has_test_red(img)


def test_unfinished_run_draws_without_a_test_panel():
    img = image(curves.curves_png(unfinished_log(), "5w1s"))
    assert img.size == (900, 1020)  # 7.5 x 8.5 inches: only the validation panels
    assert not has_test_red(img)


def test_a_run_with_only_its_first_validation_draws():
    """The log of a run that has just begun: one val row, one point per curve."""
    assert image(curves.curves_png(unfinished_log()[:1], "just begun")).size == (900, 1020)


@pytest.mark.filterwarnings("error")
def test_errors_of_zero_and_intervals_below_zero_draw_on_the_log_axis():
    """A perfect validation (error 0) and intervals that reach below 0 % error have no place on a log axis:
    they are drawn at its bottom edge, without a warning from matplotlib."""
    rows = finished_log()
    rows[-2] = row(1500, "val", [0.2, 1.0, 1.0, 1.0], [0.02, 0.0, 0.0, 0.0])
    rows[-1] = row(1500, "test", [0.2, 0.998, 1.0, 1.0], [0.015, 0.004, 0.0, 0.0])
    assert has_test_red(image(curves.curves_png(rows, "perfect")))


def red_pixels(rows):
    return sum(count for count, color in image(curves.curves_png(rows, "t")).getcolors(10 ** 7) if color == TEST_RED)


def test_a_test_error_of_zero_is_drawn_at_the_bottom_edge_not_dropped():
    """Errors of 0 at steps 2 and 3 give as much red (test markers) as errors of 0.5 %: their markers are drawn
    on the log axis's bottom edge, not left out as a log axis would leave them."""
    rows = finished_log()
    rows[-1] = row(1500, "test", [0.2, 0.99, 0.995, 0.995], [0.0] * STEPS)
    small_errors = red_pixels(rows)
    rows[-1] = row(1500, "test", [0.2, 0.99, 1.0, 1.0], [0.0] * STEPS)
    assert red_pixels(rows) == pytest.approx(small_errors, rel=0.05)


def test_an_empty_log_is_refused():
    with pytest.raises(ValueError, match="no rows"):
        curves.curves_png([], "empty")


def test_a_short_run_has_whole_meta_iterations_on_its_axis():
    """A run of 3 iterations validated at each: matplotlib's own ticks would be 0, 0.25, 0.5, ..."""
    rows = [row(i, "val", [0.2, 0.3 + 0.1 * i], [0.02, 0.02]) for i in range(4)]
    fig = curves.curves_figure(curves.parse_log(rows), "short")
    fig.savefig(io.BytesIO(), format="png")
    for ax in fig.axes:
        low, high = ax.get_xlim()
        ticks = [tick for tick in ax.get_xticks() if low <= tick <= high]
        assert len(ticks) >= 2 and all(tick == int(tick) for tick in ticks), ticks


def five_step_log(finished):
    """A 20-way run's log: validation after 0 to 5 inner steps (update_step_test = 5), training after 5, so its
    figure has 7 labelled curves; with its test row if finished."""
    accs, ci = [0.05, 0.35, 0.78, 0.89, 0.93, 0.94], [0.004, 0.007, 0.007, 0.007, 0.006, 0.006]
    rows = [row(0, "val", [0.05, 0.12, 0.24, 0.29, 0.30, 0.31], ci, steps=6)]
    for iteration in (500, 1000):
        rows.append(row(iteration, "train", [0.05] * 5 + [0.95], loss=0.2, steps=6))
        rows.append(row(iteration, "val", accs, ci, steps=6))
    return rows + ([row(1000, "test", accs, ci, steps=6)] if finished else [])


@pytest.mark.parametrize("finished", (False, True), ids=("unfinished: narrow", "finished: wide"))
def test_the_whole_legend_is_in_the_figure(finished):
    """Seven curves in one row of legend are wider than an unfinished run's 7.5-inch figure: the legend then
    takes two rows rather than run off both edges of the image."""
    fig = curves.curves_figure(curves.parse_log(five_step_log(finished)), "20w1s")
    (legend,) = fig.legends
    assert [text.get_text() for text in legend.get_texts()] == [f"val, {s} step{'s' * (s != 1)}" for s in range(6)] + [
        "train, 5 steps"]
    box = legend.get_window_extent()
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width, (box, fig.bbox)


def test_a_comparison_overlays_two_runs_validation():
    reference, run = curves.parse_log(finished_log()), curves.parse_log(unfinished_log())
    img = image(curves.comparison_png([("run", run), ("published", reference)], 3, "run against published"))
    assert img.size == (900, 1020)  # 7.5 x 8.5 inches: the accuracy above, the error below
    assert (31, 119, 180) in {color for _, color in img.getcolors(img.width * img.height)}  # the run's line, "C0"


def csv_rows(text):
    """The rows of a log.csv's text, as run_files.read_log gives them."""
    return list(csv.DictReader(io.StringIO(text)))


HEADER = ",".join(row(0, "val", []).keys())
CELLS = ",".join(row(0, "val", [0.23, 0.28, 0.38, 0.47], [0.02, 0.016, 0.018, 0.022]).values())
BAD_LOGS = {  # case: (log.csv's text, what the one-line ValueError must say)
    "a row with fewer fields": (f"{HEADER}\n{CELLS}\n500,val,0.2\n", "row 2 has fewer fields than the header"),
    "a first row with more fields": (f"{HEADER}\n{CELLS},1\n", "row 1 has more fields than the header"),
    "no split column": (HEADER.replace("split", "kind") + f"\n{CELLS}\n", "the header has no column 'split'"),
    "an interval column missing": (HEADER.replace("ci95_step3", "x") + f"\n{CELLS}\n",
                                   "the header has no column 'ci95_step3'"),
    "no accuracy column": ("iteration,split\n0,val\n", "the header has no column 'acc_step0'"),
    "an unknown split": (f"{HEADER}\n{CELLS.replace('val', 'valid')}\n", "row 1: split is 'valid', not train"),
    "a fractional iteration": (f"{HEADER}\n{CELLS.replace('0,val', '0.5,val', 1)}\n",
                               "row 1: iteration is '0.5', not a whole number"),
    "an accuracy that is no number": (f"{HEADER}\n{CELLS.replace('0.28', 'x')}\n",
                                      "row 1: acc_step1 is 'x', not a fraction from 0 to 1"),
    "an accuracy above 1": (f"{HEADER}\n{CELLS.replace('0.28', '28')}\n", "row 1: acc_step1 is '28', not a fraction"),
    "an interval that is nan": (f"{HEADER}\n{CELLS.replace('0.016', 'nan')}\n", "row 1: ci95_step1 is 'nan'"),
    "no row with an accuracy": (f"{HEADER}\n0,val,,,,,,,,,,1\n500,train,,,,,,,,,0.5,2\n",
                                "no row of the log has an accuracy"),
}


@pytest.mark.parametrize("case", BAD_LOGS)
def test_a_malformed_log_is_one_line_naming_the_problem(case):
    text, message = BAD_LOGS[case]
    with pytest.raises(ValueError) as error:
        curves.curves_png(csv_rows(text), "bad")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_error_labels_have_two_significant_digits():
    assert [curves.percent(e) for e in (79.8, 16.4, 1.43, 0.967, 0)] == ["80", "16", "1.4", "0.97", "0"]


def test_curves_does_not_import_pyplot():
    """pyplot selects a backend and keeps global state; curves.py draws through Figure alone, also when it
    draws, so that importing it changes nothing for the rest of the program."""
    code = ("import sys, curves; curves.curves_png([{'iteration': '0', 'split': 'val', 'acc_step0': '0.2', "
            "'ci95_step0': '0.02', 'loss': '', 'elapsed_s': '1'}], 't'); "
            "assert 'matplotlib.pyplot' not in sys.modules, 'curves imported matplotlib.pyplot'")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
