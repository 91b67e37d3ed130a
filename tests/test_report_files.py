import json

from adadecode_fx import report_files
from adadecode_fx.bench import report as bench_report
from adadecode_fx.heads import evaluation


def _never_plot(rep, path):
    raise AssertionError("plot must not be called without matplotlib")


def test_without_matplotlib_the_json_is_written_and_one_line_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report_files, "have_matplotlib", lambda: False)
    rep = {"methods": [], "x": 1}
    report_files.write_report(rep, tmp_path / "sub" / "r.json", tmp_path / "r.png", plot=_never_plot)
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == rep
    assert not (tmp_path / "r.png").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matplotlib" in err[0] and "adadecode-fx[bench]" in err[0]


def test_bench_and_eval_reports_share_the_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(report_files, "have_matplotlib", lambda: False)
    for mod in (bench_report, evaluation):
        mod.write({"k": mod.__name__}, tmp_path / f"{mod.__name__}.json", tmp_path / "p.png")
        assert json.loads((tmp_path / f"{mod.__name__}.json").read_text()) == {"k": mod.__name__}


def test_with_matplotlib_the_plot_is_written(tmp_path):
    seen = []
    report_files.write_report({"a": 1}, None, tmp_path / "d" / "p.png", plot=lambda rep, path: seen.append(path))
    assert seen == [tmp_path / "d" / "p.png"] and (tmp_path / "d").is_dir()


def test_a_json_path_that_fails_at_the_end_keeps_the_report_elsewhere(tmp_path):
    import pytest
    from adadecode_fx import AdaDecodeError

    (tmp_path / "a_file").write_text("x")
    rep = {"methods": [], "tok_s": 12.5}
    with pytest.raises(AdaDecodeError, match="saved to") as e:
        report_files.write_report(rep, tmp_path / "a_file" / "r.json", None, plot=_never_plot)
    saved = str(e.value).split("saved to ")[1].split(" instead")[0]
    assert json.loads(open(saved).read()) == rep
