"""Block-wise memories: divide a feature map into blocks and assemble them back (static Reshape/Transpose, in
F.unfold's order), the paper's learned memory (`BlockMemory`, soft or hard read-out) and the principal components
the feature models project on. The product's bank of normal blocks is `train.memory_model.NearestBlockMemory`."""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

NORM_EPS = 1e-4  # >= 1e-4 so half precision does not round it to zero (NaN in TensorRT FP16)
NEAREST_CHUNK = 2048  # queries per similarity chunk in hard read-out (2048 x 30 000 items = 240 MB)
PCA_CHUNK = 64  # images per chunk when accumulating the feature covariance


def divide(x: torch.Tensor, bh: int, bw: int, bc: int) -> torch.Tensor:
    """(B, C, H, W) -> (B*nC*nH*nW, bc*bh*bw): one row per block, in F.unfold's element order."""
    b, c, h, w = x.shape
    nc, nh, nw = c // bc, h // bh, w // bw
    x = x.reshape(b, nc, bc, nh, bh, nw, bw)
    x = x.permute(0, 1, 3, 5, 2, 4, 6)  # (B, nC, nH, nW, bc, bh, bw)
    return x.reshape(b * nc * nh * nw, bc * bh * bw)


def assemble(blocks: torch.Tensor, shape: Tuple[int, int, int, int], bh: int, bw: int, bc: int) -> torch.Tensor:
    """Inverse of `divide`: (B*nC*nH*nW, bc*bh*bw) -> (B, C, H, W)."""
    b, c, h, w = shape
    nc, nh, nw = c // bc, h // bh, w // bw
    x = blocks.reshape(b, nc, nh, nw, bc, bh, bw)
    x = x.permute(0, 1, 4, 2, 5, 3, 6)  # (B, nC, bc, nH, bh, nW, bw)
    return x.reshape(b, c, h, w)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    # Division by a clamped norm: F.normalize adds Shape/Expand nodes to the exported graph.
    return x / torch.clamp(torch.sqrt((x * x).sum(dim=-1, keepdim=True)), min=NORM_EPS)


class BlockMemory(nn.Module):
    """Divide a feature map into r_h x r_w x r_c blocks, rebuild each from N learned items, assemble.

    Soft read-out: w_i = softmax_i(cos(q, m_i) / T), optionally hard-shrunk (MemAE), q_hat = sum_i w_i m_i.
    Hard read-out: q_hat = the item of highest cosine (a blend of items rebuilds an unseen block too well;
    the nearest normal item does not); in training, gradients reach the queries through the soft weights
    (straight-through), so the encoder still learns.
    """

    def __init__(self, channels: int, block: Tuple[int, int, int], items: int, temperature: float,
                 shrink_threshold: float = 0.0, readout: str = "soft") -> None:
        super().__init__()
        bh, bw, bc = block
        self.bh, self.bw, self.bc = bh, bw, bc or channels
        self.temperature = temperature
        self.shrink_threshold = shrink_threshold
        self.hard = readout == "hard"
        dim = self.bc * bh * bw
        self.items = nn.Parameter(torch.randn(items, dim) / math.sqrt(dim))  # learned by back-propagation

    def address(self, queries: torch.Tensor) -> torch.Tensor:
        """(Q, D) queries -> (Q, N) addressing weights, each row summing to one."""
        similarity = l2_normalize(queries) @ l2_normalize(self.items).t()
        weights = torch.softmax(similarity / self.temperature, dim=-1)
        if self.shrink_threshold > 0:
            shifted = weights - self.shrink_threshold
            weights = F.relu(shifted) * weights / (torch.abs(shifted) + NORM_EPS)
            weights = weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=NORM_EPS)
        return weights

    def item_norms(self, items_t: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.linalg.vector_norm(items_t, dim=0), min=NORM_EPS)  # ReduceL2: folded at export

    def nearest(self, queries: torch.Tensor) -> torch.Tensor:
        """(Q, D) queries -> (Q,) index of the item of highest cosine similarity, q/|q| . m / |m|: the
        items' norms divide the dot products (the graph's formula, see `nearest_items_in_graph`)."""
        with torch.no_grad():  # in chunks: (Q, N) similarities of a large memory do not fit at once
            items_t = self.items.t()
            norms = self.item_norms(items_t)
            return torch.cat([((l2_normalize(q) @ items_t) / norms).argmax(dim=-1) for q in queries.split(NEAREST_CHUNK)])

    def nearest_items_in_graph(self, queries: torch.Tensor) -> torch.Tensor:
        """Hard read-out as exported: the items enter the graph once, as one (D, N) constant that both the
        similarity MatMul and the Gather read (a normalised copy would double a memory of hundreds of MB)."""
        items_t = self.items.t()
        index = ((l2_normalize(queries) @ items_t) / self.item_norms(items_t)).argmax(dim=-1)  # ArgMax: TensorRT-parsable
        return items_t.index_select(1, index).t()  # Gather on axis 1, then a transpose of the (small) read-out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape)
        queries = divide(x, self.bh, self.bw, self.bc)
        if not self.hard:
            readout = self.address(queries) @ self.items
        else:
            exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
            readout = self.nearest_items_in_graph(queries) if exporting else self.items[self.nearest(queries)]
            if self.training and queries.requires_grad:
                soft = self.address(queries) @ self.items
                readout = soft + (readout - soft).detach()  # forward: the nearest item; backward: the soft weights
        return assemble(readout, shape, self.bh, self.bw, self.bc)  # type: ignore[arg-type]


def principal_components(raw: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dims: int) -> torch.Tensor:
    """(dims, C): the top principal components of every standardised feature vector of (B, C, h, w)."""
    c = raw.shape[1]
    cov = torch.zeros(c, c, dtype=torch.float64)
    for chunk in raw.split(PCA_CHUNK):  # (C, C) accumulated: all vectors at once need GBs
        z = ((chunk - mean.to(chunk)) / std.to(chunk)).permute(0, 2, 3, 1).reshape(-1, c).double().cpu()
        cov += z.t() @ z
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues; the mean is zero after standardisation
    return vectors[:, -dims:].flip(1).t()  # largest variance first
