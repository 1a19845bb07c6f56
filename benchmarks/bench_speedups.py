"""Each speed change of the step against what it replaced, interleaved in one process, one thread.

    python benchmarks/bench_speedups.py            # vocabulary 49,152 (SmolLM2's), 16 x 32 positions: ~2 min
    python benchmarks/bench_speedups.py --vocab 1024 --repeats 8

Rows (medians of --repeats calls after one warm-up, who goes first alternating):
  loss: OPD's full reverse KL, token_loss + backward on random fp32 logits, with its diagnostics:
        recomputing each chunk in backward (the code before) / the gradient taken in the forward by
        autograd / in closed form with the -inf masks built on every row (the code before) / in
        closed form, masks only where a row has a -inf (the CPU default) / the same on a step that
        is not logged (no diagnostics);
  adamw: one AdamW step over the tiny49k model's parameters (llama, 128 wide, 2 layers) with
        random gradients: torch's for-loop / foreach / fused kernel;
  draw: one sampled token for each of 16 rows: torch.multinomial / the inverse CDF (models/sampling.py);
  rollout: 32 sampled tokens (inverse CDF, EOS banned until the last, as compare_trl) for 16 prompts
        of 47 tokens from the tiny49k model: transformers' generate / mmdistill's loop (models/token_loop.py).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

import mmdistill.losses.chunked as chunked
import mmdistill.losses.divergences as divergences
from mmdistill.losses.chunked import reduction_weights, skip_diagnostics, token_loss
from mmdistill.losses.divergences import reverse_kl_and_grad
from mmdistill.methods.opd import OPD
from mmdistill.models import token_loop
from mmdistill.models.sampling import InverseCDFSampler, inverse_cdf_generation


class _Recompute(chunked._ChunkedTokenLoss):
    """The chunked loss as it was: a forward without graph, each chunk recomputed in backward."""

    @staticmethod
    def forward(ctx, fn, closed_form, prepare, chunk_size, n_targets, values_out, diagnostics, diag_out, weight,
                student, *tensors):
        ctx.fn, ctx.prepare, ctx.chunk_size, ctx.n_targets = fn, prepare, chunk_size, n_targets
        ctx.n_tensors, ctx.grad = len(tensors), None
        ctx.save_for_backward(weight, student, *tensors)
        total = torch.zeros((), dtype=torch.float32)
        for b, n in chunked._chunks(weight, chunk_size):
            args = chunked._chunk_args(chunked._rows(student, b, n), tensors[:n_targets], tensors[n_targets:], b, n,
                                       prepare)
            values = fn(*args)
            if values_out is not None:
                values_out[b, n] = values
            if diagnostics is not None:
                chunked._record(diag_out, weight.shape, b, n, diagnostics(*args))
            total += (weight[b, n] * values).sum()
        return total


def timed(calls: dict, repeats: int) -> dict[str, float]:
    out = {k: [] for k in calls}
    for f in calls.values():
        f()
    for r in range(repeats):
        for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
            t0 = time.perf_counter()
            calls[name]()
            out[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in out.items()}


def loss_calls(vocab: int, rows: int, positions: int) -> dict:
    g = torch.Generator().manual_seed(0)
    s0, t = torch.randn(rows, positions, vocab, generator=g), torch.randn(rows, positions, vocab, generator=g)
    w = reduction_weights(torch.ones(rows, positions, dtype=torch.bool))
    ids = torch.randint(0, vocab, (rows, positions), generator=g)
    opd = OPD()

    def run(recompute=False, closed=False, logged=True, masks=False):
        def call():
            s = s0.clone().requires_grad_(True)
            kw = dict(values_out=torch.zeros(rows, positions), diagnostics=opd._diagnostics_besides_kl, diag_out={},
                      chunk_size=chunked.resolve_chunk_size(None, vocab))
            if closed:
                kw["closed_form"] = lambda ls, lt, i: reverse_kl_and_grad(ls, lt)
            real, chunked._ChunkedTokenLoss = chunked._ChunkedTokenLoss, (_Recompute if recompute else
                                                                         chunked._ChunkedTokenLoss)
            without = divergences._without_absent
            divergences._without_absent = divergences._masked if masks else without
            try:
                with skip_diagnostics(not logged):
                    token_loss(opd._per_token, s, [t], w, extras=[ids], **kw).backward()
            finally:
                chunked._ChunkedTokenLoss, divergences._without_absent = real, without
        return call

    return {"recompute in backward": run(recompute=True, masks=True), "gradient in forward": run(masks=True),
            "closed form, masks": run(closed=True, masks=True), "closed form": run(closed=True),
            "closed form, step not logged": run(closed=True, logged=False)}


def adamw_calls(vocab: int) -> dict:
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=512, tie_word_embeddings=True)
    params = list(LlamaForCausalLM(cfg).parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    kinds = {"for_loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    return {k: torch.optim.AdamW(params, lr=1e-5, **kw).step for k, kw in kinds.items()}


def draw_calls(vocab: int, rows: int) -> dict:
    scores = torch.randn(rows, vocab)
    sampler = InverseCDFSampler()
    return {"multinomial": lambda: torch.multinomial(torch.softmax(scores, -1), 1),
            "inverse CDF": lambda: sampler(None, scores)}


def rollout_calls(vocab: int, rows: int, new: int = 32, prompt: int = 47) -> dict:
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=512, tie_word_embeddings=True, eos_token_id=2,
                      pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.min_new_tokens = new
    ids = torch.randint(3, vocab, (rows, prompt), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    gen = GenerationConfig(max_new_tokens=new, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=0,
                           eos_token_id=[2], use_cache=True)
    greedy, processors = inverse_cdf_generation(gen)
    steps = token_loop.plan(model, gen, "inverse_cdf")

    @torch.no_grad()
    def generate():
        model.generate(input_ids=ids, attention_mask=attn, generation_config=greedy, logits_processor=processors)

    return {"transformers' generate": generate, "mmdistill's loop": lambda: token_loop.decode(model, ids, attn, steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--positions", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# vocabulary {args.vocab}, {args.rows} x {args.positions} positions, {args.threads} thread(s), "
          f"torch {torch.__version__}")
    for name, calls in (("loss + backward", loss_calls(args.vocab, args.rows, args.positions)),
                        ("AdamW step", adamw_calls(args.vocab)), ("draw", draw_calls(args.vocab, args.rows)),
                        ("rollout", rollout_calls(args.vocab, args.rows, args.positions))):
        for k, v in timed(calls, args.repeats).items():
            print(f"{name:16s} {k:32s} {v * 1000:9.1f} ms", flush=True)


if __name__ == "__main__":
    main()
