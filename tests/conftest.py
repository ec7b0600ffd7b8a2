import ast
import json
import os
import shutil
import subprocess
import sys
import time
import wave
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
# MELD's official train/dev CSVs, where a developer has them (bench/meld_csvs.py reads the same place)
MELD_CSVS = Path(os.environ.get("ERCFLOW_MELD") or REPO / "data/raw/meld")
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# the project's modules, after sys.path holds the repository
from heads.data import IGNORE, CachedDialogues  # noqa: E402
from heads.registry import build_head  # noqa: E402
from pipeline import distributed  # noqa: E402
from pipeline.datasets.sample import write_mp4  # noqa: E402
from pipeline.encoders import Encoder  # noqa: E402
from pipeline.extract import extract  # noqa: E402
from pipeline.manifest import Manifest, ManifestMeta  # noqa: E402


@pytest.fixture(autouse=True)
def seeded_rngs():
    """Every test starts from the same global RNG state, so no test depends on the ones run before it."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    np.random.seed(0)


def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """One torch thread for a test: tiny models gain nothing from more, and spin-waiting threads slow a shared
    CPU down (measured); as each of two ranks has on 2 cores."""
    yield from _one_torch_thread()


@pytest.fixture(scope="module")
def one_thread_module():
    """`one_thread` for a whole module: `pytestmark = pytest.mark.usefixtures("one_thread_module")`."""
    yield from _one_torch_thread()


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A tiny random-init BERT + WordPiece tokenizer saved to a temp dir (loaded back through from_pretrained)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny_bert")
    words = ("the a i am so happy sad angry about this is it was on my you we me not what why how now feels "
             "cake car letter monday friday okay hmm well tell more meeting report bus love great furious "
             "cry lost ada ben said yes no").split()
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(letters + ".,!?'") + words
             + [f"##{c}" for c in letters])   # any lower-case word splits into pieces: no [UNK] text
    (d / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    tok = BertTokenizerFast(vocab=str(d / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(d)
    import torch

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=256))
    model.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """A small bundled-sample dataset (6 dialogues), generated once per session."""
    from pipeline.datasets.sample import generate
    from pipeline.params import SampleParams

    d = tmp_path_factory.mktemp("sample")
    generate(d, SampleParams(dialogues=6, min_turns=4, max_turns=6, seed=1))
    return d


@pytest.fixture(scope="session")
def sample_manifest(sample_dir):
    from pipeline.datasets import build_manifest
    from pipeline.params import DatasetParams

    manifest, problems = build_manifest("sample", DatasetParams(adapter="sample", root=str(sample_dir)))
    assert problems == []
    return manifest


@pytest.fixture(scope="session")
def sample_media(sample_manifest, tmp_path_factory) -> Path:
    from pipeline.media import decode_dataset
    from pipeline.params import DecodeParams

    out = tmp_path_factory.mktemp("media") / "sample.h5"
    decode_dataset(sample_manifest, out, DecodeParams(frames=4, size=32, chunk_size=8))
    return out


# ---- shared by several test modules (from tests/test_audio_encoders.py) ----

def save_tiny_speech_model(path, model_type):
    import torch
    from transformers import Data2VecAudioConfig, Data2VecAudioModel, Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=16,
                  num_conv_pos_embedding_groups=2, feat_extract_norm="layer", do_stable_layer_norm=True)
    if model_type == "wavlm":
        model = WavLMModel(WavLMConfig(**common, num_buckets=16, max_bucket_distance=64))
    else:
        model = Data2VecAudioModel(Data2VecAudioConfig(**{k: v for k, v in common.items()
                                                          if k not in ("feat_extract_norm", "do_stable_layer_norm", "num_conv_pos_embeddings")},
                                                       conv_pos_kernel_size=5, num_conv_pos_embeddings=5))
    model.save_pretrained(path)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=True, do_normalize=True).save_pretrained(path)
    return str(path)


def save_coarse_data2vec(path) -> str:
    """A tiny random-init data2vec-audio with a coarser conv stack than `save_tiny_speech_model`'s (100 frames
    a second), so that fine-tuning a student on a CPU takes seconds."""
    import torch
    from transformers import Data2VecAudioConfig, Data2VecAudioModel, Wav2Vec2FeatureExtractor

    torch.manual_seed(0)
    Data2VecAudioModel(Data2VecAudioConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, conv_dim=(16, 16, 16), conv_kernel=(10, 4, 4),
                                           conv_stride=(10, 4, 4), conv_pos_kernel_size=5, num_conv_pos_embeddings=5,
                                           num_conv_pos_embedding_groups=2)).save_pretrained(path)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=True, do_normalize=True).save_pretrained(path)
    return str(path)


# ---- shared by several test modules (from tests/test_visual_encoders.py) ----

def save_tiny_timesformer(path) -> str:
    import torch
    from transformers import TimesformerConfig, TimesformerModel, VideoMAEImageProcessor

    torch.manual_seed(0)
    TimesformerModel(TimesformerConfig(image_size=32, patch_size=16, num_frames=3, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64)).save_pretrained(path)
    VideoMAEImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


# ---- shared by several test modules (from tests/test_store.py) ----

@dataclass
class CountingConfig:
    dim: int = 3


class CountingEncoder(Encoder):
    """Deterministic fake text encoder that counts its calls."""
    kind = "test_counting"
    modality = "text"
    needs_media = False
    Config = CountingConfig
    calls = 0
    fail_on_call = -1    # raise on this call (a crash half-way); not config, so the fingerprint stays
    sleep = 0.0

    @property
    def dim(self):
        return self.config.dim

    def encode(self, rows, manifest, media=None):
        type(self).calls += 1
        if type(self).calls == type(self).fail_on_call:
            raise KeyboardInterrupt("simulated kill")
        time.sleep(type(self).sleep)
        x = np.array([[len(t), i, self.config.dim] for i, t in zip(rows.index, rows["text"])], np.float32)
        return {"pooled": x, "valid": np.ones(len(rows), bool)}, []


def extract_counting(manifest, path, fail_on_call=-1, **cfg):
    CountingEncoder.calls, CountingEncoder.fail_on_call = 0, fail_on_call
    return extract(manifest, CountingEncoder("count", CountingConfig(**cfg)), path, chunk_size=4)


# ---- shared by several test modules (from tests/test_trainer.py) ----

def synthetic_manifest(n_dialogues=12, turns=5, seed=0, dims=False):
    rng = np.random.default_rng(seed)
    rows = []
    for d in range(n_dialogues):
        split = "train" if d < n_dialogues * 0.6 else "dev" if d < n_dialogues * 0.8 else "test"
        for t in range(int(rng.integers(2, turns + 1))):
            r = {"utt_id": f"d{d}u{t}", "dataset": "syn", "split": split, "dialogue_id": f"d{d}", "turn": t,
                 "speaker": "AB"[t % 2], "text": f"t{d}-{t}", "label": "abc"[int(rng.integers(3))]}
            if dims:
                r["valence"], r["arousal"] = float(rng.normal()), float(rng.normal())
            rows.append(r)
    return Manifest(pd.DataFrame(rows), ManifestMeta("syn", ".", ["a", "b", "c"], ["valence", "arousal"] if dims else []))


def store_from(manifest, path, fn, dim, valid=None, layers=None, logits=None, labels=None):
    """A feature store whose pooled row is fn(manifest row) ([dim], or [len(layers), dim] with the store's
    `layers` attribute when `layers` is given); with `logits` (a function of the row too) a `logits` row, over
    the classes `labels` (the store's attribute) when given."""
    class Fn(Encoder):
        kind, modality, needs_media = "test_fn", "text", False
        Config = type("C", (), {})

        @property
        def dim(self):
            return dim

        def provenance(self):
            return {"encoder": "fn", **({} if layers is None else {"layers": list(layers)}),
                    **({} if labels is None else {"labels": list(labels)})}

        def encode(self, rows, m, media=None):
            ok = np.ones(len(rows), bool) if valid is None else valid[rows.index.to_numpy()]
            out = {"pooled": np.stack([fn(r) for _, r in rows.iterrows()]).astype(np.float32), "valid": ok}
            if logits is not None:
                out["logits"] = np.stack([logits(r) for _, r in rows.iterrows()]).astype(np.float32)
            return out, []

    extract(manifest, Fn("fn", None), path)
    return str(path)


def train_steps(head, batch, steps, lr=3e-3):
    """Adam on one batch for `steps` steps; the head is left in eval mode."""
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    head.train()
    for _ in range(steps):
        loss, _ = head.loss(batch, head(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()


def overfit(head, batch, steps=300, lr=1e-2):
    """Train on one batch only; return train accuracy (or mean r) on that batch."""
    train_steps(head, batch, steps, lr)
    with torch.no_grad():
        out = head(batch)
    if head.task == "categorical":
        keep = batch.labels != IGNORE
        return float((out.argmax(-1)[keep] == batch.labels[keep]).float().mean())
    ok = torch.isfinite(batch.dims) & batch.mask[..., None]
    return float(np.mean([np.corrcoef(out[..., k][ok[..., k]], batch.dims[..., k][ok[..., k]])[0, 1]
                          for k in range(batch.dims.shape[-1])]))


# ---- shared by several test modules (from tests/test_heads.py) ----

def head_and_batch(tmp_path, name, **options):
    m, data = three_modality_data(tmp_path)
    torch.manual_seed(0)
    head = build_head(name, {k: data.dim(k) for k in data.modalities}, 3, "categorical",
                      {**HEADS.get(name, {}), **options})
    head.prepare(data)
    return head.eval(), data.batch(m.dialogues("train")[:4])


HEADS = {
    "dialoguetrm": {"d_model": 32, "intra_layers": 1, "intra_heads": 2, "inter_layers": 1, "inter_heads": 2,
                    "window": 3, "dropout": 0.0},
    # theta 1: the shift may be as large as F_T, so that the students carry weight on the tiny batches here
    # (with theta 0.1 and the final LayerNorm a dimensional target overfits to R2 0.94 only)
    "telme": {"heads": 2, "dropout": 0.0, "theta": 1.0},
    "matav": {"d_model": 32, "attention_layers": 1, "heads": 2, "queue_size": 16, "temperature": 0.1, "dropout": 0.0,
              "mec_symmetric": True},   # as written (eq. 5) g_v gets no gradient: see heads/matav.py
}


def three_modality_data(tmp_path, dims=False):
    m = synthetic_manifest(n_dialogues=10, turns=6, dims=dims)
    rng = np.random.default_rng(0)
    emb = {u: rng.normal(size=12) for u in m.utt_ids}
    valid = np.arange(len(m)) % 4 != 1
    stores = {"text": store_from(m, tmp_path / "t.h5", lambda r: emb[r["utt_id"]][:8], 8),
              "audio": store_from(m, tmp_path / "a.h5", lambda r: emb[r["utt_id"]][4:], 8, valid=valid),
              "visual": store_from(m, tmp_path / "v.h5", lambda r: emb[r["utt_id"]][::2], 6)}
    return m, CachedDialogues(m, stores)


# ---- shared by several test modules (from tests/test_media.py) ----

def write_wav(path, x, sr=16000):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())


def bad_media_manifest(root):
    """Good clip, corrupt mp4, missing clip, mp4 without audio track, a long clip, and a shared wav/mp4 cut by span."""
    frames = np.full((24, 32, 32, 3), 100, np.uint8)
    t = np.arange(16000 * 2) / 16000
    tone = 0.3 * np.sin(2 * np.pi * 220 * t).astype(np.float32)
    write_mp4(root / "good.mp4", frames, 12, tone, 16000)
    (root / "corrupt.mp4").write_bytes((root / "good.mp4").read_bytes()[:2000])
    write_mp4(root / "silent_track.mp4", frames, 12, None, 16000)
    write_mp4(root / "long.mp4", np.full((12 * 6, 32, 32, 3), 50, np.uint8), 12,
              np.tile(tone, 3), 16000)
    two = np.concatenate([0.5 * np.ones(16000, np.float32), -0.25 * np.ones(16000, np.float32)])
    write_wav(root / "dialog.wav", two)
    rows = [("good", "good.mp4", "good.mp4", None, None), ("corrupt", "corrupt.mp4", "corrupt.mp4", None, None),
            ("missing", "nope.mp4", "nope.mp4", None, None), ("notrack", "silent_track.mp4", "silent_track.mp4", None, None),
            ("long", "long.mp4", "long.mp4", None, None),
            ("part1", "long.mp4", "dialog.wav", 0.0, 1.0), ("part2", "long.mp4", "dialog.wav", 1.0, 2.0)]
    df = pd.DataFrame([{"utt_id": u, "dataset": "t", "split": "train", "dialogue_id": f"d{i}", "turn": 0,
                        "speaker": "A", "text": "x", "label": "a", "video": v, "audio": a, "start": s, "end": e}
                       for i, (u, v, a, s, e) in enumerate(rows)])
    return Manifest(df, ManifestMeta(dataset="t", root=str(root), labels=["a"]))


# ---- shared by several test modules (from tests/test_dvc_pipeline.py) ----

ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1",
       "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def sh(cwd, *cmd, check=True):
    out = subprocess.run(list(cmd), cwd=cwd, env=ENV, capture_output=True, text=True)
    if check and out.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout + out.stderr


def dvc(cwd, *args, check=True):
    return sh(cwd, sys.executable, "-m", "dvc", *args, check=check)


def project_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    return [f for f in listed if (REPO / f).is_file() and not f.startswith(("data/", "results/", "models/", "reports/"))
            and f not in ("dvc.lock",)]


def copy_project(root: Path) -> Path:
    """This repository's tracked code and params (no data, results, models or reports) copied under `root`."""
    for f in project_files():
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, root / f)
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A fresh git + DVC project with this repo's code, the pipeline run once on a small sample."""
    root = copy_project(tmp_path_factory.mktemp("proj") / "ercflow")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["sample"]["dialogues"] = 24
    params["trainer"]["epochs"] = 40
    params["finetune"]["teacher_minilm"]["epochs"] = 3
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(root, "git", "init", "-q")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "init")
    log = dvc(root, "repro")
    return root, log


# ---- shared by several test modules (from tests/test_dvc_deps.py) ----

PACKAGES = ("pipeline", "heads", "stages", "ercflow")


def module_files(name: str) -> list[Path]:
    """The files importing `name` executes: its package __init__ files and the module itself."""
    parts, files = name.split("."), []
    for i in range(1, len(parts) + 1):
        base = REPO.joinpath(*parts[:i])
        for f in (base / "__init__.py", base.with_suffix(".py")):
            if f.exists():
                files.append(f)
    return files


def imported_files(path: Path) -> set[Path]:
    """Every project file reached from `path` through import statements (anywhere in the file)."""
    seen, todo = set(), [path]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        tree = ast.parse(f.read_text())
        for lazy in [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"]:
            tree.body.remove(lazy)   # a module's lazy attributes are imported when used, not with the module
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]   # a name may be a module
            todo.extend(m for n in names if n.split(".")[0] in PACKAGES for m in module_files(n))
    return seen


# ---- shared by several test modules (from tests/test_check.py) ----

BASE = yaml.safe_load((REPO / "params.yaml").read_text())


# ---- shared by several test modules (from tests/test_reliability.py) ----

def flip_middle(path: Path, n: int = 64, dataset: str | None = None) -> None:
    """Flip `n` bytes in the middle of the file, or of `dataset`'s bytes (a contiguous dataset)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    if dataset is not None:
        with h5py.File(path, "r") as f:
            ds = f[dataset]
            mid, n = ds.id.get_offset() + ds.id.get_storage_size() // 2, min(n, ds.id.get_storage_size() // 2)
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


# ---- shared by several test modules (from tests/test_finetune.py: fine-tuning on two CPU ranks) ----

RANK_SCRIPT = """
import json, sys
sys.path.insert(0, {repo!r})
from pipeline import distributed
from pipeline.configs import TextFinetuneParams
from pipeline.finetune.kinds import build_finetuner
from pipeline.finetune.loop import InterruptTraining
from pipeline.manifest import Manifest
job = json.loads(sys.argv[1])
r = distributed.ranks()
distributed.join_group(r)
distributed.bind_device(r, "cpu", "test")
tuner = build_finetuner(Manifest.load(job["manifest"]), TextFinetuneParams(**job["params"]), job["ckpt"])
try:
    tuner.train(log=lambda *_: None, stop_after_steps=job["stop"])
except InterruptTraining:
    print("STOPPED", r.rank, flush=True)
"""


def stop_two_ranks(tmp_path, params: dict, stop: int) -> Path:
    """Fine-tune on two CPU ranks under torchrun (gloo) from the manifest saved at `tmp_path/manifest`, stopped
    after `stop` optimizer steps; returns the checkpoints folder (`tmp_path/two`)."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(repo=str(REPO)))
    job = {"manifest": str(tmp_path / "manifest"), "ckpt": str(tmp_path / "two"), "stop": stop, "params": params}
    cmd = distributed.torchrun_command("x", [], 2)
    cmd = cmd[:cmd.index("-m", 2)] + [str(script), json.dumps(job)]
    out = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "ERCFLOW_DIST_TIMEOUT": "120"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "STOPPED 0" in out.stdout and "STOPPED 1" in out.stdout, out.stdout + out.stderr[-3000:]
    return tmp_path / "two"


def train_loss(tuner) -> float:
    """Mean CE of the model over the train split (the loss after the steps taken so far)."""
    rows = tuner.rows["train"]
    _, logits = tuner.predict(rows)
    return float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(tuner.y[rows])))
