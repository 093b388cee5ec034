"""Why teaching a few frames of a new condition moved its false alarms so little: measured on validation data only.

The scenario of bench_teach.py (magnetic_tile, exposure --new-exposure kept from the fit, its pixels times a gain);
NEW-EVAL (held-out tiles) and the defects are never looked at here. NEW-TEACH (training tiles photographed at the
new exposure) is split by tile into POOL (frames that may be taught) and VAL (frames that must not score high
after teaching, never taught). The checkpoint's PyTorch model scores from cached projected features, so a memory
can be changed without re-running the backbone:
  gains    false alarms on POOL + VAL at the calibrated threshold (CAL, 5 %) for several gains: the scenario;
  terms    which term (block memory M or coarse memory C) makes the image score of VAL frames, before/after;
  nearest  distance of VAL blocks to their nearest old item, nearest taught item on the memory's block grid,
           and nearest taught block at any of the 16 grid phases;
  teach    FA on VAL and on the taught frames for K = 5, 20, 40 under teaching variants, and with the frames
           taught without the gain (what bench_teach.py did before: it taught the original files).

    python -m benchmarks.research.diag_teach --work /tmp/bench_teach --gains 1.0 1.2 1.3 1.5 --gain 1.3
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from benchmarks import bench_teach
from benchmarks.bench_teach import REPO
from calibration import stats

K_VALUES = (5, 20, 40)


def read_with_gain(path: Path, gain: float) -> np.ndarray:
    from engine.preprocess import read_image

    image = read_image(path)
    return image if gain == 1.0 else np.clip(image.astype(np.float32) * gain, 0, 255).astype(np.uint8)


def features(model: Any, spec: Any, files: Sequence[Path], gain: float, cache: Path) -> Tuple[np.ndarray, np.ndarray]:
    """Projected 1/8 features (N, 64, 32, 32) and projected 1/32 features (N, 64, 8, 8), float16, cached."""
    import torch

    from engine.preprocess import preprocess_batch

    key = hashlib.sha1(("|".join(map(str, files)) + f"|{gain}").encode()).hexdigest()[:16]
    path = cache / f"feat-{key}.npz"
    if path.is_file():
        z = np.load(path)
        return z["fine"], z["coarse"]
    fine, coarse = [], []
    with torch.no_grad():
        for start in range(0, len(files), 16):
            x = torch.from_numpy(preprocess_batch([read_with_gain(f, gain) for f in files[start:start + 16]], spec))
            f, c = model.features(x)
            fine.append(model.project(f).half().numpy())
            coarse.append(model.project_coarse(c).half().numpy())
    cache.mkdir(parents=True, exist_ok=True)
    out = np.concatenate(fine), np.concatenate(coarse)
    np.savez(path, fine=out[0], coarse=out[1])
    return out


def blocks(fine: np.ndarray, phase: Tuple[int, int] = (0, 0), block: int = 4) -> np.ndarray:
    """(N, C, H, W) -> (N * nH * nW, C * block * block) rows as train.memory.divide makes them, the grid shifted by
    `phase` cells (the rows and columns the shifted grid does not cover are left out)."""
    dy, dx = phase
    n, c, h, w = fine.shape
    nh, nw = (h - dy) // block, (w - dx) // block
    x = fine[:, :, dy:dy + nh * block, dx:dx + nw * block].reshape(n, c, nh, block, nw, block)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(n * nh * nw, c * block * block).astype(np.float32)


def all_phase_blocks(fine: np.ndarray, block: int = 4) -> np.ndarray:
    return np.concatenate([blocks(fine, (dy, dx), block) for dy in range(block) for dx in range(block)])


def coarse_rows(coarse: np.ndarray) -> np.ndarray:
    n, c, h, w = coarse.shape
    return coarse.transpose(0, 2, 3, 1).reshape(n * h * w, c).astype(np.float32)


def nearest_sq(q: np.ndarray, items: np.ndarray) -> np.ndarray:
    from calibration.teach import nearest_other_distances

    return nearest_other_distances(q, items, exclude_self=False)[0]


class Scorer:
    """The checkpoint's map and image score from projected features, with memories set from numpy rows."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.base_block = model.block_memory.items_t.numpy().T.copy()
        self.base_coarse = model.coarse_memory.items_t.numpy().T.copy()

    def score(self, fine: np.ndarray, coarse: np.ndarray, block_items: np.ndarray, coarse_items: np.ndarray
              ) -> Dict[str, np.ndarray]:
        import torch

        m = self.model
        m.block_memory.set_items(torch.from_numpy(block_items))
        m.coarse_memory.set_items(torch.from_numpy(coarse_items))
        out: Dict[str, List[np.ndarray]] = {"score": [], "m_top": [], "c_top": []}
        with torch.no_grad():
            for s in range(0, len(fine), 32):
                f = torch.from_numpy(fine[s:s + 32].astype(np.float32))
                c = torch.from_numpy(coarse[s:s + 32].astype(np.float32))
                mm = m.to_image_size(m.block_memory(f))
                cm = m.to_image_size(m.coarse_memory(c))
                delta = m.cfg.coarse_memory_weight
                mt, ct = m.smooth((1 - delta) * mm / m.m_scale), m.smooth(delta * cm / m.c_scale)
                amap = mt + ct  # smoothing is linear: the two terms add up to the scored map
                flat = amap.reshape(len(f), -1)
                top = torch.topk(flat, m.topk, dim=1).indices
                out["score"].append(m.image_score(amap).numpy())
                out["m_top"].append(torch.gather(mt.reshape(len(f), -1), 1, top).mean(dim=1).numpy())
                out["c_top"].append(torch.gather(ct.reshape(len(f), -1), 1, top).mean(dim=1).numpy())
        return {k: np.concatenate(v) for k, v in out.items()}



def round_robin(samples: Sequence[Any], groups: Any) -> List[int]:
    by: Dict[str, List[int]] = {}
    for i, s in enumerate(samples):
        by.setdefault(groups.group(s), []).append(i)
    lists = [by[g] for g in sorted(by)]
    order: List[int] = []
    for i in range(max(len(v) for v in lists)):
        order.extend(v[i] for v in lists if i < len(v))
    return order


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, default=Path("/work/shared/datasets/magnetic_tile"))
    ap.add_argument("--groups", type=Path, default=REPO / "benchmarks" / "groups" / "magnetic_tile.csv")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_teach"))
    ap.add_argument("--new-exposure", type=int, default=6)
    ap.add_argument("--gains", type=float, nargs="+", default=[1.0, 1.2, 1.3, 1.5])
    ap.add_argument("--gain", type=float, default=1.3, help="the gain the teaching experiments use")
    ap.add_argument("--false-alarm-rate", type=float, default=0.05)
    ap.add_argument("--quick", action="store_true", help="teaching variants: as built and the old bug only")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    args.new_gain = 1.0
    from train.checkpoint import load_model

    setup = bench_teach.prepare(args)
    spec = bench_teach.load_bundle(setup.bundle).preprocess
    model, _ = load_model(args.work / "run" / "last.pt")
    model.eval()
    scorer = Scorer(model)
    cache = args.work / "diag_cache"
    teach_samples = setup.parts["NEW-TEACH"]
    tiles = sorted({setup.groups.group(s) for s in teach_samples})
    val_tiles = {t for t in tiles if int(hashlib.sha1(t.encode()).hexdigest(), 16) % 2 == 1}
    pool = [s for s in teach_samples if setup.groups.group(s) not in val_tiles]
    val = [s for s in teach_samples if setup.groups.group(s) in val_tiles]
    res: Dict[str, Any] = {"gain": args.gain, "pool": len(pool), "val": len(val), "val_tiles": len(val_tiles)}
    cal_f = features(model, spec, [s.image for s in setup.parts["CAL"]], 1.0, cache)
    cal = scorer.score(*cal_f, scorer.base_block, scorer.base_coarse)
    threshold = stats.quantile_threshold(cal["score"], args.false_alarm_rate).threshold
    res["threshold"] = threshold
    print(f"threshold {threshold:.4g}; CAL terms at the top 1 %: M {np.median(cal['m_top']):.3g}, "
          f"C {np.median(cal['c_top']):.3g} (medians); POOL {len(pool)}, VAL {len(val)} frames")
    res["gains"] = {}
    for g in args.gains:
        f = features(model, spec, [s.image for s in teach_samples], g, cache)
        s = scorer.score(*f, scorer.base_block, scorer.base_coarse)
        fa = float(np.mean(s["score"] > threshold))
        res["gains"][g] = {"fa": fa, "m_top": float(np.median(s["m_top"])), "c_top": float(np.median(s["c_top"]))}
        print(f"gain {g:g}: FA on NEW-TEACH {fa:.1%}; top-1% terms M {np.median(s['m_top']):.3g} C {np.median(s['c_top']):.3g}")

    pool_f = features(model, spec, [s.image for s in pool], args.gain, cache)
    val_f = features(model, spec, [s.image for s in val], args.gain, cache)
    order = round_robin(pool, setup.groups)
    base_val = scorer.score(*val_f, scorer.base_block, scorer.base_coarse)
    print(f"VAL at gain {args.gain:g}: FA {np.mean(base_val['score'] > threshold):.1%}, M {np.median(base_val['m_top']):.3g}"
          f" C {np.median(base_val['c_top']):.3g}")

    # nearest distances of VAL blocks (on the grid) to old items / taught blocks (grid, all phases), K = 20
    k = 20
    taught_fine = pool_f[0][order[:k]]
    vq = blocks(val_f[0])
    d_old = nearest_sq(vq, scorer.base_block)
    d_grid = nearest_sq(vq, blocks(taught_fine))
    d_all = nearest_sq(vq, all_phase_blocks(taught_fine))
    cq = coarse_rows(val_f[1])
    dc_old = nearest_sq(cq, scorer.base_coarse)
    dc_new = nearest_sq(cq, coarse_rows(pool_f[1][order[:k]]))
    cal_q = blocks(cal_f[0])
    res["nearest_k20"] = {q: float(np.median(v)) for q, v in [
        ("val_block_old", d_old), ("val_block_taught_grid", d_grid), ("val_block_taught_all_phases", d_all),
        ("val_coarse_old", dc_old), ("val_coarse_taught", dc_new), ("cal_block_old", nearest_sq(cal_q[::7], scorer.base_block)),
        ("cal_coarse_old", nearest_sq(coarse_rows(cal_f[1])[::7], scorer.base_coarse))]}
    res["nearest_k20"]["share_val_blocks_nearer_taught_grid"] = float(np.mean(d_grid < d_old))
    res["nearest_k20"]["share_val_blocks_nearer_taught_all"] = float(np.mean(d_all < d_old))
    res["nearest_k20"]["share_val_coarse_nearer_taught"] = float(np.mean(dc_new < dc_old))
    print("nearest (median squared distance), K=20:", json.dumps({a: round(b, 2) for a, b in res["nearest_k20"].items()}))

    variants = {
        "as built (grid blocks, both memories)": lambda f, c: (blocks(f), coarse_rows(c)),
        "block memory only": lambda f, c: (blocks(f), None),
        "coarse memory only": lambda f, c: (None, coarse_rows(c)),
        "block memory at 16 grid phases + coarse": lambda f, c: (all_phase_blocks(f), coarse_rows(c)),
    }
    variants["frames taught without the gain (bench_teach's old bug)"] = variants["as built (grid blocks, both memories)"]
    if args.quick:
        variants = {k: v for k, v in variants.items() if k.startswith(("as built", "frames taught without"))}
    plain_f = features(model, spec, [s.image for s in pool], 1.0, cache)
    res["teach"] = {}
    for name, fn in variants.items():
        rows = []
        source = plain_f if "bug" in name else pool_f
        for k in K_VALUES:
            idx = order[:k]
            b, c = fn(source[0][idx], source[1][idx])
            bi = scorer.base_block if b is None else np.concatenate([scorer.base_block, b])
            ci = scorer.base_coarse if c is None else np.concatenate([scorer.base_coarse, c])
            t = time.perf_counter()
            v = scorer.score(*val_f, bi, ci)
            taught = scorer.score(source[0][idx], source[1][idx], bi, ci)
            calk = scorer.score(*cal_f, bi, ci)
            rows.append({"K": k, "block_items": len(bi), "coarse_items": len(ci),
                         "fa_val": float(np.mean(v["score"] > threshold)),
                         "fa_taught": float(np.mean(taught["score"] > threshold)),
                         "fa_cal": float(np.mean(calk["score"] > threshold)),
                         "val_m_top": float(np.median(v["m_top"])), "val_c_top": float(np.median(v["c_top"])),
                         "s": time.perf_counter() - t})
            r = rows[-1]
            print(f"{name:<42} K={k:<3} items {r['block_items']:>6}/{r['coarse_items']:<6} FA VAL {r['fa_val']:6.1%} "
                  f"taught {r['fa_taught']:6.1%} CAL {r['fa_cal']:6.1%}  VAL top M {r['val_m_top']:.3g} C {r['val_c_top']:.3g}")
        res["teach"][name] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"diag_teach-magnetic_tile-g{args.gain:g}.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
