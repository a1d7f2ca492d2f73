"""The training loss: next-token cross-entropy summed over labelled positions, plain or chunked.

Why a chunked loss: with a 128k-152k vocabulary (Llama 3, Qwen) the logits are the largest
activation of a QLoRA step. The plain path holds them several times over: the head's output in
the compute dtype, its fp32 copy for a stable softmax, the fp32 gradient and its compute-dtype
copy (~12 bytes per position per vocabulary entry; 0.9 GB for 512 positions at 151k).

``chunked`` never builds them. It runs *inside the output head's forward* (the head's
``forward`` is replaced once, before the strategy wraps the model), so every strategy has the
head weight at hand exactly as for the plain head: replicated under DDP, unsharded by FSDP2's
root pre-forward when the base is sharded, gathered by DeepSpeed ZeRO-3's module hooks. There
it keeps only the labelled positions (prompt and padding rows never reach the head), and for
each chunk of them computes the logits, the loss and, at once, the gradients with respect to the
hidden states (and to the head weight if it trains), as Liger's fused linear cross-entropy
does: the backward only scales the stored gradients, so the head's matmul runs twice per
labelled token (like the plain loss) instead of three times (like recomputing losses), and
ZeRO-3 never has to gather the head again for the backward. Peak memory of the loss is one
chunk's logits (``CHUNK_ELEMENTS`` fp32 values, 64 MiB; with their compute-dtype form in bf16)
instead of all of them: the log-sum-exp and the softmax are taken in place over the chunk, in
buffers every chunk of a step reuses, and the last chunk is padded to a few fixed sizes, so
neither the allocator nor oneDNN's per-shape kernels grow with the number of labelled positions.

Numerics equal the plain path's: the head's matmul in the compute dtype (autocast's), the
softmax and loss in fp32, the gradient rounded to the compute dtype before its matmuls.

The loop never asks which loss runs; strategies never see it (DESIGN.md).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .plan.shapes import CHUNK_ELEMENTS, LOGIT_TRANSFORMS

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy over labelled positions, number of those positions)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return loss, (shift_labels != IGNORE_INDEX).sum()


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), gradients computed in the forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int, dtype: torch.dtype) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(dtype)
        acc = torch.promote_types(dtype, torch.float32)  # softmax and loss at least in fp32
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        # One buffer for every chunk's fp32 logits (and one for their compute-dtype forms), so a
        # step's chunks reuse the same memory instead of allocating and freeing ~100 MB each:
        # on CPU freed blocks of varying size fragmented glibc's heap (RSS grew with every new
        # count of labelled positions, measured).
        rows_max = min(chunk, -(-hidden.shape[0] // ALIGN_ROWS) * ALIGN_ROWS)
        buf = torch.empty((rows_max, weight.shape[0]), dtype=acc, device=hidden.device)
        low = None if dtype == acc else torch.empty(buf.shape, dtype=dtype, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are explicit here
            for s in range(0, hidden.shape[0], chunk):
                h, t, n = _padded(hidden[s:s + chunk].to(dtype), targets[s:s + chunk], chunk)
                m = h.shape[0]
                logits = buf[:m]
                if low is None:
                    torch.mm(h, w.t(), out=logits)
                else:
                    torch.mm(h, w.t(), out=low[:m])
                    logits.copy_(low[:m])
                rows = torch.arange(m, device=t.device)
                picked = logits[rows, t]
                # log-sum-exp and softmax in place: torch.logsumexp would allocate two more
                # chunk-sized temporaries (3x the chunk's bytes at the peak, measured)
                top = logits.amax(dim=-1, keepdim=True)
                norm = logits.sub_(top).exp_().sum(dim=-1, keepdim=True)
                total += (top.squeeze(-1) + norm.log().squeeze(-1) - picked)[:n].sum()
                if need_h or need_w:
                    # d loss / d logits = softmax - onehot (padding rows: zero inputs, results dropped)
                    g = logits.div_(norm)
                    g[rows, t] -= 1.0
                    if low is not None:
                        g = low[:m].copy_(g)
                    if need_h:
                        grad_h[s:s + n] = (g @ w)[:n].to(hidden.dtype)
                    if need_w:
                        grad_w.addmm_(g[:n].t().to(acc), h[:n].to(acc))
        ctx.save_for_backward(*(x for x in (grad_h, grad_w) if x is not None))
        ctx.need = (need_h, need_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.need
        grad_h = saved.pop(0) * grad_out if need_h else None  # a 0-d factor keeps the dtype
        grad_w = (saved.pop(0) * grad_out).to(ctx.weight_dtype) if need_w else None
        return grad_h, grad_w, None, None, None


#: The last chunk's rows are padded to a multiple of this: the number of labelled positions
#: changes every micro-batch, and on CPU oneDNN compiles and keeps a kernel per matmul shape
#: (for a 151k-row weight ~30 MB each in bf16: memory grew every step, measured), so the
#: shapes come from a handful (chunk / ALIGN) instead. GPUs' GEMMs gain from it too.
ALIGN_ROWS = 32


def _padded(h: torch.Tensor, t: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(rows, targets) padded with zero rows (target 0) to ALIGN_ROWS' multiple, and the count
    of real rows; full chunks as they are."""
    n = h.shape[0]
    m = min(chunk, -(-n // ALIGN_ROWS) * ALIGN_ROWS)
    if m == n:
        return h, t, n
    return torch.cat([h, h.new_zeros(m - n, h.shape[1])]), torch.cat([t, t.new_zeros(m - n)]), n


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk: Optional[int] = None) -> torch.Tensor:
    """Sum of cross-entropy of ``hidden @ weight.T`` against ``targets`` (no ignored entries:
    select the labelled positions first), without materialising more than one chunk of logits."""
    if chunk is None:
        chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, _compute_dtype(hidden))


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t's target is label t+1 (the last position predicts nothing)."""
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


class ChunkedHead:
    """The output head's forward, replaced once: with targets pending it returns the loss sum of
    the labelled positions instead of logits; otherwise (eval, generation) the logits as before."""

    def __init__(self, head: nn.Linear) -> None:
        self.head = head
        self.pending: Optional[torch.Tensor] = None
        self.original = head.forward
        head.forward = self._forward

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.pending is None:
            return self.original(hidden)
        targets, self.pending = self.pending.reshape(-1), None
        keep = targets != IGNORE_INDEX
        selected = hidden.reshape(-1, hidden.shape[-1])[keep]
        return linear_cross_entropy_sum(selected, self.head.weight, targets[keep])

    @contextlib.contextmanager
    def targets(self, targets: torch.Tensor) -> Iterator[None]:
        self.pending = targets
        try:
            yield
        finally:
            self.pending = None


LossFn = Callable[[nn.Module, dict, torch.Tensor], torch.Tensor]


def plain_loss(module: nn.Module, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """Full logits from the model, then the token loss sum."""
    logits = module(**inputs, use_cache=False).logits
    return token_loss_sum(logits, labels)[0]


def chunked_unsupported(model: nn.Module) -> Optional[str]:
    """Why the chunked loss cannot replace this model's head (None when it can)."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        return f"the output head is a {type(head).__name__}, not a plain Linear (adapted or quantized)"
    if head.bias is not None:
        return "the output head has a bias"
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in LOGIT_TRANSFORMS:
        if getattr(text, attr, None) not in (None, 1.0):
            return f"the model transforms its logits ({attr}={getattr(text, attr)})"
    return None


def build_loss(kind: str, model: nn.Module, announce: bool = True) -> tuple[LossFn, str]:
    """The loss function the loop calls, and the kind actually used (``chunked`` falls back to
    ``plain``, saying why, for heads it cannot replace). Call before the strategy wraps the model."""
    if kind == "plain":
        return plain_loss, "plain"
    reason = chunked_unsupported(model)
    if reason is not None:
        if announce:
            log.warning("trainer.loss=chunked falls back to the plain loss: %s", reason)
        return plain_loss, "plain"
    head = ChunkedHead(model.get_output_embeddings())

    def chunked_loss(module: nn.Module, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        with head.targets(shifted_targets(labels)):
            return module(**inputs, use_cache=False).logits

    return chunked_loss, "chunked"
