"""One layer's decode step of ``TurboQuantStaticCache`` vs the bare kernel: where the step's time goes.

B=8, 32k tokens, Llama-3.1-8B KV shapes (8 kv heads, 32 query heads, d=128), K4/V4 defaults. The layer
is filled through ``update`` (random bf16 keys/values, 4k-token chunks), one token is decoded, then each
case is timed as a CUDA-graph replay median (``triton.testing.do_bench_cudagraph``):

* ``layer_step`` — ``_decode_attention`` as the compiled model calls it (count on the device, window
  of sinks + recent tokens, key centering, value offset);
* ``slices_no_window`` — the CUDA kernel on the layer's own code buffers, no window, all slots;
* ``contiguous`` — the same codes copied to contiguous tensors of the filled length;
* ``random_codes`` / ``random_norms`` / ``real_codes_random_norms`` / ``query_x30`` — data ablations.

    PYTHONPATH=. python benchmarks/gpu_static_step.py --out $OUT      # CUDA only

Writes ``gpu_static_step.json`` to ``--out`` (default benchmarks/results/).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from _common import log, machine_info, out_folder, parser, table, write_json


def graph_us(fn: Any) -> float:
    from triton.testing import do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    return 1e3 * float(do_bench_cudagraph(fn, rep=100, return_mode="median"))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_static_step.py needs a CUDA GPU")

    from turboquant.config import KVCacheConfig
    from turboquant.kernels import cuda_attention as ca
    from turboquant.kernels.testing import random_codes
    from turboquant.quantizer import QuantizedVectors
    from turboquant.static_cache import TurboQuantStaticLayer

    b, hkv, g, d, n = args.batch, 8, 4, 128, args.context
    torch.manual_seed(0)
    layer = TurboQuantStaticLayer(KVCacheConfig(), n + 192, 0)
    for _ in range(0, n, 4096):
        k = torch.randn(b, hkv, 4096, d, device="cuda", dtype=torch.bfloat16)
        layer.update(k, torch.randn_like(k))
    k1 = torch.randn(b, hkv, 1, d, device="cuda", dtype=torch.bfloat16)
    layer.update(k1, torch.randn_like(k1))
    q = torch.randn(b, hkv * g, 1, d, device="cuda", dtype=torch.bfloat16)
    scale, s = d**-0.5, layer.sink
    kcfg, vcfg = layer.key_config, layer.value_config
    kq = QuantizedVectors(kcfg, layer.key_codes[:, :, s:], layer.key_norms[:, :, s:])
    vq = QuantizedVectors(vcfg, layer.value_codes[:, :, s:], layer.value_norms[:, :, s:])
    kc = QuantizedVectors(kcfg, layer.key_codes[:, :, s:n].contiguous(), layer.key_norms[:, :, s:n].contiguous())
    vc = QuantizedVectors(vcfg, layer.value_codes[:, :, s:n].contiguous(), layer.value_norms[:, :, s:n].contiguous())
    kr, vr = random_codes(kcfg, (b, hkv, n - s), "cuda"), random_codes(vcfg, (b, hkv, n - s), "cuda")
    kx, vx = QuantizedVectors(kcfg, kc.codes, kr.norms), QuantizedVectors(vcfg, vc.codes, vr.norms)
    attend = ca.cuda_quantized_attention
    cases = {
        "layer_step": lambda: layer._decode_attention(q, None, scale),
        "slices_no_window": lambda: attend(q, kq, vq, None, None, scale),
        "contiguous": lambda: attend(q, kc, vc, None, None, scale),
        "random_codes": lambda: attend(q, kr, vr, None, None, scale),
        "real_codes_random_norms": lambda: attend(q, kx, vx, None, None, scale),
        "query_x30": lambda: attend(q * 30, kc, vc, None, None, scale),
    }
    res: dict[str, Any] = {"machine": machine_info(), "batch": b, "context": n, "window_tokens": layer.sink + layer.ring,
                           "us": {}}  # fmt: skip
    for name, fn in cases.items():
        res["us"][name] = graph_us(fn)
        log(f"{name:26s} {res['us'][name]:8.1f} us")
    log(table([(k, v) for k, v in res["us"].items()], ["case", "us (graph median)"], ".1f"))
    write_json("gpu_static_step.json", res, out_folder() if args.out is None else Path(args.out))


if __name__ == "__main__":
    main()
