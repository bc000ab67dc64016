"""The ``datasets/prepare_*.py`` scripts on miniature inputs in the real formats, then the datasets
of the paper configs registered on the prepared root (``register_all_up2_datasets``) feeding their
task's mapper; registration reads nothing, and a missing root names the path and the script."""
import builtins
import importlib
import io
import json
import os
import shutil
import sys
import tarfile
import uuid

import numpy as np
import pytest
import scipy.io
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from up2.config import add_up2_config, get_task_entries
from up2.data.datasets import DatasetNotFoundError, register_all_up2_datasets
from up2.data.mappers import build_mapper
from up2.data.shards import ImageTextShards

DATASETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "datasets")
REPO = os.path.dirname(DATASETS_DIR)


def script(name):
    """Imports ``datasets/<name>.py`` (its directory holds the shared ``_prepare_common``)."""
    if DATASETS_DIR not in sys.path:
        sys.path.insert(0, DATASETS_DIR)
    return importlib.import_module(name)


def write_image(path, value=120, h=20, w=24, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, dtype=np.uint8)).save(path, format=fmt)


def make_cfg():
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.DATASETS.UP2.IMAGE_SIZE = 16
    cfg.INPUT.FORMAT = "RGB"
    return cfg


def karpathy_entry(imgid, filename, split, sentences, **extra):
    return {"imgid": imgid, "filename": filename, "split": split, **extra,
            "sentences": [{"raw": raw, "tokens": raw.lower().split(), "sentid": sid, "imgid": imgid}
                          for sid, raw in sentences]}


def prepare_coco_karpathy(root):
    images = []
    for i, (folder, split) in enumerate([("train2014", "train"), ("val2014", "restval"), ("val2014", "val"),
                                         ("val2014", "test"), ("val2014", "test")]):
        cocoid = 10 + i
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        write_image(os.path.join(root, "coco", folder, filename), value=20 * i)
        images.append(karpathy_entry(i, filename, split, [(100 + 2 * i, f"A photo {i} ."), (101 + 2 * i, f"Two {i}")],
                                     filepath=folder, cocoid=cocoid))
    os.makedirs(os.path.join(root, "coco_karpathy"))
    with open(os.path.join(root, "coco_karpathy", "dataset_coco.json"), "w") as f:
        json.dump({"dataset": "coco", "images": images}, f)
    script("prepare_coco_karpathy").main([
        "--karpathy-json", os.path.join(root, "coco_karpathy", "dataset_coco.json"),
        "--coco-root", os.path.join(root, "coco"), "--out", os.path.join(root, "coco_karpathy")])


def prepare_flickr30k(root):
    images = []
    for i, split in enumerate(["train", "val", "test", "test"]):
        filename = f"{1000 + i}.jpg"
        write_image(os.path.join(root, "flickr30k", "flickr30k-images", filename), value=30 * i)
        images.append(karpathy_entry(i, filename, split, [(5 * i + k, f"flickr {i} caption {k}") for k in range(5)]))
    with open(os.path.join(root, "flickr30k", "dataset_flickr30k.json"), "w") as f:
        json.dump({"dataset": "flickr30k", "images": images}, f)
    script("prepare_flickr30k").main(["--karpathy-json", os.path.join(root, "flickr30k", "dataset_flickr30k.json"),
                                      "--out", os.path.join(root, "flickr30k")])


SYNSETS = [(1, "n00000003", "crane", 0), (2, "n00000001", "crane", 0), (3, "n00000002", "tench, Tinca tinca", 0),
           (4, "n00000009", "animal, beast", 2)]  # ids 1-3 are leaves (classes); 4 is an inner node
VAL_GROUND_TRUTH = [3, 1, 2, 3]  # ILSVRC2012_ID of validation images 1..4


def write_devkit(directory):
    data = os.path.join(directory, "ILSVRC2012_devkit_t12", "data")
    os.makedirs(data)
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    scipy.io.savemat(os.path.join(data, "meta.mat"), {"synsets": np.array(SYNSETS, dtype=dtype)})
    with open(os.path.join(data, "ILSVRC2012_validation_ground_truth.txt"), "w") as f:
        f.write("".join(f"{i}\n" for i in VAL_GROUND_TRUTH))


def write_train_tar(path, per_class):
    """A tar of per-class tars, as ILSVRC2012_img_train.tar."""
    with tarfile.open(path, "w") as outer:
        for wnid, count in per_class.items():
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for j in range(count):
                    data = io.BytesIO()
                    Image.fromarray(np.full((20, 24, 3), 40 * j, dtype=np.uint8)).save(data, format="JPEG")
                    info = tarfile.TarInfo(f"{wnid}_{j}.JPEG")
                    info.size = len(data.getvalue())
                    inner.addfile(info, io.BytesIO(data.getvalue()))
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.size = len(inner_bytes.getvalue())
            outer.addfile(info, io.BytesIO(inner_bytes.getvalue()))


def prepare_imagenet(root, raw):
    write_devkit(os.path.join(raw, "devkit"))
    for i in range(1, len(VAL_GROUND_TRUTH) + 1):
        write_image(os.path.join(raw, "val", f"ILSVRC2012_val_{i:08d}.JPEG"), value=50 * i, fmt="JPEG")
    write_train_tar(os.path.join(raw, "train.tar"), {"n00000001": 2, "n00000002": 1, "n00000003": 1})
    argv = ["--out", os.path.join(root, "imagenet"), "--devkit", os.path.join(raw, "devkit"),
            "--val-images", os.path.join(raw, "val"), "--train-images", os.path.join(raw, "train.tar")]
    script("prepare_imagenet").main(argv)
    return argv


def write_pairs(raw):
    """pairs.tsv: 7 rows, of which row 2's image is missing, row 4's is corrupt, row 5's caption empty."""
    rows = []
    for i in range(7):
        name = f"img{i}.png" if i == 3 else f"img{i}.jpg"  # a PNG gets re-encoded to JPEG
        if i == 4:
            os.makedirs(raw, exist_ok=True)
            with open(os.path.join(raw, name), "wb") as f:
                f.write(b"\xff\xd8\xff garbage")
        elif i != 2:
            write_image(os.path.join(raw, name), value=25 * i)
        rows.append(f"{name}\t{'' if i == 5 else f'pair caption {i}'}\n")
    with open(os.path.join(raw, "pairs.tsv"), "w") as f:
        f.writelines(rows)
    return os.path.join(raw, "pairs.tsv")


def prepare_shards(root, raw):
    argv = ["--input", write_pairs(raw), "--out", os.path.join(root, "cc3m", "shards"), "--samples-per-shard", "2"]
    script("prepare_image_text_shards").main(argv)
    for corpus in ("cc12m", "sbu", "vg", "yfcc14m"):
        shutil.copytree(os.path.join(root, "cc3m", "shards"), os.path.join(root, corpus, "shards"))
    return argv


BOOK = "Call me Ishmael. Some years ago I had little money. " + " ".join(f"w{i}" for i in range(30)) + ". The end."
WIKI = '<doc id="1" title="Anarchism">\nAnarchism\n\nAnarchism is a political philosophy. It is old.\n</doc>\n'


def prepare_text(root, raw):
    os.makedirs(os.path.join(raw, "text", "wiki"))
    with open(os.path.join(raw, "text", "book.txt"), "w") as f:
        f.write(BOOK + "\n\nok\n")  # a file is one document: "ok" joins the last passage
    with open(os.path.join(raw, "text", "short.txt"), "w") as f:
        f.write("Hi there\n")  # a document under --min-words
    with open(os.path.join(raw, "text", "wiki", "wiki_00"), "w") as f:
        f.write(WIKI)
    argv = ["--input", os.path.join(raw, "text"), "--out", os.path.join(root, "bookswiki", "train.txt"),
            "--max-words", "12", "--min-words", "3"]
    script("prepare_text_corpus").main(argv)
    return argv


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """A dataset root prepared by every script from miniature raw inputs, registered with a prefix."""
    root = str(tmp_path_factory.mktemp("root"))
    raw = str(tmp_path_factory.mktemp("raw"))
    prepare_coco_karpathy(root)
    prepare_flickr30k(root)
    argv = {"imagenet": prepare_imagenet(root, raw), "shards": prepare_shards(root, raw),
            "text": prepare_text(root, raw)}
    prefix = f"mini{uuid.uuid4().hex[:6]}_"
    register_all_up2_datasets(root, prefix=prefix)
    return {"root": root, "raw": raw, "prefix": prefix, "argv": argv}


def load_json(path):
    with open(path) as f:
        return json.load(f)


def test_coco_karpathy_splits(mini):
    out = os.path.join(mini["root"], "coco_karpathy")
    train, test = load_json(f"{out}/captions_train.json"), load_json(f"{out}/captions_test.json")
    assert [(im["id"], im["file_name"]) for im in train["images"]] == [
        (10, "train2014/COCO_train2014_000000000010.jpg"), (11, "val2014/COCO_val2014_000000000011.jpg")]  # + restval
    assert [im["id"] for im in test["images"]] == [13, 14]
    assert test["annotations"][:2] == [{"id": 106, "image_id": 13, "caption": "A photo 3 ."},
                                       {"id": 107, "image_id": 13, "caption": "Two 3"}]
    assert [im["id"] for im in load_json(f"{out}/captions_val.json")["images"]] == [12]


def test_coco_karpathy_2017_layout_and_resume(tmp_path, caplog):
    write_image(str(tmp_path / "coco" / "val2017" / "000000000007.jpg"))
    (tmp_path / "k.json").write_text(json.dumps({"images": [karpathy_entry(
        0, "COCO_val2014_000000000007.jpg", "test", [(1, "a cat")], filepath="val2014", cocoid=7)]}))
    argv = ["--karpathy-json", str(tmp_path / "k.json"), "--coco-root", str(tmp_path / "coco"),
            "--out", str(tmp_path / "out"), "--image-layout", "2017"]
    script("prepare_coco_karpathy").main(argv)
    assert load_json(tmp_path / "out" / "captions_test.json")["images"] == [
        {"id": 7, "file_name": "val2017/000000000007.jpg"}]
    (tmp_path / "k.json").write_text("not json any more")  # complete outputs: the input is not read again
    assert script("prepare_coco_karpathy").main(argv) == 0
    os.remove(tmp_path / "out" / "captions_val.json")
    with pytest.raises(json.JSONDecodeError):
        script("prepare_coco_karpathy").main(argv)


def test_flickr30k_splits(mini):
    test = load_json(os.path.join(mini["root"], "flickr30k", "captions_test.json"))
    assert [(im["id"], im["file_name"]) for im in test["images"]] == [(1002, "1002.jpg"), (1003, "1003.jpg")]
    assert len(test["annotations"]) == 10 and test["annotations"][0]["caption"] == "flickr 2 caption 0"


def test_imagenet_class_folders_names_and_resume(mini, caplog):
    out = os.path.join(mini["root"], "imagenet")
    names = load_json(os.path.join(out, "class_names.json"))
    assert names == {"n00000001": "crane (n00000001)", "n00000002": "tench", "n00000003": "crane (n00000003)"}
    assert {c: sorted(os.listdir(os.path.join(out, "val", c))) for c in names} == {
        "n00000001": ["ILSVRC2012_val_00000003.JPEG"],
        "n00000002": ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000004.JPEG"],
        "n00000003": ["ILSVRC2012_val_00000002.JPEG"]}  # ground-truth ids 3, 1, 2, 3
    assert sorted(os.listdir(os.path.join(out, "train", "n00000001"))) == [
        ".complete", "n00000001_0.JPEG", "n00000001_1.JPEG"]
    before = os.stat(os.path.join(out, "train", "n00000001", "n00000001_0.JPEG")).st_mtime_ns
    with caplog.at_level("INFO"):
        script("prepare_imagenet").main(mini["argv"]["imagenet"])
    assert "Train: 0 classes extracted now, 3 of 3 complete" in caplog.text
    assert "4 written" not in caplog.text and "0 written, 4 already in place" in caplog.text
    assert os.stat(os.path.join(out, "train", "n00000001", "n00000001_0.JPEG")).st_mtime_ns == before


def test_imagenet_from_kaggle_files_and_val_tar(tmp_path):
    (tmp_path / "LOC_synset_mapping.txt").write_text("n00000005 tench, Tinca tinca\nn00000004 goldfish\n")
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\nILSVRC2012_val_00000002,n00000004 1 2 3 4 n00000004 5 6 7 8\n"
        "ILSVRC2012_val_00000001,n00000005 1 2 3 4\n")
    with tarfile.open(tmp_path / "val.tar", "w") as tar:
        for i in (1, 2):
            write_image(str(tmp_path / f"ILSVRC2012_val_{i:08d}.JPEG"), fmt="JPEG")
            tar.add(tmp_path / f"ILSVRC2012_val_{i:08d}.JPEG", arcname=f"ILSVRC2012_val_{i:08d}.JPEG")
    out = tmp_path / "imagenet"
    script("prepare_imagenet").main([
        "--out", str(out), "--loc-synset-mapping", str(tmp_path / "LOC_synset_mapping.txt"),
        "--loc-val-solution", str(tmp_path / "LOC_val_solution.csv"), "--val-images", str(tmp_path / "val.tar")])
    assert load_json(out / "class_names.json") == {"n00000004": "goldfish", "n00000005": "tench"}
    assert os.listdir(out / "val" / "n00000004") == ["ILSVRC2012_val_00000002.JPEG"]
    assert os.listdir(out / "val" / "n00000005") == ["ILSVRC2012_val_00000001.JPEG"]


def test_imagenet_published_checksum_is_verified(tmp_path):
    bad = tmp_path / "ILSVRC2012_devkit_t12.tar.gz"
    bad.write_bytes(b"not the devkit")
    common = script("_prepare_common")
    with pytest.raises(common.ChecksumError, match="ILSVRC2012_devkit_t12.tar.gz.*fa75699e90414af021442c21a62c3abf"):
        script("prepare_imagenet").main(["--out", str(tmp_path / "out"), "--devkit", str(bad)])
    (tmp_path / "other.tar").write_bytes(b"x")
    assert common.verify_known_checksum(str(tmp_path / "other.tar"), str(tmp_path)) is False  # none published


def test_verified_checksum_is_remembered(tmp_path, monkeypatch):
    common = script("_prepare_common")
    archive = tmp_path / "archive.tar"
    archive.write_bytes(b"payload")
    monkeypatch.setitem(common.KNOWN_CHECKSUMS, "archive.tar", ("md5", "321c3cf486ed509164edec1e1981fec8"))
    assert common.verify_known_checksum(str(archive), str(tmp_path)) is True
    monkeypatch.setattr(common, "file_digest", lambda *a: pytest.fail("hashed again"))
    assert common.verify_known_checksum(str(archive), str(tmp_path)) is True


def test_image_text_shards_rows_skips_and_resume(mini):
    out = os.path.join(mini["root"], "cc3m", "shards")
    index = load_json(os.path.join(out, "shards.json"))
    assert [(s["file"], s["num_samples"]) for s in index["shards"]] == [
        ("000000.tar", 2), ("000001.tar", 1), ("000002.tar", 0), ("000003.tar", 1)]
    assert index["num_samples"] == 4
    assert index["skipped"] == {"missing_image": 1, "unreadable_image": 1, "empty_caption": 1}
    with tarfile.open(os.path.join(out, "000001.tar")) as tar:
        assert tar.getnames() == ["000000003.jpg", "000000003.txt"]
        data = tar.extractfile("000000003.jpg").read()
        assert data[:3] == b"\xff\xd8\xff"  # the PNG was re-encoded
        assert tar.extractfile("000000003.txt").read() == b"pair caption 3"
    # Resume: a lost shard is rebuilt identically, the others are kept.
    kept = os.stat(os.path.join(out, "000000.tar")).st_mtime_ns
    os.remove(os.path.join(out, "000001.tar"))
    script("prepare_image_text_shards").main(mini["argv"]["shards"])
    assert load_json(os.path.join(out, "shards.json")) == index
    assert os.stat(os.path.join(out, "000000.tar")).st_mtime_ns == kept


def test_text_corpus_passages(mini):
    with open(os.path.join(mini["root"], "bookswiki", "train.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert all(3 <= len(line.split()) <= 12 for line in lines)
    book_words = [w for line in lines[:-1] for w in line.split()]
    assert book_words == BOOK.split() + ["ok"]  # every word kept, in order; short.txt dropped
    assert lines[0] == "Call me Ishmael. Some years ago I had little money."  # packed at sentence ends
    assert lines[-1] == "Anarchism is a political philosophy. It is old."  # the title line dropped
    assert not os.path.exists(os.path.join(mini["root"], "bookswiki", "train.txt.parts"))


def test_registered_datasets_feed_their_task_mappers(mini):
    cfg, p = make_cfg(), mini["prefix"]
    for name, task in [("coco_caption_karpathy_train", "captioning"), ("coco_caption_karpathy_test", "retrieval"),
                       ("flickr30k_test", "retrieval"), ("imagenet_train", "classification"),
                       ("imagenet_val", "classification")]:
        dicts = DatasetCatalog.get(p + name)
        for is_train in (True, False):
            out = build_mapper(cfg, task, is_train)(dicts[0])
            assert out["task"] == task and tuple(out["image"].shape) == (3, 16, 16), name
    assert len(DatasetCatalog.get(p + "coco_caption_karpathy_train")) == 2
    assert build_mapper(cfg, "retrieval", False)(DatasetCatalog.get(p + "flickr30k_test")[0])["captions"] == [
        f"flickr 2 caption {k}" for k in range(5)]
    val = DatasetCatalog.get(p + "imagenet_val")
    assert [d["label"] for d in val] == [0, 1, 1, 2]
    assert MetadataCatalog.get(p + "imagenet_val").thing_classes == ["crane (n00000001)", "tench", "crane (n00000003)"]
    for corpus in ("cc3m", "cc12m", "sbu", "vg_caption", "yfcc14m"):
        shards = DatasetCatalog.get(f"{p}{corpus}_train")
        assert isinstance(shards, ImageTextShards) and len(shards) == 4
    sample = next(iter(DatasetCatalog.get(p + "cc3m_train")))
    out = build_mapper(cfg, "captioning", True)(sample)
    assert out["caption"] == "pair caption 0" and tuple(out["image"].shape) == (3, 16, 16)
    text = DatasetCatalog.get(p + "bookswiki_train")
    assert build_mapper(cfg, "mlm", True)(text[0]) == {"text": text[0]["text"], "text_id": 0, "task": "mlm"}


def test_registration_reads_nothing(mini, monkeypatch):
    touched = []

    def recording(name, real):
        def call(*args, **kwargs):
            touched.append((name, args))
            return real(*args, **kwargs)
        return call

    with monkeypatch.context() as patch:
        for module, attr in [(os, "stat"), (os, "listdir"), (os, "scandir"), (os.path, "exists"),
                             (os.path, "isdir"), (os.path, "isfile"), (builtins, "open")]:
            patch.setattr(module, attr, recording(attr, getattr(module, attr)))
        register_all_up2_datasets(mini["root"], prefix=f"lazy{uuid.uuid4().hex[:6]}_")
    assert touched == []


def test_missing_root_names_path_and_prepare_script(tmp_path):
    root, prefix = str(tmp_path / "empty"), f"gone{uuid.uuid4().hex[:6]}_"
    register_all_up2_datasets(root, prefix=prefix)
    expected = {"coco_caption_karpathy_test": ("coco_karpathy/captions_test.json", "prepare_coco_karpathy.py"),
                "flickr30k_test": ("flickr30k/captions_test.json", "prepare_flickr30k.py"),
                "imagenet_val": ("imagenet/class_names.json", "prepare_imagenet.py"),
                "imagenet_train": ("imagenet/class_names.json", "prepare_imagenet.py"),
                "cc12m_train": ("cc12m/shards/shards.json", "prepare_image_text_shards.py"),
                "yfcc14m_train": ("yfcc14m/shards/shards.json", "prepare_image_text_shards.py"),
                "bookswiki_train": ("bookswiki/train.txt", "prepare_text_corpus.py")}
    for name, (path, prepare) in expected.items():
        with pytest.raises(DatasetNotFoundError) as error:
            DatasetCatalog.get(prefix + name)
        assert os.path.join(root, path) in str(error.value) and f"datasets/{prepare}" in str(error.value), name


def test_every_dataset_of_the_paper_config_is_registered():
    cfg = make_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "Base-UP2.yaml"))
    names = {n for e in get_task_entries(cfg) for n in e.train_datasets + e.test_datasets}
    assert "cc3m_train" in names and "imagenet_val" in names
    assert sorted(names - set(DatasetCatalog.list())) == []
