"""A transformers.Trainer with RepresentationCallback: the monitor's scalars go through the Trainer's own logging.

A tiny GPT-2 built from a config and random tokens stand in for a real model and data; nothing is downloaded.
Run: python docs/examples/trainer_callback.py
"""
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from repforget_kernels import RepresentationMonitor
from repforget_kernels.integrations.transformers import RepresentationCallback

torch.manual_seed(0)
torch.set_num_threads(1)  # a tiny model gains nothing from intra-op threads
model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=64,
                                   bos_token_id=0, eos_token_id=0))


def example(length=24):
    ids = torch.randint(0, 128, (length,))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


train = [example() for _ in range(64)]
probe = [{k: torch.stack([example()[k] for _ in range(8)]) for k in ("input_ids", "attention_mask")}]
monitor = RepresentationMonitor(model, probe, every=4)  # built before training: the reference is the start

with tempfile.TemporaryDirectory() as out:
    args = TrainingArguments(output_dir=out, max_steps=8, per_device_train_batch_size=8, learning_rate=5e-3,
                             logging_steps=4, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=train)
    trainer.add_callback(RepresentationCallback(monitor, trainer=trainer))  # logs through trainer.log
    trainer.train()

for record in trainer.state.log_history:
    if "repr/cka/mean" in record:
        print(f"step {record['step']}: cka mean {record['repr/cka/mean']:.3f}, "
              f"pca similarity mean {record['repr/pca_similarity/mean']:.3f}, "
              f"{sum(k.startswith('repr/') for k in record)} scalars logged")
