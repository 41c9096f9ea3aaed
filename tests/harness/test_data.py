"""The corpus, byte tokens and batches."""

from pathlib import Path

import pytest
import torch

from ffn.harness import data as textdata

def test_data_split_batches_and_unigram_entropy(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"ab" * 500)
    data = textdata.TextData(path)
    assert len(data.train) == 900 and len(data.val) == 100
    assert textdata.unigram_entropy(data.val) == pytest.approx(torch.log(torch.tensor(2.0)).item())
    first = textdata.batch_offsets(900, 16, 4, seed=3, step=7)
    assert torch.equal(first, textdata.batch_offsets(900, 16, 4, seed=3, step=7))
    assert not torch.equal(first, textdata.batch_offsets(900, 16, 4, seed=3, step=8))
    x, y = textdata.get_batch(data.train, first, 16, "cpu")
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert textdata.decode(textdata.encode("héllo")) == "héllo"
    with pytest.raises(ValueError, match="seq_len"):
        data.check_seq_len(200)


def test_data_dir_does_not_depend_on_where_the_package_is_installed(monkeypatch, tmp_path):
    monkeypatch.setenv("FFN_DATA_DIR", str(tmp_path / "mine"))
    assert textdata.default_data_dir() == tmp_path / "mine"
    monkeypatch.delenv("FFN_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert textdata.default_data_dir() == tmp_path / "cache" / "ffn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert textdata.default_data_dir() == Path.home() / ".cache" / "ffn"
