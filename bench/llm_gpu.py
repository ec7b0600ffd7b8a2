"""Decoder-only LLMs at real size on a GPU: extraction throughput, LoRA / QLoRA step time and memory.

No weights can be downloaded, so the model is a random-init Llama-3-8B-shaped configuration (the speed and
memory of a real 8B model are those of its shapes, not of its values). In one process it measures:

- the GPU's bf16 matrix-product rate (8192³, the baseline every share below is a ratio of);
- extraction as `hf_text` runs a decoder-only model: a left-padded batch with every hidden state,
  last-token pooling and label scoring at the answer position (ercflow's own functions): tokens/s,
  peak memory, and the share of the measured bf16 rate (2·N FLOPs per token);
- a LoRA step through peft (r 16 on every projection, gradient checkpointing, AdamW on the adapter):
  step time, tokens/s, peak memory, model-FLOPs share (the 6·N convention, which undercounts the
  recomputation of checkpointing);
- the same two in 4-bit (bitsandbytes NF4, QLoRA) when bitsandbytes is importable: the real loading path,
  `from_pretrained(dir, quantization_config=...)`, from the random-init model saved to a temp dir.

    python bench/llm_gpu.py --layers 32 --batch 16 --length 512 --lora-batch 4

Needs torch with CUDA, transformers, peft, pydantic (ercflow's params) and, for the 4-bit figures,
bitsandbytes (`pip install -e ".[gpu]"`). Not yet run: no GPU was available when it was written.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def llama3_8b(layers: int):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)


def cuda_time(fn, warmup: int, iters: int) -> float:
    """Mean seconds per call of fn, timed with CUDA events after warm-up calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / iters


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    sec = cuda_time(lambda: a @ b, 3, 10)
    return 2 * 8192 ** 3 / sec


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def extraction(model, batch: int, length: int, vocab: int, label_ids: list[int], iters: int) -> dict:
    """One `hf_text` decoder batch as the encoder runs it (pipeline/encoders/text.py's functions): left
    padding, position ids over the real tokens, every hidden state pooled at the last real token, and the
    label words' log-probabilities at the answer position (single-token label words)."""
    from pipeline.encoders.text import decoder_position_ids, pool_hidden
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(10, vocab, (batch, length), device="cuda")
    mask = torch.ones_like(ids)
    mask[: batch // 2, : length // 4] = 0          # left padding on half the rows, as a batch of mixed lengths
    inputs = {"input_ids": ids, "attention_mask": mask}
    labels = torch.tensor(label_ids, device="cuda")

    @torch.no_grad()
    def step():
        out = model(**inputs, position_ids=decoder_position_ids(mask), use_cache=False,
                    output_hidden_states=True, logits_to_keep=1)
        pooled = torch.stack([pool_hidden(h.float(), inputs, "last", None) for h in out.hidden_states], 1)
        scores = torch.log_softmax(out.logits[:, -1].float(), -1)[:, labels]
        return pooled, scores
    sec = cuda_time(step, 2, iters)
    return {"batch": batch, "length": length, "sec_per_batch": sec, "tokens_per_s": batch * length / sec,
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30}


def lora_step(model, batch: int, length: int, vocab: int, iters: int) -> dict:
    from peft import LoraConfig, get_peft_model
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, cfg)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-4)
    ids = torch.randint(10, vocab, (batch, length), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = peft_model(input_ids=ids).logits[:, -1, :]
        loss = torch.nn.functional.cross_entropy(logits.float(), ids[:, 0])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sec = cuda_time(step, 2, iters)
    out = {"batch": batch, "length": length, "sec_per_step": sec, "tokens_per_s": batch * length / sec,
           "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
           "trainable_params": sum(p.numel() for p in trainable)}
    peft_model.unload()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--lora-batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--no-4bit", action="store_true")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA: nothing to measure on this machine")
        return
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    figures = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    peak = matmul_rate()
    figures["bf16_matmul_tflops"] = peak / 1e12
    print(f"bf16 matmul 8192^3: {peak / 1e12:.0f} TFLOP/s (the baseline of every share below)", flush=True)

    config = llama3_8b(args.layers)
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.eval()
    n = n_params(model)
    figures.update(params=n, init_s=time.perf_counter() - t0)
    print(f"random-init Llama-3-8B shape, {args.layers} layers: {n / 1e9:.2f} B params, "
          f"{figures['init_s']:.1f} s to build", flush=True)
    labels = [1000, 2000, 3000, 4000, 5000, 6000, 7000]   # 7 single-token label words

    ext = extraction(model, args.batch, args.length, config.vocab_size, labels, args.iters)
    ext["share_of_bf16_matmul"] = 2 * n * ext["tokens_per_s"] / peak
    figures["extract_bf16"] = ext
    print(f"extract bf16: {ext['tokens_per_s']:.0f} tokens/s ({args.batch} x {args.length}), "
          f"peak {ext['peak_gib']:.1f} GiB, {100 * ext['share_of_bf16_matmul']:.0f}% of the bf16 matmul rate", flush=True)

    model.train()
    lora = lora_step(model, args.lora_batch, args.length, config.vocab_size, args.iters)
    lora["model_flops_share"] = 6 * n * lora["tokens_per_s"] / peak
    figures["lora_bf16"] = lora
    print(f"LoRA bf16 step: {lora['sec_per_step']:.3f} s ({args.lora_batch} x {args.length}), "
          f"{lora['tokens_per_s']:.0f} tokens/s, peak {lora['peak_gib']:.1f} GiB, "
          f"{lora['trainable_params'] / 1e6:.1f} M trainable, 6N share {100 * lora['model_flops_share']:.0f}%", flush=True)

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        args.no_4bit = True
        print("bitsandbytes not importable: no 4-bit figures")
    if not args.no_4bit:
        from transformers import BitsAndBytesConfig
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            model.save_pretrained(tmp)
            del model
            torch.cuda.empty_cache()
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
            model = LlamaForCausalLM.from_pretrained(tmp, quantization_config=q, device_map={"": 0},
                                                     dtype=torch.bfloat16, use_safetensors=True)
            figures["save_load_4bit_s"] = time.perf_counter() - t0
        model.eval()
        ext4 = extraction(model, args.batch, args.length, config.vocab_size, labels, args.iters)
        ext4["ratio_to_bf16"] = ext4["tokens_per_s"] / ext["tokens_per_s"]
        figures["extract_4bit"] = ext4
        print(f"extract 4-bit: {ext4['tokens_per_s']:.0f} tokens/s ({ext4['ratio_to_bf16']:.2f}x bf16), "
              f"peak {ext4['peak_gib']:.1f} GiB", flush=True)
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model.train()
        lora4 = lora_step(model, args.lora_batch, args.length, config.vocab_size, args.iters)
        lora4["ratio_to_bf16"] = lora4["tokens_per_s"] / lora["tokens_per_s"]
        figures["lora_4bit"] = lora4
        print(f"QLoRA 4-bit step: {lora4['sec_per_step']:.3f} s ({lora4['ratio_to_bf16']:.2f}x bf16 tokens/s), "
              f"peak {lora4['peak_gib']:.1f} GiB", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
