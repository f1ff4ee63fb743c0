import pytest
import torch

from optimum_msp.data import (
    calibration_windows, evaluation_windows, load_text, locate_windows, sample_starts, take_windows,
)
from optimum_msp.utils import local_data_dir
from tiny_models import CharTokenizer


def test_windows_are_seeded_and_in_range():
    a = sample_starts(1000, 8, 64, seed=0)
    assert a == sample_starts(1000, 8, 64, seed=0)
    assert a != sample_starts(1000, 8, 64, seed=1)
    assert all(0 <= s <= 1000 - 64 for s in a)


def test_disjoint_windows_avoid_excluded_ones():
    calibration = sample_starts(10_000, 8, 100, seed=0)
    fitness = sample_starts(10_000, 8, 50, seed=1, exclude=[(c, 100) for c in calibration])
    for f in fitness:
        assert all(f + 50 <= c or c + 100 <= f for c in calibration)
    assert all(abs(a - b) >= 50 for i, a in enumerate(fitness) for b in fitness[i + 1:])


def test_locate_windows_finds_the_rows_of_the_text_and_only_those():
    ids = torch.randint(0, 50, (1, 5_000), generator=torch.Generator().manual_seed(0))
    starts = sample_starts(5_000, 6, 300, seed=3)
    foreign = torch.randint(50, 60, (1, 300))  # tokens the text never has
    windows = torch.cat([take_windows(ids, starts, 300), foreign])
    assert sorted(locate_windows(ids, windows)) == sorted((start, 300) for start in starts)
    assert locate_windows(ids[:, :100], windows) == []  # text shorter than a window


def test_text_shorter_than_one_window_is_an_error(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("too short\n")
    with pytest.raises(ValueError, match="shorter than one window"):
        calibration_windows(CharTokenizer(), str(path), num_samples=2, seqlen=64)


def test_local_text_and_jsonl_files(tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("line one\nline two\n\nline four\n")
    assert load_text(str(txt)) == "line one\nline two\n\nline four"
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert load_text(str(jsonl)) == "a\n\nb"
    windows = calibration_windows(CharTokenizer(), str(txt), num_samples=3, seqlen=5, seed=0)
    assert windows.shape == (3, 5)


def test_unknown_dataset_and_missing_file():
    with pytest.raises(ValueError, match="Unknown dataset"):
        load_text("imagenet")
    with pytest.raises(FileNotFoundError):
        load_text("/nonexistent/corpus.txt")


def test_evaluation_windows_drop_remainder():
    ids = torch.arange(105).unsqueeze(0)
    windows = evaluation_windows(ids, 10)
    assert windows.shape == (10, 10) and windows[-1, -1] == 99
    assert evaluation_windows(ids, 10, max_windows=3).shape == (3, 10)
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluation_windows(ids, 200)


@pytest.mark.skipif(local_data_dir() is None, reason="no local data folder (../shared/data)")
def test_local_wikitext_is_the_raw_file():
    text = load_text("wikitext2", "test")
    raw = (local_data_dir() / "wikitext-2-raw" / "wiki.test.raw").read_text()
    assert text == raw.rstrip("\n") or text == raw


def test_data_dir_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("OPTIMUM_MSP_DATA_DIR", str(tmp_path))
    assert local_data_dir() == tmp_path
    monkeypatch.setenv("OPTIMUM_MSP_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="OPTIMUM_MSP_DATA_DIR"):
        local_data_dir()


def test_data_dir_is_never_guessed_from_where_the_library_runs(monkeypatch, tmp_path):
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # ../shared/data exists from here
    monkeypatch.delenv("OPTIMUM_MSP_DATA_DIR", raising=False)
    assert local_data_dir() is None


# ------------------------------------------------------------------------------- bad files are named, with the fix
@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"", "is empty"),
    ("blank.txt", b"\n \n", "is empty"),
    ("random.txt", bytes(range(256)) * 4, "NUL bytes.*binary"),
    ("latin1.txt", "caf\u00e9 na\u00efve\n".encode("latin-1"), r"not UTF-8 text \(byte 3, line 1.*iconv"),
    ("malformed.jsonl", b'{"text": "a"}\n{broken\n', r"line 2: not valid JSON"),
    ("no_text.jsonl", b'{"text": "a"}\n{"other": "b"}\n', r"line 2: no \"text\" field \(fields: \['other'\]\)"),
    ("number.jsonl", b'{"text": "a"}\n{"text": 5}\n', r"line 2: \"text\" must be a string, got int"),
    ("list.jsonl", b'["a"]\n', r"expected a JSON object"),
    ("empty.jsonl", b"", "is empty"),
])
def test_bad_local_files_are_a_value_error_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as caught:
        load_text(str(path))
    assert str(path) in str(caught.value)


def test_local_files_read_as_datasets_reads_them(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"one\r\ntwo\rthree\n\nfive\n")
    assert load_text(str(path)) == "one\ntwo\nthree\n\nfive"
    array = tmp_path / "rows.json"
    array.write_text('[{"text": "a"}, {"text": "b"}]')
    assert load_text(str(array)) == "a\n\nb"


def test_more_windows_than_distinct_starts_is_an_error():
    assert len(sample_starts(100, 36, 64, seed=0)) == 36  # 36 distinct starts: still possible
    with pytest.raises(ValueError, match=r"37 windows of 64 tokens.*only 36 distinct window starts"):
        sample_starts(100, 37, 64, seed=0)


def test_evaluation_windows_refuse_seqlen_zero():
    with pytest.raises(ValueError, match="seqlen"):
        evaluation_windows(torch.zeros(1, 10, dtype=torch.long), 0)
