"""Which SDPA backend serves the model's attention call, and how fast, on the GPU at hand.

The model calls F.scaled_dot_product_attention with grouped-query heads (enable_gqa) and, when
captions are padded, a boolean key mask. Backends differ in what they accept: this runs each
backend alone on the hh15b head layout (40 query heads, 8 KV heads, head dim 128) with and without
GQA/mask, and reports TFLOP/s or why it refused. Also times one hh15b-width block (the project's
own TransformerBlock) forward+backward at 16K tokens.

    python bench/attention_probe.py            # writes $OUT/attention_probe.json (or bench/results/)
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def bench_ms(fn, warmup=5, iters=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def probe_sdpa(S=16384, H=40, KV=8, D=128):
    dt, dev = torch.bfloat16, "cuda"
    results = {}
    q = torch.randn(1, H, S, D, device=dev, dtype=dt, requires_grad=True)
    k_full = torch.randn(1, H, S, D, device=dev, dtype=dt, requires_grad=True)
    v_full = torch.randn(1, H, S, D, device=dev, dtype=dt, requires_grad=True)
    k_gqa = torch.randn(1, KV, S, D, device=dev, dtype=dt, requires_grad=True)
    v_gqa = torch.randn(1, KV, S, D, device=dev, dtype=dt, requires_grad=True)
    mask = torch.ones(1, 1, 1, S, device=dev, dtype=torch.bool)
    mask[..., :64] = False
    flops = 4 * S * S * D * H
    cases = {
        "mha": (k_full, v_full, None, False),
        "gqa": (k_gqa, v_gqa, None, True),
        "gqa_repeat_kv": (None, None, None, "repeat"),
        "mha_keymask": (k_full, v_full, mask, False),
    }
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        for name, (k, v, m, gqa) in cases.items():
            key = f"{backend.name.lower()}_{name}"
            try:
                with sdpa_kernel(backend):
                    if gqa == "repeat":
                        def fwd():
                            kk = k_gqa.repeat_interleave(H // KV, dim=1)
                            vv = v_gqa.repeat_interleave(H // KV, dim=1)
                            return F.scaled_dot_product_attention(q, kk, vv)
                    else:
                        def fwd(k=k, v=v, m=m, gqa=gqa):
                            return F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=gqa)
                    out = fwd()
                    grad = torch.randn_like(out)
                    t_f = bench_ms(fwd)
                    # autograd.grad, not .backward: no accumulation into .grad (one more add per input each time)
                    leaves = [q, k_gqa, v_gqa] if gqa == "repeat" else [q, k, v]
                    t_fb = bench_ms(lambda: torch.autograd.grad(fwd(), leaves, grad))
                results[key] = {"fwd_tflops": round(flops / t_f / 1e9, 1), "fwd_bwd_tflops": round(3.5 * flops / t_fb / 1e9, 1)}
            except Exception as e:  # a backend refusing an input is the finding
                results[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            print(key, results[key], flush=True)
    return results


def probe_block(N=16384):
    from model import ModelArgs, SharedBlock, Segment, SequenceLayout
    from model.block import BlockContext
    from model.rope import rope_angles

    args = ModelArgs(n_modality_in=0, n_shared=1, n_modality_out=0, video_channels=48, audio_channels=64)
    block = SharedBlock(args).to("cuda", torch.bfloat16)
    block.reset_parameters()
    with torch.no_grad():
        for w in block.weights.values():
            w.modulation.normal_(0, 0.02)
    layout = SequenceLayout([Segment("video", "generate", (48, 16, 64, 64))], args)
    assert layout.n_tokens == N, layout.n_tokens
    ang = rope_angles(layout.positions.cuda(), args.rope_axes_dim, args.rope_theta)
    mod = torch.randn(1, 1, 6, args.dim, device="cuda", dtype=torch.bfloat16) * 0.02
    ctx = BlockContext(layout.runs(False), layout.runs(True), mod, ang.cos(), ang.sin(), None)
    x = torch.randn(1, N, args.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    params = sum(p.numel() for p in block.parameters())
    flops = 6 * params * N + 3 * 4 * N * N * args.dim
    out = {}
    for name, fn in (("eager", block), ("compiled", torch.compile(block))):
        def step(fn=fn):
            fn(x, ctx).sum().backward()
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            ms = bench_ms(step, warmup=3, iters=10)
        out[f"block_d{args.dim}_N{N}_train_{name}"] = {"ms": round(ms, 2), "tflops": round(flops / ms / 1e9, 1)}
        print(name, out[f"block_d{args.dim}_N{N}_train_{name}"], flush=True)
    return out


if __name__ == "__main__":
    res = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "command": "python bench/attention_probe.py"}
    res["sdpa_S16384_H40_KV8_D128"] = probe_sdpa()
    res.update(probe_block())
    out_dir = Path(os.environ.get("OUT", Path(__file__).parent / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "attention_probe.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
