"""Log-sum-exp merge of attention partials.

A partial over key set K_i gives o_i = sum_j softmax_i(s)_j v_j and lse_i = log sum_{j in K_i} e^{s_j}.
Over the union: lse = log sum_i e^{lse_i}, o = sum_i e^{lse_i - lse} o_i. Done in float32 with the
max subtracted, so it is exact up to rounding. A partial over no keys has lse = -inf and weight
0; when every partial is empty the result is o = 0, lse = -inf (not NaN).

Legend: t tokens, h heads, d head_dim; p partials.
"""
from __future__ import annotations

import torch


def merge_partials(o_pthd: torch.Tensor, lse_pth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merges P partials: o [P, T, H, D] (any float dtype), lse [P, T, H] fp32 -> o fp32, lse fp32."""
    lse_max_th = lse_pth.max(dim=0).values
    # Where every partial is empty, lse_max is -inf: shift by 0 instead, so weights stay 0.
    safe_max_th = torch.where(torch.isinf(lse_max_th), torch.zeros_like(lse_max_th), lse_max_th)
    weight_pth = torch.exp(lse_pth - safe_max_th)
    total_th = weight_pth.sum(dim=0)
    lse_th = safe_max_th + torch.log(total_th)
    weight_pth = weight_pth / total_th.clamp_min(torch.finfo(torch.float32).tiny)
    o_thd = (weight_pth.unsqueeze(-1) * o_pthd.float()).sum(dim=0)
    return o_thd, lse_th


class PartialAccumulator:
    """Running merge of partials (ring steps arrive one at a time), fp32, in place.

    It starts from the first partial, which must cover every row (the ring's step 0 does), so a
    single-step attention costs no merge at all."""

    def __init__(self, o_thd: torch.Tensor, lse_th: torch.Tensor):
        self.o_thd = o_thd.float()
        self.lse_th = lse_th

    def add(self, rows: slice, o_thd: torch.Tensor, lse_th: torch.Tensor) -> None:
        """Merges a partial for tokens `rows` into the running result."""
        old_o, old_lse = self.o_thd[rows], self.lse_th[rows]
        new_lse = torch.logaddexp(old_lse, lse_th)
        safe = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
        old_o.mul_(torch.exp(old_lse - safe).unsqueeze(-1))
        old_o.add_(torch.exp(lse_th - safe).unsqueeze(-1) * o_thd.float())
        self.lse_th[rows] = new_lse
