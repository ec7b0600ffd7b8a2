"""Mamba: transformers' reference PyTorch scan (CPU) against the mamba_ssm / causal_conv1d kernels (CUDA).

Same weights, same input, MaTAV's block sizes; prints the largest absolute difference of the outputs and
of the gradients. Needs a CUDA machine with `pip install -e ".[gpu]"`; on a CPU-only machine it says so.

    python bench/mamba_agreement.py --d-model 256 --layers 1 --batch 16 --length 40
"""
import argparse
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from heads.mamba import MambaStack  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=40)
    args = ap.parse_args()
    if not torch.cuda.is_available() or importlib.util.find_spec("mamba_ssm") is None:
        print("needs CUDA and mamba_ssm: nothing to compare on this machine")
        return
    torch.manual_seed(0)
    cpu = MambaStack(args.d_model, args.layers)
    gpu = MambaStack(args.d_model, args.layers).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(args.batch, args.length, args.d_model)
    mask = torch.ones(args.batch, args.length, dtype=torch.bool)
    mask[: args.batch // 2, args.length // 2:] = False
    for model in (cpu, gpu):
        model.train()
    xc, xg = x.clone().requires_grad_(), x.cuda().requires_grad_()
    yc, yg = cpu(xc, mask), gpu(xg, mask.cuda())
    yc.pow(2).mean().backward()
    yg.pow(2).mean().backward()
    out = (yc - yg.cpu()).abs()[mask].max().item()
    grad = max((p.grad - q.grad.cpu()).abs().max().item() for p, q in zip(cpu.parameters(), gpu.parameters()))
    print(f"d_model={args.d_model} layers={args.layers} batch={args.batch} length={args.length}")
    print(f"max |y_ref - y_kernel| = {out:.3e}   max |grad_ref - grad_kernel| = {grad:.3e}")


if __name__ == "__main__":
    main()
