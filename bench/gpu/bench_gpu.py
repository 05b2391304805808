"""Time each GPU kernel against the torch composite and cuBLAS on realistic shapes.

Run by bench/gpu/run.sh on a GPU machine; ``--dry-run`` runs the same code paths on tiny CPU
tensors (Triton under TRITON_INTERPRET=1, wall-clock timers instead of CUDA events) so CI
proves the script works. Results: a short table printed last, full JSON in $OUT/bench_gpu.json.

Each section counts its work (flops or bytes moved) and reports the achieved rate against
ceilings measured in the same run: a large device copy (GB/s) and a large bf16 matmul (TFLOP/s).
Targets (issue 3, H100): streaming cross-covariance >= 70% of the bf16 matmul rate;
square-accumulate >= 80% of copy bandwidth; per-sample Fisher >= 3x torch.func per-sample
gradients and >= 50% of the matmul rate; randomized PCA >= 2x torch.pca_lowrank at equal
subspace error.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

DRY = "--dry-run" in sys.argv
if DRY and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from repforget_kernels import _dispatch, randomized_pca  # noqa: E402
from repforget_kernels import _ops  # noqa: E402
from repforget_kernels._ops import OPS  # noqa: E402

# full-size shapes (GPU) and dry-run shapes (CPU, interpreter)
FULL = dict(rows=65536, d=4096, layers=32, chunk_layers=4, chunk_rows=16384, gram_n=4096, gram_layers=8,
            fisher=(8, 512, 4096, 4096), sq_tensors=64, sq_numel=8 << 20, pca_rank=64, pca_k=10,
            hist_numel=256 << 20, copy_bytes=2 << 30, mm=8192, reps=10, warmup=3)
TINY = dict(rows=96, d=40, layers=2, chunk_layers=2, chunk_rows=48, gram_n=33, gram_layers=2,
            fisher=(2, 9, 37, 29), sq_tensors=3, sq_numel=1000, pca_rank=5, pca_k=3,
            hist_numel=5000, copy_bytes=1 << 16, mm=64, reps=1, warmup=0)
TARGETS = {"cross_products": ("matmul", 0.70), "square_accumulate": ("copy", 0.80), "per_sample_fisher": ("matmul", 0.50)}


# --------------------------------------------------------------------------- timing


def median_ms(fn, device: torch.device, reps: int, warmup: int) -> float:
    """Median wall time of fn() in ms: CUDA events on a GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def row(section, impl, ms, work, unit, **extra) -> dict:
    """One result: rate = work / time in TFLOP/s (unit 'flop') or GB/s (unit 'byte')."""
    scale = 1e12 if unit == "flop" else 1e9
    return dict(section=section, impl=impl, ms=ms, work=work, unit=unit, rate=work / (ms * 1e-3) / scale, **extra)


def op(name: str, device, backend: str):
    return _dispatch.kernel(OPS[name], device, backend)


def have(backend: str, device) -> bool:
    return _dispatch.backend_available(backend, device)[0]


# --------------------------------------------------------------------------- sections


def ceilings(dev, s) -> list:
    n = s["copy_bytes"] // 2  # bf16 elements
    src = torch.randn(n, device=dev).to(torch.bfloat16)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), dev, s["reps"], s["warmup"])
    out = [row("ceiling", "device copy", ms, 2 * src.numel() * 2, "byte")]
    del src, dst
    m = s["mm"]
    a = torch.randn(m, m, device=dev).to(torch.bfloat16)
    b = torch.randn(m, m, device=dev).to(torch.bfloat16)
    ms = median_ms(lambda: a @ b, dev, s["reps"], s["warmup"])
    out.append(row("ceiling", "bf16 matmul (cuBLAS)", ms, 2 * m**3, "flop"))
    return out


def cross_products(dev, s) -> list:
    """StreamingCKA's per-chunk op on (chunk_layers, chunk_rows, d) bf16 chunks of the 32-layer, 65536-row run."""
    L, n, d = s["chunk_layers"], s["chunk_rows"], s["d"]
    x = torch.randn(L, n, d, device=dev).to(torch.bfloat16)  # (L, n, d)
    y = (x.float() + 0.5 * torch.randn(L, n, d, device=dev)).to(torch.bfloat16)  # (L, n, d)
    x[..., :4] += 1000  # massive-activation columns
    sx, sy = x.mean(-2, dtype=torch.float32), y.mean(-2, dtype=torch.float32)
    flops = L * (2 * n * d * d + 2 * n * d * (d + 1))  # X'^T Y' + one triangle each of X'^T X', Y'^T Y'
    chunks = (s["layers"] // L) * (s["rows"] // n)
    out = []
    for deb in (False, True):
        for backend in ("triton", "torch"):
            f = op("shifted_cross_products", dev, backend)
            ms = median_ms(lambda: f(x, y, sx, sy, deb), dev, s["reps"], s["warmup"])
            out.append(row("cross_products", f"{backend} debiased={deb}", ms, flops, "flop",
                           full_run_s=ms * chunks / 1e3))
    xs, ys = (x - sx.unsqueeze(1)).to(torch.bfloat16), (y - sy.unsqueeze(1)).to(torch.bfloat16)

    def cublas():
        xt = xs.transpose(1, 2)
        return torch.bmm(xt, ys), torch.bmm(xt, xs), torch.bmm(ys.transpose(1, 2), ys)

    ms = median_ms(cublas, dev, s["reps"], s["warmup"])
    out.append(row("cross_products", "cuBLAS bmm on pre-shifted bf16 (3 full products)", ms, flops, "flop",
                   full_run_s=ms * chunks / 1e3))
    # the torch composite's symmetric product (column panels) against one full bmm, float32 as it runs there
    xs32, sym = xs.float(), L * n * d * (d + 1)  # one triangle of X'^T X'
    ms = median_ms(lambda: _ops.column_gram(xs32), dev, s["reps"], s["warmup"])
    out.append(row("cross_products", "torch column_gram fp32 (X'^T X' by column panels)", ms, sym, "flop"))
    ms = median_ms(lambda: torch.bmm(xs32.transpose(1, 2), xs32), dev, s["reps"], s["warmup"])
    out.append(row("cross_products", "torch bmm fp32 (X'^T X' in full)", ms, sym, "flop"))
    return out


def centered_gram(dev, s) -> list:
    L, n, d = s["gram_layers"], s["gram_n"], s["d"]
    x = torch.randn(L, n, d, device=dev).to(torch.bfloat16)
    flops = L * n * (n + 1) * d  # one triangle of Xc Xc^T
    out = []
    for unbiased in (False, True):
        for backend in ("triton", "torch"):
            f = op("centered_gram", dev, backend)
            ms = median_ms(lambda: f(x, unbiased), dev, s["reps"], s["warmup"])
            out.append(row("centered_gram", f"{backend} unbiased={unbiased}", ms, flops, "flop"))
    return out


def per_sample_fisher(dev, s) -> list:
    B, T, n_in, n_out = s["fisher"]
    x = torch.randn(B, T, n_in, device=dev).to(torch.bfloat16)
    g = torch.randn(B, T, n_out, device=dev).to(torch.bfloat16)
    mask = torch.rand(B, T, device=dev) > 0.1
    acc = torch.zeros(n_out, n_in, device=dev)
    flops = 2 * B * T * n_in * n_out
    out = []
    for backend in ("triton", "torch"):
        f = op("per_sample_linear_fisher", dev, backend)
        ms = median_ms(lambda: f(x, g, mask, acc), dev, s["reps"], s["warmup"])
        out.append(row("per_sample_fisher", backend, ms, flops, "flop"))
    w = torch.zeros(n_out, n_in, device=dev)
    xm = (x * mask.unsqueeze(-1)).float()  # (B, T, in)
    gf = g.float()

    def loss(weight, xs, gs):  # d loss / d W = gs^T xs: the per-sample linear-layer gradient
        return ((xs @ weight.T) * gs).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))

    def func_fisher():
        return per_sample(w, xm, gf).square().sum(0)  # (out, in), materialises B x out x in

    ms = median_ms(func_fisher, dev, s["reps"], s["warmup"])
    out.append(row("per_sample_fisher", "torch.func vmap(grad) per-sample grads", ms, flops, "flop"))
    return out


def square_accumulate(dev, s) -> list:
    grads = [torch.randn(s["sq_numel"], device=dev).to(torch.bfloat16) for _ in range(s["sq_tensors"])]
    accs = [torch.zeros(s["sq_numel"], device=dev) for _ in range(s["sq_tensors"])]
    nbytes = sum(g.numel() * (2 + 4 + 4) for g in grads)  # read grad, read + write acc
    out = []
    for backend in ("triton", "cuda", "torch"):
        if backend != "torch" and not have(backend, dev):
            out.append(dict(section="square_accumulate", impl=backend, note=_dispatch.backend_available(backend, dev)[1]))
            continue
        f = op("square_accumulate", dev, backend)
        ms = median_ms(lambda: f(accs, grads, 0.5), dev, s["reps"], s["warmup"])
        out.append(row("square_accumulate", backend, ms, nbytes, "byte"))
    ms = median_ms(lambda: torch._foreach_addcmul_(accs, grads, grads, value=0.5), dev, s["reps"], s["warmup"])
    out.append(row("square_accumulate", "torch._foreach_addcmul_ (bf16 square, not exact)", ms, nbytes, "byte"))
    return out


def _subspace_error(v: torch.Tensor, exact: torch.Tensor) -> float:
    """1 - mean cosine of the principal angles between row spaces v (k, d) and exact (k, d)."""
    return float(1 - torch.linalg.svdvals(v.double() @ exact.double().T).mean())


def pca(dev, s) -> list:
    n, d, r, k = s["rows"], s["d"], s["pca_rank"], s["pca_k"]
    gen = torch.Generator(device=dev).manual_seed(0)
    scales = torch.logspace(1, -1, r, device=dev)  # decaying spectrum
    z = torch.randn(n, r, device=dev, generator=gen) * scales  # (n, r)
    basis = torch.linalg.qr(torch.randn(d, r, device=dev, generator=gen)).Q  # (d, r)
    x = (z @ basis.T + 0.05 * torch.randn(n, d, device=dev, generator=gen)).to(torch.bfloat16)  # (n, d)
    x[:, :4] += 1000
    xf = x.float()
    mu = xf.mean(0)
    cov = (xf - mu).T @ (xf - mu)  # (d, d) exact covariance, for the reference subspace
    exact = torch.linalg.eigh(cov.double()).eigenvectors[:, -k:].T.float()  # (k, d)
    del cov
    out = []
    for backend in ("triton", "torch"):
        ms = median_ms(lambda: randomized_pca(x, k, backend=backend), dev, s["reps"], s["warmup"])
        err = _subspace_error(randomized_pca(x, k, backend=backend).components, exact)
        out.append(row("randomized_pca", f"{backend} (bf16 in)", ms, 2 * 12 * n * d * (k + 10), "flop", subspace_err=err))
    ms = median_ms(lambda: torch.pca_lowrank(xf, q=k + 10, center=True, niter=4), dev, s["reps"], s["warmup"])
    v = torch.pca_lowrank(xf, q=k + 10, center=True, niter=4)[2][:, :k].T
    out.append(row("randomized_pca", "torch.pca_lowrank (fp32 copy)", ms, 2 * 12 * n * d * (k + 10), "flop",
                   subspace_err=_subspace_error(v, exact)))
    return out


def histogram(dev, s) -> list:
    v = torch.rand(s["hist_numel"], device=dev).square_()  # values in [0, 1), many small
    out = []
    for backend in ("cuda", "torch"):
        if backend != "torch" and not have(backend, dev):
            out.append(dict(section="histogram", impl=backend, note=_dispatch.backend_available(backend, dev)[1]))
            continue
        f = op("histogram", dev, backend)
        ms = median_ms(lambda: f(v, 1e-6, 1.0, 64, True), dev, s["reps"], s["warmup"])
        out.append(row("histogram", f"{backend} log bins", ms, v.numel() * 4, "byte"))
    ms = median_ms(lambda: torch.histc(v.log10(), bins=64, min=-6, max=0), dev, s["reps"], s["warmup"])
    out.append(row("histogram", "torch.histc(log10 v)", ms, v.numel() * 4, "byte"))
    return out


SECTIONS = {"ceilings": ceilings, "cross_products": cross_products, "centered_gram": centered_gram,
            "per_sample_fisher": per_sample_fisher, "square_accumulate": square_accumulate, "pca": pca,
            "histogram": histogram}


# --------------------------------------------------------------------------- report


def judge(rows: list) -> list:
    """Fraction of the measured ceiling for each timed row; speed-ups and target verdicts."""
    ceil = {"copy": next((r["rate"] for r in rows if r.get("impl") == "device copy"), None),
            "matmul": next((r["rate"] for r in rows if r.get("impl", "").startswith("bf16 matmul")), None)}
    for r in rows:
        if "rate" not in r:
            continue
        c = ceil["copy"] if r["unit"] == "byte" else ceil["matmul"]
        r["of_ceiling"] = r["rate"] / c if c else None
    verdicts = []
    for section, (kind, frac) in TARGETS.items():
        ours = [r for r in rows if r.get("section") == section and r["impl"].startswith("triton") and "rate" in r]
        if ours and ceil[kind]:
            best = max(r["of_ceiling"] for r in ours)
            verdicts.append(dict(target=f"{section} >= {frac:.0%} of {kind}", got=f"{best:.0%}", met=best >= frac))
    by = {(r["section"], r["impl"]): r for r in rows if "ms" in r}
    fisher_ours, fisher_func = by.get(("per_sample_fisher", "triton")), by.get(
        ("per_sample_fisher", "torch.func vmap(grad) per-sample grads"))
    if fisher_ours and fisher_func:
        sp = fisher_func["ms"] / fisher_ours["ms"]
        verdicts.append(dict(target="per_sample_fisher >= 3x torch.func", got=f"{sp:.1f}x", met=sp >= 3))
    pca_ours, pca_ref = by.get(("randomized_pca", "triton (bf16 in)")), by.get(("randomized_pca", "torch.pca_lowrank (fp32 copy)"))
    if pca_ours and pca_ref:
        sp = pca_ref["ms"] / pca_ours["ms"]
        equal = pca_ours["subspace_err"] <= max(pca_ref["subspace_err"] * 1.5, 1e-6)
        verdicts.append(dict(target="randomized_pca >= 2x torch.pca_lowrank at equal subspace error",
                             got=f"{sp:.1f}x, err {pca_ours['subspace_err']:.1e} vs {pca_ref['subspace_err']:.1e}",
                             met=sp >= 2 and equal))
    return verdicts


def print_table(rows: list, verdicts: list) -> None:
    print(f"{'section':<18} {'impl':<52} {'ms':>10} {'rate':>12} {'of ceil':>8}")
    for r in rows:
        if "ms" not in r:
            print(f"{r['section']:<18} {r['impl']:<52} {'skipped: ' + r.get('note', '')}")
            continue
        unit = "TFLOP/s" if r["unit"] == "flop" else "GB/s"
        frac = f"{r['of_ceiling']:.0%}" if r.get("of_ceiling") else "-"
        print(f"{r['section']:<18} {r['impl'][:52]:<52} {r['ms']:>10.3f} {r['rate']:>7.1f} {unit:<4} {frac:>8}")
    for v in verdicts:
        print(f"TARGET {'MET ' if v['met'] else 'MISS'} {v['target']}: {v['got']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny CPU shapes under the Triton interpreter")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    ap.add_argument("--out", default=os.environ.get("OUT"), help="directory for bench_gpu.json (default $OUT)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda" and not args.dry_run:
        ap.error("no CUDA device: use --dry-run")
    unknown = [n for n in args.sections.split(",") if n not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    shapes = TINY if args.dry_run else FULL
    rows, budget = [], {}
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        rows.extend(SECTIONS[name](dev, shapes))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        budget[name] = time.perf_counter() - t0
        print(f"[{name}] {budget[name]:.1f} s", file=sys.stderr, flush=True)
    verdicts = judge(rows)
    info = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (dry run, interpreter)",
                torch=torch.__version__, dry_run=args.dry_run, shapes=shapes, seconds=budget, date=time.strftime("%F"))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_gpu.json"), "w") as fh:
            json.dump(dict(info=info, rows=rows, verdicts=verdicts), fh, indent=1)
    print_table(rows, verdicts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
