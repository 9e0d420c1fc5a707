"""Tasks read Hugging Face datasets (finegrain.tasks.hf_data): local datasets made here, offline.

Every dataset is built in tmp_path; the datasets cache is redirected to tmp_path too, and the
network is never used (HF_HUB_OFFLINE is set by tests/conftest.py, and sockets are refused).
"""

import json
import socket
import sys

import pytest

datasets = pytest.importorskip("datasets")

from finegrain.tasks import hf_data  # noqa: E402
from finegrain.tasks.gsm8k import GSM8KTask  # noqa: E402

TRAIN = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A box holds 12 eggs. How many eggs are in 5 boxes?",
     "answer": "5 * 12 = <<5*12=60>>60 eggs.\n#### 60"},
]
TEST = [{"question": "Ann earns $1,200 a week for 2 weeks. How much does she earn?",
         "answer": "2 * 1200 = <<2*1200=2400>>2400\n#### 2,400"}]


def renamed(rows):
    """The same rows with the columns a MATH-style dataset would use."""
    return [{"problem": r["question"], "solution": r["answer"], "level": 1} for r in rows]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """The datasets cache in tmp_path, and any network connection attempt recorded and refused."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield attempts
    assert attempts == [], f"tried to connect to {attempts}"


def check_gsm8k_examples(task):
    train, test = task.examples("train"), task.examples("test")
    assert [e.answer for e in train] == ["7", "60"] and [e.answer for e in test] == ["2400"]
    assert [e.id for e in train] == ["gsm8k-train-00000", "gsm8k-train-00001"]
    assert train[0].prompt == TRAIN[0]["question"]
    assert train[0].solution == "He has 3 + 4 = 7 apples.\n#### 7"
    assert train[1].meta["row"] == 1
    assert task.verify(train[0], train[0].solution) == 1.0
    assert task.verify(train[0], "He has 3 + 4 = 8 apples.\n#### 8") == 0.0
    assert task.verify(test[0], "She earns $2,400 in total.") == 1.0
    assert task.label_steps(train[0], "3 + 4 = 8\n#### 8").labels == [0, -1]


def test_save_to_disk_dataset_dict(tmp_path):
    path = tmp_path / "gsm8k_dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(TRAIN),
                          "test": datasets.Dataset.from_list(TEST)}).save_to_disk(str(path))
    check_gsm8k_examples(GSM8KTask(dataset=str(path)))


def test_save_to_disk_single_dataset_is_one_split(tmp_path):
    path = tmp_path / "only_test"
    datasets.Dataset.from_list(renamed(TEST), split="test").save_to_disk(str(path))
    task = GSM8KTask(dataset=str(path), question_field="problem", answer_field="solution")
    assert [e.answer for e in task.examples("test")] == ["2400"]
    with pytest.raises(ValueError) as err:
        task.examples("train")
    assert str(err.value) == f"task.kwargs.train_split: no split 'train' in {path}; splits: test"
    # without a split name of its own, a single Dataset is 'train'
    unnamed = tmp_path / "unnamed"
    datasets.Dataset.from_list(TRAIN).save_to_disk(str(unnamed))
    assert [e.answer for e in GSM8KTask(dataset=str(unnamed)).examples("train")] == ["7", "60"]


def test_jsonl_directory_with_renamed_columns_and_splits(tmp_path):
    folder = tmp_path / "math_style"
    folder.mkdir()
    for name, rows in (("train", TRAIN), ("validation", TEST)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in renamed(rows)))
    task = GSM8KTask(dataset=str(folder), question_field="problem", answer_field="solution",
                     test_split="validation")
    check_gsm8k_examples(task)


def test_single_parquet_and_csv_files(tmp_path):
    parquet = tmp_path / "train.parquet"
    datasets.Dataset.from_list(renamed(TRAIN)).to_parquet(str(parquet))
    task = GSM8KTask(dataset=str(parquet), question_field="problem", answer_field="solution")
    assert [e.answer for e in task.examples("train")] == ["7", "60"]
    csv = tmp_path / "bare.csv"
    csv.write_text('question,answer\n"How many legs do 2 cats have?","8"\n')
    (example,) = GSM8KTask(dataset=str(csv)).examples("train")
    assert (example.answer, example.solution) == ("8", "")  # a bare-number answer
    assert GSM8KTask(dataset=str(csv)).verify(example, "Two cats have eight legs. #### 8") == 1.0


@pytest.mark.parametrize("source", ["{tmp}/no_such_dir", "./no_such_dir_fg", "../no_such_dir_fg",
                                    "~/no_such_dir_fg_1234", "{tmp}/missing.jsonl",
                                    "{tmp}/sub/also_missing"])
def test_missing_path_is_an_error_and_never_the_hub(tmp_path, monkeypatch, source):
    def no_loading(*args, **kwargs):
        raise AssertionError("datasets was asked to load a path that does not exist")

    monkeypatch.setattr(datasets, "load_dataset", no_loading)
    monkeypatch.setattr(datasets, "load_from_disk", no_loading)
    (tmp_path / "sub").mkdir()
    task = GSM8KTask(dataset=source.format(tmp=tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        task.examples("train")
    msg = str(err.value)
    assert msg.startswith("task.kwargs.dataset: ") and msg.endswith(": no such file or directory")
    assert "no_such" in msg or "missing" in msg
    assert "\n" not in msg


def test_missing_field_names_the_kwarg_and_the_columns(tmp_path):
    path = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(renamed(TRAIN))}).save_to_disk(str(path))
    task = GSM8KTask(dataset=str(path), question_field="problem", answer_field="answer")
    with pytest.raises(ValueError) as err:
        task.examples("train")
    assert str(err.value) == (f"task.kwargs.answer_field: no column 'answer' in {path} (split "
                              f"'train'); columns: problem, solution, level")


def test_non_string_answer_names_the_row(tmp_path):
    path = tmp_path / "dd"
    rows = [{"q": "fine", "a": "#### 1"}, {"q": "bad", "a": None}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    with pytest.raises(ValueError) as err:
        GSM8KTask(dataset=str(path), question_field="q", answer_field="a").examples("train")
    assert str(err.value) == f"gsm8k: {path} [train] row 1: missing or non-string field 'a'"


def test_hub_name_not_cached_offline_is_one_line_and_no_network(monkeypatch, isolated):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    before = datasets.config.HF_HUB_OFFLINE
    task = GSM8KTask(dataset="finegrain-tests/no-such-dataset", dataset_config="main")
    with pytest.raises(ValueError) as err:
        task.examples("test")
    msg = str(err.value)
    assert msg.startswith("task.kwargs.dataset: 'finegrain-tests/no-such-dataset' is not in the "
                          "local datasets cache and offline mode is on")
    assert "\n" not in msg
    assert datasets.config.HF_HUB_OFFLINE == before  # the forced offline mode is undone
    assert isolated == []


def test_offline_is_forced_even_if_datasets_was_imported_online(monkeypatch, isolated):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen = {}

    def fake_load_dataset(path, name=None, **kwargs):
        seen["offline"] = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
        raise ConnectionError("Couldn't reach the Hub\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(ValueError) as err:
        GSM8KTask(dataset="someone/some-dataset").examples("train")
    assert seen["offline"] == (True, True)
    assert (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE) == (False, False)
    assert str(err.value).endswith("(Couldn't reach the Hub)")


def test_missing_datasets_package_gives_the_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # 'import datasets' raises ImportError
    with pytest.raises(ImportError) as err:
        GSM8KTask(dataset=str(tmp_path)).examples("train")
    assert "pip install 'finegrain[datasets]'" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("ON", True),
                                             ("0", False), ("", False), ("no", False)])
def test_offline_flag(monkeypatch, value, expected):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", value)
    assert hf_data.offline() is expected


def test_looks_like_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert hf_data.looks_like_path("data/gsm8k")        # its parent exists
    assert hf_data.looks_like_path("data")              # it exists
    assert hf_data.looks_like_path("x/train.jsonl")     # a data file name
    assert not hf_data.looks_like_path("openai/gsm8k")  # a Hub name
    assert not hf_data.looks_like_path("gsm8k")
