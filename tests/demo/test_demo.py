"""The demo harness runs every method end to end (tiny configuration) and reports honestly."""
import json

import pytest
import torch

pytest.importorskip("sklearn")

from fisheradaptune.demo import digits, run as demo  # noqa: E402


def test_every_method_runs_and_reports(tmp_path, monkeypatch):
    tiny = digits.Config(pretrain_steps=8, finetune_steps=12, check_every=4, batch=16, dim=32, depth=2)
    monkeypatch.setattr(digits, "QUICK", tiny)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        record = demo.main(["--quick", "--seeds", "2", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    results = record["results"]
    assert set(results) == set(demo.METHODS)
    for method, runs in results.items():
        assert len(runs) == 2
        for r in runs:
            assert 0.0 <= r["id_acc"] <= 1.0 and 0.0 <= r["transfer_acc"] <= 1.0, method
            assert set(r["transfer"]) == {"noise", "blur", "rotate", "invert"}
            assert 0 < r["active_params"] <= record["total_params"] + 10_000, method
    # The linear probe trains only the head; full fine-tuning trains everything.
    assert results["linear probe"][0]["active_params"] < results["full fine-tuning"][0]["active_params"]
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["seeds"] == 2 and (tmp_path / "adaptune_drift.png").exists()
    assert (tmp_path / "transfer_vs_id.png").exists()


def test_unknown_method_is_refused(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--methods", "magic"])
    assert "unknown method" in capsys.readouterr().err


def test_help_prints(capsys):
    # Method names contain "%", which argparse's help formatting would read as a placeholder.
    with pytest.raises(SystemExit) as e:
        demo.main(["--help"])
    assert e.value.code == 0 and "FISH static mask (2%)" in capsys.readouterr().out
