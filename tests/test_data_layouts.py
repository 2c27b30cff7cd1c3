"""The data layouts users already have on disk: each loads exactly what the canonical layout of
the same content gives, and each refusal is one line (ValueError) naming the file or flag expected.

images: the extracted CIFAR-10 folder (and torchvision's root= above it) == the .tar.gz; ImageNet's
validation/ synonym, a flat val/ labelled by Kaggle's LOC_val_solution.csv (in PATH, PATH/val or
Kaggle's download root) or by a val_labels.txt == val/<class>/; `python -m data.images --sort-val`.
text: the WikiText zips (tokenised → word level, ppl; raw → byte level, bpb), their extracted
folders and Hugging Face's parquet layout (when pyarrow is installed), named after what they hold,
with word-id caches that never stand in for another corpus.  One end-to-end run per script."""
import json
import os
import pickle
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import train_lm
import train_vit
import training
from data import images, text
from test_data_images import _Evil, cifar_archive, image_bytes

CPU = training.Runtime(device=torch.device("cpu"))


def one_line_error(fn, *args, match: str):
    """fn(*args) raises a one-line ValueError whose text holds every `|`-separated part of match."""
    with pytest.raises(ValueError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for part in match.split("|"):
        assert part in msg, msg
    return msg


# ==============================================================================================
# CIFAR-10: the extracted archive
# ==============================================================================================
@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    d = tmp_path_factory.mktemp("cifar")
    tgz = cifar_archive(d / "cifar-10-python.tar.gz")
    root = d / "torchvision-root"                   # what torchvision's root= holds after download=True
    with tarfile.open(tgz) as tar:
        tar.extractall(root, filter="data")
    return tgz, root


def test_extracted_cifar_folder_loads_exactly_the_archive(cifar, tmp_path):
    tgz, root = cifar
    want = images.load_data(str(tgz), tmp_path)
    for given in (root / "cifar-10-batches-py", root):
        got = images.load_data(str(given), tmp_path)
        assert isinstance(got, images.ArrayData) and got.name == "cifar10" and got.classes == want.classes
        for k in ("train_x", "train_y", "val_x", "val_y"):
            assert np.array_equal(getattr(got, k), getattr(want, k)) and getattr(got, k).dtype == getattr(want, k).dtype
    assert want.classes[0] == "airplane" and want.train_x.shape == (30, 3, 32, 32)
    # torchvision's root= holding only the downloaded archive reads the archive
    only = tmp_path / "root-before-extraction"
    only.mkdir()
    shutil.copy(tgz, only / "cifar-10-python.tar.gz")
    assert np.array_equal(images.load_data(str(only), tmp_path).val_x, want.val_x)


def test_extracted_cifar_folder_refusals(cifar, tmp_path):
    _, root = cifar
    partial = tmp_path / "cifar-10-batches-py"
    shutil.copytree(root / "cifar-10-batches-py", partial)
    (partial / "test_batch").unlink()
    one_line_error(images.load_data, str(partial), tmp_path, match="has no test_batch|data_batch_1")
    # the same restricted unpickler as the archive's: a pickle that would run code is refused
    (partial / "test_batch").write_bytes(pickle.dumps({"data": _Evil()}, protocol=2))
    one_line_error(images.load_data, str(partial), tmp_path, match="never does")
    # a folder that is neither layout: the sentence names both
    (tmp_path / "other").mkdir()
    one_line_error(images.load_data, str(tmp_path / "other"), tmp_path, match="train is missing|cifar-10-batches-py")


def test_train_vit_runs_on_the_extracted_cifar_folder(cifar, tmp_path):
    _, root = cifar
    out = tmp_path / "run"
    tiny = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--mlp-ratio", "2", "--batch-size", "8",
            "--warmup", "0", "--eval-images", "16", "--probe-batch", "2", "--device", "cpu", "--patch-size", "8"]
    assert training.run_cli(train_vit.main, [*tiny, "--data", str(root), "--out", str(out), "--steps", "1"]) == 0
    assert json.loads((out / "summary.json").read_text())["classes"][9] == "truck"


# ==============================================================================================
# ImageNet-style folders: validation/, a flat val/ with a label file, --sort-val
# ==============================================================================================
WNIDS = {"n01440764": (220, 30, 40), "n01443537": (30, 40, 220)}     # Kaggle's classes are WordNet ids


def _val_name(c, i):
    return f"ILSVRC2012_val_{list(WNIDS).index(c) * 10 + i + 1:08d}.JPEG"


@pytest.fixture(scope="module")
def nested(tmp_path_factory):
    """The canonical layout: train/<wnid>/*.JPEG, val/<wnid>/ILSVRC2012_val_*.JPEG."""
    root = tmp_path_factory.mktemp("imagenet") / "nested"
    for c, rgb in WNIDS.items():
        for split, n in (("train", 2), ("val", 2)):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                name = f"{c}_{i}.JPEG" if split == "train" else _val_name(c, i)
                (root / split / c / name).write_bytes(image_bytes(rgb, size=(24 + 4 * i, 20)))
    return root


def flat_copy(nested: Path, root: Path) -> Path:
    """The same images with val/ flat, as ImageNet's and Kaggle's validation sets come."""
    shutil.copytree(nested / "train", root / "train")
    (root / "val").mkdir()
    for f in (nested / "val").glob("*/*.JPEG"):
        shutil.copy(f, root / "val" / f.name)
    return root


def kaggle_csv(path: Path) -> Path:
    """Kaggle's format: ImageId (no extension), PredictionString = (wnid x0 y0 x1 y1) per box, rows
    in no particular order."""
    rows = [f"{_val_name(c, i)[:-5]},{c} 1 2 20 18 {c} 3 3 10 10 " for c in WNIDS for i in range(2)]
    path.write_text("\n".join(["ImageId,PredictionString"] + rows[::-1]) + "\n")
    return path


def same_folder_data(got, want):
    key = lambda items: [(Path(p).name, y) for p, y in items]
    assert got.classes == want.classes and key(got.train) == key(want.train) and key(got.val) == key(want.val)


def test_imagenet_layouts_load_what_the_nested_folder_gives(nested, tmp_path):
    want = images.load_data(str(nested), Path("unused"))
    assert want.classes == list(WNIDS) and want.n_val == 4
    # validation/ is val/
    syn = tmp_path / "syn"
    shutil.copytree(nested / "train", syn / "train")
    shutil.copytree(nested / "val", syn / "validation")
    same_folder_data(images.load_data(str(syn), Path("unused")), want)
    # flat val/ + Kaggle's LOC_val_solution.csv in PATH, in PATH/val, and at Kaggle's download root
    for where in ("root", "val", "kaggle"):
        base = tmp_path / f"k-{where}"
        root = flat_copy(nested, base / "ILSVRC" / "Data" / "CLS-LOC" if where == "kaggle" else base)
        kaggle_csv({"root": root, "val": root / "val", "kaggle": base}[where] / "LOC_val_solution.csv")
        got = images.load_data(str(root), Path("unused"))
        same_folder_data(got, want)
    # flat val/ + a two-column val_labels.txt (header, paths and extensions optional, tab-separated)
    root = flat_copy(nested, tmp_path / "simple")
    lines = ["filename\tlabel"] + [f"val/{_val_name(c, i)}\t{c}" if i else f"{_val_name(c, i)[:-5]}\t{c}"
                                   for c in WNIDS for i in range(2)]
    (root / "val_labels.txt").write_text("\n".join(lines) + "\n")
    got = images.load_data(str(root), Path("unused"))
    same_folder_data(got, want)
    # ... and the pixels the model sees are those of the nested folder
    cfg = dict(image_size=16, seed=0)
    (xa, ya, _), = images.eval_batches(got, "val", cfg, CPU, 8, 0, 0)
    (xb, yb, _), = images.eval_batches(want, "val", cfg, CPU, 8, 0, 0)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_flat_val_refusals_name_the_file_expected(nested, tmp_path):
    root = flat_copy(nested, tmp_path / "flat")
    msg = one_line_error(images.load_data, str(root), Path("unused"),
                         match="LOC_val_solution.csv|val_labels.txt|--sort-val|val/<class>/")
    assert "4 images" in msg
    (root / "val_labels.csv").write_text(f"{_val_name('n01440764', 0)},n01440764\n")
    one_line_error(images.load_data, str(root), Path("unused"), match="gives no class for|val_labels.csv")
    (root / "val_labels.csv").write_text("\n".join(f"{_val_name(c, i)},tench" for c in WNIDS for i in range(2)))
    one_line_error(images.load_data, str(root), Path("unused"), match="'tench'|has no folder in")
    (root / "val_labels.csv").write_text("just-one-column\n")
    one_line_error(images.load_data, str(root), Path("unused"), match="line 1 is not `file,class`")


def test_sort_val_moves_every_file_into_its_class_or_none(nested, tmp_path, capsys):
    want = images.load_data(str(nested), Path("unused"))
    root = flat_copy(nested, tmp_path / "tosort")
    labels = kaggle_csv(tmp_path / "LOC_val_solution.csv")
    # a target that already exists (another file): refused, nothing moved
    clash = root / "val" / "n01443537" / _val_name("n01443537", 1)
    clash.parent.mkdir()
    clash.write_bytes(b"another file")
    argv = ["--sort-val", str(root), "--labels", str(labels)]
    assert training.run_cli(images.main, argv) == 2
    err = capsys.readouterr().err
    assert "already exists: nothing was moved" in err and err.count("\n") == 1
    assert len(list((root / "val").glob("*.JPEG"))) == 4
    clash.unlink()
    # an interrupted sort (one file hard-linked, not yet unlinked) is finished by the rerun
    first = root / "val" / _val_name("n01440764", 0)
    (root / "val" / "n01440764").mkdir()
    os.link(first, root / "val" / "n01440764" / first.name)
    assert training.run_cli(images.main, argv) == 0
    assert "moved 4 images" in capsys.readouterr().out
    assert not list((root / "val").glob("*.JPEG"))
    same_folder_data(images.load_data(str(root), Path("unused")), want)
    # without --labels the file is found as train_vit finds it (here: beside PATH); a rerun moves nothing
    assert training.run_cli(images.main, ["--sort-val", str(root)]) == 0
    assert "moved 0 images" in capsys.readouterr().out
    lone = flat_copy(nested, tmp_path / "a" / "b" / "c" / "lone")       # no label file within reach
    assert training.run_cli(images.main, ["--sort-val", str(lone)]) == 2
    assert "pass --labels" in capsys.readouterr().err


# ==============================================================================================
# WikiText: zips, extracted folders, Hugging Face parquet; names, metrics and caches
# ==============================================================================================
RAW = {"train": " \n = Valkyria Chronicles III = \n \n Senjō no Valkyria 3, the game, began in 2010. \n"
                " It's the third game in the series; a tactical role-playing game. \n" * 20,
       "valid": " \n = Tower Building of the Little Rock Arsenal = \n \n The tower is a building. \n" * 2,
       "test": " \n = Robert Boulter = \n \n Robert Boulter is an English film actor. \n" * 2}
TOK = {"train": " \n = Valkyria Chronicles III = \n \n Senjō no <unk> 3 , the game , began in 2010 . \n"
                " It 's the third game in the series ; a tactical role @-@ playing game . \n" * 20,
       "valid": " \n = Tower Building of the Little Rock <unk> = \n \n The tower is a building . \n" * 2,
       "test": " \n = Robert <unk> = \n \n Robert <unk> is an English film actor . \n" * 2}


def wiki_zip(path: Path, folder: str, content: dict, ext: str) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for split, body in content.items():
            z.writestr(f"{folder}/wiki.{split}.{ext}", body.encode("utf-8"))
    return path


def hf_parquet(folder: Path, content: dict) -> Path:
    """Hugging Face's layout: a row per line of the file, a blank line stored as "" (their
    script's rule), the train split in two shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder.mkdir(parents=True)
    for split, hf in (("train", "train"), ("valid", "validation"), ("test", "test")):
        rows = [line if line.strip() else "" for line in content[split].splitlines(keepends=True)]
        shards = [rows[: len(rows) // 2], rows[len(rows) // 2:]] if split == "train" else [rows]
        for k, part in enumerate(shards):
            pq.write_table(pa.table({"text": part}), folder / f"{hf}-{k:05d}-of-{len(shards):05d}.parquet")
    return folder


def same_corpus(got, want):
    assert (got.name, got.metric, got.vocab_size, got.itos) == (want.name, want.metric, want.vocab_size, want.itos)
    for k in ("train", "val", "test"):
        assert np.array_equal(getattr(got, k), getattr(want, k)) and getattr(got, k).dtype == getattr(want, k).dtype


def test_raw_wikitext_zips_are_byte_level_with_their_own_splits(tmp_path):
    for fname, folder, name in (("wikitext-103-raw-v1.zip", "wikitext-103-raw", "wikitext103-raw"),
                                ("wikitext-2-raw-v1.zip", "wikitext-2-raw", "wikitext2-raw")):
        c = text.load_corpus(str(wiki_zip(tmp_path / fname, folder, RAW, "raw")), tmp_path / "cache")
        assert (c.name, c.metric, c.vocab_size) == (name, "bpb", 256)
        assert [bytes(c.train), bytes(c.val), bytes(c.test)] == [RAW[s].encode("utf-8") for s in ("train", "valid", "test")]
        assert c.score(np.log(2)) == pytest.approx(1.0)                 # bits per byte
    assert not (tmp_path / "cache").exists()                            # bytes need no cache


def test_names_follow_the_release_read_and_caches_never_cross(tmp_path):
    cache = tmp_path / "cache"
    wt2 = text.load_corpus(str(wiki_zip(tmp_path / "wikitext-2-v1.zip", "wikitext-2", TOK, "tokens")), cache)
    wt103 = text.load_corpus(str(wiki_zip(tmp_path / "wikitext-103-v1.zip", "wikitext-103", TOK, "tokens")), cache)
    assert (wt2.name, wt2.metric, wt103.name, wt103.metric) == ("wikitext2", "ppl", "wikitext103", "ppl")
    assert np.array_equal(wt2.train, wt103.train) and wt2.itos[0] == "<eos>" and "<unk>" in wt2.itos
    files = sorted(os.listdir(cache))
    assert len(files) == 2 and files[0].startswith("wikitext103-") and files[1].startswith("wikitext2-")
    # the member folders name the release, not the zip's file name
    renamed = text.load_corpus(str(wiki_zip(tmp_path / "wikitext-103-v1-copy.zip", "wikitext-2", TOK, "tokens")), cache)
    assert renamed.name == "wikitext2"
    # a cache file holding another corpus's ids is not reused: wikitext2's file overwritten by wikitext103's
    os.replace(cache / files[0], cache / files[1])
    again = text.load_corpus(str(tmp_path / "wikitext-2-v1.zip"), cache)
    same_corpus(again, wt2)
    # an unnamed folder: the size of the training text decides (WikiText-103's is ~50× WikiText-2's)
    plain = tmp_path / "mydata"
    plain.mkdir()
    for split, body in TOK.items():
        (plain / f"wiki.{split}.tokens").write_text(body, encoding="utf-8")
    assert text.load_corpus(str(plain), None).name == "wikitext2"
    old = text.WT103_MIN_TRAIN
    try:
        text.WT103_MIN_TRAIN = 1000
        assert text.load_corpus(str(plain), None).name == "wikitext103"
    finally:
        text.WT103_MIN_TRAIN = old


def test_extracted_wikitext_folders_load_as_their_zips(tmp_path):
    for fname, folder, content, ext in (("wikitext-2-v1.zip", "wikitext-2", TOK, "tokens"),
                                        ("wikitext-103-raw-v1.zip", "wikitext-103-raw", RAW, "raw")):
        z = wiki_zip(tmp_path / fname, folder, content, ext)
        want = text.load_corpus(str(z), tmp_path / "cache")
        dest = tmp_path / f"unzipped-{ext}"
        with zipfile.ZipFile(z) as zz:
            zz.extractall(dest)
        for given in (dest, dest / folder):                # the folder unzipped into, or the release's own
            same_corpus(text.load_corpus(str(given), tmp_path / "cache"), want)


def test_wikitext_folder_refusals_are_one_sentence(tmp_path):
    d = tmp_path / "part"
    d.mkdir()
    (d / "wiki.train.raw").write_text(RAW["train"])
    one_line_error(text.load_corpus, str(d), tmp_path, match="has no wiki.valid.raw")
    (d / "wiki.valid.tokens").write_text(TOK["valid"])
    one_line_error(text.load_corpus, str(d), tmp_path, match="both wiki.*.tokens and wiki.*.raw")
    two = tmp_path / "two"
    for sub in ("wikitext-2", "wikitext-103"):
        (two / sub).mkdir(parents=True)
        (two / sub / "wiki.train.tokens").write_text("x")
    one_line_error(text.load_corpus, str(two), tmp_path, match="several WikiText releases|wikitext-103, wikitext-2")
    (tmp_path / "empty").mkdir()
    one_line_error(text.load_corpus, str(tmp_path / "empty"), tmp_path,
                   match="without a WikiText release|wiki.{train,valid,test}.tokens|parquet")
    one_line_error(text.load_corpus, "wikitext2", tmp_path, match="neither a known corpus|wikitext-2-raw-v1.zip")


def test_parquet_without_pyarrow_names_the_package(tmp_path, monkeypatch):
    cfg = tmp_path / "hf" / "wikitext-103-raw-v1"
    cfg.mkdir(parents=True)
    for f in ("train-00000-of-00002.parquet", "train-00001-of-00002.parquet",
              "validation-00000-of-00001.parquet", "test-00000-of-00001.parquet"):
        (cfg / f).write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    one_line_error(text.load_corpus, str(tmp_path / "hf"), tmp_path, match="needs pyarrow|pip install pyarrow")


def test_hugging_face_parquet_loads_as_the_zip_release(tmp_path):
    pytest.importorskip("pyarrow")
    raw_zip = text.load_corpus(str(wiki_zip(tmp_path / "wikitext-103-raw-v1.zip", "wikitext-103-raw", RAW, "raw")), None)
    hub = tmp_path / "hub"                                  # the dataset repository: one folder per config
    hf_parquet(hub / "wikitext-103-raw-v1", RAW)
    same_corpus(text.load_corpus(str(hub), None), raw_zip)
    same_corpus(text.load_corpus(str(hub / "wikitext-103-raw-v1"), None), raw_zip)
    tok_zip = text.load_corpus(str(wiki_zip(tmp_path / "wikitext-2-v1.zip", "wikitext-2", TOK, "tokens")), None)
    hf_parquet(tmp_path / "wikitext-2-v1", TOK)
    same_corpus(text.load_corpus(str(tmp_path / "wikitext-2-v1"), tmp_path / "cache"), tok_zip)
    hf_parquet(hub / "wikitext-2-v1", TOK)                  # two configs: say which to pass
    one_line_error(text.load_corpus, str(hub), None, match="several WikiText releases")


def test_train_lm_runs_on_an_extracted_raw_release_and_reports_bpb(tmp_path, capsys):
    d = tmp_path / "wikitext-2-raw"
    d.mkdir()
    for split, body in RAW.items():
        (d / f"wiki.{split}.raw").write_text(body, encoding="utf-8")
    out = tmp_path / "run"
    tiny = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--seq-len", "16", "--batch-size", "4",
            "--warmup", "0", "--eval-tokens", "64", "--probe-batch", "2", "--device", "cpu"]
    assert training.run_cli(train_lm.main, [*tiny, "--data", str(d), "--out", str(out), "--steps", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "bpb" and np.isfinite(summary["test"]["bpb"])
    assert "wikitext2-raw:" in capsys.readouterr().out
