"""Recover the quality of a pruned model by fine-tuning it while keeping its sparsity.

SmolLM2-135M is pruned while loading (Wanda 50 % by default), its WikiText-2 test perplexity measured, then
it is fine-tuned with ``Trainer`` on WikiText-2 *validation* text with :class:`SparsityPreservingCallback`
(pruned weights stay exactly zero: their gradients are masked and the masks are re-applied after every
optimizer step), and measured again. The fine-tuned checkpoint verifies against its plan when reloaded.

    python examples/finetune_pruned.py             # 300 steps of 4 x 256 tokens: hours on a CPU core
    python examples/finetune_pruned.py --steps 200 --batch-size 2 --threads 1   # 25 min of training; PPL on 16
                                                   # test windows 43.95 -> 24.90 (docs/checkpoints.md)
    python examples/finetune_pruned.py --steps 4 --seqlen 128 --batch-size 2 --eval-windows 2 --eval-seqlen 128 \
        --num-calibration-samples 2 --threads 1    # a quick check (~2 min)

Perplexity follows the repo protocol by default (2048-token windows of WikiText-2 test, first --eval-windows).
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from optimum_msp import SparsityPlan, SparsityPreservingCallback
from optimum_msp.commands.arguments import add_config_arguments, config_from_args
from optimum_msp.data import load_text, tokenize_text
from optimum_msp.evaluation import perplexity
from optimum_msp.modeling import resolve_model_path


class TextWindows(torch.utils.data.Dataset):
    """Non-overlapping ``seqlen``-token windows of one long token stream, as causal-LM examples."""

    def __init__(self, ids: torch.Tensor, seqlen: int):
        count = ids.shape[1] // seqlen
        self.windows = ids[0, : count * seqlen].view(count, seqlen)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int):
        window = self.windows[index]
        return {"input_ids": window, "attention_mask": torch.ones_like(window), "labels": window}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--eval-seqlen", type=int, default=2048, help="perplexity window length")
    parser.add_argument("--batch-size", type=int, default=4, help="training windows per step")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--eval-windows", type=int, default=16, help="WikiText-2 test windows for perplexity")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU) for training")
    parser.add_argument("--output", help="save the fine-tuned model here")
    parser.add_argument("--threads", type=int, default=None)
    # every MSPConfig field (--batch-size here is the training batch); --seqlen is also the training window
    add_config_arguments(parser, exclude=("batch_size",))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = config_from_args(args, defaults=dict(num_calibration_samples=16, seqlen=256))
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)
    plan = SparsityPlan.from_config(model.config)
    print(f"pruned: global sparsity {plan.verify(model).global_sparsity:.4f}")

    def ppl() -> float:
        return perplexity(model, tokenizer, seqlen=args.eval_seqlen, max_windows=args.eval_windows)

    before = ppl()
    print(f"WikiText-2 test PPL before fine-tuning: {before:.2f}")

    train = TextWindows(tokenize_text(tokenizer, load_text("wikitext2", "validation")), config.seqlen)
    training_args = TrainingArguments(
        output_dir=args.output or "out/finetune-pruned", max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr, weight_decay=args.weight_decay, lr_scheduler_type="cosine",
        warmup_steps=min(20, args.steps // 10),
        logging_steps=max(1, args.steps // 20), save_strategy="no", report_to=[], use_cpu=True, bf16=args.bf16,
        dataloader_num_workers=0, seed=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train, callbacks=[SparsityPreservingCallback()])
    started = time.perf_counter()
    trainer.train()  # the callback verifies the plan when training ends
    print(f"fine-tuned {args.steps} steps on {len(train)} windows in {time.perf_counter() - started:.0f}s")

    after = ppl()
    report = plan.verify(model)
    print(f"WikiText-2 test PPL after fine-tuning: {after:.2f} (before {before:.2f}); "
          f"sparsity still {report.global_sparsity:.4f}")
    if args.output:
        model.save_pretrained(args.output)
        tokenizer.save_pretrained(args.output)
        print(f"saved to {args.output} (verified against its plan when reloaded)")


if __name__ == "__main__":
    main()
