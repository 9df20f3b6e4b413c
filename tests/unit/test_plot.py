"""`python -m sa_train plot`: loss curves from CSVLogger runs."""

from __future__ import annotations

from pathlib import Path

from sa_train.checkpoint import RESUMED_FROM
from sa_train.cli import main
from sa_train.tools.plot import moving_average, read_history, read_metrics


def write_run(folder, losses, val):
    folder.mkdir(parents=True)
    lines = ["epoch,step,train/loss,train/lr,val/loss"]
    lines += [f"0,{step},{loss},0.001," for step, loss in enumerate(losses)]
    lines += [f"0,{step},,,{loss}" for step, loss in val]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_moving_average_is_a_trailing_mean():
    assert moving_average([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([2.0, 4.0], window=5) == [2.0, 3.0]


def test_plot_writes_a_png_of_every_run(tmp_path, capsys):
    write_run(tmp_path / "sa" / "version_0", [8.0, 7.0, 6.5, 6.0], [(3, 6.2)])
    write_run(tmp_path / "dense" / "version_0", [8.0, 7.2, 6.6, 6.1], [(3, 6.3)])
    assert read_metrics(tmp_path / "sa" / "version_0")["val/loss"] == [(3, 6.2)]
    out = tmp_path / "plots" / "loss.png"
    assert (
        main(
            [
                "plot",
                str(tmp_path / "sa" / "version_0"),
                str(tmp_path / "dense" / "version_0"),
                "--out",
                str(out),
                "--smooth",
                "2",
            ]
        )
        == 0
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_folder_without_metrics_is_a_clear_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.csv" in capsys.readouterr().err


def test_runs_of_one_name_keep_their_own_labels(tmp_path, monkeypatch):
    """A resume writes version_1 beside version_0: both are drawn, told apart by their shortest suffix."""
    from sa_train.tools import plot

    for version in (0, 1):
        write_run(tmp_path / "runs" / "dense-tiny" / f"version_{version}", [8.0, 7.0], [])
    write_run(tmp_path / "runs" / "sa-tiny" / "version_0", [8.0, 7.0], [])
    write_run(tmp_path / "other" / "sa-tiny" / "version_0", [8.0, 7.0], [])
    monkeypatch.chdir(tmp_path)
    runs = [
        Path("runs/dense-tiny/version_0"),
        Path("runs/dense-tiny/version_1"),
        Path("runs/sa-tiny/version_0"),
    ]
    assert plot.run_labels(runs) == ["dense-tiny/version_0", "dense-tiny/version_1", "sa-tiny"]
    runs = [Path("runs/sa-tiny/version_0"), Path("other/sa-tiny/version_0/metrics.csv")]
    assert plot.run_labels(runs) == ["runs/sa-tiny/version_0", "other/sa-tiny/version_0"]

    drawn = []
    monkeypatch.setattr(plot, "moving_average", lambda values, window: drawn.append(values) or values)
    plot.plot_loss([Path("runs/dense-tiny/version_0"), Path("runs/dense-tiny/version_1")], tmp_path / "l.png")
    assert len(drawn) == 2


def test_a_run_given_twice_is_a_clear_error(tmp_path, capsys):
    write_run(tmp_path / "sa" / "version_0", [8.0, 7.0], [])
    run = tmp_path / "sa" / "version_0"
    assert main(["plot", str(run), str(run / ".." / "version_0")]) == 2
    assert "given twice" in capsys.readouterr().err


def test_a_resumed_run_reads_as_one_run_through_its_link(tmp_path):
    """The killed part logged steps 0-7 and was checkpointed at step 5; the resumed part trained 6-8 again."""
    write_run(tmp_path / "r" / "version_0", [8.0, 7.0, 6.5, 6.0, 5.8, 5.6, 9.9, 9.9], [(3, 6.2)])
    resumed = tmp_path / "r" / "version_1"
    resumed.mkdir()
    rows = ["epoch,step,train/loss,train/lr,val/loss", "0,6,5.5,0.001,", "0,7,5.4,0.001,"]
    rows.append("0,8,5.3,0.001,5.35")
    (resumed / "metrics.csv").write_text("\n".join(rows) + "\n")
    (resumed / RESUMED_FROM).symlink_to("../version_0", target_is_directory=True)
    history = read_history(resumed)
    assert [value for _, value in history["train/loss"]] == [8.0, 7.0, 6.5, 6.0, 5.8, 5.6, 5.5, 5.4, 5.3]
    assert history["val/loss"] == [(3, 6.2), (8, 5.35)]
    assert read_history(tmp_path / "r" / "version_0")["train/loss"][-1] == (7, 9.9)  # the link is one-way
