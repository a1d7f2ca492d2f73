"""The chunked loss (orchestrator/loss.py) against the plain full-logits loss: same value, same
gradients, in fp32 at tight tolerance; and through the 4-bit QLoRA model's replaced head."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orchestrator.config import ASSETS_DIR, DataConfig, LoraConfig, ModelConfig, QuantConfig
from orchestrator.data import collate, load_examples
from orchestrator.loss import build_loss, linear_cross_entropy_sum, plain_loss
from orchestrator.model import attach_lora, load_base, load_tokenizer
from orchestrator.tiny.random_llama import TINY


def test_chunked_equals_plain_loss_and_gradients() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(300, 64, requires_grad=True)
    weight = torch.randn(1000, 64, requires_grad=True)
    targets = torch.randint(0, 1000, (300,))
    plain = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    g_plain = torch.autograd.grad(plain * 0.5, [hidden, weight])
    chunked = linear_cross_entropy_sum(hidden, weight, targets, chunk=37)  # uneven chunks
    g_chunked = torch.autograd.grad(chunked * 0.5, [hidden, weight])
    assert abs(float(plain) - float(chunked)) <= 1e-6 * float(plain)
    for a, b in zip(g_plain, g_chunked):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()


def test_model_head_chunked_loss_matches_plain() -> None:
    """Installed in the head of the 4-bit QLoRA model: equal loss and adapter gradients; the
    head still returns logits outside the loss (eval, generation)."""
    tok = load_tokenizer(ModelConfig(path=str(TINY)))
    cfg = DataConfig(path="unused", max_seq_len=256)
    examples = load_examples(str(ASSETS_DIR / "tiny_instruct" / "eval.jsonl"), tok, cfg)[:6]
    batch = collate(examples, tok.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    model = load_base(ModelConfig(path=str(TINY)), QuantConfig(), torch.float32, torch.device("cpu"))
    model = attach_lora(model, LoraConfig(dropout=0.0))

    def run(fn):
        model.zero_grad(set_to_none=True)
        loss = fn(model, inputs, batch["labels"])
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, g_plain = run(plain_loss)
    fn, kind = build_loss("chunked", model)
    assert kind == "chunked"
    chunked, g_chunked = run(fn)
    assert abs(plain - chunked) <= 1e-6 * plain
    scale = max(g.abs().max() for g in g_plain.values())
    assert max((g_plain[n] - g_chunked[n]).abs().max() for n in g_plain) <= 1e-5 * scale
    with torch.no_grad():
        assert model(**inputs).logits.shape[-1] == model.config.vocab_size


def test_generation_hands_the_head_a_contiguous_input() -> None:
    """Generation's prefill slices the last positions (a strided view); the head gets them
    contiguous, because bf16 linear on a strided 3-D input expands the weight once per sequence
    (+2.4 GB for 16 prompts at a 151k vocabulary); the continuation is unchanged."""
    cfg = ModelConfig(path=TINY)
    model = attach_lora(load_base(cfg, QuantConfig(), torch.bfloat16, torch.device("cpu")), LoraConfig()).eval()
    head = model.get_output_embeddings()
    seen = []
    head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))
    ids = torch.randint(3, 100, (4, 12))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                       pad_token_id=0)
    assert seen and all(seen), seen
    # The same bf16 product on the strided slice itself materialises the expanded weight.
    w = torch.randn(4096, 64, dtype=torch.bfloat16)
    h = torch.randn(8, 5, 64, dtype=torch.bfloat16)[:, -1:, :]
    assert not h.is_contiguous()
    torch.testing.assert_close(F.linear(h.contiguous(), w), F.linear(h, w))
