"""Fine-tuning keeps pruned weights at exactly zero: Trainer callback, custom loops, and LoRA merges."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from optimum_msp import MSPConfig, MSPPruner, SparsityPlan, SparsityPreservingCallback
from optimum_msp.integrations.trainer import (
    MASKS_ATTRIBUTE,
    MaskKeeper,
    capture_masks,
    keep_sparsity,
    reapply_masks,
)
from tiny_models import calibration_ids, tiny_model


class _Windows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _pruned(arch: str = "llama", **config):
    model = tiny_model(arch)
    MSPPruner(model).prune(MSPConfig(method="magnitude", **(config or dict(sparsity=0.5))))
    return model


def _pruned_weights(model):
    plan = SparsityPlan.from_config(model.config)
    modules = dict(model.named_modules())
    return {name: modules[name].weight for name in plan.layers}


def _masks(model):
    return {name: (weight.detach() != 0).clone() for name, weight in _pruned_weights(model).items()}


def _assert_masks_kept(model, masks) -> None:
    for name, weight in _pruned_weights(model).items():
        assert torch.equal(weight.detach() != 0, masks[name]), f"{name}: the sparsity pattern changed"
        assert not weight.detach()[~masks[name]].any(), f"{name}: a pruned weight became non-zero"
    SparsityPlan.from_config(model.config).verify(model)


def _train(model, tmp_path, callbacks, **args):
    data = _Windows(calibration_ids(samples=8, seqlen=16, seed=4))
    defaults = dict(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4, learning_rate=3e-3,
                    weight_decay=0.1, optim="adamw_torch", logging_steps=1, save_strategy="no", report_to=[],
                    use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=TrainingArguments(**{**defaults, **args}), train_dataset=data,
                      callbacks=callbacks)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, losses


@pytest.mark.parametrize("args", [{}, dict(gradient_accumulation_steps=2, per_device_train_batch_size=2),
                                  dict(bf16=True)], ids=["plain", "accumulation", "bf16-autocast"])
def test_trainer_keeps_pruned_weights_zero(args, tmp_path):
    model = _pruned()
    masks = _masks(model)
    trainer, losses = _train(model, tmp_path, [SparsityPreservingCallback()], **args)
    assert losses[-1] < losses[0]  # it did learn
    _assert_masks_kept(model, masks)
    # the kept weights moved, and AdamW's moments of pruned weights stayed zero
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        weight = modules[name].weight
        state = trainer.optimizer.state[weight]
        assert state["exp_avg"][~mask].abs().max() == 0, name
        assert state["exp_avg_sq"][~mask].abs().max() == 0, name
    # masks are a plain attribute, never part of the state dict
    assert MASKS_ATTRIBUTE in vars(model)
    assert not any("mask" in key for key in model.state_dict())


def test_trainer_without_callback_breaks_sparsity(tmp_path):
    """The control: the same run without the callback revives pruned weights (so the test above can fail)."""
    model = _pruned()
    masks = _masks(model)
    _train(model, tmp_path, [], max_steps=2)
    revived = sum(int(weight.detach()[~masks[name]].ne(0).sum()) for name, weight in _pruned_weights(model).items())
    assert revived > 0


def test_trainer_accepts_a_model_pruned_while_loading(tmp_path):
    folder = tmp_path / "dense"
    tiny_model("gpt2").save_pretrained(folder)
    config = MSPConfig(method="magnitude", pattern="2:4")
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config)
    masks = _masks(model)
    _, losses = _train(model, tmp_path / "run", [SparsityPreservingCallback()], max_steps=4)
    assert losses[-1] < losses[0]
    _assert_masks_kept(model, masks)
    model.save_pretrained(tmp_path / "finetuned")  # and the fine-tuned checkpoint verifies on reload
    AutoModelForCausalLM.from_pretrained(tmp_path / "finetuned")


def test_custom_loop_with_post_step_hook():
    model = _pruned(pattern="2:4").train()
    masks = _masks(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    keeper = keep_sparsity(model, optimizer)
    ids = calibration_ids(samples=4, seqlen=16, seed=7)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for name, weight in _pruned_weights(model).items():  # gradient hooks already masked the gradients
            assert not weight.grad[~masks[name]].any(), name
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    _assert_masks_kept(model, masks)

    keeper.detach()  # hooks gone: training now revives pruned weights
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert any(weight.detach()[~masks[name]].any() for name, weight in _pruned_weights(model).items())


def test_mask_keeper_without_plan_uses_zeros():
    model = tiny_model("llama")
    with torch.no_grad():
        weight = model.model.layers[0].mlp.up_proj.weight
        weight[:, ::2] = 0
    keeper = MaskKeeper(model)
    assert list(keeper.masks) == ["model.layers.0.mlp.up_proj"]
    with pytest.raises(ValueError, match="Nothing to keep sparse"):
        MaskKeeper(tiny_model("gpt2"))


def test_lora_merge_then_reapply_restores_exact_masks():
    peft = pytest.importorskip("peft")
    model = _pruned(sparsity=0.6)
    masks = capture_masks(model)  # before adapters are attached
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"],
                                                     init_lora_weights=False))
    merged = lora.merge_and_unload()
    dense_after_merge = merged.model.layers[0].self_attn.q_proj.weight.detach().clone()
    assert dense_after_merge[~masks["model.layers.0.self_attn.q_proj"]].ne(0).any()  # LoRA made it dense
    reapply_masks(merged)
    _assert_masks_kept(merged, masks)
    # kept weights are exactly the merged values
    q = merged.model.layers[0].self_attn.q_proj.weight.detach()
    kept = masks["model.layers.0.self_attn.q_proj"]
    assert torch.equal(q[kept], dense_after_merge[kept])


def test_reapply_without_masks_explains():
    with pytest.raises(ValueError, match="capture_masks"):
        reapply_masks(tiny_model("llama"))
